"""Connecting to NATS: one function, every authentication option the server supports."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import nats
import structlog
from nats.aio.client import Client as NatsClient
from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from torchrelay.shared.errors import ConfigError

log = structlog.get_logger("torchrelay.nats")


class NatsSettings(BaseModel):
    """How to reach NATS. Environment: ``TORCHRELAY_NATS_<FIELD>`` (e.g. TORCHRELAY_NATS_URL)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    url: str = Field(
        default="nats://127.0.0.1:4222",
        description="Comma-separated server URLs; the client fails over between them.",
    )
    user: str | None = Field(default=None, description="User name for user/password auth.")
    password: SecretStr | None = None
    token: SecretStr | None = Field(default=None, description="Token auth.")
    nkey_seed_file: Path | None = Field(default=None, description="NKey seed file (nkey auth).")
    creds_file: Path | None = Field(default=None, description="Decentralised JWT credentials.")
    tls_ca_file: Path | None = Field(default=None, description="CA bundle to verify the server.")
    tls_cert_file: Path | None = Field(default=None, description="Client certificate (mTLS).")
    tls_key_file: Path | None = Field(default=None, description="Client key (mTLS).")
    tls_hostname: str | None = Field(default=None, description="Server name to verify in TLS.")
    connect_timeout_s: float = Field(default=5.0, gt=0, description="Per-attempt connect timeout.")
    startup_wait_s: float = Field(
        default=30.0,
        gt=0,
        description="How long a starting service keeps trying to reach NATS before it gives up "
        "with an error (it then exits and its supervisor restarts it).",
    )
    max_reconnect_attempts: int = Field(
        default=-1, description="-1 reconnects forever: a service outlives a NATS restart."
    )
    name: str | None = Field(default=None, description="Client name shown by the server.")
    inbox_prefix: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9_-]+$",
        description="Subject prefix of this client's reply inboxes (default _INBOX). With "
        "per-user permissions each user gets its own (_INBOX_<user>), so that no user can "
        "read another's replies.",
    )

    @model_validator(mode="after")
    def _one_auth_method(self) -> NatsSettings:
        methods = [
            name
            for name, present in (
                ("user/password", self.user is not None or self.password is not None),
                ("token", self.token is not None),
                ("nkey_seed_file", self.nkey_seed_file is not None),
                ("creds_file", self.creds_file is not None),
            )
            if present
        ]
        if len(methods) > 1:
            raise ValueError(f"choose one NATS auth method, got {', '.join(methods)}")
        if (self.user is None) != (self.password is None):
            raise ValueError("NATS user and password go together")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file go together")
        return self

    def tls_context(self) -> ssl.SSLContext | None:
        if self.tls_ca_file is None and self.tls_cert_file is None:
            return None
        context = ssl.create_default_context(
            cafile=str(self.tls_ca_file) if self.tls_ca_file else None
        )
        if self.tls_cert_file is not None and self.tls_key_file is not None:
            context.load_cert_chain(str(self.tls_cert_file), str(self.tls_key_file))
        return context


async def connect(settings: NatsSettings, **callbacks: Any) -> NatsClient:
    """Open a NATS connection; raises ConfigError naming the URL when no server answers."""
    options: dict[str, Any] = {
        "servers": [url.strip() for url in settings.url.split(",") if url.strip()],
        "connect_timeout": settings.connect_timeout_s,
        "max_reconnect_attempts": settings.max_reconnect_attempts,
        "allow_reconnect": True,
        **callbacks,
    }
    if settings.name:
        options["name"] = settings.name
    if settings.inbox_prefix:
        options["inbox_prefix"] = settings.inbox_prefix
    if settings.user is not None and settings.password is not None:
        options["user"] = settings.user
        options["password"] = settings.password.get_secret_value()
    if settings.token is not None:
        options["token"] = settings.token.get_secret_value()
    if settings.nkey_seed_file is not None:
        options["nkeys_seed"] = str(settings.nkey_seed_file)
    if settings.creds_file is not None:
        options["user_credentials"] = str(settings.creds_file)
    tls = settings.tls_context()
    if tls is not None:
        options["tls"] = tls
        if settings.tls_hostname:
            options["tls_hostname"] = settings.tls_hostname
    errors: list[Exception] = []

    async def on_error(error: Exception) -> None:
        errors.append(error)
        log.warning("nats.connection_error", error=repr(error))

    options.setdefault("error_cb", on_error)
    try:
        async with asyncio.timeout(settings.startup_wait_s):
            return await nats.connect(**options)
    except (OSError, nats.errors.Error, TimeoutError) as exc:
        # What the server said (an authorization violation) beats the reset that follows it.
        said = [error for error in errors if not isinstance(error, OSError)]
        last = (said or errors or [exc])[-1]
        raise ConfigError(
            f"cannot reach NATS at {redact(settings.url)} within {settings.startup_wait_s}s "
            f"(last error: {type(last).__name__}: {last}); check that nats-server runs there, "
            "TORCHRELAY_NATS_URL and the NATS credentials"
        ) from exc


def redact(url: str) -> str:
    """``url`` with any password replaced, for logs and messages."""
    return ",".join(_redact_one(part) for part in url.split(","))


def _redact_one(url: str) -> str:
    parsed = urlsplit(url.strip())
    if parsed.password is None:
        return url
    host = parsed.netloc.rsplit("@", 1)[1]
    return urlunsplit(parsed._replace(netloc=f"{parsed.username}:***@{host}"))


def with_credentials(url: str, user: str, password: str) -> str:
    """A NATS URL carrying ``user`` and ``password`` (for shells and other systems)."""
    parsed = urlsplit(url)
    host = parsed.netloc.rsplit("@", 1)[-1]
    netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@{host}"
    return urlunsplit(parsed._replace(netloc=netloc))
