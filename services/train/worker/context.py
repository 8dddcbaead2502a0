"""The context handed to user training code: the staged dataset, DDP, sharded batches, metrics,
checkpoints, restore, export. User code stays a plain function::

    from torchrelay.sdk import InputPreprocessing, TrainingContext

    def train(ctx: TrainingContext) -> None:
        x, y = ctx.arrays("x", "y")
        model = ctx.wrap(Net())
        optimizer = ctx.attach(torch.optim.Adam(model.parameters(), lr=1e-3))
        for xb, yb in ctx.batches((x, y), batch_size=64, epochs=10):
            ...  # forward, backward, optimizer.step()
            ctx.step_done(loss=loss.item(), samples=len(xb))
        ctx.export(model, example_input=x[:1], metrics={"accuracy": acc},
                   labels=["cat", "dog"], preprocessing=InputPreprocessing(scale=1 / 255))

The dataset is read in the format ingest staged it (``ctx.dataset_format``): ``npz`` and ``csv``
with :meth:`TrainingContext.arrays` (text columns of a csv with
:meth:`TrainingContext.categories`), ``images`` with :meth:`TrainingContext.images`, ``pt`` with
:meth:`TrainingContext.tensors`. A reader called on another format says which one to use.

On start the newest valid checkpoint (model, optimizer, scheduler, RNG of every rank, epoch and
position in the data) is restored, so a resumed run ends with the same weights as one that
never stopped.

Rank 0 also keeps the run's history: what ``step_done`` reports, the learning rate and the
exported metrics, as TensorBoard scalars under ``runs/<id>/tensorboard/attempt-<a>/`` (see
:mod:`~torchrelay.services.train.worker.history`).
"""

from __future__ import annotations

import csv
import math
import re
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path, PurePosixPath
from typing import Any, Literal, NamedTuple

import numpy as np
import structlog
import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict, ValidationError
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from torchrelay.services.train.worker import checkpoints
from torchrelay.services.train.worker.history import (
    RunHistory,
    export_scalars,
    learning_rates,
    progress_scalars,
)
from torchrelay.shared.cluster.worker_spec import WorkerSpec
from torchrelay.shared.storage import (
    CorruptFile,
    Layout,
    MissingFile,
    ModelDescription,
    ModelLineage,
    TensorSignature,
    Throughput,
    publish_dir,
    temp_sibling,
)
from torchrelay.shared.storage.failures import SameEveryTime
from torchrelay.shared.storage.files import InputPreprocessing, ModelFormat, label_problem
from torchrelay.shared.storage.layout import (
    DATA_FOLDER,
    MANIFEST_FILE,
    MODEL_DESCRIPTION_FILE,
    STATE_DICT_FILE,
    TORCHSCRIPT_FILE,
    relative_model,
)

log = structlog.get_logger("torchrelay.train.worker")
Report = Callable[[str, dict[str, Any]], None]
"""(kind, fields) -> None: 'progress' or 'checkpointed', sent on by rank 0."""


DatasetFormat = Literal["npz", "csv", "images", "pt"]
READERS: dict[DatasetFormat, str] = {
    "npz": 'ctx.arrays("x", "y")',
    "csv": 'ctx.arrays("column", ...) for numbers, ctx.categories("column") for text',
    "images": "ctx.images()",
    "pt": "ctx.tensors()",
}
"""What reads each staged format, for the error a reader of another format raises."""


class ExportRefused(SameEveryTime, ValueError):
    """``ctx.export`` was given what cannot describe the model (labels that do not name its
    outputs, a wrong preprocessing object): nothing is written, and the run ends at once,
    since every attempt would train again only to be refused again."""


class WrongDatasetFormat(TypeError):
    """A reader was called on a dataset of another format; the message names the reader to
    use instead."""


class ImageFolder(NamedTuple):
    """An image dataset: ``images`` N x C x H x W float32 in [0, 1], ``labels`` int64 class
    indices, ``classes`` the class (folder) names in index order."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]


class _ManifestFile(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")
    path: str


class _StagedDataset(BaseModel):
    """What a reader needs of ingest's ``manifest.json`` (the ingest service owns the full
    model; services never import each other)."""

    model_config = ConfigDict(frozen=True, extra="ignore")
    format: DatasetFormat
    files: tuple[_ManifestFile, ...]


@dataclass(frozen=True)
class Exported:
    model_name: str
    version: str
    path: str
    metrics: dict[str, float]


class TrainingContext:
    def __init__(self, spec: WorkerSpec, report: Report, *, report_every_steps: int = 10) -> None:
        self.spec = spec
        self.rank = spec.rank
        self.world_size = spec.world_size
        self.device = (
            torch.device("cuda", torch.cuda.current_device())
            if spec.backend == "nccl"
            else torch.device("cpu")
        )
        self.hparams = dict(spec.job.hyperparameters)
        self.root = Path(spec.storage_root)
        self.layout = Layout(self.root)
        self.dataset_dir = self.layout.at(spec.dataset_path) / DATA_FOLDER
        self.step = 0
        self.epoch = 0
        self.position = 0
        self.exported: Exported | None = None
        self._report = report
        self._report_every = report_every_steps
        self._model: nn.Module | None = None
        self._optimizer: torch.optim.Optimizer | None = None
        self._scheduler: Any = None
        self._window_started = time.perf_counter()
        self._window_samples = 0
        self._first_step_at: float | None = None
        self._last_step_at = 0.0
        self._samples_after_first = 0
        self.checkpoint_seconds = 0.0
        self.checkpoints_written = 0
        self._checkpoints = self.layout.checkpoints(spec.run_id)
        self._history = RunHistory(
            self.layout.attempt_history(spec.run_id, spec.attempt) if self.rank == 0 else None
        )
        self._restored = checkpoints.load_newest(self._checkpoints)
        if self._restored is not None:
            step, state = self._restored
            self.step, self.epoch, self.position = step, state["epoch"], state["position"]
            log.info("checkpoint.restored", step=step, epoch=self.epoch, position=self.position)

    def number(self, name: str, default: float) -> float:
        """A numeric hyperparameter from the job spec."""
        value = self.hparams.get(name, default)
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise TypeError(f"hyperparameter {name!r} must be a number, got {value!r}")
        return float(value)

    def integer(self, name: str, default: int) -> int:
        value = self.number(name, default)
        if not value.is_integer():
            raise TypeError(f"hyperparameter {name!r} must be a whole number, got {value!r}")
        return int(value)

    @property
    def resumed_from_step(self) -> int | None:
        return self._restored[0] if self._restored else None

    # --- data -----------------------------------------------------------------------------

    @cached_property
    def _staged(self) -> tuple[DatasetFormat, tuple[str, ...]]:
        """(format, the data files relative to :attr:`dataset_dir`, sorted) from the manifest."""
        path = self.dataset_dir.parent / MANIFEST_FILE
        try:
            raw = path.read_bytes()
        except FileNotFoundError as exc:
            raise MissingFile(path, "no dataset manifest: stage datasets with ingest") from exc
        try:
            staged = _StagedDataset.model_validate_json(raw)
        except ValidationError as exc:
            raise CorruptFile(
                path, f"not a dataset manifest ({exc.error_count()} problems)"
            ) from exc
        prefix = f"{DATA_FOLDER}/"
        files = sorted(f.path.removeprefix(prefix) for f in staged.files)
        unsafe = [f for f in files if PurePosixPath(f).is_absolute() or ".." in f.split("/")]
        if unsafe:
            raise CorruptFile(path, f"names files outside the dataset: {unsafe[:3]}")
        return staged.format, tuple(files)

    @property
    def dataset_format(self) -> DatasetFormat:
        """The staged dataset's format: ``npz``, ``csv``, ``images`` or ``pt``."""
        return self._staged[0]

    @property
    def dataset_files(self) -> tuple[str, ...]:
        """The dataset's files, relative to :attr:`dataset_dir`, sorted (``file=`` takes one)."""
        return self._staged[1]

    def _require(self, reader: str, *formats: DatasetFormat) -> None:
        if self.dataset_format not in formats:
            raise WrongDatasetFormat(
                f"ctx.{reader}() reads {' or '.join(formats)} datasets; dataset "
                f"{self.spec.job.dataset.name} is {self.dataset_format}: use "
                f"{READERS[self.dataset_format]}"
            )

    def _file(self, file: str | None) -> Path:
        """The named file of the dataset, or its first; only files the manifest lists."""
        files = self.dataset_files
        if file is None:
            if not files:
                raise FileNotFoundError(f"dataset {self.spec.job.dataset.name} has no files")
            return self.dataset_dir / files[0]
        if file not in files:
            raise FileNotFoundError(
                f"no file {file!r} in dataset {self.spec.job.dataset.name}; it has "
                f"{', '.join(files[:20])}{' ...' if len(files) > 20 else ''}"
            )
        return self.dataset_dir / file

    def arrays(self, *names: str, file: str | None = None) -> tuple[torch.Tensor, ...]:
        """Named arrays of an ``npz`` dataset, or numeric columns of a ``csv`` one, as tensors.
        Several files: the first (sorted) unless ``file`` names one (relative to the data).

        csv columns of whole numbers become int64, other numbers float32 (an empty cell is
        NaN, the column float32); a text column raises :class:`TypeError`: read it with
        :meth:`categories`. A missing name raises :class:`KeyError` listing those there are::

            x, y = ctx.arrays("x", "y")                        # npz
            age, income = ctx.arrays("age", "income", file="train.csv")
        """
        self._require("arrays", "npz", "csv")
        path = self._file(file)
        if self.dataset_format == "csv":
            columns = _csv_columns(path, names)
            return tuple(_numeric_column(path.name, name, columns[name]) for name in names)
        with np.load(path, allow_pickle=False) as data:
            missing = [name for name in names if name not in data.files]
            if missing:
                raise KeyError(
                    f"{path.name} has no array {', '.join(map(repr, missing))}; it has "
                    f"{', '.join(map(repr, data.files))}"
                )
            return tuple(torch.from_numpy(np.ascontiguousarray(data[name])) for name in names)

    def categories(self, name: str, file: str | None = None) -> tuple[torch.Tensor, list[str]]:
        """A ``csv`` column as classes: (int64 codes, the sorted class names), so that
        ``names[code]`` is the cell and the names can go to ``ctx.export(labels=...)``.
        Numbers sort as numbers (``2`` before ``10``), text as text::

            y, species = ctx.categories("species")   # tensor([0, 2, 1, ...]), ["a", "b", "c"]
        """
        self._require("categories", "csv")
        path = self._file(file)
        cells = _csv_columns(path, (name,))[name]
        classes = sorted(set(cells), key=_class_order(cells))
        index = {value: code for code, value in enumerate(classes)}
        return torch.tensor([index[cell] for cell in cells], dtype=torch.int64), classes

    def images(
        self,
        *,
        size: tuple[int, int] | None = None,
        mode: Literal["L", "RGB"] | None = None,
    ) -> ImageFolder:
        """An ``images`` dataset (one folder per class): images N x C x H x W, float32 in
        [0, 1]; labels int64, the index of the class folder in ``classes`` (sorted names).

        ``mode`` ``L`` gives one channel, ``RGB`` three; by default one when every image is
        grayscale, else three. Images of different sizes raise :class:`ValueError` unless
        ``size=(height, width)`` resizes them all (bilinear)::

            x, y, classes = ctx.images(size=(32, 32))
        """
        self._require("images", "images")
        try:
            from PIL import Image
        except ImportError as exc:  # the train extra carries no Pillow
            raise ImportError(
                "ctx.images() decodes images with Pillow, which this worker lacks: install "
                "pillow==13.0.0 (torchrelay[ingest]) into the training image"
            ) from exc
        files = self.dataset_files
        sizes: Counter[tuple[int, int]] = Counter()
        example: dict[tuple[int, int], str] = {}
        colour = False
        for relative in files:  # headers only: sizes and bands before decoding anything
            with Image.open(self.dataset_dir / relative) as image:
                sizes[image.size] += 1
                example.setdefault(image.size, relative)
                colour = colour or not set(image.getbands()) <= _GREY_BANDS
        if size is None and len(sizes) > 1:
            shown = ", ".join(
                f"{w}x{h} ({count}, e.g. {example[(w, h)]})"
                for (w, h), count in sizes.most_common(5)
            )
            raise ValueError(
                f"the images differ in size (width x height): {shown}; pass "
                "size=(height, width) to resize them"
            )
        target = mode or ("RGB" if colour else "L")
        pixels = []
        for relative in files:
            with Image.open(self.dataset_dir / relative) as image:
                converted = image.convert(target)
                if size is not None and converted.size != (size[1], size[0]):
                    converted = converted.resize((size[1], size[0]), Image.Resampling.BILINEAR)
                pixels.append(np.asarray(converted, dtype=np.uint8))
        classes = sorted({PurePosixPath(relative).parts[0] for relative in files})
        index = {name: code for code, name in enumerate(classes)}
        stacked = torch.from_numpy(np.stack(pixels)).float().div_(255.0)
        images = stacked.unsqueeze(1) if target == "L" else stacked.permute(0, 3, 1, 2)
        labels = torch.tensor(
            [index[PurePosixPath(relative).parts[0]] for relative in files], dtype=torch.int64
        )
        return ImageFolder(images.contiguous(), labels, classes)

    def tensors(self, file: str | None = None) -> dict[str, torch.Tensor]:
        """A ``pt`` dataset: the dict of named tensors in the file (the first unless ``file``
        names one), loaded with ``weights_only=True`` (a file on shared storage is untrusted,
        and ingest checked it loads that way)::

            data = ctx.tensors()          # saved as torch.save({"x": x, "y": y}, "data.pt")
            x, y = data["x"], data["y"]
        """
        self._require("tensors", "pt")
        path = self._file(file)
        loaded = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(loaded, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in loaded.items()
        ):
            raise TypeError(
                f"{path.name} holds {_kind(loaded)}; ctx.tensors() reads a dict of named "
                'tensors, saved as torch.save({"x": x, "y": y}, path)'
            )
        return loaded

    def batches(
        self, tensors: Sequence[torch.Tensor], *, batch_size: int, epochs: int
    ) -> Iterator[tuple[torch.Tensor, ...]]:
        """This rank's shard of ``tensors`` in batches, epoch after epoch, reshuffled per epoch
        from the job's seed, resuming where the restored checkpoint left off."""
        if self._restored is not None:
            # Restored here, not at start: building the model draws from the RNG, and the
            # uninterrupted run had drawn that before its checkpoint.
            torch.set_rng_state(self._restored[1]["rng"][self.rank])
        count = len(tensors[0])
        per_rank = count // self.world_size
        usable = per_rank - per_rank % batch_size
        while self.epoch < epochs:
            generator = torch.Generator().manual_seed(self.spec.job.seed + self.epoch)
            order = torch.randperm(count, generator=generator)
            mine = order[self.rank : per_rank * self.world_size : self.world_size][:usable]
            batches = torch.split(mine, batch_size)
            while self.position < len(batches):
                before = self.position
                yield tuple(t[batches[before]].to(self.device) for t in tensors)
                if self.position == before:  # step_done() was not called: move on anyway
                    self.position += 1
            self.epoch += 1
            self.position = 0

    # --- model ------------------------------------------------------------------------------

    def wrap(self, model: nn.Module) -> nn.Module:
        """Move the model to this rank's device, restore its weights, wrap it for DDP."""
        model = model.to(self.device)
        if self._restored is not None:
            model.load_state_dict(self._restored[1]["model"])
        self._model = model
        if self.world_size == 1:
            return model
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids)

    def attach(
        self, optimizer: torch.optim.Optimizer, scheduler: Any = None
    ) -> torch.optim.Optimizer:
        """Register the optimizer (and scheduler) for checkpoints; restores their state."""
        self._optimizer, self._scheduler = optimizer, scheduler
        if self._restored is not None:
            state = self._restored[1]
            optimizer.load_state_dict(state["optimizer"])
            if scheduler is not None and state.get("scheduler") is not None:
                scheduler.load_state_dict(state["scheduler"])
        return optimizer

    # --- progress -------------------------------------------------------------------------

    def step_done(
        self, *, loss: float, samples: int, metrics: dict[str, float] | None = None
    ) -> None:
        """Call after each optimizer step: counts it, reports progress (and keeps it in the
        run's history), checkpoints on time."""
        self.step += 1
        self.position += 1
        self._window_samples += samples * self.world_size
        now = time.perf_counter()
        if self._first_step_at is None:
            self._first_step_at = now
        else:
            self._samples_after_first += samples * self.world_size
        self._last_step_at = now
        if self.step % self._report_every == 0 and self.rank == 0:
            elapsed = time.perf_counter() - self._window_started
            samples_per_s = self._window_samples / elapsed if elapsed > 0 else 0.0
            self._report(
                "progress",
                {
                    "step": self.step,
                    "epoch": self.epoch,
                    "loss": float(loss),
                    "samples_per_s": samples_per_s,
                    "metrics": metrics or {},
                },
            )
            self._history.scalars(
                self.step,
                progress_scalars(
                    loss=loss,
                    samples_per_s=samples_per_s,
                    metrics=metrics or {},
                    learning_rates=learning_rates(self._optimizer),
                ),
            )
            self._window_started, self._window_samples = time.perf_counter(), 0
        if self.step % self.spec.job.checkpoint_every_steps == 0:
            self.checkpoint()

    def throughput(self) -> Throughput:
        """Samples/s of the whole job (all ranks) from the first step to the last, and the time
        checkpoints held training up."""
        elapsed = self._last_step_at - (self._first_step_at or self._last_step_at)
        return Throughput(
            samples_per_s=self._samples_after_first / elapsed if elapsed > 0 else 0.0,
            checkpoints=self.checkpoints_written,
            checkpoint_seconds=self.checkpoint_seconds,
        )

    def checkpoint(self) -> None:
        """Write a checkpoint of this step (collective: every rank calls it)."""
        if self._model is None or self._optimizer is None:
            raise RuntimeError("call ctx.wrap(model) and ctx.attach(optimizer) before checkpoints")
        started = time.perf_counter()
        rng = [torch.get_rng_state()]
        if self.world_size > 1:
            gathered: list[Any] = [None] * self.world_size
            dist.all_gather_object(gathered, rng[0])
            rng = gathered
        if self.rank == 0:
            state = {
                "step": self.step,
                "epoch": self.epoch,
                "position": self.position,
                "model": {k: v.detach().cpu() for k, v in self._model.state_dict().items()},
                "optimizer": self._optimizer.state_dict(),
                "scheduler": self._scheduler.state_dict() if self._scheduler else None,
                "rng": rng,
            }
            path = checkpoints.save(
                self._checkpoints, self.step, state, self.spec.job.keep_checkpoints
            )
            self._report(
                "checkpointed", {"step": self.step, "path": str(path.relative_to(self.root))}
            )
            self._history.flush()  # the history on storage reaches at least the checkpoint
        if self.world_size > 1:
            dist.barrier()
        self.checkpoint_seconds += time.perf_counter() - started
        self.checkpoints_written += 1

    def close(self) -> None:
        """Flush and close the run's history (the worker calls it when the training function
        has returned or raised; training code need not). Never raises."""
        self._history.close()

    # --- export -----------------------------------------------------------------------------

    def export(
        self,
        model: nn.Module,
        *,
        example_input: torch.Tensor,
        metrics: dict[str, float],
        labels: Sequence[str] | None = None,
        preprocessing: InputPreprocessing | None = None,
    ) -> None:
        """Export the trained model once (rank 0 writes; every rank calls it): TorchScript when
        the module scripts, else its state dict; plus model.json with signature and lineage.

        The model describes itself for whoever calls it: ``labels`` names the classes in
        output order (one per value of the output's last dimension, else :class:`ValueError`
        and nothing is written); ``preprocessing`` says how a raw input becomes the model's
        input (``raw * scale + offset``), so ``torchrelay predict`` can take raw data::

            ctx.export(model, example_input=x[:1], metrics={"accuracy": acc},
                       labels=classes, preprocessing=InputPreprocessing(scale=1 / 255))
        """
        if isinstance(labels, str) or (
            labels is not None and not all(isinstance(label, str) for label in labels)
        ):
            raise ExportRefused(f"labels must be a list of class names (str), got {labels!r}")
        if preprocessing is not None and not isinstance(preprocessing, InputPreprocessing):
            raise ExportRefused(
                f"preprocessing must be an InputPreprocessing, got {type(preprocessing).__name__}"
            )
        module = model.module if isinstance(model, DistributedDataParallel) else model
        job = self.spec.job
        version = self.spec.run_id
        final = self.layout.model(job.model_name, version)
        if self.rank == 0:
            module = module.to("cpu").eval()
            with torch.no_grad():
                output = module(example_input.to("cpu"))
            outputs = (_signature("output", output),)
            if labels is not None and (problem := label_problem(labels, outputs[0].shape)):
                module.to(self.device)
                raise ExportRefused(f"ctx.export(labels=...): {problem}")
            staging = temp_sibling(final)
            staging.mkdir(parents=True)
            model_class = None
            try:
                torch.jit.script(module).save(str(staging / TORCHSCRIPT_FILE))
                kind: ModelFormat = "torchscript"
            except Exception as exc:  # noqa: BLE001 - not every module scripts; fall back
                log.info("export.state_dict", reason=repr(exc)[:200])
                torch.save(module.state_dict(), staging / STATE_DICT_FILE)
                kind = "state_dict"
                # What a server imports to rebuild the module before loading the weights.
                model_class = f"{type(module).__module__}:{type(module).__qualname__}"
            description = ModelDescription(
                name=job.model_name,
                version=version,
                format=kind,
                model_class=model_class,
                inputs=(_signature("input", example_input),),
                outputs=outputs,
                metrics=metrics,
                lineage=ModelLineage(
                    dataset=job.dataset,
                    run_id=self.spec.run_id,
                    attempt=self.spec.attempt,
                    entrypoint=job.entrypoint,
                    steps=self.step,
                    workspace=job.workspace,
                ),
                created=datetime.now(UTC),
                labels=None if labels is None else tuple(labels),
                preprocessing=preprocessing,
            )
            description.write(staging / MODEL_DESCRIPTION_FILE)
            publish_dir(staging, final)
            self.exported = Exported(
                job.model_name, version, relative_model(job.model_name, version), dict(metrics)
            )
            self._history.scalars(self.step, export_scalars(metrics))
            self._history.flush()
            module.to(self.device)
        if self.world_size > 1:
            dist.barrier()


_GREY_BANDS = frozenset({"L", "1", "I", "F", "A"})
"""Bands of grayscale modes (L, LA, 1, I, I;16, F); anything else reads as colour."""
_INTEGER = re.compile(r"[+-]?\d+")
_REAL = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?|[+-]?(nan|inf|infinity)", re.I)
_INT64 = (-(2**63), 2**63 - 1)


def _csv_columns(path: Path, names: Sequence[str]) -> dict[str, list[str]]:
    """The cells of the named columns (ingest checked the header and every row's width)."""
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        header = next(reader, [])
        missing = [name for name in names if name not in header]
        if missing:
            raise KeyError(
                f"{path.name} has no column {', '.join(map(repr, missing))}; it has "
                f"{', '.join(map(repr, header))}"
            )
        wanted = {name: header.index(name) for name in names}
        columns: dict[str, list[str]] = {name: [] for name in names}
        for row in reader:
            for name, at in wanted.items():
                columns[name].append(row[at])
    return columns


def _numbers(cells: Sequence[str]) -> np.ndarray[Any, Any] | None:
    """int64 when every cell is a whole number, float32 when every cell is a number or
    empty (NaN), None when one holds text."""
    stripped = [cell.strip() for cell in cells]
    if all(_INTEGER.fullmatch(cell) for cell in stripped):
        values = [int(cell) for cell in stripped]
        if all(_INT64[0] <= value <= _INT64[1] for value in values):
            return np.asarray(values, dtype=np.int64)
    if all(not cell or _REAL.fullmatch(cell) for cell in stripped):
        return np.asarray([float(cell) if cell else math.nan for cell in stripped], np.float32)
    return None


def _numeric_column(file: str, name: str, cells: Sequence[str]) -> torch.Tensor:
    values = _numbers(cells)
    if values is None:
        text = next(c for c in cells if c.strip() and not _REAL.fullmatch(c.strip()))
        raise TypeError(
            f"column {name!r} of {file} holds text ({text[:40]!r}), not numbers: read it "
            f"with ctx.categories({name!r}) for int64 codes and the class names"
        )
    return torch.from_numpy(values)


def _class_order(cells: Sequence[str]) -> Callable[[str], Any]:
    """Sort key for a column's classes: by value when every cell is a number, else by text."""
    if cells and all(cell.strip() and _REAL.fullmatch(cell.strip()) for cell in cells):
        return float
    return str


def _kind(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"a single tensor of shape {list(value.shape)}"
    if isinstance(value, dict):
        return f"a dict of {', '.join(sorted({type(v).__name__ for v in value.values()}))}"
    return f"a {type(value).__name__}"


def _signature(name: str, tensor: torch.Tensor) -> TensorSignature:
    """Open Inference Protocol style: the batch dimension is -1."""
    return TensorSignature(
        name=name,
        datatype=_DATATYPES.get(tensor.dtype, str(tensor.dtype)),
        shape=(-1, *tensor.shape[1:]),
    )


_DATATYPES = {
    torch.float32: "FP32",
    torch.float64: "FP64",
    torch.float16: "FP16",
    torch.int64: "INT64",
    torch.int32: "INT32",
    torch.int16: "INT16",
    torch.int8: "INT8",
    torch.uint8: "UINT8",
    torch.bool: "BOOL",
}
