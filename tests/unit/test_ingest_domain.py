"""Ingest's pure rules: archive member names, budgets, URL policy, versions, formats, which
staged version a pipeline names, and what a workspace upload may be."""

from __future__ import annotations

import ipaddress
from datetime import UTC, datetime, timedelta
from pathlib import PurePosixPath

import pytest

from torchrelay.services.ingest.domain import (
    Budget,
    Limits,
    RejectCode,
    Rejected,
    address_allowed,
    check_url,
    choose_version,
    classify_source,
    detect_format,
    expected_format,
    file_name_from_url,
    link_escapes,
    member_path,
    packed_limits,
    staged_source,
    version_id,
    workspace_archive_name,
)
from torchrelay.services.ingest.settings import IngestSettings


@pytest.mark.parametrize(
    ("name", "expected"),
    [("a/b.csv", "a/b.csv"), ("./data/x.npz", "data/x.npz"), ("a//b", "a/b"), ("a/./b", "a/b")],
)
def test_safe_member_names_normalise(name: str, expected: str) -> None:
    assert member_path(name) == PurePosixPath(expected)


@pytest.mark.parametrize(
    "name",
    [
        "../evil",
        "a/../../evil",
        "a/b/../../../evil",
        "/etc/passwd",
        "C:/Windows/x",
        "c:evil",
        "a\\..\\evil",
        "",
        "a/\x00b",
        "..",
        ".",
    ],
)
def test_unsafe_member_names_are_refused(name: str) -> None:
    with pytest.raises(Rejected) as info:
        member_path(name)
    assert info.value.code is RejectCode.UNSAFE_ARCHIVE


@pytest.mark.parametrize("kind", ["symlink", "hardlink", "device", "fifo", "other"])
def test_only_regular_files_and_folders_are_admitted(kind: str) -> None:
    budget = Budget(Limits(), packed_bytes=100)
    expected = "special file" if kind == "other" else kind
    with pytest.raises(Rejected, match=f"is a {expected}") as info:
        budget.admit("data/x", kind, 0)  # type: ignore[arg-type]
    assert info.value.code is RejectCode.UNSAFE_ARCHIVE
    assert budget.admit("data/", "dir", 0) is None


def test_budget_counts_files_and_bytes() -> None:
    budget = Budget(Limits(max_files=2, max_bytes=100, max_file_bytes=60))
    budget.admit("a", "file", 40)
    with pytest.raises(Rejected) as too_big:
        budget.admit("b", "file", 61)
    assert too_big.value.code is RejectCode.TOO_LARGE
    budget = Budget(Limits(max_files=2, max_bytes=100, max_file_bytes=60))
    budget.admit("a", "file", 50)
    with pytest.raises(Rejected, match="larger than 100 bytes"):
        budget.admit("b", "file", 51)
    budget = Budget(Limits(max_files=2))
    budget.admit("a", "file", 1)
    budget.admit("b", "file", 1)
    with pytest.raises(Rejected) as too_many:
        budget.admit("c", "file", 1)
    assert too_many.value.code is RejectCode.TOO_MANY_FILES


def test_a_decompression_bomb_is_refused_by_ratio() -> None:
    budget = Budget(Limits(max_compression_ratio=10), packed_bytes=200_000)
    budget.admit("a", "file", 1_900_000)
    with pytest.raises(Rejected, match="decompression bomb"):
        budget.admit("b", "file", 200_000)


LOCAL = [ipaddress.ip_network("127.0.0.0/8")]


@pytest.mark.parametrize(
    ("address", "allowed"),
    [
        ("93.184.216.34", True),
        ("2606:2800:220:1:248:1893:25c8:1946", True),
        ("169.254.169.254", False),
        ("10.1.2.3", False),
        ("192.168.1.1", False),
        ("172.16.0.9", False),
        ("127.0.0.1", False),
        ("::1", False),
        ("fe80::1%eth0", False),
        ("::ffff:127.0.0.1", False),
        ("0.0.0.0", False),
        ("224.0.0.1", False),
    ],
)
def test_addresses_inside_the_cluster_are_refused(address: str, allowed: bool) -> None:
    assert address_allowed(address, []) is allowed


def test_a_configured_network_is_allowed() -> None:
    assert address_allowed("127.0.0.1", LOCAL)
    assert not address_allowed("10.0.0.1", LOCAL)


@pytest.mark.parametrize(
    ("url", "hosts", "reason"),
    [
        ("ftp://example.org/x", ["*"], "not an http"),
        ("https://user:pw@example.org/x", ["*"], "credentials"),
        ("https://evil.test/x", ["*.example.org"], "not in the URL allow list"),
        ("https:///nohost", ["*"], "with a host"),
    ],
)
def test_urls_outside_the_policy_are_refused(url: str, hosts: list[str], reason: str) -> None:
    with pytest.raises(Rejected, match=reason) as info:
        check_url(url, hosts)
    assert info.value.code is RejectCode.URL_DENIED


def test_allowed_urls_give_their_host() -> None:
    assert check_url("https://Data.Example.org/a.npz", ["*.example.org"]) == "data.example.org"
    assert file_name_from_url("https://x.org/a/b/digits.npz?x=1") == "digits.npz"
    assert file_name_from_url("https://x.org/") == "download"


def test_versions_derive_from_content_not_order() -> None:
    files = [("a.csv", "1" * 64), ("b.csv", "2" * 64)]
    assert version_id(files) == version_id(reversed(files))
    assert version_id(files) != version_id([("a.csv", "1" * 64), ("b.csv", "3" * 64)])
    assert version_id(files) != version_id([("c.csv", "1" * 64), ("b.csv", "2" * 64)])
    assert len(version_id(files)) == 16


@pytest.mark.parametrize(
    ("paths", "fmt"),
    [
        (["digits.npz"], "npz"),
        (["a.csv", "b/c.csv"], "csv"),
        (["w.pt", "x.pth"], "pt"),
        (["cat/1.png", "dog/2.jpg"], "images"),
    ],
)
def test_formats_are_detected_from_names(paths: list[str], fmt: str) -> None:
    assert detect_format([PurePosixPath(p) for p in paths]) == fmt


@pytest.mark.parametrize(
    ("paths", "code"),
    [
        ([], RejectCode.INVALID_DATA),
        (["a.csv", "b.npz"], RejectCode.UNKNOWN_FORMAT),
        (["readme.txt"], RejectCode.UNKNOWN_FORMAT),
        (["1.png", "2.png"], RejectCode.INVALID_DATA),
    ],
)
def test_mixed_or_unknown_formats_are_refused(paths: list[str], code: RejectCode) -> None:
    with pytest.raises(Rejected) as info:
        detect_format([PurePosixPath(p) for p in paths])
    assert info.value.code is code


def test_a_requested_format_must_match_the_files() -> None:
    assert expected_format("auto", "csv") == "csv"
    with pytest.raises(Rejected, match="the request says npz, but the files are csv"):
        expected_format("npz", "csv")


def test_sources_are_classified() -> None:
    assert classify_source("sklearn:digits").kind == "builtin"
    assert classify_source("https://x.org/a.npz").kind == "url"
    assert classify_source("/data/a.csv").kind == "path"
    assert classify_source("file:///data/a.csv").value == "/data/a.csv"
    with pytest.raises(Rejected) as relative:
        classify_source("data/a.csv")
    assert relative.value.code is RejectCode.UNSAFE_PATH
    with pytest.raises(Rejected) as scheme:
        classify_source("s3://bucket/key")
    assert scheme.value.code is RejectCode.UNSUPPORTED_SOURCE


# --- archives made from a folder's top, and links -------------------------------------------


@pytest.mark.parametrize("name", [".", "./", "././"])
def test_the_top_folder_of_an_archive_is_admitted_as_nothing(name: str) -> None:
    """``tar -C folder -cf - .`` starts with a ``./`` member: the folder itself, not a name."""
    assert Budget(Limits()).admit(name, "dir", 0) is None
    with pytest.raises(Rejected) as info:
        Budget(Limits()).admit(name, "file", 1)
    assert info.value.code is RejectCode.UNSAFE_ARCHIVE


@pytest.mark.parametrize(
    ("name", "target", "hard", "escapes"),
    [
        ("link", "/etc/passwd", False, True),
        ("link", "../secret", False, True),
        ("a/b/link", "../../../secret", False, True),
        ("a/b/link", "../../ok.py", False, False),
        ("a/link", "sibling.py", False, False),
        ("a/link", "C:/x", False, True),
        ("a/link", "", False, True),
        ("a/hard", "b.py", True, False),
        ("a/hard", "../b.py", True, True),
    ],
)
def test_a_link_escapes_when_its_target_lands_outside_the_folder(
    name: str, target: str, hard: bool, escapes: bool
) -> None:
    assert link_escapes(name, target, hard=hard) is escapes


def test_a_link_is_refused_with_where_it_points() -> None:
    budget = Budget(Limits(of="workspace"))
    with pytest.raises(Rejected) as outside:
        budget.admit("src/conf", "symlink", 0, link="../../home/user/.ssh/id_rsa")
    assert outside.value.code is RejectCode.UNSAFE_ARCHIVE
    assert outside.value.reason == (
        "'src/conf' is a symlink to '../../home/user/.ssh/id_rsa' (outside the workspace); "
        "only regular files and folders are allowed"
    )
    with pytest.raises(Rejected, match=r"symlink to 'b.py' \(inside the workspace\)"):
        budget.admit("src/a.py", "symlink", 0, link="b.py")


# --- caps name the setting to raise -----------------------------------------------------------


def test_workspace_caps_name_their_settings() -> None:
    limits = Limits(of="workspace", max_bytes=100, max_files=2, max_file_bytes=100)
    budget = Budget(limits)
    budget.admit("a.py", "file", 60)
    with pytest.raises(Rejected) as too_large:
        budget.admit("b.py", "file", 60)
    assert too_large.value.code is RejectCode.TOO_LARGE
    assert too_large.value.reason == (
        "the workspace is larger than 100 bytes (TORCHRELAY_INGEST_MAX_WORKSPACE_BYTES)"
    )
    budget = Budget(limits)
    budget.admit("a.py", "file", 1)
    budget.admit("b.py", "file", 1)
    with pytest.raises(Rejected) as too_many:
        budget.admit("c.py", "file", 1)
    assert too_many.value.code is RejectCode.TOO_MANY_FILES
    assert "more than 2 files (TORCHRELAY_INGEST_MAX_WORKSPACE_FILES)" in too_many.value.reason


def test_dataset_caps_name_theirs() -> None:
    with pytest.raises(Rejected, match=r"\(TORCHRELAY_INGEST_MAX_FILE_BYTES\)"):
        Budget(Limits(max_file_bytes=10)).admit("a.csv", "file", 11)
    with pytest.raises(Rejected, match=r"the dataset is larger .* \(TORCHRELAY_INGEST_MAX_BYTES\)"):
        Budget(Limits(max_bytes=10, max_file_bytes=100)).add_bytes("a.csv", 11)


def test_workspace_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCHRELAY_INGEST_MAX_WORKSPACE_BYTES", "1000")
    monkeypatch.setenv("TORCHRELAY_INGEST_MAX_WORKSPACE_FILES", "3")
    limits = IngestSettings().ingest.workspace_limits()
    assert (limits.of, limits.max_bytes, limits.max_files) == ("workspace", 1000, 3)
    assert limits.max_file_bytes == 1000, "one file may fill a workspace"
    defaults = IngestSettings.model_fields["ingest"].default.workspace_limits()
    assert (defaults.max_bytes, defaults.max_files) == (64 << 20, 10_000)


# --- a pipeline's dataset named by a staged version -------------------------------------------

T0 = datetime(2026, 1, 1, tzinfo=UTC)
STAGED = [("aaaa", T0), ("cccc", T0 + timedelta(hours=2)), ("bbbb", T0 + timedelta(hours=1))]


def test_a_named_version_is_that_version_and_none_is_the_newest() -> None:
    assert choose_version("blobs", "aaaa", STAGED) == "aaaa"
    assert choose_version("blobs", None, STAGED) == "cccc"
    assert staged_source("aaaa") == "staged:aaaa"
    assert staged_source(None) == "staged:newest"


def test_an_unknown_version_lists_the_staged_ones_newest_first() -> None:
    with pytest.raises(Rejected) as info:
        choose_version("blobs", "abc", STAGED)
    assert info.value.code is RejectCode.UNKNOWN_VERSION
    assert info.value.reason == (
        "dataset 'blobs' has no version 'abc' (staged versions, newest first: cccc, bbbb, aaaa)"
    )
    many = [(f"v{index:02d}", T0 + timedelta(minutes=index)) for index in range(11)]
    with pytest.raises(Rejected, match=r"first: v10, v09, .*, v03, and 3 older\)$"):
        choose_version("blobs", "abc", many)


def test_a_dataset_with_no_staged_version_says_how_to_stage_one() -> None:
    with pytest.raises(Rejected) as newest:
        choose_version("blobs", None, [])
    assert newest.value.code is RejectCode.UNKNOWN_VERSION
    assert newest.value.reason == (
        "no version of dataset 'blobs' is staged yet: stage one first "
        "(POST /v1/datasets, or give the spec a source)"
    )
    with pytest.raises(Rejected, match=r"^dataset 'blobs' has no version 'abc': no version"):
        choose_version("blobs", "abc", [])


# --- workspace uploads --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("filename", "content_type", "expected"),
    [
        (None, "application/x-tar", "workspace.tar"),
        (None, "application/gzip", "workspace.tar.gz"),
        (None, "application/octet-stream", "workspace.tar"),
        ("ws.tar.gz", "application/gzip", "ws.tar.gz"),
        ("../../ws.tgz", "application/x-tar", "ws.tgz"),
        ("code.zip", "application/zip", "code.zip"),
    ],
)
def test_an_uploaded_workspace_archive_gets_a_safe_name(
    filename: str | None, content_type: str, expected: str
) -> None:
    assert workspace_archive_name(filename, content_type) == PurePosixPath(expected)


def test_a_filename_that_is_no_archive_is_a_bad_request() -> None:
    with pytest.raises(Rejected, match=r"'train\.py' is not an archive name") as info:
        workspace_archive_name("train.py", "application/x-tar")
    assert info.value.code is RejectCode.BAD_REQUEST


def test_the_packed_upload_may_be_as_large_as_any_workspace_within_the_caps_packs_to() -> None:
    limits = Limits(of="workspace", max_bytes=64 << 20, max_files=10_000, max_file_bytes=64 << 20)
    packed = packed_limits(limits)
    # A tar of 10,000 files with long names in folders of their own: well over 64 MiB packed.
    assert packed.max_bytes >= limits.max_bytes + 10_000 * 4 * 512
    assert packed.max_file_bytes == packed.max_bytes
    assert packed.max_files == 1
    assert packed.setting("max_bytes") == "TORCHRELAY_INGEST_MAX_WORKSPACE_BYTES"
