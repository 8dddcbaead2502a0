"""``torchrelay up`` keeps its NATS server running: one killed is started again on the same
port and the same store, and clients reconnect on their own to find their streams."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import nats
import pytest

from torchrelay import platform
from torchrelay.shared.testing import assert_eventually

pytestmark = pytest.mark.timeout(60)


async def test_a_killed_nats_server_is_started_again_on_its_port_and_store(
    tmp_path: Path,
) -> None:
    passwords = platform.nats_passwords(tmp_path)
    server = platform.start_nats(tmp_path, passwords)
    running = platform.Platform(tmp_path, server.url, server, passwords=passwords)
    said: list[str] = []
    nc = await nats.connect(
        platform.client_url(tmp_path, server.url),
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.2,
    )
    try:
        js = nc.jetstream()
        await js.add_stream(name="KEPT", subjects=["kept.>"])
        await js.publish("kept.one", b"before the crash")
        port, pid = server.port, server.pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        await assert_eventually(lambda: server.exited() is not None, timeout_s=10)

        async def back() -> bool:
            await asyncio.to_thread(platform.supervise, running, say=said.append)
            return server.exited() is None and server.pid not in (None, pid)

        await assert_eventually(back, timeout_s=30, interval_s=0.2)
        assert server.port == port, "the same URL: clients reconnect to it"
        assert said[0].startswith("nats-server exited (-9)")
        assert said[-1] == f"nats-server is back: {server.url}"

        await assert_eventually(lambda: nc.is_connected, timeout_s=20)
        kept = await js.get_msg("KEPT", 1)
        assert kept.data == b"before the crash", "the same store"
    finally:
        await nc.close()
        platform.stop(running)


async def test_a_service_starting_again_never_holds_up_a_dead_nats_server(tmp_path: Path) -> None:
    # A service started again waits for NATS to be ready; NATS must not wait for it.
    (tmp_path / "logs").mkdir()
    passwords = platform.nats_passwords(tmp_path)
    server = platform.start_nats(tmp_path, passwords)
    running = platform.Platform(tmp_path, server.url, server, passwords=passwords)
    dead = await asyncio.to_thread(exited_process)
    running.replicas.append(platform.Replica("ingest", 0, dead, started=0.0))
    said: list[str] = []
    try:
        assert server.pid is not None
        os.kill(server.pid, signal.SIGKILL)
        await assert_eventually(lambda: server.exited() is not None, timeout_s=10)

        def spawned() -> bool:
            platform.supervise(running, say=said.append)
            return running.replicas[0].process is not dead

        await assert_eventually(lambda: asyncio.to_thread(spawned), timeout_s=10, interval_s=0.2)
        assert running.replicas[0].starting, "the round that started it did not wait for it"

        async def both_back() -> bool:
            await asyncio.to_thread(platform.supervise, running, say=said.append)
            return not running.replicas[0].starting

        await assert_eventually(both_back, timeout_s=45, interval_s=0.2)
        backs = [line for line in said if " is back" in line]
        assert backs[0] == f"nats-server is back: {server.url}", said
        assert backs[-1].startswith("ingest-0 is back: http://127.0.0.1:"), said
    finally:
        platform.stop(running)


def exited_process() -> subprocess.Popen[bytes]:
    """A replica's process that has already exited (its service died)."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process
