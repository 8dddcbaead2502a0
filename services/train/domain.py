"""Pure rules of the train service: run ids, the run record, which requests to act on, and
which training code may run."""

from __future__ import annotations

import ast
import math
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

from pydantic import BaseModel, ConfigDict

from torchrelay.shared.cluster import Ended, Status
from torchrelay.shared.pipelines import is_run_id
from torchrelay.shared.runs import RunRecord
from torchrelay.shared.state import key_part
from torchrelay.shared.storage.failures import RankFailure
from torchrelay.shared.storage.files import RunResult

_RUN_IDS = uuid.UUID("7c1d9e2a-4b3f-4e8a-9c6d-1f2e3a4b5c6d")


def run_id_for(requested: str | None, event_id: str) -> str:
    """The request's run id, or one derived from the event id (a redelivery gets the same)."""
    return requested or f"run-{uuid.uuid5(_RUN_IDS, event_id).hex[:12]}"


def run_id_refusal(run_id: str) -> str | None:
    """Why ``run_id`` cannot name a run (:func:`is_run_id`), or None."""
    if not is_run_id(run_id):
        return (
            f"run id {run_id!r} cannot name a model version (letters, digits, '.', '_' and "
            "'-', starting with a letter or digit, at most 64): choose another run_id"
        )
    return None


def result_refusal(result: RunResult) -> str | None:
    """Why a finished run's result cannot become a model version, or None."""
    bad = sorted(name for name, value in result.metrics.items() if not math.isfinite(value))
    if bad:
        return f"it reported non-finite metrics ({', '.join(bad)}): nothing to compare or deploy"
    return None


class ModelRecord(BaseModel):
    """A trained model version in the ``models`` bucket, with where it came from."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    version: str
    path: str
    metrics: dict[str, float]
    run_id: str
    dataset: str
    """``name@version`` of the dataset it was trained on."""
    pipeline_id: str | None = None
    created: datetime


def model_key(name: str, version: str) -> str:
    return f"{key_part(name)}.{key_part(version)}"


def restart_allowed(record: RunRecord, attempt: int) -> str | None:
    """Why a restart to ``attempt`` must not happen, or None if it may."""
    if record.status == "running":
        return f"run {record.run_id} is running"
    if record.status == "succeeded":
        return f"run {record.run_id} already succeeded"
    if attempt != record.attempt + 1:
        return f"run {record.run_id} is at attempt {record.attempt}; restart {attempt} is stale"
    if attempt > record.spec.max_restarts:
        return f"run {record.run_id} has used its {record.spec.max_restarts} restarts"
    return None


def failure_is_final(
    *, attempt: int, max_restarts: int, cancelled: bool, restart_cancel: bool
) -> bool:
    """Whether an attempt that ended without success ends its run (``train.failed`` final).

    A cancel ends the run, unless it is the monitor's cancel of a stalled attempt in order to
    restart it (``restart_cancel``): that attempt, like one that failed, is final only when
    no restart is left.
    """
    if cancelled and not restart_cancel:
        return True
    return attempt >= max_restarts


@dataclass(frozen=True)
class AttemptEnd:
    """How an attempt that did not succeed ends: what to report, whether that ends its run,
    and the exception its code raised (None: a signal, a cancel, a file nobody wrote)."""

    ended: Ended
    final: bool
    error: RankFailure | None = None


def attempt_end(
    record: RunRecord,
    ended: Ended,
    cancel: Literal["final", "restart"] | None,
    failures: Sequence[RankFailure] = (),
) -> AttemptEnd:
    """How an attempt that did not succeed ends, and whether that ends its run.

    ``cancel`` is the intent stored on the run for this attempt, if any: a backend that sees
    a cancelled job only as a failed one (a deleted Kubernetes Job) reports it as cancelled,
    and a cancel keeps its meaning whatever the ranks wrote.

    ``failures`` are the attempt's rank failure files. If any says its failure would repeat
    (the entrypoint cannot run, or the code raised before its first step, not in a
    collective), the run ends at once, whatever restarts are left: another attempt would fail
    the same way. Otherwise it is restarted while restarts are left, as for any crash.
    """
    if cancel is not None and ended.status is Status.FAILED:
        ended = Ended(Status.CANCELLED, "cancelled", log_tail=ended.log_tail)
    current = [failure for failure in failures if of_attempt(failure, record)]
    error = reported_failure(ended, current) if ended.status is Status.FAILED else None
    if error is not None:
        same_rank = error.rank == ended.rank
        ended = Ended(
            Status.FAILED,
            failure_reason(error),
            error.rank,
            ended.exit_code if same_rank else None,
            ended.signal if same_rank else None,
            list(error.traceback),
        )
        if error.repeatable:
            return AttemptEnd(ended, final=True, error=error)
    final = failure_is_final(
        attempt=record.attempt,
        max_restarts=record.spec.max_restarts,
        cancelled=ended.status is Status.CANCELLED,
        restart_cancel=cancel == "restart",
    )
    return AttemptEnd(ended, final, error)


CLOCK_SKEW = timedelta(seconds=5)
"""How far a node's clock may lag the train service's (Kubernetes: the rank's node)."""


def of_attempt(failure: RankFailure, record: RunRecord) -> bool:
    """Whether ``failure`` was written by the attempt ``record`` launched, not left by an
    earlier run under the same id (a rank killed before it cleared its file leaves the old
    one): written after the launch (``record.updated``), give or take the nodes' clocks."""
    return failure.attempt == record.attempt and failure.written >= record.updated - CLOCK_SKEW


def reported_failure(ended: Ended, failures: Sequence[RankFailure]) -> RankFailure | None:
    """The rank failure that explains a failed attempt: the lowest rank's that would repeat
    (the cause; a peer's collective error is only its echo), else the failed rank's own, else
    None (it was killed, or wrote nothing)."""
    ordered = sorted(failures, key=lambda failure: failure.rank)
    for failure in ordered:
        if failure.repeatable:
            return failure
    for failure in ordered:
        if failure.rank == ended.rank and ended.signal is None:
            return failure
    return None


def failure_reason(failure: RankFailure) -> str:
    """What a rank's failure says to the person who submitted the run."""
    where = f"(rank {failure.rank})"
    if failure.phase == "import":
        return (
            f"the entrypoint {failure.entrypoint!r} cannot run: {failure.summary} {where}: "
            "not restarted, it would fail again"
        )
    if failure.repeatable:
        when = (
            "before its first step"
            if failure.phase == "before_first_step"
            else (f"at step {failure.step}")
        )
        return (
            f"the training function raised {failure.summary} {when} {where}: "
            "not restarted, it would fail again"
        )
    if failure.collective:
        return (
            f"a collective failed on rank {failure.rank} at step {failure.step}, most likely "
            f"because a peer rank died: {failure.summary}"
        )
    return f"the training function raised {failure.summary} at step {failure.step} {where}"


def orphan_is_final(record: RunRecord) -> bool:
    """An attempt whose replica died (and its workers with it) fails like any other: final
    only when no restart is left."""
    return failure_is_final(
        attempt=record.attempt,
        max_restarts=record.spec.max_restarts,
        cancelled=False,
        restart_cancel=False,
    )


def settle_pause_s(tries: int, *, base_s: float = 1.0, cap_s: float = 30.0) -> float:
    """How long to wait before trying again to record how an attempt ended (the state or the
    bus being briefly unreachable)."""
    return float(min(cap_s, base_s * 2 ** max(0, tries - 1)))


# --- the entrypoint policy -------------------------------------------------------------------

ENTRYPOINTS_SETTING = "TORCHRELAY_TRAIN_ENTRYPOINTS"
"""Where the allowed module prefixes come from (named in every refusal)."""


def module_allowed(module: str, allowed: Sequence[str]) -> bool:
    """Whether ``module`` is one of ``allowed`` or lies under one, by whole dotted components
    (``a.b`` allows ``a.b`` and ``a.b.c``, never ``a.bc``)."""
    return any(module == prefix or module.startswith(f"{prefix}.") for prefix in allowed)


def entrypoint_module_refusal(entrypoint: str, allowed: Sequence[str]) -> str | None:
    """Why ``entrypoint``'s module is outside the policy, or None if it is inside.

    Apply it before looking the module up: finding ``a.b.c`` imports the packages ``a`` and
    ``a.b``, and only code under ``allowed`` may run in the service.
    """
    module = entrypoint.partition(":")[0]
    if module_allowed(module, allowed):
        return None
    return (
        f"entrypoint {entrypoint!r} is not allowed: module {module!r} is not under "
        f"{ENTRYPOINTS_SETTING} ({','.join(allowed) or 'empty: nothing is allowed'}); "
        "add its package to that setting"
    )


def entrypoint_refusal(entrypoint: str, allowed: Sequence[str], source: str | None) -> str | None:
    """Why ``entrypoint`` (``module:function``) must not run, or None if it may.

    It may when its module lies under one of the ``allowed`` prefixes and the module's own
    Python ``source`` (None: it has none, e.g. a builtin or C module) binds ``function`` last
    to a top-level ``def`` or ``async def``: a name imported or assigned there (``os:system``,
    a re-export of ``subprocess.call``) is code from elsewhere. The source is parsed, never run.

    ``allowed`` is the operator's setting today; code the platform stages for a run (a
    workspace) is allowed by passing its package along with it.
    """
    refusal = entrypoint_module_refusal(entrypoint, allowed)
    if refusal is not None:
        return refusal
    module, _, function = entrypoint.partition(":")
    if source is None:
        return (
            f"entrypoint {entrypoint!r} is not allowed: module {module!r} has no Python source "
            "to check; point it at a function in a .py module"
        )
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError) as exc:  # ValueError: a null byte in the source
        return (
            f"entrypoint {entrypoint!r} is not allowed: module {module!r} does not parse "
            f"({exc}); fix its source"
        )
    if not isinstance(_last_binding(tree, function), ast.FunctionDef | ast.AsyncFunctionDef):
        return (
            f"entrypoint {entrypoint!r} is not allowed: {function!r} is not a function defined "
            f"in module {module!r}; name a top-level def of that module"
        )
    return None


def _last_binding(tree: ast.Module, name: str) -> ast.stmt | None:
    """The module's last top-level statement that binds ``name`` (the binding that wins)."""
    found = None
    for statement in tree.body:
        bound = _bound_by(statement)
        if name in bound or "*" in bound:  # a star import may rebind any name
            found = statement
    return found


def _bound_by(statement: ast.stmt) -> set[str]:
    """Names a top-level statement binds (or deletes) in the module's scope, nested blocks
    included; the bodies of functions and classes are scopes of their own."""
    names: set[str] = set()
    pending: list[ast.AST] = [statement]
    while pending:
        node = pending.pop()
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
            continue
        if isinstance(node, ast.Import | ast.ImportFrom):
            names.update((alias.asname or alias.name).partition(".")[0] for alias in node.names)
            continue
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store | ast.Del):
            names.add(node.id)
        elif isinstance(node, ast.ExceptHandler | ast.MatchAs | ast.MatchStar) and node.name:
            names.add(node.name)
        elif isinstance(node, ast.MatchMapping) and node.rest:
            names.add(node.rest)
        pending.extend(ast.iter_child_nodes(node))
    return names
