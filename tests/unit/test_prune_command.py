"""What `torchrelay prune` reads (an AGE) and prints (the monitor's answer as a table and a
summary): torchrelay/cli/pruning.py."""

from __future__ import annotations

import pytest

from torchrelay.cli.pruning import age_text, bytes_text, parse_age, prune_rows, prune_summary
from torchrelay.shared.events.data import PrunedData, PrunedItem

DAY_S = 86_400.0


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90s", 90.0),
        ("15m", 900.0),
        ("12h", 43_200.0),
        ("30d", 30 * DAY_S),
        ("2w", 14 * DAY_S),
        (" 1d ", DAY_S),
    ],
)
def test_an_age_is_a_whole_number_and_a_unit(text: str, seconds: float) -> None:
    assert parse_age(text) == seconds


@pytest.mark.parametrize("text", ["30", "d", "1.5d", "-1d", "0s", "3x", "30 d", "", "1y"])
def test_anything_else_is_refused_with_what_is_accepted(text: str) -> None:
    with pytest.raises(ValueError, match=r"s, m, h, d or w \(e\.g\. 90s, 15m, 12h, 30d, 2w\)"):
        parse_age(text)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(14 * DAY_S, "2w"), (40 * DAY_S, "40d"), (40 * DAY_S + 5, "40d"), (3600, "1h"), (59, "59s")],
)
def test_ages_print_in_their_largest_unit(seconds: float, text: str) -> None:
    assert age_text(seconds) == text


@pytest.mark.parametrize(
    ("size", "text"), [(0, "0 B"), (1023, "1023 B"), (1536, "1.5 KiB"), (3 * 1024**3, "3.0 GiB")]
)
def test_bytes_print_in_binary_units(size: int, text: str) -> None:
    assert bytes_text(size) == text


def answer(*, dry_run: bool, problems: list[str] | None = None) -> PrunedData:
    return PrunedData(
        request_id="req-1",
        dry_run=dry_run,
        older_than_s=30 * DAY_S,
        removed=[PrunedItem(kind="pipelines", name="p-old", age_s=40 * DAY_S)],
        kept=[
            PrunedItem(
                kind="models",
                name="digits@r2",
                age_s=35 * DAY_S,
                reason="served by deployment digits",
            )
        ],
        bytes_freed=2048,
        problems=problems or [],
    )


def test_rows_list_what_went_then_what_stayed_and_why() -> None:
    assert prune_rows(answer(dry_run=False)) == [
        {"action": "removed", "kind": "pipelines", "name": "p-old", "age": "40d", "why kept": ""},
        {
            "action": "kept",
            "kind": "models",
            "name": "digits@r2",
            "age": "5w",
            "why kept": "served by deployment digits",
        },
    ]


def test_a_dry_run_says_what_would_go() -> None:
    assert prune_rows(answer(dry_run=True))[0]["action"] == "would remove"
    assert prune_summary(answer(dry_run=True)) == ["would free 2.0 KiB (1 removed, 1 kept)"]


def test_the_summary_gives_bytes_freed_and_each_problem() -> None:
    summary = prune_summary(answer(dry_run=False, problems=["runs r1: could not remove runs/r1"]))
    assert summary == [
        "freed 2.0 KiB (1 removed, 1 kept)",
        "problem: runs r1: could not remove runs/r1",
    ]
