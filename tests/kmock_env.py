"""The real kopf operator against kmock's in-memory Kubernetes API server (GUIDE section 1).

- `declare_resources(kmock)`: every resource kopf or the operator touches, with discovery info
  (kopf waits silently until namespaces and CRDs are discoverable).
- `OperatorRunner`: `kopf.operator(...)` in the test's event loop with a login handler pointing
  at the emulator, stopped by a stop flag; start/stop it as often as a test likes (restarts).
- `Cluster`: async HTTP helpers for the test, which also plays the controllers the emulator
  lacks (Job and Deployment controllers, the API server's metadata.generation bumps).
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

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
    "v1/services": kmock.ResourceInfo(kind="Service", namespaced=True, verbs=_ALL),
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
    return handlers.Tuning(retries=5, backoff=0.2, timeout=30, event_attempts=3, event_backoff=0.1)


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

    def __init__(self, url: str, config: OperatorConfig | None = None) -> None:
        self.url = url
        self.config = config or OperatorConfig()
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
                    settings=fast_settings(),
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
