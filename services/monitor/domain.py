"""Pure rules of the monitor: keeping metric labels bounded."""

from __future__ import annotations

SERVICES = frozenset({"ingest", "train", "serve", "monitor", "cli"})
EXTERNAL = "external"
UNKNOWN = "unknown"


def source_label(source: str) -> str:
    """The producing service for ``/torchrelay/<service>[/...]``, else ``external``.

    Sources are free-form URIs chosen by publishers; labelling by them verbatim would let any
    publisher create unbounded time series.
    """
    parts = source.strip("/").split("/")
    if len(parts) >= 2 and parts[0] == "torchrelay" and parts[1] in SERVICES:
        return parts[1]
    return EXTERNAL


def type_label(event_type: str | None, known: frozenset[str]) -> str:
    """An event type if torchrelay knows it, else ``unknown`` (malformed payloads)."""
    return event_type if event_type in known else UNKNOWN
