"""CPU time of running processes, read from Linux's ``/proc/<pid>/stat``."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path


def cpu_s(pid: int) -> float:
    """A process's user + system CPU seconds so far (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def total_cpu_s(pids: Iterable[int]) -> float:
    """The CPU seconds of all of ``pids`` together (those gone count 0)."""
    return sum(cpu_s(pid) for pid in pids)
