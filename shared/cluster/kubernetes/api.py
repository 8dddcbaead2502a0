"""The one module that talks to the Kubernetes API server (kubernetes-asyncio).

Objects travel as plain dicts (``_preload_content=False``; the JSON is read here), so the pure
modules never see client model classes. Errors become torchrelay's: 403 and 422
:class:`Refused` (permanent: a role or a manifest to fix), 404 ``None`` or a no-op, 409
:class:`AlreadyExists`, 410 :class:`Gone` (a watch must relist), anything else transient.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import structlog
from kubernetes_asyncio import client, config
from kubernetes_asyncio.client.exceptions import ApiException

from torchrelay.shared.cluster.kubernetes.options import KubeOptions
from torchrelay.shared.errors import AlreadyExists, PermanentError, TransientError

log = structlog.get_logger("torchrelay.cluster.kubernetes")
Object = dict[str, Any]


class Refused(PermanentError):
    """The API server refused (forbidden by RBAC, or an invalid object)."""


class Gone(TransientError):
    """A watch's resourceVersion is too old: list again."""


@dataclass(frozen=True)
class Kind:
    api: str  # "core", "batch" or "apps"
    plural: str
    method: str  # the client's snake-case name, e.g. "namespaced_job"


KINDS = {
    "Job": Kind("batch", "jobs", "namespaced_job"),
    "Pod": Kind("core", "pods", "namespaced_pod"),
    "Service": Kind("core", "services", "namespaced_service"),
    "Deployment": Kind("apps", "deployments", "namespaced_deployment"),
    "ReplicaSet": Kind("apps", "replicasets", "namespaced_replica_set"),
}


async def connect(options: KubeOptions) -> KubeApi:
    """The API of ``options.namespace``: at ``api_url`` as given, else with in-cluster
    credentials, else with a kubeconfig."""
    configuration = client.Configuration()
    if options.api_url:
        configuration.host = options.api_url
    elif "KUBERNETES_SERVICE_HOST" in os.environ and options.kubeconfig is None:
        config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
    else:
        await config.load_kube_config(
            config_file=str(options.kubeconfig) if options.kubeconfig else None,
            client_configuration=configuration,
        )
    return KubeApi(client.ApiClient(configuration), options.namespace)


class KubeApi:
    """Create, read, delete, list and watch namespaced objects as dicts."""

    def __init__(self, api_client: client.ApiClient, namespace: str) -> None:
        self.client = api_client
        self.namespace = namespace
        self._apis = {
            "core": client.CoreV1Api(api_client),
            "batch": client.BatchV1Api(api_client),
            "apps": client.AppsV1Api(api_client),
        }

    def _call(self, verb: str, kind: str) -> Callable[..., Awaitable[Any]]:
        spec = KINDS[kind]
        method: Callable[..., Awaitable[Any]] = getattr(
            self._apis[spec.api], f"{verb}_{spec.method}"
        )
        return method

    async def _request(self, verb: str, kind: str, *args: Any, **kwargs: Any) -> Object:
        what = f"{verb} {KINDS[kind].plural}"
        try:
            response = await self._call(verb, kind)(*args, _preload_content=False, **kwargs)
        except ApiException as exc:  # raised before a response exists (a connection error)
            raise TransientError(f"cannot {what}: {exc.reason}") from exc
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise TransientError(f"cannot reach the Kubernetes API to {what}: {exc!r}") from exc
        async with response:
            text = await response.text()
            status = response.status
        body: Object = json.loads(text) if text.strip().startswith("{") else {"message": text}
        if status < 300:
            return body
        message = body.get("message") or text[:300]
        if status in (401, 403):
            raise Refused(
                f"the Kubernetes API refused to {what} in namespace {self.namespace} "
                f"(HTTP {status}): {message}"
            )
        if status == 409:
            raise AlreadyExists(f"{KINDS[kind].plural} in {self.namespace}", message)
        if status == 410:
            raise Gone(message)
        if status == 422:
            raise Refused(f"the Kubernetes API found the object invalid ({what}): {message}")
        if status == 404:
            raise LookupError(message)
        raise TransientError(f"cannot {what}: HTTP {status}: {message}")

    async def create(self, kind: str, body: Object) -> Object:
        return await self._request("create", kind, self.namespace, body)

    async def get(self, kind: str, name: str) -> Object | None:
        try:
            return await self._request("read", kind, name, self.namespace)
        except LookupError:
            return None

    async def replace(self, kind: str, name: str, body: Object) -> Object:
        return await self._request("replace", kind, name, self.namespace, body)

    async def delete(self, kind: str, name: str) -> None:
        """Delete with its dependents (foreground); an object already gone is fine."""
        options = {"propagationPolicy": "Foreground"}
        with contextlib.suppress(LookupError):
            await self._request("delete", kind, name, self.namespace, body=options)

    async def list(self, kind: str, selector: str) -> tuple[list[Object], str]:
        """The objects matching a label selector, and the list's resourceVersion."""
        listed = await self._request("list", kind, self.namespace, label_selector=selector)
        return list(listed.get("items") or []), str(listed["metadata"]["resourceVersion"])

    async def watch(
        self, kind: str, selector: str, resource_version: str, timeout_s: int
    ) -> AsyncIterator[Object]:
        """Events after ``resource_version`` until the server ends the watch (its timeout, or
        the connection drops); :class:`Gone` when that version is too old."""
        what = f"watch {KINDS[kind].plural}"
        try:
            response = await self._call("list", kind)(
                self.namespace,
                label_selector=selector,
                watch=True,
                resource_version=resource_version,
                allow_watch_bookmarks=True,
                timeout_seconds=timeout_s,
                _preload_content=False,
            )
        except (ApiException, aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise TransientError(f"cannot {what}: {exc!r}") from exc
        async with response:
            if response.status >= 300:
                text = await response.text()
                if response.status == 410:
                    raise Gone(text)
                if response.status in (401, 403):
                    raise Refused(f"the Kubernetes API refused to {what}: {text[:300]}")
                raise TransientError(f"cannot {what}: HTTP {response.status}: {text[:300]}")
            try:
                async for line in response.content:
                    if not line.strip():
                        continue
                    event: Object = json.loads(line)
                    if event.get("type") == "ERROR":
                        status = event.get("object") or {}
                        if status.get("code") == 410:
                            raise Gone(status.get("message", "resourceVersion too old"))
                        raise TransientError(f"{what}: {status.get('message', status)}")
                    yield event
            except (aiohttp.ClientError, asyncio.IncompleteReadError) as exc:
                log.info("watch.dropped", kind=kind, error=repr(exc))


class Mirror:
    """A local copy of the objects matching a selector, kept current by list + watch: it
    resumes from the last resourceVersion when a watch ends or drops, and lists again from
    scratch when the server answers 410 Gone."""

    def __init__(self, api: KubeApi, kind: str, selector: str, *, timeout_s: int) -> None:
        self.api = api
        self.kind = kind
        self.selector = selector
        self.timeout_s = timeout_s
        self.objects: dict[str, Object] = {}
        self.relists = 0

    async def follow(self) -> AsyncIterator[None]:
        """Yield after every change (and after each list); runs until cancelled."""
        version: str | None = None
        while True:
            if version is None:
                items, version = await self.api.list(self.kind, self.selector)
                self.objects = {item["metadata"]["name"]: item for item in items}
                self.relists += 1
                yield
            try:
                async for event in self.api.watch(
                    self.kind, self.selector, version, self.timeout_s
                ):
                    obj = event["object"]
                    version = str(obj["metadata"]["resourceVersion"])
                    if event["type"] == "BOOKMARK":
                        continue
                    name = obj["metadata"]["name"]
                    if event["type"] == "DELETED":
                        self.objects.pop(name, None)
                    else:
                        self.objects[name] = obj
                    yield
            except Gone:
                log.info("watch.gone", kind=self.kind, selector=self.selector)
                version = None
            except TransientError as exc:
                log.warning("watch.failed", kind=self.kind, error=str(exc))
                await asyncio.sleep(1.0)
