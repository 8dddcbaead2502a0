"""Staging one dataset version: fill a temporary folder, validate, write the manifest, sync,
and rename it into place. The version folder appears whole or not at all, and the same content
staged twice (or by two replicas at once) is one version.

The per-file work (copy, hash, validate) runs on one thread pool per staging; what is once per
dataset stays once: one manifest write, one syncfs of the file system, one rename. Nothing is
written per file to the bus or the KV store."""

from __future__ import annotations

import asyncio
import functools
import shutil
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath

from pydantic import JsonValue

from torchrelay.services.ingest.domain import (
    DATA_DIR,
    MANIFEST_NAME,
    Budget,
    DatasetFormat,
    Limits,
    Manifest,
    ManifestFile,
    RejectCode,
    Rejected,
    detect_format,
    expected_format,
    version_id,
)
from torchrelay.services.ingest.formats import check_file, summarise, validate
from torchrelay.services.ingest.parallel import PoolMap
from torchrelay.services.ingest.sources import Collected, FileCheck
from torchrelay.shared.storage import (
    Layout,
    publish_dir,
    sha256_file,
    temp_sibling,
)
from torchrelay.shared.storage.layout import relative_dataset

DEFAULT_WORKERS = 4
"""Threads per staging: enough to overlap file creation in the kernel with hashing and
validation in Python (and NFS round trips with each other); see ``TORCHRELAY_INGEST_WORKERS``."""

Fill = Callable[[Collected, Budget], Awaitable[None]]
"""Brings a source's files into the staging folder (see ``sources`` and ``fetch``)."""


@dataclass(frozen=True, slots=True)
class StageRequest:
    request_id: str
    name: str
    source: str
    format: str = "auto"


@dataclass(frozen=True, slots=True)
class StagedVersion:
    manifest: Manifest
    path: str
    """Folder of the version, relative to the storage root."""
    created: bool
    """False when this exact content was already staged (nothing was written)."""
    seconds: float


class Stager:
    """Owns ``<root>/datasets/``: the only writer there."""

    def __init__(
        self, storage_root: Path, limits: Limits, *, workers: int = DEFAULT_WORKERS
    ) -> None:
        self.root = storage_root
        self.layout = Layout(storage_root)
        self.datasets = self.layout.datasets()
        self.limits = limits
        self.workers = workers

    def version_dir(self, name: str, version: str) -> Path:
        return self.layout.dataset(name, version)

    def relative_dir(self, name: str, version: str) -> str:
        return relative_dataset(name, version)

    def manifest_sha256(self, name: str, version: str) -> str:
        return sha256_file(self.layout.manifest(name, version))

    def read_manifest(self, name: str, version: str) -> Manifest | None:
        path = self.layout.manifest(name, version)
        try:
            return Manifest.model_validate_json(path.read_bytes())
        except FileNotFoundError:
            return None

    @staticmethod
    def _manifest(
        request: StageRequest,
        collected: Collected,
        paths: list[PurePosixPath],
        fmt: DatasetFormat,
        summary: dict[str, JsonValue],
    ) -> Manifest:
        files = collected.files
        return Manifest(
            name=request.name,
            version=version_id((str(p), f.sha256) for p, f in files.items()),
            format=fmt,
            files=[
                ManifestFile(
                    path=f"{DATA_DIR}/{p}", size_bytes=files[p].size_bytes, sha256=files[p].sha256
                )
                for p in paths
            ],
            size_bytes=sum(f.size_bytes for f in files.values()),
            schema_summary=summary,
            source=request.source,
            created=datetime.now(UTC),
            request_id=request.request_id,
        )

    async def stage(self, request: StageRequest, fill: Fill) -> StagedVersion:
        started = time.perf_counter()
        staging = temp_sibling(self.datasets / request.name / "version")
        data = staging / DATA_DIR
        data.mkdir(parents=True)
        pool = ThreadPoolExecutor(self.workers, thread_name_prefix=f"stage-{request.name}")
        try:
            run = PoolMap(pool, self.workers)
            early: list[DatasetFormat] = []

            def plan_checks(names: Sequence[PurePosixPath]) -> FileCheck | None:
                try:
                    fmt = expected_format(request.format, detect_format(names))
                except Rejected:
                    return None  # reported below, once every file is in
                early.append(fmt)
                return functools.partial(check_file, fmt, data)

            collected = Collected(data, map=run, plan_checks=plan_checks)
            await fill(collected, Budget(self.limits))
            paths = sorted(collected.files)
            fmt = expected_format(request.format, detect_format(paths))
            if early == [fmt] and collected.checked.keys() == collected.files.keys():
                summary = summarise(fmt, paths, [collected.checked[p] for p in paths])
            else:
                summary = await asyncio.to_thread(validate, fmt, data, paths, run)
            manifest = self._manifest(request, collected, paths, fmt, summary)
            # No fsync of its own: publish_dir makes the whole folder durable before the rename.
            (staging / MANIFEST_NAME).write_bytes(manifest.model_dump_json(indent=2).encode())
            final = self.version_dir(request.name, manifest.version)
            created = await asyncio.to_thread(publish_dir, staging, final)
        except BaseException:
            # Every copy the pool started has ended before the folder goes: none writes into
            # it afterwards (a cancelled fill may still be walking; see clean_temporaries).
            # Waited for off the event loop (copies of large files take a while), and to the
            # end even when this task is cancelled again meanwhile.
            await asyncio.shield(asyncio.to_thread(_discard, pool, staging))
            raise
        finally:
            pool.shutdown(wait=False)
        version = manifest.version
        if not created:
            existing = self.read_manifest(request.name, version)
            if existing is None:
                raise Rejected(
                    RejectCode.CORRUPT,
                    f"{final} exists without a manifest; remove it and stage again",
                )
            manifest = existing
        return StagedVersion(
            manifest,
            self.relative_dir(request.name, version),
            created,
            time.perf_counter() - started,
        )


def _discard(pool: ThreadPoolExecutor, staging: Path) -> None:
    """Stop ``pool`` (what has not started never will; what has, ends) and remove ``staging``."""
    pool.shutdown(wait=True, cancel_futures=True)
    shutil.rmtree(staging, ignore_errors=True)
