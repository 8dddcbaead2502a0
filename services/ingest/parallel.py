"""The per-file work of one staging (copy, hash, validate) on one thread pool.

Copying and validating a file mostly waits on the kernel (creating the file, reading it,
writing it) with the GIL released, so a few threads overlap one file's system calls with
another's Python; on NFS they also overlap round trips. Results come back in the order of the
input whatever the pool's size, so the manifest never depends on scheduling.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Executor, Future, wait
from typing import Protocol, TypeVar

T = TypeVar("T")
R = TypeVar("R")

WINDOW_PER_WORKER = 4
"""Tasks queued per worker: enough to keep every worker busy, few enough that a million files
never become a million pending futures."""


def ordered_map(
    pool: Executor | None, work: Callable[[T], R], items: Iterable[T], *, workers: int = 1
) -> list[R]:
    """``work`` over ``items`` on ``pool`` (in this thread when None), results in the input's
    order. At most ``WINDOW_PER_WORKER * workers`` tasks are queued at once. The first failure
    in input order is raised after every task already started has ended and the rest are
    cancelled: when this raises, nothing it started still writes (the caller may clean up)."""
    if pool is None:
        return [work(item) for item in items]
    window: deque[Future[R]] = deque()
    results: list[R] = []
    limit = max(1, workers) * WINDOW_PER_WORKER
    try:
        for item in items:
            window.append(pool.submit(work, item))
            if len(window) >= limit:
                results.append(window.popleft().result())
        while window:
            results.append(window.popleft().result())
    except BaseException:
        for future in window:
            future.cancel()
        wait(window)
        raise
    return results


class Mapper(Protocol):
    """Runs ``work`` over ``items`` and returns the results in the items' order."""

    def __call__(self, work: Callable[[T], R], items: Iterable[T], /) -> list[R]: ...


def serial_map(work: Callable[[T], R], items: Iterable[T], /) -> list[R]:
    """A :class:`Mapper` without a pool (workspaces, tests): one item after the other."""
    return [work(item) for item in items]


class PoolMap:
    """A :class:`Mapper` over a thread pool of ``workers`` threads."""

    def __init__(self, pool: Executor, workers: int) -> None:
        self.pool = pool
        self.workers = workers

    def __call__(self, work: Callable[[T], R], items: Iterable[T], /) -> list[R]:
        return ordered_map(self.pool, work, items, workers=self.workers)
