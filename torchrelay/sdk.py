"""What user training code imports::

    from torchrelay.sdk import InputPreprocessing, TrainingContext

    def train(ctx: TrainingContext) -> None:
        ...
        ctx.export(model, example_input=x[:1], metrics={"accuracy": acc},
                   labels=classes, preprocessing=InputPreprocessing(scale=1 / 255))

Light on purpose: :class:`InputPreprocessing` needs only pydantic, and the training context
(which needs torch) is imported the first time it is asked for, so a module that only names
these types in annotations does not pull torch in.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torchrelay.shared.storage.files import InputPreprocessing

if TYPE_CHECKING:
    from torchrelay.services.train.worker.context import (
        ImageFolder,
        TrainingContext,
        WrongDatasetFormat,
    )

_FROM_CONTEXT = frozenset({"ImageFolder", "TrainingContext", "WrongDatasetFormat"})


def __getattr__(name: str) -> Any:
    if name in _FROM_CONTEXT:
        from torchrelay.services.train.worker import context

        return getattr(context, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["ImageFolder", "InputPreprocessing", "TrainingContext", "WrongDatasetFormat"]
