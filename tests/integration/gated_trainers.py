"""A training function the backend contract suite steers from outside, as a cluster's pods
would be steered by the test playing the kubelet.

Each rank says it is running (``started-<rank>`` in the run's folder), then waits for the
run's ``gate`` file: ``go`` exports a tiny model and ends; ``fail:<rank>`` makes that rank
raise (the others keep waiting, as ranks stuck in a collective would, until the backend tears
them down). Without a gate the ranks wait until they are stopped.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn

from torchrelay.services.train.worker import TrainingContext

GATE = "gate"
POLL_S = 0.05


def run_folder(root: Path, run_id: str) -> Path:
    return root / "runs" / run_id


def started_file(root: Path, run_id: str, rank: int) -> Path:
    return run_folder(root, run_id) / f"started-{rank}"


def gated(ctx: TrainingContext) -> None:
    run_id = ctx.spec.run_id
    started = started_file(ctx.root, run_id, ctx.rank)
    started.parent.mkdir(parents=True, exist_ok=True)
    started.write_text("running")
    gate = run_folder(ctx.root, run_id) / GATE
    while not gate.exists():
        time.sleep(POLL_S)
    order = gate.read_text().strip()
    if order == f"fail:{ctx.rank}":
        raise RuntimeError(f"told to fail on rank {ctx.rank}")
    while order.startswith("fail:"):  # another rank fails: wait to be torn down
        time.sleep(POLL_S)
    ctx.export(nn.Linear(2, 1), example_input=torch.zeros(1, 2), metrics={})
