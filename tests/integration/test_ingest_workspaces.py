"""Staging workspaces (a user's training code folder, sent as a tar archive) on a real file
system: where the files land, what the manifest says, content addressing, and every bad upload.

After each refusal, nothing is left under ``workspaces/``: no workspace, no temporary folder.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import io
import tarfile
import zipfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from torchrelay.services.ingest.domain import (
    Limits,
    RejectCode,
    Rejected,
    version_id,
    workspace_archive_name,
)
from torchrelay.services.ingest.settings import IngestOptions
from torchrelay.services.ingest.workspaces import StagedWorkspace, Workspaces

pytestmark = pytest.mark.timeout(60)

CODE = {
    "train.py": b"from pkg.model import build\n\ndef train(ctx):\n    build()\n",
    "pkg/__init__.py": b"",
    "pkg/model.py": b"def build():\n    return 42\n",
}


@pytest.fixture
def storage(tmp_path: Path) -> Path:
    return tmp_path / "storage"


def tar_of(
    files: dict[str, bytes],
    *,
    compress: bool = False,
    top_folder: bool = True,
    extra: tuple[tarfile.TarInfo, ...] = (),
) -> bytes:
    """A tar as ``tar -C folder -cf - .`` makes it: a ``./`` member first, then the files."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        if top_folder:
            tar.addfile(folder("."))
        for name, data in files.items():
            info = tarfile.TarInfo(f"./{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for member in extra:
            tar.addfile(member, io.BytesIO(b"x" * member.size) if member.isreg() else None)
    return gzip.compress(buffer.getvalue()) if compress else buffer.getvalue()


def link(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info


def folder(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    return info


def regular(name: str, size: int = 1) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    return info


async def chunks(data: bytes, size: int = 1000) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]
        await asyncio.sleep(0)


async def stage(
    storage: Path,
    data: bytes,
    *,
    content_type: str = "application/x-tar",
    filename: str | None = None,
    limits: Limits | None = None,
) -> StagedWorkspace:
    workspaces = Workspaces(storage, limits or IngestOptions().workspace_limits())
    return await workspaces.stage(chunks(data), workspace_archive_name(filename, content_type))


def everything_under(storage: Path) -> list[Path]:
    root = storage / "workspaces"
    return sorted(root.rglob("*")) if root.exists() else []


async def refused(storage: Path, data: bytes, code: RejectCode, **kwargs: object) -> str:
    with pytest.raises(Rejected) as info:
        await stage(storage, data, **kwargs)  # type: ignore[arg-type]
    assert info.value.code is code, info.value.reason
    assert everything_under(storage) == [], "a refusal leaves nothing under workspaces/"
    return info.value.reason


# --- happy paths ------------------------------------------------------------------------------


async def test_a_workspace_lands_under_its_id_with_a_manifest(storage: Path) -> None:
    staged = await stage(storage, tar_of(CODE, compress=True), content_type="application/gzip")
    manifest = staged.manifest
    assert staged.created
    assert staged.path == f"workspaces/{manifest.workspace}"
    assert manifest.workspace == version_id(
        (name, hashlib.sha256(data).hexdigest()) for name, data in CODE.items()
    )
    where = storage / staged.path
    for name, data in CODE.items():
        assert (where / "code" / name).read_bytes() == data
    assert sorted(p.name for p in where.iterdir()) == ["code", "manifest.json"]
    assert [(f.path, f.size_bytes, f.sha256) for f in manifest.files] == [
        (f"code/{name}", len(CODE[name]), hashlib.sha256(CODE[name]).hexdigest())
        for name in sorted(CODE)
    ]
    assert manifest.size_bytes == sum(len(data) for data in CODE.values())
    assert Workspaces(storage, Limits()).read_manifest(manifest.workspace) == manifest


async def test_the_same_files_twice_are_one_workspace_however_packed(storage: Path) -> None:
    first = await stage(storage, tar_of(CODE, compress=True), content_type="application/gzip")
    reordered = dict(reversed(CODE.items()))
    second = await stage(storage, tar_of(reordered, top_folder=False), filename="again.tar")
    assert second.manifest.workspace == first.manifest.workspace
    assert not second.created
    assert second.manifest == first.manifest, "the first staging's manifest stays"
    assert [p.name for p in (storage / "workspaces").iterdir()] == [first.manifest.workspace]


async def test_different_files_are_another_workspace(storage: Path) -> None:
    first = await stage(storage, tar_of(CODE))
    changed = await stage(
        storage, tar_of({**CODE, "pkg/model.py": b"def build():\n    return 7\n"})
    )
    renamed = await stage(storage, tar_of({**CODE, "pkg/other.py": CODE["pkg/model.py"]}))
    ids = {first.manifest.workspace, changed.manifest.workspace, renamed.manifest.workspace}
    assert len(ids) == 3
    assert sorted(p.name for p in (storage / "workspaces").iterdir()) == sorted(ids)


async def test_two_stagings_of_the_same_files_at_once_end_with_one_workspace(
    storage: Path,
) -> None:
    big = {**CODE, "weights.bin": bytes(range(256)) * 20_000}
    results = await asyncio.gather(stage(storage, tar_of(big)), stage(storage, tar_of(big)))
    assert {r.manifest.workspace for r in results} == {results[0].manifest.workspace}
    assert sorted(r.created for r in results) == [False, True]
    staged = list((storage / "workspaces").iterdir())
    assert len(staged) == 1
    assert (staged[0] / "code" / "weights.bin").read_bytes() == big["weights.bin"]


async def test_a_zip_is_a_workspace_too(storage: Path) -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as bundle:
        for name, data in CODE.items():
            bundle.writestr(name, data)
    staged = await stage(storage, buffer.getvalue(), filename="code.zip")
    assert staged.manifest.workspace == (await stage(storage, tar_of(CODE))).manifest.workspace


# --- bad uploads ------------------------------------------------------------------------------


async def test_a_body_that_is_not_an_archive(storage: Path) -> None:
    reason = await refused(storage, b"print('hello')\n" * 100, RejectCode.BAD_REQUEST)
    assert "not a tar archive" in reason
    reason = await refused(
        storage, b"\x1f\x8b\x08 not really gzip", RejectCode.BAD_REQUEST, filename="ws.tgz"
    )
    assert "not a tar archive" in reason


async def test_an_empty_body(storage: Path) -> None:
    reason = await refused(storage, b"", RejectCode.BAD_REQUEST)
    assert "the body is empty" in reason


async def test_an_archive_without_files(storage: Path) -> None:
    empty_folders = tar_of({}, extra=(folder("src"), folder("src/pkg")))
    reason = await refused(storage, empty_folders, RejectCode.BAD_REQUEST)
    assert "holds no files" in reason


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        (
            link("pkg/secrets", "../../../../home/user/.ssh/id_rsa"),
            "'pkg/secrets' is a symlink to '../../../../home/user/.ssh/id_rsa' "
            "(outside the workspace); only regular files and folders are allowed",
        ),
        (link("etc", "/etc"), "symlink to '/etc' (outside the workspace)"),
        (link("alias.py", "train.py"), "symlink to 'train.py' (inside the workspace)"),
        (link("hard", "../../etc/passwd", tarfile.LNKTYPE), "hardlink to '../../etc/passwd'"),
        (regular("../evil.py"), "climbs out with '..'"),
        (regular("pkg/../../evil.py"), "climbs out with '..'"),
        (regular("/srv/torchrelay-evil.py"), "is an absolute path"),
        (link("null", "", tarfile.CHRTYPE), "is a device"),
        (link("pipe", "", tarfile.FIFOTYPE), "is a fifo"),
    ],
)
async def test_unsafe_members_are_refused(
    storage: Path, tmp_path: Path, bad: tarfile.TarInfo, reason: str
) -> None:
    text = await refused(storage, tar_of(CODE, extra=(bad,)), RejectCode.UNSAFE_ARCHIVE)
    assert reason in text
    assert not (storage / "evil.py").exists()
    assert not (tmp_path / "evil.py").exists()
    assert not await asyncio.to_thread(Path("/srv/torchrelay-evil.py").exists)


async def test_a_workspace_over_max_workspace_bytes(storage: Path) -> None:
    limits = IngestOptions(max_workspace_bytes=1000).workspace_limits()
    reason = await refused(
        storage,
        tar_of({**CODE, "data.bin": b"\0" * 1001}),
        RejectCode.TOO_LARGE,
        limits=limits,
    )
    assert "larger than 1000 bytes (TORCHRELAY_INGEST_MAX_WORKSPACE_BYTES)" in reason
    reason = await refused(
        storage,
        tar_of({f"part{index}.py": b"#" * 300 for index in range(4)}),
        RejectCode.TOO_LARGE,
        limits=limits,
    )
    assert reason == (
        "the workspace is larger than 1000 bytes (TORCHRELAY_INGEST_MAX_WORKSPACE_BYTES)"
    )


async def test_a_workspace_over_max_workspace_files(storage: Path) -> None:
    limits = IngestOptions(max_workspace_files=3).workspace_limits()
    reason = await refused(
        storage,
        tar_of({f"m{index}.py": b"" for index in range(4)}),
        RejectCode.TOO_MANY_FILES,
        limits=limits,
    )
    assert reason == ("the workspace has more than 3 files (TORCHRELAY_INGEST_MAX_WORKSPACE_FILES)")


async def test_an_upload_larger_than_any_workspace_packs_to_stops_streaming(
    storage: Path,
) -> None:
    limits = IngestOptions(max_workspace_bytes=1000, max_workspace_files=1).workspace_limits()
    reason = await refused(storage, b"\0" * (2 << 20), RejectCode.TOO_LARGE, limits=limits)
    assert "workspace.tar is larger than the cap" in reason
    assert "TORCHRELAY_INGEST_MAX_WORKSPACE_BYTES" in reason


async def test_a_gzip_bomb_is_refused_by_ratio(storage: Path) -> None:
    bomb = tar_of({"zeros.py": b"\0" * (30 << 20)}, compress=True)
    limits = IngestOptions(max_compression_ratio=20).workspace_limits()
    reason = await refused(storage, bomb, RejectCode.TOO_LARGE, limits=limits)
    assert "decompression bomb" in reason


async def test_a_truncated_archive(storage: Path) -> None:
    whole = tar_of({**CODE, "noise.bin": bytes(range(256)) * 400}, compress=True)
    reason = await refused(storage, whole[: len(whole) // 2], RejectCode.CORRUPT)
    assert "truncated or corrupt" in reason


async def test_a_member_twice_is_refused(storage: Path) -> None:
    reason = await refused(
        storage, tar_of(CODE, extra=(regular("train.py"),)), RejectCode.UNSAFE_ARCHIVE
    )
    assert "appears twice" in reason
