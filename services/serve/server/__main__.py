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
from pathlib import Path

import torch
from aiohttp import web
from prometheus_client import CollectorRegistry

from torchrelay.services.serve.server.app import ServerMetrics, build_app
from torchrelay.services.serve.server.batching import DynamicBatcher
from torchrelay.services.serve.server.model import ModelLoadError, load_model

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
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, args.host, args.port, reuse_port=args.reuse_port)
    await site.start()
    port = runner.addresses[0][1]
    loop_task = asyncio.create_task(batcher.run(), name="batcher")
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(signum, stop.set)
    ready = {"event": "model.ready", "model": model.name, "version": model.version, "port": port}
    print(json.dumps(ready), flush=True)  # noqa: T201 - the launcher reads this line
    await stop.wait()
    # Stop accepting, let in-flight requests finish, then stop the batcher.
    await runner.shutdown()
    await runner.cleanup()
    loop_task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await loop_task
    return 0


def main(argv: list[str] | None = None) -> int:
    return asyncio.run(serve(parse(argv)))


if __name__ == "__main__":
    sys.exit(main())
