"""Training functions for failure tests."""

from __future__ import annotations

import atexit
import threading
import time
from pathlib import Path

import torch
from torch import nn

from torchrelay.services.train.worker import TrainingContext


def explode(ctx: TrainingContext) -> None:
    raise RuntimeError(f"boom on rank {ctx.rank} at step {ctx.step}")


def forget_to_export(ctx: TrainingContext) -> None:
    return None


class Unscriptable(nn.Module):
    """TorchScript has no variadic arguments: this module only exports as a state dict."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(64, 10)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.linear(inputs[0].flatten(1))
        return out


def unscriptable(ctx: TrainingContext) -> None:
    x, y = ctx.arrays("x", "y")
    x = x.float().unsqueeze(1)
    model = ctx.wrap(Unscriptable())
    optimizer = ctx.attach(torch.optim.SGD(model.parameters(), lr=0.01))
    for xb, yb in ctx.batches((x, y.long()), batch_size=64, epochs=1):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(xb), yb)
        loss.backward()
        optimizer.step()
        ctx.step_done(loss=loss.item(), samples=len(xb))
    ctx.export(model, example_input=x[:1], metrics={})


def leave_work_for_exit(ctx: TrainingContext) -> None:
    """Train as :func:`unscriptable` does, leaving to the rank's exit what Python's exit does:
    an ``atexit`` function and a thread that is no daemon each write a mark."""
    marks = ctx.layout.root / "exit-marks"
    marks.mkdir(exist_ok=True)
    atexit.register((marks / f"atexit-{ctx.rank}").write_text, "ran")

    def late() -> None:
        time.sleep(0.5)
        Path(marks / f"thread-{ctx.rank}").write_text("ran")

    threading.Thread(target=late, daemon=False).start()
    unscriptable(ctx)
