"""The ingest, train and serve handlers over the in-memory state, with no NATS at all: their rules
(refusals, orphans, repeats, retention) hold through the State port, and the backends are real
(local processes, a real model server)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from tests.integration.in_memory import Published, present
from tests.integration.models import train_digits
from torchrelay.services.ingest.handlers import IngestMetrics, Ingestor
from torchrelay.services.ingest.settings import IngestOptions
from torchrelay.services.ingest.staging import Stager
from torchrelay.services.serve.domain import DeploymentRecord
from torchrelay.services.serve.handlers import Deployer
from torchrelay.services.train.handlers import Trainer
from torchrelay.shared.cluster.local import LocalBackend
from torchrelay.shared.cluster.local_serving import LocalServingBackend
from torchrelay.shared.cluster.registry import ServerOptions
from torchrelay.shared.errors import TransientError
from torchrelay.shared.events import (
    DatasetRejected,
    ModelDeployed,
    ModelDeployRequested,
    ModelRolloutFailed,
    ModelRolloutStarted,
    PipelineSubmitted,
    TrainCancelRequested,
    TrainFailed,
    TrainRequested,
)
from torchrelay.shared.events.data import (
    DatasetRef,
    ModelDeployRequestedData,
    PipelineSpec,
    PipelineSubmittedData,
    TrainCancelRequestedData,
    TrainCompletedData,
    TrainFailedData,
    TrainJobSpec,
    TrainRequestedData,
)
from torchrelay.shared.pipelines import PipelineRecord, pipeline_key
from torchrelay.shared.runs import RunRecord, outcome_event_id
from torchrelay.shared.runtime.metrics import reconciled_counter
from torchrelay.shared.state import MemoryState, key_part
from torchrelay.shared.testing import assert_eventually

pytestmark = pytest.mark.timeout(120)
ENTRYPOINT = "torchrelay.services.train.examples.digits:train"
PIPELINE = PipelineSpec.model_validate(
    {
        "name": "p",
        "dataset": {"name": "digits", "source": "sklearn:digits"},
        "training": {"entrypoint": ENTRYPOINT, "model_name": "digits"},
    }
)


def spec(dataset_version: str = "v1", **changes: object) -> TrainJobSpec:
    return TrainJobSpec(
        dataset=DatasetRef(name="digits", version=dataset_version),
        entrypoint=ENTRYPOINT,
        model_name="digits",
        max_restarts=1,
        **changes,
    )


@pytest.fixture
async def trainer(tmp_path: Path) -> AsyncIterator[tuple[Trainer, MemoryState, Published]]:
    state, published = MemoryState(), Published()
    trainer = Trainer(
        backend=LocalBackend(max_world_size=2),
        state=state,
        publish=published,
        storage_root=tmp_path,
        nats_url="nats://127.0.0.1:1",
        presence=await present(state, "train"),
        source="/torchrelay/train",
        entrypoints=["torchrelay.services.train.examples"],
        reconciled=reconciled_counter(CollectorRegistry()),
        retain_s=1.0,
        reclaim_every_s=0.05,
    )
    yield trainer, state, published
    await trainer.aclose()


async def test_a_run_on_an_unknown_dataset_fails_finally_and_its_record_expires(
    trainer: tuple[Trainer, MemoryState, Published],
) -> None:
    handler, _, published = trainer
    await handler.on_requested(
        TrainRequested(source="/tests", data=TrainRequestedData(run_id="r1", spec=spec()))
    )
    (failed,) = published.of(TrainFailed)
    assert isinstance(failed, TrainFailed)
    assert failed.data.final
    assert failed.data.reason.startswith("unknown dataset digits version v1")
    record = await handler.runs.get("r1")
    assert record is not None
    assert record.value.status == "failed"
    # A finished run is kept for the retention period (1 s here), then the store drops it.
    await assert_eventually(lambda: _gone(handler, "r1"), timeout_s=5)


async def _gone(handler: Trainer, run_id: str) -> bool:
    return await handler.runs.get(key_part(run_id)) is None


async def test_a_running_run_whose_replica_is_gone_fails_with_a_restart_left(
    trainer: tuple[Trainer, MemoryState, Published],
) -> None:
    handler, _, published = trainer
    orphan = RunRecord(
        run_id="r2",
        spec=spec(),
        dataset_path="datasets/digits/v1",
        status="running",
        attempt=0,
        owner="train-dead",  # holds no presence lease
        handle="r2/0",
        updated=datetime.now(UTC),
    )
    await handler.runs.create("r2", orphan)
    stop = asyncio.Event()
    loop = asyncio.create_task(handler.reclaim(stop))
    try:
        await assert_eventually(lambda: bool(published.of(TrainFailed)), timeout_s=10)
    finally:
        stop.set()
        await loop
    (failed,) = published.of(TrainFailed)
    assert isinstance(failed, TrainFailed)
    assert (failed.data.attempt, failed.data.final) == (0, False), "the monitor restarts it"
    assert "train-dead" in failed.data.reason
    record = await handler.runs.get("r2")
    assert record is not None
    assert (record.value.status, record.value.owner) == ("failed", handler._instance)


async def test_a_run_under_this_replicas_name_that_it_does_not_follow_is_taken_over(
    trainer: tuple[Trainer, MemoryState, Published],
) -> None:
    # A container restarted in its pod keeps the pod's name: the runs its earlier process
    # started carry this replica's name, and nothing follows them.
    handler, _, published = trainer
    earlier = RunRecord(
        run_id="r8",
        spec=spec(),
        dataset_path="datasets/digits/v1",
        status="running",
        attempt=0,
        owner=handler._instance,
        handle="r8/0",
        updated=datetime.now(UTC),
    )
    await handler.runs.create("r8", earlier)
    async with reclaiming(handler):
        await assert_eventually(lambda: bool(published.of(TrainFailed)), timeout_s=10)
    (failed,) = published.of(TrainFailed)
    assert isinstance(failed, TrainFailed)
    assert (failed.data.attempt, failed.data.final) == (0, False), "the monitor restarts it"
    assert reconciled(handler, "orphaned") == 1.0


async def test_a_cancel_of_a_run_another_replica_runs_locally_is_left_to_that_replica(
    trainer: tuple[Trainer, MemoryState, Published],
) -> None:
    handler, _, _ = trainer
    other = await present(MemoryState(), "train")  # alive, elsewhere
    running = RunRecord(
        run_id="r3",
        spec=spec(),
        dataset_path="datasets/digits/v1",
        status="running",
        attempt=0,
        owner=other.instance,
        handle="r3/0",
        updated=datetime.now(UTC),
    )
    await handler.runs.create("r3", running)
    cancel = TrainCancelRequested(source="/tests", data=TrainCancelRequestedData(run_id="r3"))
    with pytest.raises(TransientError, match="owned by"):
        await handler.on_cancel_requested(cancel)
    record = await handler.runs.get("r3")
    assert record is not None
    assert record.value.cancel == "final", "the intent is stored for whoever watches it end"


async def test_an_outcome_whose_replica_died_before_announcing_it_is_announced_once(
    trainer: tuple[Trainer, MemoryState, Published],
) -> None:
    handler, state, published = trainer
    pipelines = state.store("pipelines", PipelineRecord)
    await pipelines.create(
        "p4", PipelineRecord(pipeline_id="p4", spec=PIPELINE, submitted=datetime.now(UTC))
    )
    outcome = TrainFailedData(run_id="r4", attempt=2, reason="rank 1 was killed", final=True)
    unsaid = RunRecord(
        run_id="r4",
        spec=spec(),
        dataset_path="datasets/digits/v1",
        status="failed",
        attempt=2,
        owner="train-dead",  # recorded how attempt 2 ended, then died
        pipeline_id="p4",
        updated=datetime.now(UTC),
        outcome=outcome,
        announced=False,
    )
    await handler.runs.create("r4", unsaid)
    async with reclaiming(handler):
        await assert_eventually(lambda: bool(published.of(TrainFailed)), timeout_s=10)
        await asyncio.sleep(0.3)  # a few more rounds
    (failed,) = published.of(TrainFailed)  # announced once
    assert isinstance(failed, TrainFailed)
    assert failed.id == outcome_event_id("r4", 2, outcome), "the id any replica would give it"
    assert failed.data == outcome
    record = await handler.runs.get("r4")
    assert record is not None
    assert record.value.announced
    pipeline = await pipelines.get("p4")
    assert pipeline is not None
    assert pipeline.value.stages["train"].status == "failed"
    assert reconciled(handler, "unannounced") == 1.0


async def test_an_outcome_this_replica_left_unannounced_is_announced_after_a_grace(
    trainer: tuple[Trainer, MemoryState, Published],
) -> None:
    handler, _, published = trainer
    outcome = TrainFailedData(run_id="r5", attempt=0, reason="boom", final=False)
    fresh = RunRecord(
        run_id="r5",
        spec=spec(),
        dataset_path="datasets/digits/v1",
        status="failed",
        attempt=0,
        owner=handler._instance,
        updated=datetime.now(UTC),
        outcome=outcome,
        announced=False,
    )
    await handler.runs.create("r5", fresh)
    async with reclaiming(handler):
        await asyncio.sleep(0.3)  # a few rounds
        assert published.of(TrainFailed) == [], "its handler may be announcing it right now"
        stale = fresh.model_copy(update={"updated": datetime.now(UTC) - timedelta(minutes=5)})
        await handler.runs.put("r5", stale)
        await assert_eventually(lambda: bool(published.of(TrainFailed)), timeout_s=10)
    (failed,) = published.of(TrainFailed)
    assert isinstance(failed, TrainFailed)
    assert failed.data == outcome


async def test_a_cancel_of_an_ended_attempt_is_answered_with_how_it_ended(
    trainer: tuple[Trainer, MemoryState, Published],
) -> None:
    handler, _, published = trainer
    outcome = TrainFailedData(run_id="r6", attempt=1, reason="rank 0 was killed", final=False)
    ended = RunRecord(
        run_id="r6",
        spec=spec(),
        dataset_path="datasets/digits/v1",
        status="failed",
        attempt=1,
        owner=handler._instance,
        updated=datetime.now(UTC),
        outcome=outcome,
    )
    await handler.runs.create("r6", ended)
    cancel = TrainCancelRequested(source="/tests", data=TrainCancelRequestedData(run_id="r6"))
    await handler.on_cancel_requested(cancel)
    (answer,) = published.of(TrainFailed)
    assert isinstance(answer, TrainFailed)
    assert (answer.id, answer.data) == (outcome_event_id("r6", 1, outcome), outcome)
    assert answer.causationid == cancel.id
    record = await handler.runs.get("r6")
    assert record is not None
    assert record.value.status == "failed", "a cancel changes nothing"


async def test_a_cancel_of_a_run_that_succeeded_changes_and_repeats_nothing(
    trainer: tuple[Trainer, MemoryState, Published],
) -> None:
    handler, _, published = trainer
    outcome = TrainCompletedData(
        run_id="r7", model_name="digits", model_version="r7", path="models/digits/r7"
    )
    done = RunRecord(
        run_id="r7",
        spec=spec(),
        dataset_path="datasets/digits/v1",
        status="succeeded",
        attempt=0,
        owner="train-dead",
        updated=datetime.now(UTC),
        outcome=outcome,
        model_version="r7",
    )
    await handler.runs.create("r7", done)
    cancel = TrainCancelRequested(source="/tests", data=TrainCancelRequestedData(run_id="r7"))
    await handler.on_cancel_requested(cancel)
    assert published.events == []
    record = await handler.runs.get("r7")
    assert record is not None
    assert record.value == done


@contextlib.asynccontextmanager
async def reclaiming(handler: Trainer) -> AsyncIterator[None]:
    """The train service's reclaim loop, running while the block runs."""
    stop = asyncio.Event()
    loop = asyncio.create_task(handler.reclaim(stop))
    try:
        yield
    finally:
        stop.set()
        await loop


def reconciled(handler: Trainer, kind: str) -> float:
    """``torchrelay_reconciled_total{kind}`` as the train service exports it."""
    for metric in handler.reconciled.collect():
        for sample in metric.samples:
            if sample.name == "torchrelay_reconciled_total" and sample.labels == {"kind": kind}:
                return sample.value
    return 0.0


# --- serve ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def storage(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("storage")
    asyncio.run(train_digits(root, "v1", epochs=1))
    return root


@pytest.fixture
async def deployer(storage: Path) -> AsyncIterator[tuple[Deployer, MemoryState, Published]]:
    state, published = MemoryState(), Published()
    backend = LocalServingBackend(storage, options=ServerOptions(drain_s=1), ready_timeout_s=60)
    deployer = Deployer(
        backend=backend,
        storage_root=storage,
        smoke_timeout_s=30,
        state=state,
        publish=published,
        presence=await present(state, "serve"),
        source="/torchrelay/serve",
        replicas=1,
        retain_s=1.0,
        reclaim_every_s=0.05,
    )
    yield deployer, state, published
    await deployer.aclose()


def deploy(version: str) -> ModelDeployRequested:
    return ModelDeployRequested(
        source="/tests",
        data=ModelDeployRequestedData(model_name="digits", version=version, replicas=1),
    )


async def infer(endpoint: str) -> int:
    tensor = {"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.0] * 64}
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{endpoint}/infer", json={"inputs": [tensor]}) as response,
    ):
        return response.status


@pytest.mark.slow
async def test_a_deploy_is_smoke_checked_served_and_a_repeat_changes_nothing(
    deployer: tuple[Deployer, MemoryState, Published],
) -> None:
    handler, _, published = deployer
    await handler.on_deploy_requested(deploy("v1"))
    (deployed,) = published.of(ModelDeployed)
    assert isinstance(deployed, ModelDeployed)
    assert await infer(deployed.data.endpoint) == 200
    record = await handler.deployments.get("digits")
    assert record is not None
    assert record.value.handle is not None

    await handler.on_deploy_requested(deploy("v1"))
    assert len(published.of(ModelRolloutStarted)) == 1, "a repeat rolls nothing out"
    assert [e.data.endpoint for e in published.of(ModelDeployed)] == [deployed.data.endpoint] * 2


async def test_a_version_missing_from_storage_fails_before_anything_starts(
    deployer: tuple[Deployer, MemoryState, Published],
) -> None:
    handler, _, published = deployer
    await handler.on_deploy_requested(deploy("nope"))
    (failed,) = published.of(ModelRolloutFailed)
    assert isinstance(failed, ModelRolloutFailed)
    assert failed.data.reason.startswith("no model digits version nope on storage")
    assert await handler.deployments.get("digits") is None


@pytest.mark.slow
async def test_a_model_whose_replica_died_is_served_again_on_its_endpoint(
    deployer: tuple[Deployer, MemoryState, Published],
) -> None:
    handler, _, _ = deployer
    # What a replica that died left: its servers died with it; the record names its endpoint.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}/v2/models/digits"
    await handler.deployments.put(
        "digits",
        DeploymentRecord(
            model="digits",
            active_version="v1",
            endpoint=endpoint,
            status="deployed",
            owner="serve-dead",
            handle=f"local:{uuid.uuid4().hex[:12]}:{port}:1",
            updated=datetime.now(UTC),
        ),
    )
    stop = asyncio.Event()
    loop = asyncio.create_task(handler.reclaim(stop))
    try:
        await assert_eventually(lambda: _owned(handler), timeout_s=60)
    finally:
        stop.set()
        await loop
    record = await handler.deployments.get("digits")
    assert record is not None
    assert record.value.endpoint == endpoint, "same endpoint: clients keep their address"
    assert await infer(endpoint) == 200


async def _owned(handler: Deployer) -> bool:
    record = await handler.deployments.get("digits")
    return record is not None and record.value.owner == handler._presence.instance


# --- ingest --------------------------------------------------------------------------------


async def test_a_pipeline_that_ingest_refuses_ends_failed_and_expires(tmp_path: Path) -> None:
    state, published = MemoryState(), Published()
    options = IngestOptions(allowed_roots=[tmp_path])
    ingestor = Ingestor(
        stager=Stager(tmp_path / "storage", options.limits()),
        options=options,
        state=state,
        publish=published,
        metrics=IngestMetrics(CollectorRegistry()),
        source="/torchrelay/ingest",
        retain_s=1.0,
    )
    spec = PipelineSpec.model_validate(
        {
            "name": "outside",
            "dataset": {"name": "digits", "source": "/etc/passwd"},  # not under an allowed root
            "training": {"entrypoint": ENTRYPOINT, "model_name": "digits"},
        }
    )
    await ingestor.on_pipeline_submitted(
        PipelineSubmitted(
            source="/tests", pipelineid="p-out", data=PipelineSubmittedData(spec=spec)
        )
    )
    record = await ingestor.pipelines.get(pipeline_key("p-out"))
    assert record is not None
    assert record.value.status == "failed"
    assert published.of(DatasetRejected), "the refusal is an event, not just a record"
    await assert_eventually(
        lambda: _pipeline_gone(ingestor, "p-out"), timeout_s=5, message="never expired"
    )


async def _pipeline_gone(ingestor: Ingestor, pipeline_id: str) -> bool:
    return await ingestor.pipelines.get(pipeline_key(pipeline_id)) is None
