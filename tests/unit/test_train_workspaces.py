"""Entrypoints from a staged workspace: found on disk in the workspace, never in the service's
own environment, and checked like any entrypoint (a function defined in its module)."""

from __future__ import annotations

from pathlib import Path

import pytest

from torchrelay.services.train.workspaces import module_file, workspace_refusal
from torchrelay.shared.storage.layout import Layout

WORKSPACE = "0123456789abcdef"
TRAIN = "def train(ctx):\n    pass\n"


def staged(root: Path, files: dict[str, str]) -> Layout:
    """A workspace as ingest leaves it: a manifest beside the code folder."""
    layout = Layout(root)
    code = layout.workspace_code(WORKSPACE)
    for name, text in files.items():
        (code / name).parent.mkdir(parents=True, exist_ok=True)
        (code / name).write_text(text)
    layout.workspace_manifest(WORKSPACE).write_text("{}")
    return layout


def test_a_function_of_a_workspace_module_may_run_whatever_the_module_prefixes(
    tmp_path: Path,
) -> None:
    layout = staged(tmp_path, {"blobs_model.py": TRAIN, "mypkg/trainers/mlp.py": TRAIN})
    assert workspace_refusal(layout, WORKSPACE, "blobs_model:train") is None
    assert workspace_refusal(layout, WORKSPACE, "mypkg.trainers.mlp:train") is None


def test_a_package_module_is_its_init_file(tmp_path: Path) -> None:
    layout = staged(tmp_path, {"mypkg/__init__.py": TRAIN})
    code = layout.workspace_code(WORKSPACE)
    assert module_file(code, "mypkg") == (code / "mypkg" / "__init__.py").resolve()
    assert workspace_refusal(layout, WORKSPACE, "mypkg:train") is None


def test_a_misspelt_function_is_refused_with_the_likely_name(tmp_path: Path) -> None:
    layout = staged(tmp_path, {"digits.py": TRAIN})
    refusal = workspace_refusal(layout, WORKSPACE, "digits:trian")
    assert refusal is not None
    assert "'trian' is not a function defined in module 'digits'" in refusal
    assert "(did you mean 'train'?)" in refusal


def test_a_module_the_workspace_lacks_is_refused_listing_what_it_has(tmp_path: Path) -> None:
    layout = staged(tmp_path, {"digits.py": TRAIN, "util/io.py": ""})
    refusal = workspace_refusal(layout, WORKSPACE, "blobs:train")
    assert refusal is not None
    assert "has no module 'blobs'" in refusal
    assert "digits.py, util/io.py" in refusal


@pytest.mark.parametrize("entrypoint", ["os:system", "subprocess:call", "torch:load"])
def test_a_workspace_module_may_not_take_the_name_of_what_the_worker_imports(
    tmp_path: Path, entrypoint: str
) -> None:
    module = entrypoint.partition(":")[0]
    layout = staged(tmp_path, {f"{module}.py": "def system(c): pass\ndef call(c): pass\n"})
    refusal = workspace_refusal(layout, WORKSPACE, entrypoint)
    assert refusal is not None
    assert f"takes the name of {module!r}" in refusal


def test_a_name_bound_by_import_is_not_a_function_of_the_workspace(tmp_path: Path) -> None:
    layout = staged(tmp_path, {"sneaky.py": "from os import system as train\n"})
    refusal = workspace_refusal(layout, WORKSPACE, "sneaky:train")
    assert refusal is not None
    assert "not a function defined in module 'sneaky'" in refusal


def test_a_link_out_of_the_workspace_is_no_module(tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere.py"
    outside.write_text(TRAIN)
    layout = staged(tmp_path / "root", {"ok.py": TRAIN})
    (layout.workspace_code(WORKSPACE) / "linked.py").symlink_to(outside)
    refusal = workspace_refusal(layout, WORKSPACE, "linked:train")
    assert refusal is not None
    assert "has no module 'linked'" in refusal


def test_an_unknown_workspace_is_refused_saying_how_to_stage_one(tmp_path: Path) -> None:
    refusal = workspace_refusal(Layout(tmp_path), "fedcba9876543210", "blobs:train")
    assert refusal is not None
    assert "unknown workspace fedcba9876543210" in refusal
