"""Atomic writes on shared storage (a local folder, or NFS in Kubernetes).

Every write goes to a temporary name in the destination's own folder, is fsynced, then renamed
into place, and the folder is fsynced so the rename itself survives a crash. A reader sees the
old file or the whole new one, never a part. No file locks: they are unreliable on NFS;
coordination goes through NATS KV.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import hashlib
import os
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO

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


def atomic_write_bytes(path: Path, data: bytes, *, private: bool = False) -> None:
    """Write ``data`` to ``path`` atomically; ``private``: readable by its owner only."""
    with atomic_writer(path, private=private) as handle:
        handle.write(data)


@contextlib.contextmanager
def atomic_writer(path: Path, *, fsync: bool = True, private: bool = False) -> Iterator[IO[bytes]]:
    """Yield a binary file that replaces ``path`` atomically when the block exits cleanly;
    on error the temporary file is removed and ``path`` is untouched. ``fsync=False`` is for
    files inside a folder that is synced as a whole before it is published. ``private``
    creates it with mode 0600 (secrets: never readable by others, not even for a moment)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = temp_sibling(path)
    mode = 0o600 if private else 0o666
    try:
        descriptor = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(descriptor, "wb") as handle:
            yield handle
            handle.flush()
            if fsync:
                os.fsync(handle.fileno())
        temp.replace(path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    if fsync:
        fsync_dir(path.parent)


@contextlib.contextmanager
def _new_file(path: Path) -> Iterator[IO[bytes]]:
    """A file that must not exist yet, removed again if the block fails."""
    handle = path.open("xb")  # raises FileExistsError before we own anything
    try:
        with handle:
            yield handle
    except BaseException:
        path.unlink(missing_ok=True)
        raise


@dataclass(frozen=True, slots=True)
class CopiedFile:
    size_bytes: int
    sha256: str


# Above this size, hashing runs in a helper thread while the main thread writes (both release
# the GIL): copy and hash overlap instead of adding up.
OVERLAP_FROM_BYTES = 4 << 20
_HASH_POOL = ThreadPoolExecutor(
    max_workers=min(8, os.cpu_count() or 1), thread_name_prefix="sha256"
)
"""Shared by every copy in the process (threads start on first use, none before): large files
copied side by side are hashed side by side."""


def copy_and_hash(
    source: IO[bytes],
    destination: Path,
    *,
    max_bytes: int | None = None,
    fsync: bool = True,
    atomic: bool = True,
    chunk_bytes: int = COPY_CHUNK_BYTES,
) -> CopiedFile:
    """Stream ``source`` into ``destination`` atomically, hashing in the same pass.

    With ``max_bytes``, stops as soon as the stream goes over it and raises PermanentError,
    leaving nothing behind. For files inside a staging folder that is published whole (see
    :func:`publish_dir`), ``atomic=False`` writes the name directly (it must not exist yet) and
    ``fsync=False`` leaves durability to one :func:`sync_tree`: far cheaper per file.
    """
    digest = hashlib.sha256()
    size = 0
    pending: Future[None] | None = None
    writer = atomic_writer(destination, fsync=fsync) if atomic else _new_file(destination)
    with writer as out:
        try:
            while chunk := source.read(chunk_bytes):
                size += len(chunk)
                if max_bytes is not None and size > max_bytes:
                    raise PermanentError(f"{destination.name}: more than {max_bytes} bytes")
                if pending is not None:
                    pending.result()
                    pending = None
                if size > OVERLAP_FROM_BYTES:
                    pending = _HASH_POOL.submit(digest.update, chunk)
                else:
                    digest.update(chunk)
                out.write(chunk)
        finally:
            if pending is not None:
                pending.result()
    return CopiedFile(size, digest.hexdigest())


LARGE_CHUNK_BYTES = 8 << 20
"""Read size for a local file past ``OVERLAP_FROM_BYTES``: fewer system calls per GB."""


def copy_file_and_hash(
    source: Path, destination: Path, *, max_bytes: int | None = None
) -> CopiedFile:
    """:func:`copy_file_keeping_small` without the bytes."""
    return copy_file_keeping_small(source, destination, max_bytes=max_bytes)[0]


def copy_file_keeping_small(
    source: Path, destination: Path, *, max_bytes: int | None = None
) -> tuple[CopiedFile, bytes | None]:
    """Copy a local file into ``destination`` (which must not exist yet) and hash the bytes
    written, in one pass; for files inside a staging folder that is synced and published
    whole (no fsync, no rename here).

    The source is opened with ``O_NOFOLLOW``: a file swapped for a link after it was checked
    is refused, not followed. A small file is one read, one hash, one write, with no Python
    file objects in between (this runs once per file of a dataset of millions). A large one is
    read into two reused buffers in turn: the helper thread hashes one while this thread
    writes it and reads the next, so memory stays at two chunks whatever the file's size.
    Over ``max_bytes``: PermanentError, and nothing is left behind.

    Also returns a small file's bytes (under ``OVERLAP_FROM_BYTES``, read whole anyway), so a
    check right behind the copy needs no second read; None for a large one.
    """
    src = os.open(source, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        dst = os.open(destination, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
        try:
            copied = _copy_fd(src, dst, destination.name, max_bytes)
        except BaseException:
            os.close(dst)
            destination.unlink(missing_ok=True)
            raise
        os.close(dst)
    finally:
        os.close(src)
    return copied


def _copy_fd(
    src: int, dst: int, name: str, max_bytes: int | None
) -> tuple[CopiedFile, bytes | None]:
    digest = hashlib.sha256()
    size = 0
    hint = os.fstat(src).st_size
    if hint < OVERLAP_FROM_BYTES:
        # One read sized to the file (+1 shows a file that grew since). Anything but exactly
        # its size (a short read, as network and FUSE file systems may give, or a file that
        # grew) goes on reading to the end below. The bytes hashed are the bytes written.
        data = os.read(src, hint + 1)
        size = len(data)
        _check_cap(size, name, max_bytes)
        digest.update(data)
        _write_all(dst, data)
        if size == hint:
            return CopiedFile(size, digest.hexdigest()), data
    buffers = (bytearray(LARGE_CHUNK_BYTES), bytearray(LARGE_CHUNK_BYTES))
    pending: Future[None] | None = None
    turn = 0
    try:
        while read := os.readv(src, [buffers[turn]]):
            size += read
            _check_cap(size, name, max_bytes)
            chunk = memoryview(buffers[turn])[:read]
            if pending is not None:
                pending.result()  # the other buffer is hashed: the next read may fill it
            pending = _HASH_POOL.submit(digest.update, chunk)
            _write_all(dst, chunk)
            _start_writeback(dst, size - read, read)
            turn ^= 1
    finally:
        if pending is not None:
            pending.result()
    return CopiedFile(size, digest.hexdigest()), None


def _start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing ``length`` bytes at ``offset`` to the disk now, without
    waiting (``sync_file_range(SYNC_FILE_RANGE_WRITE)``): a large file then flows to the disk
    while it is being copied, and the one syncfs before publishing finds little left to do,
    instead of the disk idling during the copy and the whole file waiting at the end. Durability
    still comes from that syncfs; where the call is missing, nothing happens here."""
    if _libc_sync_file_range is not None:
        _libc_sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


def _check_cap(size: int, name: str, max_bytes: int | None) -> None:
    if max_bytes is not None and size > max_bytes:
        raise PermanentError(f"{name}: more than {max_bytes} bytes")


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


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
    sync_tree(staging)
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


def sync_tree(path: Path) -> None:
    """Make everything written under ``path`` durable: one syncfs(2) of its filesystem (on
    Linux: one call for a million files, where an fsync each would cost a round trip each),
    or an fsync of every file where syncfs is missing (no libc symbol, or ENOSYS); then an
    fsync of every folder so new names are durable too. A syncfs that fails otherwise (EIO)
    raises: the data may not be on the disk."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        synced = False
        if _libc_syncfs is not None:
            if _libc_syncfs(fd) == 0:
                synced = True
            elif (code := ctypes.get_errno()) != errno.ENOSYS:
                raise OSError(code, f"syncfs failed: {os.strerror(code)}", str(path))
    finally:
        os.close(fd)
    for folder, _, files in os.walk(path):
        if not synced:
            for name in files:
                _fsync_file(Path(folder) / name)
        fsync_dir(Path(folder))


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _load_syncfs() -> Callable[[int], int] | None:
    if sys.platform != "linux":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None
    syncfs: Callable[[int], int] = libc.syncfs
    return syncfs


_libc_syncfs = _load_syncfs()


def _load_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    if sys.platform != "linux":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None
    function = libc.sync_file_range
    function.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    function.restype = ctypes.c_int
    sync_file_range: Callable[[int, int, int, int], int] = function
    return sync_file_range


_SYNC_FILE_RANGE_WRITE = 2
_libc_sync_file_range = _load_sync_file_range()


def _newest_mtime(path: Path) -> float:
    newest = path.lstat().st_mtime
    if path.is_dir() and not path.is_symlink():
        for folder, dirs, files in os.walk(path):
            for entry in (*dirs, *files):
                with contextlib.suppress(OSError):
                    newest = max(newest, (Path(folder) / entry).lstat().st_mtime)
    return newest


def clean_temporaries(root: Path, *, older_than_s: float = 0.0) -> list[Path]:
    """Remove leftovers of interrupted atomic writes under ``root``; returns what went.

    ``older_than_s`` spares temporaries touched more recently than that: another replica may
    be writing them right now.
    """
    removed: list[Path] = []
    if not root.exists():
        return removed
    horizon = time.time() - older_than_s
    candidates = sorted(root.rglob(f"{TEMP_MARKER}*"), key=lambda p: len(p.parts))
    for path in candidates:
        if any(parent in removed for parent in path.parents):
            continue
        try:
            if older_than_s and _newest_mtime(path) > horizon:
                continue
        except OSError:
            continue
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
