"""The torchrelay command: schema export, service selection, settings errors, run logs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jsonschema

from torchrelay.shared.events import EVENT_TYPES
from torchrelay.shared.storage import Layout


def run(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "torchrelay", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )


def test_schema_export_writes_a_schema_per_event_and_an_asyncapi_document(tmp_path: Path) -> None:
    result = run("schema", "export", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert "asyncapi.json" in files
    assert "pipeline.schema.json" in files
    assert len(files) == len(EVENT_TYPES) + 2
    for name in files:
        document = json.loads((tmp_path / "out" / name).read_text())
        if name != "asyncapi.json":
            jsonschema.Draft202012Validator.check_schema(document)


def test_bad_settings_exit_2_naming_the_variable(tmp_path: Path) -> None:
    result = run(
        "service",
        "monitor",
        env={"TORCHRELAY_SHUTDOWN_GRACE_S": "50", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 2
    assert "TORCHRELAY_SHUTDOWN" in result.stderr
    assert "grace_s" in result.stderr


def test_an_unreachable_nats_is_a_clear_error() -> None:
    # Port 9 (discard) is closed on loopback: nothing listens there.
    result = run(
        "service",
        "monitor",
        "--nats-url",
        "nats://127.0.0.1:9",
        "--http-port",
        "0",
        env={**os.environ, "TORCHRELAY_NATS_STARTUP_WAIT_S": "1.5"},
    )
    assert result.returncode == 2
    assert "cannot reach NATS at nats://127.0.0.1:9" in result.stderr


def test_unknown_service_is_a_usage_error() -> None:
    result = run("service", "nope")
    assert result.returncode == 2
    assert "invalid choice" in result.stderr


def test_logs_prints_every_attempts_rank_logs_from_the_storage(tmp_path: Path) -> None:
    layout = Layout(tmp_path / "state" / "storage")  # where a stopped platform kept it
    for attempt, rank in [(0, 0), (0, 1), (1, 0)]:
        log = layout.rank_log("r1", attempt, rank)
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(f"line of {attempt}/{rank}\n")
    shown = run("logs", "r1", "--state-dir", str(tmp_path / "state"))
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.splitlines() == [
        "==> attempt-0/rank-0.log <==",
        "line of 0/0",
        "==> attempt-0/rank-1.log <==",
        "line of 0/1",
        "==> attempt-1/rank-0.log <==",
        "line of 1/0",
    ]
    assert run("logs", "r2", "--state-dir", str(tmp_path / "state")).returncode == 1
    escaping = run("logs", "..", "--state-dir", str(tmp_path / "state"))
    assert escaping.returncode == 2
    assert "not a single path segment" in escaping.stderr
