"""Chaos: the local platform keeps its promises while its processes are killed at random.

Three replicas of every service run eight pipelines while, every one to two seconds, a random
service replica or training rank is killed (SIGKILL), and nats-server once or twice (`up`
starts it again on the same store). Once the killing stops every pipeline must succeed, each
stage must have happened exactly once in the stream, every model must answer on its endpoint,
and stopping the platform must leave no process behind.

The seed (``TORCHRELAY_CHAOS_SEED``, printed, and in every failure's message) drives every
random choice: what is killed, and when. Processes' timing still varies from run to run, so a
replay repeats the same schedule of choices, not necessarily the same victims.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.js.errors import KeyNotFoundError

from tests.e2e.conftest import Up, digits_pipeline, start_up, stop_up, stream_events, torchrelay
from tests.e2e.test_resilience import DONE_ONCE
from torchrelay.platform import client_url
from torchrelay.shared.state import key_part

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]

SEED = int(os.environ.get("TORCHRELAY_CHAOS_SEED", "20240520"))
REPLICAS = 3
PIPELINES = 8
EPOCHS = 10
MAX_RESTARTS = 40
"""Far more than the kills can use up: every rank killed fails an attempt."""
CHAOS_WINDOW_S = 150.0
"""Killing goes on this long at most (less once every pipeline has finished)."""
RECOVERY_S = 300.0
"""After the killing stops, how long the pipelines may take to finish."""
ANSWER_S = 120.0
"""How long the endpoints may take to answer after that (a killed serve replica's model
servers die with it: another replica serves the model again)."""
NATS_KILLS = ((10.0, 40.0), (60.0, 100.0))
"""Windows (seconds after the last submission) for nats-server's kills: the first always,
the second when the seed says so."""
QUIET = ("train.progress", "train.checkpointed")
"""Events left out of a stuck pipeline's story: many, and they say only that it trained."""
WORKER_MODULE = "torchrelay.services.train.worker"
WORKER_ENV = "TORCHRELAY_WORKER"
CHAOS_ENV = {
    # Quick recovery: a failed attempt restarts after 0.5, 1, 2, 4, 5, 5 ... seconds, and a
    # run whose progress stops (its replica's lease lapsed, a lost message) is noticed.
    "TORCHRELAY_MONITOR_BACKOFF_BASE_S": "0.5",
    "TORCHRELAY_MONITOR_BACKOFF_CAP_S": "5",
    "TORCHRELAY_MONITOR_STALL_AFTER_S": "45",
    "TORCHRELAY_MONITOR_STALL_CHECK_S": "2",
}


# --- processes, from /proc -------------------------------------------------------------------


def _read(proc: Path, name: str) -> str:
    try:
        return (proc / name).read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _stat(pid: int) -> tuple[str, int] | None:
    """A live process's state letter and parent pid; None once it is gone."""
    stat = _read(Path(f"/proc/{pid}"), "stat")
    if not stat:
        return None
    state, ppid = stat.rsplit(")", 1)[1].split()[:2]
    return state, int(ppid)


def _alive(pid: int) -> bool:
    stat = _stat(pid)
    return stat is not None and stat[0] not in "ZX"


def _processes() -> list[Path]:
    return [p for p in Path("/proc").iterdir() if p.name.isdigit()]


def ranks_of(storage_root: str) -> dict[int, str]:
    """Live training ranks of this platform (their environment names its storage), each with
    what it is: run, attempt, rank."""
    ranks = {}
    for proc in _processes():
        if WORKER_MODULE not in _read(proc, "cmdline"):
            continue
        environ = b""
        with contextlib.suppress(OSError):
            environ = (proc / "environ").read_bytes()
        variables = dict(item.split(b"=", 1) for item in environ.split(b"\0") if b"=" in item)
        spec_text = variables.get(WORKER_ENV.encode(), b"").decode(errors="replace")
        if storage_root not in spec_text or not _alive(int(proc.name)):
            continue
        try:
            spec = json.loads(spec_text)
            what = f"{spec['run_id']} attempt {spec['attempt']} rank {spec['rank']}"
        except (ValueError, KeyError):
            what = "?"
        ranks[int(proc.name)] = what
    return ranks


def nats_server_of(up: Up) -> int | None:
    """The nats-server `up` runs now (its child)."""
    for proc in _processes():
        argv = _read(proc, "cmdline").split()
        stat = _stat(int(proc.name))
        ours = stat is not None and stat[1] == up.process.pid and stat[0] not in "ZX"
        if ours and argv and Path(argv[0]).name == "nats-server":
            return int(proc.name)
    return None


def processes_of(folder: Path) -> dict[int, str]:
    """Every live process (but this one) whose command line, environment or working folder
    names ``folder``: what the platform started, however deep."""
    needle = str(folder)
    found = {}
    for proc in _processes():
        pid = int(proc.name)
        if pid == os.getpid() or not _alive(pid):
            continue
        cmdline = _read(proc, "cmdline")
        try:
            cwd = str((proc / "cwd").readlink())
        except OSError:
            cwd = ""
        if needle in cmdline or needle in _read(proc, "environ") or cwd.startswith(needle):
            found[pid] = cmdline.strip()[:200]
    return found


# --- the chaos -------------------------------------------------------------------------------


@dataclass
class Kill:
    at_s: float
    """Seconds since the chaos began."""
    kind: str
    target: str
    pid: int
    clock: str = field(default_factory=lambda: datetime.now(UTC).strftime("%H:%M:%S.%f")[:-3])
    """UTC, as the services' logs write it."""

    def __str__(self) -> str:
        return f"{self.at_s:7.1f}s {self.clock}Z  {self.kind:7s} pid {self.pid:<7d} {self.target}"


@dataclass
class Chaos:
    """Kills, in a thread, every 1-2 s until stopped: a service replica or a training rank,
    and nats-server at moments chosen up front."""

    up: Up
    rng: random.Random
    kills: list[Kill] = field(default_factory=list)
    error: BaseException | None = None
    submitted: threading.Event = field(default_factory=threading.Event)
    stopped: threading.Event = field(default_factory=threading.Event)
    began: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        windows = NATS_KILLS[: self.rng.choice((1, 2))]
        self.nats_at = [self.rng.uniform(*window) for window in windows]
        """Seconds after the last submission."""
        self.storage_root = str(self.up.storage)
        self.thread = threading.Thread(target=self._run, name="chaos", daemon=True)

    def start(self) -> None:
        self.began = time.monotonic()
        self.thread.start()

    def stop(self) -> None:
        self.stopped.set()
        if self.thread.ident is not None:  # started
            self.thread.join(30)

    @property
    def nats_done(self) -> bool:
        return self.count("nats") >= len(self.nats_at)

    def count(self, kind: str) -> int:
        return sum(1 for k in self.kills if k.kind == kind)

    def _run(self) -> None:
        try:
            submitted_at: float | None = None
            while not self.stopped.wait(self.rng.uniform(1.0, 2.0)):
                if submitted_at is None and self.submitted.is_set():
                    submitted_at = time.monotonic()
                due = submitted_at is not None and (
                    self.count("nats") < len(self.nats_at)
                    and time.monotonic() - submitted_at >= self.nats_at[self.count("nats")]
                )
                if not (due and self._kill_nats()):
                    self._kill_one()
        except BaseException as exc:  # the test reports it
            self.error = exc

    def _kill_nats(self) -> bool:
        pid = nats_server_of(self.up)
        if pid is None:
            return False  # not back yet from the last kill
        self._kill("nats", "nats-server", pid)
        return True

    def _kill_one(self) -> None:
        try:
            services = {
                name: int(replica["pid"]) for name, replica in self.up.described["services"].items()
            }
        except (OSError, ValueError, KeyError):
            services = {}
        services = {name: pid for name, pid in services.items() if _alive(pid)}
        ranks = ranks_of(self.storage_root)
        kind = self.rng.choice(("service", "rank"))
        if kind == "rank" and not ranks:
            kind = "service"
        if kind == "service" and services:
            name = self.rng.choice(sorted(services))
            self._kill("service", name, services[name])
        elif ranks:
            pid = self.rng.choice(sorted(ranks))
            self._kill("rank", ranks[pid], pid)

    def _kill(self, kind: str, target: str, pid: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
            self.kills.append(Kill(time.monotonic() - self.began, kind, target, pid))

    def report(self) -> str:
        counts = Counter(k.kind for k in self.kills)
        return "\n".join(
            [
                f"chaos seed {SEED} (replay: TORCHRELAY_CHAOS_SEED={SEED}); folder "
                f"{self.up.folder}; nats-server kills planned at {self.nats_at} s after the "
                "last submission",
                f"kills: {dict(counts)}; thread error: {self.error!r}",
                *map(str, self.kills),
            ]
        )


# --- the platform, tolerant of its NATS being away -------------------------------------------


def inventory(up: Up) -> dict[str, Any] | None:
    """`torchrelay status --json`: every pipeline, run, model, deployment; None when it
    cannot be had just now (nats-server killed a moment ago)."""
    with contextlib.suppress(Exception):
        shown = torchrelay("status", "--json", cwd=up.folder, timeout=60)
        if shown.returncode == 0:
            rows: dict[str, Any] = json.loads(shown.stdout)
            return rows
    return None


def statuses(up: Up, pipelines: list[str]) -> dict[str, str]:
    rows = inventory(up)
    if rows is None:
        return {}
    return {
        row["pipeline"]: row["status"] for row in rows["pipelines"] if row["pipeline"] in pipelines
    }


def all_finished(known: dict[str, str], pipelines: list[str]) -> bool:
    return all(known.get(p, "running") in ("succeeded", "failed") for p in pipelines)


async def _story(url: str, pipelines: list[str]) -> dict[str, list[str]]:
    """Each pipeline's events in stream order (less training progress and checkpoints), and
    last what the monitor's bucket holds of its run (its ``RunWatch``)."""
    told: dict[str, list[str]] = {p: [] for p in pipelines}
    nc = await nats.connect(url)
    try:
        for sequence, event in await stream_events(nc):
            kind = event["type"].removeprefix("io.torchrelay.")
            if event.get("pipelineid") not in told or kind.startswith(QUIET):
                continue
            data = event.get("data") or {}
            facts = {k: data[k] for k in ("attempt", "final", "restart", "reason") if k in data}
            told[event["pipelineid"]].append(
                f"#{sequence} {event['time']} {kind} {event['id'][:8]} {json.dumps(facts)[:200]}"
            )
        watches = await nc.jetstream().key_value("monitor")
        for pipeline_id, lines in told.items():
            try:
                entry = await watches.get(f"runs.{key_part(f'{pipeline_id}.train')}")
                lines.append(f"monitor watch: {(entry.value or b'').decode()}")
            except KeyNotFoundError:
                lines.append("monitor watch: none")
    finally:
        await nc.close()
    return told


def diagnosis(up: Up, pipelines: list[str], known: dict[str, str]) -> str:
    """What each pipeline that did not succeed shows: its status report, its run, its events
    and the monitor's watch of its run; and every deployment."""
    rows = inventory(up) or {}
    unfinished = [p for p in pipelines if known.get(p) != "succeeded"]
    try:
        url = client_url(up.folder / ".torchrelay", str(up.described["nats_url"]))
        story = asyncio.run(_story(url, unfinished))
    except Exception as exc:
        story = {p: [f"(no events: {exc!r})"] for p in unfinished}
    lines = []
    for pipeline_id in unfinished:
        shown = torchrelay("status", pipeline_id, "--json", cwd=up.folder, timeout=60)
        lines.append(f"--- {pipeline_id}: {known.get(pipeline_id)}")
        lines.append(shown.stdout + shown.stderr)
        for kind in ("runs", "models"):
            for row in rows.get(kind, []):
                if row.get("pipeline") == pipeline_id:
                    lines.append(f"{kind}: {row}")
        lines.extend(story[pipeline_id])
    lines.append(f"deployments: {rows.get('deployments')}")
    return "\n".join(lines)


def chaos_pipeline(n: int) -> dict[str, Any]:
    spec = digits_pipeline(f"chaos-{n}", epochs=EPOCHS, world_size=2)
    spec["training"]["model_name"] = f"digits-{n}"  # one endpoint per pipeline
    spec["training"]["max_restarts"] = MAX_RESTARTS
    return spec


def say(line: str) -> None:
    """Progress for `pytest -s`, and the seed, so that a failure can be replayed."""
    print(line, flush=True)  # noqa: T201


def answer(up: Up, model: str) -> dict[str, Any] | str:
    """The model's answer to one image through `torchrelay predict`, or why there is none."""
    predicted = torchrelay("predict", model, "image.json", "--json", cwd=up.folder, timeout=90)
    if predicted.returncode != 0:
        return f"exit {predicted.returncode}: {predicted.stderr.strip()}"
    answered: dict[str, Any] = json.loads(predicted.stdout)
    return answered


def kill_while_running(up: Up, chaos: Chaos) -> list[str]:
    """Submit the pipelines and kill until they have finished or the window is over; the
    pipelines, and what they were when the killing stopped."""
    chaos.start()
    # The pipelines arrive while replicas die; nats-server dies only once all are in.
    pipelines = [up.submit(chaos_pipeline(n)) for n in range(PIPELINES)]
    chaos.submitted.set()
    say(f"submitted {pipelines}")
    known: dict[str, str] = {}
    while time.monotonic() - chaos.began < CHAOS_WINDOW_S and chaos.error is None:
        known |= statuses(up, pipelines)
        if all_finished(known, pipelines) and chaos.nats_done:
            break
        time.sleep(3)
    chaos.stop()
    kinds = dict(Counter(k.kind for k in chaos.kills))
    say(f"chaos stopped after {time.monotonic() - chaos.began:.0f}s: {kinds}; {known}")
    assert chaos.error is None, chaos.report()
    for kind in ("nats", "service", "rank"):
        assert chaos.count(kind) >= 1, f"no {kind} was killed\n{chaos.report()}"
    return pipelines


def wait_finished(up: Up, chaos: Chaos, pipelines: list[str]) -> None:
    """Every pipeline succeeds in the end; else what each that did not shows."""
    stopped = time.monotonic()
    known = statuses(up, pipelines)
    while not all_finished(known, pipelines) and time.monotonic() < stopped + RECOVERY_S:
        time.sleep(3)
        known |= statuses(up, pipelines)
    say(f"{time.monotonic() - stopped:.0f}s after the chaos: {known}")
    failed = [p for p in pipelines if known.get(p) != "succeeded"]
    assert not failed, (
        f"{chaos.report()}\nnot succeeded in {RECOVERY_S:g}s after the chaos: {failed}\n"
        + diagnosis(up, pipelines, known)
    )


def assert_each_stage_once_and_every_model_answers(
    up: Up, chaos: Chaos, pipelines: list[str]
) -> None:
    counts = up.events()
    for pipeline_id in pipelines:
        seen = {kind: counts[(kind, pipeline_id)] for kind in DONE_ONCE}
        assert seen == dict.fromkeys(DONE_ONCE, 1), f"{chaos.report()}\n{pipeline_id}: {seen}"
    reports = {p: up.status(p) for p in pipelines}
    for pipeline_id, report in reports.items():
        accuracy = report["stages"]["train"]["detail"]["metrics"]["accuracy"]
        assert accuracy >= 0.9, f"{chaos.report()}\n{pipeline_id}: {report}"

    image = [[0.0] * 8 for _ in range(8)]
    (up.folder / "image.json").write_text(json.dumps([image]))  # one 1x8x8 input
    answers: dict[str, dict[str, Any] | str] = {}
    deadline = time.monotonic() + ANSWER_S
    while not all(isinstance(answers.get(p), dict) for p in pipelines):
        if answers and time.monotonic() > deadline:
            break
        time.sleep(2 if answers else 0)
        for pipeline_id, report in reports.items():
            if not isinstance(answers.get(pipeline_id), dict):
                answers[pipeline_id] = answer(up, report["stages"]["train"]["detail"]["model"])
    for pipeline_id, report in reports.items():
        got = answers[pipeline_id]
        assert isinstance(got, dict), f"{chaos.report()}\n{pipeline_id}: {got}\n{report}"
        wanted = report["stages"]["train"]["detail"]["version"]
        assert got["model_version"] == wanted, f"{chaos.report()}\n{pipeline_id}: {got}"
        assert got["outputs"][0]["shape"] == [1, 10], f"{chaos.report()}\n{got}"


def test_pipelines_survive_random_kills_of_services_ranks_and_nats(tmp_path: Path) -> None:
    say(f"\nchaos seed {SEED} (replay: TORCHRELAY_CHAOS_SEED={SEED})")
    started = time.monotonic()
    up = start_up(tmp_path, "--replicas", str(REPLICAS), env=CHAOS_ENV)
    chaos = Chaos(up, random.Random(SEED))  # noqa: S311 (a replayable test, not a secret)
    try:
        assert len(up.described["services"]) == 4 * REPLICAS, chaos.report()
        pipelines = kill_while_running(up, chaos)
        wait_finished(up, chaos, pipelines)
        assert_each_stage_once_and_every_model_answers(up, chaos, pipelines)
    except BaseException:
        chaos.stop()
        say(chaos.report())
        try:
            say(stop_up(up))
        except BaseException as exc:  # the first failure is the one to report
            say(f"stopping the platform failed too: {exc!r}")
        raise

    output = stop_up(up)  # it stops and exits 0, and nats-server logged no refusal
    deadline = time.monotonic() + 15
    while (left := processes_of(tmp_path)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, f"{chaos.report()}\nleft behind: {left}"
    assert output.count("nats-server is back") >= chaos.count("nats"), f"{chaos.report()}\n{output}"
    say(chaos.report())
    say(f"the whole test took {time.monotonic() - started:.0f}s")
