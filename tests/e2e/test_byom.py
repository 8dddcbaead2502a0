"""The README's "Bring your own model" guide, run as it says on examples/byom copied outside
the repository: own module, own CSV, a spec with `workspace:` and relative paths."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.conftest import ROOT, Up, state_env, torchrelay

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture
def project(platform: Up) -> Path:
    copied = platform.folder / "my-project"
    shutil.copytree(ROOT / "examples" / "byom", copied)
    return copied


def test_the_guide_trains_serves_and_gates_a_users_own_project(platform: Up, project: Path) -> None:
    folder = platform.folder
    submitted = torchrelay("submit", "my-project/pipeline.yaml", "--wait", cwd=folder)
    output = submitted.stdout + submitted.stderr
    assert submitted.returncode == 0, output
    assert re.search(r"staged .*src as workspace [0-9a-f]{16}", output), output
    assert re.search(r"staged .*blobs\.csv as dataset blobs version [0-9a-f]{16}", output), output
    first = re.search(r"submitted (\S+)", output)[1]  # type: ignore[index]
    report = platform.status(first)
    assert report["status"] == "succeeded", report
    accuracy = report["stages"]["train"]["detail"]["metrics"]["accuracy"]
    assert accuracy >= 0.9, "the gate's min let it through"

    predicted = torchrelay("predict", "blobs", "my-project/sample.json", cwd=folder)
    assert predicted.returncode == 0, predicted.stdout + predicted.stderr
    assert "amber" in predicted.stdout, predicted.stdout  # the label, not raw scores

    listing = torchrelay("status", cwd=folder).stdout
    assert first in listing

    # A worse model of the same project is trained but does not go live.
    worse = (project / "pipeline.yaml").read_text().replace("epochs: 20", "epochs: 1")
    worse = worse.replace("lr: 0.01", "lr: 0.0001")
    (project / "worse.yaml").write_text(worse)
    # Followed, then let go with Ctrl-C: the pipeline goes on without the command.
    again = subprocess.Popen(
        [sys.executable, "-m", "torchrelay", "submit", "my-project/worse.yaml", "--wait"],
        cwd=folder,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**state_env(folder), "PYTHONPATH": str(ROOT)},
    )
    assert again.stdout is not None
    said = []
    while not (said and said[-1].startswith("submitted ")):
        line = again.stdout.readline()
        assert line, "submit ended before it submitted"
        said.append(line)
    second = said[-1].split()[1]
    again.send_signal(signal.SIGINT)
    _, stopped = again.communicate(timeout=30)
    assert again.returncode == 130, stopped
    assert f"stopped following {second}; the pipeline goes on" in stopped
    assert "Traceback" not in stopped
    assert platform.finish(second)["status"] == "succeeded"
    deploy = platform.status(second)["stages"]["deploy"]
    assert deploy["status"] == "skipped", deploy
    assert "accuracy" in deploy["reason"], deploy
    served = json.loads(torchrelay("status", "--json", cwd=folder).stdout)["deployments"]
    assert [d["version"] for d in served if d["model"] == "blobs"] == [f"{first}.train"], served

    # The same data and code staged again are the same version and workspace.
    assert re.findall(r"version [0-9a-f]{16}|workspace [0-9a-f]{16}", "".join(said)) == (
        re.findall(r"version [0-9a-f]{16}|workspace [0-9a-f]{16}", submitted.stdout)
    )


def test_mistakes_in_a_users_project_fail_fast_with_the_reason(platform: Up, project: Path) -> None:
    folder = platform.folder
    spec = (project / "pipeline.yaml").read_text()
    (project / "typo.yaml").write_text(spec.replace("blobs_model:train", "blobs_model:trian"))
    typo = torchrelay("submit", "my-project/typo.yaml", "--wait", "--timeout", "60", cwd=folder)
    assert typo.returncode == 1, typo.stdout + typo.stderr
    assert "did you mean 'train'?" in typo.stdout + typo.stderr

    (project / "nowhere.yaml").write_text(spec.replace("workspace: src", "workspace: ./nope"))
    missing = torchrelay("submit", "my-project/nowhere.yaml", cwd=folder)
    assert missing.returncode == 2
    assert "workspace ./nope does not exist" in missing.stderr
    assert "submitted" not in missing.stdout, "nothing was submitted"
