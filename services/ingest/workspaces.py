"""Staging a workspace: a user's training code folder, sent as a tar archive and unpacked by
ingest's own archive code (regular files and folders only, names that cannot escape, caps on
files, bytes and compression ratio) into ``<root>/workspaces/<id>/code/`` beside a
``manifest.json``. Like a dataset version, the folder is written aside, synced and renamed into
place whole, and its id derives from the content: the same files are one id and one folder,
whoever stages them and however often."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath

from torchrelay.services.ingest.domain import (
    Budget,
    Limits,
    ManifestFile,
    RejectCode,
    Rejected,
    WorkspaceManifest,
    packed_limits,
    version_id,
)
from torchrelay.services.ingest.sources import (
    Collected,
    is_archive,
    stream_to_file,
    unpack_if_archive,
)
from torchrelay.shared.storage import Layout, atomic_write_bytes, publish_dir, temp_sibling
from torchrelay.shared.storage.layout import CODE_FOLDER, MANIFEST_FILE, relative_workspace


@dataclass(frozen=True, slots=True)
class StagedWorkspace:
    manifest: WorkspaceManifest
    path: str
    """``workspaces/<id>``: the folder, relative to the storage root."""
    created: bool
    """False when these exact files were already staged (nothing was written)."""


class Workspaces:
    """Owns ``<root>/workspaces/``: the only writer there."""

    def __init__(self, storage_root: Path, limits: Limits) -> None:
        self.layout = Layout(storage_root)
        self.root = self.layout.workspaces()
        self.limits = limits

    def read_manifest(self, workspace_id: str) -> WorkspaceManifest | None:
        try:
            data = self.layout.workspace_manifest(workspace_id).read_bytes()
        except FileNotFoundError:
            return None
        return WorkspaceManifest.model_validate_json(data)

    async def stage(self, chunks: AsyncIterator[bytes], archive: PurePosixPath) -> StagedWorkspace:
        """Stream an archive (named ``archive``) in, unpack it and publish the workspace;
        :class:`Rejected` (and nothing left on storage) when it is not one we may stage."""
        staging = temp_sibling(self.root / "workspace")
        code = staging / CODE_FOLDER
        code.mkdir(parents=True)
        try:
            collected = Collected(code)
            await stream_to_file(chunks, archive, collected, Budget(packed_limits(self.limits)))
            return await asyncio.to_thread(self._unpack_and_publish, staging, collected, archive)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

    def _unpack_and_publish(
        self, staging: Path, collected: Collected, archive: PurePosixPath
    ) -> StagedWorkspace:
        if collected.files[archive].size_bytes == 0:
            raise Rejected(
                RejectCode.BAD_REQUEST,
                "the body is empty: send the workspace folder as a tar archive (plain or gzip)",
            )
        if not is_archive(collected.root / archive):
            raise Rejected(
                RejectCode.BAD_REQUEST,
                f"the body is not a {'zip' if archive.suffix == '.zip' else 'tar'} archive (or "
                "an empty one): send the workspace folder as a tar archive (plain or gzip)",
            )
        unpack_if_archive(archive, collected, Budget(self.limits))
        if not collected.files:
            raise Rejected(
                RejectCode.BAD_REQUEST, "the archive holds no files: a workspace needs at least one"
            )
        files = collected.files
        workspace_id = version_id((str(path), copied.sha256) for path, copied in files.items())
        manifest = WorkspaceManifest(
            workspace=workspace_id,
            files=[
                ManifestFile(
                    path=f"{CODE_FOLDER}/{path}",
                    size_bytes=files[path].size_bytes,
                    sha256=files[path].sha256,
                )
                for path in sorted(files)
            ],
            size_bytes=sum(copied.size_bytes for copied in files.values()),
            created=datetime.now(UTC),
        )
        atomic_write_bytes(staging / MANIFEST_FILE, manifest.model_dump_json(indent=2).encode())
        final = self.layout.workspace(workspace_id)
        created = publish_dir(staging, final)
        if not created:
            existing = self.read_manifest(workspace_id)
            if existing is None:
                raise Rejected(
                    RejectCode.CORRUPT,
                    f"{final} exists without a manifest; remove it and stage again",
                )
            manifest = existing
        return StagedWorkspace(manifest, relative_workspace(workspace_id), created)
