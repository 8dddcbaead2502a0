"""Where everything lives on the shared storage: the one module that spells the layout.

::

    <root>/datasets/<name>/<version>/manifest.json      written by ingest
    <root>/datasets/<name>/<version>/data/...
    <root>/workspaces/<id>/manifest.json                written by ingest: a user's code
    <root>/workspaces/<id>/code/...                     (the folder ranks import from)
    <root>/runs/<run_id>/result.json                    written by rank 0 on success
    <root>/runs/<run_id>/checkpoints/step-<n>.pt
    <root>/runs/<run_id>/logs/attempt-<a>/rank-<r>.log  local backend
    <root>/runs/<run_id>/logs/attempt-<a>/rank-<r>.error.json   why a rank's code failed
    <root>/runs/<run_id>/rendezvous/attempt-<a>         local backend (a file:// store)
    <root>/runs/<run_id>/tensorboard/attempt-<a>/       rank 0: TensorBoard event files
    <root>/models/<name>/<version>/model.json           plus model.pt or weights.pt
    <root>/serving/<model>/<version>/                   local model servers' logs
    <root>/serving/_admin/                              their admin sockets (mode 0700)

Pure: paths are computed, never touched. Every name that becomes a path segment is checked to
be exactly one segment (no ``/``, not ``.`` or ``..``), so a hostile name cannot point outside
its folder; :class:`~torchrelay.shared.errors.UnsafePath` says which one was refused.
Records and events store paths relative to the root (``relative_*``), so the same record
works wherever the storage is mounted (a local folder, the NFS mount in a pod).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from torchrelay.shared.errors import UnsafePath

DATASETS = "datasets"
WORKSPACES = "workspaces"
RUNS = "runs"
MODELS = "models"
SERVING = "serving"
ADMIN_FOLDER = "_admin"
"""Under ``serving/``; starts with ``_`` so no model name (DNS-label shaped) can take it."""

MANIFEST_FILE = "manifest.json"
DATA_FOLDER = "data"
CODE_FOLDER = "code"
RESULT_FILE = "result.json"
CHECKPOINTS_FOLDER = "checkpoints"
LOGS_FOLDER = "logs"
RENDEZVOUS_FOLDER = "rendezvous"
HISTORY_FOLDER = "tensorboard"
MODEL_DESCRIPTION_FILE = "model.json"
TORCHSCRIPT_FILE = "model.pt"
STATE_DICT_FILE = "weights.pt"
RANK_LOG_GLOB = "attempt-*/rank-*.log"
"""Every rank log of every attempt, relative to :meth:`Layout.logs`."""


def segment(value: str, what: str) -> str:
    """``value`` when it is exactly one path segment, else :class:`UnsafePath` naming it."""
    if not value or value in {".", ".."} or "/" in value or "\0" in value:
        raise UnsafePath(f"{what} {value!r} is not a single path segment")
    return value


def _index(value: int, what: str) -> int:
    if value < 0:
        raise ValueError(f"{what} must be >= 0, got {value}")
    return value


def attempt_folder(attempt: int) -> str:
    return f"attempt-{_index(attempt, 'attempt')}"


def rank_log_file(rank: int) -> str:
    return f"rank-{_index(rank, 'rank')}.log"


def rank_error_file(rank: int) -> str:
    return f"rank-{_index(rank, 'rank')}.error.json"


def relative_dataset(name: str, version: str) -> str:
    """``datasets/<name>/<version>``: a dataset version's folder as records store it."""
    return f"{DATASETS}/{segment(name, 'dataset name')}/{segment(version, 'dataset version')}"


def relative_workspace(workspace_id: str) -> str:
    """``workspaces/<id>``: a staged workspace's folder as records and worker specs store it."""
    return f"{WORKSPACES}/{segment(workspace_id, 'workspace id')}"


def relative_model(name: str, version: str) -> str:
    """``models/<name>/<version>``: a model version's folder as records and events store it."""
    return f"{MODELS}/{segment(name, 'model name')}/{segment(version, 'model version')}"


def relative_run(run_id: str) -> str:
    """``runs/<run_id>``: a run's folder, relative to the root."""
    return f"{RUNS}/{segment(run_id, 'run id')}"


@dataclass(frozen=True, slots=True)
class Layout:
    """The storage layout under ``root``; every method only computes a path."""

    root: Path

    def at(self, relative: str) -> Path:
        """``root / relative`` for a relative path a record stored (``relative_*``). Refuses
        absolute paths and ``..`` segments without touching the disk; use
        :func:`~torchrelay.shared.storage.resolve_within` where symlinks must be checked too."""
        path = PurePosixPath(relative)
        if not relative or path.is_absolute() or ".." in path.parts or "\0" in relative:
            raise UnsafePath(f"{relative!r} is not a relative path under {self.root}")
        return self.root.joinpath(*path.parts)

    # --- datasets (ingest writes, training reads) -------------------------------------------

    def datasets(self) -> Path:
        return self.root / DATASETS

    def dataset(self, name: str, version: str) -> Path:
        return self.at(relative_dataset(name, version))

    def dataset_data(self, name: str, version: str) -> Path:
        """The dataset's files, as the manifest's paths (``data/...``) are relative to it."""
        return self.dataset(name, version) / DATA_FOLDER

    def manifest(self, name: str, version: str) -> Path:
        return self.dataset(name, version) / MANIFEST_FILE

    # --- workspaces (ingest writes, the train service checks, ranks import) ------------------

    def workspaces(self) -> Path:
        return self.root / WORKSPACES

    def workspace(self, workspace_id: str) -> Path:
        return self.at(relative_workspace(workspace_id))

    def workspace_code(self, workspace_id: str) -> Path:
        """The user's files (the folder that goes first on a rank's import path)."""
        return self.workspace(workspace_id) / CODE_FOLDER

    def workspace_manifest(self, workspace_id: str) -> Path:
        return self.workspace(workspace_id) / MANIFEST_FILE

    # --- runs (the backend and the workers write) --------------------------------------------

    def run(self, run_id: str) -> Path:
        return self.at(relative_run(run_id))

    def result(self, run_id: str) -> Path:
        """``result.json``: rank 0 writes it last, once the model is exported."""
        return self.run(run_id) / RESULT_FILE

    def checkpoints(self, run_id: str) -> Path:
        return self.run(run_id) / CHECKPOINTS_FOLDER

    def logs(self, run_id: str) -> Path:
        """Every attempt's rank logs (:data:`RANK_LOG_GLOB` under it)."""
        return self.run(run_id) / LOGS_FOLDER

    def attempt_logs(self, run_id: str, attempt: int) -> Path:
        return self.logs(run_id) / attempt_folder(attempt)

    def rank_log(self, run_id: str, attempt: int, rank: int) -> Path:
        return self.attempt_logs(run_id, attempt) / rank_log_file(rank)

    def rank_error(self, run_id: str, attempt: int, rank: int) -> Path:
        """Why a rank's code failed (exception type, message, traceback), written by the rank."""
        return self.attempt_logs(run_id, attempt) / rank_error_file(rank)

    def rendezvous(self, run_id: str, attempt: int) -> Path:
        """The file an attempt's ranks meet at (``file://``): a fresh one per attempt, so a
        restarted job never reads the dead ranks' addresses."""
        return self.run(run_id) / RENDEZVOUS_FOLDER / attempt_folder(attempt)

    def history(self, run_id: str) -> Path:
        """The run's metrics as TensorBoard event files, one folder per attempt under it."""
        return self.run(run_id) / HISTORY_FOLDER

    def attempt_history(self, run_id: str, attempt: int) -> Path:
        return self.history(run_id) / attempt_folder(attempt)

    # --- models (rank 0 exports, model servers load) -----------------------------------------

    def model(self, name: str, version: str) -> Path:
        return self.at(relative_model(name, version))

    def model_description(self, name: str, version: str) -> Path:
        """``model.json``: see :class:`~torchrelay.shared.storage.files.ModelDescription`."""
        return self.model(name, version) / MODEL_DESCRIPTION_FILE

    # --- serving (local model servers) -------------------------------------------------------

    def serving_logs(self, model: str, version: str) -> Path:
        return self.root / SERVING / segment(model, "model name") / segment(version, "version")

    def admin_sockets(self) -> Path:
        """The private folder of the local model servers' admin sockets."""
        return self.root / SERVING / ADMIN_FOLDER
