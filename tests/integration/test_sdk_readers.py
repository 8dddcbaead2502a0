"""The training SDK reads every format ingest stages: npz, csv (numbers and text columns),
image folders and .pt tensor files, from real version folders staged by the ingest stager; a
reader on another format, a missing name or file, and mixed image sizes are clear errors."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from torchrelay.sdk import TrainingContext, WrongDatasetFormat
from torchrelay.services.ingest.fill import fill_for
from torchrelay.services.ingest.settings import IngestOptions
from torchrelay.services.ingest.staging import Stager, StageRequest
from torchrelay.shared.cluster.worker_spec import WorkerSpec
from torchrelay.shared.events.data import DatasetRef, TrainJobSpec
from torchrelay.shared.storage import MissingFile

Write = Callable[[Path], object]


async def staged(tmp_path: Path, name: str, files: dict[str, Write]) -> TrainingContext:
    """``files`` (relative path -> writer) staged by ingest as dataset ``name``, and the
    context a rank of a job on it gets."""
    source = tmp_path / "source" / name
    for relative, write in files.items():
        (source / relative).parent.mkdir(parents=True, exist_ok=True)
        write(source / relative)
    root = tmp_path / "storage"
    options = IngestOptions(allowed_roots=[tmp_path / "source"])
    version = await Stager(root, options.limits()).stage(
        StageRequest("r", name, str(source)), fill_for(str(source), options)
    )
    spec = WorkerSpec(
        run_id=f"run-{name}",
        attempt=0,
        rank=0,
        world_size=1,
        rendezvous="file:///unused",
        backend="gloo",
        job=TrainJobSpec(
            dataset=DatasetRef(name=name, version=version.manifest.version),
            entrypoint="torchrelay.services.train.examples.digits:train",
            world_size=1,
            model_name=name,
        ),
        storage_root=str(root),
        dataset_path=version.path,
    )
    return TrainingContext(spec, lambda kind, fields: None)


def npz(**arrays: np.ndarray) -> Write:
    return lambda path: np.savez(path, **arrays)  # type: ignore[arg-type]


def text(content: str) -> Write:
    return lambda path: path.write_text(content, encoding="utf-8")


def png(pixels: np.ndarray) -> Write:
    return lambda path: Image.fromarray(pixels).save(path)


def saved(value: object) -> Write:
    return lambda path: torch.save(value, path)


# --- npz -----------------------------------------------------------------------------------


async def test_npz_arrays_by_name_from_the_first_file_or_the_named_one(tmp_path: Path) -> None:
    ctx = await staged(
        tmp_path,
        "points",
        {
            "a.npz": npz(x=np.arange(6, dtype=np.float32).reshape(3, 2), y=np.array([0, 1, 0])),
            "b.npz": npz(x=np.ones((2, 2), dtype=np.float32), y=np.array([1, 1])),
        },
    )
    assert ctx.dataset_format == "npz"
    assert ctx.dataset_files == ("a.npz", "b.npz")
    x, y = ctx.arrays("x", "y")
    assert x.dtype == torch.float32
    assert x.tolist() == [[0, 1], [2, 3], [4, 5]]
    assert y.tolist() == [0, 1, 0]
    (second,) = ctx.arrays("y", file="b.npz")
    assert second.tolist() == [1, 1]
    with pytest.raises(KeyError, match=r"a.npz has no array 'labels'; it has 'x', 'y'"):
        ctx.arrays("x", "labels")
    with pytest.raises(FileNotFoundError, match=r"no file 'c.npz' in dataset points; it has a"):
        ctx.arrays("x", file="c.npz")
    with pytest.raises(WrongDatasetFormat, match=r"ctx.tensors\(\) reads pt datasets; dataset "):
        ctx.tensors()


# --- csv -----------------------------------------------------------------------------------

TABLE = "age,height,species,grade\n3,1.5,setosa,10\n-7,2,virginica,2\n12,,setosa,2\n"


async def test_csv_numeric_columns_are_int64_or_float32_tensors(tmp_path: Path) -> None:
    ctx = await staged(tmp_path, "flowers", {"train.csv": text(TABLE)})
    assert ctx.dataset_format == "csv"
    age, height, grade = ctx.arrays("age", "height", "grade")
    assert age.dtype == torch.int64
    assert age.tolist() == [3, -7, 12]
    assert height.dtype == torch.float32
    assert height[:2].tolist() == [1.5, 2.0]
    assert torch.isnan(height[2]), "an empty cell reads as NaN"
    assert grade.dtype == torch.int64


async def test_csv_text_columns_are_categories_with_sorted_class_names(tmp_path: Path) -> None:
    ctx = await staged(tmp_path, "flowers", {"train.csv": text(TABLE)})
    codes, names = ctx.categories("species")
    assert names == ["setosa", "virginica"]
    assert codes.dtype == torch.int64
    assert codes.tolist() == [0, 1, 0]
    grades, classes = ctx.categories("grade")
    assert classes == ["2", "10"], "numbers sort as numbers"
    assert grades.tolist() == [1, 0, 0]
    with pytest.raises(TypeError, match=r"holds text \('setosa'\).*ctx.categories\('species'\)"):
        ctx.arrays("age", "species")


async def test_csv_missing_columns_and_files_name_what_there_is(tmp_path: Path) -> None:
    ctx = await staged(
        tmp_path,
        "flowers",
        {"test.csv": text("age\n1\n"), "train.csv": text(TABLE)},
    )
    assert ctx.arrays("age")[0].tolist() == [1], "the first file (sorted) unless one is named"
    assert ctx.arrays("age", file="train.csv")[0].tolist() == [3, -7, 12]
    with pytest.raises(KeyError, match=r"train.csv has no column 'colour'; it has 'age', "):
        ctx.categories("colour", file="train.csv")
    with pytest.raises(FileNotFoundError, match=r"no file '../x.csv'"):
        ctx.arrays("age", file="../x.csv")
    with pytest.raises(WrongDatasetFormat, match=r"dataset flowers is csv: use ctx.arrays"):
        ctx.images()


# --- images --------------------------------------------------------------------------------


def grey(value: int, height: int = 3, width: int = 4) -> np.ndarray:
    return np.full((height, width), value, dtype=np.uint8)


async def test_an_image_folder_is_a_float_tensor_with_labels_and_class_names(
    tmp_path: Path,
) -> None:
    ctx = await staged(
        tmp_path,
        "shapes",
        {
            "circle/a.png": png(grey(0)),
            "circle/b.png": png(grey(255)),
            "square/c.png": png(grey(51)),
        },
    )
    assert ctx.dataset_format == "images"
    images, labels, classes = ctx.images()
    assert images.shape == (3, 1, 3, 4), "N x C x H x W, one channel for grayscale"
    assert images.dtype == torch.float32
    assert images[:, 0, 0, 0].tolist() == pytest.approx([0.0, 1.0, 0.2])
    assert labels.dtype == torch.int64
    assert labels.tolist() == [0, 0, 1]
    assert classes == ["circle", "square"]
    rgb = ctx.images(mode="RGB").images
    assert rgb.shape == (3, 3, 3, 4)
    with pytest.raises(WrongDatasetFormat, match=r"reads npz or csv datasets.*use ctx.images"):
        ctx.arrays("x")


async def test_colour_images_have_three_channels_in_rgb_order(tmp_path: Path) -> None:
    red = np.zeros((2, 2, 3), dtype=np.uint8)
    red[..., 0] = 255
    ctx = await staged(
        tmp_path, "colours", {"red/a.png": png(red), "grey/b.png": png(grey(255, 2, 2))}
    )
    images, labels, classes = ctx.images()
    assert classes == ["grey", "red"]
    assert images.shape == (2, 3, 2, 2), "one colour image makes every image RGB"
    assert images[labels.tolist().index(1), :, 0, 0].tolist() == [1.0, 0.0, 0.0]
    assert images[labels.tolist().index(0), :, 0, 0].tolist() == [1.0, 1.0, 1.0]


async def test_images_of_different_sizes_need_a_size_to_resize_to(tmp_path: Path) -> None:
    ctx = await staged(
        tmp_path,
        "sizes",
        {"big/a.png": png(grey(100, 8, 6)), "small/b.png": png(grey(100, 3, 4))},
    )
    with pytest.raises(ValueError, match=r"differ in size.*6x8 \(1, e.g. big/a.png\).*size="):
        ctx.images()
    images, _, _ = ctx.images(size=(5, 7))
    assert images.shape == (2, 1, 5, 7)
    assert torch.allclose(images, torch.full_like(images, 100 / 255)), "a flat image stays flat"


# --- pt ------------------------------------------------------------------------------------


async def test_pt_files_are_dicts_of_named_tensors(tmp_path: Path) -> None:
    ctx = await staged(
        tmp_path,
        "tensors",
        {
            "data.pt": saved({"x": torch.arange(4.0), "y": torch.tensor([1, 0, 1, 0])}),
            "single.pt": saved(torch.zeros(2, 3)),
        },
    )
    assert ctx.dataset_format == "pt"
    data = ctx.tensors()
    assert sorted(data) == ["x", "y"]
    assert data["x"].tolist() == [0.0, 1.0, 2.0, 3.0]
    with pytest.raises(TypeError, match=r"single.pt holds a single tensor of shape \[2, 3\]"):
        ctx.tensors(file="single.pt")
    with pytest.raises(WrongDatasetFormat, match=r"ctx.categories\(\) reads csv.*ctx.tensors"):
        ctx.categories("x")


async def test_a_dataset_folder_without_its_manifest_is_refused_by_every_reader(
    tmp_path: Path,
) -> None:
    ctx = await staged(tmp_path, "points", {"a.npz": npz(x=np.zeros(2))})
    (ctx.dataset_dir.parent / "manifest.json").unlink()
    with pytest.raises(MissingFile, match=r"manifest.json: no dataset manifest"):
        ctx.arrays("x")
