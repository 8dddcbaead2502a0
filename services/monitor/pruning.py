"""Pure rules of a prune: what is old enough to go, and what stays whatever its age.

:func:`plan` takes the platform's records (pipelines, runs, model versions, deployments,
dataset versions, sweeps) and the workspaces found on storage, and returns what to remove and
what to keep, each kept item with its reasons. A sweep is part of its pipeline: its record and
its trials' histories go with the pipeline's record. Nothing here reads or writes: the monitor's
:mod:`~torchrelay.services.monitor.pruner` gathers the inventory and carries the plan out.

The monitor reads the records of other services' buckets; services never import each other,
so it reads them through the views below, which hold only the fields a prune needs and
ignore the rest (a field the owner adds later changes nothing here).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Generic, TypeVar

from pydantic import BaseModel, ConfigDict

from torchrelay.shared.events.data import PRUNE_KINDS, PruneKind
from torchrelay.shared.pipelines import PipelineRecord
from torchrelay.shared.runs import RunRecord
from torchrelay.shared.storage.layout import (
    relative_dataset,
    relative_model,
    relative_run,
    relative_workspace,
)
from torchrelay.shared.sweep_state import SWEEPS, SweepRecord, history_key, sweep_key

T = TypeVar("T")


class _View(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")


class DatasetVersionView(_View):
    """A staged dataset version (ingest's ``datasets`` bucket, keys ``versions.*``)."""

    name: str
    version: str
    created: datetime


class ModelVersionView(_View):
    """A trained model version (train's ``models`` bucket)."""

    name: str
    version: str
    run_id: str
    pipeline_id: str | None = None
    created: datetime


class DeploymentView(_View):
    """A model's deployment (serve's ``deployments`` bucket)."""

    model: str
    active_version: str | None = None
    previous_version: str | None = None


@dataclass(frozen=True, slots=True)
class Stored(Generic[T]):
    """A record with the key and revision it was read at (a prune deletes it only if it is
    still at that revision)."""

    key: str
    revision: int
    value: T


@dataclass(frozen=True, slots=True)
class Workspace:
    """A workspace folder found on storage, and when it was last written."""

    workspace_id: str
    modified: datetime


@dataclass(frozen=True, slots=True)
class Inventory:
    pipelines: Sequence[Stored[PipelineRecord]] = ()
    runs: Sequence[Stored[RunRecord]] = ()
    models: Sequence[Stored[ModelVersionView]] = ()
    deployments: Sequence[DeploymentView] = ()
    datasets: Sequence[Stored[DatasetVersionView]] = ()
    workspaces: Sequence[Workspace] = ()
    sweeps: Sequence[Stored[SweepRecord]] = ()


@dataclass(frozen=True, slots=True)
class Item:
    """One thing a prune looked at. ``folder`` is its folder relative to the storage root
    (None: a pipeline, which has only its record); ``key`` and ``revision`` its record (None: a
    workspace, which has only its folder)."""

    kind: PruneKind
    name: str
    age_s: float
    folder: str | None = None
    key: str | None = None
    revision: int | None = None
    reasons: tuple[str, ...] = ()
    records: tuple[tuple[str, str], ...] = ()
    """Other records that go with it, as (bucket, key), in the order they are removed, all
    before its own: a sweep's trials' histories, then its record, go with its pipeline. A
    prune that dies half-way leaves the item, which the next one removes with what is left."""

    @property
    def reason(self) -> str | None:
        return "; ".join(self.reasons) if self.reasons else None


@dataclass(frozen=True, slots=True)
class PrunePlan:
    """What goes, and what is old enough to go but stays (each with its reasons). What is
    younger than the cut-off, or of a kind not asked for, is in neither list."""

    removed: list[Item] = field(default_factory=list)
    kept: list[Item] = field(default_factory=list)


def dataset_name(name: str, version: str) -> str:
    return f"{name}@{version}"


def pipeline_updated(record: PipelineRecord) -> datetime:
    """When the pipeline last changed: its submission, or a stage's latest start or end."""
    marks = [record.submitted]
    for stage in record.stages.values():
        marks.extend(mark for mark in (stage.started, stage.ended) if mark is not None)
    return max(marks)


def _text(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def pipeline_dataset(
    record: PipelineRecord, versions: Iterable[DatasetVersionView]
) -> tuple[str, str] | None:
    """The dataset version a pipeline trains on: the one its ingest stage staged or found, the
    one its spec names, or (nothing staged yet, no source to stage) the newest of its name,
    which it will pick."""
    detail = record.stages["ingest"].detail
    name, version = _text(detail.get("dataset")), _text(detail.get("version"))
    if name and version:
        return name, version
    source = record.spec.dataset
    if source.version is not None:
        return source.name, source.version
    if source.source is not None:
        return None  # it stages a new version: none of the stored ones is its
    candidates = [v for v in versions if v.name == source.name]
    if not candidates:
        return None
    newest = max(candidates, key=lambda v: v.created)
    return newest.name, newest.version


def pipeline_uses(
    record: PipelineRecord,
    runs: Iterable[RunRecord],
    models: Iterable[ModelVersionView],
    versions: Iterable[DatasetVersionView],
) -> dict[PruneKind, set[str]]:
    """The names (as :func:`plan` lists them) of what a pipeline uses, by kind."""
    uses: dict[PruneKind, set[str]] = defaultdict(set)
    dataset = pipeline_dataset(record, versions)
    if dataset is not None:
        uses["datasets"].add(dataset_name(*dataset))
    train = record.stages["train"].detail
    for workspace in (record.spec.training.workspace, _text(train.get("workspace"))):
        if workspace is not None:
            uses["workspaces"].add(workspace)
    if (run_id := _text(train.get("run_id"))) is not None:
        uses["runs"].add(run_id)
    uses["runs"].update(r.run_id for r in runs if r.pipeline_id == record.pipeline_id)
    model, version = _text(train.get("model")), _text(train.get("version"))
    if model and version:
        uses["models"].add(dataset_name(model, version))
    uses["models"].update(
        dataset_name(m.name, m.version) for m in models if m.pipeline_id == record.pipeline_id
    )
    return uses


def run_dataset(run: RunRecord) -> str:
    return dataset_name(run.spec.dataset.name, run.spec.dataset.version)


def run_is_open(run: RunRecord) -> str | None:
    """Why a run has not ended, or None when it has."""
    if run.status == "running":
        return "still running"
    if run.restart_due:
        return f"attempt {run.attempt} failed and a restart is due"
    return None


class _Sorter:
    """Items old enough to go, in the order met, split into removed and kept."""

    def __init__(self, now: datetime, older_than_s: float, kinds: Collection[PruneKind]) -> None:
        self._now = now
        self._older_than_s = older_than_s
        self._kinds = kinds
        self.removed: list[Item] = []
        self.kept: list[Item] = []

    def judge(self, item: Item, reasons: Iterable[str]) -> bool:
        """Sort ``item`` by its age and ``reasons`` to keep it; whether it is removed."""
        if item.kind not in self._kinds or item.age_s < self._older_than_s:
            return False
        kept_for = tuple(dict.fromkeys(reasons))
        if kept_for:
            self.kept.append(_replace_reasons(item, kept_for))
            return False
        self.removed.append(item)
        return True

    def age_s(self, since: datetime) -> float:
        return max(0.0, (self._now - since).total_seconds())


def _replace_reasons(item: Item, reasons: tuple[str, ...]) -> Item:
    return Item(
        kind=item.kind,
        name=item.name,
        age_s=item.age_s,
        folder=item.folder,
        key=item.key,
        revision=item.revision,
        reasons=reasons,
        records=item.records,
    )


Reasons = dict[tuple[PruneKind, str], list[str]]


def reasons_to_keep(inventory: Inventory) -> Reasons:
    """Why each thing must stay whatever its age, by (kind, name), before lineage: what a
    deployment serves or can roll back to, what a live pipeline uses, runs that have not ended
    and what they use."""
    runs = [item.value for item in inventory.runs]
    models = [item.value for item in inventory.models]
    versions = [item.value for item in inventory.datasets]
    keep: Reasons = defaultdict(list)
    for deployment in inventory.deployments:
        if deployment.active_version is not None:
            name = dataset_name(deployment.model, deployment.active_version)
            keep["models", name].append(f"served by deployment {deployment.model}")
        if deployment.previous_version is not None:
            name = dataset_name(deployment.model, deployment.previous_version)
            keep["models", name].append(f"rollback target of deployment {deployment.model}")
    for item in inventory.pipelines:
        record = item.value
        if record.status != "running":
            continue
        keep["pipelines", record.pipeline_id].append("not finished")
        because = f"used by live pipeline {record.pipeline_id}"
        for kind, names in pipeline_uses(record, runs, models, versions).items():
            for name in sorted(names):
                keep[kind, name].append(because)
    for run in runs:
        if (open_reason := run_is_open(run)) is not None:
            keep["runs", run.run_id].append(open_reason)
            because = f"used by run {run.run_id}, which has not ended"
            keep["datasets", run_dataset(run)].append(because)
            if run.spec.workspace is not None:
                keep["workspaces", run.spec.workspace].append(because)
    return keep


def plan(
    now: datetime,
    older_than_s: float,
    inventory: Inventory,
    kinds: Collection[PruneKind] = PRUNE_KINDS,
) -> PrunePlan:
    """What a prune of everything older than ``older_than_s`` (at ``now``) removes and keeps.

    Ages: a dataset or model version from its creation, a run from its last change, a
    pipeline from its last stage change, a workspace from its folder's last write. Only
    ``kinds`` are removed; whatever the kind and age, these stay, with the reason:

    - a model version a deployment serves, or can roll back to (its previous version);
    - what a pipeline that has not finished uses: its dataset version, workspace, run, model;
    - a run that has not ended (running, or a restart due), and what it uses: its dataset
      version and workspace;
    - a pipeline that has not finished;
    - the run of a model version that stays (its lineage);
    - a workspace that a run or pipeline that stays names;
    - a sweep that still runs (its record, when its pipeline's is gone: a ``pipelines`` item
      of the sweep's id).
    """
    if older_than_s <= 0:
        raise ValueError(f"older_than_s must be > 0, got {older_than_s}")
    sorter = _Sorter(now, older_than_s, kinds)
    keep = reasons_to_keep(inventory)
    _judge_models(sorter, inventory.models, keep)
    _judge_runs(sorter, inventory.runs, keep)
    _judge_pipelines(sorter, inventory.pipelines, inventory.sweeps, keep)
    for workspace in inventory.workspaces:
        wid = workspace.workspace_id
        entry = Item(
            "workspaces", wid, sorter.age_s(workspace.modified), folder=relative_workspace(wid)
        )
        sorter.judge(entry, keep["workspaces", wid])
    for dataset_item in inventory.datasets:
        version = dataset_item.value
        name = dataset_name(version.name, version.version)
        entry = Item(
            "datasets",
            name,
            sorter.age_s(version.created),
            folder=relative_dataset(version.name, version.version),
            key=dataset_item.key,
            revision=dataset_item.revision,
        )
        sorter.judge(entry, keep["datasets", name])
    return PrunePlan(removed=sorter.removed, kept=sorter.kept)


def _judge_models(
    sorter: _Sorter, models: Iterable[Stored[ModelVersionView]], keep: Reasons
) -> None:
    """Model versions; the run of each one that stays is its lineage, and stays too."""
    for item in models:
        model = item.value
        name = dataset_name(model.name, model.version)
        entry = Item(
            "models",
            name,
            sorter.age_s(model.created),
            folder=relative_model(model.name, model.version),
            key=item.key,
            revision=item.revision,
        )
        if not sorter.judge(entry, keep["models", name]):
            keep["runs", model.run_id].append(f"lineage of kept model {name}")


def _judge_runs(sorter: _Sorter, runs: Iterable[Stored[RunRecord]], keep: Reasons) -> None:
    """Runs; the workspace of an ended run that stays stays too."""
    for item in runs:
        run = item.value
        entry = Item(
            "runs",
            run.run_id,
            sorter.age_s(run.updated),
            folder=relative_run(run.run_id),
            key=item.key,
            revision=item.revision,
        )
        kept = not sorter.judge(entry, keep["runs", run.run_id])
        # An open run's workspace has its reason already ("used by run ...").
        if kept and run.spec.workspace is not None and run_is_open(run) is None:
            keep["workspaces", run.spec.workspace].append(f"named by kept run {run.run_id}")


def sweep_records(sweep: SweepRecord) -> tuple[tuple[str, str], ...]:
    """The sweep's records in the ``sweeps`` bucket: its trials' histories, then its own."""
    histories = tuple((SWEEPS, history_key(sweep.sweep_id, t.index)) for t in sweep.trials)
    return (*histories, (SWEEPS, sweep_key(sweep.sweep_id)))


def _judge_pipelines(
    sorter: _Sorter,
    pipelines: Iterable[Stored[PipelineRecord]],
    sweeps: Iterable[Stored[SweepRecord]],
    keep: Reasons,
) -> None:
    """Pipelines, each with its sweep's records; the workspace of a finished pipeline that
    stays stays too. A sweep whose pipeline's record is gone (expired) is judged alone, by
    its own last change."""
    swept = {item.value.sweep_id: item.value for item in sweeps}
    for item in pipelines:
        record = item.value
        sweep = swept.pop(record.pipeline_id, None)
        entry = Item(
            "pipelines",
            record.pipeline_id,
            sorter.age_s(pipeline_updated(record)),
            key=item.key,
            revision=item.revision,
            records=() if sweep is None else sweep_records(sweep),
        )
        live = record.status == "running"
        # A live pipeline's workspace has its reason already ("used by live pipeline ...").
        if not sorter.judge(entry, keep["pipelines", record.pipeline_id]) and not live:
            because = f"named by kept pipeline {record.pipeline_id}"
            for workspace in sorted(pipeline_uses(record, (), (), ())["workspaces"]):
                keep["workspaces", workspace].append(because)
    for sweep in swept.values():
        entry = Item(
            "pipelines", sweep.sweep_id, sorter.age_s(sweep.updated), records=sweep_records(sweep)
        )
        sorter.judge(entry, ["sweep still running"] if sweep.status == "running" else [])
