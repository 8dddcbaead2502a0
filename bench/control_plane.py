"""Control-plane benchmark: many pipelines at once on the simulated backends (issue 18).

    python bench/control_plane.py [--pipelines 1000] [--submit-s 60] [--fail-rate 0.05]
        [--burst 100000] [--idle-s 30] [--json]

A real nats-server and 3 replicas of every service as processes (``platform.start``), with the
simulated training and serving backends (no workers, no model servers: only the control plane
works). One warm-up pipeline stages scikit-learn's digits once; then ``--pipelines`` pipelines
are submitted, spread evenly over ``--submit-s``, each naming that staged version (ingest
resolves it without copying) and each training and deploying **its own model** by default
(``bench-<i>``: a realistic fleet of many models, every rollout a first one; ``--models K``
makes pipelines share K models, so rollouts replace each other's versions).

Measured by following the bus and the KV buckets read-only with the admin user:

- ``peak_events_per_s``: the stream's last sequence read every second, the largest 1 s rise;
- event to state (``p50``/``p99``), this process's receive times on both sides (one clock),
  for the pairs in :data:`PAIRS`: the event as the stream's ordered consumer delivered it, the
  state as the bucket's ordered consumer delivered the first stored revision that shows it;
- CPU seconds per 1,000 events per service: the replicas' ``utime + stime`` (``/proc``) over
  the pipeline phase, divided by the events the stream stored meanwhile (every service sees
  the same stream, so they compare side by side);
- KV operations per second by kind over the pipeline phase, by a plain subscription that sees
  every request as it is published (nats-server runs without a monitoring port): ``puts``
  (publishes to ``$KV.<bucket>.>``, compare-and-set attempts that lost included),
  ``deletes`` (those with a ``KV-Operation`` header), ``gets`` (``$JS.API.DIRECT.GET`` and
  ``STREAM.MSG.GET`` on ``KV_*`` streams), ``watches`` (consumer creations on ``KV_*``) and
  ``listings`` (stream info on ``KV_*``: how ``keys()`` lists a bucket, then gets each key);
- the end state (:func:`end_state`): every pipeline succeeded, ``lost`` (not finished by the
  deadline), ``duplicated`` (a stage event seen with two distinct ids for the same
  pipeline/run/attempt) and ``restarted_once`` (every failed first attempt restarted exactly
  once, nothing else restarted);
- the burst: ``--burst`` ``train.progress`` events for the finished runs, published by several
  tasks with JetStream acks; ``burst_events_per_s`` = events / time until the monitor's durable
  consumer has nothing pending and nothing unacked;
- idle: the CPU of every replica and nats-server over ``--idle-s`` with every record finished.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import nats
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig, DeliverPolicy

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.procstat import total_cpu_s
from torchrelay import platform
from torchrelay.client import DEMO, Client
from torchrelay.shared.events import TrainProgressed
from torchrelay.shared.events.data import PipelineSpec, TrainProgressData

STREAM = "TORCHRELAY"
MONITOR_CONSUMER = "monitor-events"
BUCKETS = ("pipelines", "runs")
"""The buckets followed for event-to-state pairs."""
PREFIX = "io.torchrelay."
KV_KINDS = ("puts", "deletes", "gets", "watches", "listings")
PENDING_BYTES = 512 * 1024 * 1024
"""A follower falls behind at peaks: it buffers rather than drop (a slow consumer)."""
STAGE_EVENTS = ("dataset.staged.v1", "train.started.v1", "train.completed.v1", "model.deployed.v1")
"""Events that each happen exactly once per pipeline (per attempt for train.started)."""
PAIRS = {
    "pipeline.submitted -> pipeline record created (ingest)": ("pipeline.submitted.v1", "created"),
    "dataset.staged -> run record created (train)": ("dataset.staged.v1", "run:0"),
    "dataset.staged -> train stage running (train)": ("dataset.staged.v1", "train:running"),
    "train.completed -> deploy stage running (serve)": ("train.completed.v1", "deploy:running"),
    "train.restart.requested -> run record at that attempt (train)": (
        "train.restart.requested.v1",
        "run:attempt",
    ),
}
"""Each pair: an event, and the state change its consumer makes when it handles it."""


# --- what was seen, and the pure rules on it --------------------------------------------------


@dataclass
class Seen:
    """The events the stream stored and the bucket revisions, with when this process got them."""

    events: list[tuple[float, dict[str, Any]]] = field(default_factory=list)
    states: list[tuple[float, str, dict[str, Any]]] = field(default_factory=list)
    """(time, bucket, record) per stored revision (deletes left out)."""


@dataclass(frozen=True)
class EndState:
    pipelines: int
    succeeded: int
    failed: int
    lost: int
    duplicated: int
    first_attempt_failures: int
    restarted_once: bool
    wrong_restarts: dict[str, int]
    """Runs restarted a number of times other than expected: run id -> restarts seen."""


def _short(event: Mapping[str, Any]) -> str:
    return str(event.get("type", "")).removeprefix(PREFIX)


def _run_of(event: Mapping[str, Any]) -> str | None:
    data = event.get("data")
    return data.get("run_id") if isinstance(data, dict) else None


def final_records(seen: Seen) -> dict[str, dict[str, Any]]:
    """Each pipeline's newest record."""
    return {r["pipeline_id"]: r for _, bucket, r in seen.states if bucket == "pipelines"}


def duplicated(events: Iterable[Mapping[str, Any]], pipeline_ids: set[str]) -> int:
    """How many (stage event, pipeline, run, attempt) came with more than one distinct event
    id: a stage that happened twice. A re-published event keeps its id, so it is no
    duplicate (JetStream stores it once anyway)."""
    ids: dict[tuple[str, str, str | None, int], set[str]] = defaultdict(set)
    for event in events:
        kind = _short(event)
        if kind in STAGE_EVENTS and event.get("pipelineid") in pipeline_ids:
            attempt = int(event["data"].get("attempt", 0)) if kind == "train.started.v1" else 0
            ids[(kind, event["pipelineid"], _run_of(event), attempt)].add(event["id"])
    return sum(1 for found in ids.values() if len(found) > 1)


def restarts(
    events: Iterable[Mapping[str, Any]], pipeline_ids: set[str]
) -> tuple[int, dict[str, int]]:
    """The failed first attempts, and the runs whose restart count is wrong: each failed
    first attempt is to be restarted exactly once (distinct ``train.restart.requested`` ids),
    every other run never."""
    failed: set[str] = set()
    asked: dict[str, set[str]] = defaultdict(set)
    for event in events:
        if event.get("pipelineid") not in pipeline_ids or (run := _run_of(event)) is None:
            continue
        kind = _short(event)
        if kind == "train.failed.v1" and int(event["data"].get("attempt", 0)) == 0:
            if not event["data"].get("final", False):
                failed.add(run)
        elif kind == "train.restart.requested.v1":
            asked[run].add(event["id"])
    wrong = {run: len(asked[run]) for run in failed if len(asked[run]) != 1}
    wrong |= {run: len(ids) for run, ids in asked.items() if run not in failed}
    return len(failed), wrong


def end_state(seen: Seen, pipeline_ids: Sequence[str]) -> EndState:
    """The benchmark's verdict on the pipelines it submitted."""
    wanted = set(pipeline_ids)
    records = {pid: r for pid, r in final_records(seen).items() if pid in wanted}
    status = Counter(records[pid]["status"] if pid in records else "missing" for pid in wanted)
    events = [event for _, event in seen.events]
    failures, wrong = restarts(events, wanted)
    return EndState(
        pipelines=len(wanted),
        succeeded=status["succeeded"],
        failed=status["failed"],
        lost=status["running"] + status["missing"],
        duplicated=duplicated(events, wanted),
        first_attempt_failures=failures,
        restarted_once=not wrong,
        wrong_restarts=wrong,
    )


def _state_marks(seen: Seen) -> dict[tuple[str, str], float]:
    """When each state first showed: (pipeline id, "created" / "<stage>:<status>") and
    (run id, "run:<attempt>")."""
    marks: dict[tuple[str, str], float] = {}
    for at, bucket, record in seen.states:
        if bucket == "pipelines":
            pid = record["pipeline_id"]
            marks.setdefault((pid, "created"), at)
            for stage, value in record["stages"].items():
                marks.setdefault((pid, f"{stage}:{value['status']}"), at)
        elif bucket == "runs":
            marks.setdefault((record["run_id"], f"run:{record['attempt']}"), at)
    return marks


def event_to_state(seen: Seen) -> dict[str, list[float]]:
    """Seconds from each event of :data:`PAIRS` to the state change it causes. A state that
    reached this process before its event (two consumers, two orders) counts as 0."""
    marks = _state_marks(seen)
    delays: dict[str, list[float]] = {name: [] for name in PAIRS}
    for at, event in seen.events:
        kind = _short(event)
        for name, (cause, state) in PAIRS.items():
            if kind != cause:
                continue
            if state == "run:attempt":
                key = (str(_run_of(event)), f"run:{event['data']['attempt']}")
            elif state.startswith("run:"):
                key = (f"{event['pipelineid']}.train", state)
            else:
                key = (str(event.get("pipelineid")), state)
            if key in marks:
                delays[name].append(max(0.0, marks[key] - at))
    return delays


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q`` quantile (nearest rank) of ``values``; None when there are none."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


# --- following the bus and the buckets ---------------------------------------------------------


class Follower:
    """Reads everything with the admin user and changes nothing."""

    def __init__(self, nc: NatsClient) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.seen = Seen()
        self.kv_ops: Counter[str] = Counter()
        self.windows: list[int] = []
        self.runs: dict[str, str] = {}
        """Each run's newest status."""
        self.running: list[int] = []
        """How many runs were running, every second."""
        self._subscriptions: list[Any] = []
        self._sampler: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._subscriptions.append(
            await self.js.subscribe(
                "torchrelay.>",
                stream=STREAM,
                ordered_consumer=True,
                config=ConsumerConfig(deliver_policy=DeliverPolicy.NEW),
                cb=self._on_event,
                pending_bytes_limit=PENDING_BYTES,
            )
        )
        for bucket in BUCKETS:
            self._subscriptions.append(
                await self.js.subscribe(
                    f"$KV.{bucket}.>",
                    stream=f"KV_{bucket}",
                    ordered_consumer=True,
                    config=ConsumerConfig(deliver_policy=DeliverPolicy.NEW),
                    cb=self._state_handler(bucket),
                    pending_bytes_limit=PENDING_BYTES,
                )
            )
        await self.count_kv_ops()
        self._sampler = asyncio.create_task(self._sample(), name="stream-sampler")

    async def count_kv_ops(self) -> None:
        """Count KV operations by kind (:attr:`kv_ops`) from now on."""
        self._subscriptions.append(
            await self.nc.subscribe(
                "$KV.>", cb=self._on_kv_write, pending_bytes_limit=PENDING_BYTES
            )
        )
        self._subscriptions.append(
            await self.nc.subscribe("$JS.API.>", cb=self._on_api, pending_bytes_limit=PENDING_BYTES)
        )

    async def stop(self) -> None:
        if self._sampler is not None:
            self._sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sampler
        for subscription in self._subscriptions:
            with contextlib.suppress(Exception):
                await subscription.unsubscribe()
        self._subscriptions.clear()

    async def last_seq(self) -> int:
        return int((await self.js.stream_info(STREAM)).state.last_seq)

    async def _sample(self) -> None:
        before = await self.last_seq()
        while True:
            await asyncio.sleep(1.0)
            now = await self.last_seq()
            self.windows.append(now - before)
            self.running.append(sum(1 for status in self.runs.values() if status == "running"))
            before = now

    async def _on_event(self, msg: Msg) -> None:
        with contextlib.suppress(ValueError):
            self.seen.events.append((time.monotonic(), json.loads(msg.data)))

    def _state_handler(self, bucket: str) -> Any:
        async def on_state(msg: Msg) -> None:
            if msg.headers and msg.headers.get("KV-Operation"):
                return  # a delete or purge: no record
            with contextlib.suppress(ValueError):
                record = json.loads(msg.data)
                self.seen.states.append((time.monotonic(), bucket, record))
                if bucket == "runs":
                    self.runs[record["run_id"]] = record["status"]

        return on_state

    async def _on_kv_write(self, msg: Msg) -> None:
        deleted = msg.headers is not None and msg.headers.get("KV-Operation") in {"DEL", "PURGE"}
        self.kv_ops["deletes" if deleted else "puts"] += 1

    async def _on_api(self, msg: Msg) -> None:
        subject = msg.subject
        if subject.startswith(("$JS.API.DIRECT.GET.KV_", "$JS.API.STREAM.MSG.GET.KV_")):
            self.kv_ops["gets"] += 1
        elif subject.startswith(
            ("$JS.API.CONSUMER.CREATE.KV_", "$JS.API.CONSUMER.DURABLE.CREATE.KV_")
        ):
            self.kv_ops["watches"] += 1
        elif subject.startswith("$JS.API.STREAM.INFO.KV_"):
            self.kv_ops["listings"] += 1  # keys() lists subjects, then gets each one's last


# --- CPU ----------------------------------------------------------------------------------------


def processes(started: platform.Platform) -> dict[str, list[int]]:
    """Every service's replica pids, and nats-server's."""
    pids: dict[str, list[int]] = defaultdict(list)
    for replica in started.replicas:
        pids[replica.service].append(replica.process.pid)
    if started.nats is not None and started.nats.pid is not None:
        pids["nats-server"].append(started.nats.pid)
    return dict(pids)


def cpu_by_service(pids: Mapping[str, list[int]]) -> dict[str, float]:
    return {service: total_cpu_s(group) for service, group in pids.items()}


# --- the phases ---------------------------------------------------------------------------------


def simulated_env(args: argparse.Namespace) -> dict[str, str]:
    """The services' settings that choose and tune the simulated backends."""
    return {
        "TORCHRELAY_ALLOW_SIMULATED_BACKEND": "true",
        "TORCHRELAY_TRAIN_BACKEND": "simulated",
        "TORCHRELAY_SERVE_BACKEND": "simulated",
        "TORCHRELAY_TRAIN_SIMULATED_MIN_DURATION_S": str(args.min_duration_s),
        "TORCHRELAY_TRAIN_SIMULATED_MAX_DURATION_S": str(args.max_duration_s),
        "TORCHRELAY_TRAIN_SIMULATED_PROGRESS_INTERVAL_S": str(args.progress_interval_s),
        "TORCHRELAY_TRAIN_SIMULATED_FAIL_RATE": str(args.fail_rate),
        "TORCHRELAY_SERVE_SIMULATED_READY_DELAY_S": str(args.ready_delay_s),
    }


def pipeline_spec(index: int, models: int, dataset: Mapping[str, str]) -> PipelineSpec:
    model = f"bench-{index % models}"
    demo = cast(dict[str, Any], DEMO["training"])
    training = {**demo, "model_name": model, "world_size": 1, "max_restarts": 1}
    return PipelineSpec.model_validate(
        {
            "name": f"cp-{index}",
            "dataset": dict(dataset),
            "training": training,
            "deploy": {"enabled": True, "replicas": 1},
        }
    )


async def stage_dataset(client: Client, args: argparse.Namespace) -> dict[str, str]:
    """Stage digits once, through a warm-up pipeline (which also warms every service)."""
    warm = PipelineSpec.model_validate(
        {**DEMO, "name": "cp-warmup", "deploy": {"enabled": True, "replicas": 1}}
    )
    record = await client.wait(await client.submit(warm), timeout_s=args.deadline_s, show=False)
    if record.status != "succeeded":
        raise RuntimeError(f"the warm-up pipeline {record.pipeline_id} {record.status}")
    version = record.stages["ingest"].detail.get("version")
    if not isinstance(version, str):
        versions = [v for v in await client.datasets() if v.name == "digits"]
        version = versions[-1].version
    return {"name": "digits", "version": version}


async def submit_all(
    client: Client, args: argparse.Namespace, dataset: Mapping[str, str]
) -> list[str]:
    """Submit ``--pipelines`` pipelines spread evenly over ``--submit-s``."""
    ids: list[str] = []
    began = time.monotonic()
    gap = args.submit_s / max(1, args.pipelines)
    models = args.models or args.pipelines
    for index in range(args.pipelines):
        delay = began + index * gap - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        ids.append(await client.submit(pipeline_spec(index, models, dataset)))
    return ids


async def wait_finished(follower: Follower, ids: Sequence[str], deadline_s: float) -> None:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        records = final_records(follower.seen)
        if all(pid in records and records[pid]["status"] != "running" for pid in ids):
            return
        await asyncio.sleep(0.5)


async def burst(
    nc: NatsClient, runs: Sequence[str], count: int, publishers: int, deadline_s: float
) -> dict[str, float | None]:
    """Publish ``count`` progress events for ``runs`` as fast as acks allow, then wait until
    the monitor's consumer has taken them all (``burst_pending``: what it had not taken by the
    deadline, when it did not)."""
    payloads = [
        (event.nats_subject, event.to_json(), event.id)
        for event in (
            TrainProgressed(
                source="/torchrelay/train/worker",
                subject=runs[i % len(runs)],
                data=TrainProgressData(
                    run_id=runs[i % len(runs)],
                    step=10_000 + i,
                    epoch=0,
                    loss=0.1,
                    samples_per_s=1.0,
                ),
            )
            for i in range(count)
        )
    ]
    js = nc.jetstream()
    queue = iter(payloads)

    async def publisher() -> None:
        for subject, payload, ident in queue:
            await js.publish(subject, payload, stream=STREAM, headers={"Nats-Msg-Id": ident})

    began = time.monotonic()
    await asyncio.gather(*(publisher() for _ in range(publishers)))
    published = time.monotonic() - began
    deadline = began + deadline_s
    while True:
        info = await js.consumer_info(STREAM, MONITOR_CONSUMER)
        pending = info.num_pending + info.num_ack_pending
        if pending == 0 or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    consumed = time.monotonic() - began
    return {
        "burst_events": count,
        "burst_publish_events_per_s": count / published,
        "burst_events_per_s": count / consumed if pending == 0 else None,
        "burst_pending": pending,
    }


async def measure(started: platform.Platform, args: argparse.Namespace) -> dict[str, Any]:
    url = platform.client_url(started.state_dir, started.nats_url)
    client = await Client.connect(url)
    nc = await nats.connect(url)
    follower = Follower(nc)
    pids = processes(started)
    try:
        dataset = await stage_dataset(client, args)
        await follower.start()
        cpu_before, seq_before, began = (
            cpu_by_service(pids),
            await follower.last_seq(),
            time.monotonic(),
        )
        ids = await submit_all(client, args, dataset)
        await wait_finished(follower, ids, args.deadline_s)
        await asyncio.sleep(1.0)  # the last revisions and events reach the followers
        elapsed = time.monotonic() - began
        cpu_after, seq_after = cpu_by_service(pids), await follower.last_seq()
        await follower.stop()
        events = seq_after - seq_before
        state = end_state(follower.seen, ids)
        delays = event_to_state(follower.seen)
        every = [d for values in delays.values() for d in values]
        figures: dict[str, Any] = {
            "pipelines": state.pipelines,
            "succeeded": state.succeeded,
            "failed": state.failed,
            "lost": state.lost,
            "duplicated": state.duplicated,
            "first_attempt_failures": state.first_attempt_failures,
            "restarted_once": state.restarted_once,
            "wrong_restarts": state.wrong_restarts,
            "models": args.models or args.pipelines,
            "pipeline_phase_s": elapsed,
            "events": events,
            "peak_events_per_s": max(follower.windows, default=0),
            "peak_running_runs": max(follower.running, default=0),
            "p50_event_to_state_s": percentile(every, 0.5),
            "p99_event_to_state_s": percentile(every, 0.99),
            "event_to_state_by_pair": {
                name: {"n": len(v), "p50_s": percentile(v, 0.5), "p99_s": percentile(v, 0.99)}
                for name, v in delays.items()
            },
            "cpu_s_per_1k_events": {
                service: (cpu_after[service] - cpu_before[service]) * 1000 / max(1, events)
                for service in pids
            },
            "kv_ops_per_s": {kind: follower.kv_ops[kind] / elapsed for kind in KV_KINDS},
        }
        runs = [f"{pid}.train" for pid in ids]
        if args.burst and runs:
            figures |= await burst(nc, runs, args.burst, args.publishers, args.deadline_s)
        else:
            figures |= {"burst_events": 0, "burst_events_per_s": None, "burst_pending": None}
        idle = Follower(nc)
        await idle.count_kv_ops()
        idle_before = cpu_by_service(pids)
        await asyncio.sleep(args.idle_s)
        idle_after = cpu_by_service(pids)
        await idle.stop()
        figures["idle_kv_ops_per_s"] = {
            kind: idle.kv_ops[kind] / max(args.idle_s, 1e-9) for kind in KV_KINDS
        }
        figures["idle_cores_by_service"] = {
            service: (idle_after[service] - idle_before[service]) / max(args.idle_s, 1e-9)
            for service in pids
        }
        figures["idle_cores"] = sum(figures["idle_cores_by_service"].values())
        return figures
    finally:
        await follower.stop()
        await nc.close()
        await client.aclose()


def report(figures: Mapping[str, Any]) -> list[str]:
    def s(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.3f}s"

    lines = [
        f"pipelines {figures['pipelines']}: succeeded {figures['succeeded']}, failed "
        f"{figures['failed']}, lost {figures['lost']}, duplicated {figures['duplicated']}",
        f"first attempts failed {figures['first_attempt_failures']}, each restarted exactly "
        f"once: {figures['restarted_once']} {figures['wrong_restarts'] or ''}",
        f"pipeline phase {figures['pipeline_phase_s']:.1f}s, {figures['events']} events, "
        f"peak {figures['peak_events_per_s']} events/s, "
        f"peak {figures['peak_running_runs']} runs running at once",
        f"event to state: p50 {s(figures['p50_event_to_state_s'])}, "
        f"p99 {s(figures['p99_event_to_state_s'])}",
    ]
    for name, pair in figures["event_to_state_by_pair"].items():
        lines.append(f"  {name}: n={pair['n']} p50 {s(pair['p50_s'])} p99 {s(pair['p99_s'])}")
    lines.append(
        "CPU s per 1,000 events: "
        + ", ".join(f"{k} {v:.2f}" for k, v in figures["cpu_s_per_1k_events"].items())
    )
    lines.append(
        "KV ops/s: " + ", ".join(f"{k} {v:.1f}" for k, v in figures["kv_ops_per_s"].items())
    )
    if figures["burst_events"]:
        lines.append(
            f"burst {figures['burst_events']} progress events: published at "
            f"{figures['burst_publish_events_per_s']:.0f}/s, consumed by the monitor at "
            + (
                f"{figures['burst_events_per_s']:.0f}/s"
                if figures["burst_pending"] == 0
                else f"? ({figures['burst_pending']} still pending at the deadline)"
            )
        )
    lines.append(
        f"idle: {figures['idle_cores']:.3f} cores ("
        + ", ".join(f"{k} {v:.3f}" for k, v in figures["idle_cores_by_service"].items())
        + "), KV ops/s: "
        + ", ".join(f"{k} {v:.1f}" for k, v in figures["idle_kv_ops_per_s"].items())
    )
    return lines


def arguments(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pipelines", type=int, default=1000)
    parser.add_argument("--submit-s", type=float, default=60.0)
    parser.add_argument("--models", type=int, default=0, help="models shared (0: one each)")
    parser.add_argument("--fail-rate", type=float, default=0.05)
    parser.add_argument("--min-duration-s", type=float, default=10.0)
    parser.add_argument("--max-duration-s", type=float, default=30.0)
    parser.add_argument("--progress-interval-s", type=float, default=1.0)
    parser.add_argument("--ready-delay-s", type=float, default=1.0)
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--deadline-s", type=float, default=600.0)
    parser.add_argument("--burst", type=int, default=100_000)
    parser.add_argument("--publishers", type=int, default=16)
    parser.add_argument("--idle-s", type=float, default=30.0)
    parser.add_argument("--json", action="store_true")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = arguments(argv)
    os.environ.update(simulated_env(args))  # platform.start's services inherit it
    state = Path(tempfile.mkdtemp(prefix="bench-control-plane-"))
    started = platform.start(state / "platform", replicas=args.replicas, timeout_s=180)
    try:
        figures = asyncio.run(measure(started, args))
    finally:
        platform.stop(started)
        shutil.rmtree(state, ignore_errors=True)
    if args.json:
        print(json.dumps({"figures": figures}))
    else:
        print("\n".join(report(figures)))


if __name__ == "__main__":
    main()
