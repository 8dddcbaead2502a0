"""The whole local platform, as a newcomer uses it: `torchrelay demo`, `up`, `submit`, `status`."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.training import workers_of

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def torchrelay(*argv: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "torchrelay", *argv],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])},
    )


def test_the_demo_trains_deploys_and_predicts_through_the_endpoint(tmp_path: Path) -> None:
    result = torchrelay("demo", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    accuracy = float(re.search(r"'accuracy': ([\d.]+)", result.stdout)[1])  # type: ignore[index]
    assert accuracy >= 0.95
    assert re.search(r"endpoint\s+http://127\.0\.0\.1:\d+/v2/models/digits", result.stdout)
    assert re.search(r"prediction digit \d for an image of a \d", result.stdout)
    assert not (tmp_path / ".torchrelay" / "platform.json").exists(), "the demo's platform stopped"


@pytest.fixture
def platform(tmp_path: Path) -> Iterator[Path]:
    process = subprocess.Popen(
        [sys.executable, "-m", "torchrelay", "up"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])},
    )
    deadline = time.monotonic() + 120
    while not (tmp_path / ".torchrelay" / "platform.json").exists():
        assert process.poll() is None, process.stdout.read() if process.stdout else ""
        assert time.monotonic() < deadline, "the platform did not start"
        time.sleep(0.2)
    yield tmp_path
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 0, output
    assert "stopping" in output
    assert not (tmp_path / ".torchrelay" / "platform.json").exists()


def test_a_pipeline_with_a_bad_source_fails_at_ingest_with_the_reason_in_status(
    platform: Path,
) -> None:
    spec = {
        "name": "broken",
        "dataset": {"name": "nothing", "source": "/definitely/not/here.csv"},
        "training": {
            "entrypoint": "torchrelay.services.train.examples.digits:train",
            "model_name": "digits",
        },
    }
    (platform / "broken.json").write_text(json.dumps(spec))
    submitted = torchrelay("submit", "broken.json", "--wait", "--timeout", "60", cwd=platform)
    assert submitted.returncode == 1, submitted.stdout + submitted.stderr
    pipeline_id = re.search(r"submitted (\S+)", submitted.stdout)[1]  # type: ignore[index]
    status = torchrelay("status", pipeline_id, "--json", cwd=platform)
    report = json.loads(status.stdout)
    assert report["status"] == "failed"
    assert report["stages"]["ingest"]["status"] == "failed"
    assert "local path sources are disabled" in report["stages"]["ingest"]["reason"]
    assert report["stages"]["train"]["status"] == "pending"
    listing = torchrelay("status", cwd=platform)
    assert pipeline_id in listing.stdout


def test_a_pipeline_whose_worker_dies_completes_after_a_restart_from_checkpoint(
    platform: Path,
) -> None:
    spec = {
        "name": "phoenix",
        "dataset": {"name": "digits", "source": "sklearn:digits"},
        "training": {
            "entrypoint": "torchrelay.services.train.examples.digits:train",
            "model_name": "digits",
            "world_size": 2,
            "checkpoint_every_steps": 20,
            "hyperparameters": {"epochs": 20},
        },
        "deploy": {"enabled": True, "replicas": 1},
    }
    (platform / "phoenix.json").write_text(json.dumps(spec))
    submitted = torchrelay("submit", "phoenix.json", cwd=platform)
    pipeline_id = re.search(r"submitted (\S+)", submitted.stdout)[1]  # type: ignore[index]
    described = json.loads((platform / ".torchrelay" / "platform.json").read_text())
    checkpoints = Path(described["storage_root"]) / "runs" / f"{pipeline_id}.train" / "checkpoints"
    deadline = time.monotonic() + 120
    while not (checkpoints.is_dir() and any(checkpoints.glob("step-*.pt"))):
        assert time.monotonic() < deadline, "no checkpoint was written"
        time.sleep(0.2)
    victim = max(workers_of(f"{pipeline_id}.train"))
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 240
    while True:
        report = json.loads(torchrelay("status", pipeline_id, "--json", cwd=platform).stdout)
        if report["status"] != "running" or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert report["status"] == "succeeded", report
    assert report["stages"]["train"]["detail"]["metrics"]["accuracy"] >= 0.9
    logs = Path(described["storage_root"]) / "runs" / f"{pipeline_id}.train" / "logs"
    assert sorted(p.name for p in logs.iterdir()) == ["attempt-0", "attempt-1"], "one restart"
    resumed = (logs / "attempt-1" / "rank-0.log").read_text()
    assert '"resumed_from_step": ' in resumed
    assert '"resumed_from_step": null' not in resumed
    shown = torchrelay("logs", f"{pipeline_id}.train", cwd=platform)
    assert shown.returncode == 0
    assert "==> attempt-0/rank-1.log <==" in shown.stdout
    assert "==> attempt-1/rank-0.log <==" in shown.stdout
    assert "worker.finished" in shown.stdout
    assert torchrelay("logs", "no-such-run", cwd=platform).returncode == 1
