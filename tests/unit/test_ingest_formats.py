"""The .npy headers staging reads itself agree with numpy's own reading, for every kind of
array numpy writes: the quick pattern for plain arrays, numpy's parser for the rest."""

from __future__ import annotations

from pathlib import Path, PurePosixPath

import numpy as np
import pytest

from torchrelay.services.ingest.formats import validate

ARRAYS = {
    "scalar": np.float32(3.5),
    "vector": np.arange(7, dtype=np.int64),
    "matrix": np.zeros((4, 3), dtype=np.uint8),
    "fortran": np.asfortranarray(np.ones((4, 2), dtype=np.float64)),
    "big_endian": np.arange(4, dtype=">i4"),
    "booleans": np.array([True, False]),
    "complex": np.zeros(4, dtype=np.complex128),
    "text": np.array(["ab", "cde"]),
    "dates": np.array(["2026-01-01"], dtype="datetime64[ns]"),
    "records": np.zeros(4, dtype=[("a", "<i4"), ("b", "<f8")]),
    "empty": np.zeros((0, 5), dtype=np.float16),
}


@pytest.mark.parametrize("name", sorted(ARRAYS))
def test_an_array_summary_matches_numpy(tmp_path: Path, name: str) -> None:
    array = np.asarray(ARRAYS[name])
    np.savez(tmp_path / "a.npz", x=array)
    summary = validate("npz", tmp_path, [PurePosixPath("a.npz")])
    assert summary == {
        "arrays": {"a.npz": {"x": {"shape": list(array.shape), "dtype": str(array.dtype)}}}
    }
