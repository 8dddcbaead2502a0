"""Sweep benchmark: eight trials of the digits example as one sweep against the same eight as
pipelines run one after another, and the CPU median stopping saves when half the trials diverge.

    python bench/sweep.py [--epochs 4] [--rounds 1] [--json] [--keep]

Four scenarios, each on a fresh local platform (``platform.start``, default settings: the
local backend, one replica of each service), deploy off everywhere:

- ``sweep``: one pipeline whose ``sweep:`` block is a grid over eight learning rates, two
  trials at a time (``parallel: 2``); the dataset is staged once;
- ``sequential``: the same eight learning rates as eight pipelines, each submitted when the one
  before has ended, as a user without sweeps runs them;
- ``diverging`` and ``diverging_stopped``: a grid over eight learning rates of which the last
  four blow the weights up, objective ``loss`` (minimize), ``parallel: 2``; without early
  stopping, and with median stopping (a 20-step warm-up, three completed trials).

Wall time runs from the first submission to the last pipeline's end (the platform's start and
stop are left out). CPU time is everything the platform used from its start to its stop: the
services, nats-server and every training rank (``getrusage(RUSAGE_CHILDREN)``: each service
waits for its ranks, this process for the services). A fifth scenario, ``idle``, starts and
stops a platform that does nothing: its CPU is the overhead in every other figure, and the
``*_work_cpu_s`` figures leave it out. With ``--rounds`` above one the scenarios' order
alternates and medians are reported.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))

from torchrelay import platform  # noqa: E402
from torchrelay.client import Client  # noqa: E402
from torchrelay.shared.events.data import PipelineSpec  # noqa: E402

DIGITS = "torchrelay.services.train.examples.digits:train"
SOUND = [0.003, 0.002, 0.004, 0.005, 0.0015, 0.006, 0.0025, 0.0035]
"""Eight learning rates Adam trains the digits CNN well with."""
DIVERGING = [0.003, 0.002, 0.004, 0.005, 20.0, 30.0, 40.0, 50.0]
"""Four sound learning rates, then four that blow the weights up (the loss turns NaN)."""
TIMEOUT_S = 1800


@dataclass
class Outcome:
    wall_s: float
    cpu_s: float
    trials: int
    stopped: int
    best_lr: float | None


def training(epochs: int, lr: float | None = None) -> dict[str, Any]:
    hyperparameters: dict[str, Any] = {"epochs": epochs}
    if lr is not None:
        hyperparameters["lr"] = lr
    return {
        "entrypoint": DIGITS,
        "model_name": "digits",
        "world_size": 1,
        "checkpoint_every_steps": 50,
        "hyperparameters": hyperparameters,
    }


def pipeline(name: str, epochs: int, *, lr: float | None = None, **sweep: Any) -> PipelineSpec:
    spec: dict[str, Any] = {
        "name": name,
        "dataset": {"name": "digits", "source": "sklearn:digits"},
        "training": training(epochs, lr),
        "deploy": {"enabled": False},
    }
    if sweep:
        spec["sweep"] = {"algorithm": "grid", "parallel": 2, **sweep}
    return PipelineSpec.model_validate(spec)


def scenarios(epochs: int) -> dict[str, tuple[list[PipelineSpec], bool]]:
    """Each scenario's pipelines, and whether they run one after another."""
    grid = {"lr": {"type": "choice", "values": SOUND}}
    accuracy = {"metric": "accuracy", "direction": "maximize"}
    diverging = {
        "space": {"lr": {"type": "choice", "values": DIVERGING}},
        "objective": {"metric": "loss", "direction": "minimize"},
        "max_trials": len(DIVERGING),
    }
    stopping = {"rule": "median", "warmup_steps": 20, "min_trials": 3}
    return {
        "idle": ([], False),
        "sweep": (
            [pipeline("sweep", epochs, space=grid, objective=accuracy, max_trials=len(SOUND))],
            False,
        ),
        "sequential": ([pipeline(f"one-{i}", epochs, lr=lr) for i, lr in enumerate(SOUND)], True),
        "diverging": ([pipeline("diverging", epochs, **diverging)], False),
        "diverging_stopped": (
            [pipeline("stopped", epochs, **diverging, early_stopping=stopping)],
            False,
        ),
    }


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


async def drive(url: str, specs: list[PipelineSpec], one_by_one: bool) -> tuple[float, list[str]]:
    client = await Client.connect(url)
    try:
        ids: list[str] = []
        started = time.monotonic()
        if one_by_one:
            for spec in specs:
                ids.append(await client.submit(spec))
                await ended(client, ids[-1])
        else:
            ids = [await client.submit(spec) for spec in specs]
            for pipeline_id in ids:
                await ended(client, pipeline_id)
        return time.monotonic() - started, ids
    finally:
        await client.aclose()


async def ended(client: Client, pipeline_id: str) -> None:
    record = await client.wait(pipeline_id, timeout_s=TIMEOUT_S, show=False)
    if record.status != "succeeded":
        raise RuntimeError(f"pipeline {pipeline_id} {record.status}: {record.stages}")


async def sweep_outcome(url: str, ids: list[str]) -> tuple[int, int, float | None]:
    """Trials run, trials stopped early, and the best trial's learning rate (sweeps only)."""
    client = await Client.connect(url)
    trials = stopped = 0
    best: float | None = None
    try:
        for pipeline_id in ids:
            async for event in client.events(last=100_000, follow=False, pipeline_id=pipeline_id):
                kind = str(event.get("type", ""))
                data = event.get("data", {})
                if kind.startswith("io.torchrelay.sweep.trial.started"):
                    trials += 1
                elif kind.startswith("io.torchrelay.sweep.trial.stopped"):
                    stopped += data.get("code") == "early_stopped"
                elif kind.startswith("io.torchrelay.sweep.completed"):
                    best = data.get("hyperparameters", {}).get("lr")
    finally:
        await client.aclose()
    return trials or len(ids), stopped, best


def run_scenario(work: Path, name: str, specs: list[PipelineSpec], one_by_one: bool) -> Outcome:
    state = work / name
    before = children_cpu_s()
    started = platform.start(state)
    try:
        url = platform.client_url(state, started.nats_url)
        wall_s, ids = asyncio.run(drive(url, specs, one_by_one))
        trials, stopped, best = asyncio.run(sweep_outcome(url, ids))
    finally:
        platform.stop(started)
    return Outcome(wall_s, children_cpu_s() - before, trials, stopped, best)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=4, help="45 steps an epoch (batch 32)")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-sweep-"))
    os.environ["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(BENCH.parent), os.environ.get("PYTHONPATH")])
    )
    plan = scenarios(args.epochs)
    results: dict[str, list[Outcome]] = {name: [] for name in plan}
    try:
        for index in range(args.rounds):
            order = list(plan) if index % 2 == 0 else list(reversed(plan))
            for name in order:
                specs, one_by_one = plan[name]
                outcome = run_scenario(work / f"round-{index}", name, specs, one_by_one)
                results[name].append(outcome)
                print(
                    f"round {index + 1} {name}: {outcome.wall_s:.1f}s wall, {outcome.cpu_s:.1f}s "
                    f"CPU, {outcome.trials} trials, {outcome.stopped} stopped early, best lr "
                    f"{outcome.best_lr}",
                    file=sys.stderr if args.json else sys.stdout,
                )
    finally:
        if args.keep:
            print(f"work folder kept: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)

    def median(name: str, field: str) -> float:
        return statistics.median(getattr(o, field) for o in results[name])

    figures = {
        "epochs": args.epochs,
        "rounds": args.rounds,
        **{f"{name}_wall_s": median(name, "wall_s") for name in plan},
        **{f"{name}_cpu_s": median(name, "cpu_s") for name in plan},
        **{
            f"{name}_work_cpu_s": median(name, "cpu_s") - median("idle", "cpu_s")
            for name in plan
            if name != "idle"
        },
        "diverging_stopped_trials_stopped": median("diverging_stopped", "stopped"),
        "sweep_best_lr": results["sweep"][-1].best_lr,
        "diverging_stopped_best_lr": results["diverging_stopped"][-1].best_lr,
    }
    ratios = {
        "sweep_vs_sequential_wall": figures["sweep_wall_s"] / figures["sequential_wall_s"],
        "early_stopping_cpu": figures["diverging_stopped_cpu_s"] / figures["diverging_cpu_s"],
        "early_stopping_work_cpu": (
            figures["diverging_stopped_work_cpu_s"] / figures["diverging_work_cpu_s"]
        ),
        "early_stopping_wall": figures["diverging_stopped_wall_s"] / figures["diverging_wall_s"],
    }
    if args.json:
        print(json.dumps({"figures": figures, "ratios": ratios}))
        return
    print(
        f"8 trials: one sweep (parallel 2) {figures['sweep_wall_s']:.1f}s vs 8 sequential "
        f"pipelines {figures['sequential_wall_s']:.1f}s = {ratios['sweep_vs_sequential_wall']:.2f}x"
        f" wall time; half diverging: median stopping stopped "
        f"{figures['diverging_stopped_trials_stopped']:.0f} trials, CPU "
        f"{figures['diverging_stopped_cpu_s']:.1f}s vs {figures['diverging_cpu_s']:.1f}s = "
        f"{ratios['early_stopping_cpu']:.2f}x ({1 - ratios['early_stopping_cpu']:.0%} saved; "
        f"{1 - ratios['early_stopping_work_cpu']:.0%} of the work beyond an idle platform's "
        f"{figures['idle_cpu_s']:.1f}s)"
    )


if __name__ == "__main__":
    main()
