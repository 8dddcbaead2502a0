"""Model versions on a storage root without training anything: the digits CNN, scripted with
its initial weights and described the way the worker's export describes it (a real model a
real model server loads in a second), and a version whose weights cannot load."""

from __future__ import annotations

import warnings
from datetime import UTC, datetime
from pathlib import Path

DIGITS_INPUT = (-1, 1, 8, 8)
DIGITS_OUTPUT = (-1, 10)


def model_folder(root: Path, model: str, version: str) -> Path:
    return root / "models" / model / version


def export_digits(root: Path, model: str, version: str, *, seed: int = 0) -> Path:
    """An untrained digits CNN as ``models/<model>/<version>`` (TorchScript + model.json)."""
    import torch

    from torchrelay.services.train.examples.digits import DigitsNet
    from torchrelay.shared.events.data import DatasetRef
    from torchrelay.shared.storage import ModelDescription, ModelLineage, TensorSignature

    folder = model_folder(root, model, version)
    folder.mkdir(parents=True)
    torch.manual_seed(seed)
    module = DigitsNet().eval()
    with warnings.catch_warnings():
        # torch 2.13 deprecates TorchScript; exported models still use it (see the ADR).
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(module).save(str(folder / "model.pt"))  # type: ignore[no-untyped-call]
    ModelDescription(
        name=model,
        version=version,
        format="torchscript",
        inputs=(TensorSignature(name="input", datatype="FP32", shape=DIGITS_INPUT),),
        outputs=(TensorSignature(name="output", datatype="FP32", shape=DIGITS_OUTPUT),),
        metrics={},
        lineage=ModelLineage(
            dataset=DatasetRef(name="digits", version="v1"),
            run_id=f"untrained-{version}",
            attempt=0,
            entrypoint="torchrelay.services.train.examples.digits:train",
            steps=0,
        ),
        created=datetime.now(UTC),
    ).write(folder / "model.json")
    return folder


def export_broken(root: Path, model: str, version: str) -> Path:
    """A version whose model.json is fine and whose weights are not a model: a server of it
    exits at start with the reason."""
    folder = export_digits(root, model, version)
    (folder / "model.pt").write_bytes(b"not a model")
    return folder
