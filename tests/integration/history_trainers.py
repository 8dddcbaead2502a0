"""Training functions for the run history tests."""

from __future__ import annotations

import torch
from torch import nn

from torchrelay.sdk import TrainingContext

CRASH_AT_STEP = 55
"""Attempt 0 dies here: after its checkpoint at step 40 and its report at step 50."""
LR = 0.1
LR_HALVED_EVERY = 30


def scheduled_lr(step: int) -> float:
    """The learning rate after ``step`` steps: halved every :data:`LR_HALVED_EVERY`."""
    return LR * 0.5 ** (step // LR_HALVED_EVERY)


def crash_once_after_a_checkpoint(ctx: TrainingContext) -> None:
    """A linear model on the digits (one rank: 112 steps of 16) with a stepped learning rate
    and a metric of its own (``batch``: the index of the batch the step trained on, which is
    ``step - 1``); attempt 0 raises at :data:`CRASH_AT_STEP`, a later attempt resumes from the
    checkpoint before it and finishes."""
    x, y = ctx.arrays("x", "y")
    x = x.float().flatten(1) / 16.0
    model = ctx.wrap(nn.Linear(64, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=LR_HALVED_EVERY, gamma=0.5)
    ctx.attach(optimizer, scheduler)
    for xb, yb in ctx.batches((x, y.long()), batch_size=16, epochs=1):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(xb), yb)
        loss.backward()
        optimizer.step()
        scheduler.step()
        ctx.step_done(loss=loss.item(), samples=len(xb), metrics={"batch": float(ctx.position)})
        if ctx.spec.attempt == 0 and ctx.step == CRASH_AT_STEP:
            raise RuntimeError(f"attempt 0 dies at step {ctx.step}")
    ctx.export(model, example_input=x[:1], metrics={"accuracy": 0.5})
