"""A small CNN on scikit-learn's digits (8x8 images, 10 classes), staged as ``sklearn:digits``.

Entrypoint: ``torchrelay.services.train.examples.digits:train``. Hyperparameters: ``epochs``
(default 30), ``batch_size`` (32), ``lr`` (0.003), ``holdout`` (share kept for evaluation, 0.2).
Metric ``accuracy``: each training batch's in its progress reports (what a sweep's median
stopping compares), the held-out share's in the exported model (what ranks trials and gates).

The exported model describes itself: labels ``"0"`` .. ``"9"`` (output order) and its input
scaling (pixel values 0..16 divided by 16), so ``torchrelay predict digits image.json`` takes raw
8x8 pixel values and answers with the digit.
"""

from __future__ import annotations

import torch
from torch import nn

from torchrelay.sdk import InputPreprocessing, TrainingContext

PIXEL_SCALE = 1 / 16
"""The digits' pixel values are 0..16; the model takes them in 0..1."""
LABELS = [str(digit) for digit in range(10)]


class DigitsNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.2), nn.Linear(32 * 4 * 4, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.features(x))
        return out


def split(x: torch.Tensor, y: torch.Tensor, holdout: float, seed: int) -> tuple[torch.Tensor, ...]:
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    cut = int(len(x) * (1 - holdout))
    return x[order[:cut]], y[order[:cut]], x[order[cut:]], y[order[cut:]]


def train(ctx: TrainingContext) -> None:
    x, y = ctx.arrays("x", "y")
    x = (x.float() / 16.0).unsqueeze(1)  # what PIXEL_SCALE declares: pixel values are 0..16
    y = y.long()
    x_train, y_train, x_test, y_test = split(x, y, ctx.number("holdout", 0.2), seed=0)
    model = ctx.wrap(DigitsNet())
    optimizer = ctx.attach(torch.optim.Adam(model.parameters(), lr=ctx.number("lr", 3e-3)))
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for xb, yb in ctx.batches(
        (x_train, y_train),
        batch_size=ctx.integer("batch_size", 32),
        epochs=ctx.integer("epochs", 30),
    ):
        optimizer.zero_grad()
        logits = model(xb)
        loss = loss_fn(logits, yb)
        loss.backward()
        optimizer.step()
        # The batch's accuracy as it trains: what a sweep on accuracy stops early by.
        accuracy = (logits.argmax(1) == yb).float().mean().item()
        ctx.step_done(loss=loss.item(), samples=len(xb), metrics={"accuracy": accuracy})
    model.eval()
    with torch.no_grad():
        accuracy = (model(x_test.to(ctx.device)).argmax(1).cpu() == y_test).float().mean().item()
    ctx.export(
        model,
        example_input=x_test[:1],
        metrics={"accuracy": accuracy},
        labels=LABELS,
        preprocessing=InputPreprocessing(
            scale=PIXEL_SCALE, description="8x8 pixel values 0..16, scaled to 0..1"
        ),
    )
