"""The training function bench/startup.py times to its first step, in two harnesses.

    torchrun --nproc-per-node 2 bench/startup_trainer.py DATA.npz FIRST_STEP_FILE

Under torchrelay, :func:`train` is the entrypoint (``startup_trainer:train``, with this folder
on the workers' path); under torchrun, :func:`main`. Both run the same model, data, batch size
and :func:`first_step`, which stamps the wall-clock time of the first finished optimizer step
into a file (rank 0): the one clock both sides are read by. Nothing of torchrelay is imported
at module level, so torchrun's side pays only for what a plain script needs.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist
from plain_ddp import DigitsNet
from torch import nn

if TYPE_CHECKING:
    from torchrelay.sdk import TrainingContext

BATCH_SIZE = 32


def first_step(
    model: nn.Module, xb: torch.Tensor, yb: torch.Tensor, rank: int, stamp: Path
) -> torch.optim.Optimizer:
    """One optimizer step (DDP all-reduces the gradients), then rank 0 writes the time."""
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(xb), yb).backward()
    optimizer.step()
    if rank == 0:
        partial = stamp.with_suffix(".partial")
        partial.write_text(repr(time.time()))
        partial.rename(stamp)  # whole or absent: the bench polls for it
    return optimizer


def train(ctx: TrainingContext) -> None:
    x, y = ctx.arrays("x", "y")
    x = (x.float() / 16.0).unsqueeze(1)
    model = ctx.wrap(DigitsNet())
    xb, yb = next(iter(ctx.batches((x, y.long()), batch_size=BATCH_SIZE, epochs=1)))
    stamp = Path(str(ctx.spec.job.hyperparameters["first_step_file"]))
    first_step(model, xb, yb, ctx.rank, stamp)
    ctx.export(model, example_input=x[:1], metrics={})


def main() -> None:
    data, stamp = sys.argv[1:3]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    with np.load(data, allow_pickle=False) as arrays:
        x = torch.from_numpy(arrays["x"]).float().div(16.0).unsqueeze(1)
        y = torch.from_numpy(arrays["y"]).long()
    mine = torch.arange(rank, len(x), world)[:BATCH_SIZE]
    model = nn.parallel.DistributedDataParallel(DigitsNet())
    first_step(model, x[mine], y[mine], rank, Path(stamp))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
