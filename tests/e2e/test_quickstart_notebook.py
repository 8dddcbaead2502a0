"""`examples/quickstart.ipynb` as a user runs it: executed top to bottom in a kernel of this
environment, against a fresh state folder, so it starts the platform itself and stops it at the
end. Any cell that raises fails the test."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import sys
from pathlib import Path
from typing import Any

import nbformat
import pytest
from nbclient import NotebookClient
from nbformat.v4 import new_code_cell

from tests.e2e.conftest import ROOT, state_env
from torchrelay.platform import running

NOTEBOOK = ROOT / "examples" / "quickstart.ipynb"
# Small enough for a 2-core machine: one rank, two epochs, one serving replica; and which
# Python the kernel runs.
SMALL = """epochs = 2
world_size = 1
replicas = 1
timeout_s = 600.0
import sys
print(f"kernel: {sys.executable}")"""


def test_the_committed_notebook_is_valid_and_has_no_outputs() -> None:
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code, "a notebook with code"
    assert all(cell.outputs == [] and cell.execution_count is None for cell in code)
    assert notebook.metadata.kernelspec.name == "python3"
    tagged = [cell for cell in code if "parameters" in cell.metadata.get("tags", [])]
    assert len(tagged) == 1, "one cell holds the parameters a run may override"


def with_parameters(notebook: Any, source: str) -> Any:
    """``notebook`` with ``source`` run right after its parameters cell (as papermill does)."""
    index = next(
        i for i, cell in enumerate(notebook.cells) if "parameters" in cell.metadata.get("tags", [])
    )
    notebook.cells.insert(
        index + 1, new_code_cell(source, metadata={"tags": ["injected-parameters"]})
    )
    return notebook


def text(cell: Any) -> str:
    return "".join(
        output.get("text", "") + output.get("data", {}).get("text/plain", "")
        for output in cell.outputs
    )


def stop_leftovers(state_dir: Path) -> list[int]:
    """SIGTERM the processes still running of a platform the notebook did not stop (a cell
    failed before the last one); their pids."""
    try:
        described = json.loads((state_dir / "platform.json").read_text())
    except FileNotFoundError:
        return []
    pids = [int(s["pid"]) for s in described["services"].values()]
    pids += [described["nats_pid"]] if described.get("nats_pid") else []
    alive = []
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
            alive.append(pid)
    return alive


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_quickstart_runs_top_to_bottom_on_a_platform_it_starts(tmp_path: Path) -> None:
    state_dir = tmp_path / ".torchrelay"
    notebook = with_parameters(nbformat.read(NOTEBOOK, as_version=4), SMALL)
    # The kernel's environment: this state folder, this checkout's code; no MPLBACKEND from the
    # shell, so the kernel's inline backend draws the plot as image/png.
    env = {**state_env(tmp_path), "PYTHONPATH": str(ROOT)}
    env.pop("MPLBACKEND", None)
    # "python3": this environment's kernel spec (a venv's own come before the user's), whose
    # "python" jupyter_client runs as this interpreter; in the notebook's folder, as Jupyter does.
    client = NotebookClient(
        notebook,
        kernel_name="python3",
        timeout=600,
        resources={"metadata": {"path": str(NOTEBOOK.parent)}},
    )
    try:
        client.execute(env=env)
    finally:
        leftovers = stop_leftovers(state_dir)
    assert not leftovers, "the notebook stops the platform it started"
    assert running(state_dir) is None
    assert not (state_dir / "platform.json").exists()

    outputs = [text(cell) for cell in notebook.cells if cell.cell_type == "code"]
    everything = "\n".join(outputs)
    assert f"kernel: {sys.executable}" in everything
    assert f"started: the platform in {state_dir}" in everything
    assert "succeeded" in everything
    pipeline = next(line for line in everything.splitlines() if line.startswith("pipeline "))
    assert pipeline.endswith(" succeeded"), pipeline
    images = [
        output
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
        if "image/png" in output.get("data", {})
    ]
    assert len(images) == 1, "one plot: the loss curve"
    assert re.search(r"/v2/models/digits: predicted digit \d for an image of a \d", everything)
    assert "stopped the platform this notebook started" in everything
