"""The worker SDK: what user training code receives (:class:`TrainingContext`)."""

from torchrelay.services.train.worker.context import TrainingContext

__all__ = ["TrainingContext"]
