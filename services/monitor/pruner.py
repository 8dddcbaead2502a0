"""Glue: ``platform.prune.requested`` -> inventory -> plan -> removals -> ``platform.pruned``.

The monitor is the operation service: it mounts the shared storage read-write and may delete
records in every bucket. The plan is :func:`~torchrelay.services.monitor.pruning.plan`'s; here
are only the reads, the removals and the event that says what happened.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

import structlog
from pydantic import BaseModel

from torchrelay.services.monitor.pruning import (
    DatasetVersionView,
    DeploymentView,
    Inventory,
    Item,
    ModelVersionView,
    Stored,
    Workspace,
    plan,
)
from torchrelay.shared.bus.port import Publish
from torchrelay.shared.errors import StaleRevision, UnsafePath
from torchrelay.shared.events import AnyEvent, Pruned
from torchrelay.shared.events.data import PrunedData, PrunedItem, PruneRequestedData
from torchrelay.shared.pipelines import PipelineRecord
from torchrelay.shared.runs import RunRecord
from torchrelay.shared.state import CorruptState, State
from torchrelay.shared.storage import Layout, resolve_within
from torchrelay.shared.storage.layout import MANIFEST_FILE
from torchrelay.shared.sweep_state import SWEEP_PREFIX, SWEEPS, SweepRecord

log = structlog.get_logger("torchrelay.monitor")
_IDS = uuid.UUID("5d3c8e21-4f6a-4b7c-9d8e-1a2b3c4d5e6f")
DATASET_VERSIONS = "versions"
"""The prefix of dataset-version keys in the ``datasets`` bucket (ingest's)."""
_WORKSPACE_ID = re.compile(r"^[0-9a-f]{16}$")
"""A staged workspace's folder name; anything else under ``workspaces/`` (a folder being
written aside) is not the prune's."""
M = TypeVar("M", bound=BaseModel)


def pruned_event_id(request_id: str) -> str:
    """The id of the answer to a request: the same on every delivery, so a redelivered request
    is answered once (the stream's duplicate window)."""
    return str(uuid.uuid5(_IDS, f"pruned:{request_id}"))


class Pruner:
    def __init__(self, *, state: State, layout: Layout, publish: Publish, source: str) -> None:
        self._state = state
        self._layout = layout
        self._publish = publish
        self._source = source

    async def on_request(self, event: AnyEvent) -> None:
        data: PruneRequestedData = event.data
        now = datetime.now(UTC)
        inventory, unreadable = await self.inventory()
        problems = list(unreadable)
        removed: list[Item] = []
        kept: list[Item] = []
        freed = 0
        if unreadable:
            # What an unreadable record keeps cannot be told: remove nothing.
            problems.append("nothing was removed: fix or delete the unreadable records first")
        else:
            chosen = plan(now, data.older_than_s, inventory, kinds=set(data.kinds))
            kept = chosen.kept
            for item in chosen.removed:
                size, problem = await self._remove(item, dry_run=data.dry_run)
                if problem is None:
                    removed.append(item)
                    freed += size
                else:
                    problems.append(problem)
        log.info(
            "prune.done",
            request_id=event.id,
            dry_run=data.dry_run,
            removed=len(removed),
            kept=len(kept),
            bytes_freed=freed,
            problems=len(problems),
        )
        await self._publish(
            Pruned(
                id=pruned_event_id(event.id),
                source=self._source,
                causationid=event.id,
                data=PrunedData(
                    request_id=event.id,
                    dry_run=data.dry_run,
                    older_than_s=data.older_than_s,
                    removed=[_described(item) for item in removed],
                    kept=[_described(item) for item in kept],
                    bytes_freed=freed,
                    problems=[p[:512] for p in problems],
                ),
            )
        )

    async def inventory(self) -> tuple[Inventory, list[str]]:
        """The records and workspaces a plan needs, and a line for each record that does not
        parse."""
        unreadable: list[str] = []
        inventory = Inventory(
            pipelines=await self._records("pipelines", PipelineRecord, unreadable),
            runs=await self._records("runs", RunRecord, unreadable),
            models=await self._records("models", ModelVersionView, unreadable),
            deployments=[
                item.value
                for item in await self._records("deployments", DeploymentView, unreadable)
            ],
            datasets=await self._records(
                "datasets", DatasetVersionView, unreadable, prefix=DATASET_VERSIONS
            ),
            workspaces=await asyncio.to_thread(_workspaces, self._layout.workspaces()),
            sweeps=await self._records(SWEEPS, SweepRecord, unreadable, prefix=SWEEP_PREFIX),
        )
        return inventory, unreadable

    async def _records(
        self, bucket: str, model: type[M], unreadable: list[str], *, prefix: str = ""
    ) -> list[Stored[M]]:
        store = self._state.store(bucket, model)
        found: list[Stored[M]] = []
        for key in await store.keys(prefix):
            try:
                item = await store.get(key)
            except CorruptState as exc:
                unreadable.append(str(exc))
                continue
            if item is not None:  # gone since it was listed
                found.append(Stored(item.key, item.revision, item.value))
        return found

    async def _remove(self, item: Item, *, dry_run: bool) -> tuple[int, str | None]:
        """Remove the item's folder, then its record (only if it is still as planned): the
        bytes that freed (dry run: would free), or why it stays."""
        path: Path | None = None
        if item.folder is not None:
            try:
                # Refuses a folder that is (or leads through) a link out of the storage root.
                resolve_within(self._layout.root, item.folder)
                path = self._layout.at(item.folder)
            except UnsafePath as exc:
                return 0, f"{item.kind} {item.name}: {exc}"
        size = 0 if path is None else await asyncio.to_thread(folder_bytes, path)
        if dry_run:
            return size, None
        if path is not None:
            try:
                await asyncio.to_thread(_remove_folder, path)
            except OSError as exc:
                return 0, f"{item.kind} {item.name}: could not remove {item.folder}: {exc}"
        for bucket, key in item.records:  # before its own record: see Item.records
            await self._state.store(bucket, _Any).delete(key)
        if item.key is not None:
            try:  # each kind with a record has the bucket of its name
                await self._state.store(item.kind, _Any).delete(item.key, revision=item.revision)
            except StaleRevision:
                return size, (
                    f"{item.kind} {item.name}: its record changed while pruning, so the record "
                    "stays (the next prune looks at it again)"
                )
        return size, None


class _Any(BaseModel):
    """Deleting needs no model; a store needs one."""


def _described(item: Item) -> PrunedItem:
    return PrunedItem(kind=item.kind, name=item.name, age_s=item.age_s, reason=item.reason)


def folder_bytes(path: Path) -> int:
    """The bytes of the files under ``path`` (links not followed; 0 when it is not there)."""
    total = 0
    for folder, _, files in os.walk(path):
        for name in files:
            try:
                total += (Path(folder) / name).lstat().st_size
            except OSError:
                continue
    return total


def _remove_folder(path: Path) -> None:
    if path.is_symlink() or not path.exists():
        path.unlink(missing_ok=True)  # a link: only the link goes, never what it points to
        return
    shutil.rmtree(path)


def _workspaces(folder: Path) -> Sequence[Workspace]:
    """The staged workspaces under ``folder``, each with its last write (its manifest's)."""
    if not folder.is_dir():
        return []
    found = []
    for entry in sorted(folder.iterdir()):
        if not _WORKSPACE_ID.fullmatch(entry.name) or not entry.is_dir() or entry.is_symlink():
            continue
        manifest = entry / MANIFEST_FILE
        stat = manifest.stat() if manifest.exists() else entry.stat()
        found.append(Workspace(entry.name, datetime.fromtimestamp(stat.st_mtime, UTC)))
    return found
