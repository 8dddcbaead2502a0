"""The one module that talks to the Kubernetes API server (kubernetes-asyncio).

Objects travel as plain dicts (``_preload_content=False``; the JSON is read here), so the pure
modules never see client model classes. Every request has a connect and a total timeout, and
a watch one of silence (its server-side length plus a margin): a half-open connection (a node
or proxy gone without a FIN) fails the call, or drops the watch to be resumed, instead of
hanging it for good. Errors become torchrelay's: 403 and 422
:class:`Refused` (permanent: a role or a manifest to fix), 404 ``None`` or a no-op, 409
:class:`AlreadyExists`, 410 :class:`Gone` (a watch must relist), anything else transient.
"""

from __future__ import annotations

import asyncio
import builtins
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
    "Event": Kind("core", "events", "namespaced_event"),
    "PodLog": Kind("core", "pods/log", "namespaced_pod_log"),
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
    return KubeApi(
        client.ApiClient(configuration),
        options.namespace,
        connect_timeout_s=options.connect_timeout_s,
        request_timeout_s=options.request_timeout_s,
        watch_margin_s=options.watch_margin_s,
    )


class KubeApi:
    """Create, read, delete, list and watch namespaced objects as dicts."""

    def __init__(
        self,
        api_client: client.ApiClient,
        namespace: str,
        *,
        connect_timeout_s: float = 10.0,
        request_timeout_s: float = 30.0,
        watch_margin_s: float = 30.0,
    ) -> None:
        self.client = api_client
        self.namespace = namespace
        self.connect_timeout_s = connect_timeout_s
        self.request_timeout_s = request_timeout_s
        self.watch_margin_s = watch_margin_s
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

    def _timeout(self, read_s: float | None = None) -> aiohttp.ClientTimeout:
        """A request's: connecting, and the whole call. A watch's (``read_s``): connecting,
        and the longest silence, since a watch lasts as long as the server keeps it."""
        connect = self.connect_timeout_s
        if read_s is not None:
            return aiohttp.ClientTimeout(connect=connect, sock_connect=connect, sock_read=read_s)
        total = self.request_timeout_s
        return aiohttp.ClientTimeout(
            total=total, connect=connect, sock_connect=connect, sock_read=total
        )

    async def _text(self, verb: str, kind: str, *args: Any, **kwargs: Any) -> tuple[int, str]:
        """The status and body of one call, within the request timeout."""
        what = f"{verb} {KINDS[kind].plural}"
        try:
            response = await self._call(verb, kind)(
                *args, _preload_content=False, _request_timeout=self._timeout(), **kwargs
            )
            async with response:
                return response.status, await response.text()
        except ApiException as exc:  # raised before a response exists (a connection error)
            raise TransientError(f"cannot {what}: {exc.reason}") from exc
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise TransientError(
                f"cannot reach the Kubernetes API to {what} "
                f"(within {self.request_timeout_s:g}s): {exc!r}"
            ) from exc

    def _refusal(self, kind: str, verb: str, status: int, text: str) -> Exception:
        """The error of an answer that is not a success."""
        what = f"{verb} {KINDS[kind].plural}"
        body: Object = json.loads(text) if text.strip().startswith("{") else {"message": text}
        message = body.get("message") or text[:300]
        if status in (401, 403):
            return Refused(
                f"the Kubernetes API refused to {what} in namespace {self.namespace} "
                f"(HTTP {status}): {message}"
            )
        if status == 409:
            return AlreadyExists(f"{KINDS[kind].plural} in {self.namespace}", message)
        if status == 410:
            return Gone(message)
        if status == 422:
            return Refused(f"the Kubernetes API found the object invalid ({what}): {message}")
        if status == 404:
            return LookupError(message)
        return TransientError(f"cannot {what}: HTTP {status}: {message}")

    async def _request(self, verb: str, kind: str, *args: Any, **kwargs: Any) -> Object:
        status, text = await self._text(verb, kind, *args, **kwargs)
        if status >= 300:
            raise self._refusal(kind, verb, status, text)
        body: Object = json.loads(text) if text.strip().startswith("{") else {"message": text}
        return body

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

    async def log_tail(
        self, pod: str, lines: int, container: str | None = None
    ) -> builtins.list[str]:
        """The last ``lines`` lines of a pod's log (its container's); [] when the pod is gone."""
        extra = {"container": container} if container else {}
        status, text = await self._text(
            "read", "PodLog", pod, self.namespace, tail_lines=lines, **extra
        )
        if status == 404:
            return []
        if status >= 300:
            raise self._refusal("PodLog", "read", status, text)
        return text.splitlines()[-lines:]

    async def watch(
        self, kind: str, selector: str, resource_version: str, timeout_s: int
    ) -> AsyncIterator[Object]:
        """Events after ``resource_version`` until the server ends the watch (its timeout, or
        the connection drops, or nothing arrives for ``timeout_s`` plus the margin: the
        connection is half-open); :class:`Gone` when that version is too old."""
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
                _request_timeout=self._timeout(read_s=timeout_s + self.watch_margin_s),
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
            except (aiohttp.ClientError, asyncio.IncompleteReadError, TimeoutError) as exc:
                # Cut, or silent past the server's own end (half-open): resumed by the caller.
                log.info("watch.dropped", kind=kind, error=repr(exc))


class Mirror:
    """A local copy of the objects matching a selector, kept current by list + watch: it
    resumes from the last resourceVersion when a watch ends or drops, and lists again from
    scratch when the server answers 410 Gone. A list or watch that fails for now (a timeout,
    an unreachable server) is tried again; one refused for good (403) ends it."""

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
            try:
                if version is None:
                    items, version = await self.api.list(self.kind, self.selector)
                    self.objects = {item["metadata"]["name"]: item for item in items}
                    self.relists += 1
                    yield
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
