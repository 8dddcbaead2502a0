"""The control-plane benchmark's verdict (bench/control_plane.py): what counts as a duplicated
stage and a wrong restart, so that its end-state test cannot pass by counting nothing."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

BENCH = Path(__file__).parents[2] / "bench" / "control_plane.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("control_plane_bench", BENCH)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def event(kind: str, ident: str, pipeline: str = "p1", **data: Any) -> dict[str, Any]:
    data.setdefault("run_id", f"{pipeline}.train")
    return {"type": f"io.torchrelay.{kind}.v1", "id": ident, "pipelineid": pipeline, "data": data}


def test_a_stage_event_twice_with_two_ids_is_a_duplicate_and_a_republished_one_is_not(
    bench: ModuleType,
) -> None:
    events = [
        event("dataset.staged", "a"),
        event("dataset.staged", "a"),  # the same event again: stored once, no duplicate
        event("train.started", "b", attempt=0),
        event("train.started", "c", attempt=1),  # a restart's start: another attempt
        event("model.deployed", "d", pipeline="p2"),
        event("model.deployed", "e", pipeline="p2"),
        event("model.deployed", "f", pipeline="other"),  # not one of the benchmark's
        event("model.deployed", "g", pipeline="other"),
    ]
    assert bench.duplicated(events, {"p1", "p2"}) == 1


def test_each_failed_first_attempt_must_be_restarted_exactly_once_and_nothing_else(
    bench: ModuleType,
) -> None:
    events = [
        event("train.failed", "f1", pipeline="once", attempt=0),
        event("train.restart.requested", "r1", pipeline="once", attempt=1),
        event("train.restart.requested", "r1", pipeline="once", attempt=1),  # republished
        event("train.failed", "f2", pipeline="twice", attempt=0),
        event("train.restart.requested", "r2", pipeline="twice", attempt=1),
        event("train.restart.requested", "r3", pipeline="twice", attempt=1),
        event("train.failed", "f3", pipeline="never", attempt=0),
        event("train.restart.requested", "r4", pipeline="unasked", attempt=1),
        event("train.failed", "f4", pipeline="final", attempt=0, final=True),
    ]
    pipelines = {"once", "twice", "never", "unasked", "final"}
    failures, wrong = bench.restarts(events, pipelines)
    assert failures == 3
    assert wrong == {"twice.train": 2, "never.train": 0, "unasked.train": 1}
