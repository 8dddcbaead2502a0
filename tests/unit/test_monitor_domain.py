"""The monitor keeps metric labels bounded."""

from __future__ import annotations

from torchrelay.services.monitor.domain import EXTERNAL, UNKNOWN, source_label, type_label


def test_sources_of_our_services_are_named() -> None:
    assert source_label("/torchrelay/ingest") == "ingest"
    assert source_label("/torchrelay/train/worker/3") == "train"


def test_any_other_source_is_external() -> None:
    for source in ("/another/system", "https://ci.example/jobs/42", "/torchrelay/unknown", "x"):
        assert source_label(source) == EXTERNAL


def test_unknown_types_collapse_into_one_label() -> None:
    known = frozenset({"io.torchrelay.dataset.staged.v1"})
    assert type_label("io.torchrelay.dataset.staged.v1", known) == "io.torchrelay.dataset.staged.v1"
    assert type_label("whatever-a-publisher-sent", known) == UNKNOWN
    assert type_label(None, known) == UNKNOWN
