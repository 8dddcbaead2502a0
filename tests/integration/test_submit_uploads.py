"""`torchrelay submit`'s side of a user's own files: the spec file's data and workspace are
uploaded to the real ingest service, and the submitted spec names what it staged."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.processes import ServiceProcess
from tests.integration.test_ingest_service import ingest_process
from torchrelay.shared.storage.layout import Layout
from torchrelay.specfile import SpecError, Uploader, prepare

pytestmark = [pytest.mark.timeout(120)]
EXAMPLE = Path(__file__).parents[2] / "examples" / "byom"


@pytest.fixture
def project(tmp_path: Path) -> Path:
    return Path(shutil.copytree(EXAMPLE, tmp_path / "my-project"))


@pytest.fixture
def ingest(nats_url: str, tmp_path: Path) -> Iterator[tuple[ServiceProcess, Path]]:
    # No allowed roots: a user's own files need none.
    process, _, storage = ingest_process(
        nats_url,
        tmp_path,
        TORCHRELAY_INGEST_ALLOWED_ROOTS="",
        TORCHRELAY_INGEST_MAX_WORKSPACE_FILES="5",
    )
    yield process, storage
    process.stop()


async def test_the_spec_files_data_and_workspace_are_staged_and_named(
    ingest: tuple[ServiceProcess, Path], project: Path
) -> None:
    process, storage = ingest
    uploader = Uploader(f"http://127.0.0.1:{await process.wait_ready()}")
    said: list[str] = []
    spec = await prepare(project / "pipeline.yaml", lambda: uploader, said.append)
    layout = Layout(storage)
    assert spec.training.workspace is not None
    code = layout.workspace_code(spec.training.workspace)
    assert (code / "blobs_model.py").read_bytes() == (
        project / "src" / "blobs_model.py"
    ).read_bytes()
    assert (code / "nets.py").is_file()
    assert spec.dataset.source is None
    assert spec.dataset.version is not None
    assert layout.manifest("blobs", spec.dataset.version).is_file()
    assert [line.split(" as ")[1].split()[0] for line in said] == ["workspace", "dataset"]

    again = await prepare(project / "pipeline.yaml", lambda: uploader, said.append)
    assert again == spec, "the same files are the same workspace and dataset version"
    (project / "src" / "nets.py").write_text(
        "# changed\n" + (project / "src" / "nets.py").read_text()
    )
    changed = await prepare(project / "pipeline.yaml", lambda: uploader, said.append)
    assert changed.training.workspace != spec.training.workspace
    assert changed.dataset.version == spec.dataset.version


async def test_a_data_folder_travels_as_one_archive(
    ingest: tuple[ServiceProcess, Path], project: Path
) -> None:
    process, storage = ingest
    uploader = Uploader(f"http://127.0.0.1:{await process.wait_ready()}")
    (project / "data" / "more").mkdir()
    shutil.copy(project / "data" / "blobs.csv", project / "data" / "more" / "extra.csv")
    text = (
        (project / "pipeline.yaml").read_text().replace("source: data/blobs.csv", "source: ./data")
    )
    (project / "pipeline.yaml").write_text(text)
    spec = await prepare(project / "pipeline.yaml", lambda: uploader, print)
    assert spec.dataset.version is not None
    data = Layout(storage).dataset_data("blobs", spec.dataset.version)
    assert sorted(p.relative_to(data).as_posix() for p in data.rglob("*.csv")) == [
        "blobs.csv",
        "more/extra.csv",
    ]


async def test_ingests_refusal_is_the_submitters_error_and_nothing_is_staged(
    ingest: tuple[ServiceProcess, Path], project: Path
) -> None:
    process, storage = ingest
    uploader = Uploader(f"http://127.0.0.1:{await process.wait_ready()}")
    for index in range(5):
        (project / "src" / f"extra{index}.py").write_text("")
    with pytest.raises(SpecError, match="TORCHRELAY_INGEST_MAX_WORKSPACE_FILES"):
        await prepare(project / "pipeline.yaml", lambda: uploader, print)
    assert not any(Layout(storage).workspaces().glob("*/manifest.json"))


async def test_an_unreachable_ingest_is_a_clear_error(project: Path) -> None:
    uploader = Uploader("http://127.0.0.1:9")
    with pytest.raises(SpecError, match=r"cannot upload .* to ingest at http://127\.0\.0\.1:9"):
        await prepare(project / "pipeline.yaml", lambda: uploader, print)
