"""The aiohttp side server every service runs: /healthz, /readyz, /metrics, plus its API."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, Sequence

import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from torchrelay.shared.runtime.settings import HttpSettings

log = structlog.get_logger("torchrelay.http")
ReadinessCheck = Callable[[], Awaitable[bool]]
OPEN_PATHS = frozenset({"/healthz", "/readyz"})


def json_error(status: int, message: str, **details: object) -> web.Response:
    """The one error body shape of every torchrelay HTTP API."""
    return web.json_response({"error": message, **details}, status=status)


def bearer_auth(token: str) -> web.middleware:  # type: ignore[valid-type]
    expected = f"Bearer {token}".encode()

    @web.middleware
    async def check(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if request.path in OPEN_PATHS:
            return await handler(request)
        given = request.headers.get("Authorization", "").encode()
        if not hmac.compare_digest(given, expected):
            return json_error(401, "missing or wrong bearer token")
        return await handler(request)

    return check


@web.middleware
async def json_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Every error answers JSON: HTTP errors keep their status, a crash is a logged 500."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return json_error(exc.status, exc.reason)
    except Exception:
        log.exception("http.unhandled", path=request.path, method=request.method)
        return json_error(500, "internal error; the service log has the details")


def build_app(
    settings: HttpSettings,
    *,
    registry: CollectorRegistry,
    ready: ReadinessCheck,
    routes: Sequence[web.AbstractRouteDef] = (),
) -> web.Application:
    middlewares = [json_errors]
    if settings.bearer_token is not None:
        middlewares.append(bearer_auth(settings.bearer_token.get_secret_value()))
    app = web.Application(middlewares=middlewares, client_max_size=1 << 20)

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_: web.Request) -> web.Response:
        if await ready():
            return web.json_response({"status": "ready"})
        return json_error(503, "not ready")

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_routes(routes)
    return app


async def start_http(app: web.Application, settings: HttpSettings) -> tuple[web.AppRunner, int]:
    """Start serving ``app``; returns the runner (to clean up) and the bound port."""
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.port)
    try:
        await site.start()
    except OSError:
        await runner.cleanup()
        raise
    address = runner.addresses[0]
    return runner, int(address[1])
