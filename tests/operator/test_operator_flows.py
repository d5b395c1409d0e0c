"""Whole operator flows: the real kopf operator against kmock's in-memory API server.

The emulator runs no controllers, so each test plays them (kmock_env.Cluster): it marks Jobs
running/succeeded/failed, creates the failed build pod with its termination message, reports
Deployment replicas ready, and bumps metadata.generation on spec changes like the API server.
Every wait is bounded polling (kmock_env.wait_for).
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import re
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from kmock_env import Cluster, OperatorRunner, declare_resources, wait_for
from reranker_operator import __version__, builders
from reranker_operator.config import OperatorConfig, config_from_dict
from reranker_operator.reconcile import ANNOTATION_ABANDONED, ANNOTATION_BUILT
from reranker_operator.spec import parse_spec

NAME = "bge"
# Most flows here follow the Shared engine cache (a build Job, the cache PVC); the PerPod mode
# (the default: pods build their own engine) has its flows in test_operator_status.py.
SPEC: dict[str, Any] = {
    "checkpoint": {"repo": "BAAI/bge-reranker-large", "revision": "main"},
    "accelerator": {"type": "L4"},
    "replicas": 1,
    "engineCache": {"mode": "Shared"},
}


def spec(**changes: Any) -> dict[str, Any]:
    out = copy.deepcopy(SPEC)
    out.update(changes)
    return out


def key_of(spec_: dict[str, Any]) -> str:
    return builders.engine_key_for(parse_spec({"spec": spec_}), OperatorConfig())


def engine_dir(deployment: dict[str, Any]) -> str:
    env = deployment["spec"]["template"]["spec"]["containers"][0]["env"]
    return next(e["value"] for e in env if e["name"] == "RERANKER_ENGINE_DIR")


@pytest.fixture()
async def cluster(kmock: Any) -> Cluster:
    declare_resources(kmock)
    return Cluster(kmock)


@pytest.fixture()
async def operator(kmock: Any, cluster: Cluster) -> AsyncIterator[OperatorRunner]:
    op = OperatorRunner(str(kmock.url))
    await op.start()
    try:
        yield op
    finally:
        await op.stop()


def job_creations(kmock: Any) -> int:
    return sum(1 for r in list(kmock) if r.method.value == "POST" and r.url.path.endswith("/jobs"))


def deployment_patches(kmock: Any) -> int:
    """PATCHes of Deployments by the operator (the test's own status patches excluded)."""
    return sum(
        1
        for r in list(kmock)
        if r.method.value == "PATCH"
        and "/deployments/" in r.url.path
        and not r.url.path.endswith("/status")
    )


async def finish_builds(cluster: Cluster, name: str, spec_: dict[str, Any]) -> None:
    """Play the Job controller: the build Job of `spec_` succeeds."""
    job = builders.job_name(name, key_of(spec_))
    await wait_for(lambda: cluster.get(cluster.JOB, job), f"Job {job}")
    await cluster.job_succeeded(job)


def prune_job(cluster: Cluster, key: str) -> dict[str, Any] | None:
    """The prune Job deleting engine `key` (its name also hashes the cache PVC's version)."""
    for job in cluster.list(cluster.JOB):
        args = job["spec"]["template"]["spec"]["containers"][0].get("args") or []
        if "-prune-" in job["metadata"]["name"] and f"/engines/{key}" in args:
            return job
    return None


async def rolled_to(cluster: Cluster, key: str, what: str) -> None:
    """Wait until the Deployment serves engine `key`."""
    await wait_for(
        lambda: engine_dir(cluster.get(cluster.DEPLOYMENT, NAME)) == f"/engines/{key}", what
    )


def operator_reads(kmock: Any, name: str = NAME) -> int:
    """GETs of the Reranker by the reconciler (kopf itself only lists and watches)."""
    return sum(
        1
        for r in list(kmock)
        if r.method.value == "GET" and r.url.path.endswith(f"/rerankers/{name}")
    )


async def bring_to_ready(cluster: Cluster, name: str = NAME, spec_: dict[str, Any] = SPEC) -> str:
    """create -> Job -> Job succeeded -> Deployment -> ready; returns the engine key."""
    key = key_of(spec_)
    job = builders.job_name(name, key)
    await cluster.create_reranker(name, spec_)
    await wait_for(lambda: cluster.get(cluster.JOB, job), f"Job {job}")
    await cluster.job_succeeded(job)
    await wait_for(lambda: cluster.get(cluster.DEPLOYMENT, name), "the Deployment")
    await cluster.deployment_ready(name)
    await wait_for(lambda: cluster.status(name).get("phase") == "Ready", "phase Ready")
    return key


def metric(op: OperatorRunner, name: str, **labels: str) -> float:
    value = op.reconciler.metrics.registry.get_sample_value(name, labels)
    assert value is not None, f"no sample {name}{labels}"
    return value


async def test_flows_metrics_count_reconciles_phases_and_events(
    cluster: Cluster, operator: OperatorRunner
) -> None:
    await bring_to_ready(cluster)
    # A reconcile is counted once it returns, just after the status it wrote: at least one per
    # phase entered below.
    await wait_for(
        lambda: metric(operator, "reranker_operator_reconciles_total", result="ok") >= 2,
        "the reconciles counted",
    )
    assert metric(operator, "reranker_operator_reconcile_duration_seconds_count") >= 2
    # Counted after the status PATCH returns, so possibly just after the test saw Ready.
    await wait_for(
        lambda: metric(operator, "reranker_operator_phase_transitions_total", phase="Ready"),
        "the transition to Ready counted",
    )
    entered = {
        phase: metric(operator, "reranker_operator_phase_transitions_total", phase=phase)
        for phase in ("Pending", "Building", "Deploying", "Ready", "Degraded", "Failed")
    }
    # Pending or Building first (whether the Job is seen running depends on timing), then Ready.
    assert entered["Pending"] + entered["Building"] >= 1
    assert (entered["Ready"], entered["Degraded"], entered["Failed"]) == (1, 0, 0)
    await wait_for(
        lambda: metric(operator, "reranker_operator_events_total", type="Normal", reason="Ready"),
        "the Ready event counted",
    )
    assert metric(operator, "reranker_operator_events_total", type="Normal", reason="Ready") == 1

    # A spec the API server's CEL rules would refuse (the emulator has none): Failed, counted.
    await cluster.create_reranker("bad", spec(accelerator={"type": "L4", "count": 2}))
    await wait_for(lambda: cluster.status("bad").get("phase") == "Failed", "phase Failed")
    await wait_for(
        lambda: metric(operator, "reranker_operator_reconciles_total", result="invalid_spec"),
        "the refused reconcile counted",
    )
    assert metric(operator, "reranker_operator_phase_transitions_total", phase="Failed") == 1
    await wait_for(
        lambda: metric(
            operator, "reranker_operator_events_total", type="Warning", reason="InvalidSpec"
        ),
        "the InvalidSpec event counted",
    )
    assert (
        metric(operator, "reranker_operator_events_total", type="Warning", reason="InvalidSpec")
        == 1
    )
    assert metric(operator, "reranker_operator_reconciles_total", result="error") == 0
    assert metric(operator, "reranker_operator_build_info", version=__version__) == 1


# --------------------------------------------------------------------------- the happy path


async def test_flows_create_build_deploy_ready(
    cluster: Cluster, operator: OperatorRunner, kmock: Any
) -> None:
    key = key_of(SPEC)
    job_name = builders.job_name(NAME, key)
    await cluster.create_reranker(NAME, SPEC)

    # The cache PVC and the build Job; status says the engine is on its way.
    job = await wait_for(lambda: cluster.get(cluster.JOB, job_name), "the build Job")
    assert cluster.get(cluster.PVC, builders.cache_pvc_name(NAME)) is not None
    assert job["spec"]["template"]["spec"]["containers"][0]["args"][-1] == f"/engines/{key}"
    await wait_for(lambda: cluster.status(NAME).get("phase") == "Pending", "phase Pending")
    assert cluster.condition(NAME, "EngineReady")["reason"] == "Building"
    assert cluster.get(cluster.DEPLOYMENT, NAME) is None

    await cluster.job_running(job_name)
    await wait_for(lambda: cluster.status(NAME).get("phase") == "Building", "phase Building")

    # Job succeeded: recorded on the cache, then the Deployment and Service.
    await cluster.job_succeeded(job_name)
    dep = await wait_for(lambda: cluster.get(cluster.DEPLOYMENT, NAME), "the Deployment")
    assert engine_dir(dep) == f"/engines/{key}"
    svc = await wait_for(lambda: cluster.get(cluster.SERVICE, NAME), "the Service")
    assert svc["spec"]["type"] == "ClusterIP" and svc["spec"]["ports"][0]["port"] == 8080
    pvc = cluster.get(cluster.PVC, builders.cache_pvc_name(NAME))
    assert key in pvc["metadata"]["annotations"][ANNOTATION_BUILT]
    await wait_for(lambda: cluster.status(NAME).get("phase") == "Deploying", "phase Deploying")
    assert cluster.condition(NAME, "Available")["status"] == "False"

    # Replicas ready: Ready, with the endpoint and conditions at this generation.
    await cluster.deployment_ready(NAME)
    await wait_for(lambda: cluster.status(NAME).get("phase") == "Ready", "phase Ready")
    status = cluster.status(NAME)
    assert status["endpoint"] == f"http://{NAME}.ml.svc.cluster.local:8080"
    assert status["observedGeneration"] == 1
    assert status["engine"]["key"] == key and status["engine"]["jobName"] == job_name
    assert status["engine"]["servingKey"] == key and status["engine"]["builtAt"]
    assert status["replicas"] == 1 and status["readyReplicas"] == 1
    assert status["selector"] == builders.selector_string(NAME)
    for type_ in ("EngineReady", "Available", "Ready"):
        cond = cluster.condition(NAME, type_)
        assert cond["status"] == "True", cond
        assert cond["observedGeneration"] == 1 and cond["lastTransitionTime"] and cond["reason"]

    # One replica: no PDB; no autoscaling: no HPA. kopf kept its bookkeeping out of status.
    assert cluster.get(cluster.PDB, NAME) is None and cluster.get(cluster.HPA, NAME) is None
    assert set(status) <= {
        "phase",
        "message",
        "conditions",
        "engine",
        "replicas",
        "readyReplicas",
        "observedGeneration",
        "endpoint",
        "selector",
    }
    assert job_creations(kmock) == 1
    # Events are posted right after the status write that they describe.
    await wait_for(
        lambda: {"BuildStarted", "EngineBuilt", "Ready"} <= {e["reason"] for e in cluster.events()},
        "BuildStarted, EngineBuilt and Ready events",
    )


async def test_flows_children_have_owner_references(
    cluster: Cluster, operator: OperatorRunner
) -> None:
    await bring_to_ready(cluster)
    uid = cluster.get(cluster.RERANKER, NAME)["metadata"]["uid"]
    key = key_of(SPEC)
    for resource, child in (
        (cluster.JOB, builders.job_name(NAME, key)),
        (cluster.DEPLOYMENT, NAME),
        (cluster.SERVICE, NAME),
    ):
        refs = cluster.get(resource, child)["metadata"]["ownerReferences"]
        assert refs == [
            {
                "apiVersion": "reranker.dev/v1alpha1",
                "kind": "Reranker",
                "name": NAME,
                "uid": uid,
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ], resource
    # Retention Retain (the default): the cache outlives the Reranker.
    pvc = cluster.get(cluster.PVC, builders.cache_pvc_name(NAME))
    assert "ownerReferences" not in pvc["metadata"]


# --------------------------------------------------------------------------- changes


async def test_flows_engine_change_builds_new_engine_while_old_serves(
    cluster: Cluster, operator: OperatorRunner
) -> None:
    old_key = await bring_to_ready(cluster)
    old_dep = cluster.get(cluster.DEPLOYMENT, NAME)

    new_spec = spec(checkpoint={"repo": "BAAI/bge-reranker-large", "revision": "v2"})
    new_key = key_of(new_spec)
    assert new_key != old_key
    new_job = builders.job_name(NAME, new_key)
    generation = await cluster.update_spec(NAME, {"checkpoint": {"revision": "v2"}})

    # A new Job; the Deployment is untouched and keeps serving the old engine.
    await wait_for(lambda: cluster.get(cluster.JOB, new_job), "the new engine's Job")
    await wait_for(
        lambda: cluster.status(NAME).get("observedGeneration") == generation, "the new generation"
    )
    assert cluster.get(cluster.DEPLOYMENT, NAME) == old_dep
    status = cluster.status(NAME)
    assert status["phase"] in ("Pending", "Building")
    assert status["engine"]["key"] == new_key and status["engine"]["servingKey"] == old_key
    assert cluster.condition(NAME, "Available")["status"] == "True"
    assert cluster.condition(NAME, "EngineReady")["reason"] == "Building"
    assert cluster.condition(NAME, "Ready")["status"] == "False"
    assert "still serving" in status["message"]

    # The new engine is built: the Deployment rolls to it.
    await cluster.job_succeeded(new_job)
    await rolled_to(cluster, new_key, "the rollout")
    await cluster.deployment_ready(NAME)
    await wait_for(
        lambda: (
            cluster.status(NAME).get("engine", {}).get("servingKey") == new_key
            and cluster.status(NAME).get("phase") == "Ready"
        ),
        "Ready on the new engine",
    )
    assert cluster.condition(NAME, "Ready")["observedGeneration"] == generation
    built = cluster.get(cluster.PVC, builders.cache_pvc_name(NAME))["metadata"]["annotations"][
        ANNOTATION_BUILT
    ]
    assert set(built.split(",")) == {old_key, new_key}


async def test_flows_replicas_and_autoscaling_patch_the_deployment_without_a_job(
    cluster: Cluster, operator: OperatorRunner, kmock: Any
) -> None:
    await bring_to_ready(cluster)
    assert job_creations(kmock) == 1

    await cluster.update_spec(NAME, {"replicas": 3, "resources": {"cpu": "2", "memory": "16Gi"}})
    dep = await wait_for(
        lambda: (
            (d := cluster.get(cluster.DEPLOYMENT, NAME)) and d["spec"].get("replicas") == 3 and d
        ),
        "the Deployment patched to 3 replicas",
    )
    resources = dep["spec"]["template"]["spec"]["containers"][0]["resources"]
    assert resources["requests"] == {"cpu": "2", "memory": "16Gi"}
    await wait_for(lambda: cluster.get(cluster.PDB, NAME), "a PDB for 3 replicas")
    await cluster.deployment_ready(NAME, 3)
    await wait_for(
        lambda: cluster.status(NAME).get("readyReplicas") == 3, "3 ready replicas in status"
    )
    assert cluster.status(NAME)["phase"] == "Ready"

    # Autoscaling instead of replicas: an HPA (the Deployment's replicas are the HPA's from now).
    await cluster.update_spec(
        NAME, {"replicas": None, "autoscaling": {"minReplicas": 2, "maxReplicas": 4}}
    )
    hpa = await wait_for(lambda: cluster.get(cluster.HPA, NAME), "the HPA")
    assert hpa["spec"]["minReplicas"] == 2 and hpa["spec"]["maxReplicas"] == 4

    # Back to one replica: the HPA and the PDB go.
    await cluster.update_spec(NAME, {"replicas": 1, "autoscaling": None})
    await wait_for(
        lambda: cluster.get(cluster.HPA, NAME) is None and cluster.get(cluster.PDB, NAME) is None,
        "HPA and PDB removed",
    )
    assert cluster.get(cluster.DEPLOYMENT, NAME)["spec"]["replicas"] == 1
    assert job_creations(kmock) == 1  # none of that rebuilt the engine


async def test_flows_service_type_ingress_and_the_external_endpoint(
    cluster: Cluster, operator: OperatorRunner
) -> None:
    lb = {
        "type": "LoadBalancer",
        "annotations": {"networking.gke.io/load-balancer-type": "Internal"},
    }
    await bring_to_ready(cluster, spec_=spec(service=lb))
    service = cluster.get(cluster.SERVICE, NAME)
    assert service["spec"]["type"] == "LoadBalancer"
    assert service["metadata"]["annotations"]["networking.gke.io/load-balancer-type"] == "Internal"
    assert "externalEndpoint" not in cluster.status(NAME)  # no address assigned yet

    # The cloud's controller assigns the address (and another controller annotates the Service).
    await cluster.patch(cluster.SERVICE, NAME, {"metadata": {"annotations": {"cloud/lb-id": "42"}}})
    await cluster.patch(cluster.SERVICE, NAME,
                        {"status": {"loadBalancer": {"ingress": [{"ip": "10.128.0.7"}]}}}, sub="status")  # fmt: skip
    await wait_for(
        lambda: cluster.status(NAME).get("externalEndpoint") == "http://10.128.0.7:8080",
        "the LoadBalancer's address in status",
    )

    # An Ingress with TLS; the user's Service annotation removed from the spec goes, the cloud's stays.
    ingress = {"host": "rerank.example.com", "tlsSecretName": "rerank-tls", "className": "nginx",
               "annotations": {"nginx.ingress.kubernetes.io/proxy-body-size": "4m"}}  # fmt: skip
    await cluster.update_spec(NAME, {"service": {"annotations": None}, "ingress": ingress})
    created = await wait_for(lambda: cluster.get(cluster.INGRESS, NAME), "the Ingress")
    assert created["spec"]["ingressClassName"] == "nginx"
    assert created["spec"]["tls"] == [{"hosts": ["rerank.example.com"], "secretName": "rerank-tls"}]
    [path] = created["spec"]["rules"][0]["http"]["paths"]
    assert path["backend"] == {"service": {"name": NAME, "port": {"name": "http"}}}
    assert created["metadata"]["annotations"]["nginx.ingress.kubernetes.io/proxy-body-size"] == "4m"
    assert created["metadata"]["ownerReferences"][0]["kind"] == "Reranker"
    await wait_for(
        lambda: cluster.status(NAME).get("externalEndpoint") == "https://rerank.example.com",
        "the Ingress's URL in status",
    )
    annotations = await wait_for(
        lambda: (
            (a := cluster.get(cluster.SERVICE, NAME)["metadata"]["annotations"])
            and "networking.gke.io/load-balancer-type" not in a
            and a
        ),
        "the removed Service annotation gone",
    )
    assert annotations["cloud/lb-id"] == "42"
    # Deleted by hand: put back (the operator watches its Ingresses).
    await cluster.delete(cluster.INGRESS, NAME)
    await wait_for(lambda: cluster.get(cluster.INGRESS, NAME), "the Ingress put back")

    # A Gateway API route instead of the Ingress, then neither, and back to ClusterIP: each goes,
    # and so does the external endpoint.
    route = {"parentRefs": [{"name": "shared", "namespace": "gateway-system"}],
             "hostnames": ["rerank.example.com"]}  # fmt: skip
    await cluster.update_spec(NAME, {"ingress": None, "httpRoute": route})
    await wait_for(lambda: cluster.get(cluster.INGRESS, NAME) is None, "the Ingress deleted")
    created_route = await wait_for(lambda: cluster.get(cluster.HTTP_ROUTE, NAME), "the HTTPRoute")
    assert created_route["spec"]["parentRefs"] == route["parentRefs"]
    assert created_route["spec"]["rules"][0]["backendRefs"] == [{"name": NAME, "port": 8080}]
    await cluster.update_spec(NAME, {"service": None, "httpRoute": None})
    await wait_for(lambda: cluster.get(cluster.HTTP_ROUTE, NAME) is None, "the HTTPRoute deleted")
    await wait_for(
        lambda: (
            "externalEndpoint" not in cluster.status(NAME)
            and cluster.get(cluster.SERVICE, NAME)["spec"]["type"] == "ClusterIP"
        ),
        "ClusterIP, no external endpoint",
    )
    assert cluster.status(NAME)["phase"] == "Ready"

    # The user's own Ingress of that name (say, for gRPC) is not the operator's to delete.
    user_ingress = {"apiVersion": "networking.k8s.io/v1", "kind": "Ingress",
                    "metadata": {"name": NAME}, "spec": {"defaultBackend": {
                        "service": {"name": NAME, "port": {"name": "grpc"}}}}}  # fmt: skip
    await cluster.create(cluster.INGRESS, user_ingress)
    await cluster.update_spec(NAME, {"replicas": 2})  # a reconcile that renders no Ingress
    await wait_for(lambda: cluster.get(cluster.PDB, NAME), "the reconcile of 2 replicas")
    assert cluster.get(cluster.INGRESS, NAME) is not None


async def test_flows_l4_to_cpu_leaves_no_gpu_placement_on_the_deployment(
    cluster: Cluster, operator: OperatorRunner
) -> None:
    await bring_to_ready(cluster)
    gpu_pod = cluster.get(cluster.DEPLOYMENT, NAME)["spec"]["template"]["spec"]
    assert gpu_pod["affinity"] and gpu_pod["tolerations"]

    cpu_spec = spec(accelerator={"type": "CPU"})
    await cluster.update_spec(NAME, {"accelerator": {"type": "CPU"}})
    await finish_builds(cluster, NAME, cpu_spec)
    dep = await wait_for(
        lambda: (
            (d := cluster.get(cluster.DEPLOYMENT, NAME))
            and engine_dir(d) == f"/engines/{key_of(cpu_spec)}"
            and d
        ),
        "the Deployment on the CPU engine",
    )
    pod = dep["spec"]["template"]["spec"]
    assert "affinity" not in pod and "tolerations" not in pod and "nodeSelector" not in pod
    for c in pod["containers"] + pod.get("initContainers", []):
        assert "nvidia.com/gpu" not in c["resources"].get("limits", {})
    assert dep["spec"]["replicas"] == 1


async def test_flows_a_rollout_restart_and_runtime_volumes_through_later_patches(
    cluster: Cluster, operator: OperatorRunner
) -> None:
    """`kubectl rollout restart`, then a replica change: the operator's patch keeps the pod
    template as it is (no second rollout). Volumes added to the spec reach the server; removed
    again, they leave the Deployment."""
    await bring_to_ready(cluster)
    stamp = {builders.ANNOTATION_RESTARTED_AT: "2026-12-02T15:00:00Z"}
    restart = {"spec": {"template": {"metadata": {"annotations": stamp}}}}
    await cluster.patch(cluster.DEPLOYMENT, NAME, restart)
    template = cluster.get(cluster.DEPLOYMENT, NAME)["spec"]["template"]
    assert template["metadata"]["annotations"][builders.ANNOTATION_RESTARTED_AT]

    await cluster.update_spec(NAME, {"replicas": 3})
    dep = await wait_for(
        lambda: (d := cluster.get(cluster.DEPLOYMENT, NAME)) and d["spec"]["replicas"] == 3 and d,
        "the Deployment at 3 replicas",
    )
    assert dep["spec"]["template"] == template

    volumes = [{"name": "otlp-ca", "configMap": {"name": "corp-ca"}}]
    mounts = [{"name": "otlp-ca", "mountPath": "/etc/otlp", "readOnly": True}]
    await cluster.update_spec(NAME, {"runtime": {"volumes": volumes, "volumeMounts": mounts}})

    def server(d: dict[str, Any]) -> dict[str, Any]:
        [c] = d["spec"]["template"]["spec"]["containers"]
        return c

    dep = await wait_for(
        lambda: (
            (d := cluster.get(cluster.DEPLOYMENT, NAME))
            and volumes[0] in d["spec"]["template"]["spec"]["volumes"]
            and d
        ),
        "the volume on the Deployment",
    )
    assert mounts[0] in server(dep)["volumeMounts"]
    assert dep["spec"]["template"]["metadata"]["annotations"][builders.ANNOTATION_RESTARTED_AT]

    await cluster.update_spec(NAME, {"runtime": {"volumes": None, "volumeMounts": None}})
    dep = await wait_for(
        lambda: (
            (d := cluster.get(cluster.DEPLOYMENT, NAME))
            and volumes[0] not in d["spec"]["template"]["spec"]["volumes"]
            and d
        ),
        "the volume gone from the Deployment",
    )
    assert mounts[0] not in server(dep)["volumeMounts"]


def pvc_patches(kmock: Any) -> int:
    return sum(
        1
        for r in list(kmock)
        if r.method.value == "PATCH" and "/persistentvolumeclaims/" in r.url.path
    )


async def test_flows_spec_labels_reach_the_children_and_the_existing_cache_pvc(
    cluster: Cluster, operator: OperatorRunner, kmock: Any
) -> None:
    """spec.labels added to a serving Reranker: the Deployment, its pods and the Service get
    them by their usual patch, the cache PVC (its spec immutable) by a patch of its labels
    alone, which keeps the built-engines record. Removed again, they leave all of them."""
    key = await bring_to_ready(cluster)
    pvc_name = builders.cache_pvc_name(NAME)
    await cluster.update_spec(NAME, {"labels": {"team": "search"}})

    def labelled(resource: Any, name: str) -> bool:
        obj = cluster.get(resource, name)
        return obj is not None and obj["metadata"].get("labels", {}).get("team") == "search"

    await wait_for(lambda: labelled(cluster.PVC, pvc_name), "the cache PVC labelled")
    for resource in (cluster.DEPLOYMENT, cluster.SERVICE):
        await wait_for(lambda r=resource: labelled(r, NAME), f"{resource} labelled")
    template = cluster.get(cluster.DEPLOYMENT, NAME)["spec"]["template"]["metadata"]["labels"]
    assert template["team"] == "search"
    pvc = cluster.get(cluster.PVC, pvc_name)
    assert key in pvc["metadata"]["annotations"]["reranker.dev/built-engines"]
    patches = pvc_patches(kmock)
    await cluster.update_spec(NAME, {"replicas": 2})  # another change: the PVC is left alone
    await wait_for(lambda: cluster.get(cluster.DEPLOYMENT, NAME)["spec"]["replicas"] == 2, "2")
    assert pvc_patches(kmock) == patches

    await cluster.update_spec(NAME, {"labels": None})
    await wait_for(lambda: not labelled(cluster.PVC, pvc_name), "the label gone from the PVC")
    await wait_for(lambda: not labelled(cluster.SERVICE, NAME), "the label gone from the Service")
    pvc = cluster.get(cluster.PVC, pvc_name)
    assert builders.ANNOTATION_USER_KEYS not in pvc["metadata"]["annotations"]
    assert key in pvc["metadata"]["annotations"]["reranker.dev/built-engines"]


async def test_flows_long_names_sharing_a_prefix_get_distinct_children(
    cluster: Cluster, operator: OperatorRunner
) -> None:
    prefix = "bge-reranker-large-production-search-" + "x" * 8  # 45 characters
    names = [prefix + "-europe-west4-a", prefix + "-europe-west4-b"]
    for name in names:
        await cluster.create_reranker(name, SPEC)
    for name in names:
        await finish_builds(cluster, name, SPEC)
        await wait_for(lambda n=name: cluster.get(cluster.DEPLOYMENT, n), f"Deployment {name}")
    for resource in (cluster.JOB, cluster.DEPLOYMENT, cluster.SERVICE, cluster.PVC):
        owners = [o["metadata"]["labels"][builders.LABEL_RERANKER] for o in cluster.list(resource)]
        assert sorted(owners) == sorted(names), resource
        for obj in cluster.list(resource):
            assert len(obj["metadata"]["name"]) <= 63 or resource == cluster.PVC


async def test_flows_children_are_patched_only_when_the_spec_changes(
    cluster: Cluster, operator: OperatorRunner, kmock: Any
) -> None:
    await bring_to_ready(cluster)
    patches = deployment_patches(kmock)
    # A change that is not part of the spec (a label) reconciles without touching the children.
    reads = operator_reads(kmock)
    await cluster.patch(cluster.RERANKER, NAME, {"metadata": {"labels": {"team": "search"}}})
    await wait_for(lambda: operator_reads(kmock) > reads, "a reconcile after the label change")
    await cluster.deployment_ready(NAME)
    await wait_for(lambda: operator_reads(kmock) > reads + 1, "a reconcile after a child event")
    assert deployment_patches(kmock) == patches
    await cluster.update_spec(NAME, {"resources": {"memory": "8Gi"}})
    await wait_for(lambda: deployment_patches(kmock) == patches + 1, "one Deployment patch")


async def test_flows_shared_cache_prunes_engines_no_longer_served(
    cluster: Cluster, kmock: Any
) -> None:
    """keepEngines 0: after a successful rollout, only the served engine stays."""
    op = OperatorRunner(str(kmock.url), config_from_dict({"engineCache": {"keepEngines": 0}}))
    await op.start()
    try:
        keys = [await bring_to_ready(cluster)]
        for revision in ("v2",):
            new_spec = spec(checkpoint={"repo": "BAAI/bge-reranker-large", "revision": revision})
            await cluster.update_spec(NAME, {"checkpoint": {"revision": revision}})
            await finish_builds(cluster, NAME, new_spec)
            keys.append(key_of(new_spec))
            await rolled_to(cluster, keys[-1], "the rollout")
            await cluster.deployment_ready(NAME)
            await wait_for(
                lambda: (
                    cluster.status(NAME).get("engine", {}).get("servingKey") == keys[-1]
                    and cluster.status(NAME).get("phase") == "Ready"
                ),
                f"Ready on {revision}",
            )

        def built() -> set[str]:
            pvc = cluster.get(cluster.PVC, builders.cache_pvc_name(NAME))
            return set(pvc["metadata"]["annotations"][ANNOTATION_BUILT].split(","))

        await wait_for(lambda: built() == {keys[1]}, "the first engine forgotten")
        job = await wait_for(lambda: prune_job(cluster, keys[0]), "the prune Job")
        (c,) = job["spec"]["template"]["spec"]["containers"]
        assert c["args"] == [f"/engines/{keys[0]}"]
        assert "nvidia.com/gpu" not in str(c["resources"])
        await wait_for(lambda: cluster.events("EnginesPruned"), "an EnginesPruned event")
        assert (
            len([j for j in cluster.list(cluster.JOB) if "-prune-" in j["metadata"]["name"]]) == 1
        )
    finally:
        await op.stop()


# --------------------------------------------------------------------------- failures


async def test_flows_failed_build_is_failed_with_the_termination_message(
    cluster: Cluster, operator: OperatorRunner
) -> None:
    job = builders.job_name(NAME, key_of(SPEC))
    await cluster.create_reranker(NAME, SPEC)
    await wait_for(lambda: cluster.get(cluster.JOB, job), "the build Job")
    await cluster.job_failed(
        job, "checkpoint BAAI/bge-reranker-large@main: 401 Unauthorized (set checkpoint.secretName)"
    )

    await wait_for(lambda: cluster.status(NAME).get("phase") == "Failed", "phase Failed")
    engine = cluster.condition(NAME, "EngineReady")
    assert engine["status"] == "False" and engine["reason"] == "BuildFailed"
    assert "401 Unauthorized" in engine["message"]
    assert cluster.condition(NAME, "Ready")["reason"] == "BuildFailed"
    assert cluster.condition(NAME, "Available")["status"] == "False"
    assert "401 Unauthorized" in cluster.status(NAME)["message"]
    events = await wait_for(lambda: cluster.events("BuildFailed"), "a BuildFailed event")
    assert events[0]["type"] == "Warning" and "401 Unauthorized" in events[0]["message"]
    assert events[0]["involvedObject"]["name"] == NAME
    assert cluster.get(cluster.DEPLOYMENT, NAME) is None
    assert len(cluster.events("BuildFailed")) == 1  # not re-posted by later reconciles


async def test_flows_failed_new_engine_while_old_serves_is_degraded(
    cluster: Cluster, operator: OperatorRunner
) -> None:
    old_key = await bring_to_ready(cluster)
    old_dep = cluster.get(cluster.DEPLOYMENT, NAME)
    new_job = builders.job_name(NAME, key_of(spec(build={"maxNumTokens": 8192})))
    await cluster.update_spec(NAME, {"build": {"maxNumTokens": 8192}})
    await wait_for(lambda: cluster.get(cluster.JOB, new_job), "the new engine's Job")

    await cluster.job_failed(new_job, "out of GPU memory building max_num_tokens=8192")
    await wait_for(lambda: cluster.status(NAME).get("phase") == "Degraded", "phase Degraded")
    assert cluster.condition(NAME, "EngineReady")["reason"] == "BuildFailed"
    assert "out of GPU memory" in cluster.condition(NAME, "EngineReady")["message"]
    assert cluster.condition(NAME, "Available")["status"] == "True"
    assert cluster.condition(NAME, "Ready")["status"] == "False"
    assert cluster.status(NAME)["engine"]["servingKey"] == old_key
    assert cluster.get(cluster.DEPLOYMENT, NAME) == old_dep  # untouched, still serving
    await wait_for(lambda: cluster.events("BuildFailed"), "a BuildFailed event")


async def test_flows_invalid_spec_fails_naming_the_field(
    cluster: Cluster, operator: OperatorRunner, kmock: Any
) -> None:
    # The CRD's CEL rule refuses fp8 on T4; the emulator has no CEL, like an old CRD would not.
    bad = spec(accelerator={"type": "T4"}, build={"quantization": "fp8"})
    await cluster.create_reranker(NAME, bad)
    await wait_for(lambda: cluster.status(NAME).get("phase") == "Failed", "phase Failed")
    ready = cluster.condition(NAME, "Ready")
    assert ready["status"] == "False" and ready["reason"] == "InvalidSpec"
    assert "spec.build.quantization" in ready["message"]
    assert cluster.status(NAME)["observedGeneration"] == 1
    assert cluster.get(cluster.PVC, builders.cache_pvc_name(NAME)) is None
    assert job_creations(kmock) == 0
    await wait_for(lambda: cluster.events("InvalidSpec"), "an InvalidSpec event")

    # A PermanentError: kopf marks the spec as handled (its diff-base annotation, not status) and
    # stops retrying. (The emulator assigns no resourceVersions, so kopf may run the handler a
    # couple of times before its own patch is seen: each run is idempotent and posts nothing new.)
    def handled() -> bool:
        annotations = cluster.get(cluster.RERANKER, NAME)["metadata"].get("annotations") or {}
        return "fp8" in annotations.get("reranker.dev/last-handled-configuration", "")

    await wait_for(handled, "kopf to record the spec as handled")
    assert "kopf" not in cluster.status(NAME)

    # A negative check needs a window: 1.5s is 7x the tests' retry backoff (0.2s, 5 retries),
    # so retrying would show as 6+ reads.
    await asyncio.sleep(1.5)
    assert operator_reads(kmock) <= 3, "the operator kept retrying an invalid spec"
    assert len(cluster.events("InvalidSpec")) == 1

    # Fixing the spec recovers.
    await cluster.update_spec(NAME, {"build": {"quantization": "no_quant"}})
    await wait_for(lambda: cluster.list(cluster.JOB), "a Job after the fix")
    await wait_for(lambda: cluster.status(NAME).get("phase") in ("Pending", "Building"), "building")


async def test_flows_an_external_autoscalers_replica_count_is_left_alone(
    cluster: Cluster, operator: OperatorRunner
) -> None:
    """autoscaling.metric External: KEDA (here the test) scales the Deployment, to zero too; the
    operator creates no HPA and never puts the count back (it does for a kubectl scale without
    autoscaling)."""
    external = spec(replicas=None, autoscaling={"maxReplicas": 4, "metric": "External"})
    await bring_to_ready(cluster, spec_=external)
    await cluster.patch(cluster.DEPLOYMENT, NAME, {"spec": {"replicas": 0}})
    await cluster.deployment_ready(NAME, 0)
    await wait_for(
        lambda: cluster.condition(NAME, "Available").get("reason") == "ScaledToZero",
        "scaled to zero by the external autoscaler",
    )
    await cluster.update_spec(NAME, {"resources": {"memory": "12Gi"}})  # a patch of the template
    await wait_for(
        lambda: "12Gi" in str(cluster.get(cluster.DEPLOYMENT, NAME)["spec"]["template"]),
        "the Deployment patched",
    )
    assert cluster.get(cluster.DEPLOYMENT, NAME)["spec"]["replicas"] == 0
    assert cluster.get(cluster.HPA, NAME) is None and cluster.get(cluster.PDB, NAME)

    # Back to the operator's HPA: an HPA never scales up from zero, so the count starts at its
    # minimum.
    await cluster.update_spec(NAME, {"autoscaling": {"metric": "Concurrency", "minReplicas": 2}})
    await wait_for(lambda: cluster.get(cluster.HPA, NAME), "the operator's HPA")
    await wait_for(
        lambda: cluster.get(cluster.DEPLOYMENT, NAME)["spec"]["replicas"] == 2, "2 replicas"
    )


# --------------------------------------------------------------------------- build Jobs that cannot help


async def test_flows_failed_build_is_replaced_when_the_pod_settings_change(
    cluster: Cluster, operator: OperatorRunner, kmock: Any
) -> None:
    """OOMKilled at 10Gi: raising spec.resources.build.memory (same engine key) builds again at
    32Gi, where the old Job would have kept the Reranker Failed until its TTL."""
    job = builders.job_name(NAME, key_of(SPEC))
    await cluster.create_reranker(NAME, SPEC)
    await wait_for(lambda: cluster.get(cluster.JOB, job), "the build Job")
    await cluster.job_failed(
        job, "OOMKilled (memory limit 10Gi): raise spec.resources.build.memory"
    )
    await wait_for(lambda: cluster.status(NAME).get("phase") == "Failed", "phase Failed")
    assert job_creations(kmock) == 1

    raised = {"resources": {"build": {"memory": "32Gi"}}}
    await cluster.update_spec(NAME, raised)
    assert key_of(spec(**raised)) == key_of(SPEC)  # the same engine
    await wait_for(lambda: job_creations(kmock) == 2, "a new Job of the same name")
    await cluster.delete(cluster.POD, f"{job}-x1y2z")  # the garbage collector's part
    new = cluster.get(cluster.JOB, job)
    (c,) = new["spec"]["template"]["spec"]["containers"]
    assert c["resources"]["limits"]["memory"] == c["resources"]["requests"]["memory"] == "32Gi"
    assert not new.get("status")  # a fresh Job, not the failed one
    await wait_for(
        lambda: cluster.status(NAME).get("phase") in ("Pending", "Building"), "building again"
    )
    (event,) = await wait_for(lambda: cluster.events("BuildRestarted"), "a BuildRestarted event")
    assert job in event["message"] and "spec changed since it failed" in event["message"]

    # An unchanged spec keeps a failed Job as it is (a GPU build that failed fails again).
    await cluster.job_failed(job, "checkpoint: 401 Unauthorized")
    await wait_for(lambda: cluster.status(NAME).get("phase") == "Failed", "Failed again")
    await cluster.patch(cluster.RERANKER, NAME, {"metadata": {"labels": {"touched": "yes"}}})
    await asyncio.sleep(0.5)
    assert job_creations(kmock) == 2


async def test_flows_superseded_build_is_cancelled_and_its_leftovers_pruned(
    cluster: Cluster, kmock: Any
) -> None:
    """a serves; b builds; the spec moves on to c: b's Job goes (freeing its GPU), and the prune
    after c's rollout removes what b wrote."""
    op = OperatorRunner(str(kmock.url), config_from_dict({"engineCache": {"keepEngines": 1}}))
    await op.start()
    try:
        key_a = await bring_to_ready(cluster)
        spec_b, spec_c = spec(build={"maxNumTokens": 8192}), spec(build={"maxNumTokens": 4096})
        job_b = builders.job_name(NAME, key_of(spec_b))
        await cluster.update_spec(NAME, {"build": {"maxNumTokens": 8192}})
        await wait_for(lambda: cluster.get(cluster.JOB, job_b), "b's Job")
        await cluster.job_running(job_b)

        await cluster.update_spec(NAME, {"build": {"maxNumTokens": 4096}})
        await wait_for(lambda: cluster.get(cluster.JOB, job_b) is None, "b's Job deleted")
        (event,) = await wait_for(lambda: cluster.events("BuildCancelled"), "BuildCancelled")
        assert job_b in event["message"]
        await finish_builds(cluster, NAME, spec_c)
        await rolled_to(cluster, key_of(spec_c), "the rollout to c")
        await cluster.deployment_ready(NAME)
        job = await wait_for(lambda: prune_job(cluster, key_of(spec_b)), "the prune Job for b")
        assert job["spec"]["template"]["spec"]["containers"][0]["args"] == [
            f"/engines/{key_of(spec_b)}"
        ]

        def annotations() -> dict[str, str]:
            pvc = cluster.get(cluster.PVC, builders.cache_pvc_name(NAME))
            return dict(pvc["metadata"]["annotations"])

        await wait_for(lambda: ANNOTATION_ABANDONED not in annotations(), "b forgotten")
        assert set(annotations()[ANNOTATION_BUILT].split(",")) == {key_a, key_of(spec_c)}
        assert cluster.get(cluster.JOB, builders.job_name(NAME, key_a))  # a is kept (keep 1)
    finally:
        await op.stop()


async def test_flows_going_back_to_a_pruned_engine_builds_it_again(
    cluster: Cluster, kmock: Any
) -> None:
    """keepEngines 0: a -> b prunes a (its directory and its finished Job); back to a, a new
    Job builds it once the prune Job is done, and the Deployment waits for that build."""
    op = OperatorRunner(str(kmock.url), config_from_dict({"engineCache": {"keepEngines": 0}}))
    await op.start()
    try:
        key_a = await bring_to_ready(cluster)
        job_a = builders.job_name(NAME, key_a)
        spec_b = spec(checkpoint={"repo": "BAAI/bge-reranker-large", "revision": "v2"})
        await cluster.update_spec(NAME, {"checkpoint": {"revision": "v2"}})
        await finish_builds(cluster, NAME, spec_b)
        await rolled_to(cluster, key_of(spec_b), "the rollout to b")
        await cluster.deployment_ready(NAME)
        prune = (await wait_for(lambda: prune_job(cluster, key_a), "the prune Job"))["metadata"][
            "name"
        ]
        await wait_for(lambda: cluster.get(cluster.JOB, job_a) is None, "a's finished Job deleted")

        # Back to a while the prune Job has not run: the build waits for it.
        await cluster.update_spec(NAME, {"checkpoint": {"revision": "main"}})
        await wait_for(
            lambda: cluster.condition(NAME, "EngineReady").get("reason") == "WaitingForPrune",
            "waiting for the prune",
        )
        assert prune in cluster.condition(NAME, "EngineReady")["message"]
        assert cluster.get(cluster.JOB, job_a) is None
        await cluster.job_succeeded(prune)
        await wait_for(lambda: cluster.get(cluster.JOB, job_a), "a new Job for a")
        await asyncio.sleep(0.3)
        # Still serving b: a is not on the volume until its new Job succeeds.
        assert engine_dir(cluster.get(cluster.DEPLOYMENT, NAME)) == f"/engines/{key_of(spec_b)}"
        await cluster.job_succeeded(job_a)
        await rolled_to(cluster, key_a, "the rollout back to a")
    finally:
        await op.stop()


async def test_flows_while_a_build_runs_the_rest_follows_the_spec(
    cluster: Cluster, operator: OperatorRunner
) -> None:
    """A Service deleted by hand comes back and spec.replicas applies during a build; the
    Deployment keeps the engine it serves until the new one is built. A `kubectl scale
    deployment` is undone: spec.replicas is the count."""
    old_key = await bring_to_ready(cluster)
    await cluster.patch(cluster.DEPLOYMENT, NAME, {"spec": {"replicas": 0}})
    await wait_for(
        lambda: cluster.get(cluster.DEPLOYMENT, NAME)["spec"]["replicas"] == 1, "1 replica again"
    )

    await cluster.update_spec(NAME, {"build": {"maxNumTokens": 8192}})
    await wait_for(
        lambda: cluster.condition(NAME, "EngineReady").get("reason") == "Building", "building"
    )
    await cluster.delete(cluster.SERVICE, NAME)
    await wait_for(lambda: cluster.get(cluster.SERVICE, NAME), "the Service restored")
    await cluster.update_spec(NAME, {"replicas": 3})
    await wait_for(lambda: cluster.get(cluster.PDB, NAME), "a PDB for 3 replicas")
    dep = await wait_for(
        lambda: (d := cluster.get(cluster.DEPLOYMENT, NAME)) and d["spec"]["replicas"] == 3 and d,
        "3 replicas while building",
    )
    assert engine_dir(dep) == f"/engines/{old_key}"


async def test_flows_a_switch_to_per_pod_cancels_the_shared_build(
    cluster: Cluster, operator: OperatorRunner
) -> None:
    """Shared -> PerPod during a build: the Job would hold its GPU for an engine nobody reads."""
    job = builders.job_name(NAME, key_of(SPEC))
    await cluster.create_reranker(NAME, SPEC)
    await wait_for(lambda: cluster.get(cluster.JOB, job), "the build Job")
    await cluster.job_running(job)
    await cluster.update_spec(NAME, {"engineCache": {"mode": "PerPod"}})
    await wait_for(lambda: cluster.get(cluster.JOB, job) is None, "the Shared build cancelled")
    await wait_for(lambda: cluster.get(cluster.DEPLOYMENT, NAME), "the PerPod Deployment")
    await wait_for(lambda: cluster.events("BuildCancelled"), "a BuildCancelled event")


# --------------------------------------------------------------------------- restarts and deletion


async def test_flows_operator_restart_mid_build_does_not_duplicate_the_job(
    cluster: Cluster, kmock: Any
) -> None:
    job = builders.job_name(NAME, key_of(SPEC))
    first = OperatorRunner(str(kmock.url))
    await first.start()
    try:
        await cluster.create_reranker(NAME, SPEC)
        await wait_for(lambda: cluster.get(cluster.JOB, job), "the build Job")
        await cluster.job_running(job)
        await wait_for(lambda: cluster.status(NAME).get("phase") == "Building", "phase Building")
    finally:
        await first.stop()

    reads = operator_reads(kmock)
    second = OperatorRunner(str(kmock.url))
    await second.start()
    try:
        # The new operator resumes the Reranker (kopf's on.resume) and finds the running Job.
        await wait_for(lambda: operator_reads(kmock) > reads, "the new operator to reconcile")
        assert job_creations(kmock) == 1
        await cluster.job_succeeded(job)
        await wait_for(lambda: cluster.get(cluster.DEPLOYMENT, NAME), "the Deployment")
        await cluster.deployment_ready(NAME)
        await wait_for(lambda: cluster.status(NAME).get("phase") == "Ready", "phase Ready")
        assert job_creations(kmock) == 1
        assert len(cluster.list(cluster.JOB)) == 1
    finally:
        await second.stop()


async def test_flows_deletion_and_recreation_reuses_the_retained_cache(
    cluster: Cluster, operator: OperatorRunner, kmock: Any
) -> None:
    key = await bring_to_ready(cluster)
    await cluster.delete(cluster.RERANKER, NAME)
    # No finalizers: the API server deletes it at once (nothing for the operator to block on).
    await wait_for(lambda: cluster.get(cluster.RERANKER, NAME) is None, "the Reranker gone")

    # A child's event after the owner is gone is a no-op, not a crash or a re-creation.
    reads = operator_reads(kmock)
    await cluster.deployment_ready(NAME, 1)
    await wait_for(
        lambda: operator_reads(kmock) > reads, "a reconcile after the Deployment's event"
    )
    assert cluster.get(cluster.RERANKER, NAME) is None and job_creations(kmock) == 1
    # Play the garbage collector: owned children go, the retained cache stays.
    for resource, child in (
        (cluster.DEPLOYMENT, NAME),
        (cluster.SERVICE, NAME),
        (cluster.JOB, builders.job_name(NAME, key)),
    ):
        await cluster.delete(resource, child)
    assert cluster.get(cluster.PVC, builders.cache_pvc_name(NAME)) is not None

    # Re-created with the same spec: the engine is known built, no new Job.
    await cluster.create_reranker(NAME, SPEC)
    dep = await wait_for(lambda: cluster.get(cluster.DEPLOYMENT, NAME), "the Deployment")
    assert engine_dir(dep) == f"/engines/{key}"
    assert job_creations(kmock) == 1
    await cluster.deployment_ready(NAME)
    await wait_for(lambda: cluster.status(NAME).get("phase") == "Ready", "phase Ready")


async def test_flows_cache_retention_delete_owns_the_pvc(
    cluster: Cluster, operator: OperatorRunner
) -> None:
    await cluster.create_reranker(NAME, spec(engineCache={"mode": "Shared", "retention": "Delete"}))
    pvc = await wait_for(
        lambda: cluster.get(cluster.PVC, builders.cache_pvc_name(NAME)), "the cache PVC"
    )
    uid = cluster.get(cluster.RERANKER, NAME)["metadata"]["uid"]
    assert [r["uid"] for r in pvc["metadata"]["ownerReferences"]] == [uid]


# --------------------------------------------------------------------------- `reranker-operator run`


async def test_flows_run_command_with_kubeconfig(
    cluster: Cluster, kmock: Any, tmp_path: Path
) -> None:
    """The CLI as deployed: kubeconfig resolution, liveness, SIGTERM, JSON logs.

    All namespaces: with --namespace kopf also lists /api/v1/namespaces, a path kmock 0.8 cannot
    parse (a 500 from its path parser), so namespace scoping is checked in the unit test below.
    """
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "test",
        "clusters": [{"name": "kmock", "cluster": {"server": str(kmock.url).rstrip("/")}}],
        "users": [{"name": "test", "user": {"token": "test-token"}}],
        "contexts": [{"name": "test", "context": {"cluster": "kmock", "user": "test"}}],
    }))  # fmt: skip
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "KUBECONFIG": str(kubeconfig)}
    env.pop("RERANKER_OPERATOR_NAMESPACES", None)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        metrics_port = sock.getsockname()[1]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "reranker_operator.cli", "run", "--all-namespaces", "--liveness-port", str(port),
        "--metrics-port", str(metrics_port),
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    try:
        await cluster.create_reranker(NAME, SPEC)
        await wait_for(
            lambda: cluster.list(cluster.JOB), "the build Job from the CLI operator", timeout=30
        )

        async def alive() -> bool:
            reader_writer = None
            try:
                reader_writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                return False
            reader, writer = reader_writer
            writer.write(b"GET /healthz HTTP/1.0\r\n\r\n")
            await writer.drain()
            head = await reader.read(64)
            writer.close()
            return head.startswith(b"HTTP/1.") and b" 200 " in head

        await wait_for(alive, "the liveness endpoint", timeout=15)

        def scraped() -> str:
            url = f"http://127.0.0.1:{metrics_port}/metrics"
            with urllib.request.urlopen(url, timeout=5) as response:
                return response.read().decode()

        async def reconcile_counted() -> bool:
            text = await asyncio.to_thread(scraped)
            assert re.search(r"^process_resident_memory_bytes ", text, re.M)
            ok = r'^reranker_operator_reconciles_total\{result="ok"\} [1-9]'
            return re.search(ok, text, re.M) is not None

        # The reconcile that created the Job, counted once it returns.
        await wait_for(reconcile_counted, "the reconcile on /metrics", timeout=15)
    finally:
        proc.send_signal(signal.SIGTERM)
        output, _ = await asyncio.wait_for(proc.communicate(), timeout=30)
        print(output.decode()[-5000:])  # shown by pytest when the test fails
    assert proc.returncode == 0
    first = json.loads(output.decode().splitlines()[0])  # JSON logs by default
    assert first["message"] == "starting reranker-operator"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--metrics-port", "8080", "--liveness-port", "8080"], "are both 8080"),
        (["--metrics-port", "-1"], "port -1 is outside 0-65535"),
        (["--liveness-port", "http"], "not a port number: 'http'"),
    ],
)
def test_flows_run_refuses_bad_ports_before_anything_starts(args: list[str], message: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "reranker_operator.cli", "run", *args],
        capture_output=True, text=True, timeout=60, env={**os.environ, "KUBECONFIG": "/nonexistent"},
    )  # fmt: skip
    assert proc.returncode == 2
    assert message in proc.stdout + proc.stderr


def test_flows_run_namespaces_from_flags_and_env(monkeypatch: pytest.MonkeyPatch) -> None:
    from reranker_operator.runner import parse_namespaces

    monkeypatch.delenv("RERANKER_OPERATOR_NAMESPACES", raising=False)
    assert parse_namespaces(None) == []  # all namespaces
    assert parse_namespaces(["ml", "a,b"]) == ["ml", "a", "b"]
    monkeypatch.setenv("RERANKER_OPERATOR_NAMESPACES", "team-a, team-b")
    assert parse_namespaces(None) == ["team-a", "team-b"]
    assert parse_namespaces(["ml"]) == ["ml"]  # the flag wins


def test_flows_every_watched_child_kind_is_filtered_by_the_api_server() -> None:
    """A kind watched without a server-side label selector streams every such object of the
    cluster (every Service, every pod) into the operator: each watched kind has one."""
    from reranker_operator import handlers, runner

    # One registration loop over WATCHED_CHILDREN: no kind is watched beside it.
    assert Path(handlers.__file__).read_text().count("kopf.on.event(") == 1
    settings = runner.operator_settings()
    for resource in handlers.WATCHED_CHILDREN:
        assert settings.watching.label_selectors[resource] == (
            "app.kubernetes.io/managed-by=reranker-operator"
        )
