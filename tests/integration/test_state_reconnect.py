"""Live views and key watches outlive a NATS restart (the client reconnects underneath)."""

from __future__ import annotations

from pathlib import Path

import nats
import pytest
from pydantic import BaseModel, ConfigDict

from torchrelay.shared.bus.server import NatsServer
from torchrelay.shared.state import KvState
from torchrelay.shared.testing import assert_eventually

pytestmark = [pytest.mark.timeout(90), pytest.mark.slow]


class Run(BaseModel):
    model_config = ConfigDict(frozen=True)
    status: str


async def test_a_live_view_follows_on_after_nats_restarts(tmp_path: Path) -> None:
    server = NatsServer(tmp_path / "nats").start()
    try:
        nc = await nats.connect(
            server.url, max_reconnect_attempts=-1, reconnect_time_wait=0.2, allow_reconnect=True
        )
        try:
            runs = (await KvState.open(nc.jetstream(), marker_ttl_s=1.0)).store("runs", Run)
            await runs.put("r1", Run(status="running"))
            async with runs.live(lambda run: run.status == "running") as view:
                assert [item.key for item in view.items()] == ["r1"]
                port = server.port
                server.stop()
                server = NatsServer(tmp_path / "nats", port=port).start()  # same store, same port

                async def written() -> bool:
                    try:
                        await runs.put("r2", Run(status="running"))
                        await runs.put("r1", Run(status="succeeded"))
                    except Exception:  # still reconnecting
                        return False
                    return True

                await assert_eventually(written, timeout_s=20, interval_s=0.5)

                async def followed() -> bool:
                    return [item.key for item in view.items()] == ["r2"]

                await assert_eventually(
                    followed, timeout_s=30, interval_s=0.2, message=lambda: str(view.items())
                )
        finally:
            await nc.close()
    finally:
        server.stop()
