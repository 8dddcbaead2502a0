"""A resumed attempt starts from the newest complete checkpoint: never from one being written
(a rank killed mid-save leaves only a temporary file), never from a truncated or incomplete
one, and with exactly the weights that were saved."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from torchrelay.services.train.worker import checkpoints
from torchrelay.shared.storage import temp_sibling


def state(step: int) -> dict[str, Any]:
    weights = torch.Generator().manual_seed(step)
    return {
        "step": step,
        "epoch": 0,
        "position": step,
        "model": {"w": torch.randn(4, 3, generator=weights)},
        "optimizer": {"state": {}, "param_groups": []},
        "rng": [torch.get_rng_state()],
    }


def saved(folder: Path, *steps: int, keep: int = 3) -> None:
    for step in steps:
        checkpoints.save(folder, step, state(step), keep)


def test_a_resume_takes_the_newest_checkpoint_with_its_exact_weights(tmp_path: Path) -> None:
    saved(tmp_path, 10, 20, 30)
    restored = checkpoints.load_newest(tmp_path)
    assert restored is not None
    step, loaded = restored
    assert step == 30
    assert torch.equal(loaded["model"]["w"], state(30)["model"]["w"]), "bit-identical"


def test_a_checkpoint_still_being_written_is_never_read(tmp_path: Path) -> None:
    saved(tmp_path, 10, 20)
    whole = (tmp_path / "step-20.pt").read_bytes()
    # Killed mid-save: the bytes so far lie under a temporary name, never under step-30.pt.
    temp_sibling(tmp_path / "step-30.pt").write_bytes(whole[: len(whole) // 2])
    assert checkpoints.list_steps(tmp_path) == [10, 20]
    restored = checkpoints.load_newest(tmp_path)
    assert restored is not None
    assert restored[0] == 20


def test_a_truncated_or_incomplete_newest_checkpoint_is_skipped_for_the_one_before(
    tmp_path: Path,
) -> None:
    saved(tmp_path, 10, 20)
    whole = (tmp_path / "step-20.pt").read_bytes()
    (tmp_path / "step-30.pt").write_bytes(whole[: len(whole) // 2])  # truncated on the share
    incomplete = {k: v for k, v in state(40).items() if k != "optimizer"}
    torch.save(incomplete, tmp_path / "step-40.pt")
    restored = checkpoints.load_newest(tmp_path)
    assert restored is not None
    assert restored[0] == 20


def test_only_the_last_k_checkpoints_are_kept(tmp_path: Path) -> None:
    saved(tmp_path, 10, 20, 30, 40, keep=2)
    assert checkpoints.list_steps(tmp_path) == [30, 40]


def test_no_checkpoint_means_a_fresh_start(tmp_path: Path) -> None:
    assert checkpoints.load_newest(tmp_path / "absent") is None
