"""Helpers shared by the training and recovery tests."""

from __future__ import annotations

from pathlib import Path

from tests.integration.processes import ServiceProcess
from torchrelay.shared.events import TrainRequested
from torchrelay.shared.events.data import DatasetRef, TrainJobSpec, TrainRequestedData

DIGITS = "torchrelay.services.train.examples.digits:train"
WORKER = "torchrelay.services.train.worker"


def request(staged: tuple[Path, str], run_id: str, **spec: object) -> TrainRequested:
    fields: dict[str, object] = {
        "dataset": DatasetRef(name="digits", version=staged[1]),
        "entrypoint": DIGITS,
        "world_size": 2,
        "model_name": "digits",
        "checkpoint_every_steps": 20,
        "hyperparameters": {"epochs": 6},
        **spec,
    }
    return TrainRequested(
        source="/tests",
        pipelineid="pipe-t",
        data=TrainRequestedData(run_id=run_id, spec=TrainJobSpec.model_validate(fields)),
    )


def train_service(nats_url: str, storage_root: Path, log: Path, **env: str) -> ServiceProcess:
    """The train service as its own process on ``storage_root``, with a short shutdown and
    ``env`` (``TORCHRELAY_*`` settings) on top."""
    return ServiceProcess(
        ["-m", "torchrelay", "service", "train", "--nats-url", nats_url, "--http-port", "0"],
        log,
        env={
            "TORCHRELAY_STORAGE_ROOT": str(storage_root),
            "TORCHRELAY_SHUTDOWN_GRACE_S": "5",
            "TORCHRELAY_SHUTDOWN_DEADLINE_S": "10",
            **env,
        },
    )


def workers_of(run_id: str) -> list[int]:
    """Live worker processes of a run (read from /proc: their environment names the run)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if WORKER not in (proc / "cmdline").read_text():
                continue
            if f'"run_id":"{run_id}"' in (proc / "environ").read_text(errors="replace"):
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids
