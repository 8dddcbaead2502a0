"""Glue: deploy and rollback requests -> gated rollouts -> deployment records and model.* events.

A rollout (:mod:`.rollouts`) gets the new version ready before it takes traffic, and the old
version keeps serving when it does not. One rollout of a model at a time across replicas.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from datetime import UTC, datetime
from typing import Any

import structlog

from torchrelay.services.serve.domain import (
    DeploymentRecord,
    previous_after,
    rollback_target,
)
from torchrelay.services.serve.rollouts import Current, RolloutFailed, Rollouts
from torchrelay.shared.bus.port import Publish
from torchrelay.shared.events import (
    ModelDeployed,
    ModelDeployRequested,
    ModelRollbackRequested,
    ModelRolloutFailed,
    ModelRolloutStarted,
    TrainCompleted,
)
from torchrelay.shared.events.data import (
    ModelDeployedData,
    ModelRolloutFailedData,
    ModelRolloutStartedData,
)
from torchrelay.shared.pipelines import PipelineRecord, pipeline_key, record_stage
from torchrelay.shared.runtime.loops import every
from torchrelay.shared.state import State, Store, key_part
from torchrelay.shared.state.presence import Presence, exclusive

log = structlog.get_logger("torchrelay.serve")
_EVENT_IDS = uuid.UUID("3e8f1a2b-6c4d-4f9e-8a7b-2c1d0e9f8a7b")


class Deployer:
    def __init__(
        self,
        *,
        rollouts: Rollouts,
        state: State,
        publish: Publish,
        presence: Presence,
        source: str,
        replicas: int,
        reclaim_every_s: float = 2.0,
    ) -> None:
        self.rollouts = rollouts
        self.deployments: Store[DeploymentRecord] = state.store("deployments", DeploymentRecord)
        self.pipelines: Store[PipelineRecord] = state.store("pipelines", PipelineRecord)
        self._publish = publish
        self._source = source
        self._replicas = replicas
        self._leases = state.leases
        self._presence = presence
        self._reclaim_every_s = reclaim_every_s

    async def on_deploy_requested(self, event: ModelDeployRequested) -> None:
        data = event.data
        await self.deploy(data.model_name, data.version, data.replicas, event.id, event.pipelineid)

    async def on_rollback_requested(self, event: ModelRollbackRequested) -> None:
        current = await self.deployments.get(key_part(event.data.model_name))
        target = rollback_target(current.value if current else None, event.data.to_version)
        if target is None:
            await self._failed(
                event.data.model_name,
                "none",
                "there is no previous version to roll back to",
                serving_version=current.value.active_version if current else None,
                cause=event.id,
                pipeline_id=event.pipelineid,
            )
            return
        replicas = current.value.replicas if current else self._replicas
        await self.deploy(event.data.model_name, target, replicas, event.id, event.pipelineid)

    async def on_train_completed(self, event: TrainCompleted) -> None:
        """A pipeline's model is trained: deploy it if the pipeline asks to."""
        if event.pipelineid is None:
            return
        pipeline = await self.pipelines.get(pipeline_key(event.pipelineid))
        if pipeline is None:
            return
        stage = pipeline.value.spec.deploy
        now = datetime.now(UTC)
        if not stage.enabled:
            await record_stage(self.pipelines, event.pipelineid, "deploy", "skipped", now)
            return
        await record_stage(self.pipelines, event.pipelineid, "deploy", "running", now)
        data = event.data
        ok, said = await self.deploy(
            data.model_name, data.model_version, stage.replicas, event.id, event.pipelineid
        )
        await record_stage(
            self.pipelines,
            event.pipelineid,
            "deploy",
            "succeeded" if ok else "failed",
            datetime.now(UTC),
            detail={"endpoint": said, "version": data.model_version} if ok else None,
            reason=None if ok else said,
        )

    async def deploy(
        self, model: str, version: str, replicas: int, cause: str, pipeline_id: str | None
    ) -> tuple[bool, str]:
        """Roll ``version`` out; (True, endpoint) or (False, reason).

        One rollout of a model at a time across all replicas (a lease). The rollouts backend
        gets the new version ready on the model's stable endpoint before the old one goes.
        """
        async with self._exclusive(model):
            current = await self.deployments.get(key_part(model))
            record = current.value if current else None
            if record is not None and record.endpoint and await self._serving_now(record, version):
                await self._deployed(model, version, record.endpoint, cause, pipeline_id)
                return True, record.endpoint  # a repeat: same answer
            previous = record.active_version if record else None
            await self._publish(
                ModelRolloutStarted(
                    id=self._id("started", cause),
                    data=ModelRolloutStartedData(
                        model_name=model, version=version, previous_version=previous
                    ),
                    **self._envelope(model, cause, pipeline_id),
                )
            )
            try:
                served = await self.rollouts.roll_out(
                    model, version, replicas, self._current(record)
                )
            except RolloutFailed as exc:
                await self._failed(
                    model,
                    version,
                    str(exc),
                    serving_version=previous,
                    cause=cause,
                    pipeline_id=pipeline_id,
                )
                return False, str(exc)
            endpoint = served.endpoint
            await self.deployments.put(
                key_part(model),
                DeploymentRecord(
                    model=model,
                    active_version=version,
                    previous_version=previous_after(record, version),
                    endpoint=endpoint,
                    replicas=replicas,
                    status="deployed",
                    owner=self._presence.instance,
                    port=served.port,
                    servers=list(served.servers),
                    updated=datetime.now(UTC),
                ),
            )
            await self._deployed(model, version, endpoint, cause, pipeline_id)
            return True, endpoint

    def _exclusive(self, model: str) -> contextlib.AbstractAsyncContextManager[None]:
        return exclusive(self._leases, f"serve.model.{key_part(model)}", self._presence.instance)

    async def _serving_now(self, record: DeploymentRecord, version: str) -> bool:
        if record.status != "deployed" or record.active_version != version:
            return False
        if not self.rollouts.owns_servers:
            return True  # the cluster keeps it running, whoever rolled it out
        return record.owner is not None and await self._presence.alive(record.owner)

    def _current(self, record: DeploymentRecord | None) -> Current:
        if record is None:
            return Current()
        return Current(
            version=record.active_version,
            replicas=record.replicas,
            port=record.port,
            servers=tuple(record.servers),
            owned_here=record.owner == self._presence.instance,
        )

    # --- models whose replica died -----------------------------------------------------------

    async def reclaim(self, stop: asyncio.Event) -> None:
        """Background loop: a deployed model whose serving replica is gone (its servers died
        with it) is served again here, same version, same port."""
        if not self.rollouts.owns_servers:
            await stop.wait()  # nothing dies with a replica: nothing to take over
            return
        await every(self._reclaim_every_s, stop, self.reclaim_orphans, name="serve.reclaim")

    async def reclaim_orphans(self) -> list[str]:
        """One round of :meth:`reclaim`; returns the models this replica took over."""
        taken = []
        for item in await self.deployments.items():
            if not await self._orphaned(item.value):
                continue
            async with self._exclusive(item.value.model):
                current = await self.deployments.get(item.key)
                if current is None or not await self._orphaned(current.value):
                    continue  # another replica took it over (or rolled out) meanwhile
                await self._serve_again(current.value)
                taken.append(current.value.model)
        return taken

    async def _orphaned(self, record: DeploymentRecord) -> bool:
        return (
            record.status == "deployed"
            and record.owner not in (None, self._presence.instance)
            and not await self._presence.alive(record.owner)
        )

    async def _serve_again(self, record: DeploymentRecord) -> None:
        model, version = record.model, str(record.active_version)
        log.warning("model.orphaned", model=model, version=version, owner=record.owner)
        try:
            served = await self.rollouts.serve_again(
                model, version, record.replicas, self._current(record)
            )
        except RolloutFailed as exc:
            log.warning("model.reclaim_failed", model=model, version=version, reason=str(exc))
            update: dict[str, Any] = {"status": "failed", "reason": str(exc)[:512], "servers": []}
        else:
            log.info("model.reclaimed", model=model, version=version, endpoint=served.endpoint)
            update = {"servers": list(served.servers), "endpoint": served.endpoint}
        await self.deployments.put(
            key_part(model),
            record.model_copy(
                update={**update, "owner": self._presence.instance, "updated": datetime.now(UTC)}
            ),
        )

    async def _deployed(
        self, model: str, version: str, endpoint: str, cause: str, pipeline_id: str | None
    ) -> None:
        log.info("model.deployed", model=model, version=version, endpoint=endpoint)
        await self._publish(
            ModelDeployed(
                id=self._id(f"deployed:{version}", cause),
                data=ModelDeployedData(model_name=model, version=version, endpoint=endpoint),
                **self._envelope(model, cause, pipeline_id),
            )
        )

    async def _failed(
        self,
        model: str,
        version: str,
        reason: str,
        *,
        serving_version: str | None,
        cause: str,
        pipeline_id: str | None,
    ) -> None:
        log.warning("model.rollout_failed", model=model, version=version, reason=reason)
        await self._publish(
            ModelRolloutFailed(
                id=self._id(f"failed:{version}", cause),
                data=ModelRolloutFailedData(
                    model_name=model,
                    version=version,
                    reason=reason[:512],
                    serving_version=serving_version,
                ),
                **self._envelope(model, cause, pipeline_id),
            )
        )

    def _id(self, kind: str, cause: str) -> str:
        return str(uuid.uuid5(_EVENT_IDS, f"{kind}:{cause}"))

    def _envelope(self, model: str, cause: str, pipeline_id: str | None) -> dict[str, str | None]:
        return {
            "source": self._source,
            "subject": model,
            "pipelineid": pipeline_id,
            "causationid": cause,
        }

    async def endpoint_of(self, model: str) -> str | None:
        """The stable endpoint of a deployed model (whichever replica serves it), or None."""
        current = await self.deployments.get(key_part(model))
        if current is None or current.value.status != "deployed":
            return None
        return current.value.endpoint

    async def aclose(self) -> None:
        await self.rollouts.aclose()
