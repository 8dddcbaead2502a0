"""A training module whose dependency is not installed: importing it fails in the rank. Its
source is fine, so the train service's entrypoint check lets it through."""

from __future__ import annotations

import torchrelay_missing_dependency  # type: ignore[import-not-found]  # noqa: F401

from torchrelay.services.train.worker import TrainingContext


def train(ctx: TrainingContext) -> None:
    return None
