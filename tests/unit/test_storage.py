"""Atomic writes, hashing while copying, and paths that stay under their root."""

from __future__ import annotations

import hashlib
import io
import os
import time
from pathlib import Path

import pytest

from torchrelay.shared.errors import PermanentError, UnsafePath
from torchrelay.shared.storage import (
    atomic,
    atomic_write_bytes,
    atomic_writer,
    clean_temporaries,
    copy_and_hash,
    copy_file_and_hash,
    publish_dir,
    resolve_within,
    sha256_file,
    sync_tree,
    temp_sibling,
)


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_atomic_write_replaces_the_whole_file(tmp_path: Path) -> None:
    target = tmp_path / "a" / "model.json"
    atomic_write_bytes(target, b"old")
    atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new"
    assert names(target.parent) == ["model.json"], "no temporary file is left behind"


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "weights.pt"
    atomic_write_bytes(target, b"good")

    def crash_mid_write() -> None:
        with atomic_writer(target) as handle:
            handle.write(b"half")
            raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        crash_mid_write()
    assert target.read_bytes() == b"good"
    assert names(tmp_path) == ["weights.pt"]


def test_copy_hashes_in_the_same_pass(tmp_path: Path) -> None:
    data = os.urandom(3 * 1024 * 1024 + 7)
    copied = copy_and_hash(io.BytesIO(data), tmp_path / "x.bin")
    assert copied.size_bytes == len(data)
    assert copied.sha256 == hashlib.sha256(data).hexdigest()
    assert sha256_file(tmp_path / "x.bin") == copied.sha256


def test_copy_over_the_size_cap_fails_and_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(PermanentError, match="more than 1000 bytes"):
        copy_and_hash(io.BytesIO(b"x" * 5000), tmp_path / "big.bin", max_bytes=1000)
    assert names(tmp_path) == []


def test_publishing_a_folder_is_first_writer_wins(tmp_path: Path) -> None:
    final = tmp_path / "datasets" / "digits" / "abc"
    first, second = temp_sibling(final), temp_sibling(final)
    for staging, text in ((first, "first"), (second, "second")):
        staging.mkdir(parents=True)
        (staging / "data.npz").write_text(text)
    assert publish_dir(first, final) is True
    assert publish_dir(second, final) is False
    assert (final / "data.npz").read_text() == "first"
    assert not second.exists()
    assert sorted(p.name for p in final.parent.iterdir()) == ["abc"]


def test_leftovers_of_a_crash_are_cleaned(tmp_path: Path) -> None:
    keep = tmp_path / "datasets" / "d" / "v1" / "data.csv"
    keep.parent.mkdir(parents=True)
    keep.write_text("a,b\n")
    half_dir = temp_sibling(tmp_path / "datasets" / "d" / "v2")
    half_dir.mkdir()
    (half_dir / "part").write_text("x")
    half_file = temp_sibling(keep)
    half_file.write_text("partial")
    removed = clean_temporaries(tmp_path)
    assert set(removed) == {half_dir, half_file}
    assert keep.exists()
    assert not half_dir.exists()
    assert not half_file.exists()


def test_paths_resolve_inside_the_root(tmp_path: Path) -> None:
    (tmp_path / "runs" / "r1").mkdir(parents=True)
    assert resolve_within(tmp_path, "runs/r1") == (tmp_path / "runs" / "r1").resolve()
    assert resolve_within(tmp_path, "runs/../runs/r1") == (tmp_path / "runs" / "r1").resolve()


@pytest.mark.parametrize("bad", ["../etc/passwd", "runs/../../x", "/etc/passwd"])
def test_paths_escaping_the_root_are_refused(tmp_path: Path, bad: str) -> None:
    with pytest.raises(UnsafePath):
        resolve_within(tmp_path, bad)


def test_a_symlink_pointing_out_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "escape").symlink_to(tmp_path)
    with pytest.raises(UnsafePath, match="outside"):
        resolve_within(root, "escape/secret")


def test_a_large_copy_hashes_alongside_the_write(tmp_path: Path) -> None:
    data = os.urandom(9 * 1024 * 1024 + 3)  # past the overlap threshold
    copied = copy_and_hash(io.BytesIO(data), tmp_path / "big.bin", fsync=False)
    assert copied.sha256 == hashlib.sha256(data).hexdigest()
    assert (tmp_path / "big.bin").read_bytes() == data


def test_recent_temporaries_of_another_writer_are_spared(tmp_path: Path) -> None:
    old = temp_sibling(tmp_path / "a")
    old.mkdir()
    (old / "part").write_text("x")
    stale = time.time() - 3600
    os.utime(old / "part", (stale, stale))
    os.utime(old, (stale, stale))
    fresh = temp_sibling(tmp_path / "b")
    fresh.mkdir()
    (fresh / "part").write_text("being written")
    assert clean_temporaries(tmp_path, older_than_s=600) == [old]
    assert fresh.exists()


def test_sync_tree_makes_a_folder_durable_without_error(tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "f").write_bytes(b"x")
    sync_tree(tmp_path / "a")


def test_a_direct_copy_never_touches_an_existing_file(tmp_path: Path) -> None:
    (tmp_path / "taken").write_bytes(b"keep me")
    with pytest.raises(FileExistsError):
        copy_and_hash(io.BytesIO(b"new"), tmp_path / "taken", atomic=False)
    assert (tmp_path / "taken").read_bytes() == b"keep me"
    with pytest.raises(PermanentError):
        copy_and_hash(io.BytesIO(b"x" * 100), tmp_path / "capped", atomic=False, max_bytes=10)
    assert not (tmp_path / "capped").exists()


@pytest.mark.parametrize(
    "size",
    [0, 10 * 1024, 4 * 1024 * 1024 - 1, 4 * 1024 * 1024, 19 * 1024 * 1024 + 5],
    ids=["empty", "small", "just-under-overlap", "at-overlap", "several-large-chunks"],
)
def test_a_local_file_copy_hashes_exactly_the_bytes_written(tmp_path: Path, size: int) -> None:
    data = os.urandom(size)
    (tmp_path / "source").write_bytes(data)
    copied = copy_file_and_hash(tmp_path / "source", tmp_path / "copy")
    assert (tmp_path / "copy").read_bytes() == data
    assert copied.size_bytes == size
    assert copied.sha256 == hashlib.sha256(data).hexdigest()


def test_a_local_file_copy_over_its_cap_leaves_nothing(tmp_path: Path) -> None:
    (tmp_path / "source").write_bytes(os.urandom(9 * 1024 * 1024))
    with pytest.raises(PermanentError, match="more than"):
        copy_file_and_hash(tmp_path / "source", tmp_path / "copy", max_bytes=5 * 1024 * 1024)
    assert names(tmp_path) == ["source"]


def test_a_local_file_copy_refuses_a_link_and_an_existing_target(tmp_path: Path) -> None:
    (tmp_path / "real").write_bytes(b"x")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(OSError, match="symbolic links"):  # ELOOP: a swapped-in link
        copy_file_and_hash(tmp_path / "link", tmp_path / "copy")
    (tmp_path / "taken").write_bytes(b"keep me")
    with pytest.raises(FileExistsError):
        copy_file_and_hash(tmp_path / "real", tmp_path / "taken")
    assert (tmp_path / "taken").read_bytes() == b"keep me"
    assert not (tmp_path / "copy").exists()


def test_a_folder_is_synced_before_it_is_renamed_into_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    final = tmp_path / "datasets" / "abc"
    staging = temp_sibling(final)
    staging.mkdir(parents=True)
    (staging / "f").write_bytes(b"x")
    seen: list[bool] = []
    monkeypatch.setattr(atomic, "sync_tree", lambda path: seen.append(final.exists()))
    assert publish_dir(staging, final)
    assert seen == [False], "synced once, while the version was not visible yet"


def test_without_syncfs_every_file_is_fsynced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    for path in (tmp_path / "a" / "f", tmp_path / "a" / "b" / "g"):
        path.write_bytes(b"x")
    fsynced: list[str] = []
    monkeypatch.setattr(atomic, "_libc_syncfs", None)
    monkeypatch.setattr(atomic, "_fsync_file", lambda path: fsynced.append(path.name))
    sync_tree(tmp_path / "a")
    assert sorted(fsynced) == ["f", "g"]
