"""Helpers shared by the training and recovery tests."""

from __future__ import annotations

from pathlib import Path

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
