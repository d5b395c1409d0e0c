"""What `kubectl get rr` says when pods do not run: the real operator against kmock, with the test
playing the scheduler and the kubelet (pods with the status shapes they write).

The default engine storage (PerPod: each runtime pod builds its engine in an init container) is
used unless a test says Shared. Every wait is bounded polling (kmock_env.wait_for).
"""

from __future__ import annotations

import asyncio
import copy
import datetime
import itertools
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import yaml

from kmock_env import NAMESPACE, Cluster, OperatorRunner, declare_resources, wait_for
from reranker_operator import builders, reconcile
from reranker_operator.config import OperatorConfig, config_from_dict
from reranker_operator.spec import parse_spec

NAME = "rr"
SPEC: dict[str, Any] = {
    "checkpoint": {"repo": "BAAI/bge-reranker-large", "secretName": "hf-token"},
    "accelerator": {"type": "L4"},
    "replicas": 3,
}
IMAGE = "ghcr.io/reranker-dev/reranker-runtime:0.1.0"
GPU_FULL = (
    "0/3 nodes are available: 3 Insufficient nvidia.com/gpu. preemption: 0/3 nodes are "
    "available: 3 No preemption victims found for incoming pod."
)
UNSCHEDULABLE_TIMEOUT = 2  # seconds, so the timer-driven recheck shows within a test
_counter = itertools.count()


def now(offset: float = 0) -> str:
    t = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=offset)
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def key_of(spec_: dict[str, Any]) -> str:
    return builders.engine_key_for(parse_spec({"spec": spec_}), OperatorConfig())


@pytest.fixture()
async def cluster(kmock: Any) -> Cluster:
    declare_resources(kmock)
    return Cluster(kmock)


@pytest.fixture()
async def operator(kmock: Any, cluster: Cluster) -> AsyncIterator[OperatorRunner]:
    config = config_from_dict({"unschedulableTimeoutSeconds": UNSCHEDULABLE_TIMEOUT})
    op = OperatorRunner(str(kmock.url), config)
    await op.start()
    try:
        yield op
    finally:
        await op.stop()


# --------------------------------------------------------------------------- the kubelet's part

# Container states as the kubelet writes them.
RUNNING = {"running": {"startedAt": "2026-01-01T00:00:00Z"}}
DONE = {"terminated": {"exitCode": 0, "reason": "Completed", "finishedAt": "2026-01-01T00:05:00Z"}}
INITIALIZING = {"waiting": {"reason": "PodInitializing"}}


def scheduled(ready: bool = False) -> list[dict[str, Any]]:
    return [
        {"type": "PodScheduled", "status": "True"},
        {"type": "Ready", "status": "True" if ready else "False"},
    ]


def unschedulable(message: str = GPU_FULL, since: str | None = None) -> dict[str, Any]:
    return {
        "phase": "Pending",
        "conditions": [
            {
                "type": "PodScheduled",
                "status": "False",
                "reason": "Unschedulable",
                "message": message,
                "lastTransitionTime": since or now(),
            }
        ],
    }


def init_status(state: dict[str, Any], last: dict[str, Any] | None = None) -> dict[str, Any]:
    """The pod while (or after) its build init container runs."""
    build = {"name": "build", "image": IMAGE, "ready": False, "restartCount": 0, "state": state}
    if last is not None:
        build.update(lastState=last, restartCount=3)
    return {
        "phase": "Pending",
        "conditions": scheduled(),
        "initContainerStatuses": [build],
        "containerStatuses": [
            {"name": "reranker", "image": IMAGE, "ready": False, "state": INITIALIZING}
        ],
    }


def serve_status(
    state: dict[str, Any], last: dict[str, Any] | None = None, ready: bool = False
) -> dict[str, Any]:
    """The pod after its build: the serving container's state."""
    serve = {"name": "reranker", "image": IMAGE, "ready": ready, "restartCount": 0, "state": state}
    if last is not None:
        serve.update(lastState=last, restartCount=4)
    return {
        "phase": "Running",
        "conditions": scheduled(ready),
        "initContainerStatuses": [{"name": "build", "image": IMAGE, "ready": True, "state": DONE}],
        "containerStatuses": [serve],
    }


READY = serve_status(RUNNING, ready=True)


async def create_pod(
    cluster: Cluster, template_of: dict[str, Any], status: dict[str, Any], name: str | None = None
) -> str:
    """A pod of a Deployment's or a Job's template, as the controllers create it."""
    template = template_of["spec"]["template"]
    owner = template_of["metadata"]["name"]
    name = name or f"{owner}-{next(_counter):05d}"
    labels = copy.deepcopy(template["metadata"]["labels"])
    if template_of["kind"] == "Job":  # the Job controller's labels
        labels.update({"job-name": owner, "batch.kubernetes.io/job-name": owner})
    await cluster.create(
        cluster.POD,
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": name,
                "namespace": NAMESPACE,
                "creationTimestamp": now(),
                "labels": labels,
                "annotations": copy.deepcopy(template["metadata"].get("annotations") or {}),
            },
            "spec": copy.deepcopy(template["spec"]),
            "status": status,
        },
    )
    return name


async def set_pod_status(cluster: Cluster, pod: str, status: dict[str, Any]) -> None:
    # Whole lists replaced by the merge patch, like the kubelet's status updates.
    await cluster.patch(cluster.POD, pod, {"status": status}, sub="status")


async def deployment_status(
    cluster: Cluster,
    ready: int,
    updated: int,
    replicas: int = 3,
    available: bool | None = None,
    name: str = NAME,
) -> None:
    available = ready > 0 if available is None else available
    await cluster.patch(
        cluster.DEPLOYMENT,
        name,
        {
            "status": {
                "replicas": replicas,
                "readyReplicas": ready,
                "availableReplicas": ready,
                "updatedReplicas": updated,
                "conditions": [
                    {"type": "Available", "status": "True" if available else "False"},
                    {"type": "Progressing", "status": "True", "reason": "ReplicaSetUpdated"},
                ],
            }
        },
        sub="status",
    )


async def deployment(cluster: Cluster, key: str | None = None, name: str = NAME) -> dict[str, Any]:
    def current() -> dict[str, Any] | None:
        dep = cluster.get(cluster.DEPLOYMENT, name)
        annotations = (dep or {}).get("metadata", {}).get("annotations") or {}
        if dep and (key is None or annotations.get(builders.ANNOTATION_ENGINE_KEY) == key):
            return dep
        return None

    return await wait_for(current, f"the Deployment {name}")


async def phase(
    cluster: Cluster,
    want: str,
    reason: str | None = None,
    words: tuple[str, ...] = (),
    name: str = NAME,
) -> dict[str, Any]:
    """The status once it has phase `want`, a condition with `reason`, and `words` in its message
    (a reconcile that started before the test's last change may write an older picture first)."""

    def reached() -> dict[str, Any] | None:
        status = cluster.status(name)
        if status.get("phase") != want:
            return None
        if reason is not None and reason not in {c["reason"] for c in status["conditions"]}:
            return None
        if not all(word in status.get("message", "") for word in words):
            return None
        return status

    return await wait_for(reached, f"{name}: phase {want} ({reason}) with {words}")


def condition(cluster: Cluster, type_: str, name: str = NAME) -> dict[str, Any]:
    return cluster.condition(name, type_)


async def ready_on_three_pods(cluster: Cluster) -> dict[str, Any]:
    """A Reranker of SPEC whose three pods are ready: phase Ready. Its Deployment."""
    await cluster.create_reranker(NAME, SPEC)
    dep = await deployment(cluster)
    for _ in range(3):
        await create_pod(cluster, dep, READY)
    await deployment_status(cluster, ready=3, updated=3)
    await phase(cluster, "Ready")
    return dep


# --------------------------------------------------------------------------- PerPod: the default


async def test_per_pod_replicas_become_ready_with_nothing_shared(
    cluster: Cluster, operator: OperatorRunner
) -> None:
    await cluster.create_reranker(NAME, SPEC)
    dep = await deployment(cluster)
    # No build Job, no cache PVC: nothing needs ReadWriteMany (or any StorageClass).
    assert cluster.list(cluster.JOB) == [] and cluster.list(cluster.PVC) == []
    assert "ReadWriteMany" not in yaml.safe_dump(dep)
    assert dep["spec"]["template"]["spec"]["initContainers"][0]["name"] == "build"

    pods = [await create_pod(cluster, dep, init_status(RUNNING)) for _ in range(3)]
    await phase(cluster, "Building", "Building", ("init container",))

    for pod in pods:
        await set_pod_status(cluster, pod, READY)
    await deployment_status(cluster, ready=3, updated=3)
    status = await phase(cluster, "Ready")
    assert status["readyReplicas"] == 3 and status["engine"]["servingKey"] == key_of(SPEC)
    assert "jobName" not in status["engine"]


async def test_per_pod_engine_change_keeps_old_pods_serving(
    cluster: Cluster, operator: OperatorRunner
) -> None:
    old_key = key_of(SPEC)
    await ready_on_three_pods(cluster)

    new_spec = {**SPEC, "build": {"maxNumTokens": 8192}}
    await cluster.update_spec(NAME, {"build": {"maxNumTokens": 8192}})
    new = await deployment(cluster, key_of(new_spec))
    # The rolling update surges one new pod; the three old ones keep serving.
    assert new["spec"]["strategy"]["rollingUpdate"] == {"maxUnavailable": 0, "maxSurge": 1}
    await create_pod(cluster, new, init_status(RUNNING))
    await deployment_status(cluster, ready=3, updated=1, replicas=4)
    status = await phase(cluster, "Building", None, (f"still serving engine {old_key[:10]}",))
    assert condition(cluster, "Available")["status"] == "True"
    assert status["engine"]["servingKey"] == old_key


async def test_per_pod_build_failure_reaches_status_with_the_builds_message(
    cluster: Cluster, operator: OperatorRunner
) -> None:
    await cluster.create_reranker(NAME, SPEC)
    dep = await deployment(cluster)
    refused = (
        "quantization fp8 is not supported for XLMRobertaForSequenceClassification by "
        "TensorRT-LLM; use no_quant"
    )
    crash = {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 40s restarting"}}
    failed = {"terminated": {"exitCode": 3, "reason": "Error", "message": refused}}
    await create_pod(cluster, dep, init_status(crash, last=failed))
    await phase(cluster, "Failed", "BuildFailed", (refused,))
    assert refused in condition(cluster, "EngineReady")["message"]
    await wait_for(lambda: cluster.events("BuildFailed"), "a BuildFailed event")


# (init container or pod status, reason in conditions, words the message must contain)
PREPARATION_ISSUES = {
    "unschedulable-for-too-long": (
        unschedulable(since=now(-3600)),
        "Unschedulable",
        ["0/3 nodes are available: 3 Insufficient nvidia.com/gpu", "cannot be prepared"],
    ),
    "image-pull": (
        init_status(
            {
                "waiting": {
                    "reason": "ImagePullBackOff",
                    "message": f'Back-off pulling image "{IMAGE}"',
                }
            }
        ),
        "ImagePullBackOff",
        ["cannot pull image", IMAGE],
    ),
    "missing-secret": (
        init_status(
            {
                "waiting": {
                    "reason": "CreateContainerConfigError",
                    "message": 'secret "hf-token" not found',
                }
            }
        ),
        "CreateContainerConfigError",
        ['secret "hf-token" not found'],
    ),
    "build-oom": (
        init_status(
            {"waiting": {"reason": "CrashLoopBackOff"}},
            last={"terminated": {"exitCode": 137, "reason": "OOMKilled"}},
        ),
        "BuildFailed",
        ["OOMKilled", "memory limit 10Gi", "raise spec.resources.build.memory"],
    ),
}


async def test_per_pod_preparation_issues_are_failed_with_their_reason(
    cluster: Cluster, operator: OperatorRunner
) -> None:
    """One Reranker per case, side by side (one operator start for all)."""
    names = {case: f"prep-{case}" for case in PREPARATION_ISSUES}
    for name in names.values():
        await cluster.create_reranker(name, SPEC)
    for case, name in names.items():
        await create_pod(cluster, await deployment(cluster, name=name), PREPARATION_ISSUES[case][0])
    for case, name in names.items():
        _, reason, words = PREPARATION_ISSUES[case]
        await phase(cluster, "Failed", reason, tuple(words), name=name)
        assert condition(cluster, "EngineReady", name)["reason"] == reason
        assert condition(cluster, "Ready", name)["status"] == "False"


async def test_unschedulable_is_pending_then_failed_after_the_configured_time(
    cluster: Cluster, operator: OperatorRunner
) -> None:
    await cluster.create_reranker(NAME, SPEC)
    dep = await deployment(cluster)
    await create_pod(cluster, dep, unschedulable())
    await phase(cluster, "Pending", "Unschedulable", (GPU_FULL, "waiting"))
    # No event comes when the time is up: the operator's own timer reconciles.
    await phase(cluster, "Failed", "Unschedulable", (GPU_FULL,))
    assert GPU_FULL in condition(cluster, "EngineReady")["message"]


async def test_a_pod_that_never_starts_its_containers_is_failed_after_the_configured_time(
    cluster: Cluster, operator: OperatorRunner
) -> None:
    """Scheduled, then nothing: a volume that cannot be mounted (here the proxy CA ConfigMap)
    shows only in the pod's events. A starting build container is not that."""
    await cluster.create_reranker(NAME, SPEC)
    dep = await deployment(cluster)
    creating = {"waiting": {"reason": "ContainerCreating"}}
    stuck = init_status(creating)
    stuck["containerStatuses"][0]["state"] = creating
    pod = await create_pod(cluster, dep, stuck)
    # No event comes when the time is up: the operator's own timer reconciles.
    status = await phase(cluster, "Failed", "ContainersNotStarting", ("has started no container",))
    assert f"kubectl describe pod {pod}" in status["message"]
    await set_pod_status(cluster, pod, init_status(RUNNING))  # the mount came through
    await phase(cluster, "Building", "Building")


# (serving container state, last state, reason, words)
SERVING_ISSUES = {
    "oom": (
        {"waiting": {"reason": "CrashLoopBackOff"}},
        {"terminated": {"exitCode": 137, "reason": "OOMKilled"}},
        "OOMKilled",
        ["OOMKilled", "memory limit 10Gi", "raise spec.resources.memory"],
    ),
    "crash-loop": (
        {"waiting": {"reason": "CrashLoopBackOff"}},
        {
            "terminated": {
                "exitCode": 1,
                "reason": "Error",
                "message": "engine directory /engines/x has no manifest.json",
            }
        },
        "CrashLoopBackOff",
        ["keeps crashing", "has no manifest.json"],
    ),
}


async def test_serving_issues_are_failed_with_their_reason(
    cluster: Cluster, operator: OperatorRunner
) -> None:
    names = {case: f"serve-{case}" for case in SERVING_ISSUES}
    for name in names.values():
        await cluster.create_reranker(name, SPEC)
    for case, name in names.items():
        state, last, _, _ = SERVING_ISSUES[case]
        await create_pod(cluster, await deployment(cluster, name=name), serve_status(state, last))
        await deployment_status(cluster, ready=0, updated=1, available=False, name=name)
    for case, name in names.items():
        _, _, reason, words = SERVING_ISSUES[case]
        await phase(cluster, "Failed", reason, tuple(words), name=name)
        assert condition(cluster, "Available", name)["reason"] == reason
        assert condition(cluster, "EngineReady", name)["status"] == "True"  # the build worked


async def test_one_crashing_pod_of_three_is_degraded_while_two_serve(
    cluster: Cluster, operator: OperatorRunner
) -> None:
    """With maxUnavailable 0 the Deployment says Available=False until every replica is: the
    Reranker still serves on the two that are, and says what stops the third."""
    await cluster.create_reranker(NAME, SPEC)
    dep = await deployment(cluster)
    for _ in range(2):
        await create_pod(cluster, dep, READY)
    crash = {"terminated": {"exitCode": 1, "reason": "Error", "message": "bad weights"}}
    await create_pod(cluster, dep, serve_status({"waiting": {"reason": "CrashLoopBackOff"}}, crash))
    await deployment_status(cluster, ready=2, updated=3, available=False)
    status = await phase(cluster, "Degraded", "CrashLoopBackOff", ("serves on 2/3 replicas",))
    assert condition(cluster, "Available")["status"] == "True"
    assert condition(cluster, "Ready")["status"] == "False"
    await wait_for(lambda: cluster.events("CrashLoopBackOff"), "a CrashLoopBackOff event")
    await settled(operator)
    (event,) = cluster.events("CrashLoopBackOff")  # once, not once per reconcile
    assert event["type"] == "Warning" and "bad weights" in event["message"]
    assert status["readyReplicas"] == 2


async def test_a_scale_up_keeps_ready_until_the_new_pods_cannot_start(
    cluster: Cluster, operator: OperatorRunner
) -> None:
    """An autoscaler's step or `kubectl scale rr` is not a rollout: Ready stays while the new
    pods come, and turns Degraded, naming the scheduler's word, when they cannot."""
    dep = await ready_on_three_pods(cluster)
    await cluster.update_spec(NAME, {"replicas": 5})
    await wait_for(
        lambda: (cluster.get(cluster.DEPLOYMENT, NAME) or {})["spec"]["replicas"] == 5,
        "the Deployment scaled",
    )
    for _ in range(2):  # PerPod: the new pods would build the engine first
        await create_pod(cluster, dep, unschedulable())
    await deployment_status(cluster, ready=3, updated=5, replicas=5, available=False)
    await phase(cluster, "Ready", "Ready", ("3/5 replicas ready",))
    # The scheduler still says no after unschedulableTimeoutSeconds.
    await phase(cluster, "Degraded", "Unschedulable", ("serves on 3/5 replicas", GPU_FULL))
    assert condition(cluster, "Available")["status"] == "True"
    assert len(cluster.events("Ready")) == 1


async def test_a_first_rollout_is_ready_once_every_replica_is(
    cluster: Cluster, operator: OperatorRunner
) -> None:
    await cluster.create_reranker(NAME, SPEC)
    dep = await deployment(cluster)
    await create_pod(cluster, dep, READY)
    await deployment_status(cluster, ready=1, updated=3, available=False)
    await phase(cluster, "Deploying", "Deploying", ("waiting for replicas (1/3 replicas ready)",))
    assert condition(cluster, "Available")["status"] == "True"  # it answers already
    await deployment_status(cluster, ready=3, updated=3)
    await phase(cluster, "Ready")


# --------------------------------------------------------------------------- Shared mode


SHARED = {**SPEC, "engineCache": {"mode": "Shared", "storageClassName": "standard-rwo"}}


async def test_shared_job_pod_pending_is_pending_not_building(
    cluster: Cluster, operator: OperatorRunner
) -> None:
    job_name = builders.job_name(NAME, key_of(SHARED))
    await cluster.create_reranker(NAME, SHARED)
    job = await wait_for(lambda: cluster.get(cluster.JOB, job_name), "the Job")
    pod = await create_pod(cluster, job, {"phase": "Pending", "conditions": scheduled()})
    await cluster.job_running(job_name)  # a Job counts its Pending pod as active
    await phase(cluster, "Pending")
    await set_pod_status(cluster, pod, {"phase": "Running", "conditions": scheduled()})
    await phase(cluster, "Building")


async def shared_job_refused(cluster: Cluster, refusal: str) -> str:
    """A Shared Reranker whose build Job's pod is refused: the Job controller's FailedCreate
    event, as it posts it. Returns the Job's name."""
    job_name = builders.job_name(NAME, key_of(SHARED))
    await cluster.create_reranker(NAME, SHARED)
    job = await wait_for(lambda: cluster.get(cluster.JOB, job_name), "the Job")
    await cluster.create(cluster.EVENT, {
        "apiVersion": "v1", "kind": "Event", "metadata": {"name": f"{job_name}.1"},
        "involvedObject": {"kind": "Job", "name": job_name, "namespace": NAMESPACE,
                           "uid": job["metadata"].get("uid")},
        "type": "Warning", "reason": "FailedCreate", "message": f"Error creating: {refusal}",
        "firstTimestamp": now(), "lastTimestamp": now(),
    })  # fmt: skip
    return job_name


async def test_shared_job_whose_pod_a_quota_refuses_says_so(
    cluster: Cluster, operator: OperatorRunner
) -> None:
    """The Job controller's FailedCreate events are all there is (the Job does not change): the
    operator reads them on its own timer, waits, then turns Failed after the timeout."""
    quota = 'pods "x" is forbidden: exceeded quota: gpu-quota, requested: requests.nvidia.com/gpu=1'
    job_name = await shared_job_refused(cluster, quota)
    await phase(cluster, "Pending", "FailedCreate", ("exceeded quota: gpu-quota", "waiting"))
    status = await phase(cluster, "Failed", "FailedCreate", (f"Job {job_name} cannot create",))
    assert "ResourceQuota" in status["message"]


async def test_shared_job_whose_pod_admission_refuses_fails_at_once(
    cluster: Cluster, operator: OperatorRunner
) -> None:
    """Not a quota (a missing service account, PodSecurity): no waiting, no quota advice."""
    refusal = 'pods "x" is forbidden: error looking up service account ml/gcs-reader: not found'
    await shared_job_refused(cluster, refusal)
    status = await phase(cluster, "Failed", "FailedCreate", ("service account ml/gcs-reader",))
    assert "ResourceQuota" not in status["message"]


async def test_shared_unbound_pvc_names_the_class_and_access_mode(
    cluster: Cluster, operator: OperatorRunner
) -> None:
    job_name = builders.job_name(NAME, key_of(SHARED))
    await cluster.create_reranker(NAME, SHARED)
    job = await wait_for(lambda: cluster.get(cluster.JOB, job_name), "the Job")
    pvc = builders.cache_pvc_name(NAME)
    await cluster.patch(cluster.PVC, pvc, {"status": {"phase": "Pending"}})
    message = "0/3 nodes are available: pod has unbound immediate PersistentVolumeClaims."
    await create_pod(cluster, job, unschedulable(message, since=now(-3600)))
    await phase(
        cluster,
        "Failed",
        "VolumeNotBound",
        (pvc, "standard-rwo", "ReadWriteMany", "unbound immediate"),
    )


async def test_shared_oom_killed_build_says_so_with_the_limit(
    cluster: Cluster, operator: OperatorRunner
) -> None:
    job_name = builders.job_name(NAME, key_of(SHARED))
    await cluster.create_reranker(NAME, SHARED)
    job = await wait_for(lambda: cluster.get(cluster.JOB, job_name), "the Job")
    oom = {"terminated": {"exitCode": 137, "reason": "OOMKilled", "message": "loading shards"}}
    await create_pod(
        cluster,
        job,
        {
            "phase": "Failed",
            "containerStatuses": [{"name": "build", "image": IMAGE, "state": oom}],
        },
    )
    await cluster.patch(
        cluster.JOB,
        job_name,
        {"status": {"failed": 3, "conditions": [{"type": "Failed", "status": "True"}]}},
        sub="status",
    )
    await phase(
        cluster,
        "Failed",
        "BuildFailed",
        ("OOMKilled (memory limit 10Gi): raise spec.resources.build.memory", "loading shards"),
    )


async def test_shared_build_retrying_after_a_failed_attempt_is_building_not_failed(
    cluster: Cluster, operator: OperatorRunner
) -> None:
    """backoffLimit: the Job starts another pod after one fails. Until the Job gives up, the
    first attempt is history, said in the message, not the build's failure."""
    job_name = builders.job_name(NAME, key_of(SHARED))
    await cluster.create_reranker(NAME, SHARED)
    job = await wait_for(lambda: cluster.get(cluster.JOB, job_name), "the Job")
    oom = {"terminated": {"exitCode": 137, "reason": "OOMKilled", "finishedAt": now(-60)}}
    failed = {
        "phase": "Failed",
        "containerStatuses": [{"name": "build", "image": IMAGE, "state": oom}],
    }
    await create_pod(cluster, job, failed)
    running = {"phase": "Running", "conditions": scheduled(),
               "containerStatuses": [{"name": "build", "image": IMAGE, "state": RUNNING}]}  # fmt: skip
    await create_pod(cluster, job, running)
    await cluster.patch(cluster.JOB, job_name, {"status": {"active": 1, "failed": 1}}, sub="status")
    await phase(cluster, "Building", "Building", ("retrying after a failed attempt", "OOMKilled"))
    assert condition(cluster, "EngineReady")["reason"] == "Building"


async def test_shared_build_whose_deadline_passed_before_its_pod_ran_says_so(
    cluster: Cluster, operator: OperatorRunner
) -> None:
    """activeDeadlineSeconds counts the time a pod waits for a node: when it ends the build, the
    Job's pod is gone, and so is the scheduler's word, unless the status keeps it."""
    job_name = builders.job_name(NAME, key_of(SHARED))
    await cluster.create_reranker(NAME, SHARED)
    job = await wait_for(lambda: cluster.get(cluster.JOB, job_name), "the Job")
    pod = await create_pod(cluster, job, unschedulable(since=now(-60)))
    await phase(cluster, "Failed", "Unschedulable")
    await cluster.delete(cluster.POD, pod)  # the Job controller deletes it at the deadline
    await cluster.patch(
        cluster.JOB, job_name,
        {"status": {"active": None, "failed": 1, "conditions": [{
            "type": "Failed", "status": "True", "reason": "DeadlineExceeded",
            "message": "Job was active longer than specified deadline"}]}},
        sub="status",
    )  # fmt: skip
    words = ("DeadlineExceeded", "its pod never started (Unschedulable",
             "Insufficient nvidia.com/gpu", f"kubectl delete job {job_name} -n {NAMESPACE}")  # fmt: skip
    first = await phase(cluster, "Failed", "BuildFailed", words)
    # Later reconciles (here: the Job changes again) keep the same words, and post no event.
    await cluster.patch(cluster.JOB, job_name, {"metadata": {"labels": {"touched": "1"}}})
    await settled(operator)
    assert cluster.status(NAME)["message"] == first["message"]
    assert len(cluster.events("BuildFailed")) == 1


async def test_shared_scaled_to_zero_says_so(cluster: Cluster, operator: OperatorRunner) -> None:
    job_name = builders.job_name(NAME, key_of({**SHARED, "replicas": 0}))
    await cluster.create_reranker(NAME, {**SHARED, "replicas": 0})
    await wait_for(lambda: cluster.get(cluster.JOB, job_name), "the Job")
    await cluster.job_succeeded(job_name)
    await deployment(cluster)
    await phase(cluster, "Pending", "ScaledToZero", ("is built; scaled to zero replicas",))


# --------------------------------------------------------------------------- the HPA's word


async def test_hpa_without_its_metric_shows_in_status(
    cluster: Cluster, operator: OperatorRunner
) -> None:
    spec = {**SPEC, "replicas": None, "autoscaling": {"minReplicas": 1, "maxReplicas": 4}}
    spec.pop("replicas")
    await cluster.create_reranker(NAME, spec)
    dep = await deployment(cluster)
    await create_pod(cluster, dep, READY)
    await deployment_status(cluster, ready=1, updated=1, replicas=1)
    await wait_for(lambda: cluster.get(cluster.HPA, NAME), "the HPA")
    await phase(cluster, "Ready")
    missing = (
        "the HPA was unable to compute the replica count: unable to get metric "
        "reranker_requests_in_flight: no custom metrics API (custom.metrics.k8s.io) registered"
    )
    await cluster.patch(
        cluster.HPA,
        NAME,
        {
            "status": {
                "conditions": [
                    {"type": "AbleToScale", "status": "True", "reason": "SucceededGetScale"},
                    {
                        "type": "ScalingActive",
                        "status": "False",
                        "reason": "FailedGetPodsMetric",
                        "message": missing,
                    },
                ]
            }
        },
        sub="status",
    )
    await wait_for(
        lambda: condition(cluster, "ScalingActive").get("reason") == "FailedGetPodsMetric",
        "ScalingActive=False in status",
    )
    # It serves; it just cannot scale.
    await phase(cluster, "Ready", "FailedGetPodsMetric", ("cannot scale", "custom metrics API"))


# --------------------------------------------------------------------------- the Gateway's word


async def settled(operator: OperatorRunner, quiet_s: float = 0.5) -> None:
    """Until no reconcile has run for `quiet_s` (the operator's timers may start more later)."""

    def reconciles() -> float:
        (family,) = [
            f
            for f in operator.reconciler.metrics.registry.collect()
            if f.name == "reranker_operator_reconciles"
        ]
        return sum(s.value for s in family.samples if s.name.endswith("_total"))

    last, since = reconciles(), time.monotonic()
    while time.monotonic() - since < quiet_s:
        await asyncio.sleep(0.05)
        if (now_ := reconciles()) != last:
            last, since = now_, time.monotonic()


async def test_the_gateways_word_on_the_route_shows_in_status(
    cluster: Cluster, operator: OperatorRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Routes are not watched (the Gateway API is an add-on): a timer reads the route again,
    soon while it is not accepted."""
    for timer in ("ROUTE_RECHECK_SECONDS", "REFUSAL_RECHECK_SECONDS"):  # pending, refused
        monkeypatch.setattr(reconcile, timer, 1.0)
    spec = {
        **SPEC,
        "httpRoute": {"parentRefs": [{"name": "shared", "namespace": "gateway-system"}]},
    }
    await cluster.create_reranker(NAME, spec)
    dep = await deployment(cluster)
    await create_pod(cluster, dep, READY)
    await deployment_status(cluster, ready=3, updated=3, replicas=3)
    await wait_for(lambda: cluster.get(cluster.HTTP_ROUTE, NAME), "the HTTPRoute")
    await phase(cluster, "Ready", "Pending")
    assert condition(cluster, "RouteAccepted")["status"] == "False"
    assert (
        "not yet accepted by Gateway gateway-system/shared"
        in condition(cluster, "RouteAccepted")["message"]
    )

    async def gateway_says(accepted: str, reason: str, message: str) -> None:
        generation = cluster.get(cluster.HTTP_ROUTE, NAME)["metadata"].get("generation", 1)
        parent = {
            "parentRef": {"name": "shared", "namespace": "gateway-system"},
            "controllerName": "example.net/gateway-controller",
            "conditions": [
                {"type": "Accepted", "status": accepted, "reason": reason, "message": message,
                 "observedGeneration": generation, "lastTransitionTime": now()},
            ],
        }  # fmt: skip
        await cluster.patch(
            cluster.HTTP_ROUTE, NAME, {"status": {"parents": [parent]}}, sub="status"
        )

    async def timer_sees(accepted: str, reason: str, message: str) -> None:
        """Once the reconciles that follow the operator's own writes have run, only the timer
        can see the Gateway's answer (other triggers come 15 s or more apart: the timer's
        second answers well before)."""
        await settled(operator)
        await gateway_says(accepted, reason, message)
        await wait_for(
            lambda: (
                (c := condition(cluster, "RouteAccepted")).get("status") == accepted
                and c.get("reason") == reason
            ),
            f"RouteAccepted={accepted} ({reason})",
            timeout=5,
        )

    await timer_sees("False", "NotAllowedByListeners", "no listener allows namespace default")
    await phase(cluster, "Ready", "NotAllowedByListeners", ("HTTPRoute is refused",))
    await timer_sees("True", "Accepted", "")
    assert "HTTPRoute" not in cluster.status(NAME)["message"]


async def test_configured_service_monitor_is_created_per_reranker(
    cluster: Cluster, kmock: Any
) -> None:
    config = config_from_dict({"monitoring": {"kind": "ServiceMonitor"}})
    op = OperatorRunner(str(kmock.url), config)
    await op.start()
    try:
        await cluster.create_reranker(NAME, SPEC)
        monitor = await wait_for(
            lambda: cluster.get("monitoring.coreos.com/v1/servicemonitors", NAME),
            "the ServiceMonitor",
        )
        assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
        uid = cluster.get(cluster.RERANKER, NAME)["metadata"]["uid"]
        assert monitor["metadata"]["ownerReferences"][0]["uid"] == uid
    finally:
        await op.stop()


async def test_per_pod_scaled_to_zero_says_so(cluster: Cluster, operator: OperatorRunner) -> None:
    await cluster.create_reranker(NAME, {**SPEC, "replicas": 0})
    await deployment(cluster)
    await phase(cluster, "Pending", "ScaledToZero", ("0 replicas",))


async def test_pods_the_deployment_cannot_create_are_failed_with_the_reason(
    cluster: Cluster, operator: OperatorRunner
) -> None:
    """A ResourceQuota refuses the pods: no pod exists to say so, the Deployment's
    ReplicaFailure condition does (the Job-like "waiting to start" would wait for ever)."""
    await cluster.create_reranker(NAME, SPEC)
    await deployment(cluster)
    quota = (
        'pods "rr-5d8f-x" is forbidden: exceeded quota: gpu-quota, requested: '
        "requests.nvidia.com/gpu=1, used: requests.nvidia.com/gpu=4, limited: requests.nvidia.com/gpu=4"
    )
    await cluster.patch(cluster.DEPLOYMENT, NAME, {"status": {"replicas": 0, "conditions": [
        {"type": "Available", "status": "False", "reason": "MinimumReplicasUnavailable"},
        {"type": "ReplicaFailure", "status": "True", "reason": "FailedCreate", "message": quota,
         "lastTransitionTime": now()},
    ]}}, sub="status")  # fmt: skip
    # It may pass by itself (an old pod's quota freed as it goes): waiting first, then Failed
    # once unschedulableTimeoutSeconds have passed (the operator's timer looks again).
    await phase(cluster, "Pending", "FailedCreate", ("exceeded quota: gpu-quota", "waiting"))
    status = await phase(cluster, "Failed", "FailedCreate", ("exceeded quota: gpu-quota",))
    assert "ResourceQuota" in status["message"]
    assert condition(cluster, "Available")["reason"] == "FailedCreate"
