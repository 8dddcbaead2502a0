"""Glue: an ingest request (event or HTTP) -> staging -> KV records -> outcome event.

Idempotent: a request id that already has an outcome gets the same outcome again (same event
id, so the stream stores it once) and stages nothing.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Literal

import structlog
from prometheus_client import CollectorRegistry, Counter, Histogram
from pydantic import BaseModel, ConfigDict, JsonValue

from torchrelay.services.ingest.domain import (
    Manifest,
    RejectCode,
    Rejected,
    choose_version,
    expected_format,
    staged_source,
)
from torchrelay.services.ingest.fill import fill_for
from torchrelay.services.ingest.settings import IngestOptions
from torchrelay.services.ingest.staging import Fill, StagedVersion, Stager, StageRequest
from torchrelay.shared.bus.port import Publish
from torchrelay.shared.errors import AlreadyExists, TransientError
from torchrelay.shared.events import (
    DatasetIngestRequested,
    DatasetRejected,
    DatasetStaged,
    PipelineRejected,
    PipelineSubmitted,
)
from torchrelay.shared.events.data import (
    DatasetRejectedData,
    DatasetSource,
    DatasetStagedData,
    PipelineRejectedData,
)
from torchrelay.shared.pipelines import (
    PipelineRecord,
    Submission,
    conflict_reason,
    judge_submission,
    pipeline_key,
    record_stage,
)
from torchrelay.shared.state import State, Store, key_part
from torchrelay.shared.sweep_state import submission_refusal

log = structlog.get_logger("torchrelay.ingest")
_EVENT_IDS = uuid.UUID("0b6f3f1e-7f3a-4c8e-9d0e-3a9b6f1c2d4e")
STAGING_BUCKETS_S = (0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900)


class VersionRecord(BaseModel):
    """A staged dataset version, as the ``datasets`` bucket keeps it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    version: str
    format: str
    path: str
    files: int
    size_bytes: int
    source: str
    created: datetime


class RequestRecord(BaseModel):
    """The outcome of one ingest request."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    request_id: str
    name: str
    source: str
    status: Literal["staged", "rejected"]
    version: str | None = None
    code: str | None = None
    reason: str | None = None
    pipeline_id: str | None = None
    updated: datetime


VERSIONS = "versions"
REQUESTS = "requests"


def version_key(name: str, version: str) -> str:
    return f"{VERSIONS}.{key_part(name)}.{key_part(version)}"


def request_key(request_id: str) -> str:
    return f"{REQUESTS}.{key_part(request_id)}"


class IngestMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.bytes = Counter(
            "torchrelay_ingest_staged_bytes_total",
            "Bytes written into new dataset versions.",
            registry=registry,
        )
        self.files = Counter(
            "torchrelay_ingest_staged_files_total",
            "Files written into new dataset versions.",
            registry=registry,
        )
        self.seconds = Histogram(
            "torchrelay_ingest_staging_seconds",
            "Time to stage one dataset (fetch, copy, hash, validate, sync, publish).",
            buckets=STAGING_BUCKETS_S,
            registry=registry,
        )
        self.rejections = Counter(
            "torchrelay_ingest_rejections_total",
            "Refused ingest requests, by reason code.",
            ["code"],
            registry=registry,
        )
        self.workspaces = Counter(
            "torchrelay_ingest_staged_workspaces_total",
            "New workspaces staged (the same files again are not counted).",
            registry=registry,
        )


Outcome = DatasetStaged | DatasetRejected


class Ingestor:
    """Stages datasets for events and HTTP requests alike."""

    def __init__(
        self,
        *,
        stager: Stager,
        options: IngestOptions,
        state: State,
        publish: Publish,
        metrics: IngestMetrics,
        source: str,
        retain_s: float | None = None,
    ) -> None:
        self.stager = stager
        self.options = options
        self.versions: Store[VersionRecord] = state.store("datasets", VersionRecord)
        self.pipelines: Store[PipelineRecord] = state.store("pipelines", PipelineRecord)
        self.requests: Store[RequestRecord] = state.store("datasets", RequestRecord)
        self._publish = publish
        self.metrics = metrics
        self._source = source
        self._retain_s = retain_s
        """How long a pipeline that ingest ends (a refused dataset) is kept (None: for good)."""

    async def on_pipeline_submitted(self, event: PipelineSubmitted) -> None:
        """A pipeline starts here: store its record, then stage its dataset.

        A pipeline id names one spec for good: the same spec again changes nothing, another
        spec is refused with ``pipeline.rejected`` (see :func:`judge_submission`), and so is
        a pipeline that cannot run under its id (a sweep with low above high, a grid over a
        continuous range, an id too long for its runs: see :func:`submission_refusal`), before
        anything is stored.
        """
        pipeline_id = event.pipelineid or event.id
        spec = event.data.spec
        if (refusal := submission_refusal(pipeline_id, spec)) is not None:
            await self._refuse(event, pipeline_id, refusal.reason, refusal.code)
            return
        key = pipeline_key(pipeline_id)
        stored = await self.pipelines.get(key)
        existing = stored.value if stored else None
        verdict = judge_submission(existing, event.id, spec)
        if existing is not None and verdict is Submission.CONFLICTING:
            await self._refuse(
                event, pipeline_id, conflict_reason(existing, spec), Submission.CONFLICTING.value
            )
            return
        if existing is not None and verdict is Submission.REPEATED:
            log.info(
                "pipeline.resubmitted",
                note="same spec under an existing pipeline id: nothing to do",
                status=existing.status,
                submitted_event_id=existing.submitted_event_id,
            )
            return
        if verdict is Submission.NEW:
            record = PipelineRecord(
                pipeline_id=pipeline_id,
                spec=spec,
                submitted=event.time,
                submitted_event_id=event.id,
            )
            try:
                await self.pipelines.create(key, record)
            except AlreadyExists as exc:
                # Another submission under this id got there first: judge against it again.
                raise TransientError(
                    f"pipeline {pipeline_id} was created meanwhile", delay_s=0
                ) from exc
        dataset = spec.dataset
        request_id = f"{pipeline_id}.dataset"
        await record_stage(self.pipelines, pipeline_id, "ingest", "running", datetime.now(UTC))
        if dataset.source is None:
            await self.use_staged(
                request_id, dataset, pipeline_id=pipeline_id, causation_id=event.id
            )
            return
        await self.ingest(
            StageRequest(request_id, dataset.name, dataset.source, dataset.format),
            pipeline_id=pipeline_id,
            causation_id=event.id,
        )

    async def _refuse(
        self, event: PipelineSubmitted, pipeline_id: str, reason: str, code: str
    ) -> None:
        log.warning("pipeline.rejected", code=code, reason=reason)
        await self._publish(
            PipelineRejected(
                # Derived from the submission: a redelivery publishes the same event again.
                id=str(uuid.uuid5(_EVENT_IDS, f"pipeline-rejected:{event.id}")),
                source=self._source,
                subject=pipeline_id,
                pipelineid=pipeline_id,
                causationid=event.id,
                data=PipelineRejectedData(pipeline_id=pipeline_id, code=code, reason=reason[:512]),
            )
        )

    async def on_requested(self, event: DatasetIngestRequested) -> None:
        """Handler of ``dataset.ingest.requested``."""
        request = StageRequest(
            event.data.request_id, event.data.name, event.data.source, event.data.format
        )
        await self.ingest(request, pipeline_id=event.pipelineid, causation_id=event.id)

    async def ingest(
        self,
        request: StageRequest,
        fill: Fill | None = None,
        *,
        pipeline_id: str | None = None,
        causation_id: str | None = None,
    ) -> Outcome:
        """Stage (or recall) a request's dataset, record it, publish and return the outcome."""
        if (recalled := await self._recall(request.request_id, causation_id)) is not None:
            return recalled
        try:
            staged = await self.stager.stage(
                request, fill or fill_for(request.source, self.options)
            )
        except Rejected as rejected:
            return await self._reject(request, rejected, pipeline_id, causation_id)
        return await self._record(request, staged, pipeline_id, causation_id)

    async def use_staged(
        self,
        request_id: str,
        dataset: DatasetSource,
        *,
        pipeline_id: str | None = None,
        causation_id: str | None = None,
    ) -> Outcome:
        """A dataset named by a staged version (``dataset.version``, or the newest of
        ``dataset.name``): the same outcome as staging that content again would have, with
        nothing staged; ``unknown_version`` when there is no such version."""
        if (recalled := await self._recall(request_id, causation_id)) is not None:
            return recalled
        request = StageRequest(
            request_id, dataset.name, staged_source(dataset.version), dataset.format
        )
        try:
            version = choose_version(
                dataset.name, dataset.version, await self._staged_versions(dataset.name)
            )
            manifest = self.stager.read_manifest(dataset.name, version)
            if manifest is None:
                raise Rejected(  # noqa: TRY301 - refused like any other unknown version
                    RejectCode.UNKNOWN_VERSION,
                    f"version {version!r} of dataset {dataset.name!r} vanished from storage "
                    "while it was chosen: stage it again",
                )
            expected_format(dataset.format, manifest.format)
        except Rejected as rejected:
            return await self._reject(request, rejected, pipeline_id, causation_id)
        log.info("dataset.chosen", name=dataset.name, version=version, asked=dataset.version)
        return await self._record_outcome(request, manifest, pipeline_id, causation_id)

    async def _recall(self, request_id: str, causation_id: str | None) -> Outcome | None:
        """A request that already has an outcome gets it again (the same event id: the stream
        stores it once); None for a new one."""
        previous = await self.requests.get(request_key(request_id))
        if previous is None:
            return None
        return await self._conclude(previous.value, causation_id)

    async def _staged_versions(self, name: str) -> list[tuple[str, datetime]]:
        """The versions of ``name`` that are recorded and whose folder is on storage."""
        return [
            (item.value.version, item.value.created)
            for item in await self.versions.items(f"{VERSIONS}.{key_part(name)}")
            if self.stager.layout.manifest(name, item.value.version).is_file()
        ]

    async def _record(
        self,
        request: StageRequest,
        staged: StagedVersion,
        pipeline_id: str | None,
        causation_id: str | None,
    ) -> Outcome:
        manifest = staged.manifest
        await self.versions.mutate(
            version_key(manifest.name, manifest.version),
            lambda current: (
                current
                or VersionRecord(
                    name=manifest.name,
                    version=manifest.version,
                    format=manifest.format,
                    path=staged.path,
                    files=len(manifest.files),
                    size_bytes=manifest.size_bytes,
                    source=manifest.source,
                    created=manifest.created,
                )
            ),
        )
        if staged.created:
            self.metrics.bytes.inc(manifest.size_bytes)
            self.metrics.files.inc(len(manifest.files))
        self.metrics.seconds.observe(staged.seconds)
        log.info(
            "dataset.staged",
            name=manifest.name,
            version=manifest.version,
            files=len(manifest.files),
            size_bytes=manifest.size_bytes,
            new=staged.created,
            seconds=round(staged.seconds, 3),
        )
        return await self._record_outcome(request, manifest, pipeline_id, causation_id)

    async def _record_outcome(
        self,
        request: StageRequest,
        manifest: Manifest,
        pipeline_id: str | None,
        causation_id: str | None,
    ) -> Outcome:
        """Record a request's staged version, publish ``dataset.staged``, end the stage."""
        record = RequestRecord(
            request_id=request.request_id,
            name=request.name,
            source=request.source,
            status="staged",
            version=manifest.version,
            pipeline_id=pipeline_id,
            updated=datetime.now(UTC),
        )
        await self.requests.put(request_key(request.request_id), record)
        return await self._conclude(record, causation_id)

    async def _reject(
        self,
        request: StageRequest,
        rejected: Rejected,
        pipeline_id: str | None,
        causation_id: str | None,
    ) -> Outcome:
        record = RequestRecord(
            request_id=request.request_id,
            name=request.name,
            source=request.source,
            status="rejected",
            code=rejected.code.value,
            reason=rejected.reason[:512],
            pipeline_id=pipeline_id,
            updated=datetime.now(UTC),
        )
        await self.requests.put(request_key(request.request_id), record)
        self.metrics.rejections.labels(rejected.code.value).inc()
        log.warning(
            "dataset.rejected", name=request.name, code=rejected.code, reason=rejected.reason
        )
        return await self._conclude(record, causation_id)

    async def _conclude(self, record: RequestRecord, causation_id: str | None) -> Outcome:
        """End the pipeline's ingest stage as ``record`` says, then publish its outcome.

        The stage comes first, so whoever acts on the event reads the stage it reports; a
        redelivery after a crash between the two (the request is recorded) does both again,
        and a finished stage is never written twice. The event is made before either: one
        that cannot be (its staged version vanished) ends nothing."""
        outcome = self._outcome_of(record, causation_id)
        if record.pipeline_id is not None:
            now = datetime.now(UTC)
            if record.status == "staged":
                detail: dict[str, JsonValue] = {"dataset": record.name, "version": record.version}
                await record_stage(
                    self.pipelines, record.pipeline_id, "ingest", "succeeded", now, detail=detail
                )
            else:
                await record_stage(
                    self.pipelines, record.pipeline_id, "ingest", "failed", now,
                    reason=f"{record.code}: {record.reason}"[:512],
                    retain_s=self._retain_s,
                )  # fmt: skip
        await self._publish(outcome)
        return outcome

    def _outcome_of(self, record: RequestRecord, causation_id: str | None) -> Outcome:
        envelope = {
            "source": self._source,
            "subject": record.name,
            "pipelineid": record.pipeline_id,
            "causationid": causation_id,
        }
        if record.status == "rejected":
            return DatasetRejected(
                id=str(uuid.uuid5(_EVENT_IDS, f"rejected:{record.request_id}")),
                data=DatasetRejectedData(
                    request_id=record.request_id,
                    name=record.name,
                    source=record.source[:512],
                    code=record.code or "invalid_data",
                    reason=record.reason or "rejected",
                ),
                **envelope,
            )
        manifest = (
            self.stager.read_manifest(record.name, record.version) if record.version else None
        )
        if manifest is None or record.version is None:
            # Someone removed a staged version behind ingest's back: retry, then dead-letter.
            raise RuntimeError(f"dataset {record.name}/{record.version} vanished from storage")
        return DatasetStaged(
            id=str(uuid.uuid5(_EVENT_IDS, f"staged:{record.request_id}:{record.version}")),
            data=DatasetStagedData(
                request_id=record.request_id,
                name=record.name,
                version=record.version,
                path=self.stager.relative_dir(record.name, record.version),
                format=manifest.format,
                files=len(manifest.files),
                size_bytes=manifest.size_bytes,
                manifest_sha256=self.stager.manifest_sha256(record.name, record.version),
            ),
            **envelope,
        )
