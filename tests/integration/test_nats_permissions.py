"""Who may say what, enforced by a real nats-server with the users `torchrelay up` generates.

Each principal connects as its own user: a forged fact from an outside publisher, another
service's fact, or anything but progress from a worker is refused by the server itself.
"""

from __future__ import annotations

import asyncio
import secrets
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Protocol

import nats
import nats.errors
import pytest
from nats.aio.client import Client as NatsClient
from pydantic import SecretStr

from tests.factories import staged
from torchrelay.client import DEMO
from torchrelay.shared.bus import principals
from torchrelay.shared.bus.connection import NatsSettings, connect
from torchrelay.shared.bus.jetstream import JetStreamBus, StreamSettings
from torchrelay.shared.bus.server import NatsServer
from torchrelay.shared.events import (
    AnyEvent,
    ModelDeployed,
    ModelUndeployed,
    ModelUndeployRequested,
    PipelineSubmitted,
    TrainCompleted,
    TrainProgressed,
    TrainStarted,
)
from torchrelay.shared.events.data import (
    DatasetRef,
    ModelDeployedData,
    ModelUndeployedData,
    ModelUndeployRequestedData,
    PipelineSpec,
    PipelineSubmittedData,
    TrainCompletedData,
    TrainProgressData,
    TrainStartedData,
)
from torchrelay.shared.state import KvState

pytestmark = pytest.mark.timeout(90)

PASSWORDS = {user: secrets.token_urlsafe(16) for user in principals.USERS}


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    authorization = principals.server_authorization(PASSWORDS)
    with NatsServer(tmp_path_factory.mktemp("nats"), authorization=authorization) as server:
        yield server


class Session:
    """One principal's connection, with the errors the server sent it."""

    def __init__(self, nc: NatsClient, errors: list[str]) -> None:
        self.nc = nc
        self.errors = errors
        # A refused publish is never acknowledged: wait a second for it, not five.
        self.bus = JetStreamBus(nc, StreamSettings(publish_timeout_s=1.0))

    def refused(self) -> bool:
        return any("permissions violation" in error.lower() for error in self.errors)


class Login(Protocol):
    def __call__(self, user: str, *, own_inbox: bool = True) -> Awaitable[Session]: ...


@pytest.fixture
async def login(secured: NatsServer) -> AsyncIterator[Login]:
    opened: list[Session] = []

    async def as_user(user: str, *, own_inbox: bool = True) -> Session:
        errors: list[str] = []

        async def on_error(error: Exception) -> None:
            errors.append(str(error))

        settings = NatsSettings(
            url=secured.url,
            user=user,
            password=SecretStr(PASSWORDS[user]),
            inbox_prefix=principals.inbox_prefix(user) if own_inbox else None,
            startup_wait_s=5,
        )
        session = Session(await connect(settings, error_cb=on_error), errors)
        opened.append(session)
        return session

    admin = await as_user(principals.ADMIN)
    await admin.bus.ensure_stream()
    yield as_user
    for session in opened:
        await session.nc.close()


async def stored(admin: Session, event: AnyEvent) -> bool:
    """Whether the stream holds ``event`` (by its id, the Nats-Msg-Id)."""
    js = admin.nc.jetstream()
    info = await js.stream_info("TORCHRELAY")
    for sequence in range(info.state.first_seq, info.state.last_seq + 1):
        try:
            message = await js.get_msg("TORCHRELAY", sequence)
        except nats.js.errors.NotFoundError:
            continue
        if message.headers and message.headers.get("Nats-Msg-Id") == event.id:
            return True
    return False


async def refused(session: Session, event: AnyEvent) -> None:
    """Publishing ``event`` fails: the server answers with a permissions violation and no
    acknowledgement ever comes."""
    with pytest.raises((nats.errors.TimeoutError, nats.errors.NoRespondersError)):
        await session.bus.publish(event)
    for _ in range(50):
        if session.refused():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"no permissions violation reported: {session.errors}")


def _started(run_id: str = "phantom") -> TrainStarted:
    return TrainStarted(
        source="/forged",
        data=TrainStartedData(
            run_id=run_id,
            attempt=0,
            world_size=1,
            backend="local",
            dataset=DatasetRef(name="digits", version="v1"),
        ),
    )


def _deployed() -> ModelDeployed:
    return ModelDeployed(
        source="/forged",
        data=ModelDeployedData(
            model_name="digits", version="v1", endpoint="http://169.254.169.254/latest/meta-data"
        ),
    )


def _completed() -> TrainCompleted:
    return TrainCompleted(
        source="/forged",
        data=TrainCompletedData(run_id="r", model_name="digits", model_version="v1", path="m"),
    )


def _progress() -> TrainProgressed:
    return TrainProgressed(
        source="/torchrelay/train/worker",
        data=TrainProgressData(run_id="r", step=1, epoch=0, loss=0.5, samples_per_s=10.0),
    )


async def test_a_publisher_may_submit_a_pipeline(login: Login) -> None:
    """As any NATS client would: the default reply inbox gets the publish acknowledgement."""
    publisher = await login(principals.PUBLISHER, own_inbox=False)
    admin = await login(principals.ADMIN)
    spec = PipelineSpec.model_validate(DEMO)
    event = PipelineSubmitted(source="/another/system", data=PipelineSubmittedData(spec=spec))
    assert await publisher.bus.publish(event)
    assert await stored(admin, event)


@pytest.mark.parametrize("forge", [_started, _deployed, _completed, _progress])
async def test_a_publisher_cannot_state_a_fact(login: Login, forge: Callable[[], AnyEvent]) -> None:
    publisher, admin = await login(principals.PUBLISHER), await login(principals.ADMIN)
    event = forge()
    await refused(publisher, event)
    assert not await stored(admin, event)


async def test_an_undeploy_is_asked_by_a_publisher_and_said_done_by_serve_alone(
    login: Login,
) -> None:
    publisher, admin = await login(principals.PUBLISHER), await login(principals.ADMIN)
    request = ModelUndeployRequested(
        source="/another/system", data=ModelUndeployRequestedData(model_name="digits")
    )
    assert await publisher.bus.publish(request)
    assert await stored(admin, request)
    fact = ModelUndeployed(
        source="/torchrelay/serve",
        data=ModelUndeployedData(model_name="digits", version="v1", reason="retired"),
    )
    for other in (publisher, await login("train")):
        await refused(other, fact)
    assert not await stored(admin, fact)
    assert await (await login("serve")).bus.publish(fact)
    assert await stored(admin, fact)


async def test_a_service_cannot_publish_another_services_facts(login: Login) -> None:
    ingest, admin = await login("ingest"), await login(principals.ADMIN)
    own = staged()
    assert await ingest.bus.publish(own), "ingest states its own facts"
    forged = _completed()
    await refused(ingest, forged)
    assert not await stored(admin, forged)


async def test_workers_report_progress_and_nothing_else(login: Login) -> None:
    worker, admin = await login(principals.WORKER), await login(principals.ADMIN)
    progress = _progress()
    assert await worker.bus.publish(progress)
    assert await stored(admin, progress)
    forged = _completed()
    await refused(worker, forged)
    assert not await stored(admin, forged)


async def test_a_publisher_cannot_write_state(login: Login) -> None:
    admin = await login(principals.ADMIN)
    await KvState.open(admin.nc.jetstream())
    publisher = await login(principals.PUBLISHER)
    with pytest.raises((nats.errors.TimeoutError, nats.errors.NoRespondersError)):
        await publisher.nc.jetstream(timeout=1.0).publish("$KV.runs.phantom", b"{}")
    runs = await admin.nc.jetstream().key_value("runs")
    with pytest.raises(nats.js.errors.KeyNotFoundError):
        await runs.get("phantom")


async def test_a_publisher_cannot_read_other_principals_replies(login: Login) -> None:
    publisher = await login(principals.PUBLISHER)
    await publisher.nc.subscribe(f"{principals.inbox_prefix('ingest')}.>")
    await publisher.nc.flush()
    for _ in range(50):
        if publisher.refused():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("subscribing to another user's inbox was allowed")


async def test_services_cannot_delete_the_stream(login: Login) -> None:
    train, admin = await login("train"), await login(principals.ADMIN)
    with pytest.raises((nats.errors.TimeoutError, nats.errors.NoRespondersError)):
        await train.nc.jetstream(timeout=1.0).delete_stream("TORCHRELAY")
    assert (await admin.nc.jetstream().stream_info("TORCHRELAY")).config.name == "TORCHRELAY"


def test_the_generated_configuration_is_valid_for_nats_server(secured: NatsServer) -> None:
    import subprocess

    from torchrelay.shared.bus.server import find_nats_server

    result = subprocess.run(
        [str(find_nats_server()), "-t", "-c", str(secured.state_dir / "auth.conf")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert (secured.state_dir / "auth.conf").stat().st_mode & 0o077 == 0, "passwords are private"


def test_the_embedded_nats_takes_another_port_when_4222_is_taken(tmp_path: Path) -> None:
    from torchrelay.platform import NATS_PORT, start_nats

    holder = socket.socket()
    try:
        holder.bind(("127.0.0.1", NATS_PORT))
        holder.listen()
    except OSError:
        pass  # something else holds it already: the same situation
    try:
        server = start_nats(tmp_path, PASSWORDS)
        try:
            assert server.port not in (None, NATS_PORT)
        finally:
            server.stop()
    finally:
        holder.close()
