"""The serve service's own routes: one entry point for every deployed model.

``/v2/models/{name}/...`` on the service's port is passed through to the model's stable
endpoint (its own port, which its servers share). Clients that care about the last
fraction of a millisecond talk to the model's port directly (``model.deployed`` names it).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import aiohttp
from aiohttp import web

from torchrelay.shared.runtime.http import json_error

PASSED_REQUEST_HEADERS = ("Content-Type", "Inference-Header-Content-Length", "Accept")
PASSED_RESPONSE_HEADERS = ("Content-Type", "Inference-Header-Content-Length", "Retry-After")


def routes(
    endpoint_of: Callable[[str], Awaitable[str | None]],
    session: Callable[[], aiohttp.ClientSession],
) -> list[web.RouteDef]:
    async def forward(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        endpoint = await endpoint_of(name)
        if endpoint is None:
            return json_error(404, f"model {name!r} is not deployed")
        base = endpoint.split("/v2/", 1)[0]
        headers = {k: request.headers[k] for k in PASSED_REQUEST_HEADERS if k in request.headers}
        try:
            async with session().request(
                request.method,
                f"{base}{request.path_qs}",
                data=await request.read(),
                headers=headers,
            ) as answer:
                body = await answer.read()
                passed = {
                    k: answer.headers[k] for k in PASSED_RESPONSE_HEADERS if k in answer.headers
                }
                return web.Response(status=answer.status, body=body, headers=passed)
        except aiohttp.ClientError as exc:
            return json_error(502, f"model {name!r} did not answer: {exc}")

    return [web.route("*", "/v2/models/{name}{tail:(/.*)?}", forward)]
