"""One training rank: ``python -m torchrelay.services.train.worker`` (started by a backend).

Exit codes: 0 done and exported; 1 the training function raised; 3 the entrypoint cannot be
imported, is not a function defined in the module it names, or never exported a model.
Rank 0 writes ``runs/<id>/result.json`` on success.
"""

from __future__ import annotations

import importlib
import inspect
import sys
from datetime import timedelta
from pathlib import Path

import structlog
import torch
import torch.distributed as dist

from torchrelay.services.train.worker.context import TrainingContext
from torchrelay.services.train.worker.report import Reporter
from torchrelay.shared.cluster.lifeline import die_with_parent
from torchrelay.shared.cluster.worker_spec import WorkerSpec
from torchrelay.shared.runtime.logging import configure_logging
from torchrelay.shared.runtime.settings import LogSettings
from torchrelay.shared.storage import RunResult
from torchrelay.shared.storage.layout import Layout

EXIT_FAILED = 1
EXIT_BAD_ENTRYPOINT = 3


def main() -> int:
    die_with_parent()
    spec = WorkerSpec.from_env()
    configure_logging(LogSettings())
    structlog.contextvars.bind_contextvars(run_id=spec.run_id, rank=spec.rank, attempt=spec.attempt)
    log = structlog.get_logger("torchrelay.train.worker")
    if spec.job.workspace is not None:  # the user's staged code comes first on the path
        sys.path.insert(0, str(Layout(Path(spec.storage_root)).workspace_code(spec.job.workspace)))
    module_name, _, function_name = spec.job.entrypoint.partition(":")
    try:
        function = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError):
        log.exception("worker.bad_entrypoint", entrypoint=spec.job.entrypoint)
        return EXIT_BAD_ENTRYPOINT
    # The train service checked the module's source; this checks what the import produced
    # (a name rebound at import time, or a service that skipped the check).
    if not inspect.isfunction(function) or function.__module__ != module_name:
        log.error(
            "worker.bad_entrypoint",
            entrypoint=spec.job.entrypoint,
            reason=f"{function_name!r} is not a function defined in module {module_name!r} "
            f"(it is {type(function).__name__} from {getattr(function, '__module__', None)!r})",
        )
        return EXIT_BAD_ENTRYPOINT
    if spec.backend == "nccl":
        torch.cuda.set_device(spec.rank % torch.cuda.device_count())
    # The same seed on every rank: identical initial weights (DDP also broadcasts rank 0's).
    torch.manual_seed(spec.job.seed)
    dist.init_process_group(
        spec.backend,
        init_method=spec.rendezvous,
        rank=spec.rank,
        world_size=spec.world_size,
        timeout=timedelta(seconds=spec.collective_timeout_s),
    )
    reporter = Reporter(spec)
    try:
        context = TrainingContext(spec, reporter)
        log.info("worker.started", resumed_from_step=context.resumed_from_step)
        function(context)
        if spec.world_size > 1:
            # Every rank is done before any tears the group down: gloo aborts a rank whose
            # peer destroys the group while it still talks to it.
            dist.barrier()
    except Exception:
        log.exception("worker.failed")
        return EXIT_FAILED
    finally:
        reporter.close()
        dist.destroy_process_group()
    if context.rank == 0:
        if context.exported is None:
            log.error("worker.no_export", hint="call ctx.export(model, ...) at the end")
            return EXIT_BAD_ENTRYPOINT
        exported = context.exported
        result = RunResult(
            model_name=exported.model_name,
            version=exported.version,
            path=exported.path,
            metrics=exported.metrics,
            steps=context.step,
            attempt=spec.attempt,
            throughput=context.throughput(),
        )
        result.write(context.layout.result(spec.run_id))
    log.info("worker.finished", steps=context.step)
    return 0


if __name__ == "__main__":
    sys.exit(main())
