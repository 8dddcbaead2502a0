"""What a training rank imports before its first step: torch and the worker SDK, not the
services' runtime. The NATS client, aiohttp and the metrics library cost about a second of CPU
per rank at start-up (measured with ``python -X importtime``), and only rank 0 needs the bus,
later, in its reporter thread."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(120)
SERVICE_ONLY = ("nats", "aiohttp", "prometheus_client", "torchrelay.shared.runtime.service")


def test_a_rank_loads_no_bus_http_or_metrics_before_it_runs_a_job() -> None:
    probe = (
        "import sys\n"
        "import torchrelay.services.train.worker.standby\n"
        "from torchrelay.services.train.worker.__main__ import main\n"
        f"print(sorted(m for m in {SERVICE_ONLY!r} if m in sys.modules))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=100
    )
    assert done.stdout.strip() == "[]", done.stderr
