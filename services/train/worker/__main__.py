"""One training rank: ``python -m torchrelay.services.train.worker`` (started by a backend).

Exit codes: 0 done and exported; 1 the training function raised; 3 the entrypoint cannot be
imported, is not a function defined in the module it names, or never exported a model.
Rank 0 writes ``runs/<id>/result.json`` on success. A rank whose training code fails (exit 1
or 3) writes why to ``runs/<id>/logs/attempt-<a>/rank-<r>.error.json`` (:class:`RankFailure`)
and prints the traceback as plain text to its log.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import inspect
import os
import sys
import threading
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import structlog
import torch
import torch.distributed as dist

from torchrelay.services.train.worker.context import TrainingContext
from torchrelay.services.train.worker.group import RendezvousTimeout, join
from torchrelay.services.train.worker.report import Reporter
from torchrelay.shared.cluster.lifeline import die_with_parent
from torchrelay.shared.cluster.worker_spec import WorkerSpec
from torchrelay.shared.runtime.logging import configure_logging
from torchrelay.shared.storage import Layout, RunResult
from torchrelay.shared.storage.failures import FailurePhase, RankFailure

EXIT_FAILED = 1
EXIT_BAD_ENTRYPOINT = 3


def main() -> int:
    die_with_parent()
    spec = WorkerSpec.from_env()
    configure_logging()  # info, JSON lines: what the backend's log tails and people read
    structlog.contextvars.bind_contextvars(run_id=spec.run_id, rank=spec.rank, attempt=spec.attempt)
    log = structlog.get_logger("torchrelay.train.worker")
    layout = Layout(Path(spec.storage_root))
    error_file = layout.rank_error(spec.run_id, spec.attempt, spec.rank)
    # A file left by an earlier run under the same id must not explain this attempt (the
    # service also ignores one older than the attempt, for a rank that never got here).
    with contextlib.suppress(OSError):
        error_file.unlink(missing_ok=True)
    if spec.job.workspace is not None:  # the user's staged code comes first on the path
        sys.path.insert(0, str(layout.workspace_code(spec.job.workspace)))
    try:
        function = _entrypoint(spec.job.entrypoint)
    except Exception as exc:  # noqa: BLE001 - whatever importing the user's code raises
        _record(spec, exc, "import", step=0, path=error_file)
        return EXIT_BAD_ENTRYPOINT
    if spec.backend == "nccl":
        torch.cuda.set_device(spec.rank % torch.cuda.device_count())
    # The same seed on every rank: identical initial weights (DDP also broadcasts rank 0's).
    torch.manual_seed(spec.job.seed)
    try:
        join(spec)  # every rank, within the rendezvous timeout
    except RendezvousTimeout as exc:
        log.error("worker.rendezvous_failed", reason=str(exc))  # noqa: TRY400 - says it all
        return EXIT_FAILED
    reporter = Reporter(spec)
    context: TrainingContext | None = None
    first_step = 0
    try:
        context = TrainingContext(spec, reporter)
        first_step = context.step
        log.info("worker.started", resumed_from_step=context.resumed_from_step)
        function(context)
        if spec.world_size > 1:
            # Every rank is done before any tears the group down: gloo aborts a rank whose
            # peer destroys the group while it still talks to it.
            dist.barrier()
    except Exception as exc:
        if context is None:  # the platform's own code failed (storage): nothing to classify
            log.exception("worker.failed")
            return EXIT_FAILED
        phase: FailurePhase = "after_progress" if context.step > first_step else "before_first_step"
        _record(spec, exc, phase, step=context.step, path=error_file)
        return EXIT_FAILED
    finally:
        if context is not None:
            context.close()  # the run's history on storage, whatever happened
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


def _entrypoint(entrypoint: str) -> Callable[..., Any]:
    """The function ``module:function`` names, imported; raises what the import raised, an
    AttributeError for a missing name, a TypeError for a name that is not its module's own
    function."""
    module_name, _, function_name = entrypoint.partition(":")
    function = getattr(importlib.import_module(module_name), function_name)
    # The train service checked the module's source; this checks what the import produced
    # (a name rebound at import time, or a service that skipped the check).
    if not inspect.isfunction(function) or function.__module__ != module_name:
        raise TypeError(
            f"{function_name!r} is not a function defined in module {module_name!r} "
            f"(it is {type(function).__name__} from {getattr(function, '__module__', None)!r})"
        )
    return function


def _record(
    spec: WorkerSpec, exc: Exception, phase: FailurePhase, *, step: int, path: Path
) -> None:
    """Say why the training code failed: the traceback as plain text (the log is read by
    people too), a log event, and the failure file the train service decides on."""
    sys.stderr.write("".join(traceback.format_exception(exc)))
    sys.stderr.flush()
    log = structlog.get_logger("torchrelay.train.worker")
    event = "worker.bad_entrypoint" if phase == "import" else "worker.failed"
    try:
        failure = RankFailure.of(
            exc,
            rank=spec.rank,
            attempt=spec.attempt,
            entrypoint=spec.job.entrypoint,
            phase=phase,
            step=step,
        )
    except ValueError:  # an exception no contract can hold (a huge class name): say so only
        log.exception(event, entrypoint=spec.job.entrypoint, phase=phase, step=step)
        return
    log.error(
        event,
        entrypoint=spec.job.entrypoint,
        phase=phase,
        step=step,
        error_type=failure.error_type,
        reason=failure.message,
        repeatable=failure.repeatable,
    )
    try:
        failure.write(path)
    except OSError:  # the exit code still says it failed; the service falls back on it
        log.exception("worker.failure_unrecorded", path=str(path))


def exit_now(code: int) -> NoReturn:
    """End the rank with ``code`` as Python's own exit does, but for its last step.

    Python joins the threads that are not daemons and runs the ``atexit`` functions (the
    training code's too: a tracker that finishes its run, a logging handler), then tears the
    interpreter down. By then the platform's files are written and closed, the reporter
    joined and the process group destroyed; what the teardown has left to destroy is torch's
    C++ state (gloo's pairs and threads, a DDP reducer the training code kept), and
    destroying it while Python goes can abort a rank that finished its work ("terminate
    called without an active exception", SIGABRT): the run would fail after it succeeded.
    So this does the first two steps and skips the teardown."""
    main_thread = threading.main_thread()
    for thread in threading.enumerate():
        if thread is not main_thread and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()  # the atexit step of Python's exit, exactly
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a closed or broken stream: nothing to keep
            stream.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_now(main())
