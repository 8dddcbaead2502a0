"""Taking a model down (issue 15, item 3): `torchrelay undeploy MODEL` through the real CLI
process and the serve service as a real process with local model servers, and the deployer's
handler on its own (in-memory state, real servers): the endpoint goes away, the record says
`undeployed`, model.undeployed says what served, and a redelivered request changes nothing."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import nats
import pytest
from structlog.testing import capture_logs

from tests.integration.in_memory import Published, present
from tests.integration.processes import ServiceProcess, cli, serve_service
from tests.integration.tiny_models import export_digits
from tests.integration.watching import Watcher, watching
from torchrelay.services.serve.domain import DeploymentRecord
from torchrelay.services.serve.handlers import Deployer
from torchrelay.shared.bus.jetstream import JetStreamBus
from torchrelay.shared.cluster.local_serving import LocalServingBackend
from torchrelay.shared.cluster.registry import ServerOptions
from torchrelay.shared.events import (
    AnyEvent,
    ModelDeployed,
    ModelDeployRequested,
    ModelUndeployed,
    ModelUndeployRequested,
)
from torchrelay.shared.events.data import ModelDeployRequestedData, ModelUndeployRequestedData
from torchrelay.shared.state import KvState, MemoryState, Store, key_part
from torchrelay.shared.testing import assert_eventually

pytestmark = pytest.mark.timeout(120)
MODEL = "undeployable"


@pytest.fixture(scope="module")
def storage(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("storage")
    export_digits(root, MODEL, "v1")
    export_digits(root, MODEL, "v2", seed=2)
    return root


def deploy(version: str) -> ModelDeployRequested:
    return ModelDeployRequested(
        source="/tests",
        subject=MODEL,
        data=ModelDeployRequestedData(model_name=MODEL, version=version, replicas=1),
    )


def undeploy(model: str = MODEL, reason: str = "retired") -> ModelUndeployRequested:
    return ModelUndeployRequested(
        source="/tests",
        subject=model,
        data=ModelUndeployRequestedData(model_name=model, reason=reason),
    )


async def answers(endpoint: str) -> bool:
    """Whether anything still answers at the model's endpoint."""
    try:
        async with (
            aiohttp.ClientSession() as http,
            http.get(endpoint, timeout=aiohttp.ClientTimeout(total=5)) as response,
        ):
            return response.status < 500
    except aiohttp.ClientConnectionError:
        return False


async def down(endpoint: str) -> bool:
    return not await answers(endpoint)


# --- the handler ---------------------------------------------------------------------------


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
        replicas=1,
    )
    yield handler, published
    await handler.aclose()


@pytest.mark.slow
async def test_an_undeploy_takes_the_endpoint_down_once_and_a_redelivery_changes_nothing(
    deployer: tuple[Deployer, Published],
) -> None:
    handler, published = deployer
    await handler.on_deploy_requested(deploy("v1"))
    (deployed,) = published.of(ModelDeployed)
    endpoint = deployed.data.endpoint
    assert await answers(endpoint)

    request = undeploy(reason="replaced by another model")
    await handler.on_undeploy_requested(request)
    (fact,) = published.of(ModelUndeployed)
    assert isinstance(fact, ModelUndeployed)
    assert (fact.data.model_name, fact.data.version, fact.data.endpoint, fact.data.reason) == (
        MODEL,
        "v1",
        endpoint,
        "replaced by another model",
    )
    assert (fact.causationid, fact.subject) == (request.id, MODEL)
    assert await down(endpoint), "nothing answers where the model was"
    record = await handler.deployments.get(key_part(MODEL))
    assert record is not None
    assert (record.value.status, record.value.active_version, record.value.endpoint) == (
        "undeployed",
        None,
        None,
    )
    assert (record.value.previous_version, record.value.handle) == ("v1", None)
    assert await handler.endpoint_of(MODEL) is None, "the service port routes to it no more"

    with capture_logs() as logs:
        await handler.on_undeploy_requested(request)  # redelivered
    assert len(published.of(ModelUndeployed)) == 1, "said once"
    again = await handler.deployments.get(key_part(MODEL))
    assert again is not None
    assert again.revision == record.revision, "the record is not written twice"
    assert {"event": "model.undeploy_ignored", "model": MODEL, "reason": "status undeployed"} in [
        {k: line.get(k) for k in ("event", "model", "reason")} for line in logs
    ]

    await handler.on_deploy_requested(deploy("v2"))  # deployed again later: a fresh rollout
    record = await handler.deployments.get(key_part(MODEL))
    assert record is not None
    assert (record.value.status, record.value.active_version) == ("deployed", "v2")
    assert record.value.previous_version == "v1", "a rollback goes back to what served last"


async def test_an_undeploy_of_a_model_never_deployed_is_acked_with_a_log_line_and_no_change(
    deployer: tuple[Deployer, Published],
) -> None:
    handler, published = deployer
    with capture_logs() as logs:
        await handler.on_undeploy_requested(undeploy("never-deployed"))
    assert published.events == []
    assert await handler.deployments.get(key_part("never-deployed")) is None, "no record made"
    assert {"event": "model.undeploy_ignored", "reason": "not deployed"}.items() <= logs[-1].items()


# --- the CLI and the serve service ---------------------------------------------------------


@pytest.fixture
async def bus(nats_url: str) -> AsyncIterator[tuple[JetStreamBus, Watcher]]:
    kinds = [ModelDeployed, ModelUndeployed, ModelUndeployRequested]
    async with watching(nats_url, "test-undeploy-watch", kinds) as pair:
        yield pair


@pytest.fixture
def serve(nats_url: str, storage: Path, tmp_path: Path) -> Iterator[ServiceProcess]:
    process = serve_service(nats_url, storage, tmp_path / "serve.log", drain_s=1)
    yield process
    process.stop()


async def redeliver(nats_url: str, event: AnyEvent) -> None:
    """``event`` once more, as JetStream redelivers it: the same event, under a message id
    the stream has not seen (the event's own id would be deduplicated)."""
    nc = await nats.connect(nats_url)
    try:
        await nc.jetstream().publish(
            event.nats_subject, event.to_json(), headers={"Nats-Msg-Id": f"again-{event.id}"}
        )
    finally:
        await nc.close()


@pytest.mark.slow
async def test_torchrelay_undeploy_takes_a_served_model_down_and_refuses_what_is_not_up(
    nats_url: str, bus: tuple[JetStreamBus, Watcher], serve: ServiceProcess
) -> None:
    publisher, watcher = bus
    await serve.wait_ready()
    await publisher.publish(deploy("v1"))
    deployed = await watcher.one(ModelDeployed, model_name=MODEL, timeout_s=90)
    endpoint = deployed.data.endpoint
    assert await answers(endpoint)

    done = cli("undeploy", MODEL, "--reason", "end of the trial", "--nats-url", nats_url)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == (
        f"undeploy of {MODEL} (v1 serves) requested; `torchrelay status` shows it"
    )
    fact = await watcher.one(ModelUndeployed, model_name=MODEL, timeout_s=60)
    assert (fact.data.version, fact.data.endpoint, fact.data.reason) == (
        "v1",
        endpoint,
        "end of the trial",
    )
    deployments: Store[DeploymentRecord] = (await KvState.open(publisher.nc.jetstream())).store(
        "deployments", DeploymentRecord
    )
    record = await deployments.get(key_part(MODEL))
    assert record is not None
    assert (record.value.status, record.value.active_version, record.value.endpoint) == (
        "undeployed",
        None,
        None,
    )
    await assert_eventually(lambda: down(endpoint), timeout_s=15)

    for argv, says in [
        (
            [MODEL],
            f"model '{MODEL}' was undeployed: nothing to undeploy; "
            f"`torchrelay deploy {MODEL} v1` brings it back",
        ),
        (["nope"], "model 'nope' is not deployed: nothing to undeploy"),
        ([MODEL, "--reason", ""], "the reason has 0 characters: say why in 1 to 512"),
    ]:
        refused = cli("undeploy", *argv, "--nats-url", nats_url)
        assert (refused.returncode, refused.stderr.strip()) == (1, f"torchrelay: {says}")
    rollback = cli("rollback", MODEL, "--nats-url", nats_url)
    assert rollback.returncode == 1
    assert rollback.stderr.strip() == (
        f"torchrelay: model '{MODEL}' was undeployed: nothing to roll back; "
        f"`torchrelay deploy {MODEL} v1` brings it back"
    )

    (request,) = watcher.of(ModelUndeployRequested, model_name=MODEL)
    await redeliver(nats_url, request)
    await publisher.publish(deploy("v2"))  # handled after the redelivery: one at a time
    await watcher.one(ModelDeployed, version="v2", timeout_s=90)
    assert len(watcher.of(ModelUndeployRequested, model_name=MODEL)) == 2, "it was redelivered"
    assert len(watcher.of(ModelUndeployed)) == 1, "and it changed nothing"
