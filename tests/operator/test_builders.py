"""Pure builders, the engine key and the operator config: unit tests, no cluster.

Every object a builder returns must pass kubernetes-validate --strict (Kubernetes 1.32 schemas).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonpatch
import kubernetes_validate
import pytest
import yaml

from reranker_operator import builders as b
from reranker_operator.config import (
    CONFIG_ENV,
    DEFAULT_RUNTIME_IMAGE,
    DEFAULT_RUNTIME_IMAGE_CPU,
    ConfigError,
    OperatorConfig,
    config_from_dict,
    load_config,
)
from reranker_operator.convert import quantity_bytes
from reranker_operator.engine_key import engine_key
from reranker_operator.spec import InvalidSpec, RerankerSpec, parse_spec

K8S_VERSION = "1.32.0"
DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
KEY = "0123456789abcdef" * 4
NS = "search"
OWNER = b.owner_reference(
    {"metadata": {"name": "rr", "uid": "5f0c6a2e-0000-4000-8000-000000000001"}}
)


def spec_of(**spec: Any) -> RerankerSpec:
    return parse_spec(
        {
            "metadata": {"name": "rr"},
            "spec": {"checkpoint": {"repo": "BAAI/bge-reranker-large"}, **spec},
        }
    )


VARIANTS: dict[str, RerankerSpec] = {
    "gpu-default": spec_of(),
    "gpu-replicas": spec_of(
        replicas=3,
        accelerator={"type": "H100", "count": 1},
        build={"quantization": "fp8", "maxNumTokens": 32768, "maxSeqLen": 1024},
        checkpoint={
            "repo": "s3://models/org/model/v1",
            "source": "S3",
            "secretName": "s3-creds",
        },
        runtime={
            "apiKeySecret": {"name": "api", "key": "token"},
            "maxBatchRequests": 64,
            "maxClientBatchSize": 100,
            "maxConcurrentRequests": 128,
            "autoTruncate": False,
            "grpc": True,
            "env": [{"name": "EXTRA", "value": "1"}],
            "probes": {
                "startup": {"failureThreshold": 200, "periodSeconds": 5},
                "liveness": {"timeoutSeconds": 9},
            },
        },
        engineCache={
            "mode": "Shared",
            "storageClassName": "filestore",
            "size": "100Gi",
            "retention": "Delete",
        },
    ),
    "cpu": spec_of(
        accelerator={"type": "CPU"},
        resources={"cpu": 2, "memory": "4Gi"},
        engineCache={"mode": "Shared", "accessMode": "ReadWriteOnce"},
    ),
    "per-pod-replicas": spec_of(replicas=3, engineCache={"size": "8Gi"}),
    "pvc-per-pod": spec_of(
        checkpoint={"repo": "pvc://models/BAAI/bge-reranker-large", "source": "PVC"}
    ),
    "exposed": spec_of(
        service={
            "type": "LoadBalancer",
            "annotations": {"a": "1"},
            "labels": {"team": "search"},
            "loadBalancerSourceRanges": ["10.0.0.0/8"],
        },
        ingress={
            "host": "rerank.example.com",
            "path": "/rr",
            "className": "nginx",
            "tlsSecretName": "rerank-tls",
            "annotations": {"cert-manager.io/cluster-issuer": "le"},
        },
        runtime={"grpc": True},
    ),
    "full-pool": spec_of(
        rollout={"maxSurge": 0, "maxUnavailable": "25%"},
        pod={"imagePullSecrets": ["team-regcred"], "schedulerName": "volcano"},
        autoscaling={
            "maxReplicas": 4,
            "behavior": {
                "scaleUp": {"policies": [{"type": "Pods", "value": 2, "periodSeconds": 60}]}
            },
        },
    ),
    "pvc-shared": spec_of(
        checkpoint={"repo": "pvc://models", "source": "PVC"}, engineCache={"mode": "Shared"}
    ),
    "autoscaling-concurrency": spec_of(
        autoscaling={"minReplicas": 2, "maxReplicas": 6, "targetConcurrency": 24}
    ),
    "autoscaling-cpu": spec_of(
        accelerator={"type": "CPU"},
        autoscaling={"maxReplicas": 4, "metric": "CPU", "targetCPUUtilization": 60},
    ),
}
CONFIG = OperatorConfig()


def all_children(spec: RerankerSpec, owner: dict | None = OWNER) -> list[dict[str, Any]]:
    return b.build_children("rr", NS, spec, CONFIG, owner=owner, key=KEY)


def by_kind(children: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {c["kind"]: c for c in children}


def container(obj: dict[str, Any]) -> dict[str, Any]:
    (c,) = obj["spec"]["template"]["spec"]["containers"]
    return c


def env_map(c: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c["env"]}


# ---------------------------------------------------------------- schema validity


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("owned", [True, False], ids=["owned", "unowned"])
def test_every_child_passes_kubernetes_validate_strict(variant: str, owned: bool) -> None:
    children = all_children(VARIANTS[variant], OWNER if owned else None)
    for obj in children:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    kinds = [c["kind"] for c in children]
    if b.cache_mode(VARIANTS[variant], CONFIG) == "Shared":
        assert kinds[:4] == ["PersistentVolumeClaim", "Job", "Deployment", "Service"]
    else:
        assert kinds[:2] == ["Deployment", "Service"]


def test_per_pod_mode_needs_no_shared_storage() -> None:
    """The default: 3 replicas, each pod builds its engine; nothing asks for ReadWriteMany."""
    children = all_children(VARIANTS["per-pod-replicas"])
    assert {c["kind"] for c in children} == {"Deployment", "Service", "PodDisruptionBudget"}
    assert "ReadWriteMany" not in yaml.safe_dump_all(children)
    dep = by_kind(children)["Deployment"]
    pod = dep["spec"]["template"]["spec"]
    assert not any("persistentVolumeClaim" in v for v in pod["volumes"])
    assert {"name": "engine", "emptyDir": {"sizeLimit": "8Gi"}} in pod["volumes"]
    (init,) = pod["initContainers"]
    job = b.build_engine_job("rr", NS, VARIANTS["per-pod-replicas"], CONFIG, KEY)
    # The init container is the build Job's container: the same command, args, env and limits.
    assert init == container(job)
    assert init["args"][-2:] == ["--output", f"/engines/{KEY}"]
    assert {"name": "engine", "mountPath": "/engines"} in init["volumeMounts"]
    serve = container(dep)
    assert {"name": "engine", "mountPath": "/engines", "readOnly": True} in serve["volumeMounts"]
    assert env_map(serve)["RERANKER_ENGINE_DIR"] == f"/engines/{KEY}"
    assert init["resources"] == serve["resources"]  # the build runs on the pod's GPU
    # Old pods serve until new ones are ready; the deadline covers a build plus the start-up.
    assert dep["spec"]["strategy"]["rollingUpdate"] == {"maxUnavailable": 0, "maxSurge": 1}
    assert dep["spec"]["progressDeadlineSeconds"] >= CONFIG.build_job.active_deadline_seconds


def test_a_very_slow_startup_probe_keeps_the_progress_deadline_an_int32() -> None:
    probes = {"startup": {"periodSeconds": 86400, "failureThreshold": 24856}}
    dep = b.build_deployment("rr", "ns", spec_of(runtime={"probes": probes}), CONFIG, KEY, OWNER)
    assert dep["spec"]["progressDeadlineSeconds"] == 2**31 - 1
    kubernetes_validate.validate(dep, "1.32.0", strict=True)


PVC_VOLUME = {
    "name": "checkpoint",
    "persistentVolumeClaim": {"claimName": "models", "readOnly": True},
}
PVC_MOUNT = {"name": "checkpoint", "mountPath": "/checkpoint", "readOnly": True}


@pytest.mark.parametrize("variant", ["pvc-per-pod", "pvc-shared"])
def test_a_pvc_checkpoint_is_mounted_read_only_where_the_build_runs(variant: str) -> None:
    spec = VARIANTS[variant]
    kinds = by_kind(all_children(spec))
    builder = kinds["Job"] if "Job" in kinds else kinds["Deployment"]
    build_pod = builder["spec"]["template"]["spec"]
    [build] = build_pod.get("initContainers") or build_pod["containers"]
    assert PVC_VOLUME in build_pod["volumes"] and PVC_MOUNT in build["volumeMounts"]
    args = build["args"]
    assert args[args.index("--source") + 1] == "PVC"
    assert args[args.index("--checkpoint-repo") + 1] == spec.checkpoint.repo
    assert args[args.index("--checkpoint-mount") + 1] == "/checkpoint"
    # The server reads only its engine directory: it never mounts the claim, and with a Shared
    # cache its pods do not even reference it (they may run where the claim cannot attach).
    serve = container(kinds["Deployment"])
    assert PVC_MOUNT not in serve["volumeMounts"]
    serve_pod = kinds["Deployment"]["spec"]["template"]["spec"]
    assert (PVC_VOLUME in serve_pod["volumes"]) == (variant == "pvc-per-pod")


PROXY_CONFIG = config_from_dict(
    {"proxy": {"httpsProxy": "http://proxy.corp:3128", "noProxy": ".svc", "caConfigMap": "corp-ca",
               "caConfigMapKey": "bundle.pem"}}
)  # fmt: skip


@pytest.mark.parametrize("mode", ["PerPod", "Shared"])
def test_proxy_and_ca_bundle_reach_the_build_container_only(mode: str) -> None:
    spec = spec_of(engineCache={"mode": mode})
    kinds = by_kind(b.build_children("rr", NS, spec, PROXY_CONFIG, key=KEY))
    for obj in kinds.values():
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    builder = kinds["Job"] if mode == "Shared" else kinds["Deployment"]
    build_pod = builder["spec"]["template"]["spec"]
    [build] = build_pod.get("initContainers") or build_pod["containers"]
    env = env_map(build)
    assert env["HTTPS_PROXY"] == env["https_proxy"] == "http://proxy.corp:3128"
    # The configured list, then what never goes through a proxy: the cloud's metadata server
    # (workload identity, instance credentials) and the cluster's own services.
    assert (
        env["NO_PROXY"]
        == env["no_proxy"]
        == (
            ".svc,localhost,127.0.0.1,169.254.169.254,fd00:ec2::254,169.254.170.23,fd00:ec2::23,"
            "metadata.google.internal,.cluster.local"
        )
    )
    assert "HTTP_PROXY" not in env and "http_proxy" not in env  # unset stays unset
    for name in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "AWS_CA_BUNDLE"):
        assert env[name] == "/etc/reranker/ca/ca.crt"
    assert {"name": "ca-bundle", "mountPath": "/etc/reranker/ca", "readOnly": True} in build[
        "volumeMounts"
    ]
    assert {"name": "ca-bundle", "configMap": {"name": "corp-ca", "items": [
        {"key": "bundle.pem", "path": "ca.crt"}]}} in build_pod["volumes"]  # fmt: skip
    serve = container(kinds["Deployment"])
    assert not {"HTTPS_PROXY", "SSL_CERT_FILE"} & set(env_map(serve))
    assert all(m["name"] != "ca-bundle" for m in serve["volumeMounts"])
    # Without a proxy config the build container has none of it.
    plain = env_map(b.build_container(spec, CONFIG, KEY))
    assert not {"HTTPS_PROXY", "https_proxy", "SSL_CERT_FILE"} & set(plain)


def test_other_sources_mount_no_checkpoint() -> None:
    for spec in (spec_of(), VARIANTS["gpu-replicas"]):
        for obj in all_children(spec):
            pod = obj["spec"].get("template", {}).get("spec", {})
            assert all(v["name"] != "checkpoint" for v in pod.get("volumes", []))
            for c in pod.get("containers", []) + pod.get("initContainers", []):
                assert "--checkpoint-mount" not in c.get("args", [])


def test_shared_mode_from_the_operator_config() -> None:
    config = config_from_dict({"engineCache": {"mode": "Shared"}})
    kinds = [c["kind"] for c in b.build_children("rr", NS, spec_of(), config, key=KEY)]
    assert kinds == ["PersistentVolumeClaim", "Job", "Deployment", "Service"]
    dep = b.build_deployment("rr", NS, spec_of(), config, KEY)
    assert "initContainers" not in dep["spec"]["template"]["spec"]
    per_pod = spec_of(engineCache={"mode": "PerPod"})  # the spec wins over the config
    assert [c["kind"] for c in b.build_children("rr", NS, per_pod, config, key=KEY)] == [
        "Deployment",
        "Service",
    ]


def test_pdb_and_hpa_only_when_called_for() -> None:
    kinds = {v: [c["kind"] for c in all_children(s)] for v, s in VARIANTS.items()}
    assert (
        "PodDisruptionBudget" not in kinds["gpu-default"]
        and "HorizontalPodAutoscaler" not in kinds["gpu-default"]
    )
    assert (
        "PodDisruptionBudget" in kinds["gpu-replicas"]
        and "HorizontalPodAutoscaler" not in kinds["gpu-replicas"]
    )
    assert "PodDisruptionBudget" in kinds["autoscaling-concurrency"]  # minReplicas 2
    assert "HorizontalPodAutoscaler" in kinds["autoscaling-concurrency"]
    # minReplicas 1, maxReplicas 4: the pods the autoscaler adds are protected too.
    assert "PodDisruptionBudget" in kinds["autoscaling-cpu"]
    assert "HorizontalPodAutoscaler" in kinds["autoscaling-cpu"]
    assert b.build_pdb("rr", NS, spec_of(replicas=1)) is None
    assert b.build_hpa("rr", NS, spec_of(replicas=5)) is None


def test_an_external_autoscaler_gets_the_replicas_and_no_hpa() -> None:
    """metric External (KEDA, the user's own HPA): no HPA of ours, no replicas rendered (the
    live count is kept on patches), and a PDB for the pods it may add."""
    spec = spec_of(autoscaling={"maxReplicas": 4, "metric": "External"})
    kinds = [c["kind"] for c in all_children(spec)]
    assert "HorizontalPodAutoscaler" not in kinds and "PodDisruptionBudget" in kinds
    dep = b.build_deployment("rr", NS, spec, CONFIG, KEY)
    assert "replicas" not in dep["spec"]
    live = {**dep, "spec": {**dep["spec"], "replicas": 0}}  # KEDA scaled it to zero
    patched = jsonpatch.apply_patch(live, b.replacement_patch(dep, live))
    assert patched["spec"]["replicas"] == 0


# ---------------------------------------------------------------- Job


def test_job_follows_the_build_contract() -> None:
    job = b.build_engine_job("rr", NS, VARIANTS["gpu-replicas"], CONFIG, KEY, OWNER)
    assert job["metadata"]["name"] == f"rr-engine-{KEY[:10]}"
    c = container(job)
    assert c["command"] == ["reranker-runtime", "build"]
    assert c["args"] == [
        "--checkpoint-repo", "s3://models/org/model/v1", "--revision", "main", "--source", "S3",
        "--quantization", "fp8", "--max-num-tokens", "32768", "--max-seq-len", "1024",
        "--accelerator", "H100", "--output", f"/engines/{KEY}",
    ]  # fmt: skip
    assert env_map(c)["HF_HOME"] == "/engines/.hf-home"
    assert env_map(c)["RERANKER_LOG_FORMAT"] == "json"
    assert c["envFrom"] == [{"secretRef": {"name": "s3-creds"}}]
    assert {"name": "engine-cache", "mountPath": "/engines"} in c["volumeMounts"]
    assert c["terminationMessagePolicy"] == "FallbackToLogsOnError"
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    assert {
        "name": "engine-cache",
        "persistentVolumeClaim": {"claimName": "rr-engine-cache"},
    } in pod["volumes"]
    spec = job["spec"]
    assert spec["backoffLimit"] == CONFIG.build_job.backoff_limit
    assert spec["activeDeadlineSeconds"] == CONFIG.build_job.active_deadline_seconds
    assert spec["ttlSecondsAfterFinished"] == CONFIG.build_job.ttl_seconds_after_finished
    assert job["metadata"]["annotations"][b.ANNOTATION_ENGINE_KEY] == KEY
    assert job["metadata"]["labels"][b.LABEL_ENGINE] == KEY[:10]
    assert job["metadata"]["ownerReferences"] == [OWNER]


def test_job_without_secret_or_max_seq_len() -> None:
    c = container(b.build_engine_job("rr", NS, spec_of(), CONFIG, KEY))
    assert "envFrom" not in c
    assert "--max-seq-len" not in c["args"]
    assert c["args"][-4:] == ["--accelerator", "L4", "--output", f"/engines/{KEY}"]


@pytest.mark.parametrize(
    "name", ["a", "x" * 45, "y" * 46, "z" * 63, "a-" * 31 + "b", "ab" + "-" * 43 + "c"]
)
def test_job_name_is_a_dns1123_label(name: str) -> None:
    job = b.job_name(name, KEY)
    assert len(job) <= 63 and DNS1123_LABEL.match(job), job
    assert job.endswith(f"-engine-{KEY[:10]}")
    if len(name) <= 45:
        assert job == f"{name}-engine-{KEY[:10]}"


def test_long_names_sharing_a_prefix_get_distinct_job_names() -> None:
    prefix = "bge-reranker-large-production-search-" + "x" * 8  # 45 characters
    a, b_ = prefix + "-europe-west4-a", prefix + "-europe-west4-b"
    assert len(prefix) == 45
    assert b.job_name(a, KEY) != b.job_name(b_, KEY)
    assert b.job_name(a, KEY) == b.job_name(a, KEY)  # stable: found again after a restart
    for job in (b.job_name(a, KEY), b.job_name(b_, KEY)):
        assert len(job) <= 63 and DNS1123_LABEL.match(job), job


def test_job_runs_where_it_will_serve() -> None:
    spec = VARIANTS["gpu-replicas"]
    job, dep = (
        b.build_engine_job("rr", NS, spec, CONFIG, KEY),
        b.build_deployment("rr", NS, spec, CONFIG, KEY),
    )
    for key in ("affinity", "tolerations"):
        assert job["spec"]["template"]["spec"][key] == dep["spec"]["template"]["spec"][key]
    assert container(job)["resources"]["limits"]["nvidia.com/gpu"] == "1"


# ---------------------------------------------------------------- placement


def node_matches(pod: dict[str, Any], node_labels: dict[str, str]) -> bool:
    """The scheduler's required node affinity + nodeSelector check (In/NotIn/Exists only)."""
    if any(node_labels.get(k) != v for k, v in (pod.get("nodeSelector") or {}).items()):
        return False
    affinity = (pod.get("affinity") or {}).get("nodeAffinity") or {}
    required = affinity.get("requiredDuringSchedulingIgnoredDuringExecution")
    if not required:
        return True

    def expr_ok(e: dict[str, Any]) -> bool:
        value = node_labels.get(e["key"])
        if e["operator"] == "In":
            return value in e["values"]
        if e["operator"] == "NotIn":
            return value not in e["values"]
        return (value is not None) == (e["operator"] == "Exists")

    return any(all(map(expr_ok, t["matchExpressions"])) for t in required["nodeSelectorTerms"])


L4_NODES = {
    "gke-g2-standard-4": {
        "cloud.google.com/gke-accelerator": "nvidia-l4",
        "node.kubernetes.io/instance-type": "g2-standard-4",
    },
    "gpu-feature-discovery": {"nvidia.com/gpu.product": "NVIDIA-L4"},
    "eks-g6-xlarge-no-gfd": {"node.kubernetes.io/instance-type": "g6.xlarge"},
    "eks-karpenter": {
        "karpenter.k8s.aws/instance-gpu-name": "l4",
        "node.kubernetes.io/instance-type": "g6.2xlarge",
    },
}
NOT_L4_NODES = {
    "eks-g6e-l40s": {"node.kubernetes.io/instance-type": "g6e.xlarge"},
    "eks-g5-a10g": {"node.kubernetes.io/instance-type": "g5.xlarge"},
    "gke-t4": {"cloud.google.com/gke-accelerator": "nvidia-tesla-t4"},
    "cpu-node": {"node.kubernetes.io/instance-type": "m6i.xlarge"},
}


@pytest.mark.parametrize("node", L4_NODES)
def test_l4_placement_matches_l4_nodes_of_gke_eks_and_gpu_feature_discovery(node: str) -> None:
    pod = b.build_deployment("rr", NS, spec_of(), CONFIG, KEY)["spec"]["template"]["spec"]
    assert node_matches(pod, L4_NODES[node])
    assert pod["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    ]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"


@pytest.mark.parametrize("node", NOT_L4_NODES)
def test_l4_placement_refuses_other_nodes(node: str) -> None:
    pod = b.build_deployment("rr", NS, spec_of(), CONFIG, KEY)["spec"]["template"]["spec"]
    assert not node_matches(pod, NOT_L4_NODES[node])


POD_SETTINGS = {
    "nodeSelector": {"cloud.google.com/gke-nodepool": "l4-pool"},
    "tolerations": [
        {"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}
    ],
    "affinity": {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [
                    {"matchExpressions": [{"key": "topology.kubernetes.io/zone",
                                           "operator": "In", "values": ["europe-west4-a"]}]}
                ]
            }
        },
        "podAntiAffinity": {
            "preferredDuringSchedulingIgnoredDuringExecution": [
                {"weight": 100, "podAffinityTerm": {
                    "topologyKey": "kubernetes.io/hostname",
                    "labelSelector": {"matchLabels": {"app.kubernetes.io/instance": "rr"}}}}
            ]
        },
    },
    "topologySpreadConstraints": [
        {"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone",
         "whenUnsatisfiable": "ScheduleAnyway",
         "labelSelector": {"matchLabels": {"app.kubernetes.io/instance": "rr"}}}
    ],
    "priorityClassName": "inference-high",
    "serviceAccountName": "reranker-gcs-reader",
    "runtimeClassName": "nvidia-cdi",
    "annotations": {"cluster-autoscaler.kubernetes.io/safe-to-evict": "false"},
    "labels": {"team": "search"},
}  # fmt: skip


@pytest.mark.parametrize("kind", ["Job", "Deployment"])
def test_pod_settings_reach_build_and_runtime_pods(kind: str) -> None:
    spec = spec_of(pod=POD_SETTINGS, engineCache={"mode": "Shared"}, replicas=2)
    obj = by_kind(all_children(spec))[kind]
    kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    template = obj["spec"]["template"]
    pod = template["spec"]
    assert pod["serviceAccountName"] == "reranker-gcs-reader"
    assert pod["priorityClassName"] == "inference-high"
    assert pod["runtimeClassName"] == "nvidia-cdi"
    assert pod["topologySpreadConstraints"] == POD_SETTINGS["topologySpreadConstraints"]
    assert pod["nodeSelector"] == {"cloud.google.com/gke-nodepool": "l4-pool"}
    assert pod["affinity"]["podAntiAffinity"] == POD_SETTINGS["affinity"]["podAntiAffinity"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod[
        "tolerations"
    ]
    assert POD_SETTINGS["tolerations"][0] in pod["tolerations"]
    assert template["metadata"]["labels"]["team"] == "search"
    assert template["metadata"]["labels"][b.LABEL_RERANKER] == "rr"  # the operator's stay
    assert template["metadata"]["annotations"]["cluster-autoscaler.kubernetes.io/safe-to-evict"]
    # The user's zone and the accelerator's GPU must both hold: an L4 node in europe-west4-a.
    zone = {"topology.kubernetes.io/zone": "europe-west4-a"}
    assert node_matches(pod, {**L4_NODES["gke-g2-standard-4"], **zone, **pod["nodeSelector"]})
    assert not node_matches(pod, {**L4_NODES["gke-g2-standard-4"], **pod["nodeSelector"]})
    assert not node_matches(pod, {**NOT_L4_NODES["gke-t4"], **zone, **pod["nodeSelector"]})


@pytest.mark.parametrize("mode", ["PerPod", "Shared"])
def test_runtime_class_from_the_accelerator_unless_the_reranker_sets_one(mode: str) -> None:
    # k3s / RKE2: GPU pods need the `nvidia` RuntimeClass, set once per accelerator type.
    config = config_from_dict({"accelerators": {"L4": {"runtimeClassName": "nvidia"}}})

    def runtime_classes(**spec: Any) -> set[str | None]:
        rr = spec_of(engineCache={"mode": mode}, **spec)
        children = b.build_children("rr", NS, rr, config, owner=OWNER, key=KEY)
        pods = [
            c["spec"]["template"]["spec"] for c in children if c["kind"] in ("Job", "Deployment")
        ]
        return {pod.get("runtimeClassName") for pod in pods}

    assert runtime_classes() == {"nvidia"}
    assert runtime_classes(accelerator={"type": "CPU"}) == {None}
    assert runtime_classes(pod={"runtimeClassName": "kata"}) == {"kata"}
    assert (
        "runtimeClassName"
        not in b.build_deployment("rr", NS, spec_of(), CONFIG, KEY)["spec"]["template"]["spec"]
    )  # the built-in placement sets none


def test_user_node_affinity_on_cpu_is_kept_as_is() -> None:
    spec = spec_of(accelerator={"type": "CPU"}, pod={"affinity": POD_SETTINGS["affinity"]})
    pod = b.build_deployment("rr", NS, spec, CONFIG, KEY)["spec"]["template"]["spec"]
    assert pod["affinity"] == POD_SETTINGS["affinity"]
    assert "tolerations" not in pod


def test_prune_job_deletes_only_the_given_engines() -> None:
    keys = ["b" * 64, "a" * 64]
    job = b.build_prune_job("rr", NS, VARIANTS["gpu-replicas"], CONFIG, keys, OWNER)
    kubernetes_validate.validate(job, K8S_VERSION, strict=True)
    c = container(job)
    assert c["args"] == [f"/engines/{'a' * 64}", f"/engines/{'b' * 64}"]
    assert c["command"][:2] == ["python3", "-c"] and "rmtree" in c["command"][2]
    pod = job["spec"]["template"]["spec"]
    assert pod["volumes"] == [
        {"name": "engine-cache", "persistentVolumeClaim": {"claimName": "rr-engine-cache"}}
    ]
    assert "nvidia.com/gpu" not in str(c["resources"])  # no GPU of its own
    # On the GPU nodes the servers run on (the image and the volume are there), yet not bound by
    # pod (anti-)affinity written for the servers; and never running forever.
    server = b.build_deployment("rr", NS, VARIANTS["gpu-replicas"], CONFIG, KEY)
    server_pod = server["spec"]["template"]["spec"]
    placement = ("nodeSelector", "tolerations", "affinity")
    assert {k: pod.get(k) for k in placement} == {k: server_pod.get(k) for k in placement}
    assert pod["tolerations"] and pod["affinity"]["nodeAffinity"]  # GPU nodes: not left empty
    assert job["spec"]["activeDeadlineSeconds"] == b.PRUNE_DEADLINE_SECONDS
    spread = spec_of(pod={"affinity": POD_SETTINGS["affinity"]})
    prune_pod = b.build_prune_job("rr", NS, spread, CONFIG, keys)["spec"]["template"]["spec"]
    server_affinity = b.build_deployment("rr", NS, spread, CONFIG, KEY)["spec"]["template"]["spec"][
        "affinity"
    ]
    assert "podAntiAffinity" in server_affinity
    assert prune_pod["affinity"] == {"nodeAffinity": server_affinity["nodeAffinity"]}
    assert job["metadata"]["name"] == b.prune_job_name("rr", list(reversed(keys)))
    assert DNS1123_LABEL.match(b.prune_job_name("x" * 63, keys))
    # The same keys dropped again later (a new cache version) get a Job of their own.
    assert b.prune_job_name("rr", keys, "41") != b.prune_job_name("rr", keys, "42")
    assert "podAffinity" not in pod.get("affinity", {})  # ReadWriteMany: any GPU node mounts it


def test_prune_job_on_a_read_write_once_cache_runs_beside_the_servers() -> None:
    spec = spec_of(engineCache={"mode": "Shared", "accessMode": "ReadWriteOnce"})
    pod = b.build_prune_job("rr", NS, spec, CONFIG, ["a" * 64])["spec"]["template"]["spec"]
    # The live claim decides: its access mode is the one it was created with.
    rwo_claim = {"metadata": {"resourceVersion": "7"}, "spec": {"accessModes": ["ReadWriteOnce"]}}
    rwx_spec = spec_of(engineCache={"mode": "Shared", "accessMode": "ReadWriteMany"})
    from_claim = b.build_prune_job("rr", NS, rwx_spec, CONFIG, ["a" * 64], cache=rwo_claim)
    assert from_claim["spec"]["template"]["spec"]["affinity"]["podAffinity"]
    assert from_claim["metadata"]["name"] == b.prune_job_name("rr", ["a" * 64], "7")
    (term,) = pod["affinity"]["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert term["topologyKey"] == "kubernetes.io/hostname"
    assert term["labelSelector"]["matchLabels"] == b.selector_labels("rr")
    assert pod["affinity"]["nodeAffinity"]  # and still on the accelerator's nodes


def test_prune_job_script_removes_engines_and_what_their_builds_left(tmp_path: Path) -> None:
    """The Job's own command, run here: each engine goes with its build's `.tmp-` leftovers and
    lock; other engines and the download cache stay."""
    gone, kept = "a" * 64, "b" * 64
    for path in (gone, f".{gone}.tmp-12-ab", kept, f".{kept}.tmp-3-cd", ".hf-home"):
        (tmp_path / path).mkdir()
        (tmp_path / path / "file").write_text("x")
    (tmp_path / f".{gone}.lock").write_text("")
    (tmp_path / f".{kept}.lock").write_text("")
    job = b.build_prune_job("rr", NS, spec_of(), CONFIG, [gone, "c" * 64])
    c = container(job)
    args = [str(tmp_path / Path(a).name) for a in c["args"]]  # /engines/<key> here
    done = subprocess.run(
        [sys.executable, *c["command"][1:], *args], capture_output=True, text=True, check=True
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [kept, f".{kept}.tmp-3-cd", f".{kept}.lock", ".hf-home"]
    )
    assert f"removed {args[0]}" in done.stdout


def test_no_monitor_unless_configured() -> None:
    assert b.build_monitor("rr", NS, spec_of(), CONFIG) is None
    assert not any(c["kind"].endswith(("Monitor", "Monitoring")) for c in all_children(spec_of()))


@pytest.mark.parametrize(
    "kind,api_version",
    [
        ("ServiceMonitor", "monitoring.coreos.com/v1"),
        ("PodMonitoring", "monitoring.googleapis.com/v1"),
    ],
)
def test_monitor_scrapes_the_runtime_pods(kind: str, api_version: str) -> None:
    config = config_from_dict(
        {"monitoring": {"kind": kind, "interval": "15s", "labels": {"release": "prom"}}}
    )
    children = b.build_children("rr", NS, spec_of(), config, OWNER, KEY)
    monitor = by_kind(children)[kind]
    assert monitor["apiVersion"] == api_version and monitor["metadata"]["name"] == "rr"
    assert monitor["metadata"]["ownerReferences"] == [OWNER]
    assert monitor["metadata"]["labels"]["release"] == "prom"
    assert monitor["spec"]["endpoints"] == [{"port": "http", "path": "/metrics", "interval": "15s"}]
    # It selects what serves /metrics on the port named http: the Service (ServiceMonitor) or
    # the pods (PodMonitoring) carry these labels.
    selector = monitor["spec"]["selector"]["matchLabels"]
    target = by_kind(children)["Service" if kind == "ServiceMonitor" else "Deployment"]
    have = target["metadata"]["labels"] if kind == "ServiceMonitor" else (
        target["spec"]["template"]["metadata"]["labels"])  # fmt: skip
    assert selector.items() <= have.items()
    ports = (
        target["spec"]["ports"]
        if kind == "ServiceMonitor"
        else target["spec"]["template"]["spec"]["containers"][0]["ports"]
    )
    assert "http" in {p["name"] for p in ports}


def test_hpa_concurrency_metric_name_from_the_config() -> None:
    config = config_from_dict(
        {
            "autoscaling": {
                "concurrencyMetric": "prometheus.googleapis.com|reranker_requests_in_flight|gauge"
            }
        }
    )
    hpa = b.build_hpa("rr", NS, VARIANTS["autoscaling-concurrency"], None, config)
    assert hpa is not None
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == (
        "prometheus.googleapis.com|reranker_requests_in_flight|gauge"
    )


def test_default_pod_fits_the_smallest_l4_nodes() -> None:
    # Allocatable memory of GKE g2-standard-4 (~13 GiB) and EKS g6.xlarge (~14.5 GiB), minus
    # ~1 GiB of daemonsets: the default request must fit both.
    for obj in all_children(spec_of()):
        if obj["kind"] in ("Job", "Deployment"):
            pod = obj["spec"]["template"]["spec"]
            total = sum(
                quantity_bytes(c["resources"]["requests"]["memory"]) for c in pod["containers"]
            )
            assert total <= 12 * 2**30, obj["kind"]


@pytest.mark.parametrize("accel", ["L4", "A10G", "A100", "H100", "H200", "T4"])
def test_every_gpu_type_has_a_placement(accel: str) -> None:
    pod = b.build_deployment("rr", NS, spec_of(accelerator={"type": accel}), CONFIG, KEY)["spec"][
        "template"
    ]["spec"]
    assert pod["affinity"]["nodeAffinity"]
    assert pod["tolerations"]


def test_cpu_gets_no_gpu_placement() -> None:
    for obj in (
        b.build_deployment("rr", NS, VARIANTS["cpu"], CONFIG, KEY),
        b.build_engine_job("rr", NS, VARIANTS["cpu"], CONFIG, KEY),
    ):
        pod = obj["spec"]["template"]["spec"]
        assert "affinity" not in pod and "tolerations" not in pod and "nodeSelector" not in pod
        assert container(obj)["resources"] == {
            "requests": {"cpu": "2", "memory": "4Gi"},
            "limits": {"memory": "4Gi"},
        }


@pytest.mark.parametrize(
    ("checkpoint", "variable"),
    [({"repo": "BAAI/bge-reranker-large"}, "HF_ENDPOINT"),
     ({"repo": "s3://models/bge", "source": "S3"}, "AWS_ENDPOINT_URL")],
)  # fmt: skip
def test_checkpoint_endpoint_reaches_the_build_only(
    checkpoint: dict[str, str], variable: str
) -> None:
    url = "http://mirror.corp:8081/api/models"
    spec = spec_of(checkpoint={**checkpoint, "endpoint": url, "secretName": "creds"})
    dep = b.build_deployment("rr", NS, spec, CONFIG, KEY)
    (init,) = dep["spec"]["template"]["spec"]["initContainers"]
    build = env_map(init)
    assert build[variable] == url
    # Set in `env`, it wins over the same name in the Secret's envFrom.
    assert init["envFrom"] == [{"secretRef": {"name": "creds"}}]
    assert variable not in env_map(container(dep))  # the server downloads nothing
    (other,) = {"HF_ENDPOINT", "AWS_ENDPOINT_URL"} - {variable}
    assert other not in build
    # Without an endpoint, the clients' own defaults (the hub, AWS).
    plain = b.build_deployment("rr", NS, spec_of(), CONFIG, KEY)
    (plain_init,) = plain["spec"]["template"]["spec"]["initContainers"]
    assert not {"HF_ENDPOINT", "AWS_ENDPOINT_URL"} & set(env_map(plain_init))


OTLP_CA = {
    "name": "otlp-ca",
    "configMap": {"name": "corp-ca", "items": [{"key": "ca.crt", "path": "ca.crt"}]},
}
SHM = {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "1Gi"}}


@pytest.mark.parametrize("mode", ["PerPod", "Shared"])
def test_runtime_volumes_reach_the_server_only(mode: str) -> None:
    mounts = [
        {"name": "otlp-ca", "mountPath": "/etc/otlp", "readOnly": True},
        {"name": "shm", "mountPath": "/dev/shm"},
    ]
    runtime = {"volumes": [OTLP_CA, SHM], "volumeMounts": mounts}
    spec = spec_of(runtime=runtime, engineCache={"mode": mode})
    dep = b.build_deployment("rr", NS, spec, CONFIG, KEY)
    pod = dep["spec"]["template"]["spec"]
    # Passed through as written, after the operator's own.
    assert pod["volumes"][-2:] == [OTLP_CA, SHM]
    assert [v["name"] for v in pod["volumes"][:-2]] == [
        "engine" if mode == "PerPod" else "engine-cache", "tmp"]  # fmt: skip
    server = container(dep)
    assert server["volumeMounts"][-2:] == mounts  # readOnly false is left out, as kubectl does
    # Not the build (init container, Job): it reads no user file, and a missing Secret would
    # hold up the build too.
    for c in pod.get("initContainers", []):
        assert all(m["name"] not in ("otlp-ca", "shm") for m in c["volumeMounts"])
    if mode == "Shared":
        job = b.build_engine_job("rr", NS, spec, CONFIG, KEY)
        assert not {"otlp-ca", "shm"} & {
            v["name"] for v in job["spec"]["template"]["spec"]["volumes"]
        }
    # The spec model keeps the caller's volume untouched (a deep copy went into the pod).
    pod["volumes"][-1]["emptyDir"]["medium"] = "changed"
    assert spec.runtime.volumes[1]["emptyDir"]["medium"] == "Memory"


@pytest.mark.parametrize("mode", ["PerPod", "Shared"])
def test_cpu_limit_and_ephemeral_storage_reach_every_container(mode: str) -> None:
    # cpuLimit equal to cpu (and memory's limit = request): Guaranteed QoS, which the kubelet's
    # static CPU manager needs to pin cores, and what a quota on limits.cpu counts.
    resources = {"cpu": 4, "memory": "16Gi", "cpuLimit": "4000m", "ephemeralStorage": "30Gi"}
    spec = spec_of(resources=resources, engineCache={"mode": mode})
    want = {
        "requests": {"cpu": "4", "memory": "16Gi", "ephemeral-storage": "30Gi"},
        "limits": {"cpu": "4000m", "memory": "16Gi", "ephemeral-storage": "30Gi",
                   "nvidia.com/gpu": "1"},
    }  # fmt: skip
    dep = b.build_deployment("rr", NS, spec, CONFIG, KEY)
    pod = dep["spec"]["template"]["spec"]
    builds = [b.build_engine_job("rr", NS, spec, CONFIG, KEY)] if mode == "Shared" else []
    for c in pod["containers"] + pod.get("initContainers", []) + [container(j) for j in builds]:
        assert c["resources"] == want, c["name"]
    assert len(pod.get("initContainers", [])) == (mode == "PerPod")
    # Without them, neither is set (the defaults stay as they were).
    plain = container(b.build_deployment("rr", NS, spec_of(), CONFIG, KEY))["resources"]
    assert "cpu" not in plain["limits"] and "ephemeral-storage" not in plain["requests"]


@pytest.mark.parametrize("mode", ["PerPod", "Shared"])
def test_build_resources_reach_the_build_container_only(mode: str) -> None:
    """A conversion that needs 32Gi, 4 cores and room for the checkpoint, served in 10Gi: the
    build container gets its own values over the serving ones, the server keeps its own, and
    the engine is the same (no rebuild for a resource change)."""
    own = {"memory": "32Gi", "cpu": 4, "ephemeralStorage": "50Gi"}
    served = {"cpu": "2", "cpuLimit": "6", "memory": "10Gi"}
    spec = spec_of(resources={**served, "build": own}, engineCache={"mode": mode})
    gpu = {"nvidia.com/gpu": "1"}
    want_build = {
        "requests": {"cpu": "4", "memory": "32Gi", "ephemeral-storage": "50Gi"},
        "limits": {"cpu": "6", "memory": "32Gi", "ephemeral-storage": "50Gi", **gpu},
    }
    want_server = {
        "requests": {"cpu": "2", "memory": "10Gi"},
        "limits": {"cpu": "6", "memory": "10Gi", **gpu},
    }
    pod = b.build_deployment("rr", NS, spec, CONFIG, KEY)["spec"]["template"]["spec"]
    (server,) = pod["containers"]
    assert server["resources"] == want_server
    if mode == "PerPod":
        (build,) = pod["initContainers"]
    else:
        assert "initContainers" not in pod
        build = container(b.build_engine_job("rr", NS, spec, CONFIG, KEY))
    assert build["name"] == b.BUILD_CONTAINER and build["resources"] == want_build
    assert b.engine_key_for(spec, CONFIG) == b.engine_key_for(
        spec_of(resources=served, engineCache={"mode": mode}), CONFIG
    )
    # Only the fields written are the build's own: here its memory, the rest as served.
    spec = spec_of(resources={**served, "build": {"memory": "16Gi"}}, engineCache={"mode": mode})
    build = b.build_container(spec, CONFIG, KEY)
    assert build["resources"] == {
        "requests": {"cpu": "2", "memory": "16Gi"},
        "limits": {"cpu": "6", "memory": "16Gi", **gpu},
    }


def test_custom_placement_from_config() -> None:
    config = config_from_dict(
        {
            "accelerators": {
                "L4": {
                    "resourceName": "amd.com/gpu",
                    "nodeSelector": {"node.kubernetes.io/instance-type": "g6.xlarge"},
                    "tolerations": [
                        {
                            "key": "dedicated",
                            "operator": "Equal",
                            "value": "gpu",
                            "effect": "NoSchedule",
                        }
                    ],
                }
            }
        }
    )
    dep = b.build_deployment("rr", NS, spec_of(), config, KEY)
    pod = dep["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"node.kubernetes.io/instance-type": "g6.xlarge"}
    assert "affinity" not in pod
    assert container(dep)["resources"]["limits"]["amd.com/gpu"] == "1"
    assert (
        config.accelerators["H100"] == CONFIG.accelerators["H100"]
    )  # other types keep the built-ins
    kubernetes_validate.validate(dep, K8S_VERSION, strict=True)


# ---------------------------------------------------------------- Deployment


def test_deployment_follows_the_serve_contract() -> None:
    dep = b.build_deployment("rr", NS, VARIANTS["gpu-replicas"], CONFIG, KEY, OWNER)
    c = container(dep)
    assert c["command"] == ["reranker-runtime", "serve"] and "args" not in c
    env = env_map(c)
    assert env["RERANKER_ENGINE_DIR"] == f"/engines/{KEY}"
    assert env["RERANKER_PORT"] == "8080"
    assert env["RERANKER_SERVED_MODEL_NAME"] == "s3://models/org/model/v1"  # checkpoint.repo
    named = spec_of(runtime={"servedModelName": "bge-reranker-large"})
    named_env = env_map(container(b.build_deployment("rr", NS, named, CONFIG, KEY)))
    assert named_env["RERANKER_SERVED_MODEL_NAME"] == "bge-reranker-large"
    assert env["RERANKER_MAX_BATCH_TOKENS"] == "32768"  # build.maxNumTokens when runtime sets none
    assert env["RERANKER_MAX_BATCH_REQUESTS"] == "64"
    assert env["RERANKER_MAX_CLIENT_BATCH_SIZE"] == "100"
    assert env["RERANKER_MAX_CONCURRENT_REQUESTS"] == "128"
    assert env["RERANKER_AUTO_TRUNCATE"] == "false"
    assert env["RERANKER_API_KEY"] == {"secretKeyRef": {"name": "api", "key": "token"}}
    assert env["RERANKER_LOG_FORMAT"] == "json"
    assert env["HF_HUB_OFFLINE"] == "1"
    assert env["HOME"].startswith("/tmp") and env["HF_HOME"].startswith("/tmp")
    assert env["EXTRA"] == "1"
    assert env["RERANKER_GRPC_PORT"] == "50051"
    assert len(env) == len(c["env"])  # no duplicates
    assert [p["name"] for p in c["ports"]] == ["http", "grpc"]
    assert {"name": "engine-cache", "mountPath": "/engines", "readOnly": True} in c["volumeMounts"]
    assert {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"]
    pod = dep["spec"]["template"]["spec"]
    assert {"name": "tmp", "emptyDir": {}} in pod["volumes"]
    assert (
        pod["enableServiceLinks"] is False
    )  # no RERANKER_PORT=tcp://... from a Service named `reranker`
    assert dep["spec"]["replicas"] == 3
    assert dep["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert pod["terminationGracePeriodSeconds"] >= 30
    assert dep["metadata"]["annotations"][b.ANNOTATION_ENGINE_KEY] == KEY


def test_runtime_env_from_secrets_configmaps_and_the_pod_reaches_the_container() -> None:
    sources = [
        {"secretKeyRef": {"name": "otel", "key": "headers", "optional": False}},
        {"configMapKeyRef": {"name": "cluster-info", "key": "REGION"}},
        {"fieldRef": {"fieldPath": "metadata.labels['team']", "apiVersion": "v1"}},
        {"resourceFieldRef": {"resource": "limits.memory", "divisor": "1Mi"}},
        {"resourceFieldRef": {"resource": "requests.cpu", "divisor": 1}},
    ]
    env = [{"name": f"V{i}", "valueFrom": source} for i, source in enumerate(sources)]
    env.append({"name": "EMPTY"})
    dep = b.build_deployment("rr", NS, spec_of(runtime={"env": env}), CONFIG, KEY, OWNER)
    kubernetes_validate.validate(dep, K8S_VERSION, strict=True)
    got = container(dep)["env"]
    # Exactly as written (optional: false and the integer divisor kept), after the operator's own.
    assert got[-len(env) :] == [*env[:-1], {"name": "EMPTY", "value": ""}]
    with pytest.raises(InvalidSpec, match="API_KEY is set by the operator") as exc:
        spec_of(runtime={"env": [{"name": "API_KEY", "valueFrom": sources[0]}]})
    assert exc.value.field == "spec.runtime.env[0].name"


def test_deployment_defaults() -> None:
    c = container(b.build_deployment("rr", NS, spec_of(), CONFIG, KEY))
    env = env_map(c)
    assert env["RERANKER_AUTO_TRUNCATE"] == "true"  # TEI's default
    assert env["RERANKER_MAX_BATCH_TOKENS"] == "16384"
    for unset in (
        "RERANKER_API_KEY",
        "RERANKER_MAX_BATCH_REQUESTS",
        "RERANKER_MAX_CONCURRENT_REQUESTS",
    ):
        assert unset not in env


@pytest.mark.parametrize(
    ("fields", "budget"),
    [
        # CPU: the runtime's own CPU budget, whatever build.maxNumTokens (a GPU profile) says.
        ({"accelerator": {"type": "CPU"}}, "auto"),
        ({"accelerator": {"type": "CPU"}, "build": {"maxNumTokens": 8192}}, "auto"),
        ({"accelerator": {"type": "CPU"}, "runtime": {"maxBatchTokens": 4096}}, "4096"),
        # GPU: the engine's profile unless the user chose a budget.
        ({"accelerator": {"type": "L4"}}, "16384"),
        ({"accelerator": {"type": "H100"}, "build": {"maxNumTokens": 8192}}, "8192"),
        ({"accelerator": {"type": "H100"}, "runtime": {"maxBatchTokens": 4096}}, "4096"),
    ],
)
def test_serve_max_batch_tokens_per_accelerator(fields: dict[str, Any], budget: str) -> None:
    from reranker_runtime.batch_budget import parse_max_batch_tokens

    env = env_map(container(b.build_deployment("rr", NS, spec_of(**fields), CONFIG, KEY)))
    assert env["RERANKER_MAX_BATCH_TOKENS"] == budget
    parse_max_batch_tokens(budget)  # the runtime's own parser accepts it


def test_serve_env_names_are_runtime_settings() -> None:
    from reranker_runtime.config import SERVE_ENV_VARS

    runtime_vars = set(SERVE_ENV_VARS.values())
    for variant in VARIANTS.values():
        for e in b.serve_env(variant, KEY):
            if e["name"].startswith("RERANKER_"):
                assert e["name"] in runtime_vars, e["name"]


def test_probes_and_overrides() -> None:
    c = container(b.build_deployment("rr", NS, spec_of(), CONFIG, KEY))
    assert c["startupProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/live", "port": "http"}
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600  # model load + warm-up
    o = container(b.build_deployment("rr", NS, VARIANTS["gpu-replicas"], CONFIG, KEY))
    assert o["startupProbe"]["failureThreshold"] == 200 and o["startupProbe"]["periodSeconds"] == 5
    assert o["livenessProbe"]["timeoutSeconds"] == 9
    assert o["readinessProbe"] == c["readinessProbe"]


def test_replicas_omitted_when_autoscaling() -> None:
    dep = b.build_deployment("rr", NS, VARIANTS["autoscaling-concurrency"], CONFIG, KEY)
    assert "replicas" not in dep["spec"]
    assert b.build_deployment("rr", NS, spec_of(), CONFIG, KEY)["spec"]["replicas"] == 1
    assert b.build_deployment("rr", NS, spec_of(replicas=0), CONFIG, KEY)["spec"]["replicas"] == 0


def test_restricted_security_context() -> None:
    for obj in all_children(VARIANTS["gpu-default"]):
        if obj["kind"] not in ("Job", "Deployment"):
            continue
        pod = obj["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert pod["automountServiceAccountToken"] is False
        sc = container(obj)["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["capabilities"] == {"drop": ["ALL"]}
        assert any(m["mountPath"] == "/tmp" for m in container(obj)["volumeMounts"])


def test_image_from_spec_overrides_config() -> None:
    spec = spec_of(runtime={"image": "registry.local/runtime:dev"})
    assert (
        container(b.build_deployment("rr", NS, spec, CONFIG, KEY))["image"]
        == "registry.local/runtime:dev"
    )
    assert (
        container(b.build_engine_job("rr", NS, spec_of(), CONFIG, KEY))["image"]
        == DEFAULT_RUNTIME_IMAGE
    )
    config = config_from_dict({"imagePullSecrets": ["regcred"], "imagePullPolicy": "Always"})
    dep = b.build_deployment("rr", NS, spec_of(), config, KEY)
    assert dep["spec"]["template"]["spec"]["imagePullSecrets"] == [{"name": "regcred"}]
    assert container(dep)["imagePullPolicy"] == "Always"


def _images(children: list[dict[str, Any]]) -> set[str]:
    """Every image of every container and init container of the pods these objects run."""
    pods = [c["spec"]["template"]["spec"] for c in children if c["kind"] in ("Job", "Deployment")]
    return {c["image"] for pod in pods for c in pod["containers"] + pod.get("initContainers", [])}


@pytest.mark.parametrize("mode", ["PerPod", "Shared"])
def test_cpu_rerankers_run_the_cpu_image_and_gpu_rerankers_the_gpu_image(mode: str) -> None:
    config = config_from_dict(
        {"runtimeImage": "registry.local/gpu:1", "runtimeImageCPU": "registry.local/cpu:1"}
    )
    cache = {"mode": mode} if mode == "PerPod" else {"mode": mode, "storageClassName": "rwx"}

    def images(**spec: Any) -> set[str]:
        rr = spec_of(engineCache=cache, **spec)
        return _images(b.build_children("rr", NS, rr, config, owner=OWNER, key=KEY))

    assert images(accelerator={"type": "CPU"}) == {"registry.local/cpu:1"}
    assert images(accelerator={"type": "L4"}) == {"registry.local/gpu:1"}
    pinned = {"image": "registry.local/mine:2"}
    assert images(accelerator={"type": "CPU"}, runtime=pinned) == {"registry.local/mine:2"}
    # The built-in defaults: a CPU node never pulls the CUDA image.
    cpu_default = spec_of(engineCache=cache, accelerator={"type": "CPU"})
    assert _images(all_children(cpu_default)) == {DEFAULT_RUNTIME_IMAGE_CPU}


def test_the_engine_key_of_a_cpu_reranker_follows_the_cpu_image() -> None:
    cpu, gpu = spec_of(accelerator={"type": "CPU"}), spec_of()
    other_cpu_image = config_from_dict({"runtimeImageCPU": "registry.local/cpu:2"})
    assert b.engine_key_for(cpu, other_cpu_image) != b.engine_key_for(cpu, CONFIG)
    assert b.engine_key_for(gpu, other_cpu_image) == b.engine_key_for(gpu, CONFIG)
    assert b.engine_key_for(cpu, CONFIG) == engine_key(cpu, DEFAULT_RUNTIME_IMAGE_CPU)


# ---------------------------------------------------------------- Service, PDB, HPA, PVC


def test_grpc_opens_teis_grpc_api_on_the_pods_and_the_service() -> None:
    off, on = spec_of(), spec_of(runtime={"grpc": True})
    assert "RERANKER_GRPC_PORT" not in env_map(
        container(b.build_deployment("rr", NS, off, CONFIG, KEY))
    )
    dep = b.build_deployment("rr", NS, on, CONFIG, KEY)
    assert env_map(container(dep))["RERANKER_GRPC_PORT"] == "50051"
    assert container(dep)["ports"] == [
        {"name": "http", "containerPort": 8080, "protocol": "TCP"},
        {"name": "grpc", "containerPort": 50051, "protocol": "TCP"},
    ]
    assert b.build_service("rr", NS, on)["spec"]["ports"][1] == {
        "name": "grpc",
        "port": 50051,
        "targetPort": "grpc",
        "protocol": "TCP",
        "appProtocol": "kubernetes.io/h2c",
    }
    assert len(b.build_service("rr", NS, off)["spec"]["ports"]) == 1


def test_service_selects_the_serving_pods() -> None:
    svc = b.build_service("rr", NS, spec_of(), OWNER)
    dep = b.build_deployment("rr", NS, spec_of(), CONFIG, KEY)
    assert svc["spec"]["type"] == "ClusterIP"
    assert svc["spec"]["ports"] == [
        {"name": "http", "port": 8080, "targetPort": "http", "protocol": "TCP"}
    ]
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    assert dep["spec"]["selector"]["matchLabels"] == svc["spec"]["selector"]
    assert b.selector_string("rr") == ",".join(
        f"{k}={v}" for k, v in svc["spec"]["selector"].items()
    )
    # The engine build pods are not serving pods.
    job_labels = b.build_engine_job("rr", NS, spec_of(), CONFIG, KEY)["spec"]["template"][
        "metadata"
    ]["labels"]
    assert not svc["spec"]["selector"].items() <= job_labels.items()
    assert b.endpoint_url("rr", NS) == "http://rr.search.svc.cluster.local:8080"


def test_pdb() -> None:
    pdb = b.build_pdb("rr", NS, VARIANTS["gpu-replicas"], OWNER)
    assert pdb is not None
    assert pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"] == b.selector_labels("rr")


def test_hpa_concurrency_and_cpu() -> None:
    hpa = b.build_hpa("rr", NS, VARIANTS["autoscaling-concurrency"], OWNER)
    assert hpa is not None and hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "rr",
    }
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 6)
    assert hpa["spec"]["metrics"] == [
        {
            "type": "Pods",
            "pods": {
                "metric": {"name": "reranker_requests_in_flight"},
                "target": {"type": "AverageValue", "averageValue": "24"},
            },
        }
    ]
    cpu = b.build_hpa("rr", NS, VARIANTS["autoscaling-cpu"])
    assert cpu is not None
    assert cpu["spec"]["metrics"] == [
        {
            "type": "Resource",
            "resource": {
                "name": "cpu",
                "target": {"type": "Utilization", "averageUtilization": 60},
            },
        }
    ]


def test_engine_cache_pvc_defaults_overrides_and_retention() -> None:
    pvc = b.build_engine_cache_pvc("rr", NS, spec_of(), CONFIG, OWNER)
    assert pvc["metadata"]["name"] == "rr-engine-cache"
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert pvc["spec"]["resources"]["requests"]["storage"] == "20Gi"
    assert "storageClassName" not in pvc["spec"]  # the cluster's default class
    assert "ownerReferences" not in pvc["metadata"]  # Retain (default): outlives the Reranker
    assert pvc["metadata"]["annotations"][b.ANNOTATION_RETENTION] == "Retain"
    pvc = b.build_engine_cache_pvc("rr", NS, VARIANTS["gpu-replicas"], CONFIG, OWNER)
    assert pvc["spec"]["storageClassName"] == "filestore"
    assert pvc["spec"]["resources"]["requests"]["storage"] == "100Gi"
    assert pvc["metadata"]["ownerReferences"] == [OWNER]  # Delete: garbage-collected with it
    assert b.build_engine_cache_pvc("rr", NS, VARIANTS["cpu"], CONFIG)["spec"]["accessModes"] == [
        "ReadWriteOnce"
    ]
    config = config_from_dict(
        {"engineCache": {"size": "50Gi", "storageClassName": "fast", "retention": "Delete"}}
    )
    pvc = b.build_engine_cache_pvc("rr", NS, spec_of(), config, OWNER)
    assert (
        pvc["spec"]["storageClassName"] == "fast"
        and pvc["spec"]["resources"]["requests"]["storage"] == "50Gi"
    )
    assert pvc["metadata"]["ownerReferences"] == [OWNER]


# ---------------------------------------------------------------- labels, owner, spec hash


def test_owner_reference() -> None:
    ref = b.owner_reference(
        {"apiVersion": "reranker.dev/v1alpha1", "metadata": {"name": "rr", "uid": "u-1"}}
    )
    assert ref == {
        "apiVersion": "reranker.dev/v1alpha1",
        "kind": "Reranker",
        "name": "rr",
        "uid": "u-1",
        "controller": True,
        "blockOwnerDeletion": True,
    }


def test_children_carry_common_labels_and_a_spec_hash() -> None:
    for obj in all_children(VARIANTS["autoscaling-concurrency"]):
        labels = obj["metadata"]["labels"]
        assert (
            labels[b.LABEL_RERANKER] == "rr" and labels[b.LABEL_MANAGED_BY] == "reranker-operator"
        )
        assert re.fullmatch(r"[0-9a-f]{64}", obj["metadata"]["annotations"][b.ANNOTATION_SPEC_HASH])
        assert obj["metadata"]["namespace"] == NS


def _hash(obj: dict[str, Any]) -> str:
    return obj["metadata"]["annotations"][b.ANNOTATION_SPEC_HASH]


@pytest.mark.parametrize(
    "change",
    [
        {"replicas": 3},
        {"resources": {"memory": "8Gi"}},
        {"runtime": {"autoTruncate": False}},
        {"runtime": {"probes": {"startup": {"failureThreshold": 7}}}},
        {"accelerator": {"type": "CPU"}},
    ],
)
def test_spec_hash_changes_with_what_the_deployment_renders(change: dict[str, Any]) -> None:
    base = b.build_deployment("rr", NS, spec_of(replicas=2), CONFIG, KEY)
    changed = b.build_deployment("rr", NS, spec_of(**{"replicas": 2, **change}), CONFIG, KEY)
    assert _hash(changed) != _hash(base)
    assert changed["spec"] != base["spec"]


def test_spec_hash_is_stable_for_an_unchanged_spec() -> None:
    one = b.build_deployment("rr", NS, spec_of(replicas=2), CONFIG, KEY)
    # Rebuilt from an equal spec (a fresh parse), with an owner reference: same hash.
    same = b.build_deployment("rr", NS, spec_of(replicas=2), CONFIG, KEY, OWNER)
    assert _hash(one) == _hash(same)
    # Another engine is another template: a new hash.
    assert _hash(b.build_deployment("rr", NS, spec_of(replicas=2), CONFIG, "f" * 64)) != _hash(one)


def test_replacement_patch_removes_what_the_builders_no_longer_render() -> None:
    live = b.build_deployment("rr", NS, spec_of(), CONFIG, KEY, OWNER)
    live["metadata"]["annotations"]["deployment.kubernetes.io/revision"] = "4"  # a controller's
    live["status"] = {"readyReplicas": 1}
    desired = b.build_deployment("rr", NS, spec_of(accelerator={"type": "CPU"}), CONFIG, KEY, OWNER)
    patched = jsonpatch.apply_patch(live, b.replacement_patch(desired, live))
    pod = patched["spec"]["template"]["spec"]
    assert "affinity" not in pod and "tolerations" not in pod
    assert "nvidia.com/gpu" not in pod["containers"][0]["resources"]["limits"]
    assert patched["spec"] == desired["spec"]
    assert patched["metadata"]["annotations"]["deployment.kubernetes.io/revision"] == "4"
    assert _hash(patched) == _hash(desired)
    assert patched["status"] == {"readyReplicas": 1}  # the status is not ours


def test_service_type_metadata_and_source_ranges() -> None:
    svc = b.build_service("rr", NS, VARIANTS["exposed"], OWNER)
    assert svc["spec"]["type"] == "LoadBalancer"
    assert svc["spec"]["loadBalancerSourceRanges"] == ["10.0.0.0/8"]
    assert [p["name"] for p in svc["spec"]["ports"]] == ["http", "grpc"]
    assert svc["metadata"]["labels"]["team"] == "search"
    assert svc["metadata"]["labels"].items() >= b.labels("rr", b.COMPONENT_SERVER).items()
    assert svc["metadata"]["annotations"]["a"] == "1"
    assert svc["spec"]["selector"] == b.selector_labels("rr")


def test_ingress_routes_host_and_path_to_the_http_port() -> None:
    assert b.build_ingress("rr", NS, spec_of()) is None
    ing = b.build_ingress("rr", NS, VARIANTS["exposed"], OWNER)
    assert ing is not None
    assert ing["spec"] == {
        "ingressClassName": "nginx",
        "rules": [{"host": "rerank.example.com", "http": {"paths": [{
            "path": "/rr", "pathType": "Prefix",
            "backend": {"service": {"name": "rr", "port": {"name": "http"}}}}]}}],
        "tls": [{"hosts": ["rerank.example.com"], "secretName": "rerank-tls"}],
    }  # fmt: skip
    assert ing["metadata"]["annotations"]["cert-manager.io/cluster-issuer"] == "le"
    plain = b.build_ingress("rr", NS, spec_of(ingress={"host": "rr.internal"}))
    assert plain is not None and "tls" not in plain["spec"]
    assert "ingressClassName" not in plain["spec"]  # the cluster's default class


def test_http_route_attaches_to_the_gateway_and_routes_to_the_service() -> None:
    assert b.build_http_route("rr", NS, spec_of()) is None
    route_spec = spec_of(httpRoute={
        "parentRefs": [{"name": "shared", "namespace": "gateway-system", "sectionName": "https"},
                       {"name": "internal"}],
        "hostnames": ["rerank.example.com"], "annotations": {"team": "search"}})  # fmt: skip
    route = b.build_http_route("rr", NS, route_spec, OWNER)
    assert route is not None
    assert route["apiVersion"] == "gateway.networking.k8s.io/v1" and route["kind"] == "HTTPRoute"
    assert route["spec"] == {
        "parentRefs": [{"name": "shared", "namespace": "gateway-system", "sectionName": "https"},
                       {"name": "internal"}],
        "hostnames": ["rerank.example.com"],
        "rules": [{"matches": [{"path": {"type": "PathPrefix", "value": "/"}}],
                   "backendRefs": [{"name": "rr", "port": 8080}]}],
    }  # fmt: skip
    assert route["metadata"]["annotations"]["team"] == "search"
    assert route["metadata"]["ownerReferences"] == [OWNER]
    assert route in b.build_children("rr", NS, route_spec, CONFIG, owner=OWNER, key=KEY)
    # The Service it names is the one the operator makes, on the port it names.
    svc = b.build_service("rr", NS, route_spec)
    [backend] = route["spec"]["rules"][0]["backendRefs"]
    assert backend["name"] == svc["metadata"]["name"]
    assert backend["port"] in [p["port"] for p in svc["spec"]["ports"]]


@pytest.mark.parametrize(
    "fields,service_status,url",
    [
        ({}, None, None),
        ({"service": {"type": "NodePort"}}, None, None),
        ({"service": {"type": "LoadBalancer"}}, {}, None),  # not assigned yet
        ({"service": {"type": "LoadBalancer"}}, {"loadBalancer": {"ingress": [{"ip": "1.2.3.4"}]}},
         "http://1.2.3.4:8080"),
        ({"service": {"type": "LoadBalancer"}},
         {"loadBalancer": {"ingress": [{"hostname": "abc.elb.amazonaws.com", "ip": "1.2.3.4"}]}},
         "http://abc.elb.amazonaws.com:8080"),
        ({"service": {"type": "LoadBalancer"}}, {"loadBalancer": {"ingress": [{"ip": "fd00::7"}]}},
         "http://[fd00::7]:8080"),
        ({"ingress": {"host": "rr.example.com"}}, None, "http://rr.example.com"),
        ({"ingress": {"host": "rr.example.com", "path": "/v1/", "tlsSecretName": "t"}}, None,
         "https://rr.example.com/v1"),
        ({"ingress": {"host": "*.example.com"}}, None, None),
        ({"service": {"type": "LoadBalancer"}, "ingress": {"host": "rr.example.com"}},
         {"loadBalancer": {"ingress": [{"ip": "1.2.3.4"}]}}, "http://rr.example.com"),
    ],
)  # fmt: skip
def test_external_endpoint(fields: dict, service_status: dict | None, url: str | None) -> None:
    service = None if service_status is None else {"status": service_status}
    spec = spec_of(**fields)
    ingress = b.build_ingress("rr", NS, spec)
    assert b.external_endpoint(spec, service, ingress) == url
    if spec.ingress is not None:  # not before the Ingress exists
        assert b.external_endpoint(spec, service, None) is None


def test_service_patch_keeps_what_the_cluster_set() -> None:
    """A replaced Service spec keeps its allocated IPs, and on a LoadBalancer the class the AWS
    Load Balancer Controller's webhook set (immutable: dropping it is refused)."""
    lb = spec_of(service={"type": "LoadBalancer"})
    live = b.build_service("rr", NS, lb)
    set_by_cluster = {"clusterIP": "10.0.0.7", "clusterIPs": ["10.0.0.7"], "ipFamilies": ["IPv4"],
                      "ipFamilyPolicy": "SingleStack", "loadBalancerClass": "service.k8s.aws/nlb",
                      "allocateLoadBalancerNodePorts": True}  # fmt: skip
    live["spec"].update(set_by_cluster)
    annotated = spec_of(service={"type": "LoadBalancer", "annotations": {"a": "1"}})
    desired = b.build_service("rr", NS, annotated)
    patched = jsonpatch.apply_patch(live, b.replacement_patch(desired, live))
    assert patched["spec"] == {**desired["spec"], **set_by_cluster}
    # To ClusterIP: the LoadBalancer's fields go (the API server refuses them there), the IPs stay.
    desired = b.build_service("rr", NS, spec_of())
    patched = jsonpatch.apply_patch(live, b.replacement_patch(desired, live))
    assert patched["spec"]["type"] == "ClusterIP" and patched["spec"]["clusterIP"] == "10.0.0.7"
    assert "loadBalancerClass" not in patched["spec"]
    assert "allocateLoadBalancerNodePorts" not in patched["spec"]


def test_user_metadata_removed_from_the_spec_leaves_the_child() -> None:
    """Labels and annotations merge over the live ones (other controllers add theirs), except the
    user's own keys from an earlier spec, which go when the spec drops them."""
    before = spec_of(service={"annotations": {"a": "1", "b": "2"}, "labels": {"team": "x"}})
    live = b.build_service("rr", NS, before)
    live["metadata"]["annotations"]["cloud.example/lb-id"] = "42"  # a controller's
    after = spec_of(service={"annotations": {"b": "3"}})
    desired = b.build_service("rr", NS, after)
    patched = jsonpatch.apply_patch(live, b.replacement_patch(desired, live))
    annotations, labels = patched["metadata"]["annotations"], patched["metadata"]["labels"]
    assert "a" not in annotations and annotations["b"] == "3" and "team" not in labels
    assert annotations["cloud.example/lb-id"] == "42"
    assert _hash(patched) == _hash(desired)
    # With none left in the spec, the last ones and their record go too.
    none = b.build_service("rr", NS, spec_of())
    again = jsonpatch.apply_patch(patched, b.replacement_patch(none, patched))
    assert "b" not in again["metadata"]["annotations"]
    assert b.ANNOTATION_USER_KEYS not in again["metadata"]["annotations"]


@pytest.mark.parametrize("mode", ["PerPod", "Shared"])
def test_spec_labels_reach_every_child_and_every_pod(mode: str) -> None:
    """A policy that requires `team` on every object and pod (Kyverno, Gatekeeper), and cost
    attribution: spec.labels label each child and pod template; pod.labels and service.labels
    win where they overlap, the monitoring config's labels (what Prometheus selects by) too, and
    the operator's own labels always."""
    common = {"team": "search", "cost-center": "cc-42", "example.com/tier": "gold"}
    spec = spec_of(
        labels=common,
        pod={"labels": {"team": "search-pods"}},
        service={"labels": {"cost-center": "cc-svc"}},
        autoscaling={"minReplicas": 1, "maxReplicas": 3},
        ingress={"host": "rerank.example.com"},
        httpRoute={"parentRefs": [{"name": "gw"}]},
        engineCache={"mode": mode},
    )
    config = config_from_dict({"monitoring": {"kind": "ServiceMonitor", "labels": {"team": "obs"}}})
    children = b.build_children("rr", NS, spec, config, key=KEY)
    kinds = sorted(c["kind"] for c in children)
    want_kinds = ["Deployment", "HTTPRoute", "HorizontalPodAutoscaler", "Ingress",
                  "PodDisruptionBudget", "Service", "ServiceMonitor"]  # fmt: skip
    if mode == "Shared":
        want_kinds += ["Job", "PersistentVolumeClaim"]
    assert kinds == sorted(want_kinds)
    prune = b.build_prune_job("rr", NS, spec, config, ["a" * 64])
    own = {"Service": {"cost-center": "cc-svc"}, "ServiceMonitor": {"team": "obs"}}
    for child in [*children, prune]:
        labels = child["metadata"]["labels"]
        assert labels == {**common, **own.get(child["kind"], {}), **labels}, child["kind"]
        assert {k: labels[k] for k in common} == {**common, **own.get(child["kind"], {})}
        assert labels[b.LABEL_RERANKER] == "rr"  # the operator's, untouched
        template = child["spec"].get("template")
        if template is not None:
            pod_labels = template["metadata"]["labels"]
            pods_own = {"team": "search-pods"} if child is not prune else {}
            assert {k: pod_labels[k] for k in common} == {**common, **pods_own}, child["kind"]
    # The Deployment's selector is the operator's alone (it is immutable).
    (dep,) = [c for c in children if c["kind"] == "Deployment"]
    assert dep["spec"]["selector"]["matchLabels"] == b.selector_labels("rr")
    # A key dropped from spec.labels leaves the live child at the next patch.
    service = next(c for c in children if c["kind"] == "Service")
    fewer = spec_of(labels={"team": "search"}, engineCache={"mode": mode})
    desired = b.build_service("rr", NS, fewer)
    patched = jsonpatch.apply_patch(service, b.replacement_patch(desired, service))
    assert patched["metadata"]["labels"]["team"] == "search"
    assert not {"cost-center", "example.com/tier"} & set(patched["metadata"]["labels"])
    # Without spec.labels nothing is added, nor recorded: children stay as they were.
    for child in b.build_children("rr", NS, spec_of(engineCache={"mode": mode}), CONFIG, key=KEY):
        assert b.ANNOTATION_USER_KEYS not in child["metadata"].get("annotations", {})


@pytest.mark.parametrize(
    ("labels", "needle"),
    [({"app.kubernetes.io/name": "x"}, "set by the operator"),
     ({"reranker.dev/x": "y"}, "set by the operator"),
     ({"-team": "x"}, "is not a label key"),
     ({"a/b/c": "x"}, "is not a label key"),
     ({"x" * 64: "x"}, "is not a label key"),
     ({"team": "a b"}, "is not a label value"),
     ({"team": "-x"}, "is not a label value")],
)  # fmt: skip
def test_label_keys_and_values_are_checked_before_anything_is_applied(
    labels: dict[str, str], needle: str
) -> None:
    for field, fields in (
        ("spec.labels", {"labels": labels}),
        ("spec.pod.labels", {"pod": {"labels": labels}}),
        ("spec.service.labels", {"service": {"labels": labels}}),
    ):
        with pytest.raises(InvalidSpec, match=needle) as exc:
            spec_of(**fields)
        assert exc.value.field == field
    assert spec_of(labels={"example.com/team": "", "a_b.c": "x-1.y_2"}).labels


@pytest.mark.parametrize(
    "key", ["job-name", "controller-uid", "batch.kubernetes.io/job-name", "pod-template-hash"]
)
def test_labels_the_pod_controllers_set_are_refused_on_pods(key: str) -> None:
    """The API server refuses a Job whose pod template sets job-name or controller-uid to
    another value: refused before the cache PVC or anything else is applied. On the Service
    they are only labels."""
    for field, fields in (
        ("spec.labels", {"labels": {key: "x"}}),
        ("spec.pod.labels", {"pod": {"labels": {key: "x"}}}),
    ):
        with pytest.raises(InvalidSpec, match="Job or Deployment controller") as exc:
            spec_of(**fields)
        assert exc.value.field == field
    assert spec_of(service={"labels": {key: "x"}}).service.labels == {key: "x"}


@pytest.mark.parametrize("mode", ["PerPod", "Shared"])
def test_a_mig_slice_or_shared_gpu_is_requested_instead_of_a_whole_gpu(mode: str) -> None:
    spec = spec_of(
        accelerator={"type": "H100", "resourceName": "nvidia.com/mig-1g.10gb"},
        engineCache={"mode": mode},
    )
    for obj in b.build_children("rr", NS, spec, CONFIG, key=KEY):
        pod = obj["spec"].get("template", {}).get("spec")
        if pod is None:
            continue
        for c in pod["containers"] + pod.get("initContainers", []):
            limits = c["resources"]["limits"]
            assert limits["nvidia.com/mig-1g.10gb"] == "1" and "nvidia.com/gpu" not in limits
        # Still on an H100 node, with the GPU taint tolerated.
        assert node_matches(pod, {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"})
        assert any(t.get("key") == "nvidia.com/gpu" for t in pod["tolerations"])
    # A slice builds an engine of its own: the runtime serves an engine only on a GPU of the
    # name it was built on ("NVIDIA H100 80GB HBM3 MIG 1g.10gb" is not the whole H100's).
    whole = spec_of(accelerator={"type": "H100"}, engineCache={"mode": mode})
    assert b.engine_key_for(spec, CONFIG) != b.engine_key_for(whole, CONFIG)


def test_rollout_without_a_spare_gpu() -> None:
    dep = b.build_deployment("rr", NS, VARIANTS["full-pool"], CONFIG, KEY)
    assert dep["spec"]["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxUnavailable": "25%", "maxSurge": 0},
    }


@pytest.mark.parametrize("kind", ["Deployment", "Job"])
def test_per_reranker_pull_secrets_and_scheduler(kind: str) -> None:
    config = config_from_dict({"imagePullSecrets": ["org-regcred", "team-regcred"]})
    spec = VARIANTS["full-pool"].model_copy(
        update={"engine_cache": spec_of(engineCache={"mode": "Shared"}).engine_cache}
    )
    children = {c["kind"]: c for c in b.build_children("rr", NS, spec, config, key=KEY)}
    pod = children[kind]["spec"]["template"]["spec"]
    # The config's first, then the Reranker's, each once.
    assert pod["imagePullSecrets"] == [{"name": "org-regcred"}, {"name": "team-regcred"}]
    assert pod["schedulerName"] == "volcano"
    plain = b.build_deployment("rr", NS, spec_of(), CONFIG, KEY)["spec"]["template"]["spec"]
    assert "imagePullSecrets" not in plain and "schedulerName" not in plain


def test_hpa_behavior_replaces_ours_direction_by_direction() -> None:
    hpa = b.build_hpa("rr", NS, VARIANTS["full-pool"])
    assert hpa is not None
    behavior = hpa["spec"]["behavior"]
    assert behavior["scaleUp"] == {"policies": [{"type": "Pods", "value": 2, "periodSeconds": 60}]}
    assert behavior["scaleDown"]["stabilizationWindowSeconds"] == 300  # ours, not overridden
    down = {"scaleDown": {"stabilizationWindowSeconds": 60}}
    hpa = b.build_hpa("rr", NS, spec_of(autoscaling={"maxReplicas": 4, "behavior": down}))
    assert hpa is not None and hpa["spec"]["behavior"] == down


def test_replacement_patch_keeps_the_hpas_replicas() -> None:
    live = b.build_deployment("rr", NS, spec_of(replicas=2), CONFIG, KEY)
    live["spec"]["replicas"] = 5  # scaled by the HPA
    desired = b.build_deployment("rr", NS, spec_of(autoscaling={"maxReplicas": 8}), CONFIG, KEY)
    assert "replicas" not in desired["spec"]
    patch = b.replacement_patch(desired, live)
    assert jsonpatch.apply_patch(live, patch)["spec"]["replicas"] == 5
    # The autoscaler's next step lands between the operator's read and its patch: kept.
    live["spec"]["replicas"] = 7
    patched = jsonpatch.apply_patch(live, patch)
    assert patched["spec"]["replicas"] == 7
    assert patched["spec"] == {**desired["spec"], "replicas": 7}  # the rest as rendered
    # A field the builders no longer render goes, as with a whole-spec replacement.
    live["spec"]["paused"] = True
    assert "paused" not in jsonpatch.apply_patch(live, b.replacement_patch(desired, live))["spec"]


@pytest.mark.parametrize("scaling", [{"replicas": 3}, {"autoscaling": {"maxReplicas": 8}}])
def test_replacement_patch_keeps_a_rollout_restart(scaling: dict[str, Any]) -> None:
    # `kubectl rollout restart deployment/rr`, then a change that leaves the pods as they are:
    # the pod template must come out as it is live, or every pod rolls a second time.
    live = b.build_deployment("rr", NS, spec_of(replicas=2), CONFIG, KEY)
    stamp = {b.ANNOTATION_RESTARTED_AT: "2026-12-02T10:00:00Z"}
    live["spec"]["template"]["metadata"].setdefault("annotations", {}).update(stamp)
    desired = b.build_deployment("rr", NS, spec_of(**scaling), CONFIG, KEY)
    patched = jsonpatch.apply_patch(live, b.replacement_patch(desired, live))
    assert patched["spec"]["template"] == live["spec"]["template"]
    # A change to the pods themselves still rolls them (the stamp stays, harmlessly).
    changed = b.build_deployment("rr", NS, spec_of(resources={"memory": "12Gi"}), CONFIG, KEY)
    patched = jsonpatch.apply_patch(live, b.replacement_patch(changed, live))
    assert patched["spec"]["template"] != live["spec"]["template"]
    assert patched["spec"]["template"]["metadata"]["annotations"][b.ANNOTATION_RESTARTED_AT]


def test_builders_are_pure() -> None:
    spec = VARIANTS["gpu-replicas"]
    first = all_children(spec)
    first[2]["spec"]["template"]["spec"]["tolerations"].append({"key": "mutated"})
    assert all_children(spec) != first
    assert OperatorConfig() == CONFIG


# ---------------------------------------------------------------- engine key

ENGINE_CHANGES = {
    "repo": {"checkpoint": {"repo": "BAAI/bge-reranker-base"}},
    "revision": {"checkpoint": {"repo": "BAAI/bge-reranker-large", "revision": "v2"}},
    "source": {"checkpoint": {"repo": "BAAI/bge-reranker-large", "source": "GCS"}},
    "quantization": {"build": {"quantization": "fp8"}},
    "maxNumTokens": {"build": {"maxNumTokens": 8192}},
    "maxSeqLen": {"build": {"maxSeqLen": 512}},
    "accelerator": {"accelerator": {"type": "H100"}},
    "image": {"runtime": {"image": "ghcr.io/reranker-dev/reranker-runtime:0.2.0"}},
}
SERVING_CHANGES = {
    "replicas": {"replicas": 4},
    "autoscaling": {"autoscaling": {"maxReplicas": 9}},
    "resources": {"resources": {"cpu": "8", "memory": "64Gi"}},
    "runtime-limits": {
        "runtime": {"maxBatchTokens": 4096, "maxConcurrentRequests": 7, "autoTruncate": True}
    },
    "api-key": {"runtime": {"apiKeySecret": {"name": "k"}}},
    "cache": {"engineCache": {"size": "99Gi", "retention": "Delete"}},
    "secret": {"checkpoint": {"repo": "BAAI/bge-reranker-large", "secretName": "hf"}},
    # A mirror serves the same files.
    "endpoint": {"checkpoint": {"repo": "BAAI/bge-reranker-large", "endpoint": "https://hf.corp"}},
}


def _key(spec: RerankerSpec) -> str:
    return b.engine_key_for(spec, CONFIG)


# The key of spec_of() on the default image before accelerator.resourceName existed: keys of
# Rerankers that do not set it must not change (a new key means a rebuild and a rollout).
KEY_OF_THE_DEFAULT_SPEC = "8280c7fb460a6b33f7611418275714f3a5f5ea41e2ecc442af6be661bac11eaf"


def test_engine_key_is_stable_sha256() -> None:
    key = _key(spec_of())
    assert key == KEY_OF_THE_DEFAULT_SPEC
    assert re.fullmatch(r"[0-9a-f]{64}", key)
    assert key == _key(spec_of()) == engine_key(spec_of(), DEFAULT_RUNTIME_IMAGE)
    assert engine_key(spec_of(), "other:1") != key


@pytest.mark.parametrize("change", ENGINE_CHANGES)
def test_engine_key_changes_with_each_engine_input(change: str) -> None:
    assert _key(spec_of(**ENGINE_CHANGES[change])) != _key(spec_of())


@pytest.mark.parametrize("change", SERVING_CHANGES)
def test_engine_key_ignores_serving_settings(change: str) -> None:
    assert _key(spec_of(**SERVING_CHANGES[change])) == _key(spec_of())


def test_engine_key_follows_the_config_image() -> None:
    config = config_from_dict({"runtimeImage": "ghcr.io/reranker-dev/reranker-runtime:9"})
    assert b.engine_key_for(spec_of(), config) != _key(spec_of())


# ---------------------------------------------------------------- operator config


def test_config_defaults() -> None:
    config = load_config(None)
    assert config.runtime_image == "ghcr.io/reranker-dev/reranker-runtime:0.1.0"
    assert config.runtime_image_cpu == "ghcr.io/reranker-dev/reranker-runtime-cpu:0.1.0"
    assert set(config.accelerators) == {"L4", "A10G", "A100", "H100", "H200", "T4", "CPU"}
    assert config.accelerators["CPU"].resource_name is None
    assert (
        config.accelerators["CPU"].node_selector_terms == []
        and config.accelerators["CPU"].tolerations == []
    )


def test_config_from_file_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "runtimeImage": "registry.local/runtime:1",
                "buildJob": {"backoffLimit": 0, "activeDeadlineSeconds": 600},
                "accelerators": {"B200": {"nodeSelector": {"gpu": "b200"}}},
            }
        )
    )
    config = load_config(path)
    assert config.runtime_image == "registry.local/runtime:1"
    assert (
        config.build_job.backoff_limit == 0 and config.build_job.ttl_seconds_after_finished == 86400
    )
    assert "B200" in config.accelerators and "L4" in config.accelerators
    monkeypatch.setenv(CONFIG_ENV, str(path))
    assert load_config().runtime_image == "registry.local/runtime:1"
    job = b.build_engine_job("rr", NS, spec_of(), config, KEY)
    assert job["spec"]["backoffLimit"] == 0 and job["spec"]["activeDeadlineSeconds"] == 600


@pytest.mark.parametrize(
    "text",
    [
        "runtimeImage: [1, 2]\n",
        "unknownKey: 1\n",
        "- a list\n",
        "accelerators: [L4]\n",
        "buildJob: {backoffLimit: -1}\n",
        "proxy: {httpsProxy: 'proxy.corp:3128'}\n",  # no scheme: httpx refuses it
        "proxy: {caConfigMap: Corp_CA}\n",
    ],
)
def test_config_errors(tmp_path: Path, text: str) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError):
        load_config(path)
    with pytest.raises(ConfigError):
        load_config(tmp_path / "missing.yaml")
