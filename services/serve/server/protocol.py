"""The Open Inference Protocol v2 (KServe / Triton REST), JSON tensors: parsing requests
against a model's signature and shaping responses. Pure: no HTTP, no torch."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import ValidationError

from torchrelay.shared.storage.files import InputPreprocessing

DATATYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
}
NAMES = {dtype: name for name, dtype in DATATYPES.items()}


class BadRequest(ValueError):
    """The request does not fit the protocol or the model's signature (HTTP 400)."""


@dataclass(frozen=True)
class TensorSpec:
    """A declared input or output: ``shape`` uses -1 for the batch (or any) dimension."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def metadata(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


@dataclass(frozen=True)
class InferRequest:
    id: str | None
    array: np.ndarray[Any, Any]
    output_names: tuple[str, ...]
    binary_output: bool = False


Parameter = str | float | bool
"""The protocol's parameter values: a string, a number or a boolean, never an object."""
LABELS = "labels"
PREPROCESSING_SCALE = "preprocessing_scale"
PREPROCESSING_OFFSET = "preprocessing_offset"
PREPROCESSING_DESCRIPTION = "preprocessing_description"


def model_parameters(
    labels: Sequence[str] | None, preprocessing: InputPreprocessing | None
) -> dict[str, Parameter]:
    """The ``parameters`` of a model's metadata: what ``model.json`` declares for clients.

    Parameter values are scalars in the protocol, so the labels travel as one string holding
    a JSON array (``'["cat", "dog"]'``) and the preprocessing as its numbers; a model that
    declares neither has no ``parameters`` at all (:func:`read_model_parameters` reads them)."""
    parameters: dict[str, Parameter] = {}
    if labels is not None:
        parameters[LABELS] = json.dumps(list(labels))
    if preprocessing is not None:
        parameters[PREPROCESSING_SCALE] = preprocessing.scale
        parameters[PREPROCESSING_OFFSET] = preprocessing.offset
        if preprocessing.description is not None:
            parameters[PREPROCESSING_DESCRIPTION] = preprocessing.description
    return parameters


def read_model_parameters(
    parameters: Any,
) -> tuple[list[str] | None, InputPreprocessing | None]:
    """(labels, preprocessing) from a model metadata's ``parameters``, as
    :func:`model_parameters` wrote them; :class:`ValueError` when they are malformed."""
    if parameters is None:
        return None, None
    if not isinstance(parameters, dict):
        # A malformed answer: one error type for every way the metadata can be malformed.
        raise ValueError(f"the model's 'parameters' must be an object, not {parameters!r}")  # noqa: TRY004
    labels = None
    if LABELS in parameters:
        try:
            labels = json.loads(parameters[LABELS])
        except (TypeError, ValueError) as exc:
            raise ValueError(f"the model's labels are not a JSON array: {exc}") from exc
        if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
            raise ValueError(f"the model's labels are not a list of names: {labels!r}")
    preprocessing = None
    if PREPROCESSING_SCALE in parameters or PREPROCESSING_OFFSET in parameters:
        try:
            preprocessing = InputPreprocessing(
                scale=parameters.get(PREPROCESSING_SCALE, 1.0),
                offset=parameters.get(PREPROCESSING_OFFSET, 0.0),
                description=parameters.get(PREPROCESSING_DESCRIPTION),
            )
        except ValidationError as exc:
            raise ValueError(f"the model's preprocessing is malformed: {exc}") from exc
    return labels, preprocessing


HEADER_LENGTH = "Inference-Header-Content-Length"
"""The binary tensor data extension: the JSON header's length; raw tensor bytes follow."""


def split_binary(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    """(JSON part, binary part) of a request body."""
    if header_length is None:
        return body, b""
    try:
        length = int(header_length)
    except ValueError as exc:
        raise BadRequest(f"{HEADER_LENGTH} must be an integer, got {header_length!r}") from exc
    if not 0 <= length <= len(body):
        raise BadRequest(f"{HEADER_LENGTH} {length} does not fit a body of {len(body)} bytes")
    return body[:length], body[length:]


def parse_infer(body: Any, inputs: Sequence[TensorSpec], binary: bytes = b"") -> InferRequest:
    """Validate a decoded JSON body (and its binary tensor data, if any) against the model's
    single input."""
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object with an 'inputs' list")
    request_id = body.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise BadRequest("'id' must be a string")
    tensors = body.get("inputs")
    if not isinstance(tensors, list) or len(tensors) != len(inputs):
        raise BadRequest(f"'inputs' must list {len(inputs)} tensor(s): {[i.name for i in inputs]}")
    array = _tensor(tensors[0], inputs[0], binary)
    outputs = body.get("outputs", [])
    if not isinstance(outputs, list) or not all(isinstance(o, dict) for o in outputs):
        raise BadRequest("'outputs' must be a list of objects")
    parameters = body.get("parameters") or {}
    binary_output = bool(parameters.get("binary_data_output")) or any(
        bool((o.get("parameters") or {}).get("binary_data")) for o in outputs
    )
    return InferRequest(
        request_id, array, tuple(str(o.get("name")) for o in outputs), binary_output
    )


def _tensor(tensor: Any, spec: TensorSpec, binary: bytes) -> np.ndarray[Any, Any]:
    if not isinstance(tensor, dict):
        raise BadRequest("each input must be an object with name, shape, datatype and data")
    if tensor.get("name") != spec.name:
        raise BadRequest(f"input is named {tensor.get('name')!r}; the model expects {spec.name!r}")
    if tensor.get("datatype") != spec.datatype:
        raise BadRequest(
            f"input {spec.name!r} has datatype {tensor.get('datatype')!r}; "
            f"the model expects {spec.datatype}"
        )
    shape = tensor.get("shape")
    if (
        not isinstance(shape, list)
        or not shape
        or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)
    ):
        raise BadRequest(f"input {spec.name!r}: 'shape' must be a list of non-negative integers")
    if len(shape) != len(spec.shape) or any(
        want not in (-1, got) for want, got in zip(spec.shape, shape, strict=True)
    ):
        raise BadRequest(
            f"input {spec.name!r} has shape {shape}; the model expects {list(spec.shape)}"
        )
    if shape[0] < 1:
        raise BadRequest(f"input {spec.name!r}: the batch dimension must be at least 1")
    array = _values(tensor, spec, binary)
    expected = math.prod(shape)
    if array.size != expected:
        raise BadRequest(
            f"input {spec.name!r}: {array.size} values for shape {shape} ({expected} expected)"
        )
    return array.reshape(shape)


def _values(tensor: dict[str, Any], spec: TensorSpec, binary: bytes) -> np.ndarray[Any, Any]:
    """The flat values: JSON ``data``, or raw little-endian bytes (binary data extension)."""
    dtype = DATATYPES[spec.datatype]
    size = (tensor.get("parameters") or {}).get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or size != len(binary):
            raise BadRequest(
                f"input {spec.name!r}: binary_data_size {size!r} but {len(binary)} bytes follow"
            )
        if size % dtype.itemsize:
            raise BadRequest(f"input {spec.name!r}: {size} bytes is not a whole {spec.datatype}")
        return np.frombuffer(binary, dtype=dtype.newbyteorder("<"))
    data = tensor.get("data")
    if not isinstance(data, list):
        raise BadRequest(f"input {spec.name!r}: 'data' must be a JSON array")
    try:
        return np.asarray(data, dtype=dtype)
    except (ValueError, TypeError) as exc:
        raise BadRequest(f"input {spec.name!r}: data is not {spec.datatype} ({exc})") from exc


def infer_response(
    model: str,
    version: str,
    request_id: str | None,
    name: str,
    array: np.ndarray[Any, Any],
    *,
    binary: bool = False,
) -> tuple[bytes, int | None]:
    """The response body, and the JSON header's length when tensor bytes follow it."""
    output: dict[str, Any] = {
        "name": name,
        "datatype": NAMES.get(array.dtype, "FP32"),
        "shape": list(array.shape),
    }
    raw = b""
    if binary:
        raw = np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<")).tobytes()
        output["parameters"] = {"binary_data_size": len(raw)}
    else:
        output["data"] = array.ravel().tolist()
    response: dict[str, Any] = {"model_name": model, "model_version": version, "outputs": [output]}
    if request_id is not None:
        response["id"] = request_id
    header = json.dumps(response).encode()
    return (header + raw, len(header)) if binary else (header, None)
