"""The model server's HTTP API: Open Inference Protocol v2 over aiohttp, with metrics."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from torchrelay import __version__
from torchrelay.services.serve.server.batching import DynamicBatcher, Overloaded
from torchrelay.services.serve.server.model import LoadedModel
from torchrelay.services.serve.server.protocol import (
    HEADER_LENGTH,
    BadRequest,
    infer_response,
    parse_infer,
    split_binary,
)

LATENCY_BUCKETS_S = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
RETRY_AFTER_S = "1"


class ServerMetrics:
    def __init__(self, registry: CollectorRegistry, model: str) -> None:
        self.requests = Counter(
            "torchrelay_model_requests_total",
            "Inference requests by HTTP status.",
            ["model", "status"],
            registry=registry,
        )
        self.latency = Histogram(
            "torchrelay_model_request_seconds",
            "Inference latency, from request to response.",
            ["model"],
            buckets=LATENCY_BUCKETS_S,
            registry=registry,
        ).labels(model)
        self.batch_size = Histogram(
            "torchrelay_model_batch_size",
            "Rows per model call (dynamic batching merges concurrent requests).",
            ["model"],
            buckets=BATCH_BUCKETS,
            registry=registry,
        ).labels(model)
        self.queue_depth = Gauge(
            "torchrelay_model_queue_depth",
            "Requests waiting for the model.",
            ["model"],
            registry=registry,
        ).labels(model)
        self._model = model

    def count(self, status: int) -> None:
        self.requests.labels(self._model, str(status)).inc()


def error(status: int, message: str, **headers: str) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)


class ModelApi:
    """The v2 routes of one loaded model (the batcher's: swapping it swaps what they serve).

    A version staged for an in-place swap (:attr:`staged`) answers only when asked by its
    version (``/v2/models/{name}/versions/{staged}/infer``) on this server's own (private)
    port: that is how the deployer smoke-checks it before the switch. On the shared port,
    where clients are, it does not exist until it serves, and every unversioned request keeps
    going to the serving model.
    """

    def __init__(
        self,
        batcher: DynamicBatcher[LoadedModel],
        metrics: ServerMetrics,
        registry: CollectorRegistry,
        max_body_bytes: int,
    ) -> None:
        self.batcher = batcher
        self.staged: LoadedModel | None = None
        self.private_port: int | None = None
        """This server's own port (the only one where :attr:`staged` answers)."""
        self.metrics = metrics
        self.registry = registry
        self.max_body_bytes = max_body_bytes
        self.in_flight = 0

    def routes(self, app: web.Application) -> None:
        app.router.add_get("/v2", self.server_metadata)
        app.router.add_get("/v2/health/live", self.live)
        app.router.add_get("/v2/health/ready", self.ready)
        for prefix in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
            app.router.add_get(prefix, self.model_metadata)
            app.router.add_get(f"{prefix}/ready", self.model_ready)
            app.router.add_post(f"{prefix}/infer", self.infer)
        app.router.add_get("/metrics", self.prometheus)

    @property
    def model(self) -> LoadedModel:
        """The serving model."""
        return self.batcher.model

    def _addressed(self, request: web.Request) -> LoadedModel | web.Response:
        """The model a request names (the serving one, or the staged one by its version), or
        the 404 that says what this server has."""
        name = request.match_info["name"]
        version = request.match_info.get("version")
        model, staged = self.model, self.staged
        if name == model.name:
            if version is None or version == model.version:
                return model
            if staged is not None and version == staged.version and self._private(request):
                return staged
        return error(
            404,
            f"unknown model {name!r} version {version!r}; this server has "
            f"{model.name!r} version {model.version!r}",
        )

    def _private(self, request: web.Request) -> bool:
        sockname = (
            None if request.transport is None else request.transport.get_extra_info("sockname")
        )
        return sockname is not None and sockname[1] == self.private_port

    async def server_metadata(self, _: web.Request) -> web.Response:
        return web.json_response({"name": "torchrelay", "version": __version__, "extensions": []})

    async def live(self, _: web.Request) -> web.Response:
        return web.json_response({"live": True})

    async def ready(self, _: web.Request) -> web.Response:
        return web.json_response({"ready": True})

    async def model_metadata(self, request: web.Request) -> web.Response:
        model = self._addressed(request)
        if isinstance(model, web.Response):
            return model
        metadata: dict[str, Any] = {
            "name": model.name,
            "versions": [model.version],
            "platform": model.platform,
            "inputs": [spec.metadata() for spec in model.inputs],
            "outputs": [spec.metadata() for spec in model.outputs],
        }
        if model.parameters:  # labels and preprocessing, when the model declares them
            metadata["parameters"] = model.parameters
        return web.json_response(metadata)

    async def model_ready(self, request: web.Request) -> web.Response:
        model = self._addressed(request)
        if isinstance(model, web.Response):
            return model
        return web.json_response({"name": model.name, "ready": True})

    async def infer(self, request: web.Request) -> web.Response:
        started = time.perf_counter()
        self.in_flight += 1
        try:
            response = await self._infer(request)
        finally:
            self.in_flight -= 1
        self.metrics.count(response.status)
        self.metrics.latency.observe(time.perf_counter() - started)
        return response

    async def _infer(self, request: web.Request) -> web.Response:
        addressed = self._addressed(request)
        if isinstance(addressed, web.Response):
            return addressed
        try:
            header, binary = await self._body(request)
            parsed = parse_infer(header, addressed.inputs, binary)
        except BadRequest as exc:
            return error(400, str(exc))
        model: LoadedModel
        if addressed is self.staged:  # a check before the switch: never batched with traffic
            output = await asyncio.to_thread(addressed.predict, parsed.array)
            model = addressed
        else:
            # One loop turn lets requests that are already here reach this point too: if none
            # did, this one is alone and runs at once; if some did, they batch.
            await asyncio.sleep(0)
            try:
                output, model = await self.batcher.infer(parsed.array, alone=self.in_flight == 1)
            except Overloaded as exc:
                retry = {"Retry-After": RETRY_AFTER_S}
                return error(503, f"overloaded: {exc}; retry shortly", **retry)
        asked = request.match_info.get("version")
        if asked is not None and model.version != asked:
            # The version it named was swapped out while it waited: answering with another
            # would be a wrong answer to a request that pinned its version.
            return error(
                404,
                f"model {model.name!r} version {asked!r} was replaced by version "
                f"{model.version!r} while this request waited; ask for that version or none",
            )
        # The version that computed the output, even if a swap happened meanwhile.
        body, header_length = infer_response(
            model.name,
            model.version,
            parsed.id,
            model.outputs[0].name,
            output,
            binary=parsed.binary_output,
        )
        if header_length is None:
            return web.Response(body=body, content_type="application/json")
        return web.Response(
            body=body,
            content_type="application/octet-stream",
            headers={HEADER_LENGTH: str(header_length)},
        )

    async def _body(self, request: web.Request) -> tuple[Any, bytes]:
        """The decoded JSON header and the binary tensor bytes after it (if any)."""
        too_big = f"the body is larger than {self.max_body_bytes} bytes"
        if request.content_length is not None and request.content_length > self.max_body_bytes:
            raise BadRequest(too_big)
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge as exc:
            raise BadRequest(too_big) from exc
        header, binary = split_binary(raw, request.headers.get(HEADER_LENGTH))
        try:
            return json.loads(header), binary
        except ValueError as exc:
            raise BadRequest(f"the body is not JSON: {exc}") from exc

    async def prometheus(self, _: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )


def build_app(
    batcher: DynamicBatcher[LoadedModel],
    metrics: ServerMetrics,
    registry: CollectorRegistry,
    *,
    max_body_bytes: int,
) -> tuple[web.Application, ModelApi]:
    metrics.queue_depth.set_function(lambda: batcher.depth)
    app = web.Application(client_max_size=max_body_bytes)
    api = ModelApi(batcher, metrics, registry, max_body_bytes)
    api.routes(app)
    return app, api
