"""A stateful Kubernetes API emulator over real HTTP, for the backends' tests.

It serves what the backends use, as an API server does: create (409 on a second, 422 for a
name or label that apimachinery's rules refuse: :mod:`tests.kube.validation`), read, replace,
delete, list with label selectors, and watch streams that replay history after a
resourceVersion and then follow live changes, end at ``timeoutSeconds``, answer 410 Gone for a
version older than what is kept, and send BOOKMARK events (the current resourceVersion) to
clients that allow them: when the watch ends, and whenever a test calls :meth:`bookmark`.

A foreground delete (``propagationPolicy: Foreground``) is asynchronous, as the garbage
collector makes it: the object gets a ``deletionTimestamp`` and the ``foregroundDeletion``
finalizer and stays readable while its dependents (by ownerReferences, recursively) are
deleted, then it goes. With a kubelet attached (:attr:`graceful_pods`), a deleted pod only gets
its ``deletionTimestamp``: the kubelet stops its containers and removes it. Tests play the
controllers and the kubelet through Python methods (pods for a Job, status changes), or attach
:class:`tests.kube.kubelet.Kubelet`; they drop the open watches, compact the history, and deny
verbs (403) the way RBAC would.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from tests.kube.validation import invalid_status, validate

Object = dict[str, Any]
Key = tuple[str, str, str]
Keys = list[Key]
Names = list[str]
GROUPS = {"": "v1", "batch": "v1", "apps": "v1"}
KINDS = {
    "pods": "Pod",
    "services": "Service",
    "jobs": "Job",
    "deployments": "Deployment",
    "replicasets": "ReplicaSet",
    "events": "Event",
}
FOREGROUND = "foregroundDeletion"
GROUP_OF = {
    "pods": "",
    "services": "",
    "jobs": "batch",
    "deployments": "apps",
    "replicasets": "apps",
    "events": "",
}


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def status(code: int, reason: str, message: str) -> web.Response:
    body = {
        "kind": "Status",
        "apiVersion": "v1",
        "status": "Failure",
        "reason": reason,
        "message": message,
        "code": code,
    }
    return web.json_response(body, status=code)


def matches(labels: dict[str, str], selector: str) -> bool:
    for term in filter(None, (t.strip() for t in selector.split(","))):
        if "!=" in term:
            key, value = term.split("!=", 1)
            if labels.get(key) == value:
                return False
        elif "=" in term:
            key, value = term.split("=", 1)
            if labels.get(key.rstrip("=")) != value:
                return False
        elif term.startswith("!"):
            if term[1:] in labels:
                return False
        elif term not in labels:
            return False
    return True


@dataclass
class Change:
    version: int
    plural: str
    namespace: str
    type: str
    object: Object


class Bookmark:
    """Tells a watch to send a BOOKMARK now."""


BOOKMARK = Bookmark()
Queued = Change | Bookmark | None


@dataclass
class KubeEmulator:
    objects: dict[tuple[str, str, str], Object] = field(default_factory=dict)
    history: list[Change] = field(default_factory=list)
    requests: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    denied: set[tuple[str, str]] = field(default_factory=set)
    verbs: set[tuple[str, str]] = field(default_factory=set)
    """(verb, resource) of every request, as RBAC sees them."""
    _versions: itertools.count[int] = field(default_factory=lambda: itertools.count(1000))
    _version: int = 999
    _oldest: int = 0
    _watchers: set[asyncio.Queue[Queued]] = field(default_factory=set)
    _waiters: list[asyncio.Future[None]] = field(default_factory=list)
    _collectors: set[asyncio.Task[None]] = field(default_factory=set)
    graceful_pods: bool = False
    """A kubelet is attached: deleting a pod marks it, and the kubelet removes it once its
    containers have stopped. Off: pods go at once."""
    url: str = ""
    logs: dict[tuple[str, str], str] = field(default_factory=dict)
    """(namespace, pod) -> what its container printed."""

    # --- what tests do, as the controllers and the kubelet would -----------------------------

    def get(self, plural: str, name: str, namespace: str = "torchrelay") -> Object | None:
        return self.objects.get((plural, namespace, name))

    def list(self, plural: str, namespace: str = "torchrelay") -> list[Object]:
        return [
            o for (p, ns, _), o in sorted(self.objects.items()) if p == plural and ns == namespace
        ]

    def put(self, plural: str, obj: Object) -> Object:
        """Store ``obj`` (created or changed) and tell the watchers."""
        metadata = obj["metadata"]
        key = (plural, metadata.get("namespace", "torchrelay"), metadata["name"])
        kind = "MODIFIED" if key in self.objects else "ADDED"
        metadata.setdefault("namespace", key[1])
        metadata.setdefault("uid", str(uuid.uuid4()))
        metadata.setdefault("creationTimestamp", now())
        metadata.setdefault("generation", 1)
        self._version = next(self._versions)
        metadata["resourceVersion"] = str(self._version)
        self.objects[key] = obj
        self._emit(Change(self._version, plural, key[1], kind, obj))
        return obj

    def set_status(
        self, plural: str, name: str, status: Object, namespace: str = "torchrelay"
    ) -> None:
        obj = json.loads(json.dumps(self.objects[(plural, namespace, name)]))
        obj["status"] = status
        self.put(plural, obj)

    def remove(self, plural: str, name: str, namespace: str = "torchrelay") -> None:
        """The object goes now; its dependents after it (background propagation)."""
        obj = self.objects.pop((plural, namespace, name))
        self._version = next(self._versions)
        obj = {**obj, "metadata": {**obj["metadata"], "resourceVersion": str(self._version)}}
        self._emit(Change(self._version, plural, namespace, "DELETED", obj))
        for key in self.dependents(obj["metadata"]["uid"], namespace):  # the garbage collector
            if key in self.objects:
                self._delete_one(key, foreground=False)

    def dependents(self, uid: str, namespace: str) -> Keys:
        """The keys of the objects that ``uid`` owns."""
        return [
            (p, ns, n)
            for (p, ns, n), other in list(self.objects.items())
            if ns == namespace
            and any(ref.get("uid") == uid for ref in other["metadata"].get("ownerReferences") or [])
        ]

    def deleting(self, plural: str, name: str, namespace: str = "torchrelay") -> bool:
        """Whether the object is there with a deletionTimestamp."""
        obj = self.get(plural, name, namespace)
        return obj is not None and "deletionTimestamp" in obj["metadata"]

    def _mark_deleted(self, key: tuple[str, str, str], *, finalizer: str | None) -> None:
        obj = json.loads(json.dumps(self.objects[key]))
        metadata = obj["metadata"]
        metadata.setdefault("deletionTimestamp", now())
        if key[0] == "pods":
            grace = obj.get("spec", {}).get("terminationGracePeriodSeconds", 30)
            metadata.setdefault("deletionGracePeriodSeconds", grace)
        if finalizer and finalizer not in metadata.setdefault("finalizers", []):
            metadata["finalizers"].append(finalizer)
        self.put(key[0], obj)

    def _delete_one(self, key: tuple[str, str, str], *, foreground: bool) -> None:
        """Delete one object as the API server and garbage collector would."""
        plural, namespace, name = key
        if "deletionTimestamp" in self.objects[key]["metadata"] and not foreground:
            return  # already on its way
        if plural == "pods" and self.graceful_pods:
            self._mark_deleted(key, finalizer=None)  # the kubelet stops it, then removes it
        elif foreground:
            if FOREGROUND in (self.objects[key]["metadata"].get("finalizers") or []):
                return
            self._mark_deleted(key, finalizer=FOREGROUND)
            task = asyncio.get_running_loop().create_task(self._collect(key))
            self._collectors.add(task)
            task.add_done_callback(self._collectors.discard)
        else:
            self.remove(plural, name, namespace)

    async def _collect(self, key: tuple[str, str, str]) -> None:
        """The garbage collector's foreground deletion: the dependents first (each in the
        foreground too), the owner once none is left."""
        uid = self.objects[key]["metadata"]["uid"]
        for dependent in self.dependents(uid, key[1]):
            if dependent in self.objects:
                self._delete_one(dependent, foreground=True)
        await self.until(lambda: not self.dependents(uid, key[1]))
        if key in self.objects:
            self.remove(key[0], key[2], key[1])

    async def until(self, condition: Any) -> None:
        """Return once ``condition()`` holds, looked at after every change."""
        while not condition():
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            await waiter

    def start_job_pods(self, job_name: str, namespace: str = "torchrelay") -> Names:
        """The Job controller: one pod per completion index, owned by the Job."""
        job = self.objects[("jobs", namespace, job_name)]
        template = job["spec"]["template"]
        names = []
        for index in range(job["spec"]["completions"]):
            name = f"{job_name}-{index}-{uuid.uuid4().hex[:5]}"
            labels = {
                **template["metadata"]["labels"],
                "batch.kubernetes.io/job-completion-index": str(index),
            }
            self.put(
                "pods",
                {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "metadata": {
                        "name": name,
                        "namespace": namespace,
                        "labels": labels,
                        "ownerReferences": [
                            {"apiVersion": "batch/v1", "kind": "Job", "name": job_name,
                             "uid": job["metadata"]["uid"], "controller": True}
                        ],
                    },
                    "spec": template["spec"],
                    "status": {"phase": "Pending"},
                },
            )  # fmt: skip
            names.append(name)
        return names

    def deny(self, verb: str, plural: str) -> None:
        self.denied.add((verb, plural))

    def delete(
        self, plural: str, name: str, namespace: str = "torchrelay", *, foreground: bool = False
    ) -> None:
        """Delete as a client would (a controller scaling down, a test): pods stop first when
        a kubelet is attached; a foreground delete waits for the dependents."""
        key = (plural, namespace, name)
        if key in self.objects:
            self._delete_one(key, foreground=foreground)

    def subscribe(self) -> asyncio.Queue[Queued]:
        """Every change from now on, for an in-process controller (the kubelet)."""
        queue: asyncio.Queue[Queued] = asyncio.Queue()
        self._watchers.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[Queued]) -> None:
        self._watchers.discard(queue)

    def bookmark(self) -> None:
        """Send a BOOKMARK on every open watch that allows them."""
        for queue in list(self._watchers):
            queue.put_nowait(BOOKMARK)

    def drop_watches(self) -> None:
        """Cut every open watch connection, as a restarting API server or a proxy would."""
        for queue in list(self._watchers):
            queue.put_nowait(None)

    def compact(self) -> None:
        """Forget the history (etcd compaction while clients were away): every version handed
        out so far is too old to resume a watch from, which answers 410 Gone."""
        self._version = next(self._versions)
        self._oldest = self._version
        self.history.clear()

    def lists(self, plural: str) -> int:
        """How many list (not watch) requests were made for ``plural``."""
        return sum(
            1 for method, path, query in self.requests
            if method == "GET" and path.endswith(f"/{plural}")
            and query.get("watch", "").lower() not in ("true", "1")
        )  # fmt: skip

    def _emit(self, change: Change) -> None:
        self.history.append(change)
        for queue in self._watchers:
            queue.put_nowait(change)
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    # --- HTTP ---------------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._record])
        for prefix in ("/api/v1", "/apis/{group}/v1"):
            base = prefix + "/namespaces/{namespace}/{plural}"
            app.router.add_get(base, self._list_or_watch)
            app.router.add_post(base, self._create)
            app.router.add_get(base + "/{name}", self._read)
            app.router.add_put(base + "/{name}", self._replace)
            app.router.add_delete(base + "/{name}", self._delete)
        self._add_subresources(app)
        return app

    @web.middleware
    async def _record(self, request: web.Request, handler: Any) -> web.StreamResponse:
        self.requests.append((request.method, request.path, dict(request.query)))
        plural = request.match_info.get("plural", "") + request.match_info.get("subresource", "")
        verb = {
            "POST": "create", "PUT": "update", "DELETE": "delete",
            "GET": "get" if "name" in request.match_info else (
                "watch" if request.query.get("watch", "").lower() in ("true", "1") else "list"
            ),
        }[request.method]  # fmt: skip
        self.verbs.add((verb, plural))
        if (verb, plural) in self.denied:
            group = GROUP_OF.get(plural, "")
            resource = f"{plural}.{group}" if group else plural
            return status(
                403,
                "Forbidden",
                f'{resource} is forbidden: User "system:serviceaccount:torchrelay:torchrelay" '
                f'cannot {verb} resource "{plural}" in API group "{group}" in the namespace '
                f'"{request.match_info.get("namespace")}"',
            )
        response: web.StreamResponse = await handler(request)
        return response

    def _key(self, request: web.Request, name: str | None = None) -> tuple[str, str, str]:
        info = request.match_info
        return info["plural"], info["namespace"], name or info["name"]

    async def _create(self, request: web.Request) -> web.Response:
        body: Object = await request.json()
        key = self._key(request, body["metadata"].get("name", ""))
        if errors := validate(key[0], body):
            return web.json_response(invalid_status(KINDS[key[0]], key[2], errors), status=422)
        if key in self.objects:
            return status(409, "AlreadyExists", f'{key[0]} "{key[2]}" already exists')
        body["metadata"]["namespace"] = key[1]
        body.setdefault("status", {})
        return web.json_response(self.put(key[0], body), status=201)

    async def _read(self, request: web.Request) -> web.Response:
        obj = self.objects.get(self._key(request))
        if obj is None:
            return status(
                404,
                "NotFound",
                f'{request.match_info["plural"]} "{request.match_info["name"]}" not found',
            )
        return web.json_response(obj)

    async def _replace(self, request: web.Request) -> web.Response:
        key = self._key(request)
        current = self.objects.get(key)
        if current is None:
            return status(404, "NotFound", f'{key[0]} "{key[2]}" not found')
        body: Object = await request.json()
        if errors := validate(key[0], {**body, "metadata": {**body["metadata"], "name": key[2]}}):
            return web.json_response(invalid_status(KINDS[key[0]], key[2], errors), status=422)
        wanted = body["metadata"].get("resourceVersion")
        if wanted and wanted != current["metadata"]["resourceVersion"]:
            return status(
                409,
                "Conflict",
                "the object has been modified; apply your changes to the latest version",
            )
        metadata = {
            **current["metadata"],
            **{k: v for k, v in body["metadata"].items() if k != "resourceVersion"},
        }
        if body.get("spec") != current.get("spec"):
            metadata["generation"] = current["metadata"].get("generation", 1) + 1
        return web.json_response(
            self.put(key[0], {**body, "metadata": metadata, "status": current.get("status", {})})
        )

    async def _delete(self, request: web.Request) -> web.Response:
        key = self._key(request)
        if key not in self.objects:
            return status(404, "NotFound", f'{key[0]} "{key[2]}" not found')
        options: Object = {}
        if request.can_read_body:
            with contextlib.suppress(ValueError):
                options = await request.json() or {}
        policy = request.query.get("propagationPolicy") or options.get("propagationPolicy")
        self._delete_one(key, foreground=policy == "Foreground")
        if key in self.objects:  # on its way: the API server answers with the object
            return web.json_response(self.objects[key], status=202)
        return web.json_response({"kind": "Status", "apiVersion": "v1", "status": "Success"})

    async def _list_or_watch(self, request: web.Request) -> web.StreamResponse:
        plural, namespace = request.match_info["plural"], request.match_info["namespace"]
        selector = request.query.get("labelSelector", "")
        if request.query.get("watch", "").lower() in ("true", "1"):
            return await self._watch(request, plural, namespace, selector)
        items = [
            o
            for o in self.list(plural, namespace)
            if matches(o["metadata"].get("labels") or {}, selector)
        ]
        return web.json_response(
            {
                "kind": f"{KINDS[plural]}List",
                "apiVersion": f"{GROUP_OF[plural]}/v1".lstrip("/"),
                "metadata": {"resourceVersion": str(self._version)},
                "items": items,
            }
        )

    async def _watch(
        self, request: web.Request, plural: str, namespace: str, selector: str
    ) -> web.StreamResponse:
        since = int(request.query.get("resourceVersion") or self._version)
        timeout = float(request.query.get("timeoutSeconds", 1800))
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        if since < self._oldest:
            gone = {
                "kind": "Status",
                "apiVersion": "v1",
                "status": "Failure",
                "reason": "Expired",
                "message": f"too old resource version: {since} ({self._oldest})",
                "code": 410,
            }
            await response.write(json.dumps({"type": "ERROR", "object": gone}).encode() + b"\n")
            await response.write_eof()
            return response  # fmt: skip

        bookmarks = request.query.get("allowWatchBookmarks", "").lower() in ("true", "1")

        async def bookmark() -> None:
            if bookmarks:
                mark = {
                    "kind": KINDS[plural],
                    "apiVersion": f"{GROUP_OF[plural]}/v1".lstrip("/"),
                    "metadata": {"resourceVersion": str(self._version)},
                }
                line = json.dumps({"type": "BOOKMARK", "object": mark})
                await response.write(line.encode() + b"\n")

        def wanted(change: Change) -> bool:
            labels = change.object["metadata"].get("labels") or {}
            return (
                change.plural == plural and change.namespace == namespace
                and change.version > since and matches(labels, selector)
            )  # fmt: skip

        queue: asyncio.Queue[Queued] = asyncio.Queue()
        for past in self.history:
            queue.put_nowait(past)
        self._watchers.add(queue)
        try:
            async with asyncio.timeout(timeout):
                while (change := await queue.get()) is not None:
                    if isinstance(change, Bookmark):
                        await bookmark()
                    elif wanted(change):
                        line = json.dumps({"type": change.type, "object": change.object})
                        await response.write(line.encode() + b"\n")
                # Dropped: cut the connection without ending the chunked body.
                if request.transport is not None:
                    request.transport.abort()
                return response
        except TimeoutError:
            pass
        except ConnectionResetError:  # the client went away (a cancelled watch)
            return response
        finally:
            self._watchers.discard(queue)
        with contextlib.suppress(ConnectionResetError):
            await bookmark()  # as the API server does before it ends a watch
            await response.write_eof()
        return response

    # --- pod logs and events (the kubelet's and the controllers' reports) ------------------

    def set_log(self, pod: str, text: str, namespace: str = "torchrelay") -> None:
        """What the pod's container printed, served by ``GET pods/{name}/log`` while the pod
        exists (deleting the pod takes its log with it, as on a cluster)."""
        self.logs[(namespace, pod)] = text

    def add_event(
        self,
        involved: Object,
        reason: str,
        message: str,
        *,
        kind: str,
        event_type: str = "Warning",
    ) -> Object:
        """A core/v1 Event about ``involved`` (a Job or a Pod), as a controller or the
        kubelet records one (FailedCreate, FailedMount, ...)."""
        metadata = involved["metadata"]
        namespace = metadata.get("namespace", "torchrelay")
        return self.put(
            "events",
            {
                "apiVersion": "v1",
                "kind": "Event",
                "metadata": {
                    "name": f"{metadata['name']}.{uuid.uuid4().hex[:16]}",
                    "namespace": namespace,
                },
                "involvedObject": {
                    "kind": kind,
                    "name": metadata["name"],
                    "namespace": namespace,
                    "uid": metadata.get("uid", ""),
                },
                "reason": reason,
                "message": message,
                "type": event_type,
                "count": 1,
                "lastTimestamp": now(),
            },
        )

    def _add_subresources(self, app: web.Application) -> None:
        app.router.add_get(
            "/api/v1/namespaces/{namespace}/{plural:pods}/{name}{subresource:/log}", self._pod_log
        )

    async def _pod_log(self, request: web.Request) -> web.Response:
        namespace, name = request.match_info["namespace"], request.match_info["name"]
        if ("pods", namespace, name) not in self.objects:
            return status(404, "NotFound", f'pods "{name}" not found')
        lines = self.logs.get((namespace, name), "").splitlines(keepends=True)
        tail = request.query.get("tailLines")
        if tail is not None:
            lines = lines[-int(tail) :] if int(tail) > 0 else []
        return web.Response(text="".join(lines), content_type="text/plain")


@contextlib.asynccontextmanager
async def running_emulator() -> AsyncIterator[KubeEmulator]:
    emulator = KubeEmulator()
    runner = web.AppRunner(emulator.app(), handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    emulator.url = f"http://127.0.0.1:{port}"
    try:
        yield emulator
    finally:
        emulator.drop_watches()
        for task in list(emulator._collectors):
            task.cancel()
        await runner.cleanup()
