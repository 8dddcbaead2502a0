"""One model server process: ``python -m torchrelay.services.serve.server --model-dir DIR``.

Several processes may share one port (``--reuse-port``): the kernel spreads connections
across them, so one model uses more than one core for HTTP and JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import torch
from aiohttp import web
from prometheus_client import CollectorRegistry

from torchrelay.services.serve.server.app import ServerMetrics, build_app
from torchrelay.services.serve.server.batching import DynamicBatcher
from torchrelay.services.serve.server.model import ModelLoadError, load_model
from torchrelay.shared.cluster.lifeline import die_with_parent

EXIT_LOAD_FAILED = 3


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="torchrelay-model-server")
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--reuse-port", action="store_true")
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--max-delay-ms", type=float, default=0.0)
    parser.add_argument("--max-queue", type=int, default=512)
    parser.add_argument("--max-body-bytes", type=int, default=8 << 20)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--drain-s", type=float, default=10.0, help="longest wait for clients")
    return parser.parse_args(argv)


async def serve(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    try:
        model = await asyncio.to_thread(load_model, args.model_dir)
    except ModelLoadError as exc:
        print(json.dumps({"event": "model.load_failed", "error": str(exc)}), flush=True)  # noqa: T201
        return EXIT_LOAD_FAILED
    registry = CollectorRegistry()
    metrics = ServerMetrics(registry, model.name)
    batcher = DynamicBatcher(
        model.predict,
        max_batch_size=args.max_batch_size,
        max_delay_s=args.max_delay_ms / 1000,
        max_queue=args.max_queue,
        on_batch=metrics.batch_size.observe,
    )
    app = build_app(model, batcher, metrics, registry, max_body_bytes=args.max_body_bytes)
    control = Control(app)
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    control.runner = runner
    site = web.TCPSite(runner, args.host, args.port, reuse_port=args.reuse_port)
    await site.start()
    port = runner.addresses[0][1]
    control.private_port = port
    loop_task = asyncio.create_task(batcher.run(), name="batcher")
    stop = control.stop
    for signum in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(signum, stop.set)
    ready = {"event": "model.ready", "model": model.name, "version": model.version, "port": port}
    print(json.dumps(ready), flush=True)  # noqa: T201 - the launcher reads this line
    await stop.wait()
    # Stop accepting, answer what is in flight (with Connection: close), wait for clients to
    # leave, then stop the batcher.
    await control.drain(site, args.drain_s)
    await runner.cleanup()
    loop_task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await loop_task
    return 0


class Control:
    """Rollout control, on the private port only: join a shared (stable) port, and retire.

    Retiring stops listening everywhere, answers every later request on an open connection
    with ``Connection: close`` (so clients move to the new servers without a failed request),
    and exits once no connection is left or the drain time is up.
    """

    def __init__(self, app: web.Application) -> None:
        self.stop = asyncio.Event()
        self.draining = False
        self.private_port = 0
        self.runner: web.AppRunner | None = None
        self.shared: list[web.TCPSite] = []
        app.middlewares.append(self._close_when_draining)
        app.router.add_post("/admin/serve-on", self._serve_on)
        app.router.add_post("/admin/retire", self._retire)

    @web.middleware
    async def _close_when_draining(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        response = await handler(request)
        if self.draining:
            response.force_close()
        return response

    def _private(self, request: web.Request) -> bool:
        sockname: Any = request.transport.get_extra_info("sockname") if request.transport else None
        return sockname is not None and sockname[1] == self.private_port

    async def _serve_on(self, request: web.Request) -> web.Response:
        if not self._private(request) or self.runner is None:
            return web.json_response({"error": "not found"}, status=404)
        port = int(request.query["port"])
        site = web.TCPSite(
            self.runner, request.query.get("host", "127.0.0.1"), port, reuse_port=True
        )
        await site.start()
        self.shared.append(site)
        return web.json_response({"serving_on": port})

    async def _retire(self, request: web.Request) -> web.Response:
        if not self._private(request):
            return web.json_response({"error": "not found"}, status=404)
        self.stop.set()
        return web.json_response({"retiring": True})

    async def drain(self, private: web.TCPSite, drain_s: float) -> None:
        # Stop listening first, then ask clients to reconnect: a reconnect can only reach the
        # servers that still listen (the new version), never this one's closing queue.
        for site in [*self.shared, private]:
            await site.stop()  # closes the listening socket; open connections stay
        self.draining = True
        server = self.runner.server if self.runner is not None else None
        deadline = asyncio.get_running_loop().time() + drain_s
        while server is not None and server.connections:
            if asyncio.get_running_loop().time() >= deadline:
                break
            await asyncio.sleep(0.05)
        if self.runner is not None:
            await self.runner.shutdown()


def main(argv: list[str] | None = None) -> int:
    die_with_parent()
    return asyncio.run(serve(parse(argv)))


if __name__ == "__main__":
    sys.exit(main())
