"""The local backend's warm pool: standby ranks (torch imported) that a CPU job's ranks take
instead of starting processes. A warm rank runs and reports like a cold one, serves one job
only, and the pool keeps its size: a standby that exits, after its job or idle, is replaced."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.integration.backend_worlds import unique
from tests.integration.gated_trainers import GATE, run_folder, started_file
from tests.integration.pool_trainers import ran_file
from torchrelay.services.train.service import _backend
from torchrelay.services.train.settings import TrainSettings
from torchrelay.shared.cluster import Status, WorkerJob
from torchrelay.shared.cluster.local import LocalBackend
from torchrelay.shared.events.data import DatasetRef, TrainJobSpec
from torchrelay.shared.testing import assert_eventually

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]
REMEMBER = "tests.integration.pool_trainers:remember"
GATED = "tests.integration.gated_trainers:gated"
WAIT_S = 90.0
"""Standbys import torch on a busy two-core machine."""


@pytest.fixture
async def backend() -> AsyncIterator[LocalBackend]:
    local = LocalBackend(max_world_size=2, warm_ranks=2)
    await local.start()
    try:
        yield local
    finally:
        await local.aclose()


def job(root: Path, entrypoint: str) -> WorkerJob:
    return WorkerJob(
        run_id=unique("warm"),
        attempt=0,
        job=TrainJobSpec(
            dataset=DatasetRef(name="digits", version="v1"),
            entrypoint=entrypoint,
            world_size=2,
            model_name="tiny",
        ),
        dataset_path="datasets/digits/v1",
        storage_root=str(root),
    )


def ran(root: Path, work: WorkerJob) -> list[dict[str, object]]:
    return [json.loads(ran_file(root, work.run_id, r).read_text()) for r in (0, 1)]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def full(backend: LocalBackend, without: set[int]) -> list[int]:
    """The pool's idle pids once it holds its size again, none of them in ``without``."""
    await assert_eventually(
        lambda: len(backend.pool.idle) == 2 and not set(backend.pool.idle) & without,
        timeout_s=WAIT_S,
        message=lambda: f"idle standbys {backend.pool.idle}, not wanted {without}",
    )
    return backend.pool.idle


async def test_jobs_run_on_standbys_and_two_jobs_never_share_a_process(
    backend: LocalBackend, tmp_path: Path
) -> None:
    standbys = backend.pool.idle
    first = job(tmp_path, REMEMBER)
    ended = await backend.wait(await backend.schedule(backend.dryrun(first)))
    assert ended.status is Status.SUCCEEDED, ended
    first_ranks = ran(tmp_path, first)
    assert sorted(r["pid"] for r in first_ranks) == sorted(standbys)
    assert [(r["rank"], r["marker"], r["omp_threads"]) for r in first_ranks] == [
        (0, None, "1"),
        (1, None, "1"),
    ]
    logs = run_folder(tmp_path, first.run_id) / "logs" / "attempt-0"
    assert "ran in process" in (logs / "rank-1.log").read_text(), "the rank's output is in its log"
    assert (run_folder(tmp_path, first.run_id) / "result.json").exists()

    refilled = await full(backend, without=set(standbys))
    second = job(tmp_path, REMEMBER)
    ended = await backend.wait(await backend.schedule(backend.dryrun(second)))
    assert ended.status is Status.SUCCEEDED, ended
    second_ranks = ran(tmp_path, second)
    assert sorted(r["pid"] for r in second_ranks) == sorted(refilled)
    assert not {r["pid"] for r in second_ranks} & set(standbys)
    assert [r["marker"] for r in second_ranks] == [None, None], "no trace of the first job"


async def test_a_standby_killed_while_idle_is_replaced(backend: LocalBackend) -> None:
    victim, survivor = backend.pool.idle
    os.kill(victim, signal.SIGKILL)
    assert set(await full(backend, without={victim})) >= {survivor}


async def test_a_warm_job_fails_with_the_failed_rank_and_its_log_tail(
    backend: LocalBackend, tmp_path: Path
) -> None:
    work = job(tmp_path, GATED)
    handle = await backend.schedule(backend.dryrun(work))
    await assert_eventually(
        lambda: all(started_file(tmp_path, work.run_id, r).exists() for r in (0, 1)),
        timeout_s=WAIT_S,
    )
    (run_folder(tmp_path, work.run_id) / GATE).write_text("fail:1")
    ended = await backend.wait(handle)
    assert (ended.status, ended.rank, ended.exit_code) == (Status.FAILED, 1, 1)
    assert any("told to fail on rank 1" in line for line in ended.log_tail)
    assert (run_folder(tmp_path, work.run_id) / "logs" / "attempt-0" / "rank-1.error.json").exists()


async def test_cancel_stops_a_warm_job_and_aclose_stops_the_idle_standbys(
    backend: LocalBackend, tmp_path: Path
) -> None:
    work = job(tmp_path, GATED)
    ranks = list(backend.pool.idle)
    handle = await backend.schedule(backend.dryrun(work))
    await assert_eventually(
        lambda: all(started_file(tmp_path, work.run_id, r).exists() for r in (0, 1)),
        timeout_s=WAIT_S,
    )
    await backend.cancel(handle)
    ended = await backend.wait(handle)
    assert ended.status is Status.CANCELLED
    assert not [pid for pid in ranks if alive(pid)]
    idle = await full(backend, without=set(ranks))
    await backend.aclose()
    await assert_eventually(lambda: not [pid for pid in idle if alive(pid)], timeout_s=10)


async def test_the_train_service_setting_sizes_the_pool(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCHRELAY_TRAIN_WARM_RANKS", "1")
    monkeypatch.setenv("TORCHRELAY_TRAIN_GPUS", "0")
    local = await _backend(TrainSettings())
    try:
        assert isinstance(local, LocalBackend)
        assert len(local.pool.idle) == 1
    finally:
        await local.aclose()
    assert local.pool.idle == []
