"""Training functions for failure tests."""

from __future__ import annotations

from torchrelay.services.train.worker import TrainingContext


def explode(ctx: TrainingContext) -> None:
    raise RuntimeError(f"boom on rank {ctx.rank} at step {ctx.step}")


def forget_to_export(ctx: TrainingContext) -> None:
    return None
