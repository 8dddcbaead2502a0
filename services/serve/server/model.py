"""Loading an exported model (a model version's folder, see ``shared.storage.layout``) and
running batches on it. ``model.json`` is read as its contract,
:class:`~torchrelay.shared.storage.ModelDescription`."""

from __future__ import annotations

import importlib
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from torchrelay.services.serve.server.protocol import (
    DATATYPES,
    Parameter,
    TensorSpec,
    model_parameters,
)
from torchrelay.shared.storage import CorruptFile, ModelDescription, TensorSignature
from torchrelay.shared.storage.layout import MODEL_DESCRIPTION_FILE


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
    parameters: dict[str, Parameter] = field(default_factory=dict)
    """What the model declares for clients (labels, preprocessing): its metadata's
    ``parameters``."""

    def predict(self, batch: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        """Run one batch (called from a worker thread; torch releases the GIL)."""
        with torch.inference_mode():
            output = self.module(torch.from_numpy(batch))
        result: np.ndarray[Any, Any] = output.numpy()
        return result


def _specs(signature: tuple[TensorSignature, ...], kind: str) -> list[TensorSpec]:
    unsupported = [s.datatype for s in signature if s.datatype not in DATATYPES]
    if unsupported:
        raise ModelLoadError(
            f"{MODEL_DESCRIPTION_FILE} {kind} must name supported datatypes "
            f"({', '.join(sorted(DATATYPES))}), not {', '.join(unsupported)}"
        )
    return [TensorSpec(s.name, s.datatype, s.shape) for s in signature]


def load_model(folder: Path) -> LoadedModel:
    try:
        description = ModelDescription.read(folder / MODEL_DESCRIPTION_FILE)
    except CorruptFile as exc:
        raise ModelLoadError(str(exc)) from exc
    except OSError as exc:
        raise ModelLoadError(f"{folder}: no readable {MODEL_DESCRIPTION_FILE} ({exc})") from exc
    inputs = _specs(description.inputs, "inputs")
    outputs = _specs(description.outputs, "outputs")
    artifact = folder / description.artifact
    try:
        if description.format == "torchscript":
            with warnings.catch_warnings():
                # torch 2.13 deprecates TorchScript; exported models still use it (see ADR).
                warnings.simplefilter("ignore", DeprecationWarning)
                module = torch.jit.load(str(artifact), map_location="cpu")  # type: ignore[no-untyped-call]
        else:
            module_name, _, class_name = str(description.model_class).partition(":")
            module = getattr(importlib.import_module(module_name), class_name)()
            module.load_state_dict(torch.load(artifact, weights_only=True))
    except Exception as exc:
        raise ModelLoadError(
            f"{folder}: cannot load the model ({type(exc).__name__}: {exc})"
        ) from exc
    module.eval()
    return LoadedModel(
        name=description.name,
        version=description.version,
        platform="pytorch_torchscript" if description.format == "torchscript" else "pytorch",
        inputs=inputs,
        outputs=outputs,
        module=module,
        parameters=model_parameters(description.labels, description.preprocessing),
    )


def swap_problem(serving: LoadedModel, candidate: LoadedModel) -> str | None:
    """Why ``candidate`` cannot replace ``serving`` in place, or None when it can.

    In place means the same model name, format, declared signature and parameters (labels,
    preprocessing), and the same architecture as far as the weights tell: the same parameter
    and buffer names with the same shapes and dtypes. Anything else is a new model for clients
    or for memory, and goes through a full rollout instead.
    """
    if candidate.name != serving.name:
        return f"model {candidate.name!r} is not {serving.name!r}"
    if candidate.platform != serving.platform:
        return f"format {candidate.platform} is not {serving.platform}"
    if (candidate.inputs, candidate.outputs) != (serving.inputs, serving.outputs):
        return "the signature (inputs, outputs) changed"
    if candidate.parameters != serving.parameters:
        return "the declared parameters (labels, preprocessing) changed"
    if _architecture(candidate.module) != _architecture(serving.module):
        return "the architecture changed (parameter names, shapes or dtypes)"
    return None


def _architecture(module: torch.nn.Module) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    return [
        (name, tuple(tensor.shape), tensor.dtype) for name, tensor in module.state_dict().items()
    ]
