"""The storage layout: every path the services share, and names that cannot escape their folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from torchrelay.shared.errors import PermanentError, UnsafePath
from torchrelay.shared.storage import Layout
from torchrelay.shared.storage.layout import (
    RANK_LOG_GLOB,
    relative_dataset,
    relative_model,
    relative_run,
)

ROOT = Path("/srv/storage")
LAYOUT = Layout(ROOT)


def test_every_path_is_where_the_design_puts_it() -> None:
    assert LAYOUT.datasets() == ROOT / "datasets"
    assert LAYOUT.dataset("digits", "abc") == ROOT / "datasets/digits/abc"
    assert LAYOUT.dataset_data("digits", "abc") == ROOT / "datasets/digits/abc/data"
    assert LAYOUT.manifest("digits", "abc") == ROOT / "datasets/digits/abc/manifest.json"
    assert LAYOUT.run("r1") == ROOT / "runs/r1"
    assert LAYOUT.result("r1") == ROOT / "runs/r1/result.json"
    assert LAYOUT.checkpoints("r1") == ROOT / "runs/r1/checkpoints"
    assert LAYOUT.logs("r1") == ROOT / "runs/r1/logs"
    assert LAYOUT.attempt_logs("r1", 2) == ROOT / "runs/r1/logs/attempt-2"
    assert LAYOUT.rank_log("r1", 2, 1) == ROOT / "runs/r1/logs/attempt-2/rank-1.log"
    assert LAYOUT.rendezvous("r1", 2) == ROOT / "runs/r1/rendezvous/attempt-2"
    assert LAYOUT.model("digits", "r1") == ROOT / "models/digits/r1"
    assert LAYOUT.model_description("digits", "r1") == ROOT / "models/digits/r1/model.json"
    assert LAYOUT.serving_logs("digits", "r1") == ROOT / "serving/digits/r1"
    assert LAYOUT.admin_sockets() == ROOT / "serving/_admin"


def test_relative_forms_are_what_records_store_and_resolve_back() -> None:
    assert relative_dataset("digits", "abc") == "datasets/digits/abc"
    assert relative_model("digits", "run-1.train") == "models/digits/run-1.train"
    assert relative_run("run-1") == "runs/run-1"
    assert LAYOUT.at(relative_dataset("digits", "abc")) == LAYOUT.dataset("digits", "abc")
    assert LAYOUT.at(relative_model("digits", "v")) == LAYOUT.model("digits", "v")


def test_the_rank_log_glob_matches_the_rank_log_names() -> None:
    assert LAYOUT.rank_log("r1", 0, 3).relative_to(LAYOUT.logs("r1")).match(RANK_LOG_GLOB)


@pytest.mark.parametrize("bad", ["", ".", "..", "a/b", "../etc", "a\0b"])
def test_a_name_that_is_not_one_segment_is_refused(bad: str) -> None:
    for build in (
        lambda: LAYOUT.run(bad),
        lambda: LAYOUT.model(bad, "v1"),
        lambda: LAYOUT.model("digits", bad),
        lambda: LAYOUT.dataset(bad, "v1"),
        lambda: LAYOUT.serving_logs("digits", bad),
        lambda: relative_dataset("d", bad),
    ):
        with pytest.raises(UnsafePath, match="not a single path segment"):
            build()


@pytest.mark.parametrize("bad", ["", "/etc/passwd", "datasets/../../etc", "../x"])
def test_a_stored_relative_path_cannot_leave_the_root(bad: str) -> None:
    with pytest.raises(UnsafePath) as caught:
        LAYOUT.at(bad)
    assert isinstance(caught.value, PermanentError)


def test_negative_attempts_and_ranks_are_refused() -> None:
    with pytest.raises(ValueError, match="attempt must be >= 0"):
        LAYOUT.attempt_logs("r1", -1)
    with pytest.raises(ValueError, match="rank must be >= 0"):
        LAYOUT.rank_log("r1", 0, -1)


def test_the_layout_never_touches_the_disk(tmp_path: Path) -> None:
    layout = Layout(tmp_path / "nowhere")
    layout.rank_log("r1", 0, 0)
    layout.model_description("m", "v")
    assert not (tmp_path / "nowhere").exists()
