"""Serving benchmark: the stable endpoint of a rolled-out digits model against a floor.

    python bench/serve.py [--duration 5] [--replicas 2]

The floor is a minimal aiohttp handler running the same TorchScript model inline per request
(bench/serve_floor.py). torchrelay's side is the model's stable endpoint after a real gated
rollout through the local serving backend (schedule on private ports, ready, a smoke
inference on each server, promote: the SO_REUSEPORT join), with dynamic batching. Load comes
from ``wrk`` (Debian's package) with keep-alive connections: p50/p99 at concurrency 1,
requests/s at 1, 16 and 64.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import aiohttp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.integration.models import train_digits
from torchrelay.shared.cluster import ModelVersion
from torchrelay.shared.cluster.local_serving import LocalServingBackend
from torchrelay.shared.cluster.registry import ServerOptions

FLOOR = Path(__file__).with_name("serve_floor.py")
LUA = """
wrk.method = "POST"
wrk.body = [[{body}]]
wrk.headers["Content-Type"] = "application/json"
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def wrk(url: str, connections: int, seconds: float, script: Path) -> dict[str, float]:
    argv = ["wrk", "-t", "1", "-c", str(connections), "-d", f"{max(1, round(seconds))}s"]
    argv += ["--latency", "-s", str(script), url]
    output = subprocess.run(argv, capture_output=True, text=True, check=True).stdout

    def seconds_of(text: str) -> float:
        match = re.match(r"([\d.]+)(us|ms|s|m)$", text)
        if match is None:
            return float("nan")
        return float(match[1]) * {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}[match[2]]

    p50 = re.search(r"50%\s+(\S+)", output)
    p99 = re.search(r"99%\s+(\S+)", output)
    rate = re.search(r"Requests/sec:\s+([\d.]+)", output)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    socket_errors = re.search(r"Socket errors: (.*)", output)
    return {
        "p50_ms": seconds_of(p50[1]) * 1e3 if p50 else float("nan"),
        "p99_ms": seconds_of(p99[1]) * 1e3 if p99 else float("nan"),
        "rps": float(rate[1]) if rate else 0.0,
        "errors": float(errors[1]) if errors else 0.0,
        "socket_errors": 1.0 if socket_errors else 0.0,
    }


async def smoke(urls: list[str], body: str) -> None:
    """One inference on every server before it joins the endpoint, as the deployer does."""
    async with aiohttp.ClientSession() as http:
        for url in urls:
            infer = f"{url}/v2/models/digits/versions/bench/infer"
            headers = {"Content-Type": "application/json"}
            async with http.post(infer, data=body, headers=headers) as response:
                if response.status != 200:
                    raise SystemExit(f"smoke inference on {url}: HTTP {response.status}")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--replicas", type=int, default=2)
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("bench/serve.py needs wrk: apt-get install wrk")
    work = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    floor = None
    serving = LocalServingBackend(
        work, options=ServerOptions(max_batch_size=64), ready_timeout_s=60.0
    )
    try:
        model_dir = await train_digits(work, "bench", epochs=3)
        sample = np.random.default_rng(0).random(64).round(4).tolist()
        tensor = {"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": sample}
        body = json.dumps({"inputs": [tensor]})
        script = work / "post.lua"
        script.write_text(LUA.format(body=body))
        port = free_port()
        floor = subprocess.Popen(
            [sys.executable, str(FLOOR), str(model_dir), str(port)], stdout=subprocess.PIPE
        )
        assert floor.stdout is not None
        await asyncio.to_thread(floor.stdout.readline)
        await asyncio.sleep(0.5)
        version = ModelVersion(model="digits", version="bench", replicas=args.replicas)
        handle = await serving.schedule(serving.dryrun(version))
        await smoke(await serving.ready(handle), body)
        endpoint = await serving.promote(handle)
        urls = {
            "floor": f"http://127.0.0.1:{port}/v2/models/digits/infer",
            "torchrelay": f"{endpoint}/infer",
        }
        results: dict[str, dict[int, dict[str, float]]] = {"floor": {}, "torchrelay": {}}
        for url in urls.values():
            wrk(url, 4, 1.0, script)  # warm up
        for connections in (1, 16, 64):
            for name, url in urls.items():  # same conditions, back to back
                results[name][connections] = wrk(url, connections, args.duration, script)
    finally:
        if floor is not None:
            floor.terminate()
            floor.wait()
        await serving.aclose()
        shutil.rmtree(work, ignore_errors=True)
    for name in ("floor", "torchrelay"):
        row = results[name]
        print(
            f"{name:10s} c1 p50 {row[1]['p50_ms']:.3f} ms p99 {row[1]['p99_ms']:.3f} ms | "
            + " | ".join(f"c{c} {row[c]['rps']:7.0f} req/s" for c in (1, 16, 64))
            + f" | non-2xx {sum(row[c]['errors'] for c in row):.0f}"
        )
    p50_ratio = results["torchrelay"][1]["p50_ms"] / results["floor"][1]["p50_ms"]
    rps_ratio = results["torchrelay"][64]["rps"] / results["floor"][64]["rps"]
    print(f"p50 at c1: {p50_ratio:.2f}x the floor (target <= 1.5)")
    print(f"req/s at c64: {rps_ratio:.2f}x the floor (target >= 2)")


if __name__ == "__main__":
    asyncio.run(main())
