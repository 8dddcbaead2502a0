"""Ingest's pure rules: archive member names, budgets, URL policy, versions, formats."""

from __future__ import annotations

import ipaddress
from pathlib import PurePosixPath

import pytest

from torchrelay.services.ingest.domain import (
    Budget,
    Limits,
    RejectCode,
    Rejected,
    address_allowed,
    check_url,
    classify_source,
    detect_format,
    expected_format,
    file_name_from_url,
    member_path,
    version_id,
)


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
