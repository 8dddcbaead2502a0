"""The ingest service as a real process: events in, events out, and its HTTP API."""

from __future__ import annotations

import io
import json
import os
import tarfile
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest

from tests.integration.processes import ServiceProcess
from tests.integration.watching import Watcher, watching
from torchrelay.shared.bus.jetstream import JetStreamBus
from torchrelay.shared.events import (
    AnyEvent,
    DatasetIngestRequested,
    DatasetRejected,
    DatasetStaged,
    DeadLettered,
    PipelineRejected,
    PipelineSubmitted,
)
from torchrelay.shared.events.data import (
    DatasetIngestRequestedData,
    DatasetSource,
    PipelineSpec,
    PipelineSubmittedData,
)
from torchrelay.shared.pipelines import PipelineRecord, pipeline_key, record_stage
from torchrelay.shared.state import KvState, Store, Versioned
from torchrelay.shared.testing import assert_eventually

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


@pytest.fixture
async def bus_and_watcher(nats_url: str) -> AsyncIterator[tuple[JetStreamBus, Watcher]]:
    kinds: list[type[AnyEvent]] = [DatasetStaged, DatasetRejected, DeadLettered, PipelineRejected]
    async with watching(nats_url, "test-ingest-watch", kinds) as pair:
        yield pair


def ingest_process(nats_url: str, tmp_path: Path, **env: str) -> tuple[ServiceProcess, Path, Path]:
    sources = tmp_path / "sources"
    sources.mkdir()
    storage = tmp_path / "storage"
    process = ServiceProcess(
        ["-m", "torchrelay", "service", "ingest", "--nats-url", nats_url, "--http-port", "0"],
        tmp_path / "ingest.log",
        env={
            "TORCHRELAY_STORAGE_ROOT": str(storage),
            "TORCHRELAY_INGEST_ALLOWED_ROOTS": str(sources),
            "TORCHRELAY_SHUTDOWN_GRACE_S": "5",
            "TORCHRELAY_SHUTDOWN_DEADLINE_S": "10",
            **env,
        },
    )
    return process, sources, storage


@pytest.fixture
def ingest(nats_url: str, tmp_path: Path) -> Iterator[tuple[ServiceProcess, Path, Path]]:
    process, sources, storage = ingest_process(nats_url, tmp_path)
    yield process, sources, storage
    process.stop()


@pytest.fixture
def ingest_small_workspaces(
    nats_url: str, tmp_path: Path
) -> Iterator[tuple[ServiceProcess, Path, Path]]:
    """Ingest that takes workspaces of at most 1000 bytes and 3 files."""
    process, sources, storage = ingest_process(
        nats_url,
        tmp_path,
        TORCHRELAY_INGEST_MAX_WORKSPACE_BYTES="1000",
        TORCHRELAY_INGEST_MAX_WORKSPACE_FILES="3",
    )
    yield process, sources, storage
    process.stop()


def request(source: str, request_id: str, name: str = "digits") -> DatasetIngestRequested:
    return DatasetIngestRequested(
        source="/tests",
        pipelineid="pipe-1",
        data=DatasetIngestRequestedData(request_id=request_id, name=name, source=source),
    )


def leftovers(storage: Path) -> list[Path]:
    return [p for p in (storage / "datasets").rglob("*") if ".tmp-" in p.name]


async def test_a_request_event_stages_once_and_a_repeat_changes_nothing(
    bus_and_watcher: tuple[JetStreamBus, Watcher], ingest: tuple[ServiceProcess, Path, Path]
) -> None:
    bus, watcher = bus_and_watcher
    process, _, storage = ingest
    await process.wait_ready()
    await bus.publish(request("sklearn:digits", "r-1"))
    await assert_eventually(lambda: len(watcher.of(DatasetStaged)) == 1, timeout_s=60)
    staged = watcher.of(DatasetStaged)[0]
    assert staged.pipelineid == "pipe-1"
    assert staged.data.format == "npz"
    assert (storage / staged.data.path / "manifest.json").exists()
    # The same request again (a redelivery, or a publisher retrying with a new event id):
    await bus.publish(request("sklearn:digits", "r-1"))
    await bus.publish(request("sklearn:digits", "r-2"))
    await assert_eventually(lambda: len(watcher.of(DatasetStaged)) == 2, timeout_s=60)
    outcomes = watcher.of(DatasetStaged)
    assert {e.data.version for e in outcomes} == {staged.data.version}
    # The repeat of r-1 produced the same event id as the first: the stream stored it once.
    assert sorted(e.data.request_id for e in outcomes) == ["r-1", "r-2"]
    assert len(list((storage / "datasets" / "digits").iterdir())) == 1
    metrics = await _metrics(process)
    assert "torchrelay_ingest_staged_files_total 1.0" in metrics


async def test_a_bad_source_is_rejected_with_its_reason_and_leaves_nothing(
    bus_and_watcher: tuple[JetStreamBus, Watcher], ingest: tuple[ServiceProcess, Path, Path]
) -> None:
    bus, watcher = bus_and_watcher
    process, sources, storage = ingest
    await process.wait_ready()
    (sources / "ragged.csv").write_text("a,b\n1\n")
    await bus.publish(request(str(sources / "missing.csv"), "r-missing"))
    await bus.publish(request(str(sources / "ragged.csv"), "r-ragged"))
    await assert_eventually(lambda: len(watcher.of(DatasetRejected)) == 2, timeout_s=30)
    by_request = {e.data.request_id: e.data for e in watcher.of(DatasetRejected)}
    assert by_request["r-missing"].code == "missing_path"
    assert by_request["r-ragged"].code == "invalid_data"
    assert "line 2 has 1 columns" in by_request["r-ragged"].reason
    assert leftovers(storage) == []
    metrics = await _metrics(process)
    assert 'torchrelay_ingest_rejections_total{code="missing_path"} 1.0' in metrics


async def test_a_request_event_that_fails_the_schema_is_dead_lettered(
    bus_and_watcher: tuple[JetStreamBus, Watcher], ingest: tuple[ServiceProcess, Path, Path]
) -> None:
    bus, watcher = bus_and_watcher
    process, _, storage = ingest
    await process.wait_ready()
    wire = json.loads(request("sklearn:digits", "r-x").to_json())
    wire["data"]["name"] = "Not A Valid Name!"
    await bus.nc.jetstream().publish(
        "torchrelay.dataset.ingest.requested", json.dumps(wire).encode()
    )
    await assert_eventually(lambda: len(watcher.of(DeadLettered)) == 1, timeout_s=30)
    letter = watcher.of(DeadLettered)[0].data
    assert letter.consumer == "ingest-requests"
    assert "data.name" in letter.reason
    assert not (storage / "datasets").exists() or not any((storage / "datasets").iterdir())


async def test_the_http_api_stages_sources_and_uploads(
    bus_and_watcher: tuple[JetStreamBus, Watcher], ingest: tuple[ServiceProcess, Path, Path]
) -> None:
    _, watcher = bus_and_watcher
    process, sources, storage = ingest
    port = await process.wait_ready()
    base = f"http://127.0.0.1:{port}/v1/datasets"
    (sources / "t.csv").write_text("x,y\n1,2\n")
    npz = io.BytesIO()
    np.savez(npz, x=np.ones((3, 2)), y=np.arange(3))
    async with aiohttp.ClientSession() as http:
        async with http.post(base, json={"name": "tables", "source": str(sources / "t.csv")}) as r:
            assert r.status == 201, await r.text()
            table = await r.json()
        async with http.post(
            base, params={"name": "arrays", "filename": "a.npz"}, data=npz.getvalue()
        ) as r:
            assert r.status == 201, await r.text()
            raw_upload = await r.json()
        form = aiohttp.FormData()
        form.add_field("file", npz.getvalue(), filename="a.npz")
        async with http.post(base, params={"name": "arrays"}, data=form) as r:
            assert r.status == 201, await r.text()
            form_upload = await r.json()
        assert raw_upload["version"] == form_upload["version"], "same bytes, same version"
        async with http.get(base) as r:
            listing = await r.json()
        assert {d["name"] for d in listing["datasets"]} == {"tables", "arrays"}
        async with http.get(f"{base}/tables/{table['version']}") as r:
            shown = await r.json()
        assert shown["manifest"]["schema_summary"]["tables"]["t.csv"]["rows"] == 1
        async with http.get(f"{base}/tables") as r:
            assert len((await r.json())["versions"]) == 1
        async with http.get(f"{base}/nope") as r:
            assert r.status == 404
        async with http.get(f"{base}/tables/0000") as r:
            assert r.status == 404
    await assert_eventually(lambda: len(watcher.of(DatasetStaged)) == 3, timeout_s=30)
    assert leftovers(storage) == []


@pytest.mark.parametrize(
    ("kwargs", "status", "code"),
    [
        ({"data": b"{not json", "headers": {"Content-Type": "application/json"}}, 400, None),
        ({"json": {"source": "sklearn:digits"}}, 400, "bad_request"),
        ({"json": {"name": "x", "source": "/etc/passwd"}}, 403, "unsafe_path"),
        ({"json": {"name": "x", "source": "http://169.254.169.254/"}}, 403, "url_denied"),
        ({"json": {"name": "x", "source": "s3://bucket/key"}}, 400, "unsupported_source"),
        ({"params": {"name": "x"}, "data": b"abc"}, 400, None),
        (
            {"params": {"name": "x", "filename": "a.zip"}, "data": b"PK\x03\x04 broken"},
            422,
            "corrupt",
        ),
    ],
)
async def test_bad_http_requests_get_a_4xx_with_a_json_reason(
    ingest: tuple[ServiceProcess, Path, Path],
    kwargs: dict[str, object],
    status: int,
    code: str | None,
) -> None:
    process, _, storage = ingest
    port = await process.wait_ready()
    url = f"http://127.0.0.1:{port}/v1/datasets"
    async with aiohttp.ClientSession() as http, http.post(url, **kwargs) as r:  # type: ignore[arg-type]
        body = await r.json()
        assert r.status == status, body
    assert body["error"]
    if code is not None:
        assert body["code"] == code
    assert leftovers(storage) == []


async def _metrics(process: ServiceProcess) -> str:
    url = f"http://127.0.0.1:{process.http_port}/metrics"
    async with aiohttp.ClientSession() as http, http.get(url) as r:
        return await r.text()


async def test_staging_leftovers_of_a_crash_are_cleaned_at_start(
    ingest: tuple[ServiceProcess, Path, Path],
) -> None:
    process, _, storage = ingest
    crashed = storage / "datasets" / "digits" / ".tmp-version.0123456789ab"
    (crashed / "data").mkdir(parents=True)
    (crashed / "data" / "half.npz").write_bytes(b"partial")
    old = time.time() - 3600
    for path in (crashed / "data" / "half.npz", crashed / "data", crashed):
        os.utime(path, (old, old))
    in_progress = storage / "datasets" / "digits" / ".tmp-version.ba9876543210"
    in_progress.mkdir()
    crashed_workspace = storage / "workspaces" / ".tmp-workspace.0123456789ab"
    (crashed_workspace / "code").mkdir(parents=True)
    (crashed_workspace / "code" / "train.py").write_bytes(b"def tra")
    for path in (crashed_workspace / "code" / "train.py", crashed_workspace / "code"):
        os.utime(path, (old, old))
    os.utime(crashed_workspace, (old, old))
    await process.wait_ready()
    await assert_eventually(lambda: not crashed.exists(), timeout_s=10)
    await assert_eventually(lambda: not crashed_workspace.exists(), timeout_s=10)
    assert in_progress.exists(), "a fresh staging folder may belong to another replica"


# --- pipeline.submitted -------------------------------------------------------------------------

SPEC = PipelineSpec.model_validate(
    {
        "name": "digits-demo",
        "dataset": {"name": "digits", "source": "sklearn:digits"},
        "training": {"entrypoint": "m:f", "model_name": "digits", "hyperparameters": {"e": 3}},
        "deploy": {"enabled": False},
    }
)


def submitted(spec: PipelineSpec, pipeline_id: str) -> PipelineSubmitted:
    return PipelineSubmitted(
        source="/tests", pipelineid=pipeline_id, data=PipelineSubmittedData(spec=spec)
    )


async def pipelines_of(bus: JetStreamBus) -> Store[PipelineRecord]:
    return (await KvState.open(bus.nc.jetstream())).store("pipelines", PipelineRecord)


async def publish_and_wait_handled(bus: JetStreamBus, event: PipelineSubmitted) -> None:
    """Publish ``event`` and wait until ingest's pipeline consumer has acked it, whatever it
    did with it."""
    js = bus.nc.jetstream()
    ack = await js.publish(event.nats_subject, event.to_json(), headers={"Nats-Msg-Id": event.id})

    async def handled() -> bool:
        info = await js.consumer_info(ack.stream, "ingest-pipelines")
        return info.ack_floor is not None and (info.ack_floor.stream_seq or 0) >= ack.seq

    await assert_eventually(handled, timeout_s=30, message="ingest did not handle the event")


async def stored(pipelines: Store[PipelineRecord], pipeline_id: str) -> Versioned[PipelineRecord]:
    item = await pipelines.get(pipeline_key(pipeline_id))
    assert item is not None, f"no record of {pipeline_id}"
    return item


async def ingest_ended(pipelines: Store[PipelineRecord], pipeline_id: str) -> None:
    """Wait until ingest has recorded its stage as succeeded (it publishes dataset.staged
    first, so seeing that event is not enough)."""

    async def ended() -> bool:
        return (await stored(pipelines, pipeline_id)).value.stages["ingest"].status == "succeeded"

    await assert_eventually(ended, timeout_s=30)


async def test_a_finished_pipeline_submitted_again_with_the_same_spec_stays_as_it_was(
    bus_and_watcher: tuple[JetStreamBus, Watcher], ingest: tuple[ServiceProcess, Path, Path]
) -> None:
    bus, watcher = bus_and_watcher
    process, _, _ = ingest
    await process.wait_ready()
    pipelines = await pipelines_of(bus)
    first = submitted(SPEC, "nightly-42")
    await bus.publish(first)
    await assert_eventually(lambda: len(watcher.of(DatasetStaged)) == 1, timeout_s=60)

    await ingest_ended(pipelines, "nightly-42")
    # Train and serve are not running here: finish the pipeline as they would.
    now = datetime.now(UTC)
    await record_stage(pipelines, "nightly-42", "train", "succeeded", now, detail={"v": "m1"})
    await record_stage(pipelines, "nightly-42", "deploy", "skipped", now)
    finished = await stored(pipelines, "nightly-42")
    assert finished.value.status == "succeeded"
    assert finished.value.submitted_event_id == first.id

    # The README's example publishes with a fixed pipelineid: the same spec, a new event id.
    await publish_and_wait_handled(bus, submitted(SPEC, "nightly-42"))

    assert await stored(pipelines, "nightly-42") == finished, "the record was not touched"
    assert [e.pipelineid for e in watcher.of(DatasetStaged)] == ["nightly-42"]
    assert watcher.of(PipelineRejected) == []
    assert len(process.logged("pipeline.resubmitted")) == 1
    assert "torchrelay_ingest_staging_seconds_count 1.0" in await _metrics(process)


async def test_another_spec_under_an_existing_pipeline_id_is_rejected_and_changes_nothing(
    bus_and_watcher: tuple[JetStreamBus, Watcher], ingest: tuple[ServiceProcess, Path, Path]
) -> None:
    bus, watcher = bus_and_watcher
    process, _, _ = ingest
    await process.wait_ready()
    pipelines = await pipelines_of(bus)
    await bus.publish(submitted(SPEC, "nightly-42"))
    await assert_eventually(lambda: len(watcher.of(DatasetStaged)) == 1, timeout_s=60)

    await ingest_ended(pipelines, "nightly-42")
    before = await stored(pipelines, "nightly-42")

    other = SPEC.model_copy(update={"dataset": SPEC.dataset.model_copy(update={"name": "other"})})
    conflicting = submitted(other, "nightly-42")
    await bus.publish(conflicting)

    rejected = await watcher.one(PipelineRejected, timeout_s=30)
    assert rejected.data.code == "conflicting_spec"
    assert rejected.data.pipeline_id == "nightly-42"
    assert "dataset.name" in rejected.data.reason
    assert "new pipelineid" in rejected.data.reason
    assert (rejected.pipelineid, rejected.causationid) == ("nightly-42", conflicting.id)
    after = await stored(pipelines, "nightly-42")
    assert after == before
    assert after.value.spec == SPEC
    assert [e.data.name for e in watcher.of(DatasetStaged)] == ["digits"]


async def test_a_redelivered_submission_whose_record_exists_still_stages_the_dataset(
    bus_and_watcher: tuple[JetStreamBus, Watcher], ingest: tuple[ServiceProcess, Path, Path]
) -> None:
    bus, watcher = bus_and_watcher
    process, _, _ = ingest
    event = submitted(SPEC, "nightly-7")
    pipelines = await pipelines_of(bus)
    # A replica created the record from this very event, then died before staging.
    await pipelines.create(
        pipeline_key("nightly-7"),
        PipelineRecord(
            pipeline_id="nightly-7", spec=SPEC, submitted=event.time, submitted_event_id=event.id
        ),
    )
    await process.wait_ready()
    await bus.publish(event)
    staged = await watcher.one(DatasetStaged, timeout_s=60)
    assert staged.pipelineid == "nightly-7"

    await ingest_ended(pipelines, "nightly-7")


async def test_a_pipeline_can_name_a_staged_version_or_take_the_newest(
    bus_and_watcher: tuple[JetStreamBus, Watcher], ingest: tuple[ServiceProcess, Path, Path]
) -> None:
    bus, watcher = bus_and_watcher
    process, _, _ = ingest
    port = await process.wait_ready()
    older = await upload_csv(port, "blobs", "x,y\n1,2\n")
    newest = await upload_csv(port, "blobs", "x,y\n3,4\n")
    pipelines = await pipelines_of(bus)

    await bus.publish(named_pipeline("p-older", name="blobs", version=older["version"]))
    await bus.publish(named_pipeline("p-newest", name="blobs"))

    for pipeline_id, chosen in (("p-older", older), ("p-newest", newest)):
        staged = await watcher.one(DatasetStaged, request_id=f"{pipeline_id}.dataset")
        assert staged.pipelineid == pipeline_id
        assert staged.data.model_dump(exclude={"request_id"}) == {
            k: v for k, v in chosen.items() if k != "request_id"
        }, "the same data as the staging of that content"
        await ingest_ended(pipelines, pipeline_id)
        stage = (await stored(pipelines, pipeline_id)).value.stages["ingest"]
        assert stage.detail == {"dataset": "blobs", "version": chosen["version"]}
    assert watcher.of(DatasetRejected) == []


async def test_a_pipeline_naming_no_staged_version_fails_its_ingest_stage_with_the_reason(
    bus_and_watcher: tuple[JetStreamBus, Watcher], ingest: tuple[ServiceProcess, Path, Path]
) -> None:
    bus, watcher = bus_and_watcher
    process, _, _ = ingest
    port = await process.wait_ready()
    staged = await upload_csv(port, "blobs", "x,y\n1,2\n")
    pipelines = await pipelines_of(bus)

    await bus.publish(named_pipeline("p-abc", name="blobs", version="abc"))
    await bus.publish(named_pipeline("p-nothing", name="nothing"))

    expected = {
        "p-abc": "dataset 'blobs' has no version 'abc' "
        f"(staged versions, newest first: {staged['version']})",
        "p-nothing": "no version of dataset 'nothing' is staged yet: stage one first "
        "(POST /v1/datasets, or give the spec a source)",
    }
    for pipeline_id, reason in expected.items():
        rejected = await watcher.one(DatasetRejected, request_id=f"{pipeline_id}.dataset")
        assert (rejected.pipelineid, rejected.data.code) == (pipeline_id, "unknown_version")
        assert rejected.data.reason == reason

        async def failed(pipeline_id: str = pipeline_id) -> bool:
            return (await stored(pipelines, pipeline_id)).value.status == "failed"

        await assert_eventually(failed, timeout_s=30)
        stage = (await stored(pipelines, pipeline_id)).value.stages["ingest"]
        assert (stage.status, stage.reason) == ("failed", f"unknown_version: {reason}")
    metrics = await _metrics(process)
    assert 'torchrelay_ingest_rejections_total{code="unknown_version"} 2.0' in metrics


def named_pipeline(pipeline_id: str, **dataset: str) -> PipelineSubmitted:
    spec = SPEC.model_copy(update={"dataset": DatasetSource.model_validate(dataset)})
    return submitted(spec, pipeline_id)


async def upload_csv(port: int, name: str, text: str) -> dict[str, Any]:
    """Stage a csv as a version of ``name`` through the HTTP API; the dataset.staged data."""
    url = f"http://127.0.0.1:{port}/v1/datasets"
    params = {"name": name, "filename": "table.csv"}
    async with aiohttp.ClientSession() as http, http.post(url, params=params, data=text) as r:
        assert r.status == 201, await r.text()
        staged: dict[str, Any] = await r.json()
    return staged


# --- workspaces ---------------------------------------------------------------------------------

CODE = {"train.py": b"def train(ctx):\n    pass\n", "pkg/__init__.py": b"X = 1\n"}


def tar_of(files: dict[str, bytes], *extra: tarfile.TarInfo, compress: bool = False) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz" if compress else "w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for member in extra:
            tar.addfile(member, io.BytesIO(b"x" * member.size) if member.isreg() else None)
    return buffer.getvalue()


def tar_member(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    info.size = 1 if kind == tarfile.REGTYPE else 0
    return info


def workspace_files(storage: Path) -> list[Path]:
    root = storage / "workspaces"
    return sorted(root.rglob("*")) if root.exists() else []


async def test_the_http_api_stages_workspaces_by_content(
    ingest: tuple[ServiceProcess, Path, Path],
) -> None:
    process, _, storage = ingest
    port = await process.wait_ready()
    base = f"http://127.0.0.1:{port}/v1/workspaces"
    gzip_type = {"Content-Type": "application/gzip"}
    tar_type = {"Content-Type": "application/x-tar"}
    async with aiohttp.ClientSession() as http:
        async with http.post(
            base, params={"filename": "ws.tar.gz"}, data=tar_of(CODE, compress=True)
        ) as r:
            assert r.status == 201, await r.text()
            first = await r.json()
        async with http.post(base, data=tar_of(CODE), headers=tar_type) as r:
            assert r.status == 201, await r.text()
            again = await r.json()
        changed = {**CODE, "train.py": b"def train(ctx):\n    return 1\n"}
        async with http.post(base, data=tar_of(changed, compress=True), headers=gzip_type) as r:
            assert r.status == 201, await r.text()
            other = await r.json()
        async with http.get(f"{base}/{first['workspace']}") as r:
            assert r.status == 200
            manifest = await r.json()
        async with http.get(f"{base}/0123456789abcdef") as r:
            assert r.status == 404
            assert "no workspace '0123456789abcdef'" in (await r.json())["error"]
        async with http.get(f"{base}/not-an-id") as r:
            assert r.status == 400
            assert (await r.json())["code"] == "bad_request"

    workspace = first["workspace"]
    assert first == {
        "workspace": workspace,
        "path": f"workspaces/{workspace}",
        "files": 2,
        "size_bytes": sum(len(data) for data in CODE.values()),
        "created": True,
    }
    assert again == {**first, "created": False}, "the same files: the same workspace"
    assert other["workspace"] != workspace
    for name, data in CODE.items():
        assert (storage / "workspaces" / workspace / "code" / name).read_bytes() == data
    on_disk = json.loads((storage / "workspaces" / workspace / "manifest.json").read_text())
    assert manifest == on_disk
    assert [f["path"] for f in manifest["files"]] == ["code/pkg/__init__.py", "code/train.py"]
    assert sorted(p.name for p in (storage / "workspaces").iterdir()) == sorted(
        [workspace, other["workspace"]]
    )
    assert "torchrelay_ingest_staged_workspaces_total 2.0" in await _metrics(process)


async def test_bad_workspace_uploads_get_a_4xx_with_a_json_reason_and_leave_nothing(
    ingest_small_workspaces: tuple[ServiceProcess, Path, Path],
) -> None:
    process, _, storage = ingest_small_workspaces
    port = await process.wait_ready()
    url = f"http://127.0.0.1:{port}/v1/workspaces"
    cases: list[tuple[str, bytes, dict[str, str], int, str, str]] = [
        ("not an archive", b"print('hi')\n" * 50, {}, 400, "bad_request", "not a tar archive"),
        ("an empty body", b"", {}, 400, "bad_request", "the body is empty"),
        ("a file name", tar_of(CODE), {"filename": "t.py"}, 400, "bad_request", "not an archive"),
        (
            "no files",
            tar_of({}, tar_member("src", tarfile.DIRTYPE)),
            {},
            400,
            "bad_request",
            "holds no files",
        ),
        (
            "an escaping link",
            tar_of(CODE, tar_member("keys", tarfile.SYMTYPE, "../../../root/.ssh")),
            {},
            422,
            "unsafe_archive",
            "'keys' is a symlink to '../../../root/.ssh' (outside the workspace)",
        ),
        (
            "a ../ member",
            tar_of(CODE, tar_member("../evil.py")),
            {},
            422,
            "unsafe_archive",
            "climbs out with '..'",
        ),
        (
            "too many bytes",
            tar_of({"big.py": b"#" * 1001}),
            {},
            413,
            "too_large",
            "TORCHRELAY_INGEST_MAX_WORKSPACE_BYTES",
        ),
        (
            "too many files",
            tar_of({f"m{i}.py": b"" for i in range(4)}),
            {},
            413,
            "too_many_files",
            "more than 3 files (TORCHRELAY_INGEST_MAX_WORKSPACE_FILES)",
        ),
    ]
    async with aiohttp.ClientSession() as http:
        for case, body, params, status, code, reason in cases:
            async with http.post(url, data=body, params=params) as r:
                answer = await r.json()
                assert (r.status, answer.get("code")) == (status, code), (case, answer)
            assert reason in answer["error"], case
            assert workspace_files(storage) == [], f"{case} left files behind"
    assert not (storage / "evil.py").exists()
    assert len(process.logged("workspace.rejected")) == len(cases)
