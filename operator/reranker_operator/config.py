"""Operator configuration: runtime images, accelerator placement map, cache and build-Job defaults.

Loaded from a YAML file (`--config PATH` or the RERANKER_OPERATOR_CONFIG variable); every key is
optional and falls back to the built-in defaults below. The Helm chart renders this file from its
values. The format is documented in docs/operator.md.

Accelerators are merged per type: a file that lists only `H100` keeps the built-in entries of the
other types, and a listed type replaces its built-in entry as a whole.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from reranker_operator.spec import SECRET_NAME_PATTERN

CONFIG_ENV = "RERANKER_OPERATOR_CONFIG"
DEFAULT_RUNTIME_IMAGE = "ghcr.io/reranker-dev/reranker-runtime:0.1.0"
# Rerankers on accelerator.type CPU: slim Python with PyTorch's CPU build (images/runtime-cpu.Dockerfile),
# not the GPU image's tens of GB of CUDA and TensorRT-LLM.
DEFAULT_RUNTIME_IMAGE_CPU = "ghcr.io/reranker-dev/reranker-runtime-cpu:0.1.0"
GPU_RESOURCE = "nvidia.com/gpu"

# Node labels that name a node's GPU, per accelerator type; a node matching any one of them is
# accepted (the terms are ORed):
# - GKE's node-pool label;
# - NVIDIA GPU feature discovery's product label (GPU Operator, any cloud or on-premises);
# - EKS without GPU feature discovery: the well-known instance-type label (EC2 instance families
#   with that GPU) and Karpenter's GPU-name label.
_GKE_LABEL = "cloud.google.com/gke-accelerator"
_GFD_LABEL = "nvidia.com/gpu.product"
_INSTANCE_TYPE_LABEL = "node.kubernetes.io/instance-type"
_KARPENTER_LABEL = "karpenter.k8s.aws/instance-gpu-name"


def _sizes(family: str, sizes: str) -> list[str]:
    return [f"{family}.{size}" for size in sizes.split()]


_G6 = "xlarge 2xlarge 4xlarge 8xlarge 12xlarge 16xlarge 24xlarge 48xlarge"
# type: (GKE values, GPU feature discovery values, EC2 instance types, Karpenter GPU names)
_GPU_LABELS: dict[str, tuple[list[str], list[str], list[str], list[str]]] = {
    "L4": (
        ["nvidia-l4"],
        ["NVIDIA-L4"],
        _sizes("g6", _G6) + _sizes("gr6", "4xlarge 8xlarge"),
        ["l4"],
    ),
    "A10G": (["nvidia-a10g"], ["NVIDIA-A10G"], _sizes("g5", _G6), ["a10g"]),
    "A100": (
        ["nvidia-tesla-a100", "nvidia-a100-80gb"],
        [
            "NVIDIA-A100-SXM4-40GB",
            "NVIDIA-A100-SXM4-80GB",
            "NVIDIA-A100-PCIE-40GB",
            "NVIDIA-A100-80GB-PCIe",
        ],
        ["p4d.24xlarge", "p4de.24xlarge"],
        ["a100"],
    ),
    "H100": (
        ["nvidia-h100-80gb", "nvidia-h100-mega-80gb"],
        ["NVIDIA-H100-80GB-HBM3", "NVIDIA-H100-PCIe", "NVIDIA-H100-NVL"],
        ["p5.4xlarge", "p5.48xlarge"],
        ["h100"],
    ),
    "H200": (
        ["nvidia-h200-141gb"],
        ["NVIDIA-H200", "NVIDIA-H200-NVL"],
        ["p5e.48xlarge", "p5en.48xlarge"],
        ["h200"],
    ),
    "T4": (
        ["nvidia-tesla-t4"],
        ["Tesla-T4"],
        _sizes("g4dn", "xlarge 2xlarge 4xlarge 8xlarge 12xlarge 16xlarge metal"),
        ["t4"],
    ),
}


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AcceleratorPlacement(_Model):
    """How pods for one accelerator type are placed and what they request."""

    # Extended resource requested in limits (count = spec.accelerator.count); None for CPU.
    resource_name: str | None = Field(default=GPU_RESOURCE, alias="resourceName")
    # Pod `affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms`:
    # terms are ORed, expressions inside a term ANDed.
    node_selector_terms: list[dict[str, Any]] = Field(
        default_factory=list, alias="nodeSelectorTerms"
    )
    # Plain nodeSelector (ANDed with the affinity); usually empty.
    node_selector: dict[str, str] = Field(default_factory=dict, alias="nodeSelector")
    tolerations: list[dict[str, Any]] = Field(default_factory=list)
    # The pods' RuntimeClass, e.g. `nvidia` where the NVIDIA container runtime is not the
    # default (k3s, RKE2, some GPU Operator set-ups); None: the cluster's default runtime.
    runtime_class_name: str | None = Field(
        default=None,
        alias="runtimeClassName",
        pattern=SECRET_NAME_PATTERN,  # a DNS-1123 subdomain, as spec.pod.runtimeClassName
    )


class EngineCacheDefaults(_Model):
    # PerPod needs no storage set-up (nothing ReadWriteMany); Shared needs an RWX class to serve
    # from several nodes. See docs/operator.md, "Engine storage".
    mode: Literal["PerPod", "Shared"] = "PerPod"
    size: str = "20Gi"
    storage_class_name: str | None = Field(
        default=None, alias="storageClassName"
    )  # None: cluster default
    access_mode: Literal["ReadWriteMany", "ReadWriteOnce"] = Field(
        default="ReadWriteMany", alias="accessMode"
    )
    retention: Literal["Retain", "Delete"] = "Retain"
    # Shared mode: engines kept on the cache besides the one being served, most recently served
    # first (a rollback to them needs no build). Older ones are deleted once a rollout to a new
    # engine has succeeded.
    keep_engines: int = Field(default=1, alias="keepEngines", ge=0, le=100)


class BuildJobSettings(_Model):
    backoff_limit: int = Field(default=2, alias="backoffLimit", ge=0)
    active_deadline_seconds: int = Field(default=3600, alias="activeDeadlineSeconds", ge=1)
    ttl_seconds_after_finished: int = Field(default=86400, alias="ttlSecondsAfterFinished", ge=0)


def _gpu_placement(
    gke: list[str], gfd: list[str], instance_types: list[str], karpenter: list[str]
) -> AcceleratorPlacement:
    labels = (
        (_GKE_LABEL, gke),
        (_GFD_LABEL, gfd),
        (_INSTANCE_TYPE_LABEL, instance_types),
        (_KARPENTER_LABEL, karpenter),
    )
    return AcceleratorPlacement(
        resourceName=GPU_RESOURCE,
        nodeSelectorTerms=[
            {"matchExpressions": [{"key": key, "operator": "In", "values": values}]}
            for key, values in labels
        ],
        tolerations=[{"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}],
    )


def default_accelerators() -> dict[str, AcceleratorPlacement]:
    accelerators = {t: _gpu_placement(*labels) for t, labels in _GPU_LABELS.items()}
    accelerators["CPU"] = AcceleratorPlacement(resourceName=None)
    return accelerators


def default_pod_security_context() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": 10001,
        "runAsGroup": 10001,
        "fsGroup": 10001,  # the engine cache must be writable by the build Job's user
        "seccompProfile": {"type": "RuntimeDefault"},
    }


class MonitoringSettings(_Model):
    """An opt-in scrape object per Reranker, for the metrics pipeline the cluster runs."""

    # ServiceMonitor: Prometheus Operator (kube-prometheus-stack); PodMonitoring: GKE managed
    # Prometheus. None: neither (the pods still carry prometheus.io/* annotations).
    kind: Literal["ServiceMonitor", "PodMonitoring"] | None = None
    interval: str = Field(default="30s", pattern=r"^[0-9]+(ms|s|m|h)$")
    # Labels on the ServiceMonitor / PodMonitoring, e.g. the `release` label a Prometheus
    # object's serviceMonitorSelector picks.
    labels: dict[str, str] = Field(default_factory=dict)


class AutoscalingSettings(_Model):
    # The name the HPA asks the custom metrics API for (metric Concurrency): what the adapter
    # exposes the runtime's reranker_requests_in_flight gauge as. prometheus-adapter with the rule in
    # docs/operator.md: reranker_requests_in_flight; GKE's Custom Metrics Stackdriver Adapter with
    # managed Prometheus: prometheus.googleapis.com|reranker_requests_in_flight|gauge.
    concurrency_metric: str = Field(
        default="reranker_requests_in_flight", alias="concurrencyMetric", min_length=1
    )


# A proxy URL with its scheme: httpx refuses `proxy:3128`, urllib misreads it. HTTP(S) proxies
# only: the image has no SOCKS support (urllib and boto3 have none).
PROXY_URL_PATTERN = r"^https?://[^\s/]+/?$"


class ProxySettings(_Model):
    """An egress proxy and a CA bundle for the engine build's downloads (the hub, S3, GCS,
    Azure, REMOTE_URL), set on every build container. Serving never leaves the cluster."""

    http_proxy: str | None = Field(default=None, alias="httpProxy", pattern=PROXY_URL_PATTERN)
    https_proxy: str | None = Field(default=None, alias="httpsProxy", pattern=PROXY_URL_PATTERN)
    no_proxy: str | None = Field(default=None, alias="noProxy", min_length=1)
    # A ConfigMap in each Reranker's namespace holding a PEM bundle (e.g. trust-manager's): it
    # replaces the default trust store, so it must hold the public CAs too.
    ca_config_map: str | None = Field(
        default=None,
        alias="caConfigMap",
        max_length=253,
        pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$",
    )
    ca_config_map_key: str = Field(
        default="ca.crt", alias="caConfigMapKey", pattern=r"^[-._a-zA-Z0-9]{1,253}$"
    )


class OperatorConfig(_Model):
    runtime_image: str = Field(default=DEFAULT_RUNTIME_IMAGE, alias="runtimeImage", min_length=1)
    runtime_image_cpu: str = Field(
        default=DEFAULT_RUNTIME_IMAGE_CPU, alias="runtimeImageCPU", min_length=1
    )
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = Field(
        default="IfNotPresent", alias="imagePullPolicy"
    )
    image_pull_secrets: list[str] = Field(default_factory=list, alias="imagePullSecrets")
    accelerators: dict[str, AcceleratorPlacement] = Field(default_factory=default_accelerators)
    engine_cache: EngineCacheDefaults = Field(
        default_factory=EngineCacheDefaults, alias="engineCache"
    )
    build_job: BuildJobSettings = Field(default_factory=BuildJobSettings, alias="buildJob")
    pod_security_context: dict[str, Any] = Field(
        default_factory=default_pod_security_context, alias="podSecurityContext"
    )
    termination_grace_period_seconds: int = Field(
        default=60, alias="terminationGracePeriodSeconds", ge=0
    )
    monitoring: MonitoringSettings = Field(default_factory=MonitoringSettings)
    autoscaling: AutoscalingSettings = Field(default_factory=AutoscalingSettings)
    proxy: ProxySettings = Field(default_factory=ProxySettings)
    # A pod preparing an engine that stays Unschedulable this long turns the Reranker Failed (or
    # Degraded while older pods serve) instead of Pending. Leaves time for a cluster autoscaler
    # to add a GPU node (typically 3-10 minutes).
    unschedulable_timeout_seconds: int = Field(
        default=900, alias="unschedulableTimeoutSeconds", ge=1
    )

    def placement(self, accelerator_type: str) -> AcceleratorPlacement:
        try:
            return self.accelerators[accelerator_type]
        except KeyError:
            raise KeyError(
                f"no placement for accelerator type {accelerator_type!r} in the operator config"
            ) from None


class ConfigError(ValueError):
    pass


def config_from_dict(data: dict[str, Any] | None) -> OperatorConfig:
    data = dict(data or {})
    accelerators = data.pop("accelerators", None) or {}
    if not isinstance(accelerators, dict):
        raise ConfigError("accelerators: must be a mapping of accelerator type -> placement")
    try:
        config = OperatorConfig.model_validate(data)
        merged = dict(config.accelerators)
        for name, entry in accelerators.items():
            merged[name] = AcceleratorPlacement.model_validate(entry or {})
    except ValidationError as exc:
        raise ConfigError(str(exc)) from None
    return config.model_copy(update={"accelerators": merged})


def load_config(path: str | os.PathLike[str] | None = None) -> OperatorConfig:
    """Load the config from `path`, else $RERANKER_OPERATOR_CONFIG, else built-in defaults."""
    path = path or os.environ.get(CONFIG_ENV) or None
    if path is None:
        return OperatorConfig()
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read operator config {path}: {exc}") from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{path}: the operator config must be a YAML mapping")
    return config_from_dict(data)
