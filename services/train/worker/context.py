"""The context handed to user training code: DDP, sharded batches, metrics, checkpoints,
restore, export. User code stays a plain function::

    def train(ctx: TrainingContext) -> None:
        x, y = ctx.arrays("x", "y")
        model = ctx.wrap(Net())
        optimizer = ctx.attach(torch.optim.Adam(model.parameters(), lr=1e-3))
        for xb, yb in ctx.batches((x, y), batch_size=64, epochs=10):
            ...  # forward, backward, optimizer.step()
            ctx.step_done(loss=loss.item(), samples=len(xb))
        ctx.export(model, example_input=x[:1], metrics={"accuracy": acc})

On start the newest valid checkpoint (model, optimizer, scheduler, RNG of every rank, epoch and
position in the data) is restored, so a resumed run ends with the same weights as one that
never stopped.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import structlog
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from torchrelay.services.train.worker import checkpoints
from torchrelay.shared.cluster.worker_spec import WorkerSpec
from torchrelay.shared.storage import (
    Layout,
    ModelDescription,
    ModelLineage,
    TensorSignature,
    Throughput,
    publish_dir,
    temp_sibling,
)
from torchrelay.shared.storage.files import ModelFormat
from torchrelay.shared.storage.layout import (
    DATA_FOLDER,
    MODEL_DESCRIPTION_FILE,
    STATE_DICT_FILE,
    TORCHSCRIPT_FILE,
    relative_model,
)

log = structlog.get_logger("torchrelay.train.worker")
Report = Callable[[str, dict[str, Any]], None]
"""(kind, fields) -> None: 'progress' or 'checkpointed', sent on by rank 0."""


@dataclass(frozen=True)
class Exported:
    model_name: str
    version: str
    path: str
    metrics: dict[str, float]


class TrainingContext:
    def __init__(self, spec: WorkerSpec, report: Report, *, report_every_steps: int = 10) -> None:
        self.spec = spec
        self.rank = spec.rank
        self.world_size = spec.world_size
        self.device = (
            torch.device("cuda", torch.cuda.current_device())
            if spec.backend == "nccl"
            else torch.device("cpu")
        )
        self.hparams = dict(spec.job.hyperparameters)
        self.root = Path(spec.storage_root)
        self.layout = Layout(self.root)
        self.dataset_dir = self.layout.at(spec.dataset_path) / DATA_FOLDER
        self.step = 0
        self.epoch = 0
        self.position = 0
        self.exported: Exported | None = None
        self._report = report
        self._report_every = report_every_steps
        self._model: nn.Module | None = None
        self._optimizer: torch.optim.Optimizer | None = None
        self._scheduler: Any = None
        self._window_started = time.perf_counter()
        self._window_samples = 0
        self._first_step_at: float | None = None
        self._last_step_at = 0.0
        self._samples_after_first = 0
        self.checkpoint_seconds = 0.0
        self.checkpoints_written = 0
        self._checkpoints = self.layout.checkpoints(spec.run_id)
        self._restored = checkpoints.load_newest(self._checkpoints)
        if self._restored is not None:
            step, state = self._restored
            self.step, self.epoch, self.position = step, state["epoch"], state["position"]
            log.info("checkpoint.restored", step=step, epoch=self.epoch, position=self.position)

    def number(self, name: str, default: float) -> float:
        """A numeric hyperparameter from the job spec."""
        value = self.hparams.get(name, default)
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise TypeError(f"hyperparameter {name!r} must be a number, got {value!r}")
        return float(value)

    def integer(self, name: str, default: int) -> int:
        value = self.number(name, default)
        if not value.is_integer():
            raise TypeError(f"hyperparameter {name!r} must be a whole number, got {value!r}")
        return int(value)

    @property
    def resumed_from_step(self) -> int | None:
        return self._restored[0] if self._restored else None

    # --- data -----------------------------------------------------------------------------

    def arrays(self, *names: str, file: str | None = None) -> tuple[torch.Tensor, ...]:
        """Arrays of an npz dataset as tensors (the first .npz file unless ``file`` names one)."""
        files = (
            sorted(self.dataset_dir.rglob("*.npz")) if file is None else [self.dataset_dir / file]
        )
        if not files:
            raise FileNotFoundError(f"no .npz file in {self.dataset_dir}")
        with np.load(files[0], allow_pickle=False) as data:
            return tuple(torch.from_numpy(np.ascontiguousarray(data[name])) for name in names)

    def batches(
        self, tensors: Sequence[torch.Tensor], *, batch_size: int, epochs: int
    ) -> Iterator[tuple[torch.Tensor, ...]]:
        """This rank's shard of ``tensors`` in batches, epoch after epoch, reshuffled per epoch
        from the job's seed, resuming where the restored checkpoint left off."""
        if self._restored is not None:
            # Restored here, not at start: building the model draws from the RNG, and the
            # uninterrupted run had drawn that before its checkpoint.
            torch.set_rng_state(self._restored[1]["rng"][self.rank])
        count = len(tensors[0])
        per_rank = count // self.world_size
        usable = per_rank - per_rank % batch_size
        while self.epoch < epochs:
            generator = torch.Generator().manual_seed(self.spec.job.seed + self.epoch)
            order = torch.randperm(count, generator=generator)
            mine = order[self.rank : per_rank * self.world_size : self.world_size][:usable]
            batches = torch.split(mine, batch_size)
            while self.position < len(batches):
                before = self.position
                yield tuple(t[batches[before]].to(self.device) for t in tensors)
                if self.position == before:  # step_done() was not called: move on anyway
                    self.position += 1
            self.epoch += 1
            self.position = 0

    # --- model ------------------------------------------------------------------------------

    def wrap(self, model: nn.Module) -> nn.Module:
        """Move the model to this rank's device, restore its weights, wrap it for DDP."""
        model = model.to(self.device)
        if self._restored is not None:
            model.load_state_dict(self._restored[1]["model"])
        self._model = model
        if self.world_size == 1:
            return model
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids)

    def attach(
        self, optimizer: torch.optim.Optimizer, scheduler: Any = None
    ) -> torch.optim.Optimizer:
        """Register the optimizer (and scheduler) for checkpoints; restores their state."""
        self._optimizer, self._scheduler = optimizer, scheduler
        if self._restored is not None:
            state = self._restored[1]
            optimizer.load_state_dict(state["optimizer"])
            if scheduler is not None and state.get("scheduler") is not None:
                scheduler.load_state_dict(state["scheduler"])
        return optimizer

    # --- progress -------------------------------------------------------------------------

    def step_done(
        self, *, loss: float, samples: int, metrics: dict[str, float] | None = None
    ) -> None:
        """Call after each optimizer step: counts it, reports progress, checkpoints on time."""
        self.step += 1
        self.position += 1
        self._window_samples += samples * self.world_size
        now = time.perf_counter()
        if self._first_step_at is None:
            self._first_step_at = now
        else:
            self._samples_after_first += samples * self.world_size
        self._last_step_at = now
        if self.step % self._report_every == 0 and self.rank == 0:
            elapsed = time.perf_counter() - self._window_started
            self._report(
                "progress",
                {
                    "step": self.step,
                    "epoch": self.epoch,
                    "loss": float(loss),
                    "samples_per_s": self._window_samples / elapsed if elapsed > 0 else 0.0,
                    "metrics": metrics or {},
                },
            )
            self._window_started, self._window_samples = time.perf_counter(), 0
        if self.step % self.spec.job.checkpoint_every_steps == 0:
            self.checkpoint()

    def throughput(self) -> Throughput:
        """Samples/s of the whole job (all ranks) from the first step to the last, and the time
        checkpoints held training up."""
        elapsed = self._last_step_at - (self._first_step_at or self._last_step_at)
        return Throughput(
            samples_per_s=self._samples_after_first / elapsed if elapsed > 0 else 0.0,
            checkpoints=self.checkpoints_written,
            checkpoint_seconds=self.checkpoint_seconds,
        )

    def checkpoint(self) -> None:
        """Write a checkpoint of this step (collective: every rank calls it)."""
        if self._model is None or self._optimizer is None:
            raise RuntimeError("call ctx.wrap(model) and ctx.attach(optimizer) before checkpoints")
        started = time.perf_counter()
        rng = [torch.get_rng_state()]
        if self.world_size > 1:
            gathered: list[Any] = [None] * self.world_size
            dist.all_gather_object(gathered, rng[0])
            rng = gathered
        if self.rank == 0:
            state = {
                "step": self.step,
                "epoch": self.epoch,
                "position": self.position,
                "model": {k: v.detach().cpu() for k, v in self._model.state_dict().items()},
                "optimizer": self._optimizer.state_dict(),
                "scheduler": self._scheduler.state_dict() if self._scheduler else None,
                "rng": rng,
            }
            path = checkpoints.save(
                self._checkpoints, self.step, state, self.spec.job.keep_checkpoints
            )
            self._report(
                "checkpointed", {"step": self.step, "path": str(path.relative_to(self.root))}
            )
        if self.world_size > 1:
            dist.barrier()
        self.checkpoint_seconds += time.perf_counter() - started
        self.checkpoints_written += 1

    # --- export -----------------------------------------------------------------------------

    def export(
        self, model: nn.Module, *, example_input: torch.Tensor, metrics: dict[str, float]
    ) -> None:
        """Export the trained model once (rank 0 writes; every rank calls it): TorchScript when
        the module scripts, else its state dict; plus model.json with signature and lineage."""
        module = model.module if isinstance(model, DistributedDataParallel) else model
        job = self.spec.job
        version = self.spec.run_id
        final = self.layout.model(job.model_name, version)
        if self.rank == 0:
            staging = temp_sibling(final)
            staging.mkdir(parents=True)
            module = module.to("cpu").eval()
            with torch.no_grad():
                output = module(example_input.to("cpu"))
            model_class = None
            try:
                torch.jit.script(module).save(str(staging / TORCHSCRIPT_FILE))
                kind: ModelFormat = "torchscript"
            except Exception as exc:  # noqa: BLE001 - not every module scripts; fall back
                log.info("export.state_dict", reason=repr(exc)[:200])
                torch.save(module.state_dict(), staging / STATE_DICT_FILE)
                kind = "state_dict"
                # What a server imports to rebuild the module before loading the weights.
                model_class = f"{type(module).__module__}:{type(module).__qualname__}"
            description = ModelDescription(
                name=job.model_name,
                version=version,
                format=kind,
                model_class=model_class,
                inputs=(_signature("input", example_input),),
                outputs=(_signature("output", output),),
                metrics=metrics,
                lineage=ModelLineage(
                    dataset=job.dataset,
                    run_id=self.spec.run_id,
                    attempt=self.spec.attempt,
                    entrypoint=job.entrypoint,
                    steps=self.step,
                ),
                created=datetime.now(UTC),
            )
            description.write(staging / MODEL_DESCRIPTION_FILE)
            publish_dir(staging, final)
            self.exported = Exported(
                job.model_name, version, relative_model(job.model_name, version), dict(metrics)
            )
            module.to(self.device)
        if self.world_size > 1:
            dist.barrier()


def _signature(name: str, tensor: torch.Tensor) -> TensorSignature:
    """Open Inference Protocol style: the batch dimension is -1."""
    return TensorSignature(
        name=name,
        datatype=_DATATYPES.get(tensor.dtype, str(tensor.dtype)),
        shape=(-1, *tensor.shape[1:]),
    )


_DATATYPES = {
    torch.float32: "FP32",
    torch.float64: "FP64",
    torch.float16: "FP16",
    torch.int64: "INT64",
    torch.int32: "INT32",
    torch.int16: "INT16",
    torch.int8: "INT8",
    torch.uint8: "UINT8",
    torch.bool: "BOOL",
}
