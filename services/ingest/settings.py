"""Settings of the ingest service: ``TORCHRELAY_INGEST_<FIELD>`` plus the common ones."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, IPvAnyNetwork, field_validator
from pydantic_settings import NoDecode

from torchrelay.services.ingest.domain import Limits
from torchrelay.services.ingest.staging import DEFAULT_WORKERS
from torchrelay.shared.runtime.settings import Group, HttpSettings, ServiceSettings

DEFAULT_PORT = 8081


class IngestOptions(Group):
    """What ingest may read and how much it may write."""

    allowed_roots: Annotated[list[Path], NoDecode] = Field(
        default_factory=list,
        description="Folders local path sources must lie under (comma-separated). Empty: local "
        "paths are refused.",
    )
    url_allowed_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["*"],
        description="Host globs URL sources (and their redirects) may name.",
    )
    url_allowed_networks: Annotated[list[IPvAnyNetwork], NoDecode] = Field(
        default_factory=list,
        description="Loopback/private/link-local networks URL sources may reach anyway "
        "(refused by default: no fetching from inside the cluster).",
    )
    url_timeout_s: float = Field(default=60.0, gt=0, description="Idle read timeout, seconds.")
    url_max_redirects: int = Field(default=5, ge=0)
    max_bytes: int = Field(default=Limits().max_bytes, gt=0, description="Per dataset, bytes.")
    max_files: int = Field(default=Limits().max_files, gt=0, description="Per dataset.")
    max_file_bytes: int = Field(default=Limits().max_file_bytes, gt=0, description="Per file.")
    max_compression_ratio: float = Field(default=Limits().max_compression_ratio, gt=1)
    max_workspace_bytes: int = Field(
        default=64 << 20,
        gt=0,
        description="Per workspace (a user's training code folder), bytes unpacked.",
    )
    max_workspace_files: int = Field(default=10_000, gt=0, description="Per workspace.")
    workers: int = Field(
        default=DEFAULT_WORKERS,
        ge=1,
        le=256,
        description="Threads one staging copies, hashes and validates files with: they overlap "
        "file creation in the kernel (and NFS round trips) with hashing and checks.",
    )
    temp_stale_s: float = Field(
        default=900.0,
        gt=0,
        description="Staging leftovers untouched this long are removed (a crashed replica's).",
    )

    @field_validator("allowed_roots", "url_allowed_hosts", "url_allowed_networks", mode="before")
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    def limits(self) -> Limits:
        return Limits(
            max_bytes=self.max_bytes,
            max_files=self.max_files,
            max_file_bytes=self.max_file_bytes,
            max_compression_ratio=self.max_compression_ratio,
        )

    def workspace_limits(self) -> Limits:
        """A workspace has no cap per file of its own: one file may fill it."""
        return Limits(
            of="workspace",
            max_bytes=self.max_workspace_bytes,
            max_files=self.max_workspace_files,
            max_file_bytes=self.max_workspace_bytes,
            max_compression_ratio=self.max_compression_ratio,
        )


class IngestSettings(ServiceSettings):
    http: HttpSettings = HttpSettings(port=DEFAULT_PORT)
    ingest: IngestOptions = IngestOptions()
