"""The real kopf operator against kmock's in-memory Kubernetes API server (GUIDE section 1).

- `declare_resources(kmock)`: every resource kopf or the operator touches, with discovery info
  (kopf waits silently until namespaces and CRDs are discoverable).
- `OperatorRunner`: `kopf.operator(...)` in the test's event loop with a login handler pointing
  at the emulator, stopped by a stop flag; start/stop it as often as a test likes (restarts).
- `Cluster`: async HTTP helpers for the test, which also plays the controllers the emulator
  lacks (Job and Deployment controllers, the API server's metadata.generation bumps).
- `FaultyKubernetes` + `Fault`: the same emulator with API faults on demand (5xx, 409, resets, a
  dropped or silent watch stream); select it with `pytestmark = pytest.mark.kmock(cls=...)`.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp.web
import attrs
import kmock
import kopf

from reranker_operator import handlers, kube, runner
from reranker_operator.config import OperatorConfig
from reranker_operator.reconcile import Reconciler

NAMESPACE = "ml"

_ALL = ["get", "list", "watch", "create", "patch", "update", "delete"]
RESOURCES: dict[str, kmock.ResourceInfo] = {
    "v1/namespaces": kmock.ResourceInfo(
        kind="Namespace", namespaced=False, verbs=["get", "list", "watch"]
    ),
    "apiextensions.k8s.io/v1/customresourcedefinitions": kmock.ResourceInfo(
        kind="CustomResourceDefinition", namespaced=False, verbs=["get", "list", "watch"]
    ),
    "reranker.dev/v1alpha1/rerankers": kmock.ResourceInfo(
        kind="Reranker", namespaced=True, verbs=_ALL, subresources=["status", "scale"]
    ),
    "v1/persistentvolumeclaims": kmock.ResourceInfo(
        kind="PersistentVolumeClaim", namespaced=True, verbs=_ALL
    ),
    "v1/pods": kmock.ResourceInfo(kind="Pod", namespaced=True, verbs=_ALL, subresources=["status"]),
    "v1/services": kmock.ResourceInfo(
        kind="Service", namespaced=True, verbs=_ALL, subresources=["status"]
    ),
    "networking.k8s.io/v1/ingresses": kmock.ResourceInfo(
        kind="Ingress", namespaced=True, verbs=_ALL, subresources=["status"]
    ),
    "gateway.networking.k8s.io/v1/httproutes": kmock.ResourceInfo(
        kind="HTTPRoute", namespaced=True, verbs=_ALL, subresources=["status"]
    ),
    "v1/events": kmock.ResourceInfo(kind="Event", namespaced=True, verbs=_ALL),
    "batch/v1/jobs": kmock.ResourceInfo(
        kind="Job", namespaced=True, verbs=_ALL, subresources=["status"]
    ),
    "apps/v1/deployments": kmock.ResourceInfo(
        kind="Deployment", namespaced=True, verbs=_ALL, subresources=["status", "scale"]
    ),
    "policy/v1/poddisruptionbudgets": kmock.ResourceInfo(
        kind="PodDisruptionBudget", namespaced=True, verbs=_ALL, subresources=["status"]
    ),
    "autoscaling/v2/horizontalpodautoscalers": kmock.ResourceInfo(
        kind="HorizontalPodAutoscaler", namespaced=True, verbs=_ALL, subresources=["status"]
    ),
    "monitoring.coreos.com/v1/servicemonitors": kmock.ResourceInfo(
        kind="ServiceMonitor", namespaced=True, verbs=_ALL
    ),
    "monitoring.googleapis.com/v1/podmonitorings": kmock.ResourceInfo(
        kind="PodMonitoring", namespaced=True, verbs=_ALL
    ),
}


def declare_resources(server: Any) -> None:
    for name, info in RESOURCES.items():
        server.resources[name] = info


def fast_tuning() -> handlers.Tuning:
    return handlers.Tuning(retries=5, backoff=0.2, max_backoff=1.0, event_backoff=0.1)


def fast_settings() -> kopf.OperatorSettings:
    settings = runner.operator_settings(server_timeout=10, client_timeout=15, request_timeout=10)
    settings.watching.reconnect_backoff = 0.05
    settings.queueing.idle_timeout = 0.5
    settings.queueing.exit_timeout = 0.5
    settings.persistence.consistency_timeout = 0.1
    settings.posting.enabled = True
    return settings


class OperatorRunner:
    """One kopf operator "process": `kopf.operator(...)` on its own event loop in a thread.

    Why a thread and not the test's loop: when kopf stops, it cancels every task created in its
    loop after it started (its "hung tasks"), and in the test's loop those are pytest's own
    fixture/test tasks. A thread also behaves like the real thing: a separate process talking
    to the API server over HTTP, which a test can stop and start again (operator restarts).
    """

    def __init__(
        self,
        url: str,
        config: OperatorConfig | None = None,
        settings: Callable[[], kopf.OperatorSettings] = fast_settings,
    ) -> None:
        self.url = url
        self.config = config or OperatorConfig()
        self.settings = settings
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._error: BaseException | None = None

    def _run(self, ready: threading.Event) -> None:
        registry = kopf.OperatorRegistry()
        url = self.url

        @kopf.on.login(registry=registry)
        def login(**_: Any) -> kopf.ConnectionInfo:
            return kopf.ConnectionInfo(server=url, insecure=True)

        handlers.register(registry, fast_tuning())
        api = kube.Kube(kube.load_api_client(host=url), request_timeout=10)
        self.reconciler = Reconciler(api, self.config)
        try:
            asyncio.run(
                kopf.operator(
                    registry=registry,
                    settings=self.settings(),
                    memo=kopf.Memo(reconciler=self.reconciler),
                    standalone=True,
                    clusterwide=True,
                    stop_flag=self._stop,
                    ready_flag=ready,
                )
            )
        except BaseException as exc:  # surfaced by start()/stop()
            self._error = exc

    async def start(self, timeout: float = 10.0) -> None:
        ready = threading.Event()
        self._stop = threading.Event()
        self._error = None
        self._thread = threading.Thread(
            target=self._run, args=(ready,), name="kopf-operator", daemon=True
        )
        self._thread.start()
        await wait_for(lambda: ready.is_set() or self._error, "kopf to become ready", timeout)
        if self._error is not None:
            raise self._error

    async def stop(self, timeout: float = 15.0) -> None:
        if self._thread is None:
            return
        self._stop.set()
        await wait_for(lambda: not self._thread.is_alive(), "kopf to stop", timeout)
        self.reconciler.stop_timers()
        self._thread = None
        if self._error is not None:
            raise self._error


class Cluster:
    """The test's view of the API server: HTTP for writes (so watchers see them), kmock for reads."""

    RERANKER = "reranker.dev/v1alpha1/rerankers"
    JOB = "batch/v1/jobs"
    DEPLOYMENT = "apps/v1/deployments"
    SERVICE = "v1/services"
    INGRESS = "networking.k8s.io/v1/ingresses"
    HTTP_ROUTE = "gateway.networking.k8s.io/v1/httproutes"
    PVC = "v1/persistentvolumeclaims"
    POD = "v1/pods"
    EVENT = "v1/events"
    PDB = "policy/v1/poddisruptionbudgets"
    HPA = "autoscaling/v2/horizontalpodautoscalers"

    def __init__(self, server: Any, namespace: str = NAMESPACE) -> None:
        self.server = server
        self.ns = namespace

    # ------------------------------------------------------------------ raw HTTP

    @staticmethod
    def _path(
        resource: str, namespace: str, name: str | None = None, sub: str | None = None
    ) -> str:
        group_version, plural = resource.rsplit("/", 1)
        base = "/api/v1" if group_version == "v1" else f"/apis/{group_version}"
        path = f"{base}/namespaces/{namespace}/{plural}"
        if name:
            path += f"/{name}"
        if sub:
            path += f"/{sub}"
        return path

    async def _send(self, method: str, path: str, body: Any = None) -> Any:
        headers = {"Content-Type": "application/merge-patch+json"} if method == "PATCH" else {}
        resp = await self.server.request(method, path, json=body, headers=headers)
        async with resp:
            data = await resp.json()
            assert resp.status < 300, f"{method} {path}: {resp.status} {data}"
            return data

    async def create(self, resource: str, obj: dict[str, Any]) -> Any:
        obj["metadata"].setdefault("namespace", self.ns)
        return await self._send("POST", self._path(resource, obj["metadata"]["namespace"]), obj)

    async def patch(
        self, resource: str, name: str, patch: dict[str, Any], sub: str | None = None
    ) -> Any:
        return await self._send("PATCH", self._path(resource, self.ns, name, sub), patch)

    async def delete(self, resource: str, name: str) -> Any:
        return await self._send("DELETE", self._path(resource, self.ns, name))

    # ------------------------------------------------------------------ reads (kmock's memory)

    def get(self, resource: str, name: str) -> dict[str, Any] | None:
        for (res, ns, name_), obj in self.server.objects.items():
            if res == resource and ns == self.ns and name_ == name and not obj.deleted:
                return obj.raw
        return None

    def list(self, resource: str) -> list[dict[str, Any]]:
        out = []
        for (res, ns, _), obj in self.server.objects.items():
            if res == resource and ns == self.ns and not obj.deleted:
                out.append(obj.raw)
        return out

    def events(self, reason: str | None = None) -> list[dict[str, Any]]:
        return [e for e in self.list(self.EVENT) if reason is None or e.get("reason") == reason]

    def status(self, name: str) -> dict[str, Any]:
        return (self.get(self.RERANKER, name) or {}).get("status") or {}

    def condition(self, name: str, type_: str) -> dict[str, Any]:
        for cond in self.status(name).get("conditions") or []:
            if cond["type"] == type_:
                return cond
        return {}

    # ------------------------------------------------------------------ Rerankers (the API server's part)

    async def create_reranker(self, name: str, spec: dict[str, Any]) -> None:
        body = {
            "apiVersion": "reranker.dev/v1alpha1",
            "kind": "Reranker",
            # The emulator assigns neither uid nor generation: do the API server's part.
            "metadata": {
                "name": name,
                "namespace": self.ns,
                "uid": str(uuid.uuid4()),
                "generation": 1,
            },
            "spec": spec,
        }
        await self.create(self.RERANKER, body)

    async def update_spec(self, name: str, spec_patch: dict[str, Any]) -> int:
        """Patch the spec and bump metadata.generation, as the API server would."""
        generation = (self.get(self.RERANKER, name) or {})["metadata"].get("generation", 1) + 1
        await self.patch(
            self.RERANKER, name, {"metadata": {"generation": generation}, "spec": spec_patch}
        )
        return generation

    # ------------------------------------------------------------------ the controllers' part

    async def job_running(self, job: str) -> None:
        await self.patch(
            self.JOB, job, {"status": {"active": 1, "startTime": _now()}}, sub="status"
        )

    async def job_succeeded(self, job: str) -> None:
        await self.patch(
            self.JOB, job,
            {"status": {"active": None, "succeeded": 1, "completionTime": _now(),
                        "conditions": [{"type": "Complete", "status": "True"}]}},
            sub="status",
        )  # fmt: skip

    async def job_failed(self, job: str, termination_message: str) -> None:
        """A failed build pod with its termination message, then the Job marked Failed."""
        template = (self.get(self.JOB, job) or {}).get("spec", {}).get("template", {})
        template_labels = template.get("metadata", {}).get("labels", {})
        await self.create(self.POD, {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": f"{job}-x1y2z", "namespace": self.ns,
                         "labels": {**template_labels, "job-name": job,
                                    "batch.kubernetes.io/job-name": job}},
            "status": {"phase": "Failed", "containerStatuses": [{
                "name": "build",
                "state": {"terminated": {"exitCode": 1, "reason": "Error", "finishedAt": _now(),
                                         "message": termination_message}},
            }]},
        })  # fmt: skip
        await self.patch(
            self.JOB, job,
            {"status": {"active": None, "failed": 3, "conditions": [{
                "type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
                "message": "Job has reached the specified backoff limit"}]}},
            sub="status",
        )  # fmt: skip

    async def deployment_ready(self, name: str, replicas: int | None = None) -> None:
        dep = self.get(self.DEPLOYMENT, name) or {}
        n = replicas if replicas is not None else dep.get("spec", {}).get("replicas", 1)
        await self.patch(
            self.DEPLOYMENT, name,
            {"status": {"replicas": n, "readyReplicas": n, "availableReplicas": n, "updatedReplicas": n,
                        "conditions": [
                            {"type": "Available", "status": "True", "reason": "MinimumReplicasAvailable"},
                            {"type": "Progressing", "status": "True", "reason": "NewReplicaSetAvailable"}]}},
            sub="status",
        )  # fmt: skip


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


async def wait_for(
    predicate: Callable[[], Any] | Callable[[], Awaitable[Any]],
    what: str,
    timeout: float = 20.0,
    interval: float = 0.05,
) -> Any:
    """Poll `predicate` until truthy (bounded); fail naming `what`."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


# --------------------------------------------------------------------------- API faults

# What a real kube-apiserver answers for each injected status (reason, message template).
_FAULT_BODIES: dict[int, tuple[str, str]] = {
    409: ("AlreadyExists", "{what} already exists"),
    429: ("TooManyRequests", "the server has received too many requests, try again later"),
    500: ("InternalError", "an error on the server (etcdserver: request timed out)"),
    503: ("ServiceUnavailable", "the server is currently unable to handle the request"),
}
CONFLICT_MESSAGE = (
    "Operation cannot be fulfilled on {what}: the object has been modified; "
    "please apply your changes to the latest version and try again"
)


RESET = 0  # Fault.status: close the connection instead of answering


@dataclass
class Fault:
    """One injected API failure, matched on the request's method and URL path.

    - `method`: "POST", "PATCH", "GET", ... or "*" for any; `path`: a regular expression searched
      in the URL path (e.g. r"/jobs$", r"/rerankers/bge/status$").
    - `status`: the HTTP status answered, with the body a kube-apiserver gives (a `Status`
      object; 409 on PATCH/PUT is a "Conflict", elsewhere "AlreadyExists"); `RESET` (0): no
      answer, the connection is closed (a network fault).
    - `after`: let this many matching requests through first (a fault mid-flow); `times`: then
      fail this many (None: until `stop()`). Every fault counts every matching request.
    - `commit`: perform the request first, then answer the error, as when the API server
      committed the write but the reply was lost (5xx), or another writer won a race (409).
    - `watch`: match watch requests too (by default a fault leaves watch streams alone).
    - `user_agent`: a regular expression searched in the request's User-Agent; by default every
      client but the test's own (kmock's client), so a test can play the controllers meanwhile.
    """

    method: str
    path: str
    status: int
    times: int | None = 1
    after: int = 0
    commit: bool = False
    watch: bool = False
    user_agent: str = r"^(?!kmock/)"
    matched: int = 0  # matching requests seen so far
    injected: int = 0  # of which answered with the fault
    stopped: bool = False

    def matches(self, request: kmock.Request) -> bool:
        if self.stopped or (request.action == kmock.action.WATCH and not self.watch):
            return False
        if self.method != "*" and request.method.value != self.method.upper():
            return False
        if not re.search(self.user_agent, request.headers.get("User-Agent", "")):
            return False
        return re.search(self.path, request.url.path) is not None

    def due(self) -> bool:
        """Count a matching request; True when it falls in this fault's window (`after`,
        `times`). Every fault counts every matching request, whichever fault answers it."""
        self.matched += 1
        if self.stopped or self.matched <= self.after:
            return False
        return self.times is None or self.matched <= self.after + self.times

    def stop(self) -> None:
        self.stopped = True

    def body(self, request: kmock.Request) -> dict[str, Any]:
        resource = request.resource.plural if request.resource is not None else "objects"
        name = request.name or ((request.data or {}).get("metadata") or {}).get("name", "")
        what = f'{resource} "{name}"'
        if self.status == 409 and request.method.value in ("PATCH", "PUT"):
            reason, message = "Conflict", CONFLICT_MESSAGE
        else:
            reason, message = _FAULT_BODIES.get(self.status, ("InternalError", "injected fault"))
        return {
            "apiVersion": "v1",
            "kind": "Status",
            "metadata": {},
            "status": "Failure",
            "reason": reason,
            "message": message.format(what=what),
            "details": {"name": name, "kind": resource},
            "code": self.status,
        }


@attrs.define(kw_only=True)
class FaultyKubernetes(kmock.KubernetesEmulator):
    """kmock's KubernetesEmulator with API faults on demand.

    - `inject(method, path, status, ...)` adds a `Fault` (see there), checked before the
      emulator touches its state; several can be active; the first match answers.
    - `drop_watches(path)` closes the TCP connection of every open watch whose URL path matches
      (kopf sees the stream break mid-flight and reconnects); `stall_watches(path)` keeps those
      connections open but silently swallows their events from now on (a half-open connection:
      only kopf's watch timeouts notice).
    - `answers`: (method, path, status) of what the server did with each request (a committed
      fault's request counts as done), for "created once" checks: see `created`.
    """

    faults: list[Fault] = attrs.field(factory=list)
    answers: list[tuple[str, str, int]] = attrs.field(factory=list)
    _watches: dict[int, tuple[kmock.Request, list[str]]] = attrs.field(factory=dict)

    def inject(self, method: str, path: str, status: int, **options: Any) -> Fault:
        fault = Fault(method=method, path=path, status=status, **options)
        self.faults.append(fault)
        return fault

    def created(self, path: str) -> int:
        """How many POSTs to a path matching `path` the server accepted (2xx)."""
        return sum(
            1
            for method, p, status in self.answers
            if method == "POST" and re.search(path, p) and 200 <= status < 300
        )

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        due = [f for f in self.faults if f.matches(request) and f.due()]
        fault = due[0] if due else None  # the first injected answers
        if fault is not None:
            fault.injected += 1
        if fault is None or fault.commit:
            # Done as usual (with `commit`, the client hears only the fault's error below).
            response = await super()._handle(request)
            self.answers.append((request.method.value, request.url.path, response.status))
        if fault is None:
            return response
        if not fault.commit:
            self.answers.append((request.method.value, request.url.path, fault.status))
        raw = request._raw_request
        if fault.status == RESET and raw is not None and raw.transport is not None:
            raw.transport.close()  # the client reads no answer at all
            return aiohttp.web.Response(status=500)  # goes nowhere
        return aiohttp.web.json_response(fault.body(request), status=fault.status)

    # ------------------------------------------------------------------ watch streams

    async def _serve_watch(self, request: kmock.Request) -> AsyncIterator[Any]:
        state: list[str] = []  # "dropped" / "stalled", set by drop_watches / stall_watches
        self._watches[id(request)] = (request, state)
        try:
            async for item in super()._serve_watch(request):
                if "dropped" in state:
                    return
                if "stalled" not in state:
                    yield item
        finally:
            self._watches.pop(id(request), None)

    def _open_watches(self, path: str) -> list[tuple[kmock.Request, list[str]]]:
        return [
            (req, state)
            for req, state in self._watches.values()
            if not state and re.search(path, req.url.path)
        ]

    def drop_watches(self, path: str = "") -> int:
        """Break every open watch on a matching path (TCP closed mid-stream); how many."""
        watches = self._open_watches(path)
        for request, state in watches:
            state.append("dropped")
            raw = request._raw_request
            if raw is not None and raw.transport is not None:
                raw.transport.close()
        return len(watches)

    def stall_watches(self, path: str = "") -> int:
        """Make every open watch on a matching path go silent (connection kept); how many."""
        watches = self._open_watches(path)
        for _, state in watches:
            state.append("stalled")
        return len(watches)

    def open_watches(self, path: str = "") -> int:
        return len(self._open_watches(path))
