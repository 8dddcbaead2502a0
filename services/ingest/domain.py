"""Pure rules of ingest: what a source is, which archive members and URLs are allowed, how a
version id derives from content, which format a dataset has, what the manifests say, which
staged version a pipeline names, and what a workspace upload may be."""

from __future__ import annotations

import enum
import hashlib
import ipaddress
import posixpath
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from fnmatch import fnmatch
from pathlib import PurePosixPath
from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, JsonValue

from torchrelay.shared.errors import PermanentError
from torchrelay.shared.storage.layout import DATA_FOLDER, MANIFEST_FILE

DatasetFormat = Literal["npz", "csv", "images", "pt"]
BUILTIN_SOURCES = frozenset({"sklearn:digits"})
MANIFEST_NAME = MANIFEST_FILE
DATA_DIR = DATA_FOLDER
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"})


class RejectCode(enum.StrEnum):
    """Why a dataset was refused: a bounded set, used as a metric label."""

    BAD_REQUEST = "bad_request"
    MISSING_PATH = "missing_path"
    UNSAFE_PATH = "unsafe_path"
    UNSUPPORTED_SOURCE = "unsupported_source"
    URL_DENIED = "url_denied"
    UNREACHABLE = "unreachable"
    TOO_LARGE = "too_large"
    TOO_MANY_FILES = "too_many_files"
    UNSAFE_ARCHIVE = "unsafe_archive"
    CORRUPT = "corrupt"
    INVALID_DATA = "invalid_data"
    UNKNOWN_FORMAT = "unknown_format"
    UNKNOWN_VERSION = "unknown_version"


class Rejected(PermanentError):
    """A dataset request that cannot succeed; nothing of it stays on storage."""

    def __init__(self, code: RejectCode, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


Cap = Literal["max_bytes", "max_files", "max_file_bytes", "max_compression_ratio"]
_SETTING_PREFIX = "TORCHRELAY_INGEST_"
_CAP_SETTINGS: dict[str, dict[Cap, str]] = {
    "dataset": {
        "max_bytes": "MAX_BYTES",
        "max_files": "MAX_FILES",
        "max_file_bytes": "MAX_FILE_BYTES",
        "max_compression_ratio": "MAX_COMPRESSION_RATIO",
    },
    "workspace": {
        "max_bytes": "MAX_WORKSPACE_BYTES",
        "max_files": "MAX_WORKSPACE_FILES",
        "max_file_bytes": "MAX_WORKSPACE_BYTES",  # no cap of its own: one file may fill it
        "max_compression_ratio": "MAX_COMPRESSION_RATIO",
    },
}


class Limits(BaseModel):
    """Caps that bound what one dataset (or one workspace) may cost."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_bytes: int = Field(default=4 << 30, gt=0, description="Whole dataset, bytes.")
    max_files: int = Field(default=100_000, gt=0, description="Files in one dataset.")
    max_file_bytes: int = Field(default=2 << 30, gt=0, description="One file, bytes.")
    max_compression_ratio: float = Field(
        default=200.0, gt=1, description="Unpacked / packed size of an archive (bomb guard)."
    )
    of: Literal["dataset", "workspace"] = Field(
        default="dataset", description="What the caps bound: reasons name it and its settings."
    )

    def setting(self, cap: Cap) -> str:
        """The environment variable that sets ``cap`` here, for reasons that say what to raise."""
        return f"{_SETTING_PREFIX}{_CAP_SETTINGS[self.of][cap]}"


# --- sources ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SourceRef:
    kind: Literal["path", "url", "builtin"]
    value: str


def classify_source(source: str) -> SourceRef:
    """What kind of source a request names."""
    if source in BUILTIN_SOURCES:
        return SourceRef("builtin", source)
    scheme = urlsplit(source).scheme.lower()
    if scheme in {"http", "https"}:
        return SourceRef("url", source)
    if scheme == "file":
        return SourceRef("path", urlsplit(source).path)
    if scheme and len(scheme) > 1:
        raise Rejected(
            RejectCode.UNSUPPORTED_SOURCE,
            f"unsupported source {source!r}: use a path, an http(s) URL, an upload, or one of "
            f"{', '.join(sorted(BUILTIN_SOURCES))}",
        )
    if not source.startswith("/"):
        raise Rejected(
            RejectCode.UNSAFE_PATH,
            f"source path {source!r} must be absolute (under an allowed root)",
        )
    return SourceRef("path", source)


def archive_kind(name: str) -> Literal["tar", "zip"] | None:
    lowered = name.lower()
    if lowered.endswith((".tar", ".tar.gz", ".tgz")):
        return "tar"
    if lowered.endswith(".zip"):
        return "zip"
    return None


# --- archive members --------------------------------------------------------------------------

MemberKind = Literal["file", "dir", "symlink", "hardlink", "device", "fifo", "other"]
_DRIVE = re.compile(r"^[A-Za-z]:")


def member_path(name: str) -> PurePosixPath:
    """The relative path an archive member may be written to, or :class:`Rejected`.

    Refuses absolute names, drive letters, backslashes, NUL bytes and any ``..`` — before and
    after normalisation — so a name can never land outside the extraction folder.
    """
    if not name or "\x00" in name or "\\" in name or _DRIVE.match(name):
        raise Rejected(RejectCode.UNSAFE_ARCHIVE, f"archive member {name!r} has an unsafe name")
    if name.startswith("/"):
        raise Rejected(RejectCode.UNSAFE_ARCHIVE, f"archive member {name!r} is an absolute path")
    if ".." in name.split("/"):
        raise Rejected(RejectCode.UNSAFE_ARCHIVE, f"archive member {name!r} climbs out with '..'")
    normal = posixpath.normpath(name)
    if normal.startswith(("../", "/")) or normal in {"..", "."}:
        raise Rejected(
            RejectCode.UNSAFE_ARCHIVE, f"archive member {name!r} escapes after normalisation"
        )
    return PurePosixPath(normal)


def is_top_folder(name: str) -> bool:
    """``.`` or ``./``: the folder an archive was made from (``tar -C folder -cf - .``)."""
    return bool(name) and not name.startswith("/") and posixpath.normpath(name) == "."


def link_escapes(name: str, target: str, *, hard: bool = False) -> bool:
    """Whether a link member ``name`` to ``target`` points outside the folder it is unpacked
    into: a symbolic link's target is relative to the link's own folder, a hard link's to the
    archive's top. (Links are refused either way; this only says how bad one is.)"""
    if not target or target.startswith("/") or "\\" in target or _DRIVE.match(target):
        return True
    base = "" if hard else posixpath.dirname(posixpath.normpath(name))
    joined = posixpath.normpath(posixpath.join(base, target))
    return joined == ".." or joined.startswith("../")


@dataclass
class Budget:
    """Running totals of what a source adds, checked against the limits file by file.

    ``packed_bytes`` is the size of the archive being unpacked (for the ratio guard), or None
    for plain files.
    """

    limits: Limits
    packed_bytes: int | None = None
    files: int = 0
    bytes: int = 0

    def admit(
        self, name: str, kind: MemberKind, size: int, *, link: str | None = None
    ) -> PurePosixPath | None:
        """Check one entry before it is written: its path for a file, None for a folder.
        ``link``: where a link member points, in archive terms (it is refused either way; the
        reason says whether it escapes)."""
        if kind == "dir" and is_top_folder(name):
            return None
        path = member_path(name)
        if kind == "dir":
            return None
        if kind != "file":
            what: str = "special file" if kind == "other" else kind
            if link is not None:
                where = "outside" if link_escapes(name, link, hard=kind == "hardlink") else "inside"
                what = f"{what} to {link!r} ({where} the {self.limits.of})"
            raise Rejected(
                RejectCode.UNSAFE_ARCHIVE,
                f"{name!r} is a {what}; only regular files and folders are allowed",
            )
        self.files += 1
        if self.files > self.limits.max_files:
            raise Rejected(
                RejectCode.TOO_MANY_FILES,
                f"the {self.limits.of} has more than {self.limits.max_files} files "
                f"({self.limits.setting('max_files')})",
            )
        self.add_bytes(name, size)
        return path

    def add_bytes(self, name: str, size: int) -> None:
        """Account bytes (declared, or actually written: headers can lie)."""
        limits = self.limits
        if size > limits.max_file_bytes:
            raise Rejected(
                RejectCode.TOO_LARGE,
                f"{name!r} is larger than {limits.max_file_bytes} bytes "
                f"({limits.setting('max_file_bytes')})",
            )
        self.bytes += size
        if self.bytes > limits.max_bytes:
            raise Rejected(
                RejectCode.TOO_LARGE,
                f"the {limits.of} is larger than {limits.max_bytes} bytes "
                f"({limits.setting('max_bytes')})",
            )
        if self.packed_bytes is None:
            return
        ratio_cap = max(self.packed_bytes, 1) * limits.max_compression_ratio
        if self.bytes > ratio_cap and self.bytes > 1 << 20:
            raise Rejected(
                RejectCode.TOO_LARGE,
                f"archive expands more than {limits.max_compression_ratio:g}x "
                f"({self.packed_bytes} packed bytes): refused as a decompression bomb "
                f"({limits.setting('max_compression_ratio')})",
            )


# --- URLs -------------------------------------------------------------------------------------

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def check_url(url: str, allowed_hosts: Sequence[str]) -> str:
    """The host of an http(s) URL that the allow list admits; :class:`Rejected` otherwise."""
    parts = urlsplit(url)
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        raise Rejected(RejectCode.URL_DENIED, f"{url!r} is not an http(s) URL with a host")
    if parts.username or parts.password:
        raise Rejected(RejectCode.URL_DENIED, f"{url!r}: credentials in URLs are not accepted")
    host = parts.hostname.lower()
    if not any(fnmatch(host, pattern.lower()) for pattern in allowed_hosts):
        raise Rejected(
            RejectCode.URL_DENIED,
            f"host {host!r} is not in the URL allow list (TORCHRELAY_INGEST_URL_ALLOWED_HOSTS)",
        )
    return host


def address_allowed(address: str, allowed_networks: Iterable[IpNetwork]) -> bool:
    """Public addresses are allowed; loopback, private, link-local, multicast, reserved and
    unspecified ones only when a configured network contains them."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if any(ip in network for network in allowed_networks):
        return True
    return not (
        ip.is_private
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
    )


def file_name_from_url(url: str) -> str:
    """The name to store a downloaded file under: the URL path's last segment."""
    name = PurePosixPath(urlsplit(url).path).name
    if not name or name in {".", ".."}:
        return "download"
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)[:200]


# --- content ----------------------------------------------------------------------------------


def version_id(files: Iterable[tuple[str, str]]) -> str:
    """A version id from (relative path, sha256) pairs: same content, same version."""
    digest = hashlib.sha256()
    for path, sha in sorted(files):
        digest.update(f"{path}\0{sha}\n".encode())
    return digest.hexdigest()[:16]


def detect_format(paths: Sequence[PurePosixPath]) -> DatasetFormat:
    """The format of a dataset from its file names; :class:`Rejected` when it is mixed or
    unknown."""
    if not paths:
        raise Rejected(RejectCode.INVALID_DATA, "the dataset has no files")
    suffixes = {p.suffix.lower() for p in paths}
    if suffixes == {".npz"}:
        return "npz"
    if suffixes == {".csv"}:
        return "csv"
    if suffixes <= {".pt", ".pth"}:
        return "pt"
    if suffixes <= IMAGE_SUFFIXES and all(len(p.parts) == 2 for p in paths):
        return "images"
    if suffixes <= IMAGE_SUFFIXES:
        raise Rejected(
            RejectCode.INVALID_DATA,
            "an image dataset needs one sub-folder per class with the images inside",
        )
    raise Rejected(
        RejectCode.UNKNOWN_FORMAT,
        f"cannot tell the format from the files ({', '.join(sorted(suffixes)) or 'no suffix'}); "
        "supported: .npz, .csv, .pt/.pth, or class folders of images",
    )


def expected_format(requested: str, detected: DatasetFormat) -> DatasetFormat:
    if requested not in {"auto", detected}:
        raise Rejected(
            RejectCode.INVALID_DATA, f"the request says {requested}, but the files are {detected}"
        )
    return detected


class ManifestFile(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    path: str
    size_bytes: int
    sha256: str


class Manifest(BaseModel):
    """``manifest.json`` of a dataset version."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    version: str
    format: DatasetFormat
    files: list[ManifestFile]
    size_bytes: int
    schema_summary: dict[str, JsonValue]
    source: str
    created: datetime
    request_id: str | None = None


# --- a pipeline's dataset named by a staged version ------------------------------------------

SHOWN_VERSIONS = 8


def staged_source(version: str | None) -> str:
    """What a pipeline that names a staged version asked for, as requests and
    ``dataset.rejected`` record a source."""
    return f"staged:{version or 'newest'}"


def choose_version(name: str, wanted: str | None, staged: Sequence[tuple[str, datetime]]) -> str:
    """The version of dataset ``name`` a pipeline names: ``wanted`` when it is among the
    ``staged`` (version, created) pairs, or without one the newest of them (by ``created``);
    :class:`Rejected` (unknown_version) when there is no such version."""
    newest_first = sorted(staged, key=lambda pair: (pair[1], pair[0]), reverse=True)
    versions = [version for version, _ in newest_first]
    if wanted is not None and wanted in versions:
        return wanted
    stage_one = "stage one first (POST /v1/datasets, or give the spec a source)"
    if not versions:
        nothing = f"no version of dataset {name!r} is staged yet: {stage_one}"
        if wanted is not None:
            nothing = f"dataset {name!r} has no version {wanted!r}: {nothing}"
        raise Rejected(RejectCode.UNKNOWN_VERSION, nothing)
    if wanted is None:
        return versions[0]
    shown = ", ".join(versions[:SHOWN_VERSIONS])
    more = f", and {len(versions) - SHOWN_VERSIONS} older" if len(versions) > SHOWN_VERSIONS else ""
    raise Rejected(
        RejectCode.UNKNOWN_VERSION,
        f"dataset {name!r} has no version {wanted!r} (staged versions, newest first: "
        f"{shown}{more})",
    )


# --- workspaces -------------------------------------------------------------------------------

WORKSPACE_ARCHIVE = "workspace.tar"
GZIP_TYPES = frozenset({"application/gzip", "application/x-gzip", "application/x-tgz"})
TAR_MEMBER_OVERHEAD = 8 << 10
"""Generous bytes a tar spends per file beyond its data: a header and a long-name (pax)
record for the file and for a folder of its own, plus the padding of each to 512 bytes."""
TAR_SLACK = 1 << 20


def workspace_archive_name(filename: str | None, content_type: str) -> PurePosixPath:
    """The name to keep an uploaded workspace archive under while it is unpacked: the
    ``filename`` given (which must name an archive), or one the content type suggests."""
    if filename:
        name = PurePosixPath(file_name_from_url("/" + filename))
        if archive_kind(name.name) is None:
            raise Rejected(
                RejectCode.BAD_REQUEST,
                f"{filename!r} is not an archive name: send the workspace as a .tar, .tar.gz "
                "or .tgz (or a .zip)",
            )
        return name
    if content_type.lower() in GZIP_TYPES:
        return PurePosixPath(f"{WORKSPACE_ARCHIVE}.gz")
    return PurePosixPath(WORKSPACE_ARCHIVE)


def packed_limits(limits: Limits) -> Limits:
    """Caps on an uploaded workspace archive itself, before it is unpacked: as large as any
    workspace within ``limits`` can pack to (unpacked, ``limits`` holds exactly)."""
    cap = limits.max_bytes + limits.max_files * TAR_MEMBER_OVERHEAD + TAR_SLACK
    return limits.model_copy(update={"max_bytes": cap, "max_file_bytes": cap, "max_files": 1})


class WorkspaceManifest(BaseModel):
    """``manifest.json`` of a staged workspace: its id and every file under ``code/``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    workspace: str
    files: list[ManifestFile]
    size_bytes: int
    created: datetime
