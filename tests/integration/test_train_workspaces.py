"""A user's own code, staged as a workspace, trained by the real train service: every rank
imports it from the shared storage, and the check runs against those files, not the service's
own environment."""

from __future__ import annotations

import textwrap
import zlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.integration.processes import ServiceProcess
from tests.integration.training import request, train_service, workers_of
from tests.integration.watching import Watcher, watching
from torchrelay.shared.bus.jetstream import JetStreamBus
from torchrelay.shared.events import TrainCompleted, TrainFailed, TrainStarted
from torchrelay.shared.storage import ModelDescription
from torchrelay.shared.storage.layout import Layout
from torchrelay.shared.testing import assert_eventually

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]
WORKSPACE = "00000000feedf00d"
MODEL = textwrap.dedent(
    """
    import torch
    from torch import nn

    from blobs.nets import mlp


    def train(ctx):
        x, y = ctx.arrays("x", "y")
        x = x.reshape(len(x), -1).float() / 16.0
        model = ctx.wrap(mlp(x.shape[1], 10))
        optimizer = ctx.attach(torch.optim.Adam(model.parameters(), lr=1e-2))
        for xb, yb in ctx.batches((x, y), batch_size=64, epochs=2):
            loss = nn.functional.cross_entropy(model(xb), yb)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            ctx.step_done(loss=loss.item(), samples=len(xb))
        accuracy = (model(x).argmax(1) == y).float().mean().item()
        ctx.export(model, example_input=x[:1], metrics={"accuracy": accuracy})
    """
)
NETS = textwrap.dedent(
    """
    from torch import nn


    def mlp(inputs, classes):
        return nn.Sequential(nn.Linear(inputs, 32), nn.ReLU(), nn.Linear(32, classes))
    """
)


@pytest.fixture(scope="module")
def staged(staged_digits: tuple[Path, str]) -> tuple[Path, str]:
    """The digits, and a workspace beside them as ingest leaves one (manifest, code/)."""
    layout = Layout(staged_digits[0])
    code = layout.workspace_code(WORKSPACE)
    (code / "blobs").mkdir(parents=True)
    (code / "blobs" / "__init__.py").write_text("")
    (code / "blobs" / "model.py").write_text(MODEL)
    (code / "blobs" / "nets.py").write_text(NETS)
    layout.workspace_manifest(WORKSPACE).write_text("{}")
    return staged_digits


@pytest.fixture
async def bus(nats_url: str) -> AsyncIterator[tuple[JetStreamBus, Watcher]]:
    async with watching(
        nats_url, "test-ws-watch", [TrainStarted, TrainCompleted, TrainFailed]
    ) as pair:
        yield pair


@pytest.fixture
def train(nats_url: str, staged: tuple[Path, str], tmp_path: Path) -> Iterator[ServiceProcess]:
    # Only the bundled examples are allowed by prefix: the workspace needs no setting.
    process = train_service(
        nats_url, staged[0], tmp_path / "train.log", TORCHRELAY_TRAIN_MAX_WORLD_SIZE="2"
    )
    yield process
    process.stop()


async def test_every_rank_imports_the_entrypoint_from_the_staged_workspace(
    bus: tuple[JetStreamBus, Watcher], train: ServiceProcess, staged: tuple[Path, str]
) -> None:
    publisher, watcher = bus
    await train.wait_ready()
    spec = {"entrypoint": "blobs.model:train", "workspace": WORKSPACE, "model_name": "blobs"}
    await publisher.publish(request(staged, "ws-run", **spec))
    await assert_eventually(
        lambda: (
            watcher.of(TrainCompleted, run_id="ws-run") or watcher.of(TrainFailed, run_id="ws-run")
        ),
        timeout_s=120,
    )
    assert not watcher.of(TrainFailed, run_id="ws-run"), watcher.of(TrainFailed, run_id="ws-run")
    completed = watcher.of(TrainCompleted, run_id="ws-run")[0]
    assert completed.data.metrics["accuracy"] > 0.5
    described = ModelDescription.read(staged[0] / completed.data.path / "model.json")
    assert described.lineage.entrypoint == "blobs.model:train"
    assert described.lineage.workspace == WORKSPACE
    assert workers_of("ws-run") == []


@pytest.mark.parametrize(
    ("entrypoint", "workspace", "reason"),
    [
        ("blobs.model:trian", WORKSPACE, "(did you mean 'train'?)"),
        ("blobs.missing:train", WORKSPACE, "has no module 'blobs.missing'"),
        ("os:system", WORKSPACE, "takes the name of 'os'"),
        ("blobs.model:train", "0000000000000bad", "unknown workspace 0000000000000bad"),
    ],
)
async def test_a_workspace_entrypoint_that_cannot_run_fails_at_once_without_a_worker(
    bus: tuple[JetStreamBus, Watcher],
    train: ServiceProcess,
    staged: tuple[Path, str],
    *,
    entrypoint: str,
    workspace: str,
    reason: str,
) -> None:
    publisher, watcher = bus
    await train.wait_ready()
    run_id = f"ws-bad-{zlib.crc32(f'{entrypoint}@{workspace}'.encode()):08x}"
    spec = {"entrypoint": entrypoint, "workspace": workspace, "max_restarts": 3}
    await publisher.publish(request(staged, run_id, **spec))
    await assert_eventually(lambda: watcher.of(TrainFailed, run_id=run_id), timeout_s=30)
    failed = watcher.of(TrainFailed, run_id=run_id)[0]
    assert reason in failed.data.reason
    assert failed.data.final, "a refused entrypoint is never restarted"
    assert not watcher.of(TrainStarted, run_id=run_id), "no worker was started"
    assert not Layout(staged[0]).logs(run_id).exists()
