"""Wiring and lifecycle of the ingest service."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import structlog

from torchrelay.services.ingest.handlers import IngestMetrics, Ingestor
from torchrelay.services.ingest.http import routes
from torchrelay.services.ingest.settings import IngestSettings
from torchrelay.services.ingest.staging import Stager
from torchrelay.services.ingest.workspaces import Workspaces
from torchrelay.shared.bus import Subscription
from torchrelay.shared.events import DatasetIngestRequested, PipelineSubmitted
from torchrelay.shared.runtime import Platform, Service, service_main
from torchrelay.shared.storage import clean_temporaries

NAME = "ingest"
log = structlog.get_logger("torchrelay.ingest")


@asynccontextmanager
async def build(platform: Platform[IngestSettings]) -> AsyncIterator[Service]:
    options = platform.settings.ingest
    stager = Stager(platform.settings.storage_root, options.limits(), workers=options.workers)
    stager.datasets.mkdir(parents=True, exist_ok=True)
    workspaces = Workspaces(platform.settings.storage_root, options.workspace_limits())
    workspaces.root.mkdir(parents=True, exist_ok=True)
    ingestor = Ingestor(
        stager=stager,
        options=options,
        state=platform.state,
        publish=platform.bus.publish,
        metrics=IngestMetrics(platform.registry),
        source=platform.source,
        retain_s=platform.settings.retention_s,
    )

    async def sweep(stop: asyncio.Event) -> None:
        """Remove staging leftovers of crashed writers, at start and every few minutes."""
        while not stop.is_set():
            removed = [
                path
                for root in (stager.datasets, workspaces.root)
                for path in await asyncio.to_thread(
                    clean_temporaries, root, older_than_s=options.temp_stale_s
                )
            ]
            if removed:
                log.info("ingest.cleaned_temporaries", paths=[str(p) for p in removed])
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(options.temp_stale_s / 3):
                    await stop.wait()

    yield Service(
        NAME,
        subscriptions=[
            Subscription(
                "ingest-requests",
                [DatasetIngestRequested],
                ingestor.on_requested,
                # Staging can take minutes: a few at a time, and no hoarding across replicas.
                max_in_flight=4,
                prefetch=4,
                ack_wait_s=60.0,
            ),
            Subscription(
                "ingest-pipelines",
                [PipelineSubmitted],
                ingestor.on_pipeline_submitted,
                max_in_flight=4,
                prefetch=4,
                ack_wait_s=60.0,
            ),
        ],
        routes=routes(ingestor, workspaces),
        background=[sweep],
    )


def main(argv: Sequence[str] | None = None) -> int:
    return service_main(NAME, IngestSettings, build, argv)
