"""The network: measurements in, one score per kind out. Standardising the inputs is part of
the model, so whoever calls the served model sends raw measurements."""

from __future__ import annotations

import torch
from torch import nn


class Classifier(nn.Module):
    def __init__(self, mean: torch.Tensor, std: torch.Tensor, kinds: int, hidden: int) -> None:
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        self.layers = nn.Sequential(
            nn.Linear(mean.numel(), hidden), nn.ReLU(), nn.Linear(hidden, kinds)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers((x - self.mean) / self.std)
