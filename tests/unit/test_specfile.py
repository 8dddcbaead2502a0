"""A spec file as a user writes it: local paths are the user's files, relative to the file,
checked before anything is uploaded; everything else is the platform's to resolve."""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest

from torchrelay.shared.sweeps import sweep_refusal, trials
from torchrelay.specfile import (
    References,
    SpecError,
    check,
    files_of,
    is_local_path,
    pack,
    read,
    references,
    staged_spec,
)

SPEC = """
name: blobs
dataset: {name: blobs, source: data/blobs.csv}
training:
  workspace: ./src
  entrypoint: blobs_model:train
  model_name: blobs
"""


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "blobs.csv").write_text("x,y\n1,0\n")
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "blobs_model.py").write_text("def train(ctx): ...\n")
    (tmp_path / "pipeline.yaml").write_text(SPEC)
    return tmp_path


@pytest.mark.parametrize(
    ("source", "local"),
    [
        ("data/blobs.csv", True),
        ("./data", True),
        ("/home/me/blobs.csv", True),
        ("sklearn:digits", False),
        ("https://example.org/blobs.csv", False),
        ("file:///srv/data/blobs.csv", False),
        ("upload:blobs.csv", False),
    ],
)
def test_a_source_without_a_scheme_is_a_local_path(source: str, *, local: bool) -> None:
    assert is_local_path(source) is local


def test_local_files_resolve_against_the_spec_files_folder(project: Path) -> None:
    raw = read(project / "pipeline.yaml")
    refs = references(raw, project)
    assert refs == References(project / "data" / "blobs.csv", project / "src")


def test_a_spec_without_local_files_names_none(project: Path) -> None:
    raw = {"name": "d", "dataset": {"name": "digits", "source": "sklearn:digits"}}
    assert references(raw, project) == References(None, None)


def test_a_staged_workspace_id_is_kept_when_no_such_folder_exists(project: Path) -> None:
    raw = {"training": {"workspace": "0123456789abcdef"}}
    assert references(raw, project).workspace is None


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"dataset": {"name": "blobs", "source": "data/missing.csv"}},
            "dataset source data/missing.csv does not exist",
        ),
        ({"training": {"workspace": "./nowhere"}}, "workspace ./nowhere does not exist"),
        ({"training": {"workspace": "data/blobs.csv"}}, "is not a folder"),
    ],
)
def test_a_local_file_that_is_not_there_is_a_clear_error(
    project: Path, change: dict[str, object], message: str
) -> None:
    raw = {**read(project / "pipeline.yaml"), **change}
    with pytest.raises(SpecError, match=message):
        references(raw, project)


def test_a_missing_or_broken_spec_file_says_which(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="does not exist"):
        read(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("name: [unclosed\n")
    with pytest.raises(SpecError, match="does not parse"):
        read(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(SpecError, match="must hold a mapping"):
        read(tmp_path / "list.yaml")


def test_an_invalid_spec_is_refused_before_anything_is_uploaded(project: Path) -> None:
    raw = read(project / "pipeline.yaml")
    raw["training"]["world_size"] = 0
    with pytest.raises(SpecError, match=r"training\.world_size"):
        check(raw, references(raw, project))


def test_the_staged_spec_names_what_was_staged_instead_of_the_files(project: Path) -> None:
    raw = read(project / "pipeline.yaml")
    spec = staged_spec(raw, dataset_version="v1", workspace="0123456789abcdef")
    assert spec.dataset.source is None
    assert spec.dataset.version == "v1"
    assert spec.training.workspace == "0123456789abcdef"
    assert raw["training"]["workspace"] == "./src", "the file's content is left as it was"


def test_packing_takes_plain_files_and_links_inside_and_skips_caches(project: Path) -> None:
    src = project / "src"
    (src / "pkg").mkdir()
    (src / "pkg" / "nets.py").write_text("NETS = 1\n")
    (src / "__pycache__").mkdir()
    (src / "__pycache__" / "blobs_model.cpython-311.pyc").write_bytes(b"\0")
    (src / "alias.py").symlink_to(src / "pkg" / "nets.py")
    with pack(src) as packed, tarfile.open(fileobj=packed, mode="r:gz") as tar:
        members = {m.name: m for m in tar.getmembers()}
        assert sorted(members) == ["alias.py", "blobs_model.py", "pkg/nets.py"]
        assert all(m.isfile() for m in members.values())
        alias = tar.extractfile(members["alias.py"])
        assert alias is not None
        assert alias.read() == b"NETS = 1\n"


@pytest.mark.parametrize("target", ["/etc/hostname", "../data/blobs.csv"])
def test_a_link_leaving_the_folder_is_refused(project: Path, target: str) -> None:
    (project / "src" / "escape.py").symlink_to(target)
    with pytest.raises(SpecError, match="outside"):
        list(files_of(project / "src"))


def test_a_link_to_a_folder_is_refused(project: Path) -> None:
    (project / "src" / "more").symlink_to(project / "data", target_is_directory=True)
    with pytest.raises(SpecError, match="link to a folder"):
        list(files_of(project / "src"))


@pytest.mark.parametrize(
    ("written", "value"),
    [("1e-4", 1e-4), ("1E-3", 1e-3), ("-2.5e+3", -2500.0), ("1.0e3", 1000.0), (".5e-2", 0.005)],
)
def test_numbers_in_scientific_notation_are_floats(
    tmp_path: Path, written: str, value: float
) -> None:
    """YAML 1.1 (PyYAML) reads ``1e-4`` as a string; a spec file reads it as JSON would."""
    (tmp_path / "spec.yaml").write_text(f"training:\n  hyperparameters: {{lr: {written}}}\n")
    lr = read(tmp_path / "spec.yaml")["training"]["hyperparameters"]["lr"]
    assert type(lr) is float
    assert lr == pytest.approx(value)


def test_a_quoted_number_and_other_scalars_stay_what_yaml_says(tmp_path: Path) -> None:
    (tmp_path / "spec.yaml").write_text(
        "a: '1e-4'\nb: \"2E5\"\nc: 1e\nd: e5\ne: 3\nf: 0.25\ng: v1e3\n"
    )
    assert read(tmp_path / "spec.yaml") == {
        "a": "1e-4",
        "b": "2E5",
        "c": "1e",
        "d": "e5",
        "e": 3,
        "f": 0.25,
        "g": "v1e3",
    }


SWEEP = """
name: digits-sweep
dataset: {name: digits, source: data/blobs.csv}
training: {entrypoint: m:train, model_name: digits}
sweep:
  space:
    lr: {type: loguniform, low: 1e-1, high: 1e-4}
  algorithm: random
  objective: {metric: accuracy, direction: maximize}
  max_trials: 2
  parallel: 3
"""


def test_a_sweep_that_cannot_run_is_refused_before_anything_is_uploaded(project: Path) -> None:
    (project / "sweep.yaml").write_text(SWEEP)
    raw = read(project / "sweep.yaml")
    with pytest.raises(SpecError) as refused:
        check(raw, references(raw, project))
    assert str(refused.value) == (
        "invalid sweep: lr: loguniform needs low < high, got low=0.1, high=0.0001; "
        "parallel (3) cannot exceed max_trials (2)"
    )


def test_the_sweep_example_loads_and_can_run() -> None:
    example = Path(__file__).parents[2] / "examples" / "sweep" / "sweep.yaml"
    raw = read(example)
    assert references(raw, example.parent) == References(None, None)
    spec = staged_spec(raw, dataset_version=None, workspace=None)
    assert spec.sweep is not None
    assert sweep_refusal(spec.sweep) is None
    assert [t["lr"] for t in trials(spec.sweep)] == [0.3, 0.03, 0.003, 0.0003]
    assert spec.deploy.gate is not None
    assert spec.deploy.gate.metric == spec.sweep.objective.metric
