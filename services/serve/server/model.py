"""Loading an exported model (``<root>/models/<name>/<version>/``) and running batches on it."""

from __future__ import annotations

import importlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from torchrelay.services.serve.server.protocol import DATATYPES, TensorSpec


class ModelLoadError(Exception):
    """The folder does not hold a model this server can load; the reason says why."""


@dataclass
class LoadedModel:
    name: str
    version: str
    platform: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    module: torch.nn.Module

    def predict(self, batch: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        """Run one batch (called from a worker thread; torch releases the GIL)."""
        with torch.inference_mode():
            output = self.module(torch.from_numpy(batch))
        result: np.ndarray[Any, Any] = output.numpy()
        return result


def _specs(entries: Any, kind: str) -> list[TensorSpec]:
    try:
        specs = [
            TensorSpec(e["name"], e["datatype"], tuple(int(n) for n in e["shape"])) for e in entries
        ]
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelLoadError(f"model.json has malformed {kind}: {exc}") from exc
    if not specs or any(s.datatype not in DATATYPES for s in specs):
        raise ModelLoadError(f"model.json {kind} must name supported datatypes")
    return specs


def load_model(folder: Path) -> LoadedModel:
    try:
        description = json.loads((folder / "model.json").read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{folder}: no readable model.json ({exc})") from exc
    inputs = _specs(description.get("inputs"), "inputs")
    outputs = _specs(description.get("outputs"), "outputs")
    kind = description.get("format")
    if kind not in {"torchscript", "state_dict"}:
        raise ModelLoadError(f"unknown model format {kind!r}")
    try:
        if kind == "torchscript":
            with warnings.catch_warnings():
                # torch 2.13 deprecates TorchScript; exported models still use it (see ADR).
                warnings.simplefilter("ignore", DeprecationWarning)
                module = torch.jit.load(str(folder / "model.pt"), map_location="cpu")  # type: ignore[no-untyped-call]
        else:
            module_name, _, class_name = str(description.get("model_class")).partition(":")
            module = getattr(importlib.import_module(module_name), class_name)()
            module.load_state_dict(torch.load(folder / "weights.pt", weights_only=True))
    except Exception as exc:
        raise ModelLoadError(
            f"{folder}: cannot load the model ({type(exc).__name__}: {exc})"
        ) from exc
    module.eval()
    return LoadedModel(
        name=str(description.get("name")),
        version=str(description.get("version")),
        platform="pytorch_torchscript" if kind == "torchscript" else "pytorch",
        inputs=inputs,
        outputs=outputs,
        module=module,
    )
