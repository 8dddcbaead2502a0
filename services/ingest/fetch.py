"""Downloading a URL source: streamed, capped, and only from hosts and addresses the policy
allows, checked again on every redirect and on every address a name resolves to."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Sequence
from pathlib import PurePosixPath
from typing import Any
from urllib.parse import urljoin, urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

from torchrelay.services.ingest.domain import (
    Budget,
    IpNetwork,
    RejectCode,
    Rejected,
    address_allowed,
    check_url,
    file_name_from_url,
)
from torchrelay.services.ingest.sources import Collected, stream_to_file

REDIRECTS = frozenset({301, 302, 303, 307, 308})
CHUNK_BYTES = 1 << 20


class GuardedResolver(AbstractResolver):
    """Resolves names, then keeps only addresses the policy allows (no DNS tricks into the
    cluster network). Records why a name was refused."""

    def __init__(self, allowed_networks: Sequence[IpNetwork]) -> None:
        self._inner = DefaultResolver()
        self._allowed = list(allowed_networks)
        self.denied: str | None = None

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        allowed = [r for r in results if address_allowed(r["host"], self._allowed)]
        if not allowed:
            addresses = ", ".join(sorted({r["host"] for r in results}))
            self.denied = (
                f"{host} resolves to {addresses}: loopback, private, link-local and reserved "
                "addresses are refused (TORCHRELAY_INGEST_URL_ALLOWED_NETWORKS)"
            )
            raise OSError(self.denied)
        return allowed

    async def close(self) -> None:
        await self._inner.close()


def _check_literal_address(host: str, allowed_networks: Sequence[IpNetwork]) -> None:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return  # a name: the resolver checks what it resolves to
    if not address_allowed(host, allowed_networks):
        raise Rejected(
            RejectCode.URL_DENIED,
            f"address {host} is loopback, private, link-local or reserved; refused "
            "(TORCHRELAY_INGEST_URL_ALLOWED_NETWORKS)",
        )


async def download(
    url: str,
    collected: Collected,
    budget: Budget,
    *,
    allowed_hosts: Sequence[str],
    allowed_networks: Sequence[IpNetwork],
    timeout_s: float,
    max_redirects: int,
) -> PurePosixPath:
    """Stream ``url`` into the staging folder; returns the stored file's relative path."""
    resolver = GuardedResolver(allowed_networks)
    timeout = aiohttp.ClientTimeout(total=None, connect=timeout_s, sock_read=timeout_s)
    connector = aiohttp.TCPConnector(resolver=resolver, use_dns_cache=False)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        current = url
        for _ in range(max_redirects + 1):
            host = check_url(current, allowed_hosts)
            _check_literal_address(host, allowed_networks)
            try:
                async with session.get(current, allow_redirects=False) as response:
                    if response.status in REDIRECTS and "Location" in response.headers:
                        current = urljoin(current, response.headers["Location"])
                        continue
                    if response.status != 200:
                        raise Rejected(
                            RejectCode.UNREACHABLE, f"{current} answered HTTP {response.status}"
                        )
                    _check_declared_size(response, budget)
                    relative = PurePosixPath(file_name_from_url(current))
                    await stream_to_file(
                        response.content.iter_chunked(CHUNK_BYTES), relative, collected, budget
                    )
                    return relative
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                if resolver.denied is not None:
                    raise Rejected(RejectCode.URL_DENIED, resolver.denied) from exc
                raise Rejected(
                    RejectCode.UNREACHABLE,
                    f"{urlsplit(current).netloc} unreachable ({type(exc).__name__}: {exc})",
                ) from exc
    raise Rejected(RejectCode.URL_DENIED, f"{url}: more than {max_redirects} redirects")


def _check_declared_size(response: Any, budget: Budget) -> None:
    declared = response.content_length
    cap = min(budget.limits.max_file_bytes, budget.limits.max_bytes - budget.bytes)
    if declared is not None and declared > cap:
        raise Rejected(
            RejectCode.TOO_LARGE, f"the server announces {declared} bytes, over the cap of {cap}"
        )
