"""The worker's own entrypoint check: after the import, it runs only a function defined in the
module the entrypoint names (defence in depth behind the train service's policy)."""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.integration import sly_trainers
from torchrelay.services.train.domain import entrypoint_refusal
from torchrelay.shared.cluster import Ended, Status, WorkerJob
from torchrelay.shared.cluster.local import LocalBackend
from torchrelay.shared.events.data import DatasetRef, TrainJobSpec

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


@pytest.fixture
async def backend() -> AsyncIterator[LocalBackend]:
    local = LocalBackend(max_world_size=1, gpus=0)
    yield local
    await local.aclose()


async def attempt(backend: LocalBackend, root: Path, run_id: str, entrypoint: str) -> Ended:
    # The backend launches whatever it is given: the service's policy is skipped on purpose.
    work = WorkerJob(
        run_id=run_id,
        attempt=0,
        job=TrainJobSpec(
            dataset=DatasetRef(name="digits", version="v1"),
            entrypoint=entrypoint,
            model_name="digits",
            world_size=1,
        ),
        dataset_path="datasets/digits/v1",
        storage_root=str(root),
    )
    handle = await backend.schedule(backend.dryrun(work))
    return await backend.wait(handle)


SLY = "tests.integration.sly_trainers"


@pytest.mark.parametrize(
    ("entrypoint", "what"),
    [
        ("os:system", "builtin_function_or_method from 'posix'"),
        ("builtins:print", "builtin_function_or_method from 'builtins'"),
        ("subprocess:Popen", "type from 'subprocess'"),
        (f"{SLY}:train", "builtin_function_or_method from 'posix'"),
        (f"{SLY}:cached", f"_lru_cache_wrapper from '{SLY}'"),
    ],
)
async def test_the_worker_refuses_what_is_not_a_function_of_the_named_module(
    backend: LocalBackend, tmp_path: Path, entrypoint: str, what: str
) -> None:
    ended = await attempt(backend, tmp_path, "refused", entrypoint)
    assert ended.status is Status.FAILED
    assert ended.exit_code == 3
    assert ended.reason == "rank 0 failed: the entrypoint could not run (exit 3)"
    module, _, function = entrypoint.partition(":")
    why = f"{function!r} is not a function defined in module {module!r} (it is {what})"
    assert any("worker.bad_entrypoint" in line and why in line for line in ended.log_tail), (
        ended.log_tail
    )


def test_the_rebinding_is_invisible_to_the_services_source_check() -> None:
    # Why the worker checks again: the source shows a top-level def of each.
    source = inspect.getsource(sly_trainers)
    assert entrypoint_refusal(f"{SLY}:train", (SLY,), source) is None
    assert entrypoint_refusal(f"{SLY}:cached", (SLY,), source) is None
