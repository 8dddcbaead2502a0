"""The local backend: each rank is a process on this machine.

Every attempt gets a fresh file rendezvous (a restarted job never reads the dead ranks'
addresses). Each rank runs in its own process group, so tearing a job down reaches anything it
started. If any rank exits non-zero, the others are stopped at once: no orphans, no rank left
waiting in a collective.

With ``warm_ranks`` > 0 a pool keeps that many standby ranks (torch already imported, see
:mod:`torchrelay.services.train.worker.standby`) waiting; a CPU job's rank takes one instead of
starting a process, and the pool starts a fresh standby when that one exits. A standby serves
one job only, and a warm rank is stopped, waited for and reported exactly like a cold one (its
own session, the same environment, log and exit code). GPU jobs always start cold ranks:
``CUDA_VISIBLE_DEVICES`` has to be in place before anything in the process touches CUDA, and a
standby cannot promise that about its imports.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import structlog

from torchrelay.shared.cluster.lifeline import parent_env
from torchrelay.shared.cluster.port import (
    Description,
    Ended,
    Phase,
    Status,
    Unplaceable,
    WorkerJob,
)
from torchrelay.shared.cluster.registry import TrainingConfig
from torchrelay.shared.cluster.worker_spec import WORKER_ENV, WorkerSpec
from torchrelay.shared.errors import NotOwned
from torchrelay.shared.storage.layout import Layout

log = structlog.get_logger("torchrelay.cluster.local")
WORKER_MODULE = "torchrelay.services.train.worker"
STANDBY_MODULE = "torchrelay.services.train.worker.standby"
STOP_GRACE_S = 5.0
ENDED_KEPT = 1024
"""Handles of jobs that ended here, remembered so that cancelling one again is success."""


@dataclass(frozen=True)
class RankLaunch:
    rank: int
    argv: list[str]
    env: dict[str, str]
    log_path: str


@dataclass(frozen=True)
class LocalRequest:
    handle: str
    ranks: list[RankLaunch]
    rendezvous_file: str


class LocalBackend:
    name = "local"

    def __init__(
        self,
        *,
        max_world_size: int,
        gpus: int = 0,
        python: str = sys.executable,
        worker_env: Mapping[str, str] | None = None,
        warm_ranks: int = 0,
    ) -> None:
        self.max_world_size = max_world_size
        self.gpus = gpus
        self.python = python
        self.worker_env = dict(worker_env or {})
        """Added to every rank's environment (the workers' own NATS credentials)."""
        self._jobs: dict[str, list[asyncio.subprocess.Process]] = {}
        self._requests: dict[str, LocalRequest] = {}
        self._cancelled: set[str] = set()
        self._ended: dict[str, None] = {}  # insertion-ordered: the oldest is forgotten first
        self.pool = WarmPool(
            warm_ranks,
            [python, "-m", STANDBY_MODULE],
            lambda: {**_inheritable(os.environ), **_standby_env(self.worker_env)},
        )

    async def start(self) -> None:
        """Fill the warm pool (nothing to do without one); :func:`open_training` calls it."""
        await self.pool.start()

    def check(self, job: WorkerJob) -> None:
        spec = job.job
        if spec.world_size > self.max_world_size:
            raise Unplaceable(
                f"world size {spec.world_size} is more than the local backend places "
                f"({self.max_world_size}); lower it or raise TORCHRELAY_TRAIN_MAX_WORLD_SIZE"
            )
        wanted = spec.world_size * spec.resources.gpu
        if wanted > self.gpus:
            raise Unplaceable(f"the job wants {wanted} GPUs; this machine has {self.gpus}")
        if spec.resources.gpu not in (0, 1):
            raise Unplaceable("locally each rank gets at most one GPU")

    def dryrun(self, job: WorkerJob) -> LocalRequest:
        layout = Layout(Path(job.storage_root))
        rendezvous = layout.rendezvous(job.run_id, job.attempt)
        backend = "nccl" if job.job.resources.gpu > 0 else "gloo"
        handle = f"{job.run_id}/{job.attempt}"
        ranks = []
        for rank in range(job.job.world_size):
            spec = WorkerSpec(
                run_id=job.run_id,
                attempt=job.attempt,
                rank=rank,
                world_size=job.job.world_size,
                rendezvous=f"file://{rendezvous}",
                backend=backend,
                job=job.job,
                storage_root=job.storage_root,
                dataset_path=job.dataset_path,
                nats_url=job.nats_url,
                pipeline_id=job.pipeline_id,
                rendezvous_timeout_s=job.rendezvous_timeout_s,
                collective_timeout_s=job.collective_timeout_s,
            )
            env = {WORKER_ENV: spec.model_dump_json(), **_standby_env(self.worker_env)}
            if backend == "nccl":
                env["CUDA_VISIBLE_DEVICES"] = str(rank)
            ranks.append(
                RankLaunch(
                    rank=rank,
                    argv=[self.python, "-m", WORKER_MODULE],
                    env=env,
                    log_path=str(layout.rank_log(job.run_id, job.attempt, rank)),
                )
            )
        return LocalRequest(handle, ranks, str(rendezvous))

    async def schedule(self, request: LocalRequest) -> str:
        log_files = await asyncio.to_thread(_prepare, request)
        processes: list[asyncio.subprocess.Process] = []
        try:
            for rank, log_file in zip(request.ranks, log_files, strict=True):
                env = {**_inheritable(os.environ), **rank.env}
                warm = None
                if "CUDA_VISIBLE_DEVICES" not in rank.env:  # GPU ranks start cold (see above)
                    warm = await self.pool.hand_over(env, rank.log_path)
                processes.append(
                    warm
                    or await asyncio.create_subprocess_exec(
                        *rank.argv,
                        env=env,
                        stdin=asyncio.subprocess.DEVNULL,
                        stdout=log_file,
                        stderr=asyncio.subprocess.STDOUT,
                        start_new_session=True,
                    )
                )
        except BaseException:
            await _stop_all(processes)
            raise
        finally:
            for log_file in log_files:
                log_file.close()
        self._jobs[request.handle] = processes
        self._requests[request.handle] = request
        log.info(
            "job.launched",
            handle=request.handle,
            pids=[p.pid for p in processes],
            warm=sum(self.pool.served(p) for p in processes),
        )
        return request.handle

    async def describe(self, handle: str) -> Description | None:
        """A job this replica runs: how many of its ranks are alive. Any other handle: None
        (its ranks were another replica's children, or it has ended)."""
        processes = self._jobs.get(handle)
        if processes is None:
            return None
        alive = sum(p.returncode is None for p in processes)
        failed = [r for r, p in enumerate(processes) if p.returncode not in (None, 0)]
        if failed:
            return Description(handle, Phase.FAILED, f"rank {failed[0]} exited")
        if alive == 0:
            return Description(handle, Phase.SUCCEEDED, "every rank finished")
        return Description(handle, Phase.RUNNING, f"{alive} of {len(processes)} ranks running")

    async def wait(self, handle: str) -> Ended:
        processes = self._jobs[handle]
        request = self._requests[handle]
        waits = {asyncio.create_task(p.wait()): rank for rank, p in enumerate(processes)}
        pending = set(waits)
        try:
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    code = task.result()
                    if code != 0 and handle not in self._cancelled:
                        rank = waits[task]
                        await _stop_all(processes)
                        return _failure(rank, code, request.ranks[rank].log_path)
        finally:
            for task in pending:
                task.cancel()
            await _stop_all(processes)
            # A finished job leaves nothing behind here: a long-lived service runs many.
            self._jobs.pop(handle, None)
            self._requests.pop(handle, None)
            self._ended[handle] = None
            if len(self._ended) > ENDED_KEPT:
                del self._ended[next(iter(self._ended))]
            cancelled = handle in self._cancelled
            self._cancelled.discard(handle)
        if cancelled:
            return Ended(Status.CANCELLED, "cancelled")
        return Ended(Status.SUCCEEDED, "every rank finished")

    async def adopt(self, request: LocalRequest) -> str | None:
        """Never: a rank is a child of the replica that started it, and died with it."""
        return None

    async def cancel(self, handle: str) -> None:
        """Stop a job this backend is running (one that ended here already: nothing to do);
        :class:`NotOwned` for any other handle."""
        try:
            processes = self._jobs[handle]
        except KeyError as exc:
            if handle in self._ended:
                return
            raise NotOwned(
                f"no local job {handle!r} runs in this replica: local workers are children of "
                "the replica that started them, so only that replica can cancel them "
                "(or the job has already ended)"
            ) from exc
        self._cancelled.add(handle)
        await _stop_all(processes)

    async def aclose(self) -> None:
        # The pool first: the standbys of the jobs stopped below are not to be replaced.
        await self.pool.aclose()
        for handle in list(self._jobs):
            # A job whose wait ended while an earlier one was being stopped is already gone.
            with contextlib.suppress(NotOwned):
                await self.cancel(handle)


async def open_training(config: TrainingConfig) -> LocalBackend:
    backend = LocalBackend(
        max_world_size=config.max_world_size,
        gpus=config.gpus,
        worker_env=config.worker_env,
        warm_ranks=config.warm_ranks,
    )
    await backend.start()
    return backend


REFILL_BACKOFF_S = (0.0, 1.0, 5.0, 30.0)
"""Waits before replacing a standby that died idle, by how many died in a row: a standby that
cannot even import (a broken environment) must not become a fork loop."""
EARLY_DEATH_S = 60.0
"""A standby that dies idle sooner than this after its start counts as dying in a row."""


class WarmPool:
    """``size`` standby ranks, one per slot: idle until a job's rank takes one, and replaced
    by a fresh standby whenever one exits (after its job, or idle)."""

    def __init__(self, size: int, argv: list[str], env: Callable[[], dict[str, str]]) -> None:
        self.size = size
        self._argv = argv
        self._env = env
        self._idle: deque[asyncio.subprocess.Process] = deque()
        self._served: set[int] = set()
        """Pids of standbys handed to a job (until they exit)."""
        self._watchers: set[asyncio.Task[None]] = set()
        self._early_deaths = 0
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def idle(self) -> list[int]:
        """Pids of the standbys waiting for work."""
        return [p.pid for p in self._idle if p.returncode is None]

    def served(self, process: asyncio.subprocess.Process) -> bool:
        """Whether ``process`` is a standby this pool handed to a job."""
        return process.pid in self._served

    async def start(self) -> None:
        for _ in range(self.size):
            await self._spawn()

    async def hand_over(
        self, env: Mapping[str, str], log_path: str
    ) -> asyncio.subprocess.Process | None:
        """An idle standby, now running the rank ``env`` describes with its output on
        ``log_path``; None when no standby is idle (the caller starts a cold rank)."""
        order = json.dumps({"env": dict(env), "log": log_path}).encode() + b"\n"
        while self._idle:
            process = self._idle.popleft()
            if process.returncode is not None or process.stdin is None:
                continue
            try:
                process.stdin.write(order)
                await process.stdin.drain()
                process.stdin.close()
            except (BrokenPipeError, ConnectionResetError):
                continue  # it died idle: its watcher replaces it
            self._served.add(process.pid)
            return process
        return None

    async def aclose(self) -> None:
        """Stop the idle standbys and start no more (idempotent). Standbys serving a job are
        the job's: the backend stops them with it."""
        self._closed = True
        idle, self._idle = list(self._idle), deque()
        for process in idle:
            if process.stdin is not None:
                process.stdin.close()
        await _stop_all(idle)
        watchers, self._watchers = list(self._watchers), set()
        for task in watchers:
            task.cancel()
        await asyncio.gather(*watchers, return_exceptions=True)

    async def _spawn(self) -> None:
        if self._closed:
            return
        try:
            process = await asyncio.create_subprocess_exec(
                *self._argv,
                env=self._env(),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.DEVNULL,
                # Until its hand-over a standby's errors (say, an import that fails) belong in
                # the service's own log; afterwards it writes to the rank's log.
                stderr=None,
                start_new_session=True,
            )
        except OSError:
            log.exception("pool.spawn_failed")
            return
        if self.closed:  # closed while this one was being started: it is no one's
            if process.stdin is not None:
                process.stdin.close()
            await _stop_all([process])
            return
        self._idle.append(process)
        task = asyncio.create_task(self._watch(process), name=f"standby-{process.pid}")
        self._watchers.add(task)
        task.add_done_callback(self._watchers.discard)

    async def _watch(self, process: asyncio.subprocess.Process) -> None:
        """Put a fresh standby in the slot of ``process`` once it exits."""
        started = time.monotonic()
        code = await process.wait()
        served = process.pid in self._served
        self._served.discard(process.pid)
        if self._closed:
            return
        if not served:
            with contextlib.suppress(ValueError):
                self._idle.remove(process)
            early = time.monotonic() - started < EARLY_DEATH_S
            self._early_deaths = self._early_deaths + 1 if early else 0
            delay = REFILL_BACKOFF_S[min(self._early_deaths, len(REFILL_BACKOFF_S) - 1)]
            log.warning("pool.standby_died", pid=process.pid, code=code, refill_in_s=delay)
            await asyncio.sleep(delay)
        else:
            self._early_deaths = 0
        await self._spawn()


def _standby_env(worker_env: Mapping[str, str]) -> dict[str, str]:
    """What every rank's environment holds besides its spec: a standby starts with it, so
    whatever torch reads at import time is what a cold rank's import reads."""
    return {"OMP_NUM_THREADS": "1", **parent_env(), **worker_env}


def _prepare(request: LocalRequest) -> list[BinaryIO]:
    """A fresh rendezvous file's folder and each rank's log file (opened for appending)."""
    rendezvous = Path(request.rendezvous_file)
    rendezvous.parent.mkdir(parents=True, exist_ok=True)
    rendezvous.unlink(missing_ok=True)
    files: list[BinaryIO] = []
    for rank in request.ranks:
        Path(rank.log_path).parent.mkdir(parents=True, exist_ok=True)
        files.append(Path(rank.log_path).open("ab"))  # noqa: SIM115 - closed after the spawn
    return files


def _failure(rank: int, code: int, log_path: str) -> Ended:
    tail = _tail(log_path)
    if code < 0:
        name = signal.Signals(-code).name
        return Ended(Status.FAILED, f"rank {rank} was killed by {name}", rank, code, name, tail)
    meaning = {1: "the training function raised", 3: "the entrypoint could not run"}.get(
        code, "it exited"
    )
    return Ended(
        Status.FAILED, f"rank {rank} failed: {meaning} (exit {code})", rank, code, None, tail
    )


def _tail(path: str, lines: int = 20) -> list[str]:
    try:
        with Path(path).open(errors="replace") as handle:
            return [line.rstrip("\n")[:500] for line in deque(handle, maxlen=lines)]
    except OSError:
        return []


async def _stop_all(processes: list[asyncio.subprocess.Process]) -> None:
    """SIGTERM every rank's process group, SIGKILL what is left after a grace period."""
    alive = [p for p in processes if p.returncode is None]
    for process in alive:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
    if not alive:
        return
    try:
        async with asyncio.timeout(STOP_GRACE_S):
            await asyncio.gather(*(p.wait() for p in alive))
    except TimeoutError:
        for process in alive:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
        await asyncio.gather(*(p.wait() for p in alive))


_NATS_IDENTITY = frozenset(
    f"TORCHRELAY_NATS_{name}"
    for name in ("USER", "PASSWORD", "TOKEN", "NKEY_SEED_FILE", "CREDS_FILE", "INBOX_PREFIX")
)


def _inheritable(environ: Mapping[str, str]) -> dict[str, str]:
    """The service's environment less its NATS identity: a worker reports as its own user
    (``worker_env``), never with the credentials of the service that started it. TLS
    settings pass on."""
    return {k: v for k, v in environ.items() if k.upper() not in _NATS_IDENTITY}
