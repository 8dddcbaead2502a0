"""Validation of staged files per format. Each format checks one file at a time (files are
independent, so a pool checks many at once) and returns what the schema summary says of it,
or raises :class:`Rejected` saying what is wrong with which file; the parts then combine into
the manifest's summary.

numpy, Pillow and torch are imported here only, and lazily: torch only for ``pt`` datasets.
"""

from __future__ import annotations

import csv
import functools
import io
import math
import pickle
import re
import zipfile
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path, PurePosixPath
from typing import IO, TYPE_CHECKING, Any

from pydantic import JsonValue

from torchrelay.services.ingest.domain import DatasetFormat, RejectCode, Rejected
from torchrelay.services.ingest.parallel import Mapper, serial_map

if TYPE_CHECKING:
    import numpy as np

Summary = dict[str, JsonValue]
Check = Callable[[Path, PurePosixPath, bytes | None], JsonValue]
"""Validates one file (``root / relative``, or its bytes when the caller holds them whole) and
returns what the summary says of it."""
Combine = Callable[[Sequence[PurePosixPath], list[JsonValue]], Summary]
"""The schema summary from every file's part, in file order."""


def validate(
    fmt: DatasetFormat,
    root: Path,
    files: Sequence[PurePosixPath],
    run: Mapper = serial_map,
) -> Summary:
    """Check every file of a ``fmt`` dataset (on ``run``'s pool: files are independent) and
    summarise them. The first bad file in ``files``' order is the one reported, whatever the
    pool's size, so the outcome is the same on every run."""
    check, combine = _FORMATS[fmt]
    parts = run(lambda relative: check(root, relative, None), files)
    return combine(files, parts)


def check_file(
    fmt: DatasetFormat, root: Path, relative: PurePosixPath, data: bytes | None = None
) -> JsonValue:
    """Check one file of a ``fmt`` dataset (``data``: its bytes, when already in memory): its
    part of the summary (see :func:`summarise`)."""
    return _FORMATS[fmt][0](root, relative, data)


def summarise(
    fmt: DatasetFormat, files: Sequence[PurePosixPath], parts: list[JsonValue]
) -> Summary:
    """The summary of a ``fmt`` dataset from each file's :func:`check_file` part, in order."""
    return _FORMATS[fmt][1](files, parts)


def _by_file(key: str) -> Combine:
    def combine(files: Sequence[PurePosixPath], parts: list[JsonValue]) -> Summary:
        return {key: {str(relative): part for relative, part in zip(files, parts, strict=True)}}

    return combine


def _npz(root: Path, relative: PurePosixPath, data: bytes | None) -> JsonValue:
    try:
        arrays = _npz_arrays(root / relative if data is None else io.BytesIO(data), relative)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        raise Rejected(RejectCode.CORRUPT, f"{relative}: not a readable .npz ({exc})") from exc
    if not arrays:
        raise Rejected(RejectCode.INVALID_DATA, f"{relative}: the .npz holds no arrays")
    lengths = {key: shape[0] for key, (shape, _) in arrays.items() if shape}
    if len(set(lengths.values())) > 1:
        raise Rejected(
            RejectCode.INVALID_DATA,
            f"{relative}: arrays disagree on their first dimension: {lengths}",
        )
    return {key: {"shape": list(shape), "dtype": dtype} for key, (shape, dtype) in arrays.items()}


def _npz_arrays(
    path: Path | IO[bytes], relative: PurePosixPath
) -> dict[str, tuple[tuple[int, ...], str]]:
    """Shape and dtype of every array from its .npy header, without reading the data (a
    multi-GB array costs no memory), checking that no array needs pickle and that each
    member holds exactly the bytes its header promises."""
    arrays: dict[str, tuple[tuple[int, ...], str]] = {}
    with zipfile.ZipFile(path) as bundle:
        for info in bundle.infolist():
            if not info.filename.endswith(".npy"):
                raise Rejected(
                    RejectCode.INVALID_DATA, f"{relative}: {info.filename} is not an array"
                )
            key = info.filename.removesuffix(".npy")
            with bundle.open(info) as member:
                shape, dtype, header_bytes = _npy_header(member)
            if dtype.hasobject:
                raise Rejected(
                    RejectCode.INVALID_DATA,
                    f"{relative}: array {key!r} holds Python objects and needs pickle to load; "
                    "store plain numeric arrays",
                )
            expected = header_bytes + math.prod(shape) * dtype.itemsize
            if info.file_size != expected:
                raise Rejected(
                    RejectCode.CORRUPT,
                    f"{relative}: array {key!r} has {info.file_size - header_bytes} data bytes, "
                    f"its header promises {expected - header_bytes}",
                )
            arrays[key] = (tuple(int(n) for n in shape), _dtype_name(dtype))
    return arrays


_PLAIN_HEADER = re.compile(
    rb"\{'descr': '([<>|=]?[a-zA-Z]{1,2}[0-9]{0,3})', 'fortran_order': (True|False), "
    rb"'shape': \(((?:[0-9]{1,19}, ?)*[0-9]{0,19})\), \} *\n"
)
"""The .npy header numpy writes for a plain array, e.g. ``{'descr': '<f8', 'fortran_order':
False, 'shape': (1255, 3), }`` then padding: parsed here in microseconds; any other header
(structured dtypes, other writers) goes through numpy's own parser."""


def _npy_header(member: IO[bytes]) -> tuple[tuple[int, ...], np.dtype[Any], int]:
    """Shape, dtype and header size of the .npy ``member`` (positioned at its start).

    numpy parses a header with ``ast.literal_eval``, which costs more than copying and hashing
    a 10 KB file; version 1.0 headers of plain arrays (what ``np.save`` writes) are read with
    one anchored pattern instead, and the dtype string still goes through ``np.dtype``."""
    import numpy as np

    prefix = member.read(10)
    if prefix[:8] == b"\x93NUMPY\x01\x00" and len(prefix) == 10:
        length = int.from_bytes(prefix[8:10], "little")
        header = member.read(length)
        match = _PLAIN_HEADER.fullmatch(header)
        if match is not None and len(header) == length:
            descr, _, dims = match.groups()
            shape = tuple(int(n) for n in dims.split(b",") if n.strip())
            return shape, np.dtype(descr.decode()), 10 + length
    member.seek(0)
    version = np.lib.format.read_magic(member)
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(member)
    else:
        shape, _, dtype = np.lib.format.read_array_header_2_0(member)
    return shape, dtype, member.tell()


@functools.cache
def _dtype_name(dtype: np.dtype[Any]) -> str:
    """``str(dtype)``, which numpy computes in Python each time: once per dtype here."""
    return str(dtype)


def _csv(root: Path, relative: PurePosixPath, _data: bytes | None) -> JsonValue:
    try:
        with (root / relative).open(newline="", encoding="utf-8") as handle:
            reader = csv.reader(handle)
            header = next(reader, None)
            if not header or not any(cell.strip() for cell in header):
                raise Rejected(RejectCode.INVALID_DATA, f"{relative}: no header row")
            rows = 0
            for rows, row in enumerate(reader, start=1):  # noqa: B007 - rows counts them
                if len(row) != len(header):
                    raise Rejected(
                        RejectCode.INVALID_DATA,
                        f"{relative}: line {reader.line_num} has {len(row)} columns, "
                        f"the header has {len(header)}",
                    )
    except UnicodeDecodeError as exc:
        raise Rejected(RejectCode.INVALID_DATA, f"{relative}: not UTF-8 text ({exc})") from exc
    except csv.Error as exc:
        raise Rejected(RejectCode.INVALID_DATA, f"{relative}: malformed CSV ({exc})") from exc
    return {"columns": list(header), "rows": rows}


def _image(root: Path, relative: PurePosixPath, _data: bytes | None) -> JsonValue:
    """The image's size as ``WxH``, once it decodes whole."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(root / relative) as image:
            image.load()
            return f"{image.width}x{image.height}"
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise Rejected(RejectCode.CORRUPT, f"{relative}: image does not decode ({exc})") from exc
    except Image.DecompressionBombError as exc:
        raise Rejected(RejectCode.TOO_LARGE, f"{relative}: {exc}") from exc


def _images(files: Sequence[PurePosixPath], parts: list[JsonValue]) -> Summary:
    counts = Counter(relative.parts[0] for relative in files)
    sizes = Counter(str(part) for part in parts)
    if len(counts) < 2:
        raise Rejected(RejectCode.INVALID_DATA, "an image dataset needs at least two classes")
    return {"classes": dict(sorted(counts.items())), "image_sizes": dict(sizes.most_common(5))}


def _pt(root: Path, relative: PurePosixPath, _data: bytes | None) -> JsonValue:
    try:
        import torch
    except ImportError as exc:  # the ingest image carries no torch unless asked to
        raise Rejected(
            RejectCode.UNKNOWN_FORMAT,
            "pt datasets need torch in the ingest service (pip install 'torchrelay[ingest,train]')",
        ) from exc
    try:
        loaded = torch.load(root / relative, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise Rejected(
            RejectCode.INVALID_DATA,
            f"{relative}: refused by weights_only loading (it needs arbitrary code): {exc}",
        ) from exc
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile) as exc:
        raise Rejected(
            RejectCode.CORRUPT, f"{relative}: not a readable tensor file ({exc})"
        ) from exc
    return _describe_tensors(loaded, torch.Tensor)


_FORMATS: dict[DatasetFormat, tuple[Check, Combine]] = {
    "npz": (_npz, _by_file("arrays")),
    "csv": (_csv, _by_file("tables")),
    "images": (_image, _images),
    "pt": (_pt, _by_file("tensors")),
}


def _describe_tensors(value: object, tensor_type: type) -> JsonValue:
    if isinstance(value, tensor_type):
        return {"shape": list(value.shape), "dtype": str(value.dtype)}  # type: ignore[attr-defined]
    if isinstance(value, dict):
        return {str(k): _describe_tensors(v, tensor_type) for k, v in list(value.items())[:100]}
    if isinstance(value, list | tuple):
        return [_describe_tensors(v, tensor_type) for v in value[:100]]
    return type(value).__name__
