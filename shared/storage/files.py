"""The files services hand each other through the shared storage, as typed contracts.

- ``models/<name>/<version>/model.json``: :class:`ModelDescription`, written by rank 0 at
  export, read by the model server and by the serve service (smoke inference).
- ``runs/<run_id>/result.json``: :class:`RunResult`, written by rank 0 once the model is
  exported, read by the train service to publish ``train.completed``.

(``datasets/<name>/<version>/manifest.json`` has its own model, ``Manifest``, in the ingest
service, its only writer.)

A file on shared storage is untrusted input: :meth:`StoredFile.read` refuses one that is
missing, too large, not JSON or not the contract, with a :class:`CorruptFile` that names the
file and every problem; :meth:`StoredFile.write` replaces the file atomically. The JSON is the
one these files always had, so folders written before these classes existed still read.

Unknown fields are refused (``extra="forbid"``): the platform is the only writer, and a typo
must not pass silently. Adding a field therefore means readers first: give it a default,
release the readers, then the writers.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, ClassVar, Literal, Self

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    model_validator,
)

from torchrelay.shared.errors import PermanentError
from torchrelay.shared.events.data import DatasetRef, Name, Version
from torchrelay.shared.storage.atomic import atomic_write_bytes
from torchrelay.shared.storage.layout import (
    STATE_DICT_FILE,
    TORCHSCRIPT_FILE,
    relative_model,
)

MAX_FILE_BYTES = 1 << 20
"""Larger than any file these contracts describe by far; a bigger one is refused unread."""
_SHOWN_PROBLEMS = 8


class CorruptFile(PermanentError, ValueError):
    """A file on the shared storage is unreadable as its contract: not JSON, a field missing
    or wrong, too large. Retrying the same read cannot help; write the file again (for a model:
    export it again). A ``ValueError`` too, so ``except ValueError`` around a parse still holds."""

    def __init__(self, path: Path, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem


class MissingFile(CorruptFile):
    """The file a contract promises is not there at all. On NFS a file another node just
    renamed into place can take a moment to appear: a caller that expects that may retry."""


NonEmpty = Annotated[str, StringConstraints(min_length=1, max_length=512)]


class StoredFile(BaseModel):
    """Base of the file contracts: frozen, unknown fields refused, atomic writes."""

    model_config = ConfigDict(
        frozen=True,
        extra="forbid",
        # json.dumps wrote NaN/Infinity as bare constants; keep reading and writing them so old
        # files load. Events refuse them (allow_inf_nan=False) when a value travels on.
        ser_json_inf_nan="constants",
        # Validators are built on first use: a process that reads one kind of file (a model
        # server reads model.json) does not pay at import for every contract defined here.
        defer_build=True,
    )

    describes: ClassVar[str] = "file"
    """What the file is, for error messages ("model description")."""

    @classmethod
    def read(cls, path: Path) -> Self:
        """The file at ``path``; :class:`MissingFile` or :class:`CorruptFile` naming the file
        and its problems when it is absent or not this contract. Other OS errors (permission,
        a stale NFS handle) propagate: they are not the file's fault and may pass."""
        try:
            with path.open("rb") as handle:
                data = handle.read(MAX_FILE_BYTES + 1)
        except FileNotFoundError as exc:
            raise MissingFile(path, f"no {cls.describes} here ({exc.strerror})") from exc
        except IsADirectoryError as exc:
            raise CorruptFile(path, f"a folder, not a {cls.describes}") from exc
        if len(data) > MAX_FILE_BYTES:
            raise CorruptFile(path, f"larger than {MAX_FILE_BYTES} bytes: not a {cls.describes}")
        try:
            return cls.model_validate_json(data)
        except ValidationError as exc:
            raise CorruptFile(path, _problems(exc, cls.describes)) from exc

    def write(self, path: Path) -> None:
        """Replace ``path`` atomically (temporary sibling, fsync, rename, fsync the folder)."""
        atomic_write_bytes(path, self.model_dump_json(indent=2).encode())


def _problems(exc: ValidationError, describes: str) -> str:
    errors = exc.errors(include_url=False, include_input=False, include_context=False)
    if any(e["type"] == "json_invalid" for e in errors):
        return f"not valid JSON, so not a {describes} ({errors[0]['msg']})"
    shown = [f"{'.'.join(str(p) for p in e['loc']) or '(top)'}: {e['msg']}" for e in errors]
    if len(shown) > _SHOWN_PROBLEMS:
        shown = [*shown[:_SHOWN_PROBLEMS], f"and {len(shown) - _SHOWN_PROBLEMS} more"]
    return f"not a valid {describes}: " + "; ".join(shown)


# --- model.json ---------------------------------------------------------------------------------


class TensorSignature(BaseModel):
    """A declared input or output, Open Inference Protocol style."""

    model_config = ConfigDict(frozen=True, extra="forbid", defer_build=True)

    name: NonEmpty
    datatype: NonEmpty = Field(
        description="FP32, INT64, ... (torch's name for a dtype the protocol lacks: whether a "
        "server supports it is the server's call, not the file's)."
    )
    shape: tuple[Annotated[int, Field(ge=-1)], ...] = Field(
        description="-1 for the batch (or any) dimension."
    )


class ModelLineage(BaseModel):
    """Where a model came from: dataset version -> run -> this model."""

    model_config = ConfigDict(frozen=True, extra="forbid", defer_build=True)

    dataset: DatasetRef
    run_id: NonEmpty
    attempt: int = Field(ge=0, description="The attempt that exported it.")
    entrypoint: NonEmpty = Field(description="The training function, module:function.")
    steps: int = Field(ge=0, description="Optimizer steps when it was exported.")
    workspace: NonEmpty | None = Field(
        default=None, description="The staged workspace the entrypoint came from, if any."
    )


class InputPreprocessing(BaseModel):
    """How a raw input becomes the model's input: ``model input = raw * scale + offset``.

    Declared at export (``ctx.export(..., preprocessing=...)``) so a client can send raw data
    (pixel values 0..255, counts, ...) and scale it the way training did."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False, defer_build=True)

    scale: float = Field(default=1.0, description="Multiplies the raw input (never 0).")
    offset: float = Field(default=0.0, description="Added after scaling.")
    description: Annotated[str, StringConstraints(max_length=512)] | None = Field(
        default=None, description="In words, for people: 'pixel values 0..16 to 0..1'."
    )

    @model_validator(mode="after")
    def _scale_keeps_inputs_apart(self) -> Self:
        if self.scale == 0:
            raise ValueError("scale 0 would turn every input into the same value")
        return self

    def apply(self, raw: Any) -> Any:
        """``raw * scale + offset``; works on numbers, numpy arrays and tensors alike."""
        return raw * self.scale + self.offset


Label = Annotated[str, StringConstraints(max_length=512)]
MAX_LABELS = 10_000


def label_problem(labels: Sequence[str], output_shape: Sequence[int]) -> str | None:
    """Why ``labels`` cannot name the outputs of shape ``output_shape``, or None when they can:
    when the output has a last dimension (beyond the batch one), there is one label per value."""
    if len(output_shape) < 2 or output_shape[-1] == -1:
        return None
    if len(labels) != output_shape[-1]:
        return (
            f"{len(labels)} labels for an output of {output_shape[-1]} values per sample "
            f"(shape {list(output_shape)}): give one label per output value, in output order"
        )
    return None


ModelFormat = Literal["torchscript", "state_dict"]
ModelClass = Annotated[str, StringConstraints(pattern=r"^[\w.]+:\S+$", max_length=512)]
"""``module:qualname``; a class the server cannot import fails there, with the reason."""


class ModelDescription(StoredFile):
    """``model.json`` of an exported model version: its signature, metrics and lineage."""

    describes: ClassVar[str] = "model description (model.json)"

    name: Name
    version: Version
    format: ModelFormat = Field(
        description=f"torchscript: {TORCHSCRIPT_FILE}; state_dict: {STATE_DICT_FILE} plus "
        "model_class to rebuild the module."
    )
    model_class: ModelClass | None = Field(
        default=None, description="module:Class, for the state_dict format (None otherwise)."
    )
    inputs: tuple[TensorSignature, ...] = Field(min_length=1)
    outputs: tuple[TensorSignature, ...] = Field(min_length=1)
    metrics: dict[str, float]
    lineage: ModelLineage
    created: AwareDatetime
    labels: tuple[Label, ...] | None = Field(
        default=None,
        max_length=MAX_LABELS,
        description="Class names in output order (the first output's last dimension).",
    )
    preprocessing: InputPreprocessing | None = Field(
        default=None, description="How raw inputs are scaled into the model's input."
    )

    @model_validator(mode="after")
    def _state_dict_names_its_class(self) -> Self:
        if self.format == "state_dict" and self.model_class is None:
            raise ValueError("format state_dict needs model_class (module:Class)")
        return self

    @model_validator(mode="after")
    def _one_label_per_output(self) -> Self:
        if self.labels is not None and (
            problem := label_problem(self.labels, self.outputs[0].shape)
        ):
            raise ValueError(problem)
        return self

    def write(self, path: Path) -> None:
        """As :meth:`StoredFile.write`, leaving out ``labels``, ``preprocessing`` and the
        lineage's ``workspace`` when there are none: such a file is the one readers from before
        those fields read."""
        undeclared: dict[str, Any] = {
            name: True for name in _DECLARATIONS if getattr(self, name) is None
        }
        if self.lineage.workspace is None:  # likewise for code that came from no workspace
            undeclared["lineage"] = {"workspace": True}
        atomic_write_bytes(path, self.model_dump_json(indent=2, exclude=undeclared).encode())

    @property
    def artifact(self) -> str:
        """The weights' file name inside the model's folder."""
        return TORCHSCRIPT_FILE if self.format == "torchscript" else STATE_DICT_FILE


_DECLARATIONS = ("labels", "preprocessing")


# --- result.json --------------------------------------------------------------------------------


class Throughput(BaseModel):
    """Samples/s of the whole job from its first step to its last, and checkpoint stalls."""

    model_config = ConfigDict(frozen=True, extra="forbid", defer_build=True)

    samples_per_s: float = Field(ge=0)
    checkpoints: int = Field(ge=0, description="Checkpoints this attempt wrote.")
    checkpoint_seconds: float = Field(ge=0, description="Time they held training up, s.")


class RunResult(StoredFile):
    """``result.json`` of a run that succeeded: the model it exported, written by rank 0 last."""

    describes: ClassVar[str] = "run result (result.json)"

    model_name: Name
    version: Version
    path: NonEmpty = Field(description="The model's folder, relative to the storage root.")
    metrics: dict[str, float]
    steps: int = Field(ge=0)
    attempt: int = Field(ge=0, description="The attempt that succeeded.")
    throughput: Throughput

    @model_validator(mode="after")
    def _path_is_the_models_folder(self) -> Self:
        expected = relative_model(self.model_name, self.version)
        if PurePosixPath(self.path) != PurePosixPath(expected):
            raise ValueError(f"path {self.path!r} is not the model's folder {expected!r}")
        return self


__all__ = [
    "CorruptFile",
    "InputPreprocessing",
    "MissingFile",
    "ModelDescription",
    "ModelFormat",
    "ModelLineage",
    "RunResult",
    "StoredFile",
    "TensorSignature",
    "Throughput",
    "label_problem",
]
