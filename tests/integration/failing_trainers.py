"""Training functions that fail the way users' code does, for the fail-fast tests."""

from __future__ import annotations

import torch
from torch import nn

from torchrelay.services.train.worker import TrainingContext

CRASH_AT_STEP = 25


def bad_column(ctx: TrainingContext) -> None:
    """A mistake in the code: it raises before its first step, on every attempt alike."""
    ctx.arrays("x", "y")
    raise ValueError("bad column 'z'")


def crash_once_after_a_checkpoint(ctx: TrainingContext) -> None:
    """A crash after progress (a lost device, say): the first attempt raises at step 25, after
    the checkpoint of step 20; a restarted one resumes from it and finishes."""
    x, y = ctx.arrays("x", "y")
    x = (x.float() / 16.0).flatten(1)
    model = ctx.wrap(nn.Linear(64, 10))
    optimizer = ctx.attach(torch.optim.SGD(model.parameters(), lr=0.1))
    for xb, yb in ctx.batches((x, y.long()), batch_size=32, epochs=2):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(xb), yb)
        loss.backward()
        optimizer.step()
        ctx.step_done(loss=loss.item(), samples=len(xb))
        if ctx.spec.attempt == 0 and ctx.step == CRASH_AT_STEP:
            raise RuntimeError("the device was lost")
    ctx.export(model, example_input=x[:1], metrics={})
