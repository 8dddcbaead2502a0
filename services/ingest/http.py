"""HTTP API of ingest: stage from a source or an upload, list and inspect datasets; stage and
inspect workspaces (a user's training code folder)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import PurePosixPath

import structlog
from aiohttp import BodyPartReader, web
from pydantic import TypeAdapter, ValidationError

from torchrelay.services.ingest.domain import (
    MANIFEST_NAME,
    Budget,
    RejectCode,
    Rejected,
    file_name_from_url,
    workspace_archive_name,
)
from torchrelay.services.ingest.handlers import VERSIONS, Ingestor, Outcome, version_key
from torchrelay.services.ingest.sources import Collected, stream_to_file, unpack_if_archive
from torchrelay.services.ingest.staging import StageRequest
from torchrelay.services.ingest.workspaces import Workspaces
from torchrelay.shared.events import DatasetStaged
from torchrelay.shared.events.data import DatasetIngestRequestedData, WorkspaceId
from torchrelay.shared.runtime.http import json_error
from torchrelay.shared.state import key_part

STATUS = {
    RejectCode.BAD_REQUEST: 400,
    RejectCode.MISSING_PATH: 404,
    RejectCode.UNSAFE_PATH: 403,
    RejectCode.UNSUPPORTED_SOURCE: 400,
    RejectCode.URL_DENIED: 403,
    RejectCode.UNREACHABLE: 422,
    RejectCode.TOO_LARGE: 413,
    RejectCode.TOO_MANY_FILES: 413,
    RejectCode.UNSAFE_ARCHIVE: 422,
    RejectCode.CORRUPT: 422,
    RejectCode.INVALID_DATA: 422,
    RejectCode.UNKNOWN_FORMAT: 422,
    RejectCode.UNKNOWN_VERSION: 404,
}
UPLOAD_CHUNK_BYTES = 1 << 20
_WORKSPACE_ID: TypeAdapter[str] = TypeAdapter(WorkspaceId)
log = structlog.get_logger("torchrelay.ingest")


def routes(ingestor: Ingestor, workspaces: Workspaces) -> list[web.RouteDef]:
    async def create(request: web.Request) -> web.Response:
        if request.content_type == "application/json":
            return await _from_source(request, ingestor)
        return await _from_upload(request, ingestor)

    async def list_datasets(_: web.Request) -> web.Response:
        names: dict[str, list[str]] = {}
        for item in await ingestor.versions.items(VERSIONS):
            names.setdefault(item.value.name, []).append(item.value.version)
        return web.json_response(
            {"datasets": [{"name": n, "versions": sorted(v)} for n, v in sorted(names.items())]}
        )

    async def show_dataset(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        versions = [
            item.value.model_dump(mode="json")
            for item in await ingestor.versions.items(f"{VERSIONS}.{key_part(name)}")
        ]
        if not versions:
            return json_error(404, f"no dataset named {name!r}")
        versions.sort(key=lambda v: v["created"])
        return web.json_response({"name": name, "versions": versions})

    async def show_version(request: web.Request) -> web.Response:
        name, version = request.match_info["name"], request.match_info["version"]
        record = await ingestor.versions.get(version_key(name, version))
        manifest = ingestor.stager.read_manifest(name, version)
        if record is None or manifest is None:
            return json_error(404, f"no version {version!r} of dataset {name!r}")
        return web.json_response(
            {
                **record.value.model_dump(mode="json"),
                "manifest": manifest.model_dump(mode="json"),
                "manifest_path": f"{record.value.path}/{MANIFEST_NAME}",
            }
        )

    async def create_workspace(request: web.Request) -> web.Response:
        """A tar archive of the folder's contents, sent raw (``?filename=`` optional)."""
        try:
            archive = workspace_archive_name(request.query.get("filename"), request.content_type)
            staged = await workspaces.stage(
                request.content.iter_chunked(UPLOAD_CHUNK_BYTES), archive
            )
        except Rejected as rejected:
            log.warning("workspace.rejected", code=rejected.code, reason=rejected.reason)
            return json_error(STATUS[rejected.code], rejected.reason, code=rejected.code.value)
        manifest = staged.manifest
        if staged.created:
            ingestor.metrics.workspaces.inc()
        log.info(
            "workspace.staged",
            workspace=manifest.workspace,
            files=len(manifest.files),
            size_bytes=manifest.size_bytes,
            new=staged.created,
        )
        return web.json_response(
            {
                "workspace": manifest.workspace,
                "path": staged.path,
                "files": len(manifest.files),
                "size_bytes": manifest.size_bytes,
                "created": staged.created,
            },
            status=201,
        )

    async def show_workspace(request: web.Request) -> web.Response:
        workspace_id = request.match_info["workspace"]
        try:
            _WORKSPACE_ID.validate_python(workspace_id)
        except ValidationError:
            return json_error(
                400,
                f"{workspace_id!r} is not a workspace id (16 lowercase hex digits)",
                code=RejectCode.BAD_REQUEST.value,
            )
        manifest = workspaces.read_manifest(workspace_id)
        if manifest is None:
            return json_error(404, f"no workspace {workspace_id!r} is staged")
        return web.json_response(manifest.model_dump(mode="json"))

    return [
        web.post("/v1/datasets", create),
        web.get("/v1/datasets", list_datasets),
        web.get("/v1/datasets/{name}", show_dataset),
        web.get("/v1/datasets/{name}/{version}", show_version),
        web.post("/v1/workspaces", create_workspace),
        web.get("/v1/workspaces/{workspace}", show_workspace),
    ]


async def _from_source(request: web.Request, ingestor: Ingestor) -> web.Response:
    try:
        body = await request.json()
    except ValueError as exc:
        return json_error(400, f"body is not JSON: {exc}")
    if not isinstance(body, dict):
        return json_error(400, "body must be a JSON object")
    body.setdefault("request_id", str(uuid.uuid4()))
    try:
        data = DatasetIngestRequestedData.model_validate(body)
    except ValidationError as exc:
        return _invalid(exc)
    outcome = await ingestor.ingest(
        StageRequest(data.request_id, data.name, data.source, data.format)
    )
    return _respond(outcome)


async def _from_upload(request: web.Request, ingestor: Ingestor) -> web.Response:
    """A raw body (``?name=..&filename=..``) or a multipart form with a ``file`` field."""
    query = {
        "request_id": request.query.get("request_id", str(uuid.uuid4())),
        "name": request.query.get("name", ""),
        "format": request.query.get("format", "auto"),
        "source": "upload",
    }
    try:
        data = DatasetIngestRequestedData.model_validate(query)
    except ValidationError as exc:
        return _invalid(exc)
    if request.content_type.startswith("multipart/"):
        reader = await request.multipart()
        part = await reader.next()
        if not isinstance(part, BodyPartReader) or part.name != "file":
            return json_error(400, "the multipart form needs a 'file' field first")
        filename = part.filename or request.query.get("filename", "")
        chunks = _part_chunks(part)
    else:
        filename = request.query.get("filename", "")
        chunks = request.content.iter_chunked(UPLOAD_CHUNK_BYTES)
    if not filename:
        return json_error(400, "name the uploaded file (?filename=data.npz or the form's filename)")
    relative = PurePosixPath(file_name_from_url("/" + filename))

    async def fill(collected: Collected, budget: Budget) -> None:
        await stream_to_file(chunks, relative, collected, budget)
        await asyncio.to_thread(unpack_if_archive, relative, collected, budget)

    outcome = await ingestor.ingest(
        StageRequest(data.request_id, data.name, f"upload:{relative}", data.format), fill
    )
    return _respond(outcome)


async def _part_chunks(part: BodyPartReader) -> AsyncIterator[bytes]:
    while chunk := await part.read_chunk(UPLOAD_CHUNK_BYTES):
        yield chunk


def _invalid(exc: ValidationError) -> web.Response:
    problems = [
        {"field": ".".join(str(p) for p in err["loc"]), "problem": err["msg"]}
        for err in exc.errors(include_url=False)
    ]
    return json_error(400, "invalid request", code=RejectCode.BAD_REQUEST.value, problems=problems)


def _respond(outcome: Outcome) -> web.Response:
    if isinstance(outcome, DatasetStaged):
        return web.json_response(outcome.data.model_dump(mode="json"), status=201)
    code = RejectCode(outcome.data.code)
    return json_error(
        STATUS[code], outcome.data.reason, code=code.value, request_id=outcome.data.request_id
    )
