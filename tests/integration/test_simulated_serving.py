"""The simulated serving backend under the real deployer: what the simulated trainer exported
is smoke-checked, served on a stable endpoint, replaced by its next version, taken down."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from tests.integration.in_memory import Published, present
from torchrelay.services.serve.handlers import Deployer
from torchrelay.shared.cluster import ModelVersion, Phase, Status, WorkerJob
from torchrelay.shared.cluster.registry import ServingConfig, open_serving_backend
from torchrelay.shared.cluster.simulated import OPT_IN, write_success
from torchrelay.shared.cluster.simulated_serving import SimulatedServingBackend
from torchrelay.shared.errors import ConfigError
from torchrelay.shared.events import (
    ModelDeployed,
    ModelDeployRequested,
    ModelUndeployRequested,
)
from torchrelay.shared.events.data import (
    DatasetRef,
    ModelDeployRequestedData,
    ModelUndeployRequestedData,
    TrainJobSpec,
)
from torchrelay.shared.state import MemoryState

pytestmark = pytest.mark.timeout(60)


def exported(root: Path, run_id: str) -> None:
    """What a simulated attempt leaves on success: model ``digits``, version ``run_id``."""
    spec = TrainJobSpec(
        dataset=DatasetRef(name="digits", version="v1"),
        entrypoint="torchrelay.services.train.examples.digits:train",
        model_name="digits",
    )
    write_success(
        WorkerJob(
            run_id=run_id,
            attempt=0,
            job=spec,
            dataset_path="datasets/digits/v1",
            storage_root=str(root),
        ),
        steps=3,
    )


@pytest.fixture
async def backend(tmp_path: Path) -> AsyncIterator[SimulatedServingBackend]:
    simulated = SimulatedServingBackend(tmp_path, ready_delay_s=0.1, host="127.0.0.1")
    await simulated.start()
    yield simulated
    await simulated.aclose()


async def infer(url: str) -> int:
    body = {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [0.0] * 4}]}
    async with aiohttp.ClientSession() as http, http.post(f"{url}/infer", json=body) as answer:
        return answer.status


async def test_opening_it_without_the_opt_in_is_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv(OPT_IN, raising=False)
    with pytest.raises(ConfigError, match="benchmarks and tests"):
        await open_serving_backend("simulated", ServingConfig(storage_root=tmp_path))


async def test_a_version_is_pending_until_its_delay_then_runs_until_cancelled(
    backend: SimulatedServingBackend, tmp_path: Path
) -> None:
    await asyncio.to_thread(exported, tmp_path, "r1")
    handle = await backend.schedule(
        backend.dryrun(ModelVersion(model="digits", version="r1", replicas=2))
    )
    described = await backend.describe(handle)
    assert described is not None
    assert described.phase is Phase.PENDING
    urls = await backend.ready(handle)
    assert len(set(urls)) == 2, "one URL per replica"
    described = await backend.describe(handle)
    assert described is not None
    assert described.phase is Phase.RUNNING
    waiting = asyncio.create_task(backend.wait(handle))
    await backend.cancel(handle)
    await backend.cancel(handle)
    assert (await asyncio.wait_for(waiting, 5)).status is Status.CANCELLED
    assert await backend.describe(handle) is None


async def test_the_deployer_serves_replaces_and_takes_down_simulated_versions(
    backend: SimulatedServingBackend, tmp_path: Path
) -> None:
    await asyncio.to_thread(exported, tmp_path, "r1")
    await asyncio.to_thread(exported, tmp_path, "r2")
    state, published = MemoryState(), Published()
    deployer = Deployer(
        backend=backend,
        storage_root=tmp_path,
        smoke_timeout_s=10,
        state=state,
        publish=published,
        presence=await present(state, "serve"),
        source="/torchrelay/serve",
        replicas=2,
        retain_s=1.0,
    )
    try:
        for version in ("r1", "r2"):
            data = ModelDeployRequestedData(model_name="digits", version=version, replicas=2)
            await deployer.on_deploy_requested(ModelDeployRequested(source="/tests", data=data))
        first, second = published.of(ModelDeployed)
        assert first.data.endpoint == second.data.endpoint, "a new version keeps the endpoint"
        endpoint = second.data.endpoint
        assert await infer(endpoint) == 200
        assert await infer(f"{endpoint}/versions/r2") == 200
        assert await infer(f"{endpoint}/versions/r1") == 404, "the replaced version is retired"
        undeploy = ModelUndeployRequestedData(model_name="digits")
        await deployer.on_undeploy_requested(ModelUndeployRequested(source="/t", data=undeploy))
        assert await infer(endpoint) == 404
    finally:
        await deployer.aclose()


async def test_another_replica_describes_and_cancels_a_version_it_did_not_start(
    backend: SimulatedServingBackend, tmp_path: Path
) -> None:
    await asyncio.to_thread(exported, tmp_path, "r1")
    other = SimulatedServingBackend(tmp_path, ready_delay_s=0, host="127.0.0.1")
    await other.start()
    try:
        work = ModelVersion(model="digits", version="r1", replicas=1)
        handle = await backend.schedule(backend.dryrun(work))
        await backend.ready(handle)
        endpoint = await backend.promote(handle)
        described = await other.describe(handle)
        assert described is not None
        assert described.phase is Phase.RUNNING
        await other.cancel(handle)
        await other.cancel(handle)
        assert await other.describe(handle) is None
        assert await backend.describe(handle) is None
        assert await infer(endpoint) == 404
        assert await other.describe("simulated/1/abc") is None, "a replica that is gone"
    finally:
        await other.aclose()
