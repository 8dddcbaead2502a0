"""Settings every service shares; each service subclasses :class:`ServiceSettings`.

Read once at start from ``TORCHRELAY_*`` environment variables (a nested group's fields are
``TORCHRELAY_<GROUP>_<FIELD>``, e.g. ``TORCHRELAY_NATS_URL``, ``TORCHRELAY_HTTP_PORT``) and
command-line flags, which win. Frozen afterwards and passed down explicitly.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from torchrelay.shared.bus.connection import NatsSettings
from torchrelay.shared.bus.jetstream import StreamSettings


class Group(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class HttpSettings(Group):
    """The service's own HTTP side server (health, readiness, metrics, its API)."""

    host: str = Field(
        default="127.0.0.1",
        description="Bind address. Loopback unless you mean to expose it (0.0.0.0 in a pod).",
    )
    port: int = Field(default=0, ge=0, le=65535, description="0 picks a free port (logged).")
    bearer_token: SecretStr | None = Field(
        default=None,
        description="When set, every route but /healthz and /readyz needs 'Bearer <token>'.",
    )


class LogSettings(Group):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["json", "console"] = Field(
        default="json", description="json for machines (the default), console for people."
    )


class ShutdownSettings(Group):
    """SIGTERM handling. grace_s < deadline_s < the pod's terminationGracePeriodSeconds."""

    grace_s: float = Field(
        default=20.0, ge=0, description="Seconds in-flight handlers get to finish after SIGTERM."
    )
    deadline_s: float = Field(
        default=25.0, gt=0, description="Hard limit for the whole shutdown, drain included."
    )

    @model_validator(mode="after")
    def _grace_below_deadline(self) -> ShutdownSettings:
        if self.grace_s >= self.deadline_s:
            raise ValueError(
                f"grace_s ({self.grace_s}) must be below deadline_s ({self.deadline_s})"
            )
        return self


def _default_instance() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class ServiceSettings(BaseSettings):
    """Settings common to all services."""

    model_config = SettingsConfigDict(
        env_prefix="TORCHRELAY_",
        env_nested_delimiter="_",
        env_nested_max_split=1,
        frozen=True,
        extra="forbid",
        case_sensitive=False,
    )

    nats: NatsSettings = NatsSettings()
    stream: StreamSettings = StreamSettings()
    http: HttpSettings = HttpSettings()
    log: LogSettings = LogSettings()
    shutdown: ShutdownSettings = ShutdownSettings()
    storage_root: Path = Field(
        default=Path(".torchrelay/storage"),
        description="Root of the shared storage (the NFS mount in Kubernetes).",
    )
    instance: str = Field(
        default_factory=_default_instance,
        description="This replica's name in logs and leases (the pod name in Kubernetes).",
    )
    retention_s: float = Field(
        default=7 * 24 * 3600.0,
        ge=60,
        description="Seconds a finished record (run, deployment, pipeline) is kept after it "
        "finished; the NATS server then removes it (a per-message TTL). Default 7 days: long "
        "enough to inspect a failure after a weekend, short enough that buckets stay small.",
    )
