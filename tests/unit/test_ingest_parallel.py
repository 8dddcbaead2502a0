"""The staging pool's map: input order whatever the finishing order, a bounded queue, and
nothing still running once a failure is raised."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from torchrelay.services.ingest.parallel import WINDOW_PER_WORKER, PoolMap, serial_map


def test_results_come_in_the_input_order_whatever_finishes_first() -> None:
    def slow_first(n: int) -> int:
        time.sleep(0.002 * (20 - n))
        return n * n

    with ThreadPoolExecutor(8) as pool:
        assert PoolMap(pool, 8)(slow_first, range(20)) == [n * n for n in range(20)]
    assert serial_map(slow_first, range(3)) == [0, 1, 4]


def test_the_queue_is_bounded_however_many_items() -> None:
    queued = 0
    most = 0
    lock = threading.Lock()

    def items() -> Iterator[int]:
        nonlocal queued, most
        for n in range(500):
            with lock:
                queued += 1
                most = max(most, queued)
            yield n

    def work(n: int) -> int:
        nonlocal queued
        with lock:
            queued -= 1
        return n

    with ThreadPoolExecutor(2) as pool:
        assert PoolMap(pool, 2)(work, items()) == list(range(500))
    assert most <= 2 * WINDOW_PER_WORKER + 1


def test_the_first_failure_in_input_order_is_raised_once_nothing_runs() -> None:
    running = 0
    started: list[int] = []
    lock = threading.Lock()

    def work(n: int) -> int:
        nonlocal running
        with lock:
            running += 1
            started.append(n)
        try:
            time.sleep(0.01 if n == 3 else 0.001)
            if n in {3, 5}:
                raise ValueError(f"bad {n}")
            return n
        finally:
            with lock:
                running -= 1

    with ThreadPoolExecutor(4) as pool, pytest.raises(ValueError, match="bad 3"):
        PoolMap(pool, 4)(work, range(1000))
    assert running == 0, "no task still runs when the failure reaches the caller"
    assert len(started) < 1000, "what had not started is cancelled"
