"""Small builders of valid events for tests."""

from __future__ import annotations

from torchrelay.shared.events import DatasetIngestRequested, DatasetStaged
from torchrelay.shared.events.data import DatasetIngestRequestedData, DatasetStagedData


def ingest_requested(request_id: str = "req-1", **envelope: object) -> DatasetIngestRequested:
    envelope.setdefault("source", "/tests")
    return DatasetIngestRequested(
        data=DatasetIngestRequestedData(
            request_id=request_id, name="digits", source="sklearn:digits"
        ),
        **envelope,  # type: ignore[arg-type]
    )


def staged(version: str = "v1", **envelope: object) -> DatasetStaged:
    envelope.setdefault("source", "/torchrelay/ingest")
    return DatasetStaged(
        data=DatasetStagedData(
            name="digits",
            version=version,
            path=f"datasets/digits/{version}",
            format="npz",
            files=1,
            size_bytes=1024,
            manifest_sha256="a" * 64,
        ),
        **envelope,  # type: ignore[arg-type]
    )
