"""A warm rank: ``python -m torchrelay.services.train.worker.standby`` (started by the local
backend's pool when ``TORCHRELAY_TRAIN_WARM_RANKS`` > 0).

Starting a Python process that imports torch costs seconds here, most of a job's time to its
first step. A standby pays it ahead: it imports everything a rank imports before its training
function, then blocks on its stdin for one hand-over, a JSON line ``{"env": {...}, "log":
"<path>"}``. It then becomes exactly the process a cold rank would have been (the job's whole
environment in place of its own, fd 1 and 2 on the rank's log, stdin on /dev/null) and runs the
same :func:`~torchrelay.services.train.worker.__main__.main`; its exit code is the rank's, and
it exits as a cold rank does (:func:`~torchrelay.services.train.worker.__main__.exit_now`).

A standby serves one job and exits with it: a job never runs in a process where another job's
code ran. End of input before a hand-over (the pool closing) is a clean exit 0.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from collections.abc import Mapping

from torchrelay.shared.cluster.lifeline import die_with_parent


def become(env: Mapping[str, str], log_path: str) -> None:
    """Turn this process into the rank a cold start would have made: its environment, its log
    (appended to, as the backend opens it for a cold rank) and no input."""
    os.environ.clear()
    os.environ.update(env)
    log = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    devnull = os.open(os.devnull, os.O_RDONLY)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.dup2(devnull, 0)
    os.close(log)
    os.close(devnull)


def main() -> int:
    die_with_parent()
    # What a cold rank imports before it runs anything of a job's: paid while idle.
    from torchrelay.services.train.worker.__main__ import exit_now
    from torchrelay.services.train.worker.__main__ import main as rank_main

    # DistributedDataParallel imports TorchDynamo on construction (over a second here); every
    # multi-rank job pays it before its first step, so a standby pays it while idle. (Dynamo's
    # settings are read from the environment now: a job that sets TORCHDYNAMO_* variables
    # gets them through ``torch._dynamo.config`` in its code, not through its environment.)
    importlib.import_module("torch._dynamo")

    line = sys.stdin.buffer.readline()
    if not line.strip():
        return 0  # the pool closed before handing this standby any work
    order = json.loads(line)
    become(order["env"], order["log"])
    return exit_now(rank_main())  # never returns: it exits as a cold rank does


if __name__ == "__main__":
    sys.exit(main())
