"""The train service's pure rules: run ids, when a restart may happen, which code may run."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import pytest

import torchrelay.services.train
from torchrelay.services.train.domain import (
    RunRecord,
    entrypoint_refusal,
    module_allowed,
    restart_allowed,
    run_id_for,
)
from torchrelay.services.train.settings import EXAMPLES
from torchrelay.shared.events.data import DatasetRef, TrainJobSpec


def record(status: str, attempt: int, max_restarts: int = 2) -> RunRecord:
    return RunRecord(
        run_id="r1",
        spec=TrainJobSpec(
            dataset=DatasetRef(name="digits", version="v1"),
            entrypoint="pkg.mod:train",
            model_name="digits",
            max_restarts=max_restarts,
        ),
        dataset_path="datasets/digits/v1",
        status=status,  # type: ignore[arg-type]
        attempt=attempt,
        owner="train-0",
        updated=datetime.now(UTC),
    )


def test_a_requested_run_id_wins_else_it_derives_from_the_event() -> None:
    assert run_id_for("mine", "event-1") == "mine"
    assert run_id_for(None, "event-1") == run_id_for(None, "event-1")
    assert run_id_for(None, "event-1") != run_id_for(None, "event-2")


def test_a_failed_run_may_restart_to_its_next_attempt() -> None:
    assert restart_allowed(record("failed", 0), 1) is None
    assert restart_allowed(record("cancelled", 1), 2) is None


@pytest.mark.parametrize(
    ("status", "attempt", "wanted", "reason"),
    [
        ("running", 0, 1, "is running"),
        ("succeeded", 0, 1, "already succeeded"),
        ("failed", 1, 1, "is stale"),
        ("failed", 0, 2, "is stale"),
        ("failed", 2, 3, "used its 2 restarts"),
    ],
)
def test_restarts_that_must_not_happen(status: str, attempt: int, wanted: int, reason: str) -> None:
    refusal = restart_allowed(record(status, attempt), wanted)
    assert refusal is not None
    assert reason in refusal


# --- the entrypoint policy -------------------------------------------------------------------

DEFAULT = (EXAMPLES,)
DIGITS_SOURCE = (
    Path(torchrelay.services.train.__file__).parent / "examples" / "digits.py"
).read_text()


def test_the_bundled_example_may_run_by_default() -> None:
    assert EXAMPLES == "torchrelay.services.train.examples"
    assert entrypoint_refusal(f"{EXAMPLES}.digits:train", DEFAULT, DIGITS_SOURCE) is None


@pytest.mark.parametrize("entrypoint", ["os:system", "subprocess:call", "builtins:print"])
def test_code_outside_the_setting_is_refused_naming_the_setting_and_what_to_do(
    entrypoint: str,
) -> None:
    refusal = entrypoint_refusal(entrypoint, DEFAULT, "def system(): ...\ndef call(): ...\n")
    module = entrypoint.partition(":")[0]
    assert refusal == (
        f"entrypoint {entrypoint!r} is not allowed: module {module!r} is not under "
        "TORCHRELAY_TRAIN_ENTRYPOINTS (torchrelay.services.train.examples); "
        "add its package to that setting"
    )


def test_os_system_is_refused_even_when_os_is_allowed_it_is_not_defined_in_os() -> None:
    refusal = entrypoint_refusal("os:system", ("os",), inspect.getsource(os))
    assert refusal is not None
    assert "'system' is not a function defined in module 'os'" in refusal


def test_the_setting_is_the_boundary_subprocess_does_define_call() -> None:
    source = inspect.getsource(subprocess)
    assert entrypoint_refusal("subprocess:call", DEFAULT, source) is not None
    assert entrypoint_refusal("subprocess:call", ("subprocess",), source) is None


def test_a_module_without_python_source_is_refused() -> None:
    refusal = entrypoint_refusal("builtins:print", ("builtins",), None)
    assert refusal is not None
    assert "module 'builtins' has no Python source to check" in refusal


@pytest.mark.parametrize(
    ("module", "allowed"),
    [
        ("torchrelay.services.train.examples", True),
        ("torchrelay.services.train.examples.digits", True),
        ("torchrelay.services.train.examples.deep.er", True),
        ("torchrelay.services.train.examplesx", False),
        ("torchrelay.services.train.examplesx.digits", False),
        ("torchrelay.services.train", False),
        ("torchrelay.services.train.worker", False),
        ("torchrelay", False),
    ],
)
def test_prefixes_match_whole_dotted_components(module: str, allowed: bool) -> None:
    assert module_allowed(module, DEFAULT) is allowed
    refusal = entrypoint_refusal(f"{module}:train", DEFAULT, "def train(ctx): ...\n")
    assert (refusal is None) is allowed


def test_any_of_several_prefixes_allows_and_none_allows_nothing() -> None:
    assert module_allowed("team.trainers.mnist", ("other", "team.trainers"))
    refusal = entrypoint_refusal(f"{EXAMPLES}.digits:train", (), DIGITS_SOURCE)
    assert refusal is not None
    assert "TORCHRELAY_TRAIN_ENTRYPOINTS (empty: nothing is allowed)" in refusal


@pytest.mark.parametrize(
    ("source", "why"),
    [
        ("def other(ctx): ...\n", "missing"),
        ("class train:\n    def __init__(self, ctx): ...\n", "a class"),
        ("train = print\n", "a variable"),
        ("train: object = print\n", "an annotated variable"),
        ("from os import system as train\n", "an import"),
        ("import train\n", "an imported module"),
        ("from os import *\n", "a star import"),
        ("def train(ctx): ...\ntrain = print\n", "rebound after the def"),
        ("def train(ctx): ...\nfrom subprocess import call as train\n", "re-imported over"),
        ("def train(ctx): ...\ndel train\n", "deleted"),
        ("def train(ctx): ...\nfor train in [print]: pass\n", "rebound by a loop"),
        ("def train(ctx): ...\nif True:\n    train = print\n", "rebound in a block"),
        ("if True:\n    def train(ctx): ...\n", "not at the top level"),
        ("def outer():\n    def train(ctx): ...\n", "nested in a function"),
        ("class Box:\n    def train(self, ctx): ...\n", "a method"),
    ],
)
def test_the_name_must_be_a_top_level_def_of_the_module(source: str, why: str) -> None:
    refusal = entrypoint_refusal(f"{EXAMPLES}.mine:train", DEFAULT, source)
    assert refusal is not None, why
    assert refusal == (
        f"entrypoint '{EXAMPLES}.mine:train' is not allowed: 'train' is not a function defined "
        f"in module '{EXAMPLES}.mine'; name a top-level def of that module"
    )


@pytest.mark.parametrize(
    "source",
    [
        "def train(ctx): ...\n",
        "async def train(ctx): ...\n",
        "def traced(f):\n    return f\n\n@traced\ndef train(ctx): ...\n",
        "train = None\ndef train(ctx): ...\n",
        "from os import *\ndef train(ctx): ...\n",
        "def train(ctx): ...\ndef helper():\n    train = 1\n    return train\n",
        "def train(ctx): ...\nresult = [x for x in range(3)]\nother = {'train': 1}\n",
    ],
)
def test_a_top_level_def_that_binds_the_name_last_is_allowed(source: str) -> None:
    assert entrypoint_refusal(f"{EXAMPLES}.mine:train", DEFAULT, source) is None


@pytest.mark.parametrize("source", ["def train(ctx)\n    ...\n", "def train(ctx): ...\n\x00\n"])
def test_a_module_that_does_not_parse_is_refused(source: str) -> None:
    refusal = entrypoint_refusal(f"{EXAMPLES}.mine:train", DEFAULT, source)
    assert refusal is not None
    assert refusal.startswith(
        f"entrypoint '{EXAMPLES}.mine:train' is not allowed: module '{EXAMPLES}.mine' does not "
        "parse ("
    )
    assert refusal.endswith("); fix its source")


def test_a_record_written_before_handles_were_stored_still_loads() -> None:
    stored = record("running", 0).model_dump(mode="json")
    del stored["handle"]
    old = RunRecord.model_validate_json(json.dumps(stored))
    assert old.handle is None
    kept = old.model_copy(update={"handle": "job-a0"})
    assert RunRecord.model_validate_json(kept.model_dump_json()).handle == "job-a0"
