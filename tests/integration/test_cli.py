"""The torchrelay command: schema export, service selection, settings errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jsonschema

from torchrelay.shared.events import EVENT_TYPES


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
