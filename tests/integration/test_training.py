"""Distributed training on the local backend: the digits trainer, resume, failures."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import torch

from torchrelay.services.ingest.fill import fill_for
from torchrelay.services.ingest.settings import IngestOptions
from torchrelay.services.ingest.staging import Stager, StageRequest
from torchrelay.services.train.worker import checkpoints
from torchrelay.shared.cluster import Status, Unplaceable, WorkerJob
from torchrelay.shared.cluster.local import LocalBackend
from torchrelay.shared.events.data import DatasetRef, TrainJobSpec
from torchrelay.shared.storage import Layout, ModelDescription, RunResult
from torchrelay.shared.testing import assert_eventually

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(300),
    # torch 2.13 deprecates TorchScript; the issue asks for it when a model scripts.
    pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning"),
]
DIGITS = "torchrelay.services.train.examples.digits:train"


@pytest.fixture(scope="module")
def storage(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    root = tmp_path_factory.mktemp("storage")
    staged = asyncio.run(
        Stager(root, IngestOptions().limits()).stage(
            StageRequest("r", "digits", "sklearn:digits"),
            fill_for("sklearn:digits", IngestOptions()),
        )
    )
    return root, staged.path, staged.manifest.version


@pytest.fixture
async def backend() -> AsyncIterator[LocalBackend]:
    local = LocalBackend(max_world_size=4)
    yield local
    await local.aclose()


def job(
    storage: tuple[Path, str, str], run_id: str, *, attempt: int = 0, **spec: object
) -> WorkerJob:
    root, path, version = storage
    fields: dict[str, object] = {
        "dataset": DatasetRef(name="digits", version=version),
        "entrypoint": DIGITS,
        "world_size": 2,
        "model_name": "digits",
        "seed": 7,
        "checkpoint_every_steps": 20,
        "keep_checkpoints": 2,
        "hyperparameters": {"epochs": 6},
        **spec,
    }
    return WorkerJob(
        run_id=run_id,
        attempt=attempt,
        job=TrainJobSpec.model_validate(fields),
        dataset_path=path,
        storage_root=str(root),
    )


async def run(backend: LocalBackend, work: WorkerJob) -> tuple[str, object]:
    handle = await backend.schedule(backend.dryrun(work))
    return handle, await backend.wait(handle)


def weights(root: Path, run_id: str) -> dict[str, torch.Tensor]:
    return torch.jit.load(str(Layout(root).model("digits", run_id) / "model.pt")).state_dict()


async def test_the_digits_trainer_reaches_95_percent_with_two_ranks(
    storage: tuple[Path, str, str], backend: LocalBackend
) -> None:
    root = storage[0]
    _, ended = await run(backend, job(storage, "full", hyperparameters={"epochs": 30}))
    assert ended.status is Status.SUCCEEDED, ended  # type: ignore[attr-defined]
    layout = Layout(root)
    model_json = layout.model_description("digits", "full").read_text()
    description = json.loads(model_json)
    assert description["metrics"]["accuracy"] >= 0.95
    assert description["format"] == "torchscript"
    assert description["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 8, 8]}]
    assert description["lineage"]["dataset"]["name"] == "digits"
    assert ModelDescription.read(layout.model_description("digits", "full")).lineage.steps == 660
    result = json.loads(layout.result("full").read_text())
    assert result["path"] == "models/digits/full"
    assert RunResult.read(layout.result("full")).throughput.checkpoints == 33
    assert checkpoints.list_steps(layout.checkpoints("full"))[-2:] == [640, 660]
    assert len(checkpoints.list_steps(layout.checkpoints("full"))) == 2, "keep last K"
    exported = torch.jit.load(str(layout.model("digits", "full") / "model.pt"))
    assert exported(torch.zeros(3, 1, 8, 8)).shape == (3, 10), "loads and runs on CPU"


async def test_a_run_killed_after_a_checkpoint_resumes_to_identical_weights(
    storage: tuple[Path, str, str], backend: LocalBackend
) -> None:
    root = storage[0]
    _, uninterrupted = await run(backend, job(storage, "straight"))
    assert uninterrupted.status is Status.SUCCEEDED  # type: ignore[attr-defined]

    first = job(storage, "resumed")
    handle = await backend.schedule(backend.dryrun(first))
    folder = Layout(root).checkpoints("resumed")
    await assert_eventually(
        lambda: bool(checkpoints.list_steps(folder)) and checkpoints.list_steps(folder)[-1] >= 40,
        timeout_s=60,
    )
    rank_one = backend._jobs[handle][1]
    os.kill(rank_one.pid, signal.SIGKILL)
    ended = await backend.wait(handle)
    assert ended.status is Status.FAILED
    assert ended.rank == 1
    assert ended.signal == "SIGKILL"
    assert "rank 1 was killed by SIGKILL" in ended.reason
    assert handle not in backend._jobs
    with pytest.raises(ProcessLookupError):
        os.kill(rank_one.pid, 0)

    # A corrupt newest checkpoint is skipped for the one before it.
    newest = checkpoints.list_steps(folder)[-1]
    (folder / f"step-{newest + 1}.pt").write_bytes(b"truncated")
    _, resumed = await run(backend, job(storage, "resumed", attempt=1))
    assert resumed.status is Status.SUCCEEDED, resumed  # type: ignore[attr-defined]
    log = Layout(root).rank_log("resumed", attempt=1, rank=0).read_text()
    assert f'"resumed_from_step": {newest}' in log
    assert "checkpoint.skipped" in log
    straight, again = weights(root, "straight"), weights(root, "resumed")
    assert straight.keys() == again.keys()
    for name in straight:
        assert torch.equal(straight[name], again[name]), name


async def test_an_entrypoint_that_cannot_be_imported(
    storage: tuple[Path, str, str], backend: LocalBackend
) -> None:
    _, ended = await run(backend, job(storage, "bad-entry", entrypoint="nowhere.module:train"))
    assert ended.status is Status.FAILED  # type: ignore[attr-defined]
    assert "entrypoint could not run" in ended.reason  # type: ignore[attr-defined]


async def test_a_worker_that_raises_on_step_0(
    storage: tuple[Path, str, str], backend: LocalBackend
) -> None:
    _, ended = await run(
        backend, job(storage, "explodes", entrypoint="tests.integration.trainers:explode")
    )
    assert ended.status is Status.FAILED  # type: ignore[attr-defined]
    assert "training function raised" in ended.reason  # type: ignore[attr-defined]
    assert any("boom on rank" in line for line in ended.log_tail)  # type: ignore[attr-defined]


async def test_a_function_that_never_exports(
    storage: tuple[Path, str, str], backend: LocalBackend
) -> None:
    _, ended = await run(
        backend, job(storage, "no-export", entrypoint="tests.integration.trainers:forget_to_export")
    )
    assert ended.status is Status.FAILED  # type: ignore[attr-defined]
    assert any("ctx.export" in line for line in ended.log_tail)  # type: ignore[attr-defined]


def test_a_world_size_beyond_the_backend_is_refused(storage: tuple[Path, str, str]) -> None:
    with pytest.raises(Unplaceable, match="world size 8"):
        LocalBackend(max_world_size=4).check(job(storage, "big", world_size=8))
    with pytest.raises(Unplaceable, match="GPUs"):
        LocalBackend(max_world_size=4).check(
            job(storage, "gpu", resources={"gpu": 1, "cpu": 1, "memory_mb": 512})
        )


async def test_cancel_stops_every_rank(
    storage: tuple[Path, str, str], backend: LocalBackend
) -> None:
    handle = await backend.schedule(
        backend.dryrun(job(storage, "cancelled", hyperparameters={"epochs": 200}))
    )
    pids = [p.pid for p in backend._jobs[handle]]
    await asyncio.sleep(1.0)
    waiting = asyncio.create_task(backend.wait(handle))
    await backend.cancel(handle)
    ended = await waiting
    assert ended.status is Status.CANCELLED
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


async def test_a_rank_exits_as_python_does_its_atexit_functions_and_threads_run(
    storage: tuple[Path, str, str], backend: LocalBackend
) -> None:
    """A rank skips only the interpreter's teardown at exit (where torch's C++ state can abort
    a finished rank): the training code's exit functions and threads still run."""
    _, ended = await run(
        backend,
        job(storage, "exit-work", entrypoint="tests.integration.trainers:leave_work_for_exit"),
    )
    assert ended.status is Status.SUCCEEDED, ended  # type: ignore[attr-defined]
    marks = storage[0] / "exit-marks"
    assert sorted(p.name for p in marks.iterdir()) == [
        "atexit-0",
        "atexit-1",
        "thread-0",
        "thread-1",
    ]


async def test_a_module_that_does_not_script_exports_its_state_dict(
    storage: tuple[Path, str, str], backend: LocalBackend
) -> None:
    root = storage[0]
    _, ended = await run(
        backend, job(storage, "plain-weights", entrypoint="tests.integration.trainers:unscriptable")
    )
    assert ended.status is Status.SUCCEEDED, ended  # type: ignore[attr-defined]
    folder = Layout(root).model("digits", "plain-weights")
    description = ModelDescription.read(folder / "model.json")
    assert description.format == "state_dict"
    assert description.artifact == "weights.pt"
    assert description.model_class == "tests.integration.trainers:Unscriptable"
    weights = torch.load(folder / "weights.pt", weights_only=True)
    assert set(weights) == {"linear.weight", "linear.bias"}
