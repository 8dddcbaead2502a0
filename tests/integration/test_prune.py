"""`torchrelay prune` over a real nats-server and a real storage folder: the monitor's pruner
removes an old finished pipeline with what only it used (folders and records), keeps a served
model and a live pipeline's dataset with their reasons, removes nothing on a dry run, never
follows a link out of the storage root, and answers the real CLI process (issue 15, item 3)."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import nats
import pytest
from pydantic import JsonValue

from tests.integration.conftest import FAST_STREAM
from tests.integration.processes import ServiceProcess, cli
from tests.sweep_factories import store_sweep, sweep_record
from torchrelay.client import Client
from torchrelay.services.ingest.handlers import VersionRecord, version_key
from torchrelay.services.monitor.pruner import Pruner
from torchrelay.services.monitor.service import PRUNE_CONSUMER
from torchrelay.services.serve.domain import DeploymentRecord
from torchrelay.services.train.domain import ModelRecord, model_key
from torchrelay.shared.bus.jetstream import JetStreamBus
from torchrelay.shared.bus.port import Subscription
from torchrelay.shared.events import AnyEvent, PruneRequested
from torchrelay.shared.events.data import (
    DatasetRef,
    PipelineSpec,
    PrunedData,
    PruneRequestedData,
    TrainJobSpec,
)
from torchrelay.shared.pipelines import PipelineRecord, pipeline_key, with_stage
from torchrelay.shared.runs import RunRecord
from torchrelay.shared.state import KvState, State, key_part
from torchrelay.shared.storage import Layout
from torchrelay.shared.sweep_state import (
    SweepRecord,
    SweepStatus,
    TrialHistory,
    history_key,
    sweep_key,
)

pytestmark = [pytest.mark.timeout(120)]
OLD = timedelta(days=40)
WORKSPACE = "0123456789abcdef"
MONTH = 30 * 86_400.0


@dataclass
class World:
    """A platform's records on NATS KV and its storage folder, with a monitor's pruner
    answering prune requests."""

    nats_url: str
    layout: Layout
    state: State
    client: Client

    async def record(self, bucket: str, key: str, value: Any) -> None:
        await self.state.store(bucket, type(value)).put(key, value)

    async def has(self, bucket: str, key: str, model: Any) -> bool:
        return await self.state.store(bucket, model).get(key) is not None

    def folder(self, relative: str, size: int = 1000) -> Path:
        """A folder holding one file of ``size`` bytes, last written ``OLD`` ago."""
        path = self.layout.at(relative)
        path.mkdir(parents=True)
        (path / "file.bin").write_bytes(b"x" * size)
        then = time.time() - OLD.total_seconds()
        for item in (path / "file.bin", path):
            os.utime(item, (then, then))
        return path


@pytest.fixture
async def records(nats_url: str, tmp_path: Path) -> AsyncIterator[World]:
    """A platform's state and storage, and a client; no pruner answers yet."""
    layout = Layout(tmp_path / "storage")
    layout.root.mkdir()
    nc = await nats.connect(nats_url)
    state = await KvState.open(nc.jetstream())
    client = Client(JetStreamBus(nc, FAST_STREAM, source="/torchrelay/cli"), state)
    await client.bus.ensure_stream()
    try:
        yield World(nats_url, layout, state, client)
    finally:
        await client.aclose()


@pytest.fixture
async def world(records: World) -> AsyncIterator[World]:
    """``records`` with the monitor's pruner answering prune requests (in this process)."""
    bus = JetStreamBus(await nats.connect(records.nats_url), FAST_STREAM)
    pruner = Pruner(
        state=records.state,
        layout=records.layout,
        publish=bus.publish,
        source="/torchrelay/monitor",
    )
    subscription = Subscription(PRUNE_CONSUMER, [PruneRequested], pruner.on_request)
    await bus.provision([subscription])
    stop = asyncio.Event()
    consuming = asyncio.create_task(bus.consume(subscription, stop), name="test-pruner")
    try:
        yield records
    finally:
        stop.set()
        await consuming
        await bus.aclose()


LIVE_WORKSPACE = "fedcba9876543210"


def a_spec(workspace: str) -> PipelineSpec:
    return PipelineSpec.model_validate(
        {
            "name": "digits",
            "dataset": {"name": "digits", "source": "sklearn:digits"},
            "training": {"entrypoint": "m:train", "model_name": "digits", "workspace": workspace},
        }
    )


def a_pipeline(pipeline_id: str, version: str, *, live: bool) -> PipelineRecord:
    """Staged ``version`` 40 days ago and trained (live: trains still) in its own workspace."""
    at = datetime.now(UTC) - OLD
    workspace = LIVE_WORKSPACE if live else WORKSPACE
    record = PipelineRecord(pipeline_id=pipeline_id, spec=a_spec(workspace), submitted=at)
    staged: dict[str, JsonValue] = {"dataset": "digits", "version": version}
    record = with_stage(record, "ingest", "succeeded", at, detail=staged)
    run: dict[str, JsonValue] = {"run_id": f"{pipeline_id}.train", "workspace": workspace}
    return with_stage(record, "train", "running" if live else "failed", at, detail=run)


def a_run(run_id: str, version: str, pipeline_id: str | None) -> RunRecord:
    return RunRecord(
        run_id=run_id,
        spec=TrainJobSpec(
            entrypoint="m:train",
            model_name="digits",
            dataset=DatasetRef(name="digits", version=version),
        ),
        dataset_path=f"datasets/digits/{version}",
        status="failed",
        attempt=0,
        owner="train-a",
        pipeline_id=pipeline_id,
        updated=datetime.now(UTC) - OLD,
    )


def a_version(version: str) -> VersionRecord:
    return VersionRecord(
        name="digits",
        version=version,
        format="npz",
        path=f"datasets/digits/{version}",
        files=1,
        size_bytes=1000,
        source="sklearn:digits",
        created=datetime.now(UTC) - OLD,
    )


async def populate(world: World) -> None:
    """A served model (and its run), a live pipeline (and the dataset it trains on), and an
    old finished pipeline with its dataset, run and workspace: everything 40 days old."""
    served = ModelRecord(
        name="digits",
        version="r-served",
        path="models/digits/r-served",
        metrics={"accuracy": 0.9},
        run_id="r-served",
        dataset="digits@v-live",
        created=datetime.now(UTC) - OLD,
    )
    await world.record("models", model_key("digits", "r-served"), served)
    world.folder("models/digits/r-served")
    await world.record("runs", key_part("r-served"), a_run("r-served", "v-live", None))
    world.folder("runs/r-served")
    deployment = DeploymentRecord(
        model="digits", active_version="r-served", status="deployed", updated=datetime.now(UTC)
    )
    await world.record("deployments", key_part("digits"), deployment)

    await world.record(
        "pipelines", pipeline_key("p-live"), a_pipeline("p-live", "v-live", live=True)
    )
    await world.record("datasets", version_key("digits", "v-live"), a_version("v-live"))
    world.folder("datasets/digits/v-live")

    await world.record("pipelines", pipeline_key("p-old"), a_pipeline("p-old", "v-old", live=False))
    await world.record("runs", key_part("p-old.train"), a_run("p-old.train", "v-old", "p-old"))
    world.folder("runs/p-old.train", size=3000)
    await world.record("datasets", version_key("digits", "v-old"), a_version("v-old"))
    world.folder("datasets/digits/v-old", size=5000)
    world.folder(f"workspaces/{WORKSPACE}", size=200)


def listed(answer: PrunedData) -> tuple[list[str], dict[str, str | None]]:
    return (
        sorted(f"{i.kind}:{i.name}" for i in answer.removed),
        {f"{i.kind}:{i.name}": i.reason for i in answer.kept},
    )


OLD_PIPELINE = [
    "datasets:digits@v-old",
    "pipelines:p-old",
    "runs:p-old.train",
    f"workspaces:{WORKSPACE}",
]
KEPT: dict[str, str | None] = {
    "models:digits@r-served": "served by deployment digits",
    "runs:r-served": "lineage of kept model digits@r-served",
    "pipelines:p-live": "not finished",
    "datasets:digits@v-live": "used by live pipeline p-live",
}


async def old_pipeline_is_there(world: World) -> list[bool]:
    return [
        await world.has("pipelines", pipeline_key("p-old"), PipelineRecord),
        await world.has("runs", key_part("p-old.train"), RunRecord),
        await world.has("datasets", version_key("digits", "v-old"), VersionRecord),
        world.layout.run("p-old.train").exists(),
        world.layout.dataset("digits", "v-old").exists(),
        world.layout.workspace(WORKSPACE).exists(),
    ]


async def the_rest_is_there(world: World) -> list[bool]:
    return [
        await world.has("models", model_key("digits", "r-served"), ModelRecord),
        await world.has("runs", key_part("r-served"), RunRecord),
        await world.has("pipelines", pipeline_key("p-live"), PipelineRecord),
        await world.has("datasets", version_key("digits", "v-live"), VersionRecord),
        world.layout.model("digits", "r-served").exists(),
        world.layout.run("r-served").exists(),
        world.layout.dataset("digits", "v-live").exists(),
    ]


async def test_a_dry_run_says_what_would_go_and_removes_nothing(world: World) -> None:
    await populate(world)

    answer = await world.client.prune(MONTH, dry_run=True, timeout_s=30)

    assert answer.dry_run
    assert listed(answer) == (OLD_PIPELINE, KEPT)
    assert answer.bytes_freed == 3000 + 5000 + 200
    assert answer.problems == []
    assert await old_pipeline_is_there(world) == [True] * 6
    assert await the_rest_is_there(world) == [True] * 7


async def test_prune_removes_exactly_the_old_pipeline_and_keeps_the_rest_with_reasons(
    world: World,
) -> None:
    await populate(world)

    answer = await world.client.prune(MONTH, timeout_s=30)

    assert not answer.dry_run
    assert listed(answer) == (OLD_PIPELINE, KEPT)
    assert answer.bytes_freed == 3000 + 5000 + 200
    assert answer.problems == []
    assert await old_pipeline_is_there(world) == [False] * 6
    assert await the_rest_is_there(world) == [True] * 7
    # Again: nothing left to remove, the same things kept for the same reasons.
    again = await world.client.prune(MONTH, timeout_s=30)
    assert listed(again) == ([], KEPT)
    assert again.bytes_freed == 0


async def test_only_the_kinds_asked_for_go_and_the_rest_keeps_what_it_names(
    world: World,
) -> None:
    await populate(world)

    workspaces = await world.client.prune(MONTH, kinds=["workspaces"], timeout_s=30)
    datasets = await world.client.prune(MONTH, kinds=["datasets"], timeout_s=30)

    assert listed(workspaces) == ([], {f"workspaces:{WORKSPACE}": "named by kept pipeline p-old"})
    assert listed(datasets) == (
        ["datasets:digits@v-old"],
        {"datasets:digits@v-live": "used by live pipeline p-live"},
    )
    assert await old_pipeline_is_there(world) == [True, True, False, True, False, True]


async def test_a_folder_that_leads_out_of_the_storage_is_reported_and_left_alone(
    world: World, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious").write_bytes(b"keep me")
    await world.record("runs", key_part("r-link"), a_run("r-link", "v-gone", None))
    world.layout.at("runs").mkdir(parents=True)
    world.layout.run("r-link").symlink_to(outside)

    answer = await world.client.prune(MONTH, timeout_s=30)

    assert listed(answer) == ([], {})
    (problem,) = answer.problems
    assert problem.startswith("runs r-link: ")
    assert "outside" in problem
    assert (outside / "precious").read_bytes() == b"keep me"
    assert await world.has("runs", key_part("r-link"), RunRecord), "its record stays with it"


async def test_an_unreadable_record_stops_the_prune_before_it_removes_anything(
    world: World,
) -> None:
    """A deployment that does not parse might serve any version: nothing goes."""
    await populate(world)
    await world.record("deployments", "broken", a_version("v-x"))

    answer = await world.client.prune(MONTH, timeout_s=30)

    assert listed(answer) == ([], {})
    assert answer.problems[0].startswith("deployments/broken does not parse")
    assert answer.problems[-1].startswith("nothing was removed")
    assert await old_pipeline_is_there(world) == [True] * 6


async def test_a_redelivered_request_is_answered_once(world: World) -> None:
    """The answer's id derives from the request's: a request handled twice (a redelivery)
    puts one answer on the stream."""
    await populate(world)
    stored: list[bool] = []

    async def publish(event: AnyEvent) -> bool:
        stored.append(await world.client.bus.publish(event))
        return stored[-1]

    pruner = Pruner(
        state=world.state, layout=world.layout, publish=publish, source="/torchrelay/monitor"
    )
    request = PruneRequested(source="/tests", data=PruneRequestedData(older_than_s=MONTH))

    await pruner.on_request(request)
    await pruner.on_request(request)

    assert stored == [True, False]
    assert await old_pipeline_is_there(world) == [False] * 6


def torchrelay(nats_url: str, *argv: str) -> Any:
    return asyncio.to_thread(cli, *argv, "--nats-url", nats_url)


async def test_the_command_prints_what_went_and_what_stayed(world: World) -> None:
    await populate(world)

    dry = await torchrelay(world.nats_url, "prune", "--older-than", "30d", "--dry-run")

    assert dry.returncode == 0, dry.stderr
    lines = dry.stdout.splitlines()
    assert lines[0].split() == ["ACTION", "KIND", "NAME", "AGE", "WHY", "KEPT"]
    assert sum(line.split()[:2] == ["would", "remove"] for line in lines) == 4
    assert any(
        line.split()[:3] == ["kept", "models", "digits@r-served"]
        and line.endswith("served by deployment digits")
        for line in lines
    )
    assert lines[-1] == "would free 8.0 KiB (4 removed, 4 kept)"
    assert await old_pipeline_is_there(world) == [True] * 6

    done = await torchrelay(world.nats_url, "prune", "--older-than", "4w", "--json")

    assert done.returncode == 0, done.stderr
    answer = PrunedData.model_validate_json(done.stdout)
    assert listed(answer) == (OLD_PIPELINE, KEPT)
    assert await old_pipeline_is_there(world) == [False] * 6


@pytest.mark.parametrize("age", ["30", "1.5d", "0d", "3x"])
async def test_a_bad_age_exits_2_with_one_line_and_asks_nothing(world: World, age: str) -> None:
    await populate(world)

    refused = await torchrelay(world.nats_url, "prune", "--older-than", age)

    assert refused.returncode == 2
    assert refused.stdout == ""
    assert refused.stderr.count("\n") == 1
    assert refused.stderr.startswith(f"torchrelay: AGE {age!r} is not a positive whole number")
    assert await old_pipeline_is_there(world) == [True] * 6


async def test_the_monitor_service_answers_the_command(records: World, tmp_path: Path) -> None:
    """The real monitor process, with the storage root from its settings, and the real CLI."""
    await populate(records)
    monitor = ServiceProcess(
        ["-m", "torchrelay", "service", "monitor", "--nats-url", records.nats_url],
        tmp_path / "monitor.log",
        env={
            "TORCHRELAY_HTTP_PORT": "0",
            "TORCHRELAY_STORAGE_ROOT": str(records.layout.root),
            "TORCHRELAY_SHUTDOWN_GRACE_S": "5",
            "TORCHRELAY_SHUTDOWN_DEADLINE_S": "10",
        },
    )
    try:
        await monitor.wait_ready()

        done = await torchrelay(records.nats_url, "prune", "--older-than", "30d", "--json")

        assert done.returncode == 0, done.stderr
        assert listed(PrunedData.model_validate_json(done.stdout)) == (OLD_PIPELINE, KEPT)
        assert await old_pipeline_is_there(records) == [False] * 6
        assert await the_rest_is_there(records) == [True] * 7
    finally:
        monitor.stop()


async def a_stored_sweep(world: World, sweep_id: str, status: SweepStatus) -> None:
    """A sweep that last changed 40 days ago, with its completed trials' histories."""
    record = sweep_record(sweep_id).model_copy(
        update={"status": status, "updated": datetime.now(UTC) - OLD}
    )
    await store_sweep(world.state, record)


async def sweep_is_there(world: World, sweep_id: str) -> list[bool]:
    histories = [history_key(sweep_id, index) for index in range(3)]
    return [
        await world.has("sweeps", sweep_key(sweep_id), SweepRecord),
        *[await world.has("sweeps", key, TrialHistory) for key in histories],
    ]


async def test_a_sweep_goes_with_its_pipeline_or_alone_once_its_pipeline_expired(
    world: World,
) -> None:
    await world.record(
        "pipelines", pipeline_key("p-swept"), a_pipeline("p-swept", "v-x", live=False)
    )
    await a_stored_sweep(world, "p-swept", "completed")
    await a_stored_sweep(world, "p-expired", "failed")  # its pipeline's record expired
    await a_stored_sweep(world, "p-stuck", "running")

    answer = await world.client.prune(MONTH, timeout_s=30)

    assert listed(answer) == (
        ["pipelines:p-expired", "pipelines:p-swept"],
        {"pipelines:p-stuck": "sweep still running"},
    )
    assert answer.problems == []
    assert not await world.has("pipelines", pipeline_key("p-swept"), PipelineRecord)
    assert await sweep_is_there(world, "p-swept") == [False] * 4
    assert await sweep_is_there(world, "p-expired") == [False] * 4
    assert await sweep_is_there(world, "p-stuck") == [True] * 4
