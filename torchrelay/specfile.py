"""A pipeline spec file as a user writes it, made into a spec the platform can run.

In a file, a dataset ``source`` that is a plain path and a training ``workspace`` are the
user's own files, relative to the spec file: they are uploaded to ingest's HTTP API (staged
content-addressed on the shared storage, so the same files are the same version) and the
spec names what was staged instead. Sources with a scheme (``https://``, ``sklearn:``,
``file://`` for a path on the platform's side) are left to ingest, under its settings::

    dataset: {name: blobs, source: ./data/blobs.csv}     # uploaded from here
    training: {workspace: ./src, entrypoint: blobs_model:train, ...}

The reading and checking are pure (:func:`references`); :class:`Uploader` does the HTTP.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import re
import tarfile
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

import aiohttp
import yaml
from pydantic import ValidationError

from torchrelay.shared.events.data import PipelineSpec
from torchrelay.shared.sweeps import sweep_refusal

WORKSPACE_ID = re.compile(r"^[0-9a-f]{16}$")
SKIPPED = frozenset({"__pycache__", ".git", ".hg", ".svn", ".mypy_cache", ".pytest_cache"})
"""Folders never packed into a workspace or dataset upload (caches and version control)."""
UPLOAD_CHUNK_BYTES = 1 << 20


class SpecError(ValueError):
    """The spec file, or a file it names, cannot be used; the message says which and why."""


class _SpecLoader(yaml.SafeLoader):
    """YAML as :func:`yaml.safe_load` reads it, but for numbers in scientific notation.

    PyYAML follows YAML 1.1, whose floats need a dot and a signed exponent: ``1e-4`` and
    ``1E3`` would be strings, which a sweep's space refuses as non-numeric and a training
    function would get as text. Here they are floats, as in YAML 1.2 and JSON; a quoted
    ``'1e-4'`` stays a string. Local to spec files: nothing else's YAML changes.
    """


_SpecLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+.0123456789"),
)


@dataclass(frozen=True, slots=True)
class References:
    """The user's own files a spec file names (resolved, existing), or None for each."""

    dataset: Path | None
    workspace: Path | None


def load_yaml(text: str) -> Any:
    """YAML as spec files hold it: plain data only, ``1e-4`` a float (see :class:`_SpecLoader`)."""
    return yaml.load(text, _SpecLoader)  # noqa: S506 - a SafeLoader, with one resolver more


def read(path: Path) -> dict[str, Any]:
    """The spec file's content (YAML, or JSON for ``.json``), not yet validated."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise SpecError(f"spec file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(f"cannot read spec file {path}: {exc}") from exc
    try:
        raw = json.loads(text) if path.suffix == ".json" else load_yaml(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise SpecError(f"spec file {path} does not parse: {exc}") from exc
    if not isinstance(raw, dict):
        raise SpecError(f"spec file {path} must hold a mapping (name, dataset, training, ...)")
    return raw


def is_local_path(source: str) -> bool:
    """Whether a dataset source is a path on the submitter's machine: no scheme (an
    ``https://`` URL, ``sklearn:digits``, ``upload:...`` and ``file://`` are the platform's)."""
    scheme = urlsplit(source).scheme
    return not scheme or len(scheme) == 1  # a one-letter "scheme" is a Windows drive


def references(raw: dict[str, Any], base: Path) -> References:
    """The local files ``raw`` names, resolved against ``base`` (the spec file's folder);
    :class:`SpecError` when one does not exist."""
    dataset = raw.get("dataset")
    source = dataset.get("source") if isinstance(dataset, dict) else None
    data_path = None
    if isinstance(source, str) and is_local_path(source):
        data_path = _existing(base, source, "dataset source")
    training = raw.get("training")
    workspace = training.get("workspace") if isinstance(training, dict) else None
    code_path = None
    if isinstance(workspace, str):
        candidate = (base / workspace).resolve()
        if candidate.is_dir() or not WORKSPACE_ID.match(workspace):
            code_path = _existing(base, workspace, "workspace")
            if not code_path.is_dir():
                raise SpecError(f"workspace {workspace} ({code_path}) is not a folder")
    return References(data_path, code_path)


def _existing(base: Path, named: str, what: str) -> Path:
    path = (base / Path(named).expanduser()).resolve()
    if not path.exists():
        raise SpecError(f"{what} {named} does not exist (looked for {path})")
    return path


def staged_spec(
    raw: dict[str, Any], *, dataset_version: str | None, workspace: str | None
) -> PipelineSpec:
    """``raw`` naming what was staged instead of the local files, validated."""
    resolved = copy.deepcopy(raw)
    if dataset_version is not None:
        name = resolved["dataset"]["name"]
        resolved["dataset"] = {"name": name, "version": dataset_version}
    if workspace is not None:
        resolved["training"]["workspace"] = workspace
    try:
        spec = PipelineSpec.model_validate(resolved)
    except ValidationError as exc:
        raise SpecError(f"invalid pipeline spec, {_problems(exc)}") from exc
    # What relates a sweep's fields (low below high, ...) is no JSON Schema's: ingest would
    # refuse it with a pipeline.rejected; said here, it is said before anything is uploaded.
    if spec.sweep is not None and (reason := sweep_refusal(spec.sweep)) is not None:
        raise SpecError(f"invalid sweep: {reason}")
    return spec


def check(raw: dict[str, Any], refs: References) -> None:
    """Validate the spec before anything is uploaded, with stand-ins for what will be staged."""
    staged_spec(
        raw,
        dataset_version="0" * 16 if refs.dataset else None,
        workspace="0" * 16 if refs.workspace else None,
    )


HINTS = {
    "entrypoint": "must be module:function, e.g. blobs_model:train",
    "name": "must be a DNS label: lower-case letters, digits and '-', at most 63",
    "model_name": "must be a DNS label: lower-case letters, digits and '-', at most 63",
    "workspace": "must be a folder (relative to the spec file) or a staged workspace id",
}
"""What a field's pattern means, said instead of the pattern itself."""


def _problems(exc: ValidationError) -> str:
    """One line per problem, each naming its field (``training.hyperparams: ...``)."""
    lines = []
    for err in exc.errors(include_url=False):
        field = ".".join(str(part) for part in err["loc"]) or "<spec>"
        message = err["msg"]
        last = str(err["loc"][-1]) if err["loc"] else ""
        if err["type"] == "string_pattern_mismatch" and last in HINTS:
            message = f"{HINTS[last]} (got {err['input']!r})"
        elif err["type"] == "extra_forbidden":
            message = "unknown field (a misspelling?)"
        lines.append(f"  {field}: {message}")
    count = len(lines)
    return f"{count} problem{'s' if count > 1 else ''}\n" + "\n".join(lines)


# --- packing ----------------------------------------------------------------------------------


def files_of(folder: Path) -> Iterator[tuple[Path, str]]:
    """(file to read, name in the archive) for every regular file under ``folder``, sorted.

    A link to a file inside the folder is packed as that file's content; a link that leaves
    the folder, or to a folder, is refused (:class:`SpecError`): the platform stages plain
    files only. Version-control and cache folders are skipped.
    """
    root = folder.resolve()
    for current, folders, names in os.walk(root):
        folders[:] = sorted(f for f in folders if f not in SKIPPED)
        here = Path(current)
        for name in [*folders]:
            if (here / name).is_symlink():
                raise SpecError(f"{here / name} is a link to a folder; only files are packed")
        for name in sorted(names):
            path = here / name
            if name.endswith(".pyc"):
                continue
            if path.is_symlink():
                target = path.resolve()
                if not target.is_relative_to(root):
                    raise SpecError(f"{path} links to {target}, outside {root}")
                if not target.is_file():
                    raise SpecError(f"{path} links to {target}, which is not a file")
            elif not path.is_file():
                raise SpecError(f"{path} is not a regular file")
            yield path, path.relative_to(root).as_posix()


def pack(folder: Path) -> IO[bytes]:
    """A gzipped tar of ``folder``'s files (see :func:`files_of`), in a temporary file."""
    out = tempfile.TemporaryFile()  # noqa: SIM115 - handed to the caller, who closes it
    try:
        with tarfile.open(fileobj=out, mode="w:gz") as tar:
            for path, name in files_of(folder):
                info = tarfile.TarInfo(name)
                info.size = path.stat().st_size
                info.mode = 0o644
                with path.open("rb") as handle:
                    tar.addfile(info, handle)
    except BaseException:
        out.close()
        raise
    out.seek(0)
    return out


# --- uploading --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Staged:
    what: str
    """What was staged, for the user: ``workspace 1a2b...`` or ``dataset blobs version ...``."""
    ident: str
    created: bool


class Uploader:
    """Stages the user's files through ingest's HTTP API."""

    def __init__(self, ingest_url: str, *, token: str | None = None) -> None:
        self._url = ingest_url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}

    async def workspace(self, folder: Path) -> Staged:
        with await asyncio.to_thread(pack, folder) as body:
            answer = await self._post("/v1/workspaces", {}, body, "application/gzip", str(folder))
        ident = str(answer["workspace"])
        return Staged(f"workspace {ident}", ident, created=bool(answer.get("created", True)))

    async def dataset(self, name: str, path: Path, data_format: str) -> Staged:
        query = {"name": name, "format": data_format}
        if await asyncio.to_thread(path.is_dir):  # a folder travels as one archive
            query["filename"] = f"{name}.tar.gz"
            body, kind = await asyncio.to_thread(pack, path), "application/gzip"
        else:
            query["filename"] = path.name
            body, kind = await asyncio.to_thread(path.open, "rb"), "application/octet-stream"
        with body:
            answer = await self._post("/v1/datasets", query, body, kind, str(path))
        version = str(answer["version"])
        return Staged(f"dataset {name} version {version}", version, created=True)

    async def _post(
        self, path: str, query: dict[str, str], body: IO[bytes], content_type: str, what: str
    ) -> dict[str, Any]:
        headers = {**self._headers, "Content-Type": content_type}
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=300)
        try:
            async with (
                aiohttp.ClientSession(timeout=timeout) as session,
                session.post(
                    f"{self._url}{path}", params=query, data=_chunks(body), headers=headers
                ) as response,
            ):
                answer = await response.json(content_type=None)
                if response.status >= 400 or not isinstance(answer, dict):
                    reason = answer.get("error") if isinstance(answer, dict) else answer
                    raise SpecError(f"ingest refused {what} ({response.status}): {reason}")
                return answer
        except aiohttp.ClientError as exc:
            raise SpecError(f"cannot upload {what} to ingest at {self._url}: {exc}") from exc
        except ValueError as exc:  # not JSON: something else answers at that address
            raise SpecError(f"ingest at {self._url} answered {what} without JSON: {exc}") from exc


async def _chunks(body: IO[bytes]) -> AsyncIterator[bytes]:
    while chunk := await asyncio.to_thread(body.read, UPLOAD_CHUNK_BYTES):
        yield chunk


async def prepare(
    path: Path, uploader: Callable[[], Uploader], say: Callable[[str], None]
) -> PipelineSpec:
    """The spec in ``path`` with its local files staged (``uploader`` is asked for only when
    the spec names some)."""
    raw = await asyncio.to_thread(read, path)
    refs = await asyncio.to_thread(references, raw, path.parent)
    check(raw, refs)
    if refs.dataset is None and refs.workspace is None:
        return staged_spec(raw, dataset_version=None, workspace=None)
    client = uploader()
    workspace = None
    if refs.workspace is not None:
        staged = await client.workspace(refs.workspace)
        workspace = staged.ident
        say(f"staged {refs.workspace} as {staged.what}")
    version = None
    if refs.dataset is not None:
        dataset = raw["dataset"]
        staged = await client.dataset(dataset["name"], refs.dataset, dataset.get("format", "auto"))
        version = staged.ident
        say(f"staged {refs.dataset} as {staged.what}")
    return staged_spec(raw, dataset_version=version, workspace=workspace)
