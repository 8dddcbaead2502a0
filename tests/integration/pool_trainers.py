"""A training function that tells which process ran it, for the warm pool's tests.

Each rank writes ``runs/<id>/rank-<r>.json``: its pid, its rank as the spec says, and the
marker an earlier job's code left on the ``torch`` module (imported by every standby before
any job, so a process that had run another job would still hold it). Then it leaves its own.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from torchrelay.services.train.worker import TrainingContext

MARKER = "_torchrelay_test_marker"


def ran_file(root: Path, run_id: str, rank: int) -> Path:
    return root / "runs" / run_id / f"rank-{rank}.json"


def remember(ctx: TrainingContext) -> None:
    out = ran_file(ctx.root, ctx.spec.run_id, ctx.rank)
    out.parent.mkdir(parents=True, exist_ok=True)
    seen = {
        "pid": os.getpid(),
        "rank": ctx.rank,
        "marker": getattr(torch, MARKER, None),
        "omp_threads": os.environ.get("OMP_NUM_THREADS"),
    }
    out.write_text(json.dumps(seen))
    setattr(torch, MARKER, ctx.spec.run_id)
    print(f"rank {ctx.rank} ran in process {os.getpid()}")  # noqa: T201 - the log shows it
    ctx.export(nn.Linear(2, 1), example_input=torch.zeros(1, 2), metrics={})
