"""The NATS connection takes the server's auth methods, and says clearly when they are wrong."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import SecretStr

from torchrelay.shared.bus.connection import NatsSettings, connect
from torchrelay.shared.bus.server import NatsServer
from torchrelay.shared.errors import ConfigError

pytestmark = pytest.mark.timeout(60)


async def test_token_auth(tmp_path: Path) -> None:
    with NatsServer(tmp_path, extra_args=["--auth", "s3cret-token"]) as server:
        nc = await connect(NatsSettings(url=server.url, token=SecretStr("s3cret-token")))
        assert nc.is_connected
        await nc.close()
        with pytest.raises(ConfigError, match=r"(?i)authorization violation"):
            await connect(
                NatsSettings(url=server.url, token=SecretStr("wrong"), startup_wait_s=1.0)
            )


async def test_user_and_password_auth(tmp_path: Path) -> None:
    with NatsServer(tmp_path, extra_args=["--user", "relay", "--pass", "pw-123"]) as server:
        nc = await connect(NatsSettings(url=server.url, user="relay", password=SecretStr("pw-123")))
        assert nc.is_connected
        await nc.close()
        with pytest.raises(ConfigError, match=r"(?i)authorization violation"):
            await connect(
                NatsSettings(
                    url=server.url, user="relay", password=SecretStr("nope"), startup_wait_s=1.0
                )
            )
