"""The control-plane benchmark, small: 50 pipelines on the simulated backends with 3 replicas of
every service, and the end state it must reach (figures are the benchmark's business, not a
test's: nothing here is timed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def test_fifty_pipelines_all_succeed_once_each_and_every_failed_first_attempt_restarts_once() -> (
    None
):
    argv = [
        sys.executable, str(ROOT / "bench" / "control_plane.py"), "--json",
        "--pipelines", "50", "--submit-s", "5", "--fail-rate", "0.2",
        "--min-duration-s", "1", "--max-duration-s", "3", "--progress-interval-s", "0.5",
        "--ready-delay-s", "0.2", "--burst", "2000", "--idle-s", "2", "--deadline-s", "150",
    ]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=280, check=False, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])["figures"]

    assert figures["pipelines"] == 50
    assert (figures["succeeded"], figures["lost"], figures["duplicated"]) == (50, 0, 0)
    # At 0.2, 50 runs without one failed first attempt would be a 1 in 70,000 chance.
    assert figures["first_attempt_failures"] > 0
    assert figures["restarted_once"], figures["wrong_restarts"]
    assert figures["burst_events"] == 2000
    assert figures["burst_pending"] == 0
