"""Atomic writes on shared storage (a local folder, or NFS in Kubernetes).

Every write goes to a temporary name in the destination's own folder, is fsynced, then renamed
into place, and the folder is fsynced so the rename itself survives a crash. A reader sees the
old file or the whole new one, never a part. No file locks: they are unreliable on NFS;
coordination goes through NATS KV.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from torchrelay.shared.errors import PermanentError, UnsafePath

TEMP_MARKER = ".tmp-"
COPY_CHUNK_BYTES = 1 << 20


def temp_sibling(path: Path) -> Path:
    """A unique temporary name beside ``path`` (same folder, hence same filesystem)."""
    return path.with_name(f"{TEMP_MARKER}{path.name}.{uuid.uuid4().hex[:12]}")


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_writer(path) as handle:
        handle.write(data)


@contextlib.contextmanager
def atomic_writer(path: Path) -> Iterator[BinaryIO]:
    """Yield a binary file that replaces ``path`` atomically when the block exits cleanly;
    on error the temporary file is removed and ``path`` is untouched."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = temp_sibling(path)
    try:
        with temp.open("xb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        temp.replace(path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


@dataclass(frozen=True, slots=True)
class CopiedFile:
    size_bytes: int
    sha256: str


def copy_and_hash(
    source: BinaryIO, destination: Path, *, max_bytes: int | None = None
) -> CopiedFile:
    """Stream ``source`` into ``destination`` atomically, hashing in the same pass.

    With ``max_bytes``, stops as soon as the stream goes over it and raises PermanentError, leaving
    nothing behind.
    """
    digest = hashlib.sha256()
    size = 0
    with atomic_writer(destination) as out:
        while chunk := source.read(COPY_CHUNK_BYTES):
            size += len(chunk)
            if max_bytes is not None and size > max_bytes:
                raise PermanentError(f"{destination.name}: more than {max_bytes} bytes")
            digest.update(chunk)
            out.write(chunk)
    return CopiedFile(size, digest.hexdigest())


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(COPY_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def publish_dir(staging: Path, final: Path) -> bool:
    """Move a fully written folder into place atomically.

    Returns False (and removes ``staging``) when ``final`` already exists: with content-derived
    names that means another writer published the same content first.
    """
    for file in staging.rglob("*"):
        if file.is_file():
            with file.open("rb") as handle:
                os.fsync(handle.fileno())
    final.parent.mkdir(parents=True, exist_ok=True)
    try:
        # rename(2) onto an existing non-empty folder fails, so exactly one writer wins.
        staging.rename(final)
    except OSError:
        if final.is_dir():
            shutil.rmtree(staging, ignore_errors=True)
            return False
        raise
    fsync_dir(final.parent)
    return True


def clean_temporaries(root: Path) -> list[Path]:
    """Remove leftovers of interrupted atomic writes under ``root``; returns what went."""
    removed: list[Path] = []
    if not root.exists():
        return removed
    for path in sorted(root.rglob(f"{TEMP_MARKER}*"), key=lambda p: len(p.parts), reverse=True):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def resolve_within(root: Path, relative: str | Path) -> Path:
    """Resolve ``relative`` under ``root``, refusing anything that lands outside it.

    Absolute paths, ``..`` segments and symlinks that point out are all refused with
    :class:`UnsafePath`; the check is on the fully resolved path, so it holds after
    normalisation.
    """
    root_resolved = root.resolve()
    candidate = Path(relative)
    if candidate.is_absolute():
        raise UnsafePath(f"{relative!s}: absolute paths are not allowed under {root}")
    resolved = (root_resolved / candidate).resolve()
    if not resolved.is_relative_to(root_resolved):
        raise UnsafePath(f"{relative!s} resolves to {resolved}, outside {root_resolved}")
    return resolved
