"""Which filler brings a request's source into the staging folder."""

from __future__ import annotations

import asyncio

from torchrelay.services.ingest.domain import Budget, classify_source
from torchrelay.services.ingest.fetch import download
from torchrelay.services.ingest.settings import IngestOptions
from torchrelay.services.ingest.sources import (
    Collected,
    copy_local,
    resolve_source_path,
    unpack_if_archive,
    write_digits,
)
from torchrelay.services.ingest.staging import Fill


def fill_for(source: str, options: IngestOptions) -> Fill:
    """The filler for a source string (a path, an http(s) URL, or a built-in sample); raises
    ``Rejected`` when it names nothing ingest may read, once staging calls it."""

    async def fill(collected: Collected, budget: Budget) -> None:
        ref = classify_source(source)
        if ref.kind == "builtin":
            await asyncio.to_thread(write_digits, collected, budget)
        elif ref.kind == "path":
            real = resolve_source_path(ref.value, options.allowed_roots)
            await asyncio.to_thread(copy_local, real, collected, budget)
        else:
            relative = await download(
                ref.value,
                collected,
                budget,
                allowed_hosts=options.url_allowed_hosts,
                allowed_networks=options.url_allowed_networks,
                timeout_s=options.url_timeout_s,
                max_redirects=options.url_max_redirects,
            )
            await asyncio.to_thread(unpack_if_archive, relative, collected, budget)

    return fill
