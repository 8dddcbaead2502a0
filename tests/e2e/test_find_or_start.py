"""``find_or_start``, how a notebook or script gets a local platform: it uses the one running
from the state folder and never stops that one; it starts one when none runs and stops only
that one, on ``close`` or, at the latest, when the process that started it exits."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.conftest import ROOT
from torchrelay.client import Client
from torchrelay.platform import find_or_start, running
from torchrelay.shared.errors import ConfigError

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


async def test_one_started_here_is_found_again_and_stopped_only_by_who_started_it(
    tmp_path: Path,
) -> None:
    state_dir = tmp_path / "state"
    started = find_or_start(state_dir)
    try:
        assert started.started
        assert running(state_dir) == started.described
        assert started.storage_root == state_dir.resolve() / "storage"

        with find_or_start(state_dir) as found:
            assert not found.started
            assert found.described == started.described
            assert found.nats_url == started.nats_url
            assert "admin:" in found.nats_url, "the admin's credentials: the platform's own NATS"
            client = await Client.connect(found.nats_url)
            try:
                assert await client.records() == []
            finally:
                await client.aclose()
        assert running(state_dir) is not None, "closing what was found leaves it running"
    finally:
        started.close()
    assert not started.started
    assert running(state_dir) is None
    assert not (state_dir / "platform.json").exists()
    started.close()  # idempotent


def test_a_process_that_exits_without_closing_stops_what_it_started(tmp_path: Path) -> None:
    """A notebook's kernel shut down before its last cell: its services do not outlive it."""
    state_dir = tmp_path / "state"
    script = (
        "import sys; from pathlib import Path; from torchrelay.platform import find_or_start; "
        "local = find_or_start(Path(sys.argv[1])); print(local.started, flush=True)"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(state_dir)],
        capture_output=True,
        text=True,
        timeout=150,
        check=False,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "True"
    assert not (state_dir / "platform.json").exists(), "stopped at exit"
    logs = sorted(p.name for p in (state_dir / "logs").iterdir())
    assert logs == ["ingest-0.log", "monitor-0.log", "serve-0.log", "train-0.log"]
    for log in logs:
        assert '"service.stopped"' in (state_dir / "logs" / log).read_text(), log


def test_a_platform_that_is_not_ready_in_time_is_stopped_and_left_nowhere(
    tmp_path: Path,
) -> None:
    state_dir = tmp_path / "state"
    with pytest.raises(ConfigError, match="not ready in time"):
        find_or_start(state_dir, timeout_s=0)
    assert running(state_dir) is None
    assert not (state_dir / "platform.json").exists()
    # The autouse no_leaks fixture fails this test if a service or NATS still runs.
