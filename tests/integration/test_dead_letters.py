"""Dead letters never lose an event: a handler process killed on the last allowed delivery
still leaves exactly one dead letter (written from JetStream's max-deliveries advisory by the
monitor's replicas), which ``torchrelay deadletters`` lists and replays."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import nats
import nats.js.errors
import pytest

from tests.factories import staged
from tests.integration.effect_service import attempts
from tests.integration.processes import ServiceProcess
from torchrelay.shared.bus.deadletters import ReplayRefused, dead_letter_id
from torchrelay.shared.bus.jetstream import JetStreamBus, StreamSettings
from torchrelay.shared.events import DeadLettered
from torchrelay.shared.testing import assert_eventually

pytestmark = pytest.mark.timeout(180)

DUPLICATE_WINDOW_S = 2.0
STREAM = StreamSettings(duplicate_window_s=DUPLICATE_WINDOW_S, fetch_timeout_s=0.2)
# Every process brings the stream to its own settings at start: all must agree.
ENV = {
    "TORCHRELAY_STREAM_DUPLICATE_WINDOW_S": str(DUPLICATE_WINDOW_S),
    "TORCHRELAY_STREAM_FETCH_TIMEOUT_S": "0.2",
    "TORCHRELAY_SHUTDOWN_GRACE_S": "2",
    "TORCHRELAY_SHUTDOWN_DEADLINE_S": "5",
}
EXHAUSTED_METRIC = (
    r'torchrelay_dead_letters_total\{consumer="effects",[^}]*reason="exhausted"\} (\S+)'
)
EFFECTS = {"EFFECT_MAX_DELIVER": "2", "EFFECT_ACK_WAIT_S": "1.5"}


@pytest.fixture
async def bus(nats_url: str) -> AsyncIterator[JetStreamBus]:
    bus = JetStreamBus(await nats.connect(nats_url), STREAM, source="/tests")
    await bus.ensure_stream()
    yield bus
    await bus.aclose()


@pytest.fixture
def processes() -> Iterator[list[ServiceProcess]]:
    started: list[ServiceProcess] = []
    yield started
    for process in started:
        process.stop()


def start(
    processes: list[ServiceProcess], argv: list[str], url: str, log: Path, **env: str
) -> ServiceProcess:
    process = ServiceProcess(
        [*argv, "--nats-url", url, "--http-port", "0"], log, env={**ENV, **env}
    )
    processes.append(process)
    return process


def effects(processes: list[ServiceProcess], url: str, log: Path, hold_s: float) -> ServiceProcess:
    argv = ["-m", "tests.integration.effect_service"]
    return start(processes, argv, url, log, EFFECT_HOLD_S=str(hold_s), **EFFECTS)


async def letters(bus: JetStreamBus) -> list[DeadLettered]:
    return [letter for _, letter in await bus.dead_letters() if letter is not None]


async def count(found: Awaitable[list[DeadLettered]]) -> int:
    return len(await found)


async def cli(*argv: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "torchrelay",
        "deadletters",
        *argv,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


async def reaches(get: Callable[[], Awaitable[object]], expected: object, timeout_s: float) -> None:
    async def check() -> bool:
        return await get() == expected

    await assert_eventually(
        check, timeout_s=timeout_s, interval_s=0.1, message=lambda: f"never {expected!r}"
    )


async def dead_letters_counted(monitors: list[ServiceProcess]) -> float:
    total = 0.0
    async with aiohttp.ClientSession() as http:
        for process in monitors:
            async with http.get(f"http://127.0.0.1:{process.http_port}/metrics") as response:
                text = await response.text()
            pattern = (
                r'torchrelay_dead_letters_total\{consumer="effects",[^}]*reason="exhausted"\} (\S+)'
            )
            match = re.search(pattern, text)
            total += float(match[1]) if match else 0.0
    return total


@pytest.mark.slow
async def test_a_handler_killed_on_its_last_delivery_is_dead_lettered_once_and_can_be_replayed(
    nats_url: str, bus: JetStreamBus, processes: list[ServiceProcess], tmp_path: Path
) -> None:
    # Two monitor replicas: both consume the advisories, through one shared consumer.
    monitors = [
        start(processes, ["-m", "torchrelay", "service", "monitor"], nats_url, tmp_path / f"m{i}")
        for i in range(2)
    ]
    first = effects(processes, nats_url, tmp_path / "effects-1.log", hold_s=60)
    await asyncio.gather(*(p.wait_ready() for p in [*monitors, first]))

    event = staged()
    await bus.publish(event)
    # Delivery 1 of 2: the process dies mid-handler; JetStream redelivers after ack_wait.
    await reaches(lambda: attempts(bus, event.id), 1, timeout_s=20)
    first.signal(signal.SIGKILL)
    second = effects(processes, nats_url, tmp_path / "effects-2.log", hold_s=60)
    await second.wait_ready()
    # Delivery 2 of 2, the last allowed: the process dies again, no outcome ever runs.
    await reaches(lambda: attempts(bus, event.id), 2, timeout_s=20)
    second.signal(signal.SIGKILL)
    assert not await letters(bus)
    # The restarted replica pulls; JetStream then gives up on the event and says so.
    third = effects(processes, nats_url, tmp_path / "effects-3.log", hold_s=0)
    await third.wait_ready()

    await reaches(lambda: count(letters(bus)), 1, timeout_s=30)
    await asyncio.sleep(2.0)  # room for a second dead letter, were one wrongly made
    found = await letters(bus)
    assert len(found) == 1, found
    written = [
        record
        for monitor in monitors
        for record in monitor.logged("event.dead_lettered")
        if record.get("exhausted_consumer") == "effects"
    ]
    assert len(written) == 1, "one replica took the advisory (a shared consumer)"
    letter = found[0]
    data = letter.data
    assert data.consumer == "effects"
    assert data.deliveries == 2
    assert data.reason.startswith("exhausted")
    assert "did not finish its last allowed delivery (2 deliveries)" in data.reason
    assert (data.original_id, data.original_msg_id, data.original_type) == (
        event.id,
        event.id,
        event.type,
    )
    assert letter.id == dead_letter_id("effects", data.original_sequence)
    assert letter.pipelineid == event.pipelineid
    original = await bus.message_at(data.original_sequence)
    assert original is not None
    assert original.payload == event.to_json()
    assert await attempts(bus, event.id) == 2, "nobody handled it a third time"
    advisories = await bus.nc.jetstream().consumer_info(
        STREAM.advisories_stream, "monitor-max-deliveries"
    )
    assert (advisories.num_pending, advisories.num_ack_pending) == (0, 0), "advisory acked"
    await reaches(lambda: dead_letters_counted(monitors), 1.0, timeout_s=10)

    code, out, err = await cli("--json", "--nats-url", nats_url)
    assert code == 0, err
    (row,) = json.loads(out)
    assert row["original_sequence"] == data.original_sequence
    assert row["original_id"] == event.id
    assert row["original_subject"] == "torchrelay.dataset.staged"
    assert row["consumer"] == "effects"
    assert row["original_size_bytes"] == len(event.to_json())
    assert row["reason"].startswith("exhausted")
    code, out, err = await cli("--nats-url", nats_url)
    assert code == 0, err
    assert "exhausted" in out
    assert str(data.original_sequence) in out

    # The dead letter's own sequence is not the original's: the command says which is.
    code, _, err = await cli("--nats-url", nats_url, "replay", str(row["sequence"]))
    assert code != 0
    assert f"replay {data.original_sequence}" in err

    # Once the duplicate window has passed, the original is published again, same id.
    assert original.stored_at is not None
    passed = (datetime.now(UTC) - original.stored_at).total_seconds()
    await asyncio.sleep(max(0.0, DUPLICATE_WINDOW_S + 0.5 - passed))
    code, out, err = await cli("--nats-url", nats_url, "replay", str(data.original_sequence))
    assert code == 0, err
    assert f"replayed sequence {data.original_sequence}" in out
    # Again at once (in-process: the command's start-up outlasts a 2 s window): the copy's id
    # is within the duplicate window, so nothing is stored.
    with pytest.raises(ReplayRefused, match="duplicate window"):
        await bus.replay(data.original_sequence)
    await reaches(lambda: attempts(bus, event.id), 3, timeout_s=20)
    await asyncio.sleep(0.5)
    assert await attempts(bus, event.id) == 3, "the replay was handled once"


async def test_a_replay_refused_says_why_and_stores_nothing(
    nats_url: str, bus: JetStreamBus
) -> None:
    # The default two-minute window: long enough to outlast starting the command.
    bus = JetStreamBus(bus.nc, StreamSettings())
    await bus.ensure_stream()
    await bus.publish(staged())
    code, _, err = await cli("--nats-url", nats_url, "replay", "999")
    assert code != 0
    assert "holds no message at sequence 999" in err
    code, _, err = await cli("--nats-url", nats_url, "replay", "1")
    assert code != 0
    assert "still within the stream's 120s duplicate window" in err
    info = await bus.nc.jetstream().stream_info(STREAM.name)
    assert info.state.messages == 1


async def test_an_empty_stream_lists_no_dead_letters(nats_url: str, bus: JetStreamBus) -> None:
    code, out, err = await cli("--json", "--nats-url", nats_url)
    assert code == 0, err
    assert json.loads(out) == []
