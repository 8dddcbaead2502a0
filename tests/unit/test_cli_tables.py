"""Tables in a pipe: plain aligned columns, one row a line, nothing cut, no trailing blanks."""

from __future__ import annotations

import pytest

from torchrelay.cli.base import show_table


def test_a_table_aligns_columns_under_their_headings(capsys: pytest.CaptureFixture[str]) -> None:
    show_table([{"model": "digits", "status": "deployed"}, {"model": "a", "status": "x"}])
    assert capsys.readouterr().out.splitlines() == [
        " MODEL   STATUS",
        " digits  deployed",
        " a       x",
    ]


def test_a_wide_row_is_never_cut_or_folded(capsys: pytest.CaptureFixture[str]) -> None:
    wide = "x" * 300
    show_table([{"endpoint": wide, "status": "deployed"}], title="deployments")
    assert capsys.readouterr().out.splitlines() == [
        "DEPLOYMENTS",
        f" {'ENDPOINT':300s}  STATUS",
        f" {wide}  deployed",
    ]


def test_an_empty_table_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    show_table([])
    assert capsys.readouterr().out == "  (none)\n"
