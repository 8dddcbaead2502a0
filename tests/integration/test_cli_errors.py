"""What the command line says when people get something wrong or stop it: a line per problem
and an exit code, never a traceback (issue 15, item 2)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.processes import cli

SPEC = """
name: blobs
dataset: {name: digits, source: "sklearn:digits"}
training:
  entrypoint: digits
  model_name: Digits
  hyperparams: {epochs: 3}
"""


def torchrelay(*argv: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return cli(*argv, cwd=cwd, env={**os.environ, "TORCHRELAY_NATS_STARTUP_WAIT_S": "1"})


def test_a_spec_with_mistakes_exits_2_with_a_line_per_problem_naming_the_field(
    tmp_path: Path,
) -> None:
    (tmp_path / "spec.yaml").write_text(SPEC)
    result = torchrelay("submit", "spec.yaml", "--nats-url", "nats://127.0.0.1:9", cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert lines[0] == "torchrelay: invalid pipeline spec, 3 problems"
    assert sorted(lines[1:]) == [
        "  training.entrypoint: must be module:function, e.g. blobs_model:train (got 'digits')",
        "  training.hyperparams: unknown field (a misspelling?)",
        "  training.model_name: must be a DNS label: lower-case letters, digits and '-', at "
        "most 63 (got 'Digits')",
    ]


@pytest.mark.parametrize(
    ("text", "says"),
    [("name: [unclosed\n", "does not parse"), ("- a list\n", "must hold a mapping")],
)
def test_a_spec_file_that_is_no_spec_exits_2_saying_so(
    tmp_path: Path, text: str, says: str
) -> None:
    (tmp_path / "spec.yaml").write_text(text)
    result = torchrelay("submit", "spec.yaml", cwd=tmp_path)
    assert result.returncode == 2
    assert says in result.stderr
    assert "Traceback" not in result.stderr


def test_a_sweep_that_cannot_run_exits_2_before_anything_is_uploaded_or_published(
    tmp_path: Path,
) -> None:
    """The dataset is a local file and no platform runs: an upload or a publish would be
    refused for that, so the sweep's reason shows neither was tried."""
    (tmp_path / "data.csv").write_text("x,y\n1,0\n")
    (tmp_path / "sweep.yaml").write_text(
        "name: blobs\n"
        "dataset: {name: blobs, source: data.csv}\n"
        "training: {entrypoint: m:train, model_name: blobs}\n"
        "sweep:\n"
        "  space: {lr: {type: uniform, low: 0.1, high: 0.1}}\n"
        "  algorithm: grid\n"
        "  objective: {metric: accuracy, direction: maximize}\n"
        "  max_trials: 2\n"
    )
    result = torchrelay("submit", "sweep.yaml", "--nats-url", "nats://127.0.0.1:9", cwd=tmp_path)
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr.splitlines() == [
        "torchrelay: invalid sweep: lr: uniform needs low < high, got low=0.1, high=0.1; grid "
        "needs choice or int parameters; lr is a continuous range: list its values as a "
        "choice, or use random"
    ]


def test_an_unreachable_platform_is_one_line_and_exit_2(tmp_path: Path) -> None:
    result = torchrelay("status", "--nats-url", "nats://127.0.0.1:9", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("torchrelay: cannot reach NATS at nats://127.0.0.1:9")
    assert "Traceback" not in result.stderr


def test_a_reader_that_closes_the_pipe_early_gets_no_complaint(tmp_path: Path) -> None:
    with subprocess.Popen(
        [sys.executable, "-m", "torchrelay", "schema", "catalogue"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    ) as process:
        assert process.stdout is not None
        assert process.stderr is not None
        process.stdout.close()  # as `| head` does once it has its lines
        stderr = process.stderr.read().decode()
        code = process.wait(timeout=60)
    assert code in {0, 141}
    assert stderr == ""
