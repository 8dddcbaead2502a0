"""Train a small classifier on blobs.csv: four measurements -> one of three kinds.

The platform calls ``train(ctx)`` on every rank; ``ctx`` shards the data, wraps the model for
distributed training, checkpoints, and exports the model with its metrics and labels.
"""

from __future__ import annotations

import torch
from nets import Classifier
from torch import nn

from torchrelay.sdk import TrainingContext

FEATURES = ("length", "width", "depth", "weight")


def train(ctx: TrainingContext) -> None:
    x = torch.stack(ctx.arrays(*FEATURES), dim=1)  # numeric csv columns come as tensors
    y, kinds = ctx.categories("kind")  # a text column: codes, and the names in code order
    held_out = len(x) // 5  # the last fifth measures the model; it never trains on it
    x_train, y_train = x[:-held_out], y[:-held_out]
    model = ctx.wrap(
        Classifier(
            x_train.mean(dim=0),
            x_train.std(dim=0),
            kinds=len(kinds),
            hidden=ctx.integer("hidden", 32),
        )
    )
    optimizer = ctx.attach(torch.optim.Adam(model.parameters(), lr=ctx.number("lr", 0.01)))
    for xb, yb in ctx.batches((x_train, y_train), batch_size=32, epochs=ctx.integer("epochs", 20)):
        loss = nn.functional.cross_entropy(model(xb), yb)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ctx.step_done(loss=loss.item(), samples=len(xb))
    with torch.no_grad():
        accuracy = (model(x[-held_out:]).argmax(dim=1) == y[-held_out:]).float().mean().item()
    ctx.export(model, example_input=x[:1], metrics={"accuracy": accuracy}, labels=kinds)
