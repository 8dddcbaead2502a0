"""Glue: deploy, rollback and undeploy requests -> gated rollouts (or a model taken down) ->
deployment records and model.* events.

A rollout starts the version on the serving backend, waits until its servers are ready, checks
them with a smoke inference on the model's declared signature, and only then puts them on the
model's stable endpoint; a version that fails any step is cancelled and the old one keeps
serving. A version with the serving one's signature and architecture is swapped in place
instead: the running servers load it, pass the same smoke inference on it, and switch to it
between two batches (no process start; any refusal falls back to a full rollout). One rollout
of a model at a time across replicas (a lease). A pipeline's deploy stage
may carry a promotion gate: it is judged inside that lease, against what serves at that moment,
and a model that fails it is not rolled out at all. An undeploy takes the same lease, so it never
races a rollout of its model.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import aiohttp
import structlog
from prometheus_client import CollectorRegistry, Counter
from pydantic import JsonValue

from torchrelay.services.serve.domain import (
    DeploymentRecord,
    GateVerdict,
    is_orphaned,
    judge_gate,
    previous_after,
    repeat_endpoint,
    rollback_target,
    smoke_ok,
    smoke_request,
    swap_refusal,
    undeploy_target,
    undeployed,
)
from torchrelay.shared.bus.port import Publish
from torchrelay.shared.cluster import ModelVersion, NotReady, Phase, ServingBackend
from torchrelay.shared.events import (
    ModelDeployed,
    ModelDeployRequested,
    ModelRollbackRequested,
    ModelRolloutFailed,
    ModelRolloutStarted,
    ModelUndeployed,
    ModelUndeployRequested,
    SweepCompleted,
    TrainCompleted,
)
from torchrelay.shared.events.data import (
    ModelDeployedData,
    ModelRolloutFailedData,
    ModelRolloutStartedData,
    ModelUndeployedData,
    PromotionGate,
)
from torchrelay.shared.pipelines import (
    FINISHED,
    PipelineRecord,
    StageState,
    pipeline_key,
    record_stage,
)
from torchrelay.shared.runtime.loops import every
from torchrelay.shared.state import State, Store, key_part
from torchrelay.shared.state.presence import Presence, exclusive
from torchrelay.shared.storage.files import ModelDescription
from torchrelay.shared.storage.layout import Layout

log = structlog.get_logger("torchrelay.serve")
_EVENT_IDS = uuid.UUID("3e8f1a2b-6c4d-4f9e-8a7b-2c1d0e9f8a7b")


class RolloutFailed(Exception):
    """The version did not become ready or failed its smoke inference; the old one, if any,
    keeps serving."""


@runtime_checkable
class SwapsInPlace(Protocol):
    """A serving backend whose running servers can take a new version in place (the local
    one; Kubernetes rolls its Deployment instead)."""

    async def stage(self, handle: str, version: str) -> list[str]: ...
    async def switch(self, handle: str, version: str) -> str: ...
    async def unstage(self, handle: str) -> None: ...


class ServeMetrics:
    """The serve service's own metrics (the runtime adds the bus's and lifecycle's)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.gate_refusals = Counter(
            "torchrelay_serve_gate_refusals_total",
            "Trained models that failed their pipeline's promotion gate and were not rolled "
            "out (the serving version stayed), by model.",
            ["model"],
            registry=registry,
        )


@dataclass(frozen=True)
class Gated:
    """A pipeline's promotion gate and what its trained model reports."""

    gate: PromotionGate
    metrics: Mapping[str, float]


@dataclass(frozen=True)
class Rollout:
    """How a deploy ended: ``deployed`` (``said`` is the endpoint), ``failed`` (the reason) or
    ``refused`` by its gate (the refusal); ``verdict`` is the gate's, when there was one."""

    outcome: Literal["deployed", "failed", "refused"]
    said: str
    verdict: GateVerdict | None = None


_STAGE_OF: dict[str, StageState] = {
    "deployed": "succeeded",
    "failed": "failed",
    "refused": "skipped",
}
"""A pipeline's deploy stage after its rollout: a model its gate refused is skipped."""


class Deployer:
    def __init__(
        self,
        *,
        backend: ServingBackend[Any],
        storage_root: Path,
        smoke_timeout_s: float,
        state: State,
        publish: Publish,
        presence: Presence,
        source: str,
        replicas: int,
        retain_s: float | None = None,
        reclaim_every_s: float = 2.0,
        metrics: ServeMetrics | None = None,
        swap_in_place: bool = True,
    ) -> None:
        self.backend = backend
        self._swap_in_place = swap_in_place
        self._layout = Layout(storage_root)
        self._smoke_timeout_s = smoke_timeout_s
        self.deployments: Store[DeploymentRecord] = state.store("deployments", DeploymentRecord)
        self.pipelines: Store[PipelineRecord] = state.store("pipelines", PipelineRecord)
        self._publish = publish
        self._source = source
        self._replicas = replicas
        self._leases = state.leases
        self._presence = presence
        self._reclaim_every_s = reclaim_every_s
        self._retain_s = retain_s
        """How long a finished pipeline's record is kept (None: for good)."""
        self._deployed_models = self.deployments.live(lambda record: record.status == "deployed")
        """The deployed models, followed by a KV watch: what reclaim looks at."""
        self.metrics = metrics or ServeMetrics(CollectorRegistry())
        """The service passes its registry's; without one they are kept but not exported."""

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

    async def on_undeploy_requested(self, event: ModelUndeployRequested) -> None:
        """Take a model down: every server of it and its endpoint, then the record says
        ``undeployed`` and model.undeployed says which version and endpoint went away. A model
        that is not deployed (never was, or is down already: a redelivery) changes nothing."""
        model, reason = event.data.model_name, event.data.reason
        async with self._exclusive(model):
            current = await self.deployments.get(key_part(model))
            record = current.value if current else None
            version = undeploy_target(record)
            if record is None or version is None:
                log.info(
                    "model.undeploy_ignored",
                    model=model,
                    reason="not deployed" if record is None else f"status {record.status}",
                )
                return
            await self.backend.undeploy(model, record.handle)
            await self.deployments.put(
                key_part(model), undeployed(record, reason, datetime.now(UTC))
            )
            log.info("model.undeployed", model=model, version=version, endpoint=record.endpoint)
            await self._publish(
                ModelUndeployed(
                    id=self._id("undeployed", event.id),
                    data=ModelUndeployedData(
                        model_name=model, version=version, endpoint=record.endpoint, reason=reason
                    ),
                    **self._envelope(model, event.id, event.pipelineid),
                )
            )

    async def on_trained(self, event: TrainCompleted | SweepCompleted) -> None:
        """A pipeline's model is trained (its run, or the best trial of its sweep): deploy it
        if the pipeline asks to, and if it passes the pipeline's promotion gate (a refused
        model ends the deploy stage skipped). A sweep's trials are not deployed one by one,
        and a sweep with no completed trial ended the pipeline at its train stage."""
        if event.pipelineid is None:
            return
        pipeline = await self.pipelines.get(pipeline_key(event.pipelineid))
        if pipeline is None or pipeline.value.stages["deploy"].status in FINISHED:
            return  # a redelivery after the stage ended: its outcome stands, nothing to redo
        if isinstance(event, TrainCompleted) == (pipeline.value.spec.sweep is not None):
            return  # a sweep's trial, or a sweep event of a pipeline with none
        data = event.data
        if data.model_version is None:
            return  # no trial completed: the sweep ended the pipeline at its train stage
        await self._deploy_trained(
            pipeline.value,
            model=data.model_name,
            version=data.model_version,
            metrics=data.metrics,
            cause=event.id,
        )

    async def _deploy_trained(
        self,
        pipeline: PipelineRecord,
        *,
        model: str,
        version: str,
        metrics: dict[str, float],
        cause: str,
    ) -> None:
        pipeline_id = pipeline.pipeline_id
        stage = pipeline.spec.deploy
        now = datetime.now(UTC)
        if not stage.enabled:
            await record_stage(
                self.pipelines, pipeline_id, "deploy", "skipped", now, retain_s=self._retain_s
            )
            return
        await record_stage(self.pipelines, pipeline_id, "deploy", "running", now)
        gated = None if stage.gate is None else Gated(stage.gate, metrics)
        rollout = await self.deploy(model, version, stage.replicas, cause, pipeline_id, gated=gated)
        detail: dict[str, JsonValue] = {"version": version}
        if rollout.verdict is not None:
            detail.update(rollout.verdict.detail)
        if rollout.outcome == "deployed":
            detail["endpoint"] = rollout.said
        await record_stage(
            self.pipelines,
            pipeline_id,
            "deploy",
            _STAGE_OF[rollout.outcome],
            datetime.now(UTC),
            detail=detail,
            reason=None if rollout.outcome == "deployed" else rollout.said,
            retain_s=self._retain_s,
        )
        if rollout.outcome == "refused":
            # Counted once the stage records it: a redelivery finds the stage ended and returns.
            self.metrics.gate_refusals.labels(model).inc()

    async def deploy(
        self,
        model: str,
        version: str,
        replicas: int,
        cause: str,
        pipeline_id: str | None,
        *,
        gated: Gated | None = None,
    ) -> Rollout:
        """Roll ``version`` out, if it passes ``gated``'s gate against what serves now.

        One rollout of a model at a time across all replicas (a lease). The gate is judged
        inside it, so two candidates of one model are never both judged against the same old
        version. The new version is ready and checked on the backend before it takes the
        model's stable endpoint.
        """
        async with self._exclusive(model):
            current = await self.deployments.get(key_part(model))
            record = current.value if current else None
            verdict = None
            if gated is not None:
                verdict = await self._judge(model, version, gated, record)
                if verdict.refusal is not None:
                    log.info("model.gate_refused", model=model, version=version, **verdict.detail)
                    return Rollout("refused", verdict.refusal, verdict)
                log.info("model.gate_passed", model=model, version=version, **verdict.detail)
            repeat = repeat_endpoint(record, version, serving=await self._serving(record))
            if repeat is not None:
                await self._deployed(model, version, repeat, cause, pipeline_id)
                return Rollout("deployed", repeat, verdict)  # a repeat: same answer
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
            work = ModelVersion(
                model=model,
                version=version,
                replicas=replicas,
                replacing=record.handle if record else None,
            )
            try:
                swapped = await self._swap(work, record)
                handle, endpoint = swapped or await self._roll_out(work)
            except RolloutFailed as exc:
                await self._failed(
                    model,
                    version,
                    str(exc),
                    serving_version=previous,
                    cause=cause,
                    pipeline_id=pipeline_id,
                )
                return Rollout("failed", str(exc), verdict)
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
                    handle=handle,
                    updated=datetime.now(UTC),
                ),
            )
            await self._deployed(model, version, endpoint, cause, pipeline_id)
            return Rollout("deployed", endpoint, verdict)

    async def _judge(
        self, model: str, version: str, gated: Gated, record: DeploymentRecord | None
    ) -> GateVerdict:
        """The gate's verdict on ``version`` against the version ``record`` says serves (its
        metrics from its model.json)."""
        serving = record.active_version if record and record.status == "deployed" else None
        metrics: dict[str, float] | None = None
        if serving is not None:
            try:
                metrics = (await asyncio.to_thread(self._description_of, model, serving)).metrics
            except (OSError, ValueError) as exc:  # CorruptFile (MissingFile too) is a ValueError
                log.warning(
                    "model.serving_metrics_unreadable", model=model, version=serving, error=str(exc)
                )
        return judge_gate(gated.gate, version, gated.metrics, serving, metrics)

    async def _roll_out(self, work: ModelVersion) -> tuple[str, str]:
        """Schedule, wait until ready, smoke-check, promote: (handle, endpoint), or
        :class:`RolloutFailed` with nothing of the version left running."""
        description = await asyncio.to_thread(self._description, work.model, work.version)
        self.backend.check(work)
        try:
            handle = await self.backend.schedule(self.backend.dryrun(work))
        except NotReady as exc:
            raise RolloutFailed(str(exc)) from exc
        try:
            urls = await self.backend.ready(handle)  # cancels the version itself if it is not
            await self._smoke(work, urls, description)
            endpoint = await self.backend.promote(handle)
        except NotReady as exc:
            raise RolloutFailed(str(exc)) from exc
        except BaseException:
            with contextlib.suppress(Exception):
                await self.backend.cancel(handle)
            raise
        return handle, endpoint

    async def _swap(
        self, work: ModelVersion, record: DeploymentRecord | None
    ) -> tuple[str, str] | None:
        """Replace the serving version in place: stage ``work``'s version on its servers,
        smoke-check it there, switch. (handle, endpoint), the handle unchanged; None when it
        cannot be swapped (a full rollout follows); :class:`RolloutFailed` when it fails its
        smoke inference, with the old version still serving and nothing left staged."""
        backend = self.backend
        if (
            not self._swap_in_place
            or not isinstance(backend, SwapsInPlace)
            or record is None
            or record.status != "deployed"
            or record.handle is None
            or record.active_version is None
            or record.replicas != work.replicas
        ):
            return None
        description = await asyncio.to_thread(self._description, work.model, work.version)
        try:
            serving = await asyncio.to_thread(
                self._description_of, work.model, record.active_version
            )
        except (OSError, ValueError):
            return None
        handle = record.handle
        why_not = swap_refusal(serving, description)
        if why_not is None:
            try:
                urls = await backend.stage(handle, work.version)
            except NotReady as exc:
                why_not = str(exc)
        if why_not is not None:
            log.info("model.full_rollout", model=work.model, version=work.version, reason=why_not)
            return None
        try:
            await self._smoke(work, urls, description)
        except BaseException:
            with contextlib.suppress(Exception):
                await backend.unstage(handle)
            raise
        try:
            endpoint = await backend.switch(handle, work.version)
        except NotReady as exc:  # some servers may have switched: a full rollout replaces all
            log.warning("model.swap_failed", model=work.model, version=work.version, error=str(exc))
            return None
        log.info("model.swapped", model=work.model, version=work.version, previous=serving.version)
        return handle, endpoint

    def _description_of(self, model: str, version: str) -> ModelDescription:
        return ModelDescription.read(self._layout.model_description(model, version))

    def _description(self, model: str, version: str) -> ModelDescription:
        try:
            return self._description_of(model, version)
        except (OSError, ValueError) as exc:  # CorruptFile (MissingFile too) is a ValueError
            raise RolloutFailed(f"no model {model} version {version} on storage ({exc})") from exc

    async def _smoke(
        self, work: ModelVersion, urls: list[str], description: ModelDescription
    ) -> None:
        """One inference on the declared input signature, on every server of the version."""
        if not urls:
            raise RolloutFailed(f"version {work.version} is ready but no server of it is reachable")
        request = smoke_request(description)
        path = f"/v2/models/{work.model}/versions/{work.version}/infer"
        timeout = aiohttp.ClientTimeout(total=self._smoke_timeout_s)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            for url in urls:
                try:
                    async with http.post(f"{url}{path}", json=request) as response:
                        answer = await response.json(content_type=None)
                        status = response.status
                except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                    raise RolloutFailed(f"the smoke inference failed: {exc!r}") from exc
                if status != 200:
                    raise RolloutFailed(f"the smoke inference answered HTTP {status}: {answer}")
                if (problem := smoke_ok(description, answer)) is not None:
                    raise RolloutFailed(problem)

    def _exclusive(self, model: str) -> contextlib.AbstractAsyncContextManager[None]:
        return exclusive(self._leases, f"serve.model.{key_part(model)}", self._presence.instance)

    async def _serving(self, record: DeploymentRecord | None) -> bool:
        """Whether the record's version still serves, as the backend describes its handle."""
        if record is None or record.handle is None or record.status != "deployed":
            return False
        described = await self.backend.describe(record.handle)
        return described is not None and described.phase is Phase.RUNNING

    # --- models whose replica died -----------------------------------------------------------

    async def reclaim(self, stop: asyncio.Event) -> None:
        """Background loop: a deployed model whose serving replica is gone is adopted here
        (its servers outlive replicas) or served again (they died with it), same endpoint."""
        async with self._deployed_models:
            await every(self._reclaim_every_s, stop, self.reclaim_orphans, name="serve.reclaim")

    async def reclaim_orphans(self) -> list[str]:
        """One round of :meth:`reclaim`; returns the models this replica took over."""
        taken = []
        # One presence read per owner and round, not per model: a replica serving 1,000
        # models was asked about 1,000 times every round (the idle CPU of a large fleet).
        alive: dict[str, bool] = {}
        for item in self._deployed_models.items():
            if not await self._orphaned(item.value, alive):
                continue
            async with self._exclusive(item.value.model):
                current = await self.deployments.get(item.key)
                if current is None or not await self._orphaned(current.value):
                    continue  # another replica took it over (or rolled out) meanwhile
                await self._take_over(current.value)
                taken.append(current.value.model)
        return taken

    async def _orphaned(
        self, record: DeploymentRecord, known: dict[str, bool] | None = None
    ) -> bool:
        """Whether ``record``'s owner is gone; ``known``: owners already asked about this
        round (filled in here), None to ask afresh."""
        if record.status != "deployed" or record.owner in (None, self._presence.instance):
            return False
        owner = str(record.owner)
        if known is None:
            alive = await self._presence.alive(owner)
        elif (alive_known := known.get(owner)) is None:
            alive = known[owner] = await self._presence.alive(owner)
        else:
            alive = alive_known
        return is_orphaned(record, me=self._presence.instance, owner_alive=alive)

    async def _take_over(self, record: DeploymentRecord) -> None:
        model, version = record.model, str(record.active_version)
        work = ModelVersion(
            model=model, version=version, replicas=record.replicas, replacing=record.handle
        )
        update: dict[str, Any]
        handle = await self.backend.adopt(self.backend.dryrun(work))
        if handle is not None:
            log.info("model.adopted", model=model, version=version, owner=record.owner)
            update = {"handle": handle}
        else:
            log.warning("model.orphaned", model=model, version=version, owner=record.owner)
            try:
                handle, endpoint = await self._roll_out(work)
            except RolloutFailed as exc:
                log.warning("model.reclaim_failed", model=model, version=version, reason=str(exc))
                update = {"status": "failed", "reason": str(exc)[:512], "handle": None}
            else:
                log.info("model.reclaimed", model=model, version=version, endpoint=endpoint)
                update = {"handle": handle, "endpoint": endpoint}
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
        await self.backend.aclose()
