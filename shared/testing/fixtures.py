"""pytest plugin: ``pytest_plugins = ["torchrelay.shared.testing.fixtures"]``.

- ``nats_server``: a real nats-server with JetStream, one per test module, its own temp store,
  a port it picked itself. Missing binary: skip locally, fail loudly under ``CI=true``.
- ``nats_url``: its URL, with JetStream wiped before each test (streams and KV buckets).
- ``no_leaks`` (autouse): fails a test that leaves asyncio tasks or child processes behind.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import nats
import pytest

from torchrelay.shared.bus.server import NatsServer
from torchrelay.shared.errors import ConfigError

# Processes that fixtures of a wider scope own on purpose (the module's nats-server).
_FIXTURE_PIDS: set[int] = set()


def child_pids() -> set[int]:
    """Live child processes of this process (Linux /proc)."""
    pids: set[int] = set()
    for children in Path("/proc/self/task").glob("*/children"):
        try:
            pids.update(int(pid) for pid in children.read_text().split())
        except OSError:
            continue
    return {pid for pid in pids if _alive(pid)}


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


@pytest.fixture(scope="module")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    server = NatsServer(tmp_path_factory.mktemp("nats"))
    try:
        server.start()
    except ConfigError as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"nats-server is required in CI: {exc}")
        pytest.skip(f"nats-server unavailable: {exc}")
    if server.pid is not None:
        _FIXTURE_PIDS.add(server.pid)
    yield server
    _FIXTURE_PIDS.discard(server.pid or 0)
    server.stop()


async def wipe_jetstream(url: str) -> None:
    """Delete every stream (KV buckets included) so a test starts from nothing."""
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        for name in [info.config.name for info in await js.streams_info() if info.config.name]:
            await js.delete_stream(name)
    finally:
        await nc.close()


@pytest.fixture
async def nats_url(nats_server: NatsServer) -> str:
    await wipe_jetstream(nats_server.url)
    return nats_server.url


@pytest.fixture(autouse=True)
async def no_leaks() -> AsyncIterator[None]:
    before_tasks = asyncio.all_tasks()
    before_children = child_pids()
    yield
    current = asyncio.current_task()
    # Give cancelled tasks one loop turn to finish.
    await asyncio.sleep(0)
    leaked = [t for t in asyncio.all_tasks() - before_tasks if t is not current and not t.done()]
    new_children = child_pids() - before_children - _FIXTURE_PIDS
    if leaked:
        pytest.fail(f"test leaked asyncio tasks: {[t.get_name() for t in leaked]}")
    if new_children:
        pytest.fail(f"test leaked child processes: {sorted(new_children)}")
