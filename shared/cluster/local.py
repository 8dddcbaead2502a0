"""The local backend: each rank is a process on this machine.

Every attempt gets a fresh file rendezvous (a restarted job never reads the dead ranks'
addresses). Each rank runs in its own process group, so tearing a job down reaches anything it
started. If any rank exits non-zero, the others are stopped at once: no orphans, no rank left
waiting in a collective.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections import deque
from collections.abc import Mapping
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
            env = {
                WORKER_ENV: spec.model_dump_json(),
                "OMP_NUM_THREADS": "1",
                **parent_env(),
                **self.worker_env,
            }
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
        processes = []
        try:
            for rank, log_file in zip(request.ranks, log_files, strict=True):
                processes.append(
                    await asyncio.create_subprocess_exec(
                        *rank.argv,
                        env={**_inheritable(os.environ), **rank.env},
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
        log.info("job.launched", handle=request.handle, pids=[p.pid for p in processes])
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
        for handle in list(self._jobs):
            # A job whose wait ended while an earlier one was being stopped is already gone.
            with contextlib.suppress(NotOwned):
                await self.cancel(handle)


async def open_training(config: TrainingConfig) -> LocalBackend:
    return LocalBackend(
        max_world_size=config.max_world_size, gpus=config.gpus, worker_env=config.worker_env
    )


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
