"""Local child processes (training ranks, model servers) die with the service that started them.

The local backends run their children in new sessions, so a service stopped cleanly tears them
down itself. A service that is killed cannot: without this its ranks would keep training and its
model servers keep a port, unwatched, and the replica that takes over would race them. The
parent passes its pid in :data:`PARENT_ENV`; the child asks the kernel for SIGKILL when that
parent dies (``PR_SET_PDEATHSIG``) and exits at once if it is already gone.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PARENT_ENV = "TORCHRELAY_PARENT_PID"
_PR_SET_PDEATHSIG = 1


def parent_env() -> dict[str, str]:
    """The environment a local child needs to die with this process."""
    return {PARENT_ENV: str(os.getpid())}


def die_with_parent() -> None:
    """In a child started by a local backend: follow the parent out. A no-op elsewhere
    (no parent named, as in a Kubernetes pod, or a system without prctl)."""
    wanted = os.environ.get(PARENT_ENV)
    if not wanted or not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return
    if os.getppid() != int(wanted):
        # The parent died before the request took effect: nobody will ever reap this child.
        os._exit(1)
