"""In-place swaps (issue 17, part 3): a new version of the same model (same signature, same
architecture) replaces the serving one inside the running servers, between two batches, under
load, with no failed request and no response from the old version after one from the new on a
connection; anything else about the model that changed is a full rollout. The deployer's
handler on its own (in-memory state) with real local model servers."""

from __future__ import annotations

import asyncio
import collections
import warnings
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import numpy as np
import pytest
from structlog.testing import capture_logs

from tests.integration.in_memory import Published, present
from tests.integration.tiny_models import DIGITS_INPUT, export_digits, model_folder
from torchrelay.services.serve.handlers import Deployer
from torchrelay.shared.cluster.local_serving import LocalServingBackend
from torchrelay.shared.cluster.port import NotReady
from torchrelay.shared.cluster.registry import ServerOptions
from torchrelay.shared.events import (
    ModelDeployed,
    ModelDeployRequested,
    ModelRollbackRequested,
)
from torchrelay.shared.events.data import ModelDeployRequestedData, ModelRollbackRequestedData
from torchrelay.shared.state import MemoryState, key_part
from torchrelay.shared.storage import ModelDescription, TensorSignature

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]
MODEL = "swappable"


def export_linear(root: Path, version: str, outputs: int) -> None:
    """A version described like the digits CNN (same training function) whose module is a
    linear layer with ``outputs`` classes: 10 keeps the signature and changes the
    architecture; any other number changes the signature too."""
    import torch

    reference = ModelDescription.read(model_folder(root, MODEL, "v1") / "model.json")
    folder = model_folder(root, MODEL, version)
    folder.mkdir(parents=True)
    module = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, outputs)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(module).save(str(folder / "model.pt"))  # type: ignore[no-untyped-call]
    output = TensorSignature(name="output", datatype="FP32", shape=(-1, outputs))
    reference.model_copy(update={"version": version, "outputs": (output,)}).write(
        folder / "model.json"
    )


@pytest.fixture(scope="module")
def storage(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("storage")
    export_digits(root, MODEL, "v1")
    export_digits(root, MODEL, "v2", seed=2)
    export_linear(root, "other-architecture", outputs=10)
    export_linear(root, "other-signature", outputs=5)
    return root


@pytest.fixture
async def deployer(storage: Path) -> AsyncIterator[tuple[Deployer, Published]]:
    state, published = MemoryState(), Published()
    backend = LocalServingBackend(storage, options=ServerOptions(drain_s=1), ready_timeout_s=60)
    handler = Deployer(
        backend=backend,
        storage_root=storage,
        smoke_timeout_s=30,
        state=state,
        publish=published,
        presence=await present(state, "serve"),
        source="/torchrelay/serve",
        replicas=2,
    )
    yield handler, published
    await handler.aclose()


def deploy(version: str) -> ModelDeployRequested:
    return ModelDeployRequested(
        source="/tests",
        subject=MODEL,
        data=ModelDeployRequestedData(model_name=MODEL, version=version, replicas=2),
    )


def server_pids(handler: Deployer) -> set[int]:
    backend = handler.backend
    assert isinstance(backend, LocalServingBackend)
    return {s.process.pid for v in backend._versions.values() for s in v.servers}


class Load:
    """Clients on keep-alive connections, each recording the versions it was answered by."""

    def __init__(self, endpoint: str, clients: int = 4) -> None:
        self.url = f"{endpoint}/infer"
        data = np.zeros(DIGITS_INPUT[1:], dtype=np.float32).ravel().tolist()
        self.body = {"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32"}]}
        self.body["inputs"][0]["data"] = data
        self.outcomes: collections.Counter[str] = collections.Counter()
        self.versions: list[list[str]] = [[] for _ in range(clients)]
        self.stop = asyncio.Event()
        self.tasks = [asyncio.create_task(self._client(seen)) for seen in self.versions]

    async def _client(self, seen: list[str]) -> None:
        connector = aiohttp.TCPConnector(limit=1)  # one connection: its answers in order
        async with aiohttp.ClientSession(connector=connector) as http:
            while not self.stop.is_set():
                try:
                    async with http.post(self.url, json=self.body) as response:
                        self.outcomes[str(response.status)] += 1
                        if response.status == 200:
                            seen.append((await response.json())["model_version"])
                except aiohttp.ClientError as exc:
                    self.outcomes[type(exc).__name__] += 1

    async def until_stopped(self) -> None:
        await asyncio.sleep(0.5)
        self.stop.set()
        await asyncio.gather(*self.tasks)


def in_order(seen: list[str], old: str, new: str) -> bool:
    """Old answers, then new ones: never the old version after the new one."""
    return seen == sorted(seen, key=[old, new].index)


async def test_a_version_of_the_same_model_swaps_in_place_under_load(
    deployer: tuple[Deployer, Published],
) -> None:
    handler, published = deployer
    await handler.on_deploy_requested(deploy("v1"))
    endpoint = published.of(ModelDeployed)[-1].data.endpoint
    first = await handler.deployments.get(key_part(MODEL))
    assert first is not None
    pids = server_pids(handler)
    load = Load(endpoint)
    await asyncio.sleep(0.3)

    with capture_logs() as logs:
        await handler.on_deploy_requested(deploy("v2"))
    await load.until_stopped()

    assert set(load.outcomes) == {"200"}, f"failed requests during the swap: {load.outcomes}"
    assert load.outcomes["200"] > 20, "the load ran through the swap"
    assert all(in_order(seen, "v1", "v2") for seen in load.versions), "a mixed answer order"
    assert all(seen[-1] == "v2" for seen in load.versions), "every connection ends on v2"
    assert any(line["event"] == "model.swapped" for line in logs)
    assert server_pids(handler) == pids, "the same processes serve: nothing was started"
    record = await handler.deployments.get(key_part(MODEL))
    assert record is not None
    assert (record.value.active_version, record.value.previous_version) == ("v2", "v1")
    assert (record.value.handle, record.value.endpoint) == (first.value.handle, endpoint)

    rollback = ModelRollbackRequested(
        source="/tests", data=ModelRollbackRequestedData(model_name=MODEL)
    )
    await handler.on_rollback_requested(rollback)  # back in place too
    assert published.of(ModelDeployed)[-1].data.version == "v1"
    assert server_pids(handler) == pids
    async with aiohttp.ClientSession() as http:
        for _ in range(8):
            async with http.post(f"{endpoint}/infer", json=load.body) as response:
                assert (await response.json())["model_version"] == "v1"


@pytest.mark.parametrize(
    ("version", "reason"),
    [
        ("other-signature", "its outputs differs from the serving version's"),
        ("other-architecture", "the architecture changed"),
    ],
)
async def test_a_changed_signature_or_architecture_is_a_full_rollout(
    deployer: tuple[Deployer, Published], version: str, reason: str
) -> None:
    handler, published = deployer
    await handler.on_deploy_requested(deploy("v1"))
    first = await handler.deployments.get(key_part(MODEL))
    assert first is not None
    with capture_logs() as logs:
        await handler.on_deploy_requested(deploy(version))
    assert published.of(ModelDeployed)[-1].data.version == version
    (fallback,) = [line for line in logs if line["event"] == "model.full_rollout"]
    assert reason in fallback["reason"]
    record = await handler.deployments.get(key_part(MODEL))
    assert record is not None
    assert (record.value.active_version, record.value.previous_version) == (version, "v1")
    assert record.value.handle != first.value.handle, "new servers serve it"


async def test_a_switch_that_fails_on_one_server_leaves_every_server_on_the_old_version(
    deployer: tuple[Deployer, Published],
) -> None:
    handler, published = deployer
    await handler.on_deploy_requested(deploy("v1"))
    endpoint = published.of(ModelDeployed)[-1].data.endpoint
    backend = handler.backend
    assert isinstance(backend, LocalServingBackend)
    record = await handler.deployments.get(key_part(MODEL))
    assert record is not None
    assert record.value.handle is not None
    handle = record.value.handle
    private = await backend.stage(handle, "v2")
    load = Load(endpoint)
    async with aiohttp.ClientSession() as http:
        for url in private:  # staged: reachable by its version on each server's own port
            async with http.post(f"{url}/v2/models/{MODEL}/versions/v2/infer", json=load.body) as r:
                assert (await r.json())["model_version"] == "v2"
        pinned = f"{endpoint}/versions/v2/infer"
        async with http.post(pinned, json=load.body) as r:
            assert r.status == 404, "not on the shared port before it serves"
    # One server loses what was staged (as if it restarted): its switch is refused.
    (running,) = backend._versions.values()
    await backend._admin(running.servers[1].admin, "unstage")

    with pytest.raises(NotReady, match="did not switch in place"):
        await backend.switch(handle, "v2")
    await load.until_stopped()

    assert set(load.outcomes) == {"200"}, load.outcomes
    # (A server that did switch answered v2, which passed its smoke check, until it switched
    # back: in this failure the versions do not only move forward.)
    assert all(seen[-1] == "v1" for seen in load.versions), "every connection ends on v1"
    async with aiohttp.ClientSession() as http:
        for url in private:  # each server on its own port: the switch was undone everywhere
            async with http.post(f"{url}/v2/models/{MODEL}/infer", json=load.body) as r:
                assert (await r.json())["model_version"] == "v1"
            async with http.post(f"{url}/v2/models/{MODEL}/versions/v2/infer", json=load.body) as r:
                assert r.status == 404, "nothing is left staged"
