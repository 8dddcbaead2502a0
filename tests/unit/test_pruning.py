"""A prune's plan: what is older than the cut-off goes, unless something live needs it; each
thing kept says why (services/monitor/pruning.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import pytest
from pydantic import JsonValue

from tests.sweep_factories import sweep_record
from torchrelay.services.monitor.pruning import (
    DatasetVersionView,
    DeploymentView,
    Inventory,
    ModelVersionView,
    PrunePlan,
    Stored,
    Workspace,
    pipeline_dataset,
    plan,
)
from torchrelay.shared.events.data import (
    DatasetRef,
    PipelineSpec,
    PruneKind,
    TrainFailedData,
    TrainJobSpec,
)
from torchrelay.shared.pipelines import PipelineRecord, with_stage
from torchrelay.shared.runs import RunRecord, RunStatus
from torchrelay.shared.sweep_state import SweepRecord, sweep_key

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
DAY = timedelta(days=1)
OLDER_THAN_S = 30 * DAY.total_seconds()
OLD = 40 * DAY
YOUNG = 2 * DAY
WS_OLD = "0123456789abcdef"
WS_LIVE = "fedcba9876543210"


def dataset(name: str, version: str, age: timedelta) -> Stored[DatasetVersionView]:
    view = DatasetVersionView(name=name, version=version, created=NOW - age)
    return Stored(f"versions.{name}.{version}", 1, view)


def model(
    name: str, version: str, run_id: str, age: timedelta, pipeline_id: str | None = None
) -> Stored[ModelVersionView]:
    view = ModelVersionView(
        name=name, version=version, run_id=run_id, pipeline_id=pipeline_id, created=NOW - age
    )
    return Stored(f"{name}.{version}", 1, view)


def run(
    run_id: str,
    age: timedelta,
    status: RunStatus = "succeeded",
    *,
    data: str = "v1",
    workspace: str | None = None,
    pipeline_id: str | None = None,
    restart_due: bool = False,
) -> Stored[RunRecord]:
    outcome = TrainFailedData(run_id=run_id, reason="boom", final=False) if restart_due else None
    record = RunRecord(
        run_id=run_id,
        spec=TrainJobSpec(
            entrypoint="m:train",
            model_name="digits",
            workspace=workspace,
            dataset=DatasetRef(name="digits", version=data),
        ),
        dataset_path=f"datasets/digits/{data}",
        status=status,
        attempt=0,
        owner="train-a",
        pipeline_id=pipeline_id,
        updated=NOW - age,
        outcome=outcome,
    )
    return Stored(run_id, 1, record)


def pipeline(
    pipeline_id: str,
    age: timedelta,
    *,
    live: bool,
    data: str | None = "v1",
    run_id: str | None = None,
    workspace: str | None = None,
    source: str | None = None,
) -> Stored[PipelineRecord]:
    """A pipeline submitted ``age`` ago that staged ``data`` (None: ingest not done) and, live,
    still trains ``run_id``; not live, it ended then."""
    spec = PipelineSpec.model_validate(
        {
            "name": "digits",
            "dataset": {"name": "digits", **({"source": source} if source else {})},
            "training": {
                "entrypoint": "m:train",
                "model_name": "digits",
                **({"workspace": workspace} if workspace else {}),
            },
            "deploy": {"enabled": False},
        }
    )
    at = NOW - age
    record = PipelineRecord(pipeline_id=pipeline_id, spec=spec, submitted=at)
    if data is not None:
        record = with_stage(
            record, "ingest", "succeeded", at, detail={"dataset": "digits", "version": data}
        )
        detail: dict[str, JsonValue] = {"run_id": run_id} if run_id else {}
        record = with_stage(record, "train", "running" if live else "failed", at, detail=detail)
    return Stored(pipeline_id, 1, record)


def workspace(workspace_id: str, age: timedelta) -> Workspace:
    return Workspace(workspace_id, NOW - age)


@dataclass
class Case:
    inventory: Inventory
    removed: list[str]
    kept: dict[str, str] = field(default_factory=dict)
    kinds: tuple[PruneKind, ...] = ("datasets", "models", "runs", "pipelines", "workspaces")


def names(result: PrunePlan) -> tuple[list[str], dict[str, str | None]]:
    return (
        sorted(f"{i.kind}:{i.name}" for i in result.removed),
        {f"{i.kind}:{i.name}": i.reason for i in result.kept},
    )


CASES = {
    "only what is older than the cut-off goes; younger things are not listed": Case(
        Inventory(
            datasets=[dataset("digits", "v1", OLD), dataset("digits", "v2", YOUNG)],
            runs=[run("r-old", OLD), run("r-young", YOUNG)],
            pipelines=[pipeline("p-old", OLD, live=False), pipeline("p-young", YOUNG, live=False)],
            workspaces=[workspace(WS_OLD, OLD), workspace(WS_LIVE, YOUNG)],
        ),
        removed=["datasets:digits@v1", "pipelines:p-old", "runs:r-old", f"workspaces:{WS_OLD}"],
    ),
    "exactly as old as the cut-off counts as old": Case(
        Inventory(datasets=[dataset("digits", "v1", timedelta(seconds=OLDER_THAN_S))]),
        removed=["datasets:digits@v1"],
    ),
    "a deployment's active and previous versions stay, and so do their runs (lineage)": Case(
        Inventory(
            models=[
                model("digits", "r1", "r1", OLD),
                model("digits", "r2", "r2", OLD),
                model("digits", "r0", "r0", OLD),
            ],
            runs=[run("r0", OLD), run("r1", OLD), run("r2", OLD)],
            deployments=[
                DeploymentView(model="digits", active_version="r2", previous_version="r1")
            ],
        ),
        removed=["models:digits@r0", "runs:r0"],
        kept={
            "models:digits@r1": "rollback target of deployment digits",
            "models:digits@r2": "served by deployment digits",
            "runs:r1": "lineage of kept model digits@r1",
            "runs:r2": "lineage of kept model digits@r2",
        },
    ),
    "a live pipeline keeps its dataset, workspace, run and model, and itself": Case(
        Inventory(
            datasets=[dataset("digits", "v1", OLD)],
            runs=[run("p-live.train", OLD, pipeline_id="p-live", workspace=WS_LIVE)],
            models=[model("digits", "m1", "p-live.train", OLD, pipeline_id="p-live")],
            pipelines=[
                pipeline("p-live", OLD, live=True, run_id="p-live.train", workspace=WS_LIVE)
            ],
            workspaces=[workspace(WS_LIVE, OLD)],
        ),
        removed=[],
        kept={
            "datasets:digits@v1": "used by live pipeline p-live",
            "models:digits@m1": "used by live pipeline p-live",
            "pipelines:p-live": "not finished",
            "runs:p-live.train": "used by live pipeline p-live; lineage of kept model digits@m1",
            f"workspaces:{WS_LIVE}": "used by live pipeline p-live; named by kept run p-live.train",
        },
    ),
    "a run that has not ended stays, with its dataset and workspace": Case(
        Inventory(
            datasets=[dataset("digits", "v1", OLD), dataset("digits", "v0", OLD)],
            runs=[
                run("r-running", OLD, "running", workspace=WS_LIVE),
                run("r-restart", OLD, "failed", data="v0", restart_due=True),
                run("r-failed", OLD, "failed"),
            ],
            workspaces=[workspace(WS_LIVE, OLD)],
        ),
        removed=["runs:r-failed"],
        kept={
            "datasets:digits@v0": "used by run r-restart, which has not ended",
            "datasets:digits@v1": "used by run r-running, which has not ended",
            "runs:r-restart": "attempt 0 failed and a restart is due",
            "runs:r-running": "still running",
            f"workspaces:{WS_LIVE}": "used by run r-running, which has not ended",
        },
    ),
    "a workspace stays while a kept run or finished pipeline names it": Case(
        Inventory(
            runs=[run("r-young", YOUNG, workspace=WS_OLD)],
            pipelines=[pipeline("p-young", YOUNG, live=False, workspace=WS_LIVE)],
            workspaces=[workspace(WS_OLD, OLD), workspace(WS_LIVE, OLD)],
        ),
        removed=[],
        kept={
            f"workspaces:{WS_OLD}": "named by kept run r-young",
            f"workspaces:{WS_LIVE}": "named by kept pipeline p-young",
        },
    ),
    "an old finished pipeline goes with what only it used": Case(
        Inventory(
            datasets=[dataset("digits", "v1", OLD)],
            runs=[run("p-old.train", OLD, pipeline_id="p-old", workspace=WS_OLD)],
            pipelines=[pipeline("p-old", OLD, live=False, run_id="p-old.train", workspace=WS_OLD)],
            workspaces=[workspace(WS_OLD, OLD)],
        ),
        removed=[
            "datasets:digits@v1",
            "pipelines:p-old",
            "runs:p-old.train",
            f"workspaces:{WS_OLD}",
        ],
    ),
    "only the kinds asked for go; the rest stays unlisted and keeps what it names": Case(
        Inventory(
            datasets=[dataset("digits", "v1", OLD)],
            models=[model("digits", "r1", "r1", OLD)],
            runs=[run("r1", OLD, workspace=WS_OLD), run("r2", OLD)],
            workspaces=[workspace(WS_OLD, OLD)],
        ),
        kinds=("runs", "workspaces"),
        removed=["runs:r2"],
        kept={
            "runs:r1": "lineage of kept model digits@r1",
            f"workspaces:{WS_OLD}": "named by kept run r1",
        },
    ),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_plan(case: Case) -> None:
    result = plan(NOW, OLDER_THAN_S, case.inventory, kinds=case.kinds)
    assert names(result) == (sorted(case.removed), case.kept)


def test_ages_are_reported_in_seconds_from_the_last_change() -> None:
    result = plan(NOW, OLDER_THAN_S, Inventory(runs=[run("r", OLD)]))
    (item,) = result.removed
    assert (item.age_s, item.folder, item.key, item.revision) == (
        OLD.total_seconds(),
        "runs/r",
        "r",
        1,
    )


def test_a_pipeline_that_has_staged_nothing_yet_keeps_the_newest_version_it_will_pick() -> None:
    waiting = pipeline("p-wait", OLD, live=True, data=None).value
    versions = [dataset("digits", "v1", OLD).value, dataset("digits", "v2", OLD - DAY).value]
    assert pipeline_dataset(waiting, versions) == ("digits", "v2")
    staging = pipeline("p-stage", OLD, live=True, data=None, source="sklearn:digits").value
    assert pipeline_dataset(staging, versions) is None, "it stages a version of its own"


@pytest.mark.parametrize("older_than_s", [0, -1.0])
def test_a_cut_off_that_is_not_positive_is_refused(older_than_s: float) -> None:
    with pytest.raises(ValueError, match="older_than_s must be > 0"):
        plan(NOW, older_than_s, Inventory())


def a_sweep(sweep_id: str, age: timedelta, *, running: bool) -> Stored[SweepRecord]:
    """A sweep of 4 trials that changed last ``age`` ago: 3 ended and one running, or over."""
    record = sweep_record(sweep_id)  # trial 3 runs
    trials = list(record.trials)
    if not running:
        trials[3] = trials[3].model_copy(update={"status": "failed", "reason": "exit code 1"})
    record = record.model_copy(
        update={
            "trials": trials,
            "status": "running" if running else "completed",
            "updated": NOW - age,
        }
    )
    return Stored(sweep_key(sweep_id), 1, record)


SWEEP_RECORDS = [
    ("sweeps", "trial.p-old.0"),
    ("sweeps", "trial.p-old.1"),
    ("sweeps", "trial.p-old.2"),
    ("sweeps", "trial.p-old.3"),
    ("sweeps", "sweep.p-old"),
]


def test_a_removed_pipeline_takes_its_sweeps_histories_then_its_record_with_it() -> None:
    result = plan(
        NOW,
        OLDER_THAN_S,
        Inventory(
            pipelines=[pipeline("p-old", OLD, live=False), pipeline("p-live", OLD, live=True)],
            sweeps=[a_sweep("p-old", OLD, running=False), a_sweep("p-live", OLD, running=True)],
        ),
    )
    (removed,) = result.removed
    assert (removed.kind, removed.name, removed.key) == ("pipelines", "p-old", "p-old")
    assert list(removed.records) == SWEEP_RECORDS, "the sweep's record last: it lists the rest"
    (kept,) = result.kept
    assert (kept.name, kept.reason) == ("p-live", "not finished")


def test_a_sweep_whose_pipeline_record_is_gone_is_pruned_by_its_own_age() -> None:
    result = plan(
        NOW,
        OLDER_THAN_S,
        Inventory(
            sweeps=[
                a_sweep("p-old", OLD, running=False),
                a_sweep("p-stuck", OLD, running=True),
                a_sweep("p-young", YOUNG, running=False),
            ]
        ),
    )
    (removed,) = result.removed
    assert (removed.kind, removed.name, removed.key) == ("pipelines", "p-old", None)
    assert list(removed.records) == SWEEP_RECORDS
    assert names(result)[1] == {"pipelines:p-stuck": "sweep still running"}


def test_a_sweep_goes_only_when_pipelines_are_asked_for() -> None:
    inventory = Inventory(
        pipelines=[pipeline("p-old", OLD, live=False)],
        sweeps=[a_sweep("p-old", OLD, running=False), a_sweep("p-alone", OLD, running=False)],
    )
    assert plan(NOW, OLDER_THAN_S, inventory, kinds=("runs", "models")).removed == []
