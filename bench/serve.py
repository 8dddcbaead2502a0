"""Serving benchmark: torchrelay's model servers against a floor, where users wait.

    python bench/serve.py [--rounds 3] [--cold-rounds 6] [--duration 3]
                          [--parts latency,cold,swap,rollout] [--json]

The floor is a minimal aiohttp handler running the same TorchScript model inline per request
(bench/serve_floor.py). Every part alternates the two sides (or repeats the measured action)
for ``--rounds`` rounds and reports the median ratio, so the noise of this shared machine hits
both sides alike:

- ``latency``: the model's stable endpoint after a real gated rollout on the local serving
  backend (private ports, ready, smoke inference, the SO_REUSEPORT join), with one and with two
  server processes, against the floor; load from ``wrk`` on keep-alive connections. Ratios
  ``p99_c64_1`` and ``p99_c64_2`` (torchrelay / floor, target <= 1.5), ``p50_c1`` and
  ``rps_c64`` (two processes).
- ``cold``: a model server process's start to its first correct prediction, against the
  floor's (both polled the same way). Ratio ``cold_start`` (target <= 1.1).
- ``swap``: an in-place swap between two versions of the same model under load (clients on
  keep-alive connections check every response's ``model_version``): ``swap_ms`` from the switch
  (the decision, once the new version is staged and smoke-checked) to the first answer by the
  new version (target <= 50), ``swap_failed_requests`` (failed answers and old-after-new answers
  on a connection; target 0), ``swap_stage_s`` (loading and checking it beforehand).
- ``rollout``: the real event path (a nats-server, the serve service as a process, a pipeline
  whose deploy stage is on): ``train.completed`` published -> the new version answering at the
  model's stable endpoint. ``rollout_s`` for a new version of a served model (the default
  in-place swap), ``rollout_first_s`` for the model's first deployment (servers started),
  ``rollout_full_s`` for a version with another architecture (new servers replace the old).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.integration.models import train_digits
from torchrelay.shared.cluster import ModelVersion
from torchrelay.shared.cluster.local_serving import LocalServingBackend
from torchrelay.shared.cluster.registry import ServerOptions

FLOOR = Path(__file__).with_name("serve_floor.py")
SERVER_MODULE = "torchrelay.services.serve.server"
MODEL = "digits"
LUA = """
wrk.method = "POST"
wrk.body = [[{body}]]
wrk.headers["Content-Type"] = "application/json"
"""
PARTS = ("latency", "cold", "swap", "rollout")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


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
    return {
        "p50_ms": seconds_of(p50[1]) * 1e3 if p50 else float("nan"),
        "p99_ms": seconds_of(p99[1]) * 1e3 if p99 else float("nan"),
        "rps": float(rate[1]) if rate else 0.0,
        "errors": float(errors[1]) if errors else 0.0,
    }


class Bench:
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.work = work
        self.figures: dict[str, float] = {}
        self.ratios: dict[str, float] = {}
        self.sample = np.random.default_rng(0).random(64).round(4).tolist()
        tensor = {"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": self.sample}
        self.body = json.dumps({"inputs": [tensor]})
        self.script = work / "post.lua"
        self.script.write_text(LUA.format(body=self.body))
        self.expected: list[float] = []

    def model_dir(self, version: str) -> Path:
        return self.work / "models" / MODEL / version

    async def prepare(self) -> None:
        await train_digits(self.work, "v1", epochs=3)
        second = self.model_dir("v2")  # the same model under another version: a retrain
        shutil.copytree(self.model_dir("v1"), second)
        description = json.loads((second / "model.json").read_text())
        (second / "model.json").write_text(json.dumps({**description, "version": "v2"}))
        other = self.model_dir("v3")  # the same signature, another architecture: no swap
        other.mkdir()
        (other / "model.json").write_text(json.dumps({**description, "version": "v3"}))
        await asyncio.to_thread(_script_linear, other / "model.pt")

    # --- latency ---------------------------------------------------------------------------

    async def latency(self, floor_url: str) -> None:
        for servers in (1, 2):
            backend = LocalServingBackend(
                self.work, options=ServerOptions(max_batch_size=64), ready_timeout_s=60.0
            )
            try:
                work = ModelVersion(model=MODEL, version="v1", replicas=servers)
                handle = await backend.schedule(backend.dryrun(work))
                await self.smoke(await backend.ready(handle))
                ours = f"{await backend.promote(handle)}/infer"
                for url in (floor_url, ours):
                    wrk(url, 64, 1.0, self.script)  # warm up
                p99: list[float] = []
                p50: list[float] = []
                rps: list[float] = []
                for round_ in range(self.args.rounds):
                    sides = [("floor", floor_url), ("torchrelay", ours)]
                    if round_ % 2:
                        sides.reverse()  # neither side always goes first
                    seen = {
                        name: wrk(url, 64, self.args.duration, self.script) for name, url in sides
                    }
                    p99.append(seen["torchrelay"]["p99_ms"] / seen["floor"]["p99_ms"])
                    rps.append(seen["torchrelay"]["rps"] / seen["floor"]["rps"])
                    for name, row in seen.items():
                        print(
                            f"  {servers} server(s) round {round_} {name:10s} c64 "
                            f"p50 {row['p50_ms']:.1f} ms p99 {row['p99_ms']:.1f} ms "
                            f"{row['rps']:.0f} req/s non-2xx {row['errors']:.0f}",
                            file=sys.stderr,
                        )
                    if servers == 2:
                        alone = {
                            name: wrk(url, 1, self.args.duration, self.script)
                            for name, url in sides
                        }
                        p50.append(alone["torchrelay"]["p50_ms"] / alone["floor"]["p50_ms"])
                self.ratios[f"p99_c64_{servers}"] = median(p99)
                if servers == 2:
                    self.ratios["p50_c1"] = median(p50)
                    self.ratios["rps_c64"] = median(rps)
                else:
                    self.ratios["rps_c64_1"] = median(rps)
            finally:
                await backend.aclose()

    async def smoke(self, urls: list[str]) -> None:
        async with aiohttp.ClientSession() as http:
            for url in urls:
                answer = await self.infer(http, f"{url}/v2/models/{MODEL}/infer")
                if answer is None:
                    raise SystemExit(f"smoke inference on {url} failed")

    async def infer(self, http: aiohttp.ClientSession, url: str) -> dict[str, Any] | None:
        headers = {"Content-Type": "application/json"}
        async with http.post(url, data=self.body, headers=headers) as response:
            if response.status != 200:
                return None
            answer: dict[str, Any] = await response.json()
            return answer

    # --- cold start ------------------------------------------------------------------------

    async def cold(self) -> None:
        ratios: list[float] = []
        times: dict[str, list[float]] = {"floor": [], "torchrelay": []}
        for round_ in range(self.args.cold_rounds):
            sides = ["floor", "torchrelay"] if round_ % 2 == 0 else ["torchrelay", "floor"]
            took = {side: await self.first_prediction(side) for side in sides}
            for side, seconds in took.items():
                times[side].append(seconds)
            ratios.append(took["torchrelay"] / took["floor"])
            print(
                f"  cold start round {round_}: floor {took['floor']:.2f} s, "
                f"torchrelay {took['torchrelay']:.2f} s",
                file=sys.stderr,
            )
        self.ratios["cold_start"] = median(ratios)
        self.figures["cold_start_floor_s"] = median(times["floor"])
        self.figures["cold_start_s"] = median(times["torchrelay"])

    async def first_prediction(self, side: str) -> float:
        """Seconds from the process's start to its first correct answer."""
        port = free_port()
        model_dir = str(self.model_dir("v1"))
        if side == "floor":
            argv = [sys.executable, str(FLOOR), model_dir, str(port)]
        else:
            argv = [
                sys.executable,
                "-m",
                SERVER_MODULE,
                "--model-dir",
                model_dir,
                "--port",
                str(port),
            ]
        url = f"http://127.0.0.1:{port}/v2/models/{MODEL}/infer"
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        started = time.perf_counter()
        process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, env=env)
        try:
            async with aiohttp.ClientSession() as http:
                while True:
                    try:
                        answer = await self.infer(http, url)
                    except aiohttp.ClientConnectionError:
                        answer = None
                    if answer is not None and self.correct(answer):
                        return time.perf_counter() - started
                    if process.poll() is not None:
                        raise SystemExit(f"{side} exited ({process.returncode})")
                    await asyncio.sleep(0.005)
        finally:
            process.terminate()
            process.wait()

    def correct(self, answer: dict[str, Any]) -> bool:
        data = [float(x) for x in answer["outputs"][0]["data"]]
        if not self.expected:
            self.expected = data  # the first answer (the floor's or ours) is the reference
        return bool(np.allclose(data, self.expected, atol=1e-5))

    # --- in-place swap ---------------------------------------------------------------------

    async def swap(self) -> None:
        backend = LocalServingBackend(
            self.work, options=ServerOptions(max_batch_size=64, drain_s=1), ready_timeout_s=60
        )
        try:
            work = ModelVersion(model=MODEL, version="v1", replicas=2)
            handle = await backend.schedule(backend.dryrun(work))
            await self.smoke(await backend.ready(handle))
            endpoint = await backend.promote(handle)
            load = SwapLoad(f"{endpoint}/infer", self.body, self.args.connections, "v1")
            await asyncio.sleep(1.0)
            swap_ms: list[float] = []
            stage_s: list[float] = []
            current = "v1"
            for round_ in range(self.args.rounds * 2):
                target = "v2" if current == "v1" else "v1"
                staged = time.perf_counter()
                urls = await backend.stage(handle, target)
                async with aiohttp.ClientSession() as http:  # the deployer's check, by version
                    for url in urls:
                        path = f"{url}/v2/models/{MODEL}/versions/{target}/infer"
                        if await self.infer(http, path) is None:
                            raise SystemExit(f"the staged {target} did not answer on {url}")
                decided = time.perf_counter()
                stage_s.append(decided - staged)
                load.switch(decided, target)
                await backend.switch(handle, target)
                first = await load.first_answer_by(target, after=decided, timeout_s=10)
                swap_ms.append((first - decided) * 1e3)
                print(
                    f"  swap round {round_}: {current} -> {target} {swap_ms[-1]:.1f} ms "
                    f"(staged and checked in {stage_s[-1]:.2f} s)",
                    file=sys.stderr,
                )
                current = target
                await asyncio.sleep(0.5)
            await load.stop()
            self.figures["swap_ms"] = median(swap_ms)
            self.figures["swap_ms_max"] = max(swap_ms)
            self.figures["swap_stage_s"] = median(stage_s)
            self.figures["swap_failed_requests"] = float(load.failed())
            self.figures["swap_requests"] = float(load.answered())
        finally:
            await backend.aclose()

    # --- rollout through the event path ----------------------------------------------------

    async def rollout(self) -> None:
        from tests.integration.processes import serve_service
        from tests.integration.watching import watching
        from torchrelay.shared.bus.server import NatsServer
        from torchrelay.shared.events import ModelDeployed

        nats_server = NatsServer(self.work / "nats")
        nats_server.start()
        service = serve_service(nats_server.url, self.work, self.work / "serve.log", drain_s=1)
        try:
            await service.wait_ready(60)
            async with watching(nats_server.url, "bench-serve", [ModelDeployed]) as (bus, watcher):
                pipelines = await _pipelines(bus)
                published = await _train_completed(bus, pipelines, "v1", 0)
                deployed = await watcher.one(ModelDeployed, version="v1", timeout_s=120)
                endpoint = str(deployed.data.endpoint)
                await self.until_answers(endpoint, "v1")
                self.figures["rollout_first_s"] = time.perf_counter() - published
                took: list[float] = []
                current = "v1"
                for round_ in range(1, self.args.rounds * 2 + 1):
                    target = "v2" if current == "v1" else "v1"
                    published = await _train_completed(bus, pipelines, target, round_)
                    await self.until_answers(endpoint, target)
                    took.append(time.perf_counter() - published)
                    print(
                        f"  rollout round {round_}: train.completed -> {target} answering "
                        f"in {took[-1]:.3f} s",
                        file=sys.stderr,
                    )
                    current = target
                    await asyncio.sleep(0.3)
                self.figures["rollout_s"] = median(took)
                published = await _train_completed(bus, pipelines, "v3", 10_000)
                await self.until_answers(endpoint, "v3")
                self.figures["rollout_full_s"] = time.perf_counter() - published
        finally:
            service.stop()
            nats_server.stop()

    async def until_answers(self, endpoint: str, version: str) -> None:
        async with aiohttp.ClientSession() as http:
            deadline = time.perf_counter() + 120
            while time.perf_counter() < deadline:
                try:
                    answer = await self.infer(http, f"{endpoint}/infer")
                except aiohttp.ClientConnectionError:
                    answer = None
                if answer is not None and answer["model_version"] == version:
                    return
                await asyncio.sleep(0.002)
        raise SystemExit(f"{version} never answered at {endpoint}")


def _script_linear(path: Path) -> None:
    import warnings

    import torch

    module = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(module).save(str(path))  # type: ignore[no-untyped-call]


async def _pipelines(bus: Any) -> Any:
    from torchrelay.shared.pipelines import PipelineRecord
    from torchrelay.shared.state import KvState

    return (await KvState.open(bus.nc.jetstream())).store("pipelines", PipelineRecord)


async def _train_completed(bus: Any, pipelines: Any, version: str, round_: int) -> float:
    """A pipeline (trained, deploy stage pending) and its train.completed; when it was sent."""
    from torchrelay.shared.events import TrainCompleted
    from torchrelay.shared.events.data import PipelineSpec, TrainCompletedData
    from torchrelay.shared.pipelines import PipelineRecord, StageStatus, pipeline_key

    pipeline_id = f"bench-{round_}-{os.getpid()}"
    spec = PipelineSpec.model_validate(
        {
            "name": pipeline_id,
            "dataset": {"name": "digits", "source": "sklearn:digits"},
            "training": {"entrypoint": "m:f", "model_name": MODEL},
            "deploy": {"replicas": 2},
        }
    )
    now = datetime.now(UTC)
    done = StageStatus(status="succeeded", started=now, ended=now)
    stages = {"ingest": done, "train": done, "deploy": StageStatus()}
    record = PipelineRecord(pipeline_id=pipeline_id, spec=spec, submitted=now, stages=stages)
    await pipelines.create(pipeline_key(pipeline_id), record)
    event = TrainCompleted(
        source="/bench",
        pipelineid=pipeline_id,
        data=TrainCompletedData(
            run_id=f"run-{version}-{round_}",
            model_name=MODEL,
            model_version=version,
            path=f"models/{MODEL}/{version}",
            metrics={"accuracy": 0.9},
        ),
    )
    sent = time.perf_counter()
    await bus.publish(event)
    return sent


class SwapLoad:
    """Clients on keep-alive connections (one each), recording every answer's version and
    when it came, and every failure."""

    def __init__(self, url: str, body: str, connections: int, first: str) -> None:
        self.url = url
        self.body = body
        self.answers: list[list[tuple[float, str]]] = [[] for _ in range(connections)]
        self.failures = 0
        self.versions = [first]
        """The versions served, in order: the first, then one per switch."""
        self.switched: list[float] = []
        self._stop = asyncio.Event()
        self._tasks = [asyncio.create_task(self._client(seen)) for seen in self.answers]

    async def _client(self, seen: list[tuple[float, str]]) -> None:
        headers = {"Content-Type": "application/json"}
        connector = aiohttp.TCPConnector(limit=1)
        async with aiohttp.ClientSession(connector=connector) as http:
            while not self._stop.is_set():
                try:
                    async with http.post(self.url, data=self.body, headers=headers) as response:
                        if response.status != 200:
                            self.failures += 1
                            continue
                        version = (await response.json())["model_version"]
                        seen.append((time.perf_counter(), version))
                except aiohttp.ClientError:
                    self.failures += 1

    async def first_answer_by(self, version: str, *, after: float, timeout_s: float) -> float:
        deadline = time.perf_counter() + timeout_s
        while time.perf_counter() < deadline:
            times = [t for seen in self.answers for t, v in seen if t >= after and v == version]
            if times:
                return min(times)
            await asyncio.sleep(0.001)
        raise SystemExit(f"no answer by {version} within {timeout_s} s of the switch")

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    def answered(self) -> int:
        return sum(len(seen) for seen in self.answers)

    def failed(self) -> int:
        """Failed requests plus out-of-order answers: on each connection, the versions must
        follow the switches in order (old until the switch, then new), never go back."""
        mixed = 0
        for seen in self.answers:
            step = 0  # the switch whose version this connection is on
            for at, version in seen:
                if version == self.versions[step]:
                    continue
                ahead = step + 1
                if (
                    ahead < len(self.versions)
                    and version == self.versions[ahead]
                    and at >= self.switched[ahead - 1]
                ):
                    step = ahead
                    continue
                mixed += 1
        return self.failures + mixed

    def switch(self, at: float, version: str) -> None:
        """Say that ``version`` was switched to at ``at`` (perf_counter)."""
        self.switched.append(at)
        self.versions.append(version)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per wrk run")
    parser.add_argument(
        "--cold-rounds", type=int, default=6, help="cold starts per side (each a few seconds)"
    )
    parser.add_argument("--connections", type=int, default=16, help="swap load clients")
    parser.add_argument("--parts", default=",".join(PARTS))
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = parser.parse_args()
    parts = [part for part in args.parts.split(",") if part]
    if unknown := set(parts) - set(PARTS):
        raise SystemExit(f"unknown parts {sorted(unknown)}; choose from {PARTS}")
    if "latency" in parts and shutil.which("wrk") is None:
        raise SystemExit("bench/serve.py needs wrk: apt-get install wrk")
    work = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    bench = Bench(args, work)
    floor = None
    stdout = os.dup(1)
    if args.json:  # stdout carries the JSON alone: whatever else logs goes to stderr
        sys.stdout.flush()
        os.dup2(2, 1)
    try:
        await bench.prepare()
        if "cold" in parts:
            await bench.cold()
        if "latency" in parts:
            port = free_port()
            floor = subprocess.Popen(
                [sys.executable, str(FLOOR), str(bench.model_dir("v1")), str(port)],
                stdout=subprocess.PIPE,
                env={**os.environ, "OMP_NUM_THREADS": "1"},
            )
            assert floor.stdout is not None
            await asyncio.to_thread(floor.stdout.readline)
            await asyncio.sleep(0.5)
            await bench.latency(f"http://127.0.0.1:{port}/v2/models/{MODEL}/infer")
        if "swap" in parts:
            await bench.swap()
        if "rollout" in parts:
            await bench.rollout()
    finally:
        if floor is not None:
            floor.terminate()
            floor.wait()
        shutil.rmtree(work, ignore_errors=True)
        sys.stdout.flush()
        os.dup2(stdout, 1)
    report(bench.figures, bench.ratios, as_json=args.json)


def report(figures: dict[str, float], ratios: dict[str, float], *, as_json: bool) -> None:
    def rounded(values: dict[str, float]) -> dict[str, float]:
        return {name: round(value, 4) for name, value in values.items()}

    if as_json:
        print(json.dumps({"figures": rounded(figures), "ratios": rounded(ratios)}))
        return
    targets = {
        "p99_c64_1": "target <= 1.5",
        "p99_c64_2": "target <= 1.5",
        "cold_start": "target <= 1.1",
        "swap_ms": "target <= 50",
        "swap_failed_requests": "target 0",
    }
    for name, value in {**ratios, **figures}.items():
        kind = "x the floor" if name in ratios else ""
        note = targets.get(name, "")
        print(f"{name:24s} {value:10.3f}{kind}  {note}")


if __name__ == "__main__":
    asyncio.run(main())
