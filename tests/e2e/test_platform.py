"""The whole local platform, as a newcomer uses it: `torchrelay demo`, `up`, `submit`, `status`."""

from __future__ import annotations

import json
import os
import re
import signal
import time
import urllib.request
from pathlib import Path

import pytest

from tests.e2e.conftest import Up, digits_pipeline, torchrelay
from tests.integration.training import workers_of

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def test_the_demo_trains_deploys_and_predicts_through_the_endpoint(tmp_path: Path) -> None:
    result = torchrelay("demo", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    accuracy = float(re.search(r"'accuracy': ([\d.]+)", result.stdout)[1])  # type: ignore[index]
    assert accuracy >= 0.95
    assert re.search(r"endpoint\s+http://127\.0\.0\.1:\d+/v2/models/digits", result.stdout)
    assert re.search(r"prediction digit \d for an image of a \d", result.stdout)
    assert not (tmp_path / ".torchrelay" / "platform.json").exists(), "the demo's platform stopped"


def test_a_pipeline_with_a_bad_source_fails_at_ingest_with_the_reason_in_status(
    platform: Up,
) -> None:
    folder = platform.folder
    spec = {
        "name": "broken",
        # A path on the platform's side (a plain path would be the submitter's own file).
        "dataset": {"name": "nothing", "source": "file:///definitely/not/here.csv"},
        "training": {
            "entrypoint": "torchrelay.services.train.examples.digits:train",
            "model_name": "digits",
        },
    }
    (folder / "broken.json").write_text(json.dumps(spec))
    submitted = torchrelay("submit", "broken.json", "--wait", "--timeout", "60", cwd=folder)
    assert submitted.returncode == 1, submitted.stdout + submitted.stderr
    pipeline_id = re.search(r"submitted (\S+)", submitted.stdout)[1]  # type: ignore[index]
    report = platform.status(pipeline_id)
    assert report["status"] == "failed"
    assert report["stages"]["ingest"]["status"] == "failed"
    assert "local path sources are disabled" in report["stages"]["ingest"]["reason"]
    assert report["stages"]["train"]["status"] == "pending"
    listing = torchrelay("status", cwd=folder)
    assert pipeline_id in listing.stdout


def test_a_pipeline_whose_worker_dies_completes_after_a_restart_from_checkpoint(
    platform: Up,
) -> None:
    pipeline_id = platform.submit(digits_pipeline("phoenix"))
    checkpoints = platform.storage / "runs" / f"{pipeline_id}.train" / "checkpoints"
    deadline = time.monotonic() + 120
    while not (checkpoints.is_dir() and any(checkpoints.glob("step-*.pt"))):
        assert time.monotonic() < deadline, "no checkpoint was written"
        time.sleep(0.2)
    victim = max(workers_of(f"{pipeline_id}.train"))
    os.kill(victim, signal.SIGKILL)
    report = platform.finish(pipeline_id, timeout=240)
    assert report["status"] == "succeeded", report
    assert report["stages"]["train"]["detail"]["metrics"]["accuracy"] >= 0.9
    logs = platform.storage / "runs" / f"{pipeline_id}.train" / "logs"
    assert sorted(p.name for p in logs.iterdir()) == ["attempt-0", "attempt-1"], "one restart"
    resumed = (logs / "attempt-1" / "rank-0.log").read_text()
    assert '"resumed_from_step": ' in resumed
    assert '"resumed_from_step": null' not in resumed
    shown = torchrelay("logs", f"{pipeline_id}.train", cwd=platform.folder)
    assert shown.returncode == 0
    assert "==> attempt-0/rank-1.log <==" in shown.stdout
    assert "==> attempt-1/rank-0.log <==" in shown.stdout
    assert "worker.finished" in shown.stdout
    assert "info  worker.started resumed_from_step=" in shown.stdout, "one readable line"
    assert torchrelay("logs", "no-such-run", cwd=platform.folder).returncode == 1


def test_status_links_each_pipeline_to_its_run_model_and_deployment_and_predict_uses_it(
    platform: Up,
) -> None:
    pipeline_id = platform.submit(digits_pipeline("lineage", epochs=10, world_size=1))
    assert platform.finish(pipeline_id)["status"] == "succeeded"
    rows = json.loads(torchrelay("status", "--json", cwd=platform.folder).stdout)
    (pipeline,) = [row for row in rows["pipelines"] if row["pipeline"] == pipeline_id]
    (run,) = [row for row in rows["runs"] if row["pipeline"] == pipeline_id]
    (model,) = [row for row in rows["models"] if row["pipeline"] == pipeline_id]
    (deployment,) = rows["deployments"]
    assert pipeline["run"] == run["run"] == model["run"] == f"{pipeline_id}.train"
    assert pipeline["dataset"] == run["dataset"] == model["dataset"]
    assert pipeline["model"] == run["model"] == model["model"]
    assert model["model"] == f"digits@{deployment['version']}"
    assert model["serving"] == "yes"
    assert pipeline["endpoint"] == deployment["endpoint"]
    listing = torchrelay("status", cwd=platform.folder).stdout
    for heading in ("PIPELINES", "RUNS", "MODELS", "DEPLOYMENTS"):
        assert heading in listing
    shown = torchrelay("status", pipeline_id, cwd=platform.folder).stdout
    assert f"lineage: dataset {pipeline['dataset']} -> run {pipeline['run']}" in shown
    monitor = platform.described["services"]["monitor-0"]["url"]
    with urllib.request.urlopen(f"{monitor}/metrics", timeout=10) as response:  # noqa: S310
        metrics = response.read().decode()
    count = re.search(
        r'^torchrelay_pipeline_duration_seconds_count\{status="succeeded"\} (\S+)$', metrics, re.M
    )
    assert count is not None
    assert float(count[1]) >= 1, "the whole pipeline's duration was observed"

    image = [[0.0] * 8 for _ in range(8)]
    (platform.folder / "image.json").write_text(json.dumps([image]))  # one 1x8x8 input
    predicted = torchrelay("predict", "digits", "image.json", "--json", cwd=platform.folder)
    assert predicted.returncode == 0, predicted.stderr
    answer = json.loads(predicted.stdout)
    assert answer["model_version"] == deployment["version"]
    assert answer["outputs"][0]["shape"] == [1, 10]
    assert answer["predictions"][0]["label"] in [str(digit) for digit in range(10)]
    named = torchrelay("predict", "digits", "image.json", cwd=platform.folder)
    assert named.returncode == 0, named.stderr
    assert re.search(r"^input 0: \d    top 3: ", named.stdout, re.M), named.stdout

    missing = torchrelay("predict", "no-such-model", "image.json", cwd=platform.folder)
    assert missing.returncode == 1
    assert "model 'no-such-model' is not deployed" in missing.stderr
    (platform.folder / "bad.json").write_text("{not json")
    unreadable = torchrelay("predict", "digits", "bad.json", cwd=platform.folder)
    assert unreadable.returncode == 2
    assert "cannot read an input from bad.json" in unreadable.stderr
    wrong_shape = torchrelay("predict", "digits", "image.json", "--batched", cwd=platform.folder)
    assert wrong_shape.returncode == 2
    assert "model 'digits' takes shape [-1, 1, 8, 8]" in wrong_shape.stderr
