"""A local child started with the lifeline dies with its parent, even when the parent is
SIGKILLed and so cannot tear anything down."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from torchrelay.shared.cluster.lifeline import PARENT_ENV

CHILD = (
    "from torchrelay.shared.cluster.lifeline import die_with_parent; import time; "
    "die_with_parent(); print('alive', flush=True); time.sleep(60)"
)
# The parent starts the child in a new session (as the local backends do), prints its pid and
# waits to be killed.
PARENT = f"""
import os, subprocess, sys, time
from torchrelay.shared.cluster.lifeline import parent_env
child = subprocess.Popen([sys.executable, "-c", {CHILD!r}], env={{**os.environ, **parent_env()}},
                         start_new_session=True, stdout=subprocess.PIPE, text=True)
assert child.stdout.readline() == "alive\\n"
print(child.pid, flush=True)
time.sleep(60)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie awaits a reaper that is gone: init reaps it soon after.
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def test_a_child_dies_when_its_parent_is_killed() -> None:
    with subprocess.Popen(
        [sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True
    ) as parent:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        assert _alive(child)
        parent.send_signal(signal.SIGKILL)
    deadline = time.monotonic() + 10
    while _alive(child):
        assert time.monotonic() < deadline, "the child outlived its parent"
        time.sleep(0.05)


def test_a_child_whose_parent_is_already_gone_exits_at_once() -> None:
    child = subprocess.run(
        [sys.executable, "-c", CHILD],
        env={**os.environ, PARENT_ENV: "1"},  # not our parent: as if it had died and init took us
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert child.returncode == 1
    assert "alive" not in child.stdout


def test_without_a_named_parent_the_lifeline_does_nothing() -> None:
    env = {k: v for k, v in os.environ.items() if k != PARENT_ENV}
    code = "from torchrelay.shared.cluster.lifeline import die_with_parent; die_with_parent()"
    assert subprocess.run([sys.executable, "-c", code], env=env, check=False).returncode == 0
