"""``torchrelay up`` keeps its NATS server running: one killed is started again on the same
port and the same store, and clients reconnect on their own to find their streams."""

from __future__ import annotations

import asyncio
import os
import signal
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
