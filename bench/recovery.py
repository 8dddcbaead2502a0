"""Recovery benchmark: SIGKILL of one rank -> the next attempt's first step, against torchrun.

    python bench/recovery.py [--rounds 5] [--epochs 4] [--checkpoint-every 10]
                             [--warm-ranks N] [--json] [--keep]

Both sides train the same loop (bench/recovery_trainer.py: the digits CNN, 2 ranks, CPU/gloo,
a checkpoint every ``--checkpoint-every`` steps) and one of their ranks (rank 1) is killed with
SIGKILL a while after the first checkpoint (the same delays on both sides, drawn per round):

- torchrelay: a local platform (``torchrelay up``'s services, default settings) runs the
  training stage of a pipeline; the kill is followed through the whole event path (the train
  service sees the rank die, stops its peer and reports ``train.failed``; the monitor asks for
  a restart; the train service launches the next attempt, which resumes from the newest
  checkpoint);
- torchrun: ``torchrun --standalone --nproc-per-node 2 --max-restarts 1`` on
  bench/recovery_plain.py, with ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` (without it torchrun's
  restart mostly does not come back).

The sides alternate within each round, the median ratio is reported. Each round also checks
that the resumed attempt started from the newest checkpoint there was, and that its weights
right after the resume are bit-identical to that checkpoint's (on every rank). For torchrelay
the recovery is split along the run's events: kill -> ``train.failed`` -> restart requested ->
``train.started`` -> first step.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
sys.path.insert(0, str(BENCH))

import torch  # noqa: E402
from recovery_trainer import digest  # noqa: E402

from torchrelay import platform  # noqa: E402
from torchrelay.client import Client  # noqa: E402
from torchrelay.shared.events.data import PipelineSpec  # noqa: E402
from torchrelay.shared.pipelines import train_run_id  # noqa: E402

PLAIN = BENCH / "recovery_plain.py"
TRAINER = "recovery_trainer"
POLL_S = 0.005
TIMEOUT_S = 120.0
_STEP = re.compile(r"^step-(\d+)\.pt$")


@dataclass
class Round:
    side: str
    seconds: float
    """From the SIGKILL to the first step of the next attempt."""
    resumed_from: int | None
    newest: int | None
    identical: bool
    """Every rank's weights right after the resume are the newest checkpoint's, bit for bit."""
    phases: dict[str, float] = field(default_factory=dict)

    @property
    def from_newest(self) -> bool:
        return self.newest is not None and self.resumed_from == self.newest


def appeared(path: Path, timeout_s: float = TIMEOUT_S) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear within {timeout_s:g}s")
        time.sleep(POLL_S)
    value: dict[str, Any] = json.loads(path.read_text())
    return value


def steps_in(checkpoints: Path) -> list[int]:
    if not checkpoints.is_dir():
        return []
    return sorted(int(m[1]) for p in checkpoints.iterdir() if (m := _STEP.match(p.name)))


def kill_and_time(out: Path, checkpoints: Path, delay_s: float) -> Round:
    """Kill rank 1 of attempt 0 ``delay_s`` after its first checkpoint; time attempt 1's
    first step and check what it resumed from (blocking: run it in a thread)."""
    appeared(out / "attempt-0-first-step.json")
    victim = appeared(out / "attempt-0-rank-1.json")
    deadline = time.monotonic() + TIMEOUT_S
    while not steps_in(checkpoints):
        if time.monotonic() > deadline:
            raise TimeoutError(f"no checkpoint in {checkpoints} within {TIMEOUT_S:g}s")
        time.sleep(POLL_S)
    time.sleep(delay_s)
    killed_at = time.time()
    os.kill(int(victim["pid"]), signal.SIGKILL)
    first = appeared(out / "attempt-1-first-step.json")
    # The new attempt writes its first checkpoint only steps later: what is there now is what
    # the killed attempt left.
    steps = steps_in(checkpoints)
    newest = steps[-1] if steps else None
    ranks = [appeared(out / f"attempt-1-rank-{rank}.json") for rank in (0, 1)]
    resumed = {rank["resumed_from"] for rank in ranks}
    identical = False
    if newest is not None and resumed == {newest}:
        saved = torch.load(checkpoints / f"step-{newest}.pt", map_location="cpu", weights_only=True)
        identical = all(rank["weights"] == digest(saved["model"]) for rank in ranks)
    return Round(
        side="",
        seconds=float(first["at"]) - killed_at,
        resumed_from=ranks[0]["resumed_from"] if len(resumed) == 1 else None,
        newest=newest,
        identical=identical,
        phases={
            "killed": killed_at,
            "spawned": min(float(rank["spawned"]) for rank in ranks),
            "ready": max(float(rank["ready"]) for rank in ranks),
            "first_step": float(first["at"]),
        },
    )


def spec(out: Path, args: argparse.Namespace, name: str) -> PipelineSpec:
    return PipelineSpec.model_validate(
        {
            "name": name,
            "dataset": {"name": "digits", "source": "sklearn:digits"},
            "training": {
                "entrypoint": f"{TRAINER}:train",
                "model_name": "recovery",
                "world_size": 2,
                "seed": 7,
                "checkpoint_every_steps": args.checkpoint_every,
                "keep_checkpoints": 2,
                "max_restarts": 1,
                "hyperparameters": {"epochs": args.epochs, "out": str(out)},
            },
            "deploy": {"enabled": False},
        }
    )


async def torchrelay_round(
    client: Client,
    storage: Path,
    work: Path,
    args: argparse.Namespace,
    *,
    index: int,
    delay_s: float,
) -> tuple[Round, Path]:
    out = work / f"torchrelay-{index}"
    out.mkdir()
    pipeline_id = await client.submit(spec(out, args, f"recovery-{index}"))
    run_id = train_run_id(pipeline_id)
    checkpoints = storage / "runs" / run_id / "checkpoints"
    result = await asyncio.to_thread(kill_and_time, out, checkpoints, delay_s)
    record = await client.wait(pipeline_id, timeout_s=TIMEOUT_S, show=False)
    if record.status != "succeeded":
        raise RuntimeError(f"pipeline {pipeline_id} {record.status}")
    result.side = "torchrelay"
    result.phases |= await event_times(client, pipeline_id)
    data = next((storage / "datasets" / "digits").glob("*/data/*.npz"))
    return result, data


async def event_times(client: Client, pipeline_id: str) -> dict[str, float]:
    """When the run's recovery events were published (wall clock)."""
    wanted = {
        ("train.failed", 0): "failed",
        ("train.restart.requested", 1): "restart_requested",
        ("train.started", 1): "started",
    }
    times: dict[str, float] = {}
    async for event in client.events(last=1000, follow=False, pipeline_id=pipeline_id):
        kind = str(event.get("type", "")).removeprefix("io.torchrelay.").rsplit(".", 1)[0]
        attempt = int(event.get("data", {}).get("attempt", -1))
        name = wanted.get((kind, attempt))
        if name is not None and name not in times:
            times[name] = datetime.fromisoformat(str(event["time"])).timestamp()
    return times


def torchrun_round(
    data: Path, work: Path, args: argparse.Namespace, *, index: int, delay_s: float
) -> Round:
    out = work / f"torchrun-{index}"
    (out / "checkpoints").mkdir(parents=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(BENCH), env.get("PYTHONPATH")]))
    command = [
        str(Path(sys.executable).with_name("torchrun")),
        "--standalone",
        "--nproc-per-node",
        "2",
        "--max-restarts",
        "1",
        str(PLAIN),
        str(data),
        str(out),
        str(args.epochs),
        str(args.checkpoint_every),
    ]
    log = (work / f"torchrun-{index}.log").open("wb")
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        result = kill_and_time(out, out / "checkpoints", delay_s)
        code = process.wait(TIMEOUT_S)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        log.close()
    if code != 0:
        raise RuntimeError(f"torchrun exited {code}: see {log.name}")
    result.side = "torchrun"
    return result


def stretches(rounds: list[Round], names: list[str]) -> str:
    """Median seconds between consecutive moments of the rounds (wall clock)."""
    parts = []
    for before, after in itertools.pairwise(names):
        spans = [
            r.phases[after] - r.phases[before] for r in rounds if {before, after} <= r.phases.keys()
        ]
        if spans:
            parts.append(f"{before}->{after} {statistics.median(spans):.2f}s")
    return ", ".join(parts)


async def run(args: argparse.Namespace, work: Path, started: platform.Platform) -> dict[str, Any]:
    client = await Client.connect(platform.client_url(work / "platform", started.nats_url))
    draw = random.Random(17)
    delays = [draw.uniform(0.0, 0.6) for _ in range(args.rounds)]
    ours: list[Round] = []
    theirs: list[Round] = []
    data: Path | None = None
    try:
        for index in range(args.rounds):
            delay_s = delays[index]
            sides = ["torchrelay", "torchrun"]
            if index % 2 == 1:  # the first round stages the data set both sides train on
                sides.reverse()
            for side in sides:
                if side == "torchrelay":
                    result, data = await torchrelay_round(
                        client, started.storage_root, work, args, index=index, delay_s=delay_s
                    )
                    ours.append(result)
                else:
                    assert data is not None
                    theirs.append(
                        await asyncio.to_thread(
                            torchrun_round, data, work, args, index=index, delay_s=delay_s
                        )
                    )
            print(
                f"round {index + 1}: kill {delay_s:.2f}s after a checkpoint: torchrelay "
                f"{ours[-1].seconds:.2f}s (resumed {ours[-1].resumed_from}, newest "
                f"{ours[-1].newest}, identical {ours[-1].identical}), torchrun "
                f"{theirs[-1].seconds:.2f}s (resumed {theirs[-1].resumed_from}, newest "
                f"{theirs[-1].newest}, identical {theirs[-1].identical})",
                file=sys.stderr if args.json else sys.stdout,
            )
    finally:
        await client.aclose()
    ratios = [a.seconds / b.seconds for a, b in zip(ours, theirs, strict=True)]
    return {
        "figures": {
            "rounds": args.rounds,
            "warm_ranks": args.warm_ranks or 0,
            "torchrelay_recovery_s": statistics.median(r.seconds for r in ours),
            "torchrun_recovery_s": statistics.median(r.seconds for r in theirs),
            "resumed_from_newest": sum(r.from_newest for r in ours) / len(ours),
            "bit_identical": sum(r.identical for r in ours) / len(ours),
            "torchrun_resumed_from_newest": sum(r.from_newest for r in theirs) / len(theirs),
            "torchrun_bit_identical": sum(r.identical for r in theirs) / len(theirs),
        },
        "ratios": {"recovery": statistics.median(ratios)},
        "stretches": {
            "torchrelay": stretches(ours, ["killed", "spawned", "ready", "first_step"]),
            "torchrun": stretches(theirs, ["killed", "spawned", "ready", "first_step"]),
            "events": stretches(ours, ["killed", "failed", "restart_requested", "started"]),
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=4, help="28 steps each (2 ranks)")
    parser.add_argument("--checkpoint-every", type=int, default=10)
    parser.add_argument(
        "--warm-ranks",
        type=int,
        default=None,
        help="TORCHRELAY_TRAIN_WARM_RANKS for the platform (default: its own default)",
    )
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-recovery-"))
    # The services and their workers import this checkout, and the trainer from here.
    os.environ["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(BENCH.parent), str(BENCH), os.environ.get("PYTHONPATH")])
    )
    os.environ["TORCHRELAY_TRAIN_ENTRYPOINTS"] = TRAINER
    if args.warm_ranks is not None:
        os.environ["TORCHRELAY_TRAIN_WARM_RANKS"] = str(args.warm_ranks)
    started = platform.start(work / "platform")
    try:
        report = asyncio.run(run(args, work, started))
    finally:
        platform.stop(started)
        if args.keep:
            print(f"work folder kept: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps({"figures": report["figures"], "ratios": report["ratios"]}))
        return
    figures, ratio = report["figures"], report["ratios"]["recovery"]
    print(
        f"median kill -> first step of the next attempt over {args.rounds} rounds: "
        f"torchrelay {figures['torchrelay_recovery_s']:.2f}s, torchrun "
        f"{figures['torchrun_recovery_s']:.2f}s = {ratio:.2f}x (target <= 1.0)"
    )
    print("median per stretch (spawned: the new attempt's first rank process started;")
    print("ready: every rank imported, joined, restored and wrapped its model):")
    for side, line in report["stretches"].items():
        print(f"  {side}: {line}")
    print(
        f"resumed from the newest checkpoint: torchrelay {figures['resumed_from_newest']:.0%} "
        f"(bit-identical {figures['bit_identical']:.0%}), torchrun "
        f"{figures['torchrun_resumed_from_newest']:.0%} "
        f"(bit-identical {figures['torchrun_bit_identical']:.0%})"
    )


if __name__ == "__main__":
    main()
