"""What only the local serving backend does (the rest is in the backend contract suite): its
servers are its children, so it sees one crash, and says which."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest

from tests.integration.tiny_models import export_digits
from torchrelay.shared.cluster import ModelVersion, Status
from torchrelay.shared.cluster.local_serving import LocalServingBackend
from torchrelay.shared.cluster.registry import ServerOptions

pytestmark = pytest.mark.timeout(120)


async def test_a_crashed_server_ends_the_version_as_failed_naming_it(tmp_path: Path) -> None:
    await asyncio.to_thread(export_digits, tmp_path, "digits", "v1")
    backend = LocalServingBackend(tmp_path, options=ServerOptions(drain_s=1.0))
    try:
        work = ModelVersion(model="digits", version="v1", replicas=2)
        handle = await backend.schedule(backend.dryrun(work))
        await backend.ready(handle)
        await backend.promote(handle)
        servers = backend._versions[handle].servers
        waiting = asyncio.create_task(backend.wait(handle))
        os.kill(servers[1].process.pid, signal.SIGKILL)
        ended = await asyncio.wait_for(waiting, 30)
        assert ended.status is Status.FAILED, ended
        assert (ended.rank, ended.exit_code) == (1, -signal.SIGKILL)
        assert ended.reason == f"model server 1 exited ({-signal.SIGKILL})"
        assert servers[0].process.returncode is not None, "the other server is stopped"
        assert await backend.describe(handle) is None
    finally:
        await backend.aclose()
