"""One model server process: ``python -m torchrelay.services.serve.server --model-dir DIR``.

Several processes may share one port (``--reuse-port``): the kernel spreads connections
across them, so one model uses more than one core for HTTP and JSON.

Rollout control (join a shared port, retire, stage and switch to a new version in place)
listens only on ``--admin-socket``, a unix socket of mode 0600: the TCP ports serve inference,
health and metrics, and nothing that can reach them can take a version off the air. Without
``--admin-socket`` (a Kubernetes pod, where the Deployment does the rolling) there is no
control at all; SIGTERM still drains and exits.

Once the model is loaded, everything allocated so far (torch's and aiohttp's modules, the
model) is moved out of the garbage collector's sight (``gc.freeze``): a full collection then
walks only what requests allocate, instead of stalling every request in flight for 100 ms
and more while it walks some 200k long-lived objects.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import signal
import socket
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import torch
from aiohttp import web
from prometheus_client import CollectorRegistry

from torchrelay.services.serve.server.app import ModelApi, ServerMetrics, build_app
from torchrelay.services.serve.server.batching import DynamicBatcher
from torchrelay.services.serve.server.model import (
    LoadedModel,
    ModelLoadError,
    load_model,
    swap_problem,
)
from torchrelay.shared.cluster.lifeline import die_with_parent
from torchrelay.shared.cluster.unix_sockets import socket_address

EXIT_LOAD_FAILED = 3
EXIT_ADMIN_FAILED = 4


def freeze_heap() -> None:
    """Keep every object alive now out of later collections (see the module's docstring):
    after the imports and each model load. No collection first: on a busy machine one takes
    close to half a second of the start, for a little garbage kept."""
    gc.freeze()


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
    parser.add_argument(
        "--admin-socket",
        type=Path,
        default=None,
        help="unix socket (created with mode 0600) for rollout control: serve-on, retire, "
        "stage, switch, unstage",
    )
    return parser.parse_args(argv)


async def serve(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    try:
        model = await asyncio.to_thread(load_model, args.model_dir)
    except ModelLoadError as exc:
        print(json.dumps({"event": "model.load_failed", "error": str(exc)}), flush=True)  # noqa: T201
        return EXIT_LOAD_FAILED
    freeze_heap()
    admin: socket.socket | None = None
    if args.admin_socket is not None:
        try:
            admin = admin_socket(args.admin_socket)
        except OSError as exc:
            failed = {"event": "model.admin_failed", "socket": str(args.admin_socket)}
            print(json.dumps({**failed, "error": str(exc)}), flush=True)  # noqa: T201
            return EXIT_ADMIN_FAILED
    try:
        await _serve(args, model, admin)
    finally:
        if admin is not None:
            admin.close()  # already closed once it served; not when the start failed
            args.admin_socket.unlink(missing_ok=True)
    return 0


async def _serve(args: argparse.Namespace, model: LoadedModel, admin: socket.socket | None) -> None:
    registry = CollectorRegistry()
    metrics = ServerMetrics(registry, model.name)
    batcher = DynamicBatcher(
        model,
        max_batch_size=args.max_batch_size,
        max_delay_s=args.max_delay_ms / 1000,
        max_queue=args.max_queue,
        on_batch=metrics.batch_size.observe,
    )
    app, api = build_app(batcher, metrics, registry, max_body_bytes=args.max_body_bytes)
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    control = Control(app, runner, api)
    await runner.setup()
    site = web.TCPSite(runner, args.host, args.port, reuse_port=args.reuse_port)
    await site.start()
    port = runner.addresses[0][1]
    api.private_port = port
    control_runner: web.AppRunner | None = None
    if admin is not None:
        # A short shutdown: a control request is answered at once, nothing waits on it.
        control_runner = web.AppRunner(
            control.admin_app(), handle_signals=False, access_log=None, shutdown_timeout=1.0
        )
        await control_runner.setup()
        await web.SockSite(control_runner, admin).start()
    loop_task = asyncio.create_task(batcher.run(), name="batcher")
    stop = control.stop
    for signum in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(signum, stop.set)
    ready = {
        "event": "model.ready",
        "model": model.name,
        "version": model.version,
        "port": port,
        "admin": None if args.admin_socket is None else str(args.admin_socket),
    }
    print(json.dumps(ready), flush=True)  # noqa: T201 - the launcher reads this line
    await stop.wait()
    # No more control, stop accepting, answer what is in flight (with Connection: close), wait
    # for clients to leave, then stop the batcher.
    if control_runner is not None:
        await control_runner.cleanup()
    await control.drain(site, args.drain_s)
    await runner.cleanup()
    loop_task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await loop_task


def admin_socket(path: Path) -> socket.socket:
    """The control channel's socket: bound at ``path`` and made 0600 before it listens, so only
    this user (the serve replicas on this machine) can ever connect."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with socket_address(path) as address:
            sock.bind(address)  # fails if the path exists: never take over another's socket
    except OSError:
        sock.close()
        raise
    try:
        path.chmod(0o600)
    except OSError:
        sock.close()
        path.unlink(missing_ok=True)
        raise
    return sock


class Control:
    """Rollout control, served only by :meth:`admin_app` on the admin socket: join a shared
    (stable) port, retire, and swap versions in place. The inference app (every TCP port) has
    no control routes.

    An in-place swap has two steps, so that the deployer checks the new version before it
    takes traffic: ``stage`` loads it beside the serving one (refused with 409 when it is not
    the same model: another signature or architecture, see
    :func:`~torchrelay.services.serve.server.model.swap_problem`), after which it answers
    requests that name its version on this server's private port; ``switch`` makes it the
    serving one between two batches and keeps the old one staged, so that a deployer whose
    switch failed on another server can switch this one back; ``unstage`` drops what is
    staged (and a stage still loading).

    Retiring stops listening everywhere, answers every later request on an open connection
    with ``Connection: close`` (so clients move to the new servers without a failed request),
    and exits once no connection is left or the drain time is up.
    """

    def __init__(self, app: web.Application, runner: web.AppRunner, api: ModelApi) -> None:
        self.api = api
        self.stop = asyncio.Event()
        self.draining = False
        self.runner = runner
        self.shared: list[web.TCPSite] = []
        self.stages = 0
        """Bumped by each stage and unstage: a load that ends after a newer one is dropped."""
        app.middlewares.append(self._close_when_draining)

    def admin_app(self) -> web.Application:
        admin = web.Application()
        admin.router.add_post("/admin/serve-on", self._serve_on)
        admin.router.add_post("/admin/retire", self._retire)
        admin.router.add_post("/admin/stage", self._stage)
        admin.router.add_post("/admin/switch", self._switch)
        admin.router.add_post("/admin/unstage", self._unstage)
        return admin

    async def _stage(self, request: web.Request) -> web.Response:
        if self.stop.is_set():
            return web.json_response({"error": "retiring: stages nothing"}, status=409)
        folder = request.query.get("model-dir")
        if not folder:
            return web.json_response({"error": "stage needs ?model-dir=<folder>"}, status=400)
        self.stages += 1
        stage = self.stages
        try:
            candidate = await asyncio.to_thread(load_model, Path(folder))
        except ModelLoadError as exc:
            return web.json_response({"error": str(exc)}, status=422)
        if stage != self.stages:  # unstaged (or staged again) while this one loaded
            return web.json_response({"error": "unstaged while loading"}, status=409)
        if (problem := swap_problem(self.api.model, candidate)) is not None:
            return web.json_response({"error": problem}, status=409)
        # Not frozen (gc.freeze): a model is a few Python objects, and one frozen now would
        # never be collected once a later swap replaces it.
        self.api.staged = candidate
        return web.json_response({"staged": candidate.version})

    async def _switch(self, request: web.Request) -> web.Response:
        staged = self.api.staged
        version = request.query.get("version")
        if staged is None or staged.version != version:
            problem = f"version {version!r} is not staged here"
            return web.json_response({"error": problem}, status=409)
        previous = self.api.model
        self.api.batcher.swap(staged)  # the next batch runs on it
        # The old version stays staged until the deployer unstages it: if another server failed
        # to switch, a switch back to it puts every server on one version again.
        self.api.staged = previous
        event = {"event": "model.swapped", "from": previous.version, "to": version}
        print(json.dumps(event), flush=True)  # noqa: T201
        return web.json_response({"serving": version, "previous": previous.version})

    async def _unstage(self, _: web.Request) -> web.Response:
        self.stages += 1  # a stage still loading is dropped when it ends
        self.api.staged = None
        return web.json_response({"staged": None})

    @web.middleware
    async def _close_when_draining(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        response = await handler(request)
        if self.draining:
            response.force_close()
        return response

    async def _serve_on(self, request: web.Request) -> web.Response:
        if self.stop.is_set():
            return web.json_response({"error": "retiring: joins no port"}, status=409)
        try:
            port = int(request.query["port"])
        except (KeyError, ValueError):
            problem = f"serve-on needs ?port=<number>, got {request.query_string!r}"
            return web.json_response({"error": problem}, status=400)
        site = web.TCPSite(
            self.runner, request.query.get("host", "127.0.0.1"), port, reuse_port=True
        )
        await site.start()
        self.shared.append(site)
        return web.json_response({"serving_on": port})

    async def _retire(self, _: web.Request) -> web.Response:
        self.stop.set()
        return web.json_response({"retiring": True})

    async def drain(self, private: web.TCPSite, drain_s: float) -> None:
        # Stop listening first, then ask clients to reconnect: a reconnect can only reach the
        # servers that still listen (the new version), never this one's closing queue.
        for site in [*self.shared, private]:
            await site.stop()  # closes the listening socket; open connections stay
        self.draining = True
        server = self.runner.server
        deadline = asyncio.get_running_loop().time() + drain_s
        while server is not None and server.connections:
            if asyncio.get_running_loop().time() >= deadline:
                break
            await asyncio.sleep(0.05)
        await self.runner.shutdown()


def main(argv: list[str] | None = None) -> int:
    die_with_parent()
    return asyncio.run(serve(parse(argv)))


if __name__ == "__main__":
    sys.exit(main())
