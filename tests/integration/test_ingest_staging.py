"""Staging datasets on a real file system: every source, every format, every bad input.

After each refusal, nothing is left under ``datasets/``: no version, no temporary folder.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import ipaddress
import os
import stat
import tarfile
import zipfile
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
import torch
from aiohttp import web
from aiohttp.test_utils import TestServer
from PIL import Image

from torchrelay.services.ingest.domain import Budget, Limits, RejectCode, Rejected
from torchrelay.services.ingest.fill import fill_for
from torchrelay.services.ingest.settings import IngestOptions
from torchrelay.services.ingest.sources import Collected
from torchrelay.services.ingest.staging import StagedVersion, Stager, StageRequest

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def sources(tmp_path: Path) -> Path:
    folder = tmp_path / "sources"
    folder.mkdir()
    return folder


@pytest.fixture
def storage(tmp_path: Path) -> Path:
    return tmp_path / "storage"


def options(sources: Path, **overrides: object) -> IngestOptions:
    return IngestOptions(allowed_roots=[sources], **overrides)  # type: ignore[arg-type]


async def stage(
    storage: Path,
    source: str,
    opts: IngestOptions,
    *,
    name: str = "ds",
    fmt: str = "auto",
    workers: int = 4,
) -> StagedVersion:
    stager = Stager(storage, opts.limits(), workers=workers)
    return await stager.stage(StageRequest("req-1", name, source, fmt), fill_for(source, opts))


async def refused(storage: Path, source: str, opts: IngestOptions, code: RejectCode) -> str:
    with pytest.raises(Rejected) as info:
        await stage(storage, source, opts)
    assert info.value.code is code, info.value.reason
    leftovers = list((storage / "datasets").rglob("*")) if (storage / "datasets").exists() else []
    assert [p for p in leftovers if p.is_file()] == [], "a refusal leaves no file behind"
    assert [p for p in leftovers if p.name != "ds"] == []
    return info.value.reason


# --- happy paths ------------------------------------------------------------------------------


async def test_the_builtin_digits_sample_stages_as_npz(storage: Path, sources: Path) -> None:
    staged = await stage(storage, "sklearn:digits", options(sources), name="digits")
    manifest = staged.manifest
    assert staged.created
    assert manifest.format == "npz"
    assert manifest.schema_summary["arrays"] == {
        "digits.npz": {
            "x": {"shape": [1797, 8, 8], "dtype": "float32"},
            "y": {"shape": [1797], "dtype": "int64"},
        }
    }
    folder = storage / staged.path
    assert (folder / "manifest.json").exists()
    with np.load(folder / "data" / "digits.npz", allow_pickle=False) as data:
        assert sorted(set(data["y"].tolist())) == list(range(10))


async def test_the_same_content_twice_is_one_version(storage: Path, sources: Path) -> None:
    first = await stage(storage, "sklearn:digits", options(sources))
    second = await stage(storage, "sklearn:digits", options(sources))
    assert first.manifest.version == second.manifest.version
    assert first.created
    assert not second.created
    assert [p.name for p in (storage / "datasets" / "ds").iterdir()] == [first.manifest.version]


async def test_two_stagings_of_the_same_content_at_once_end_with_one_intact_version(
    storage: Path, sources: Path
) -> None:
    (sources / "big.csv").write_text("a,b\n" + "1,2\n" * 200_000)
    results = await asyncio.gather(
        stage(storage, str(sources / "big.csv"), options(sources)),
        stage(storage, str(sources / "big.csv"), options(sources)),
    )
    assert {r.manifest.version for r in results} == {results[0].manifest.version}
    assert sorted(r.created for r in results) == [False, True]
    versions = list((storage / "datasets" / "ds").iterdir())
    assert len(versions) == 1
    assert (versions[0] / "data" / "big.csv").read_text() == (sources / "big.csv").read_text()


async def test_a_folder_of_csv_files_reports_columns_and_rows(storage: Path, sources: Path) -> None:
    folder = sources / "tables"
    (folder / "part").mkdir(parents=True)
    (folder / "a.csv").write_text("x,y,label\n1,2,a\n3,4,b\n")
    (folder / "part" / "b.csv").write_text("x,y,label\n5,6,c\n")
    staged = await stage(storage, str(folder), options(sources))
    assert staged.manifest.format == "csv"
    assert staged.manifest.schema_summary["tables"] == {
        "a.csv": {"columns": ["x", "y", "label"], "rows": 2},
        "part/b.csv": {"columns": ["x", "y", "label"], "rows": 1},
    }
    assert sorted(f.path for f in staged.manifest.files) == ["data/a.csv", "data/part/b.csv"]


async def test_archives_unpack_into_the_version(storage: Path, sources: Path) -> None:
    for name, mode in (("d.tar", "w"), ("d.tar.gz", "w:gz")):
        with tarfile.open(sources / name, mode) as tar:
            add_bytes(tar, "train/a.csv", b"x,y\n1,2\n")
    with zipfile.ZipFile(sources / "d.zip", "w", zipfile.ZIP_DEFLATED) as bundle:
        bundle.writestr("train/a.csv", "x,y\n1,2\n")
    versions = {
        (await stage(storage, str(sources / n), options(sources))).manifest.version
        for n in ("d.tar", "d.tar.gz", "d.zip")
    }
    assert len(versions) == 1, "the same content is the same version, whatever the packaging"


async def test_an_image_folder_needs_a_folder_per_class(storage: Path, sources: Path) -> None:
    for label in ("cat", "dog"):
        (sources / "pics" / label).mkdir(parents=True)
        for index in range(3):
            Image.new("RGB", (8, 8), (index * 40, 0, 0)).save(
                sources / "pics" / label / f"{index}.png"
            )
    staged = await stage(storage, str(sources / "pics"), options(sources))
    assert staged.manifest.format == "images"
    assert staged.manifest.schema_summary["classes"] == {"cat": 3, "dog": 3}


async def test_tensor_files_load_with_weights_only(storage: Path, sources: Path) -> None:
    torch.save({"x": torch.zeros(4, 3), "y": torch.arange(4)}, sources / "t.pt")
    staged = await stage(storage, str(sources / "t.pt"), options(sources))
    assert staged.manifest.schema_summary["tensors"] == {
        "t.pt": {
            "x": {"shape": [4, 3], "dtype": "torch.float32"},
            "y": {"shape": [4], "dtype": "torch.int64"},
        }
    }


# --- bad paths --------------------------------------------------------------------------------


async def test_a_missing_path(storage: Path, sources: Path) -> None:
    reason = await refused(
        storage, str(sources / "nope.csv"), options(sources), RejectCode.MISSING_PATH
    )
    assert "does not exist" in reason


async def test_a_path_outside_the_allowed_roots(
    storage: Path, sources: Path, tmp_path: Path
) -> None:
    outside = tmp_path / "elsewhere.csv"
    outside.write_text("a\n1\n")
    reason = await refused(storage, str(outside), options(sources), RejectCode.UNSAFE_PATH)
    assert "outside the allowed roots" in reason


async def test_a_path_that_escapes_only_after_normalisation(storage: Path, sources: Path) -> None:
    sneaky = f"{sources}/../{sources.name}/../storage-secret.csv"
    (sources.parent / "storage-secret.csv").write_text("a\n1\n")
    await refused(storage, sneaky, options(sources), RejectCode.UNSAFE_PATH)


async def test_a_symlink_escaping_the_allowed_roots(
    storage: Path, sources: Path, tmp_path: Path
) -> None:
    (tmp_path / "secret.csv").write_text("a\n1\n")
    (sources / "link.csv").symlink_to(tmp_path / "secret.csv")
    await refused(storage, str(sources / "link.csv"), options(sources), RejectCode.UNSAFE_PATH)


async def test_a_symlink_inside_a_source_folder(
    storage: Path, sources: Path, tmp_path: Path
) -> None:
    (sources / "tables").mkdir()
    (sources / "tables" / "a.csv").write_text("a\n1\n")
    (sources / "tables" / "b.csv").symlink_to("/etc/passwd")
    reason = await refused(
        storage, str(sources / "tables"), options(sources), RejectCode.UNSAFE_PATH
    )
    assert "links are not followed" in reason


async def test_local_paths_are_off_without_allowed_roots(storage: Path, sources: Path) -> None:
    (sources / "a.csv").write_text("a\n1\n")
    reason = await refused(storage, str(sources / "a.csv"), IngestOptions(), RejectCode.UNSAFE_PATH)
    assert "TORCHRELAY_INGEST_ALLOWED_ROOTS" in reason


async def test_a_file_over_the_size_cap(storage: Path, sources: Path) -> None:
    (sources / "big.csv").write_text("a\n" + "1\n" * 10_000)
    await refused(
        storage,
        str(sources / "big.csv"),
        options(sources, max_file_bytes=1000),
        RejectCode.TOO_LARGE,
    )


# --- bad archives -----------------------------------------------------------------------------


def add_bytes(tar: tarfile.TarFile, name: str, data: bytes, **fields: object) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    for key, value in fields.items():
        setattr(info, key, value)
    tar.addfile(info, io.BytesIO(data))


def tar_with(path: Path, *members: tarfile.TarInfo) -> None:
    with tarfile.open(path, "w") as tar:
        add_bytes(tar, "ok.csv", b"a\n1\n")
        for member in members:
            tar.addfile(member, io.BytesIO(b"x" * member.size) if member.isreg() else None)


def member(name: str, kind: bytes = tarfile.REGTYPE, **fields: object) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = 1 if kind == tarfile.REGTYPE else 0
    for key, value in fields.items():
        setattr(info, key, value)
    return info


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        (member("../evil.csv"), "climbs out"),
        (member("/srv/torchrelay-evil.csv"), "absolute path"),
        (member("a/b/../../../evil.csv"), "climbs out"),
        (member("link", tarfile.SYMTYPE, linkname="/etc/passwd"), "is a symlink"),
        (member("inner-link", tarfile.SYMTYPE, linkname="ok.csv"), "is a symlink"),
        (member("hard", tarfile.LNKTYPE, linkname="../../etc/passwd"), "is a hardlink"),
        (member("dev", tarfile.CHRTYPE, devmajor=1, devminor=3), "is a device"),
        (member("fifo", tarfile.FIFOTYPE), "is a fifo"),
    ],
)
async def test_unsafe_tar_members(
    storage: Path, sources: Path, bad: tarfile.TarInfo, reason: str
) -> None:
    tar_with(sources / "bad.tar", bad)
    text = await refused(
        storage, str(sources / "bad.tar"), options(sources), RejectCode.UNSAFE_ARCHIVE
    )
    assert reason in text
    assert not (sources.parent / "evil.csv").exists()
    assert not await asyncio.to_thread(Path("/srv/torchrelay-evil.csv").exists)


async def test_zip_slip(storage: Path, sources: Path) -> None:
    with zipfile.ZipFile(sources / "slip.zip", "w") as bundle:
        bundle.writestr("ok.csv", "a\n1\n")
        bundle.writestr("../../evil.csv", "a\n1\n")
    await refused(storage, str(sources / "slip.zip"), options(sources), RejectCode.UNSAFE_ARCHIVE)


async def test_a_zip_symlink_member(storage: Path, sources: Path) -> None:
    with zipfile.ZipFile(sources / "link.zip", "w") as bundle:
        info = zipfile.ZipInfo("link.csv")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        bundle.writestr(info, "/etc/passwd")
    reason = await refused(
        storage, str(sources / "link.zip"), options(sources), RejectCode.UNSAFE_ARCHIVE
    )
    assert "symlink" in reason


async def test_a_duplicate_member_cannot_overwrite_another(storage: Path, sources: Path) -> None:
    with tarfile.open(sources / "dup.tar", "w") as tar:
        add_bytes(tar, "a.csv", b"a\n1\n")
        add_bytes(tar, "./a.csv", b"a\n2\n")
    reason = await refused(
        storage, str(sources / "dup.tar"), options(sources), RejectCode.UNSAFE_ARCHIVE
    )
    assert "appears twice" in reason


async def test_an_archive_bomb_over_the_caps(storage: Path, sources: Path) -> None:
    with zipfile.ZipFile(sources / "bomb.zip", "w", zipfile.ZIP_DEFLATED) as bundle:
        bundle.writestr("zeros.csv", b"0\n" * (20 << 20))  # 40 MiB that packs to ~40 KiB
    opts = options(sources, max_compression_ratio=100)
    reason = await refused(storage, str(sources / "bomb.zip"), opts, RejectCode.TOO_LARGE)
    assert "decompression bomb" in reason
    await refused(
        storage,
        str(sources / "bomb.zip"),
        options(sources, max_bytes=1 << 20),
        RejectCode.TOO_LARGE,
    )


async def test_a_lying_size_header_is_caught_while_copying(storage: Path, sources: Path) -> None:
    with zipfile.ZipFile(sources / "liar.zip", "w", zipfile.ZIP_DEFLATED) as bundle:
        bundle.writestr("a.csv", b"1\n" * 100_000)
    # Rewrite the central directory's uncompressed size to claim 10 bytes.
    raw = bytearray((sources / "liar.zip").read_bytes())
    central = raw.rfind(b"PK\x01\x02")
    raw[central + 24 : central + 28] = (10).to_bytes(4, "little")
    (sources / "liar.zip").write_bytes(bytes(raw))
    with pytest.raises(Rejected) as info:
        await stage(storage, str(sources / "liar.zip"), options(sources, max_bytes=50_000))
    assert info.value.code in {RejectCode.TOO_LARGE, RejectCode.CORRUPT}


async def test_a_truncated_archive(storage: Path, sources: Path) -> None:
    with tarfile.open(sources / "full.tar.gz", "w:gz") as tar:
        add_bytes(tar, "a.csv", os.urandom(200_000))
    data = (sources / "full.tar.gz").read_bytes()
    (sources / "cut.tar.gz").write_bytes(data[: len(data) // 2])
    reason = await refused(
        storage, str(sources / "cut.tar.gz"), options(sources), RejectCode.CORRUPT
    )
    assert "truncated or corrupt" in reason


# --- bad content ------------------------------------------------------------------------------


async def test_a_ragged_csv(storage: Path, sources: Path) -> None:
    (sources / "r.csv").write_text("a,b,c\n1,2,3\n4,5\n")
    reason = await refused(
        storage, str(sources / "r.csv"), options(sources), RejectCode.INVALID_DATA
    )
    assert "line 3 has 2 columns, the header has 3" in reason


async def test_an_npz_that_needs_pickle(storage: Path, sources: Path) -> None:
    np.savez(sources / "p.npz", x=np.array([{"a": 1}, None], dtype=object))
    reason = await refused(
        storage, str(sources / "p.npz"), options(sources), RejectCode.INVALID_DATA
    )
    assert "needs pickle" in reason


async def test_an_npz_whose_arrays_disagree(storage: Path, sources: Path) -> None:
    np.savez(sources / "d.npz", x=np.zeros((10, 2)), y=np.zeros(9))
    reason = await refused(
        storage, str(sources / "d.npz"), options(sources), RejectCode.INVALID_DATA
    )
    assert "first dimension" in reason


async def test_a_corrupt_image(storage: Path, sources: Path) -> None:
    for label in ("a", "b"):
        (sources / "pics" / label).mkdir(parents=True)
        Image.new("L", (4, 4)).save(sources / "pics" / label / "ok.png")
    (sources / "pics" / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    await refused(storage, str(sources / "pics"), options(sources), RejectCode.CORRUPT)


class Sneaky:
    """Unpickling this would run code; weights_only refuses it."""


async def test_a_tensor_file_that_needs_code(storage: Path, sources: Path) -> None:
    torch.save({"model": Sneaky()}, sources / "evil.pt")
    reason = await refused(
        storage, str(sources / "evil.pt"), options(sources), RejectCode.INVALID_DATA
    )
    assert "weights_only" in reason


# --- URLs -------------------------------------------------------------------------------------

LOOPBACK = [ipaddress.ip_network("127.0.0.0/8")]


@pytest.fixture
async def web_server() -> AsyncIterator[TestServer]:
    payload = io.BytesIO()
    np.savez(payload, x=np.zeros((5, 2), dtype=np.float32), y=np.arange(5))

    async def data(_: web.Request) -> web.Response:
        return web.Response(body=payload.getvalue())

    async def redirect_out(_: web.Request) -> web.Response:
        raise web.HTTPFound("http://169.254.169.254/latest/meta-data")

    async def redirect_in(request: web.Request) -> web.Response:
        raise web.HTTPFound(f"http://127.0.0.1:{request.url.port}/data.npz")

    app = web.Application()
    app.router.add_get("/data.npz", data)
    app.router.add_get("/redirect-out.npz", redirect_out)
    app.router.add_get("/redirect-in.npz", redirect_in)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield server
    await server.close()


async def test_a_url_is_streamed_when_its_address_is_allowed(
    storage: Path, sources: Path, web_server: TestServer
) -> None:
    url = f"http://127.0.0.1:{web_server.port}/data.npz"
    staged = await stage(storage, url, options(sources, url_allowed_networks=LOOPBACK))
    assert staged.manifest.format == "npz"
    assert staged.manifest.files[0].path == "data/data.npz"
    again = await stage(
        storage,
        f"http://127.0.0.1:{web_server.port}/redirect-in.npz",
        options(sources, url_allowed_networks=LOOPBACK),
    )
    assert again.manifest.version == staged.manifest.version, "redirects within policy are followed"


async def test_loopback_is_refused_unless_allowed(
    storage: Path, sources: Path, web_server: TestServer
) -> None:
    url = f"http://127.0.0.1:{web_server.port}/data.npz"
    await refused(storage, url, options(sources), RejectCode.URL_DENIED)
    url = f"http://localhost:{web_server.port}/data.npz"
    reason = await refused(storage, url, options(sources), RejectCode.URL_DENIED)
    assert "resolves to" in reason


async def test_a_link_local_address_is_refused(storage: Path, sources: Path) -> None:
    await refused(
        storage, "http://169.254.169.254/latest/meta-data", options(sources), RejectCode.URL_DENIED
    )


async def test_a_redirect_to_a_disallowed_address_is_refused(
    storage: Path, sources: Path, web_server: TestServer
) -> None:
    url = f"http://127.0.0.1:{web_server.port}/redirect-out.npz"
    await refused(
        storage, url, options(sources, url_allowed_networks=LOOPBACK), RejectCode.URL_DENIED
    )


async def test_a_host_outside_the_allow_list_is_refused(
    storage: Path, sources: Path, web_server: TestServer
) -> None:
    url = f"http://127.0.0.1:{web_server.port}/data.npz"
    opts = options(sources, url_allowed_networks=LOOPBACK, url_allowed_hosts=["*.example.org"])
    await refused(storage, url, opts, RejectCode.URL_DENIED)


async def test_an_unreachable_url(storage: Path, sources: Path, web_server: TestServer) -> None:
    opts = options(sources, url_allowed_networks=LOOPBACK)
    await refused(storage, "http://127.0.0.1:9/data.npz", opts, RejectCode.UNREACHABLE)
    reason = await refused(
        storage, f"http://127.0.0.1:{web_server.port}/missing.npz", opts, RejectCode.UNREACHABLE
    )
    assert "HTTP 404" in reason


async def test_a_url_over_the_size_cap(
    storage: Path, sources: Path, web_server: TestServer
) -> None:
    url = f"http://127.0.0.1:{web_server.port}/data.npz"
    opts = options(sources, url_allowed_networks=LOOPBACK, max_file_bytes=100)
    await refused(storage, url, opts, RejectCode.TOO_LARGE)


def test_limits_come_from_settings() -> None:
    assert IngestOptions(max_bytes=10).limits() == Limits(max_bytes=10)


async def test_an_npz_array_shorter_than_its_header(storage: Path, sources: Path) -> None:
    buffer = io.BytesIO()
    np.save(buffer, np.zeros(1000, dtype=np.float64))
    with zipfile.ZipFile(sources / "short.npz", "w") as bundle:
        bundle.writestr("x.npy", buffer.getvalue()[:-80])
    reason = await refused(
        storage, str(sources / "short.npz"), options(sources), RejectCode.CORRUPT
    )
    assert "header promises 8000" in reason


# --- many files at once: the pool -------------------------------------------------------------


def many_npz(folder: Path, count: int) -> None:
    """``count`` small .npz files over two sub-folders, plus one past the size where hashing
    runs beside the copy, so both copy paths are staged together."""
    rng = np.random.default_rng(7)
    for index in range(count):
        sub = folder / ("a" if index % 2 else "b")
        sub.mkdir(parents=True, exist_ok=True)
        np.savez(sub / f"part-{index:04d}.npz", x=rng.random(64 + index))
    np.savez(folder / "large.npz", x=rng.random(9 * 1024 * 1024 // 8 + 3))


async def test_the_manifest_hashes_are_the_bytes_staged(storage: Path, sources: Path) -> None:
    many_npz(sources / "many", 300)
    staged = await stage(storage, str(sources / "many"), options(sources), workers=8)
    folder = storage / staged.path
    listed = sorted(
        p.relative_to(folder).as_posix() for p in (folder / "data").rglob("*") if p.is_file()
    )
    assert [f.path for f in staged.manifest.files] == listed, "every file, in sorted order"
    for entry in staged.manifest.files:
        data = (folder / entry.path).read_bytes()
        assert entry.sha256 == hashlib.sha256(data).hexdigest(), entry.path
        assert entry.size_bytes == len(data)
        assert data == (sources / "many" / entry.path.removeprefix("data/")).read_bytes()
    assert staged.manifest.size_bytes == sum(f.size_bytes for f in staged.manifest.files)


async def test_the_pool_size_does_not_change_the_version(tmp_path: Path, sources: Path) -> None:
    many_npz(sources / "many", 120)
    source = str(sources / "many")
    one = await stage(tmp_path / "one", source, options(sources), workers=1)
    eight = await stage(tmp_path / "eight", source, options(sources), workers=8)
    assert one.manifest.version == eight.manifest.version
    assert one.manifest.files == eight.manifest.files
    assert one.manifest.schema_summary == eight.manifest.schema_summary


async def test_one_corrupt_file_among_many_leaves_no_version_and_no_leftovers(
    storage: Path, sources: Path
) -> None:
    many_npz(sources / "many", 200)
    (sources / "many" / "a" / "part-0101.npz").write_bytes(b"PK\x03\x04 cut short")
    reason = await refused(storage, str(sources / "many"), options(sources), RejectCode.CORRUPT)
    assert reason.startswith("a/part-0101.npz: not a readable .npz")
    assert list((storage / "datasets" / "ds").iterdir()) == [], "no staging folder is left"


async def test_a_version_is_visible_only_once_whole(storage: Path, sources: Path) -> None:
    many_npz(sources / "many", 50)
    opts = options(sources)
    seen_while_filling: list[str] = []
    real_fill = fill_for(str(sources / "many"), opts)

    async def watched_fill(collected: Collected, budget: Budget) -> None:
        await real_fill(collected, budget)
        seen_while_filling.extend(p.name for p in (storage / "datasets" / "ds").iterdir())

    staged = await Stager(storage, opts.limits()).stage(
        StageRequest("req-1", "ds", str(sources / "many")), watched_fill
    )
    assert all(name.startswith(".tmp-") for name in seen_while_filling), seen_while_filling
    assert [p.name for p in (storage / "datasets" / "ds").iterdir()] == [staged.manifest.version]
    assert len(staged.manifest.files) == 51
