"""The backend contract: the same tests against every compute backend, for training and for
serving, locally (real processes) and on Kubernetes (the API emulator over real HTTP).

Each backend comes with a world (:mod:`tests.integration.backend_worlds`) that makes happen
what the backend only observes: ranks that finish or fail, servers that get ready or never do.
The tests speak only the port (:mod:`torchrelay.shared.cluster.port`); where the backends
differ on purpose (work that outlives the replica that started it), the world says which.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.backend_worlds import (
    BROKEN,
    MODEL,
    KubeServing,
    KubeTraining,
    LocalServing,
    LocalTraining,
    ServingWorld,
    TrainingWorld,
    copy_models,
    infer,
    version,
)
from tests.integration.models import ModelServer
from tests.integration.tiny_models import export_broken, export_digits, model_folder
from tests.kube.emulator import running_emulator
from torchrelay.shared.cluster import NotReady, Phase, ServingBackend, Status
from torchrelay.shared.testing import assert_eventually

pytestmark = pytest.mark.timeout(120)
WAIT_S = 60.0
"""Long enough for local ranks that import torch on a busy machine; Kubernetes is instant."""

TRAINING = ["local", "kubernetes"]
RUNNING = [pytest.param("local", marks=pytest.mark.slow), "kubernetes"]
"""Backends for tests that run training work: locally that is real worker processes."""


@pytest.fixture
async def training(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[TrainingWorld]:
    if request.param == "local":
        local = LocalTraining(tmp_path)
        try:
            yield local
        finally:
            await local.aclose()
        return
    async with running_emulator() as emulator:
        kube = KubeTraining(emulator)
        try:
            yield kube
        finally:
            await kube.aclose()


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    export_digits(root, MODEL, "v1", seed=1)
    export_digits(root, MODEL, "v2", seed=2)
    export_broken(root, MODEL, BROKEN)
    return root


@pytest.fixture(scope="module")
def inference_port(models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """A real model server for the emulated pods' URLs (module-wide: it starts in seconds)."""
    log = tmp_path_factory.mktemp("server") / "server.log"
    server = ModelServer(model_folder(models, MODEL, "v1"), log)
    try:
        yield server.wait_ready()
    finally:
        server.stop()


@pytest.fixture(params=["local", "kubernetes"])
async def serving(
    request: pytest.FixtureRequest, models: Path, inference_port: int, tmp_path: Path
) -> AsyncIterator[ServingWorld]:
    root = await asyncio.to_thread(copy_models, models, tmp_path / "storage")
    if request.param == "local":
        local = LocalServing(root)
        try:
            yield local
        finally:
            await local.aclose()
        return
    async with running_emulator() as emulator, KubeServing(emulator, root, inference_port) as kube:
        yield kube


def shape(value: object) -> object:
    """A request's structure without its values (two dry runs may differ in a fresh id)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = dataclasses.fields(value)
        return type(value).__name__, {f.name: shape(getattr(value, f.name)) for f in fields}
    if isinstance(value, dict):
        return {key: shape(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [shape(item) for item in value]
    return type(value).__name__


# --- training ------------------------------------------------------------------------------


@pytest.mark.parametrize("training", RUNNING, indirect=True)
async def test_contract_training_backend_runs_a_job_to_success(training: TrainingWorld) -> None:
    backend = await training.backend()
    job = training.job("succeeds")
    handle = await backend.schedule(backend.dryrun(job))
    described = await backend.describe(handle)
    assert described is not None
    assert described.handle == handle
    assert described.phase in (Phase.PENDING, Phase.RUNNING)

    await training.start(job)
    described = await backend.describe(handle)
    assert described is not None
    assert described.phase is Phase.RUNNING, described
    waiting = asyncio.create_task(backend.wait(handle))
    await asyncio.sleep(0.1)
    assert not waiting.done(), "running work has not ended"
    await training.complete(job)
    ended = await asyncio.wait_for(waiting, WAIT_S)
    assert ended.status is Status.SUCCEEDED, ended
    after = await backend.describe(handle)
    assert after is None or after.phase is Phase.SUCCEEDED, after


@pytest.mark.parametrize("training", RUNNING, indirect=True)
async def test_contract_training_backend_fails_the_job_with_the_failed_rank(
    training: TrainingWorld,
) -> None:
    backend = await training.backend()
    job = training.job("fails")
    handle = await backend.schedule(backend.dryrun(job))
    await training.start(job)
    waiting = asyncio.create_task(backend.wait(handle))
    await training.fail(job, rank=1)
    ended = await asyncio.wait_for(waiting, WAIT_S)
    assert ended.status is Status.FAILED, ended
    assert ended.rank == 1
    assert ended.exit_code == 1
    assert "rank 1" in ended.reason
    assert "exit 1" in ended.reason
    assert training.leftovers(job) == [], "the other ranks are torn down"
    assert await backend.describe(handle) is None


@pytest.mark.parametrize("training", RUNNING, indirect=True)
async def test_contract_training_backend_cancels_a_job_and_cancel_twice_is_fine(
    training: TrainingWorld,
) -> None:
    backend = await training.backend()
    job = training.job("cancelled")
    handle = await backend.schedule(backend.dryrun(job))
    await training.start(job)
    waiting = asyncio.create_task(backend.wait(handle))
    await asyncio.sleep(0.1)  # the wait is under way
    await backend.cancel(handle)
    await backend.cancel(handle)
    ended = await asyncio.wait_for(waiting, WAIT_S)
    assert ended.status is Status.CANCELLED, ended
    await backend.cancel(handle)  # after the end too
    assert training.leftovers(job) == []
    assert await backend.describe(handle) is None


@pytest.mark.parametrize("training", RUNNING, indirect=True)
async def test_contract_training_backend_adopts_after_a_restart_only_work_that_outlives_it(
    training: TrainingWorld,
) -> None:
    first = await training.backend()
    job = training.job("adopted", world_size=1)  # this is about replicas, not ranks
    handle = await first.schedule(first.dryrun(job))
    await training.start(job)
    await first.aclose()  # the replica stops...
    await first.aclose()  # (idempotent)
    second = await training.backend()  # ...and comes back as a fresh instance
    described = await second.describe(handle)
    adopted = await second.adopt(second.dryrun(job))
    if not training.outlives_replica:
        assert adopted is None, "local ranks died with the replica that started them"
        assert described is None
        assert training.leftovers(job) == []
        return
    assert adopted == handle
    assert described is not None
    assert described.phase is Phase.RUNNING, described
    waiting = asyncio.create_task(second.wait(adopted))
    await training.complete(job)
    ended = await asyncio.wait_for(waiting, WAIT_S)
    assert ended.status is Status.SUCCEEDED, ended


@pytest.mark.parametrize("training", TRAINING, indirect=True)
async def test_contract_training_backend_dryrun_is_pure(training: TrainingWorld) -> None:
    backend = await training.backend()
    job = training.job("dry")
    before = training.footprint()
    first, second = backend.dryrun(job), backend.dryrun(job)
    assert shape(first) == shape(second)
    assert first == second, "the same job, the same request (a retried schedule is the same)"
    assert training.footprint() == before, "nothing written, nothing sent"


# --- serving -------------------------------------------------------------------------------


async def serve(backend: ServingBackend[Any], name: str, **work: Any) -> tuple[str, list[str], str]:
    """schedule -> ready -> promote: (handle, the servers' URLs, the endpoint)."""
    handle = await backend.schedule(backend.dryrun(version(name, **work)))
    urls = await asyncio.wait_for(backend.ready(handle), WAIT_S)
    return handle, urls, await backend.promote(handle)


async def running(backend: ServingBackend[Any], handle: str) -> None:
    async def is_running() -> bool:
        described = await backend.describe(handle)
        return described is not None and described.phase is Phase.RUNNING

    await assert_eventually(is_running, timeout_s=10, message=f"{handle} is not running")


async def gone(backend: ServingBackend[Any], handle: str) -> None:
    async def described_as_nothing() -> bool:
        return await backend.describe(handle) is None

    await assert_eventually(described_as_nothing, timeout_s=30, message=f"{handle} is still there")


async def test_contract_serving_backend_puts_a_ready_version_on_its_endpoint(
    serving: ServingWorld,
) -> None:
    backend = await serving.backend()
    handle = await backend.schedule(backend.dryrun(version("v1", replicas=2)))
    described = await backend.describe(handle)
    assert described is not None
    assert described.handle == handle
    assert described.phase in (Phase.PENDING, Phase.RUNNING)

    urls = await asyncio.wait_for(backend.ready(handle), WAIT_S)
    assert len(urls) == 2, urls
    for url in urls:  # where the deployer's smoke inference goes
        answer = await infer(f"{url}/v2/models/{MODEL}/infer")
        assert answer["model_name"] == MODEL
    endpoint = await backend.promote(handle)
    await serving.serves(endpoint, "v1")
    assert await backend.promote(handle) == endpoint, "promote is idempotent"
    await running(backend, handle)


async def test_contract_serving_backend_replaces_a_version_on_the_same_endpoint(
    serving: ServingWorld,
) -> None:
    backend = await serving.backend()
    old, old_urls, endpoint = await serve(backend, "v1")
    old_waiting = asyncio.create_task(backend.wait(old))
    await asyncio.sleep(0.1)
    assert not old_waiting.done(), "a version that serves has not ended"

    new, _, new_endpoint = await serve(backend, "v2", replacing=old)
    assert new_endpoint == endpoint, "clients keep their address"
    await serving.serves(endpoint, "v2")
    ended = await asyncio.wait_for(old_waiting, WAIT_S)
    assert ended.status is Status.CANCELLED, ended
    await serving.retired("v1", old_urls)
    await gone(backend, old)
    await running(backend, new)


async def test_contract_serving_backend_refuses_a_version_that_never_gets_ready(
    serving: ServingWorld,
) -> None:
    backend = await serving.backend()
    old, _, endpoint = await serve(backend, "v1")
    handle = await backend.schedule(backend.dryrun(version(BROKEN, replacing=old)))
    with pytest.raises(NotReady) as refused:
        await asyncio.wait_for(backend.ready(handle), WAIT_S)
    reason = str(refused.value)
    assert f"version {BROKEN}" in reason
    assert serving.not_ready_because in reason
    await serving.serves(endpoint, "v1")
    await running(backend, old)
    await gone(backend, handle)


async def test_contract_serving_backend_cancel_before_promote_keeps_the_old_version(
    serving: ServingWorld,
) -> None:
    backend = await serving.backend()
    old, _, endpoint = await serve(backend, "v1")
    new = await backend.schedule(backend.dryrun(version("v2", replacing=old)))
    new_urls = await asyncio.wait_for(backend.ready(new), WAIT_S)
    waiting = asyncio.create_task(backend.wait(new))
    await asyncio.sleep(0.1)
    await backend.cancel(new)
    await backend.cancel(new)  # idempotent
    ended = await asyncio.wait_for(waiting, WAIT_S)
    assert ended.status is Status.CANCELLED, ended
    await serving.serves(endpoint, "v1")
    await serving.retired("v2", new_urls)
    await gone(backend, new)
    await running(backend, old)


async def test_contract_serving_backend_another_instance_describes_adopts_and_cancels(
    serving: ServingWorld,
) -> None:
    owner = await serving.backend()
    handle, urls, _ = await serve(owner, "v1")
    owner_waiting = asyncio.create_task(owner.wait(handle))

    other = await serving.backend()  # another replica, or this one restarted
    await running(other, handle)
    adopted = await other.adopt(other.dryrun(version("v1", replacing=handle)))
    waits = [owner_waiting]
    if serving.outlives_replica:
        assert adopted == handle
        waits.append(asyncio.create_task(other.wait(adopted)))
    else:
        assert adopted is None, "local servers are the children of the replica that started them"

    await other.cancel(handle)
    ended = await asyncio.wait_for(asyncio.gather(*waits), WAIT_S)
    assert [e.status for e in ended] == [Status.CANCELLED] * len(waits), ended
    await serving.retired("v1", urls)
    await gone(other, handle)
    await gone(owner, handle)


async def test_contract_serving_backend_undeploys_a_model_endpoint_and_all(
    serving: ServingWorld,
) -> None:
    backend = await serving.backend()
    old, _, endpoint = await serve(backend, "v1")
    new, urls, _ = await serve(backend, "v2", replicas=2, replacing=old)
    waiting = asyncio.create_task(backend.wait(new))
    await asyncio.sleep(0.1)

    await backend.undeploy(MODEL, new)
    ended = await asyncio.wait_for(waiting, WAIT_S)
    assert ended.status is Status.CANCELLED, ended
    await serving.unserved(endpoint)
    await serving.retired("v2", urls)
    await gone(backend, new)
    await gone(backend, old)
    await backend.undeploy(MODEL, new)  # idempotent: nothing left is success
    await backend.undeploy(MODEL, None)
    await serving.unserved(endpoint)


async def test_contract_serving_backend_another_instance_undeploys_a_model(
    serving: ServingWorld,
) -> None:
    owner = await serving.backend()
    handle, urls, endpoint = await serve(owner, "v1")
    owner_waiting = asyncio.create_task(owner.wait(handle))

    other = await serving.backend()  # another replica, with the deployment record's handle
    await other.undeploy(MODEL, handle)
    ended = await asyncio.wait_for(owner_waiting, WAIT_S)
    assert ended.status is Status.CANCELLED, ended
    await serving.unserved(endpoint)
    await serving.retired("v1", urls)
    await gone(other, handle)
    await gone(owner, handle)


async def test_contract_serving_backend_dryrun_is_pure(serving: ServingWorld) -> None:
    backend = await serving.backend()
    before = serving.footprint()
    work = version("v1", replicas=2)
    first, second = backend.dryrun(work), backend.dryrun(work)
    assert shape(first) == shape(second)
    assert serving.footprint() == before, "nothing written, nothing sent"
