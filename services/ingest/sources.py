"""Bringing a source's files into a staging folder: local paths, URLs, uploads, archives and
the built-in sample. Every file is copied and hashed in one pass and checked against the
budget as it is written; nothing here follows a link out of where it is allowed to read."""

from __future__ import annotations

import hashlib
import io
import os
import stat
import tarfile
import zipfile
import zlib
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO

from pydantic import JsonValue

from torchrelay.services.ingest.domain import (
    Budget,
    MemberKind,
    RejectCode,
    Rejected,
    archive_kind,
    member_path,
)
from torchrelay.services.ingest.parallel import Mapper, serial_map
from torchrelay.shared.errors import PermanentError
from torchrelay.shared.storage import CopiedFile, copy_and_hash, copy_file_keeping_small

FileCheck = Callable[[PurePosixPath, bytes | None], JsonValue]
"""Checks one staged file (its bytes when the copy holds them whole): its summary part."""
PlanChecks = Callable[[Sequence[PurePosixPath]], FileCheck | None]


@dataclass
class Collected:
    """The files written into a staging folder, with their size and sha256."""

    root: Path
    files: dict[PurePosixPath, CopiedFile] = field(default_factory=dict)
    map: Mapper = serial_map
    """Runs the per-file work of this staging (the staging's thread pool)."""
    plan_checks: PlanChecks | None = None
    """Given every file a local source is about to bring, the check to run on each right
    after its copy (None: validate later, once all files are in)."""
    checked: dict[PurePosixPath, JsonValue] = field(default_factory=dict)
    """What those early checks returned, by file."""

    def write(
        self, relative: PurePosixPath, source: IO[bytes], budget: Budget, declared: int
    ) -> None:
        """Copy one file in, hashing as it goes; actual bytes are checked, not just headers."""
        if relative in self.files:
            raise Rejected(RejectCode.UNSAFE_ARCHIVE, f"{relative} appears twice in the source")
        target = self.root / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        room = budget.limits.max_bytes - budget.bytes + declared
        cap = min(budget.limits.max_file_bytes, room)
        try:
            # The staging folder is synced and renamed whole: no per-file rename or fsync.
            copied = copy_and_hash(source, target, max_bytes=cap, fsync=False, atomic=False)
        except PermanentError as exc:
            raise Rejected(
                RejectCode.TOO_LARGE, f"{relative} goes over the size caps ({cap} bytes left)"
            ) from exc
        budget.add_bytes(str(relative), copied.size_bytes - declared)
        self.files[relative] = copied

    def remove(self, relative: PurePosixPath) -> None:
        (self.root / relative).unlink()
        del self.files[relative]


# --- local paths ------------------------------------------------------------------------------


def resolve_source_path(raw: str, allowed_roots: Sequence[Path]) -> Path:
    """The real path of a local source, which must exist and lie under an allowed root."""
    if not allowed_roots:
        raise Rejected(
            RejectCode.UNSAFE_PATH,
            "local path sources are disabled: set TORCHRELAY_INGEST_ALLOWED_ROOTS",
        )
    path = Path(raw)
    if not path.exists() and not path.is_symlink():
        raise Rejected(RejectCode.MISSING_PATH, f"{raw} does not exist")
    real = path.resolve()
    if not real.exists():
        raise Rejected(RejectCode.MISSING_PATH, f"{raw} is a link to {real}, which does not exist")
    roots = [root.resolve() for root in allowed_roots]
    if not any(real.is_relative_to(root) for root in roots):
        raise Rejected(
            RejectCode.UNSAFE_PATH,
            f"{raw} resolves to {real}, outside the allowed roots "
            f"({', '.join(str(r) for r in roots)})",
        )
    return real


@dataclass(frozen=True, slots=True)
class LocalFile:
    """A regular file of a local source, admitted by the budget, waiting to be copied."""

    relative: PurePosixPath
    path: Path
    declared: int


def copy_local(source: Path, collected: Collected, budget: Budget) -> None:
    """Copy a file (unpacking it if it is an archive) or a folder tree into ``collected``.

    A folder is walked and every file admitted by the budget first (too many files or bytes
    are refused before anything is copied), then the files are copied and hashed on the
    staging's pool, and their actual sizes accounted in order."""
    if source.is_file():
        if archive_kind(source.name):
            extract_archive(source, collected, Budget(budget.limits, source.stat().st_size))
            return
        relative = PurePosixPath(source.name)
        size = source.stat().st_size
        budget.admit(str(relative), "file", size)
        _copy_files([LocalFile(relative, source, size)], collected, budget)
        return
    if not source.is_dir():
        raise Rejected(RejectCode.UNSAFE_PATH, f"{source} is neither a file nor a folder")
    _copy_files(list(_walk(source, budget)), collected, budget)


def _walk(source: Path, budget: Budget) -> Iterator[LocalFile]:
    """Every regular file under ``source``, by name within each folder, admitted by the
    budget; links and special files are refused. One ``lstat`` per file (``scandir`` tells
    links and folders apart without one)."""
    stack: list[tuple[Path, str]] = [(source, "")]
    while stack:
        folder, prefix = stack.pop()
        with os.scandir(folder) as listing:
            entries = sorted(listing, key=lambda entry: entry.name)
        folders: list[tuple[Path, str]] = []
        for entry in entries:
            path = Path(entry.path)
            if entry.is_symlink():
                _refuse_link(path, source)
            if entry.is_dir(follow_symlinks=False):
                folders.append((path, f"{prefix}{entry.name}/"))
                continue
            if not entry.is_file(follow_symlinks=False):
                raise Rejected(RejectCode.UNSAFE_PATH, f"{path} is not a regular file")
            relative = PurePosixPath(prefix + entry.name)
            size = entry.stat(follow_symlinks=False).st_size
            budget.admit(str(relative), "file", size)
            yield LocalFile(relative, path, size)
        stack.extend(reversed(folders))


def _refuse_link(path: Path, source: Path) -> None:
    target = path.resolve()
    inside = "inside" if target.is_relative_to(source) else "outside"
    raise Rejected(
        RejectCode.UNSAFE_PATH,
        f"{path} is a symbolic link (to {target}, {inside} the source); links are not followed",
    )


def _copy_files(plan: list[LocalFile], collected: Collected, budget: Budget) -> None:
    """Copy and hash admitted files on the staging's pool. Folders are made once, here, before
    the pool starts. A file that grew since it was admitted may take the room the budget has
    left, no more; actual sizes are then accounted in order, as if copied one by one."""
    for folder in sorted({(collected.root / f.relative).parent for f in plan}):
        folder.mkdir(parents=True, exist_ok=True)
    for item in plan:
        if item.relative in collected.files:
            raise Rejected(
                RejectCode.UNSAFE_ARCHIVE, f"{item.relative} appears twice in the source"
            )
    room = budget.limits.max_bytes - budget.bytes
    file_cap = budget.limits.max_file_bytes
    # The whole content is known now: validation can run right behind each copy, on the same
    # worker, while the kernel creates the next files for the others.
    check = None
    if collected.plan_checks is not None and not collected.files:
        check = collected.plan_checks([item.relative for item in plan])

    def copy(item: LocalFile) -> tuple[CopiedFile, JsonValue]:
        cap = min(file_cap, item.declared + room)
        try:
            copied, data = copy_file_keeping_small(
                item.path, collected.root / item.relative, max_bytes=cap
            )
        except PermanentError as exc:
            raise Rejected(
                RejectCode.TOO_LARGE,
                f"{item.relative} goes over the size caps ({cap} bytes left)",
            ) from exc
        return copied, None if check is None else check(item.relative, data)

    results = collected.map(copy, plan)
    for item, (copied, part) in zip(plan, results, strict=True):
        budget.add_bytes(str(item.relative), copied.size_bytes - item.declared)
        collected.files[item.relative] = copied
        if check is not None:
            collected.checked[item.relative] = part


# --- archives ---------------------------------------------------------------------------------


def extract_archive(archive: Path, collected: Collected, budget: Budget) -> None:
    """Unpack a .tar/.tar.gz/.zip into ``collected`` with our own member checks.

    Python's tarfile filters have known bypasses (CVE-2025-4330, CVE-2025-4517), so nothing
    here calls ``extract``: every member is checked (name, type, size, count, ratio) and its
    bytes are copied by us into a path we built.
    """
    kind = archive_kind(archive.name)
    try:
        if kind == "tar":
            _extract_tar(archive, collected, budget)
        elif kind == "zip":
            _extract_zip(archive, collected, budget)
        else:
            raise Rejected(RejectCode.UNKNOWN_FORMAT, f"{archive.name} is not a known archive")
    except (tarfile.TarError, zipfile.BadZipFile, zlib.error, EOFError) as exc:
        raise Rejected(
            RejectCode.CORRUPT,
            f"{archive.name} is truncated or corrupt ({type(exc).__name__}: {exc})",
        ) from exc


def is_archive(path: Path) -> bool:
    """Whether ``path`` opens as the kind of archive its name says (its first member reads)."""
    kind = archive_kind(path.name)
    try:
        if kind == "tar":
            return tarfile.is_tarfile(path)
        if kind == "zip":
            return zipfile.is_zipfile(path)
    except (OSError, EOFError, zlib.error, tarfile.TarError):
        return False
    return False


def _tar_kind(member: tarfile.TarInfo) -> MemberKind:
    kinds: tuple[tuple[bool, MemberKind], ...] = (
        (member.isreg(), "file"),
        (member.isdir(), "dir"),
        (member.issym(), "symlink"),
        (member.islnk(), "hardlink"),
        (member.ischr() or member.isblk(), "device"),
        (member.isfifo(), "fifo"),
    )
    return next((kind for matches, kind in kinds if matches), "other")


def _extract_tar(archive: Path, collected: Collected, budget: Budget) -> None:
    with tarfile.open(archive, mode="r:*") as tar:
        for member in tar:
            link = member.linkname if member.issym() or member.islnk() else None
            relative = budget.admit(member.name, _tar_kind(member), member.size, link=link)
            if relative is None:
                continue
            handle = tar.extractfile(member)
            if handle is None:
                raise Rejected(RejectCode.CORRUPT, f"{member.name}: cannot read its data")
            with handle:
                collected.write(relative, handle, budget, member.size)


def _zip_kind(info: zipfile.ZipInfo) -> MemberKind:
    if info.is_dir():
        return "dir"
    mode = info.external_attr >> 16
    # Many zip writers store permission bits only (no file type): that is a regular file.
    if stat.S_IFMT(mode) == 0 or stat.S_ISREG(mode):
        return "file"
    if stat.S_ISLNK(mode):
        return "symlink"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device"
    if stat.S_ISFIFO(mode):
        return "fifo"
    return "other"


def _extract_zip(archive: Path, collected: Collected, budget: Budget) -> None:
    with zipfile.ZipFile(archive) as bundle:
        for info in bundle.infolist():
            relative = budget.admit(info.filename, _zip_kind(info), info.file_size)
            if relative is None:
                continue
            if info.flag_bits & 0x1:
                raise Rejected(RejectCode.INVALID_DATA, f"{info.filename} is encrypted")
            with bundle.open(info) as handle:
                collected.write(relative, handle, budget, info.file_size)


def unpack_if_archive(relative: PurePosixPath, collected: Collected, budget: Budget) -> None:
    """A single downloaded or uploaded file that is an archive is replaced by its contents."""
    if archive_kind(relative.name) is None:
        return
    archive = collected.root / relative
    packed = archive.stat().st_size
    # Move the archive aside so its members can use any name, then drop it.
    aside = collected.root.parent / f"archive-{relative.name}"
    archive.rename(aside)
    del collected.files[relative]
    try:
        extract_archive(aside, collected, Budget(budget.limits, packed))
    finally:
        aside.unlink(missing_ok=True)


# --- streams (URLs and uploads) ---------------------------------------------------------------


async def stream_to_file(
    chunks: AsyncIterator[bytes],
    relative: PurePosixPath,
    collected: Collected,
    budget: Budget,
) -> None:
    """Write an async byte stream to a staging file, hashing it, never holding it whole in
    memory; stops at the size caps."""
    budget.admit(str(relative), "file", 0)
    target = collected.root / relative
    target.parent.mkdir(parents=True, exist_ok=True)
    limits = budget.limits
    room = limits.max_bytes - budget.bytes
    cap, setting = (
        (limits.max_file_bytes, limits.setting("max_file_bytes"))
        if limits.max_file_bytes <= room
        else (room, limits.setting("max_bytes"))
    )
    digest = hashlib.sha256()
    size = 0
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        with os.fdopen(fd, "wb") as out:
            async for chunk in chunks:
                size += len(chunk)
                if size > cap:
                    raise Rejected(  # noqa: TRY301 - the except below removes the partial file
                        RejectCode.TOO_LARGE,
                        f"{relative} is larger than the cap of {cap} bytes ({setting})",
                    )
                digest.update(chunk)
                out.write(chunk)
    except BaseException:
        target.unlink(missing_ok=True)
        raise
    budget.add_bytes(str(relative), size)
    collected.files[relative] = CopiedFile(size, digest.hexdigest())


def write_digits(collected: Collected, budget: Budget) -> None:
    """scikit-learn's bundled digits (1,797 8x8 images, 10 classes) as digits.npz (x, y)."""
    import numpy as np
    from sklearn.datasets import load_digits

    digits = load_digits()
    buffer = io.BytesIO()
    np.savez(
        buffer,
        x=digits.images.astype(np.float32),
        y=digits.target.astype(np.int64),
    )
    size = buffer.tell()
    buffer.seek(0)
    relative = PurePosixPath("digits.npz")
    budget.admit(str(relative), "file", size)
    collected.write(relative, buffer, budget, size)


__all__ = [
    "Collected",
    "copy_local",
    "extract_archive",
    "is_archive",
    "member_path",
    "resolve_source_path",
    "stream_to_file",
    "unpack_if_archive",
    "write_digits",
]
