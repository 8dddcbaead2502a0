"""User-code failures fail fast and say why: which exceptions of a rank would repeat in a new
attempt, and how the train service ends an attempt given what its ranks wrote."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal

import pytest
import torch.distributed as dist
from torch import nn

from torchrelay.services.train.domain import (
    AttemptEnd,
    attempt_end,
    failure_reason,
    reported_failure,
)
from torchrelay.shared.cluster import Ended, Status
from torchrelay.shared.events.data import DatasetRef, TrainFailedData, TrainJobSpec
from torchrelay.shared.runs import RunRecord
from torchrelay.shared.storage import Layout
from torchrelay.shared.storage.failures import (
    FailurePhase,
    RankFailure,
    SameEveryTime,
    collective_failure,
    qualified_name,
    repeatable,
)
from torchrelay.shared.storage.files import CorruptFile

ENTRYPOINT = "shop.models:train"
# What a gloo rank raised in torch 2.13 when its peer was SIGKILLed during DDP's construction.
GLOO_PEER_CLOSED = (
    "[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed "
    "by peer [127.0.0.1]:12716. This is typically caused by a remote worker crashing."
)


def raised(exc: BaseException) -> BaseException:
    """``exc`` with a traceback, as a rank catches it."""
    with pytest.raises(type(exc)) as info:
        raise exc
    return info.value


def failure_of(
    exc: BaseException, phase: FailurePhase = "before_first_step", *, rank: int = 0, step: int = 0
) -> RankFailure:
    return RankFailure.of(
        raised(exc), rank=rank, attempt=0, entrypoint=ENTRYPOINT, phase=phase, step=step
    )


# --- which failures would repeat ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("phase", "collective", "expected"),
    [
        ("import", False, True),
        ("import", True, True),
        ("before_first_step", False, True),
        ("before_first_step", True, False),
        ("after_progress", False, False),
        ("after_progress", True, False),
    ],
)
def test_what_would_fail_again(phase: FailurePhase, collective: bool, expected: bool) -> None:
    assert repeatable(phase, collective=collective) is expected


class LabelsRefused(SameEveryTime, ValueError):
    pass


@pytest.mark.parametrize("phase", ["before_first_step", "after_progress"])
def test_an_sdk_error_marked_same_every_time_would_fail_again_in_any_phase(
    phase: FailurePhase,
) -> None:
    refused = LabelsRefused("2 labels for an output of 3 values per sample")
    failure = failure_of(refused, phase, step=420)
    assert failure.repeatable
    end = attempt_end(run(max_restarts=3), exited(0, 1), None, [failure])
    assert end.final, "training again would only be refused again"
    when = "before its first step" if phase == "before_first_step" else "at step 420"
    assert end.ended.reason == (
        f"the training function raised {qualified_name(LabelsRefused)}: 2 labels for an output "
        f"of 3 values per sample {when} (rank 0): not restarted, it would fail again"
    )


def test_a_user_exception_is_not_a_collective_failure() -> None:
    assert not collective_failure(raised(ValueError("bad column 'z'")))
    assert not collective_failure(raised(KeyError("label")))


def test_gloos_peer_errors_are_collective_failures() -> None:
    assert collective_failure(raised(RuntimeError(GLOO_PEER_CLOSED)))
    assert collective_failure(raised(RuntimeError("Read error: Connection reset by peer")))


def test_torchs_distributed_errors_are_collective_failures() -> None:
    assert collective_failure(raised(dist.DistBackendError("NCCL communicator was aborted")))
    assert collective_failure(raised(dist.DistStoreError("Wait timeout")))


def test_an_error_raised_in_ddp_code_is_a_collective_failure() -> None:
    # DDP without a process group: the exception comes from torch.distributed's frames.
    with pytest.raises(Exception) as info:  # noqa: PT011 - any exception DDP raises
        nn.parallel.DistributedDataParallel(nn.Linear(2, 2))
    assert collective_failure(info.value)


def test_a_collective_failure_chained_under_a_user_exception_still_counts() -> None:
    def all_reduce() -> None:
        raise RuntimeError(GLOO_PEER_CLOSED)

    def sync_metrics() -> None:
        try:
            all_reduce()
        except RuntimeError as exc:
            raise ValueError("could not sync the metrics") from exc

    with pytest.raises(ValueError, match="could not sync") as info:
        sync_metrics()
    assert collective_failure(info.value)


def test_a_failure_records_type_message_and_the_tracebacks_end() -> None:
    failure = failure_of(ValueError("bad column 'z'"), step=0)
    assert (failure.error_type, failure.message, failure.repeatable) == (
        "ValueError",
        "bad column 'z'",
        True,
    )
    assert failure.traceback[0] == "Traceback (most recent call last):"
    assert failure.traceback[-1] == "ValueError: bad column 'z'"
    assert failure.summary == "ValueError: bad column 'z'"


def test_a_non_builtin_exception_is_named_with_its_module() -> None:
    assert failure_of(dist.DistNetworkError("gone")).error_type == (
        "torch.distributed.DistNetworkError"
    )


def test_a_long_message_and_traceback_are_bounded() -> None:
    def ping(n: int) -> None:
        if n == 0:
            raise ValueError("x" * 10_000)
        pong(n - 1)

    def pong(n: int) -> None:
        ping(n)

    try:
        ping(20)
    except ValueError as exc:
        failure = RankFailure.of(
            exc, rank=0, attempt=0, entrypoint=ENTRYPOINT, phase="after_progress", step=3
        )
    assert len(failure.message) == 2000
    assert len(failure.traceback) == 20
    assert all(len(line) <= 500 for line in failure.traceback)
    assert failure.traceback[-1] == "ValueError: " + "x" * (500 - len("ValueError: "))
    assert len(failure.summary) == len("ValueError: ") + 200


def test_a_message_of_many_lines_leaves_the_frames_in_the_traceback() -> None:
    failure = failure_of(ValueError("\n".join(f"row {i} is bad" for i in range(100))))
    assert failure.traceback[-7:] == (
        "    raise exc",
        "ValueError: row 0 is bad",
        "row 1 is bad",
        "row 2 is bad",
        "row 3 is bad",
        "row 4 is bad",
        "...",
    )
    assert failure.message.count("\n") == 99, "the message itself is whole"
    assert failure.summary == "ValueError: row 0 is bad"


def test_a_failure_file_round_trips_and_a_bad_one_is_refused(tmp_path: Path) -> None:
    path = Layout(tmp_path).rank_error("r1", 0, 1)
    failure = failure_of(ValueError("bad column 'z'"), rank=1)
    failure.write(path)
    assert path == tmp_path / "runs/r1/logs/attempt-0/rank-1.error.json"
    assert RankFailure.read(path) == failure
    path.write_text('{"rank": 1}')
    with pytest.raises(CorruptFile, match="not a valid rank failure"):
        RankFailure.read(path)


# --- how the service ends the attempt ----------------------------------------------------------


def run(attempt: int = 0, max_restarts: int = 3) -> RunRecord:
    spec = TrainJobSpec(
        dataset=DatasetRef(name="digits", version="v1"),
        entrypoint=ENTRYPOINT,
        model_name="digits",
        world_size=2,
        max_restarts=max_restarts,
    )
    return RunRecord(
        run_id="r1",
        spec=spec,
        dataset_path="datasets/digits/v1",
        status="running",
        attempt=attempt,
        owner="train-a",
        updated=datetime.now(UTC),
    )


def exited(rank: int, code: int) -> Ended:
    return Ended(Status.FAILED, f"rank {rank} failed (exit {code})", rank, code, None, ["{json}"])


def test_an_entrypoint_that_cannot_be_imported_ends_the_run_at_once() -> None:
    broken = failure_of(ModuleNotFoundError("No module named 'sklearn_extra'"), "import")
    end = attempt_end(run(max_restarts=3), exited(0, 3), None, [broken])
    assert end.final, "restarts are left, but another attempt would fail the same way"
    assert end.error == broken
    assert end.ended.reason == (
        "the entrypoint 'shop.models:train' cannot run: ModuleNotFoundError: No module named "
        "'sklearn_extra' (rank 0): not restarted, it would fail again"
    )
    assert end.ended.log_tail == list(broken.traceback)
    assert (end.ended.rank, end.ended.exit_code) == (0, 3)


def test_an_exception_before_the_first_step_ends_the_run_at_once() -> None:
    bad = failure_of(ValueError("bad column 'z'"))
    end = attempt_end(run(), exited(0, 1), None, [bad])
    assert end.final
    assert end.ended.reason == (
        "the training function raised ValueError: bad column 'z' before its first step "
        "(rank 0): not restarted, it would fail again"
    )


def test_the_cause_is_reported_not_the_peers_echo() -> None:
    # Rank 0 saw rank 1's exit as a collective error and exited first.
    echo = failure_of(RuntimeError(GLOO_PEER_CLOSED), rank=0)
    cause = failure_of(ValueError("bad column 'z'"), rank=1)
    end = attempt_end(run(), exited(0, 1), None, [echo, cause])
    assert end.final
    assert end.error == cause
    assert "(rank 1)" in end.ended.reason
    assert (end.ended.rank, end.ended.exit_code) == (1, None), "rank 0's exit code is not its"


def test_a_crash_after_progress_is_restarted_with_its_exception_reported() -> None:
    crash = failure_of(RuntimeError("CUDA error: an illegal memory access"), "after_progress")
    crash = crash.model_copy(update={"step": 42})
    end = attempt_end(run(max_restarts=3), exited(0, 1), None, [crash])
    assert not end.final
    assert end.error == crash
    assert end.ended.reason == (
        "the training function raised RuntimeError: CUDA error: an illegal memory access at "
        "step 42 (rank 0)"
    )
    assert attempt_end(run(attempt=3, max_restarts=3), exited(0, 1), None, [crash]).final, (
        "with no restart left it ends the run, as any crash"
    )


def test_a_killed_rank_is_restarted_and_its_peers_collective_error_is_not_the_reason() -> None:
    killed = Ended(Status.FAILED, "rank 1 was killed by SIGKILL", 1, -9, "SIGKILL", ["tail"])
    echo = failure_of(RuntimeError(GLOO_PEER_CLOSED), rank=0)
    end = attempt_end(run(), killed, None, [echo])
    assert end == attempt_end(run(), killed, None, [])
    assert (end.final, end.error, end.ended) == (False, None, killed)


def test_a_peers_collective_error_reported_first_is_restarted() -> None:
    echo = failure_of(RuntimeError(GLOO_PEER_CLOSED), rank=0)
    end = attempt_end(run(), exited(0, 1), None, [echo])
    assert not end.final
    assert end.ended.reason.startswith("a collective failed on rank 0 at step 0, most likely")


def test_a_file_left_by_an_earlier_run_or_attempt_is_not_this_attempts_failure() -> None:
    bad = failure_of(ValueError("bad column 'z'"))
    launched_later = run().model_copy(update={"updated": bad.written + timedelta(hours=1)})
    assert attempt_end(launched_later, exited(0, 1), None, [bad]) == AttemptEnd(
        exited(0, 1), final=False
    )
    restarted = run(attempt=1)
    assert attempt_end(restarted, exited(0, 1), None, [bad]).error is None
    # A node's clock a little behind the service's is still this attempt's.
    skewed = bad.model_copy(update={"written": restarted.updated - timedelta(seconds=2)})
    assert attempt_end(run(), exited(0, 1), None, [skewed]).error == skewed


def test_without_failure_files_an_attempt_fails_as_the_backend_said() -> None:
    assert attempt_end(run(), exited(1, 1), None, []).ended == exited(1, 1)


@pytest.mark.parametrize("intent", ["final", "restart"])
def test_a_cancel_keeps_its_meaning_whatever_the_ranks_wrote(
    intent: Literal["final", "restart"],
) -> None:
    bad = failure_of(ValueError("bad column 'z'"))
    end = attempt_end(run(), exited(0, 1), intent, [bad])
    assert end.ended.status is Status.CANCELLED
    assert end.error is None
    assert end.final is (intent == "final")


def test_the_lowest_repeatable_rank_is_the_one_reported() -> None:
    first = failure_of(ValueError("a"), rank=0)
    second = failure_of(ValueError("b"), rank=1)
    assert reported_failure(exited(1, 1), [second, first]) == first


def test_each_phase_reads_as_a_sentence() -> None:
    assert failure_reason(failure_of(AttributeError("no 'trian'"), "import")).startswith(
        "the entrypoint 'shop.models:train' cannot run: AttributeError: no 'trian' (rank 0)"
    )


def test_old_failed_events_without_the_error_fields_still_decode() -> None:
    data = TrainFailedData.model_validate({"run_id": "r1", "reason": "rank 0 failed (exit 1)"})
    assert (data.error_type, data.error_message) == (None, None)
