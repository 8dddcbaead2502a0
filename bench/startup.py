"""Start-up benchmark: submit -> first training step, torchrelay against torchrun.

    python bench/startup.py [--rounds 5] [--warm-ranks 2] [--json]

Two local platforms run side by side, one with the default settings and one with
``TORCHRELAY_TRAIN_WARM_RANKS`` (standby ranks with torch imported), each with the digits data
set already staged. Every round runs, one after the other on an idle machine:

- torchrun: ``torchrun --nproc-per-node 2 bench/startup_trainer.py`` (gloo, CPU), timed from
  just before the spawn;
- torchrelay, default settings and warm pool: ``train.requested`` published on the bus (the
  whole event path: train service, backend, ranks, rendezvous), timed from just before the
  publish.

The clock stops where rank 0 of the same training function (bench/startup_trainer.py) stamps
the wall-clock time of its first optimizer step. Each ratio is torchrelay / torchrun per
round; the median over the rounds is reported (target: ``startup`` <= 1.0). Between sides the
bench waits for the machine to be quiet again: the previous job's processes gone and, on the
warm platform, the refilled standbys idle (their torch import done), so no side pays for the
last one's clean-up.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.procstat import total_cpu_s
from torchrelay import platform
from torchrelay.client import Client
from torchrelay.services.ingest.fill import fill_for
from torchrelay.services.ingest.settings import IngestOptions
from torchrelay.services.ingest.staging import Stager, StageRequest
from torchrelay.shared.events import TrainRequested
from torchrelay.shared.events.data import DatasetRef, TrainJobSpec, TrainRequestedData

BENCH = Path(__file__).resolve().parent
TRAINER = BENCH / "startup_trainer.py"
ENTRYPOINT = "startup_trainer:train"
TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
POLL_S = 0.005


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_stamp(stamp: Path, timeout_s: float = 120.0) -> float:
    deadline = time.monotonic() + timeout_s
    while not stamp.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no first step stamped in {stamp} after {timeout_s:g}s")
        time.sleep(POLL_S)
    return float(stamp.read_text())


def torchrun(data: Path, work: Path, round_: int) -> float:
    stamp = work / f"torchrun-{round_}.stamp"
    argv = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
        "--master-port", str(free_port()), str(TRAINER), str(data), str(stamp),
    ]  # fmt: skip
    began = time.time()
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        first = wait_for_stamp(stamp)
    finally:
        _, err = process.communicate(timeout=120)
    if process.returncode != 0:
        raise RuntimeError(f"torchrun failed ({process.returncode}): {err.decode()[-2000:]}")
    return first - began


class Side:
    """One local platform with the digits data set staged, and a client on its bus."""

    def __init__(self, name: str, state: Path, warm_ranks: int) -> None:
        self.name = name
        self.state = state
        self.warm_ranks = warm_ranks

    async def start(self) -> None:
        os.environ["TORCHRELAY_TRAIN_WARM_RANKS"] = str(self.warm_ranks)
        self.platform = await asyncio.to_thread(platform.start, self.state)
        self.root = self.platform.storage_root.resolve()
        staged = await Stager(self.root, IngestOptions().limits()).stage(
            StageRequest("bench", "digits", "sklearn:digits"),
            fill_for("sklearn:digits", IngestOptions()),
        )
        self.version = staged.manifest.version
        self.data = self.root / staged.path / "data" / "digits.npz"
        self.client = await Client.connect(platform.client_url(self.state, self.platform.nats_url))

    async def run(self, round_: int) -> float:
        run_id = f"startup-{self.name}-{round_}-{time.time_ns()}"
        stamp = self.state / f"{run_id}.stamp"
        event = TrainRequested(
            source="/bench/startup",
            data=TrainRequestedData(
                run_id=run_id,
                spec=TrainJobSpec(
                    dataset=DatasetRef(name="digits", version=self.version),
                    entrypoint=ENTRYPOINT,
                    world_size=2,
                    model_name="startup",
                    max_restarts=0,
                    hyperparameters={"first_step_file": str(stamp)},
                ),
            ),
        )
        began = time.time()
        await self.client.bus.publish(event)
        first = await asyncio.to_thread(wait_for_stamp, stamp)
        await self.finished(run_id)
        return first - began

    async def finished(self, run_id: str, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            record = await self.client.run(run_id)
            if record is not None and record.status in TERMINAL:
                if record.status != "succeeded":
                    raise RuntimeError(f"{run_id} {record.status}: {record.reason}")
                return
            await asyncio.sleep(0.05)
        raise TimeoutError(f"{run_id} did not finish in {timeout_s:g}s")

    async def stop(self) -> None:
        await self.client.aclose()
        await asyncio.to_thread(platform.stop, self.platform)


def _standbys(root: Path) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if b"worker.standby" not in (proc / "cmdline").read_bytes():
                continue
            if f"TORCHRELAY_STORAGE_ROOT={root}".encode() in (proc / "environ").read_bytes():
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


def settle(side: Side | None, timeout_s: float = 60.0) -> None:
    """Until the warm platform's standbys are all there and idle (their CPU time stands
    still), so the next side does not share the CPUs with a torch import."""
    if side is None or not side.warm_ranks:
        time.sleep(0.5)
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        pids = _standbys(side.root)
        before = total_cpu_s(pids)
        time.sleep(0.5)
        if len(pids) >= side.warm_ranks and total_cpu_s(pids) == before:
            return
    raise TimeoutError(f"the warm pool did not settle in {timeout_s:g}s")


async def bench(args: argparse.Namespace, state: Path) -> dict[str, list[float]]:
    # The workers import the bench's trainer: put this folder on their path and allow it.
    os.environ["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(BENCH), str(BENCH.parent), os.environ.get("PYTHONPATH")])
    )
    os.environ["TORCHRELAY_TRAIN_ENTRYPOINTS"] = (
        "torchrelay.services.train.examples,startup_trainer"
    )
    cold = Side("default", state / "default", 0)
    warm = Side("warm", state / "warm", args.warm_ranks)
    times: dict[str, list[float]] = {"torchrun": [], "default": [], "warm": []}
    await cold.start()
    try:
        await warm.start()
        try:
            settle(warm)
            for side in (cold, warm):  # unmeasured: first imports, page cache, JIT of the path
                await side.run(-1)
                settle(warm)
            for round_ in range(args.rounds):
                times["torchrun"].append(
                    await asyncio.to_thread(torchrun, cold.data, state, round_)
                )
                settle(warm)
                times["default"].append(await cold.run(round_))
                settle(warm)
                times["warm"].append(await warm.run(round_))
                settle(warm)
                if not args.json:
                    print(
                        f"round {round_ + 1}: torchrun {times['torchrun'][-1]:.2f}s, "
                        f"torchrelay {times['default'][-1]:.2f}s, "
                        f"with warm ranks {times['warm'][-1]:.2f}s",
                        flush=True,
                    )
        finally:
            await warm.stop()
    finally:
        await cold.stop()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warm-ranks", type=int, default=2)
    parser.add_argument("--json", action="store_true", help="print one JSON object only")
    args = parser.parse_args()
    state = Path(tempfile.mkdtemp(prefix="bench-startup-"))
    try:
        times = asyncio.run(bench(args, state))
    finally:
        shutil.rmtree(state, ignore_errors=True)
    ratios = {
        "startup": statistics.median(
            d / t for d, t in zip(times["default"], times["torchrun"], strict=True)
        ),
        "startup_warm": statistics.median(
            w / t for w, t in zip(times["warm"], times["torchrun"], strict=True)
        ),
    }
    figures = {
        "rounds": args.rounds,
        "warm_ranks": args.warm_ranks,
        "torchrun_s": statistics.median(times["torchrun"]),
        "startup_s": statistics.median(times["default"]),
        "startup_warm_s": statistics.median(times["warm"]),
    }
    if args.json:
        print(json.dumps({"figures": figures, "ratios": ratios}))
        return
    print(
        f"median over {args.rounds} rounds, submit -> first step: "
        f"torchrun {figures['torchrun_s']:.2f}s, torchrelay {figures['startup_s']:.2f}s "
        f"(startup {ratios['startup']:.2f}x, target <= 1.0), "
        f"with {args.warm_ranks} warm ranks {figures['startup_warm_s']:.2f}s "
        f"(startup_warm {ratios['startup_warm']:.2f}x)"
    )


if __name__ == "__main__":
    main()
