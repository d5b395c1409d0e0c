"""The Reranker spec as a typed model, parsed once per handler call.

The CRD's structural schema applies defaults and most limits in a real API server, but the
in-memory emulator used in tests (and a hand-edited object that predates a schema change) does
no defaulting or validation. So the same defaults live here, and the CRD's CEL rules are
re-checked in `_check_rules`; anything refused raises `InvalidSpec(field, message)`, which the
handlers turn into a Failed status naming the field instead of a crash loop.
"""

from __future__ import annotations

import ipaddress
import re
from decimal import MAX_EMAX, MIN_EMIN, Context, Decimal, localcontext
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    ValidationInfo,
    field_validator,
)

API_GROUP = "reranker.dev"
API_VERSION = "v1alpha1"
KIND = "Reranker"
PLURAL = "rerankers"

Source = Literal["HF", "PVC", "S3", "GCS", "AZURE", "REMOTE_URL"]
Quantization = Literal["no_quant", "fp8", "fp4"]
AcceleratorType = Literal["L4", "A10G", "A100", "H100", "H200", "T4", "CPU"]
AccessMode = Literal["ReadWriteMany", "ReadWriteOnce"]
# PerPod: each runtime pod builds its engine in an init container into a pod-local volume.
# Shared: one Job builds it into the PVC <name>-engine-cache, which every pod mounts.
CacheMode = Literal["PerPod", "Shared"]
Retention = Literal["Retain", "Delete"]
# External: an autoscaler of the user's (KEDA, their own HPA) owns the replica count.
AutoscalingMetric = Literal["Concurrency", "CPU", "External"]
ServiceType = Literal["ClusterIP", "NodePort", "LoadBalancer"]

# GPUs with FP8 tensor cores (Ada: L4; Hopper: H100, H200). Mirrored by a CEL rule in the CRD.
FP8_ACCELERATORS: tuple[str, ...] = ("L4", "H100", "H200")

# Kubernetes quantity (same pattern the Kubernetes OpenAPI uses for resource.Quantity).
QUANTITY_PATTERN = (
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]"
    r"|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)
# The Reranker's name also names its Service, so it must be a DNS-1035 label.
NAME_PATTERN = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
_LIMIT_MAX = 1048576  # upper bound of the runtime batching limits
ENV_NAME_PATTERN = r"^[-._a-zA-Z][-._a-zA-Z0-9]*$"
SECRET_NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
# runtime.env[].valueFrom, as the API server accepts it for a container's env (and the CRD's
# patterns, held together by tests/operator/test_crd.py): a Secret or ConfigMap key; the pod
# fields the downward API gives env vars; a container resource.
# A Secret or ConfigMap key: not ".", and not starting with "..".
CONFIG_KEY_PATTERN = r"^\.?[-_a-zA-Z0-9][-._a-zA-Z0-9]*$"
# A label or annotation key (a qualified name): [DNS subdomain "/"] name of at most 63.
_QUALIFIED_NAME = (
    r"([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
)
LABEL_VALUE_PATTERN = r"([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?"
ENV_FIELD_PATH_PATTERN = (
    rf"^(metadata\.(name|namespace|uid|labels\['{_QUALIFIED_NAME}'\]"
    rf"|annotations\['{_QUALIFIED_NAME}'\])"
    r"|spec\.(nodeName|serviceAccountName)|status\.(hostIP|hostIPs|podIP|podIPs))$"
)
ENV_FIELD_PATH_MAX = len("metadata.annotations['']") + 253 + 1 + 63
# The divisors the API server allows for a container resource in an env var.
CPU_DIVISORS = ("1", "1m")
QUANTITY_DIVISORS = (
    "1",
    "1k",
    "1M",
    "1G",
    "1T",
    "1P",
    "1E",
    "1Ki",
    "1Mi",
    "1Gi",
    "1Ti",
    "1Pi",
    "1Ei",
)
ENV_RESOURCE_PATTERN = (
    r"^(limits|requests)\.(cpu|memory|ephemeral-storage|hugepages-[-.a-zA-Z0-9]+)$"
)
ROLLOUT_PERCENT_PATTERN = r"^[0-9]{1,3}%$"
# maxUnavailable: at most 100% (the API server refuses more on the Deployment).
UNAVAILABLE_PERCENT_PATTERN = r"^(100|[1-9]?[0-9])%$"
# What the API server accepts in an Ingress and a LoadBalancer Service, written once here and
# in the CRD (tests/operator/test_crd.py holds them together): a host is a DNS-1123 subdomain
# (labels of at most 63, the last one starting with a letter: not an IP address), or `*.` and
# one; a Prefix path has no empty, `.` or `..` segment, no space, control character or `%` (the
# classes spelt out in ASCII: the engines' `\s` differ); a source range is an IPv4 or IPv6 CIDR
# (an IPv6 one checked in full by `ipaddress` here, which no regex of a sane size does).
HOST_PATTERN = r"^(\*\.)?([a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?\.)*[a-z]([-a-z0-9]{0,61}[a-z0-9])?$"
INGRESS_PATH_PATTERN = r"^/$|^(/([^/.%\x00-\x20\x7f]|\.[^/.%\x00-\x20\x7f]|\.\.[^/%\x00-\x20\x7f])[^/%\x00-\x20\x7f]*)+/?$"
# A namespace name (DNS-1123 label).
NAME_LABEL_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
# An HTTPRoute's PathPrefix (Gateway API's HTTPPathMatch): its own characters, no % escapes.
ROUTE_PATH_PATTERN = r"^/$|^(/([-A-Za-z0-9_~!$&'()*+,;=:@]|\.[-A-Za-z0-9_~!$&'()*+,;=:@]|\.\.[-.A-Za-z0-9_~!$&'()*+,;=:@])[-.A-Za-z0-9_~!$&'()*+,;=:@]*)+/?$"
CIDR_PATTERN = r"^(((25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])\.){3}(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])/([0-9]|[12][0-9]|3[0-2])|[0-9a-fA-F:.]*:[0-9a-fA-F:.]*/([0-9]|[1-9][0-9]|1[01][0-9]|12[0-8]))$"
# checkpoint.source PVC: repo is pvc://<claim>[/<path>] (KServe's storageUri form). The claim is a
# DNS-1123 subdomain of at most 253 characters; no '.' or '..' segment in the path. The CRD's
# CEL rules use these very patterns (tests/operator/test_crd.py holds them together).
PVC_REPO_PATTERN = (
    r"^pvc://[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*(/[^/]+)*/?$"
)
# checkpoint.endpoint: an http(s) base URL, no credentials (they belong in secretName), query
# or fragment.
ENDPOINT_PATTERN = r"^https?://[^\s/?#@]+(/[^\s?#]*)?$"
# The sources an endpoint applies to, and the variable their clients read it from.
ENDPOINT_VARIABLES = {"HF": "HF_ENDPOINT", "S3": "AWS_ENDPOINT_URL"}
ENDPOINT_MESSAGE = (
    "endpoint is for sources HF (a hub mirror: HF_ENDPOINT) and S3 (an S3-compatible store such "
    "as MinIO: AWS_ENDPOINT_URL); the other sources' repo is the whole location"
)
PVC_CLAIM_LENGTH_PATTERN = r"^pvc://[-a-z0-9.]{1,253}(/|$)"
PVC_DOT_SEGMENT_PATTERN = r"/\.\.?(/|$)"
# Sources with no revisions (object stores, volumes): the version goes in the path.
UNVERSIONED_SOURCES: tuple[str, ...] = ("PVC", "S3", "GCS", "AZURE")

# Environment variables the operator sets on runtime pods; spec.runtime.env may not override them.
RESERVED_ENV = frozenset(
    {
        "RERANKER_ENGINE_DIR",
        "RERANKER_PORT",
        "RERANKER_SERVED_MODEL_NAME",
        "RERANKER_MAX_BATCH_TOKENS",
        "RERANKER_MAX_BATCH_REQUESTS",
        "RERANKER_MAX_CLIENT_BATCH_SIZE",
        "RERANKER_MAX_CONCURRENT_REQUESTS",
        "RERANKER_AUTO_TRUNCATE",
        "RERANKER_API_KEY",
        "RERANKER_LOG_FORMAT",
        "RERANKER_GRPC_PORT",
        # TEI's names for the same settings, which the runtime also reads (where the RERANKER_*
        # one is unset: API_KEY would turn auth on with a plain-text key, past apiKeySecret).
        "MODEL_ID",
        "PORT",
        "SERVED_MODEL_NAME",
        "MAX_BATCH_TOKENS",
        "MAX_BATCH_REQUESTS",
        "MAX_CLIENT_BATCH_SIZE",
        "MAX_CONCURRENT_REQUESTS",
        "AUTO_TRUNCATE",
        "API_KEY",
        "JSON_OUTPUT",
        "HF_HUB_OFFLINE",
        "HF_HOME",
        "HOME",
    }
)


class InvalidSpec(ValueError):
    """A Reranker spec the operator cannot act on; `field` is a dotted path such as `spec.build`."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class _Model(BaseModel):
    # camelCase in YAML, snake_case in Python; unknown fields are refused (a real API server
    # prunes them, so one reaching us is a typo worth naming).
    model_config = ConfigDict(extra="forbid", frozen=True)


class Checkpoint(_Model):
    repo: str = Field(min_length=1, max_length=512)
    revision: str = Field(default="main", min_length=1, max_length=256)
    source: Source = "HF"
    secret_name: str | None = Field(
        default=None, alias="secretName", max_length=253, pattern=SECRET_NAME_PATTERN
    )
    # A hub mirror (Artifactory, Nexus, a proxy of the hub) or an S3-compatible store (MinIO,
    # Ceph): where the build downloads from. Not an engine input: the same files.
    endpoint: str | None = Field(default=None, max_length=2048, pattern=ENDPOINT_PATTERN)

    @property
    def pvc_claim(self) -> str | None:
        """The claim of a PVC source (pvc://<claim>/<path>), which the build mounts read-only."""
        if self.source != "PVC":
            return None
        return self.repo.removeprefix("pvc://").split("/", 1)[0]


class Build(_Model):
    quantization: Quantization = "no_quant"
    max_num_tokens: int = Field(
        default=16384, alias="maxNumTokens", ge=64, le=131072, multiple_of=64
    )
    max_seq_len: int | None = Field(default=None, alias="maxSeqLen", ge=1, le=131072)


# An extended resource name (`vendor.domain/name`): a MIG slice, a shared (time-sliced) GPU.
RESOURCE_NAME_PATTERN = r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*)/[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"


class Accelerator(_Model):
    type: AcceleratorType = "L4"
    count: int = Field(default=1, ge=1, le=8)
    # The GPU resource the pods request instead of the operator config's (nvidia.com/gpu): a MIG
    # slice such as nvidia.com/mig-1g.10gb, or nvidia.com/gpu.shared for time-sliced GPUs.
    resource_name: str | None = Field(
        default=None, alias="resourceName", max_length=253, pattern=RESOURCE_NAME_PATTERN
    )

    @property
    def is_gpu(self) -> bool:
        return self.type != "CPU"


# Default memory request and limit of build and runtime pods. Fits the smallest L4 nodes with
# room for their daemonsets (GKE g2-standard-4: ~13 GiB allocatable; EKS g6.xlarge: ~14.5 GiB)
# and holds a reranker up to ~1B parameters (bge-reranker-large, 560M: ~4 GiB resident when
# serving, ~7 GiB peak while converting its checkpoint). Larger models: set resources.memory.
DEFAULT_MEMORY = "10Gi"


class BuildResources(_Model):
    """The build container's own resources (the Shared build Job's, the PerPod init container's):
    converting a checkpoint can take more memory, CPU or disk than serving it. An unset field
    takes spec.resources' value."""

    cpu: str | None = Field(default=None, pattern=QUANTITY_PATTERN)
    memory: str | None = Field(default=None, pattern=QUANTITY_PATTERN)
    cpu_limit: str | None = Field(default=None, alias="cpuLimit", pattern=QUANTITY_PATTERN)
    ephemeral_storage: str | None = Field(
        default=None, alias="ephemeralStorage", pattern=QUANTITY_PATTERN
    )


class Resources(_Model):
    cpu: str = Field(default="1", pattern=QUANTITY_PATTERN)
    memory: str = Field(default=DEFAULT_MEMORY, pattern=QUANTITY_PATTERN)
    # No CPU limit unless asked (throttling hurts tokenization latency); a namespace whose
    # ResourceQuota counts limits.cpu, or Guaranteed QoS (CPU pinning), needs one.
    cpu_limit: str | None = Field(default=None, alias="cpuLimit", pattern=QUANTITY_PATTERN)
    ephemeral_storage: str | None = Field(
        default=None, alias="ephemeralStorage", pattern=QUANTITY_PATTERN
    )
    build: BuildResources = BuildResources()

    def for_build(self) -> Resources:
        """The build container's resources: `build`'s fields over the serving ones."""
        own = self.build.model_dump(exclude_none=True)
        return self.model_copy(update={**own, "build": BuildResources()})


class Autoscaling(_Model):
    min_replicas: int = Field(default=1, alias="minReplicas", ge=1, le=1000)
    max_replicas: int = Field(alias="maxReplicas", ge=1, le=1000)
    metric: AutoscalingMetric = "Concurrency"
    target_concurrency: int = Field(default=16, alias="targetConcurrency", ge=1, le=100000)
    target_cpu_utilization: int = Field(default=70, alias="targetCPUUtilization", ge=1, le=100)
    # An autoscaling/v2 HorizontalPodAutoscalerBehavior, passed through: its scaleUp / scaleDown
    # replace the operator's own (a gentle scale-down) direction by direction.
    behavior: dict[str, Any] = Field(default_factory=dict)


class Rollout(_Model):
    """How the Deployment replaces pods: by default one extra pod first (no capacity lost), which
    needs a spare GPU; `maxSurge: 0, maxUnavailable: 1` replaces in place on a full pool."""

    # A count, or a percentage of the replicas ("25%"), as a Deployment's own fields.
    max_surge: int | str = Field(default=1, alias="maxSurge")
    max_unavailable: int | str = Field(default=0, alias="maxUnavailable")

    @field_validator("max_surge", "max_unavailable", mode="before")
    @classmethod
    def _count_or_percent(cls, value: Any, info: ValidationInfo) -> int | str:
        surge = info.field_name == "max_surge"
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 1000:
            return value
        pattern = ROLLOUT_PERCENT_PATTERN if surge else UNAVAILABLE_PERCENT_PATTERN
        if isinstance(value, str) and re.fullmatch(pattern, value):
            return value
        limit = "" if surge else " of at most 100%"
        raise ValueError(f"must be a count from 0 to 1000 or a percentage{limit} such as 25%")

    @property
    def surges(self) -> bool:
        """New pods start before old ones go (maxSurge > 0)."""
        return not _is_zero(self.max_surge)


def _is_zero(value: int | str) -> bool:
    return int(value[:-1]) == 0 if isinstance(value, str) else value == 0


class SecretKeyRef(_Model):
    name: str = Field(max_length=253, pattern=SECRET_NAME_PATTERN)
    key: str = Field(default="api-key", min_length=1, max_length=253)


class ProbeOverride(_Model):
    initial_delay_seconds: int | None = Field(
        default=None, alias="initialDelaySeconds", ge=0, le=86400
    )
    period_seconds: int | None = Field(default=None, alias="periodSeconds", ge=1, le=86400)
    timeout_seconds: int | None = Field(default=None, alias="timeoutSeconds", ge=1, le=86400)
    failure_threshold: int | None = Field(default=None, alias="failureThreshold", ge=1, le=100000)


class Probes(_Model):
    startup: ProbeOverride = ProbeOverride()
    readiness: ProbeOverride = ProbeOverride()
    liveness: ProbeOverride = ProbeOverride()


class KeyRef(_Model):
    """A key of a Secret or ConfigMap in the Reranker's namespace (Kubernetes' *KeySelector)."""

    name: str = Field(max_length=253, pattern=SECRET_NAME_PATTERN)
    key: str = Field(min_length=1, max_length=253, pattern=CONFIG_KEY_PATTERN)
    optional: bool | None = None


class FieldRef(_Model):
    """A field of the runtime pod (the downward API)."""

    field_path: str = Field(
        alias="fieldPath", max_length=ENV_FIELD_PATH_MAX, pattern=ENV_FIELD_PATH_PATTERN
    )
    api_version: Literal["v1"] | None = Field(default=None, alias="apiVersion")


class ResourceFieldRef(_Model):
    """A resource request or limit of the runtime container."""

    resource: str = Field(max_length=64, pattern=ENV_RESOURCE_PATTERN)
    divisor: int | str | None = None

    @field_validator("divisor", mode="before")
    @classmethod
    def _divisor(cls, value: Any, info: ValidationInfo) -> Any:
        """The API server's rule (as a CEL rule in the CRD): cpu in 1 or 1m, the others in
        powers of 1000 or 1024."""
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise ValueError(f"divisor must be an integer or a string such as 1Mi, got {value!r}")
        resource = info.data.get("resource")
        if resource is None:  # refused itself, and named first
            return value
        allowed = CPU_DIVISORS if resource.endswith(".cpu") else QUANTITY_DIVISORS
        if str(value) not in allowed:
            raise ValueError(
                f"the divisor of {resource} must be one of {', '.join(allowed)}, got {value!r}"
            )
        return value


class EnvVarSource(_Model):
    """Kubernetes' EnvVarSource; exactly one field is set (checked in _check_rules and by CEL)."""

    secret_key_ref: KeyRef | None = Field(default=None, alias="secretKeyRef")
    config_map_key_ref: KeyRef | None = Field(default=None, alias="configMapKeyRef")
    field_ref: FieldRef | None = Field(default=None, alias="fieldRef")
    resource_field_ref: ResourceFieldRef | None = Field(default=None, alias="resourceFieldRef")


class EnvVar(_Model):
    name: str = Field(pattern=ENV_NAME_PATTERN, max_length=256)
    value: str | None = Field(default=None, max_length=32768)
    value_from: EnvVarSource | None = Field(default=None, alias="valueFrom")


# A volume's name, as the API server wants it (a DNS-1123 label).
VOLUME_NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
# An absolute path without `.` or `..` segments or a trailing slash (the root itself excepted).
MOUNT_PATH_PATTERN = r"^/$|^(/([^/.][^/]*|\.[^/.][^/]*|\.\.[^/]+))+$"
# The operator's own volumes and where the server mounts them (builders.py): spec.runtime's may
# not take their names or mount over, under or above their paths.
OPERATOR_VOLUMES = frozenset({"tmp", "engine", "engine-cache", "checkpoint", "ca-bundle"})
OPERATOR_MOUNTS = ("/engines", "/tmp", "/checkpoint", "/etc/reranker/ca")
# The volume sources the Pod Security Standard "restricted" allows (the operator's pods meet it):
# no hostPath, so a Reranker cannot mount its node. A projected volume's sources, likewise,
# without serviceAccountToken (the pods mount no service-account token on purpose).
VOLUME_SOURCES = frozenset(
    {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
     "projected", "secret"}
)  # fmt: skip
PROJECTED_SOURCES = frozenset({"configMap", "downwardAPI", "secret", "clusterTrustBundle"})


class VolumeMount(_Model):
    name: str = Field(max_length=63, pattern=VOLUME_NAME_PATTERN)
    mount_path: str = Field(alias="mountPath", max_length=4096, pattern=MOUNT_PATH_PATTERN)
    read_only: bool = Field(default=False, alias="readOnly")
    sub_path: str | None = Field(default=None, alias="subPath", max_length=4096)


class Runtime(_Model):
    # No surrounding whitespace: the API server takes the Deployment, then refuses every pod.
    image: str | None = Field(default=None, min_length=1, max_length=512, pattern=r"^\S(.*\S)?$")
    # None: build.maxNumTokens on GPU, the runtime's `auto` budget on CPU (RerankerSpec).
    max_batch_tokens: int | None = Field(default=None, alias="maxBatchTokens", ge=1, le=_LIMIT_MAX)
    max_batch_requests: int | None = Field(
        default=None, alias="maxBatchRequests", ge=1, le=_LIMIT_MAX
    )
    max_client_batch_size: int | None = Field(
        default=None, alias="maxClientBatchSize", ge=1, le=_LIMIT_MAX
    )
    max_concurrent_requests: int | None = Field(
        default=None, alias="maxConcurrentRequests", ge=1, le=_LIMIT_MAX
    )
    auto_truncate: bool = Field(default=True, alias="autoTruncate")
    # TEI's gRPC API on GRPC_PORT as well (builders.py), in the pods and on the Service.
    grpc: bool = False
    api_key_secret: SecretKeyRef | None = Field(default=None, alias="apiKeySecret")
    # The model name in /info, Cohere/Jina/vLLM responses (TEI's --served-model-name); None:
    # checkpoint.repo.
    served_model_name: str | None = Field(
        default=None, alias="servedModelName", min_length=1, max_length=256
    )
    probes: Probes = Probes()
    env: tuple[EnvVar, ...] = Field(default=(), max_length=64)
    # Kubernetes Volume objects for the runtime pods (passed through: the API server checks
    # their sources when the Deployment is applied), mounted in the server by volumeMounts.
    volumes: tuple[dict[str, Any], ...] = Field(default=(), max_length=32)
    volume_mounts: tuple[VolumeMount, ...] = Field(default=(), alias="volumeMounts", max_length=32)


class Toleration(_Model):
    key: str | None = Field(default=None, max_length=316)
    operator: Literal["Exists", "Equal"] | None = None
    value: str | None = Field(default=None, max_length=63)
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = Field(default=None, alias="tolerationSeconds")


# Label and annotation keys the operator sets on pods: spec.pod may not override them.
OPERATOR_LABEL_PREFIXES = ("app.kubernetes.io/", f"{API_GROUP}/")
AFFINITY_KINDS = frozenset({"nodeAffinity", "podAffinity", "podAntiAffinity"})
LabelValue = Annotated[str, StringConstraints(max_length=63)]


class PodSettings(_Model):
    """Per-Reranker pod settings, applied to runtime pods and build pods alike."""

    node_selector: dict[str, str] = Field(default_factory=dict, alias="nodeSelector")
    tolerations: tuple[Toleration, ...] = Field(default=(), max_length=32)
    # Kubernetes' own Affinity / TopologySpreadConstraint objects, passed through (the API server
    # validates them when the operator applies the pods' owners).
    affinity: dict[str, Any] = Field(default_factory=dict)
    topology_spread_constraints: tuple[dict[str, Any], ...] = Field(
        default=(), alias="topologySpreadConstraints", max_length=16
    )
    priority_class_name: str | None = Field(
        default=None, alias="priorityClassName", max_length=253, pattern=SECRET_NAME_PATTERN
    )
    service_account_name: str | None = Field(
        default=None, alias="serviceAccountName", max_length=253, pattern=SECRET_NAME_PATTERN
    )
    # None: the accelerator's (operator config), else the cluster's default container runtime.
    runtime_class_name: str | None = Field(
        default=None, alias="runtimeClassName", max_length=253, pattern=SECRET_NAME_PATTERN
    )
    annotations: dict[str, str] = Field(default_factory=dict)
    labels: dict[str, LabelValue] = Field(default_factory=dict)
    # Added to the operator config's imagePullSecrets (per-namespace registry credentials).
    image_pull_secrets: tuple[
        Annotated[str, StringConstraints(max_length=253, pattern=SECRET_NAME_PATTERN)], ...
    ] = Field(default=(), alias="imagePullSecrets", max_length=16)
    # Another scheduler (Volcano, Run:ai, ...); unset: the cluster's default scheduler.
    scheduler_name: str | None = Field(
        default=None, alias="schedulerName", max_length=253, pattern=SECRET_NAME_PATTERN
    )


class ServiceSettings(_Model):
    """The Service `<name>` (port 8080, and 50051 with gRPC): its type and metadata."""

    type: ServiceType = "ClusterIP"
    annotations: dict[str, str] = Field(default_factory=dict)
    labels: dict[str, LabelValue] = Field(default_factory=dict)
    load_balancer_source_ranges: tuple[
        Annotated[str, StringConstraints(max_length=43, pattern=CIDR_PATTERN)], ...
    ] = Field(default=(), alias="loadBalancerSourceRanges", max_length=64)


class IngressSettings(_Model):
    """An Ingress `<name>` routing host + path to the Service's http port (8080)."""

    host: str = Field(max_length=253, pattern=HOST_PATTERN)
    path: str = Field(default="/", max_length=1024, pattern=INGRESS_PATH_PATTERN)
    class_name: str | None = Field(
        default=None, alias="className", max_length=253, pattern=SECRET_NAME_PATTERN
    )
    tls_secret_name: str | None = Field(
        default=None, alias="tlsSecretName", max_length=253, pattern=SECRET_NAME_PATTERN
    )
    annotations: dict[str, str] = Field(default_factory=dict)

    @property
    def url(self) -> str | None:
        """What a client outside the cluster calls (None for a wildcard host: no one name)."""
        if self.host.startswith("*."):
            return None
        scheme = "https" if self.tls_secret_name else "http"
        return f"{scheme}://{self.host}{self.path.rstrip('/')}"  # `${url}/rerank` works


class ParentRef(_Model):
    """A Gateway (or a listener of one, `sectionName`) the HTTPRoute attaches to."""

    name: str = Field(min_length=1, max_length=253)
    namespace: str | None = Field(default=None, max_length=63, pattern=NAME_LABEL_PATTERN)
    section_name: str | None = Field(
        default=None, alias="sectionName", max_length=253, pattern=SECRET_NAME_PATTERN
    )


class HTTPRouteSettings(_Model):
    """A Gateway API HTTPRoute `<name>` sending host(s) + path prefix to the Service's port 8080."""

    parent_refs: tuple[ParentRef, ...] = Field(alias="parentRefs", min_length=1, max_length=32)
    hostnames: tuple[
        Annotated[str, StringConstraints(max_length=253, pattern=HOST_PATTERN)], ...
    ] = Field(default=(), max_length=16)
    path: str = Field(default="/", max_length=1024, pattern=ROUTE_PATH_PATTERN)
    annotations: dict[str, str] = Field(default_factory=dict)


class EngineCache(_Model):
    # None: the operator config's default (see config.EngineCacheDefaults).
    mode: CacheMode | None = None
    storage_class_name: str | None = Field(
        default=None,
        alias="storageClassName",
        max_length=253,
        pattern=SECRET_NAME_PATTERN,  # a DNS subdomain
    )
    size: str | None = Field(default=None, pattern=QUANTITY_PATTERN)
    access_mode: AccessMode | None = Field(default=None, alias="accessMode")
    retention: Retention | None = None


class RerankerSpec(_Model):
    checkpoint: Checkpoint
    build: Build = Build()
    accelerator: Accelerator = Accelerator()
    resources: Resources = Resources()
    # No schema default: "replicas or autoscaling" is checked on what the user wrote.
    replicas: int | None = Field(default=None, ge=0, le=1000)
    autoscaling: Autoscaling | None = None
    runtime: Runtime = Runtime()
    engine_cache: EngineCache = Field(default=EngineCache(), alias="engineCache")
    pod: PodSettings = PodSettings()
    service: ServiceSettings = ServiceSettings()
    ingress: IngressSettings | None = None
    http_route: HTTPRouteSettings | None = Field(default=None, alias="httpRoute")
    rollout: Rollout = Rollout()
    # Labels of every object the operator creates for the Reranker, pods included: cost
    # attribution, policies that require a label. pod.labels and service.labels win over them.
    labels: dict[str, LabelValue] = Field(default_factory=dict)

    @property
    def desired_replicas(self) -> int:
        """Replicas when not autoscaling (default 1); with autoscaling, the HPA's minimum."""
        if self.autoscaling is not None:
            return self.autoscaling.min_replicas
        return 1 if self.replicas is None else self.replicas

    @property
    def max_batch_tokens(self) -> int | Literal["auto"]:
        """The serving token budget (RERANKER_MAX_BATCH_TOKENS): runtime.maxBatchTokens when set;
        else on GPU the engine's maxNumTokens (what its TensorRT profile was built for), and on
        CPU the runtime's `auto` (2048 tokens in flight, shared among its CPU forward workers; the
        model's max input length if larger): a CPU engine
        has no token profile (maxNumTokens only caps its input length there), and passes of
        16384 tokens are slower and far less fair on CPU (docs/benchmarks.md)."""
        if self.runtime.max_batch_tokens is not None:
            return self.runtime.max_batch_tokens
        return self.build.max_num_tokens if self.accelerator.is_gpu else "auto"


_QUANTITY_SUFFIXES = {
    **{s: Decimal(1024) ** (i + 1) for i, s in enumerate(("Ki", "Mi", "Gi", "Ti", "Pi", "Ei"))},
    **{s: Decimal(1000) ** (i + 1) for i, s in enumerate(("k", "M", "G", "T", "P", "E"))},
    "n": Decimal("1e-9"), "u": Decimal("1e-6"), "m": Decimal("1e-3"), "": Decimal(1),
}  # fmt: skip


def quantity_value(quantity: str) -> Decimal:
    """A Kubernetes quantity (`500m`, `2`, `1.5Gi`, `1e3`) as a number, so two can be compared
    however they are written. ValueError for what Kubernetes' parser (apimachinery's
    resource.ParseQuantity) refuses although QUANTITY_PATTERN lets it through: a fractional
    exponent (`1e1.5`), or one beyond int32 (which apimachinery wraps: `1e4294967295` reads 0.1)."""
    match = re.fullmatch(r"([+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))(.*)", quantity)
    if match is None:
        raise ValueError(f"not a quantity: {quantity!r}")
    number, suffix = Decimal(match.group(1)), match.group(2)
    if suffix in _QUANTITY_SUFFIXES:  # before the exponent: `E` and `Ei` are suffixes
        return number * _QUANTITY_SUFFIXES[suffix]
    exponent = re.fullmatch(r"[eE]([+-]?[0-9]+)", suffix)
    if exponent is None or abs(int(exponent.group(1))) >= 2**31:  # apimachinery: int32
        raise ValueError(f"not a quantity Kubernetes accepts: {quantity!r}")
    # A context wide enough for any such exponent (Decimal's default stops at 10**999999).
    with localcontext(Context(Emax=MAX_EMAX, Emin=MIN_EMIN)):
        return number.scaleb(int(exponent.group(1)))


def _quantity(value: Any) -> Any:
    # The CRD accepts int-or-string quantities (`cpu: 1`); the model keeps strings.
    return str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


def _normalise(spec: dict[str, Any]) -> dict[str, Any]:
    spec = dict(spec)
    resources = spec.get("resources")
    if isinstance(resources, dict):
        spec["resources"] = {k: _quantity(v) for k, v in resources.items()}
        if isinstance(resources.get("build"), dict):
            spec["resources"]["build"] = {k: _quantity(v) for k, v in resources["build"].items()}
    cache = spec.get("engineCache")
    if isinstance(cache, dict) and "size" in cache:
        spec["engineCache"] = {**cache, "size": _quantity(cache["size"])}
    return spec


def _field_path(loc: tuple[Any, ...]) -> str:
    parts = ["spec"]
    for item in loc:
        if isinstance(item, int):
            parts[-1] += f"[{item}]"
        else:
            parts.append(str(item))
    return ".".join(parts)


def _re2_search(pattern: str, value: str) -> bool:
    """`pattern` searched as CEL's RE2 does: `$` only at the very end (Python's `$` also matches
    before a final newline). Our patterns use `$` only as an anchor."""
    return re.search(pattern.replace("$", r"\Z"), value) is not None


def _check_checkpoint(ckpt: Checkpoint) -> None:
    if ckpt.source == "PVC" and not (
        _re2_search(PVC_REPO_PATTERN, ckpt.repo)
        and _re2_search(PVC_CLAIM_LENGTH_PATTERN, ckpt.repo)
        and not _re2_search(PVC_DOT_SEGMENT_PATTERN, ckpt.repo)
    ):
        raise InvalidSpec(
            "spec.checkpoint.repo",
            "with source PVC, repo must be pvc://<claim name>/<path in the claim> (a "
            "PersistentVolumeClaim in the Reranker's namespace), without '.' or '..' in the path",
        )
    if ckpt.source != "PVC" and ckpt.repo.startswith("pvc://"):
        raise InvalidSpec("spec.checkpoint.source", "a pvc:// repo needs source PVC")
    if ckpt.endpoint is not None and ckpt.source not in ENDPOINT_VARIABLES:
        raise InvalidSpec("spec.checkpoint.endpoint", ENDPOINT_MESSAGE)
    if (
        ckpt.source == "REMOTE_URL"
        and re.match(r"[hH][tT][tT][pP]://", ckpt.repo)
        and not re.fullmatch(r"sha256:[0-9a-fA-F]{64}", ckpt.revision)
    ):
        raise InvalidSpec(
            "spec.checkpoint.revision",
            "a REMOTE_URL archive over plain http can be altered on its way: serve it over "
            "https, or pin it with revision sha256:<64 hex> of the archive",
        )
    if ckpt.source in UNVERSIONED_SOURCES and ckpt.revision != "main":
        raise InvalidSpec(
            "spec.checkpoint.revision",
            "object stores and volumes (sources S3, GCS, AZURE, PVC) have no revisions: put the "
            "version in the path and leave revision at main",
        )


def _check_rules(spec: RerankerSpec) -> None:
    """The CRD's CEL rules (x-kubernetes-validations), checked again in code. Keep in sync."""
    _check_checkpoint(spec.checkpoint)
    q, accel = spec.build.quantization, spec.accelerator.type
    if q == "fp4":
        raise InvalidSpec(
            "spec.build.quantization",
            "fp4 needs a Blackwell-class GPU (B200/GB200), and no offered accelerator.type is one; "
            "use no_quant or fp8",
        )
    if q == "fp8" and accel not in FP8_ACCELERATORS:
        raise InvalidSpec(
            "spec.build.quantization",
            f"fp8 needs an Ada or Hopper GPU (accelerator.type L4, H100 or H200); {accel} has no FP8",
        )
    if accel == "CPU" and q != "no_quant":
        raise InvalidSpec(
            "spec.build.quantization", "quantization is GPU-only; use no_quant on CPU"
        )
    if spec.accelerator.resource_name is not None and accel == "CPU":
        raise InvalidSpec(
            "spec.accelerator.resourceName", "resourceName is for GPUs; CPU pods request none"
        )
    if spec.accelerator.count != 1:
        raise InvalidSpec(
            "spec.accelerator.count",
            "count must be 1: an engine runs on one GPU (multi-GPU engines are not supported "
            "yet, extra GPUs would sit idle); scale out with replicas, or on CPU set "
            "resources.cpu for more cores",
        )
    if spec.build.max_seq_len is not None and spec.build.max_seq_len > spec.build.max_num_tokens:
        raise InvalidSpec(
            "spec.build.maxSeqLen",
            "maxSeqLen must not exceed maxNumTokens (one sequence must fit in a batch)",
        )
    if spec.replicas is not None and spec.autoscaling is not None:
        raise InvalidSpec("spec", "set either replicas or autoscaling, not both")
    if (
        spec.autoscaling is not None
        and spec.autoscaling.min_replicas > spec.autoscaling.max_replicas
    ):
        raise InvalidSpec("spec.autoscaling.minReplicas", "minReplicas must not exceed maxReplicas")
    if (
        spec.runtime.max_batch_tokens is not None
        and spec.build.max_seq_len is not None
        and spec.runtime.max_batch_tokens < spec.build.max_seq_len
    ):
        raise InvalidSpec(
            "spec.runtime.maxBatchTokens",
            "maxBatchTokens must be at least build.maxSeqLen (one sequence must fit in a batch)",
        )
    _check_resources(spec.resources)
    _check_quantity("spec.engineCache.size", spec.engine_cache.size, "write it as 20Gi", True)
    pod = spec.pod
    for k in pod.annotations:
        if k.startswith(OPERATOR_LABEL_PREFIXES) or k.startswith("prometheus.io/"):
            raise InvalidSpec("spec.pod.annotations", f"{k} is set by the operator")
    for field, labels, on_pods in (
        ("spec.labels", spec.labels, True),
        ("spec.pod.labels", pod.labels, True),
        ("spec.service.labels", spec.service.labels, False),
    ):
        _check_labels(field, labels, on_pods=on_pods)
    _check_scaling(spec)
    _check_exposure(spec)
    for k in pod.affinity:
        if k not in AFFINITY_KINDS:
            raise InvalidSpec(
                "spec.pod.affinity",
                f"unknown field {k} (nodeAffinity, podAffinity, podAntiAffinity)",
            )
    _check_node_affinity(pod.affinity)
    _check_placement(pod)
    # Not in the CRD (lists of objects make poor CEL): no duplicate or operator-owned env names.
    names = [e.name for e in spec.runtime.env]
    for i, name in enumerate(names):
        if name in RESERVED_ENV:
            raise InvalidSpec(
                f"spec.runtime.env[{i}].name", f"{name} is set by the operator from the spec"
            )
        if name in names[:i]:
            raise InvalidSpec(f"spec.runtime.env[{i}].name", f"duplicate variable {name}")
        _check_env_source(spec.runtime.env[i], f"spec.runtime.env[{i}]")
    _check_volumes(spec.runtime)


def _check_node_affinity(affinity: dict[str, Any]) -> None:
    """The shape of the nodeAffinity the operator merges its accelerator's terms into (the CRD
    passes affinity through unchecked): objects and lists where Kubernetes has them, or the
    merge itself would fail. Its content is the API server's to judge."""
    field = "spec.pod.affinity.nodeAffinity"
    node = affinity.get("nodeAffinity", {})
    if not isinstance(node, dict):
        raise InvalidSpec(field, "must be an object")
    required = node.get("requiredDuringSchedulingIgnoredDuringExecution") or {}
    field += ".requiredDuringSchedulingIgnoredDuringExecution"
    if not isinstance(required, dict):
        raise InvalidSpec(field, "must be an object with nodeSelectorTerms")
    terms = required.get("nodeSelectorTerms") or []
    if not isinstance(terms, list):
        raise InvalidSpec(f"{field}.nodeSelectorTerms", "must be a list of terms")
    for i, term in enumerate(terms):
        if not isinstance(term, dict):
            raise InvalidSpec(f"{field}.nodeSelectorTerms[{i}]", "must be an object")
        for key in ("matchExpressions", "matchFields"):
            if not isinstance(term.get(key) or [], list):
                raise InvalidSpec(f"{field}.nodeSelectorTerms[{i}].{key}", "must be a list")


def _check_volumes(runtime: Runtime) -> None:
    """spec.runtime.volumes / volumeMounts: names the API server takes, none of the operator's
    names or paths (not in CEL: lists of objects make poor CEL)."""
    names: list[str] = []
    for i, volume in enumerate(runtime.volumes):
        field = f"spec.runtime.volumes[{i}]"
        name = volume.get("name")
        if not isinstance(name, str) or not re.fullmatch(VOLUME_NAME_PATTERN, name):
            raise InvalidSpec(f"{field}.name", "a volume needs a name: a DNS-1123 label")
        if name in OPERATOR_VOLUMES:
            raise InvalidSpec(f"{field}.name", f"{name} is a volume of the operator's; rename it")
        if name in names:
            raise InvalidSpec(f"{field}.name", f"duplicate volume {name}")
        _check_volume_source(volume, field)
        names.append(name)
    paths: list[str] = []
    for i, mount in enumerate(runtime.volume_mounts):
        field = f"spec.runtime.volumeMounts[{i}]"
        if mount.name not in names:
            raise InvalidSpec(
                f"{field}.name", f"no volume named {mount.name} in spec.runtime.volumes"
            )
        path = mount.mount_path
        for ours in OPERATOR_MOUNTS:
            if _nested(path, ours):
                raise InvalidSpec(
                    f"{field}.mountPath",
                    f"{path} overlaps the operator's mount {ours}: choose another path",
                )
        if path in paths:
            raise InvalidSpec(f"{field}.mountPath", f"{path} is mounted twice")
        paths.append(path)
        sub = mount.sub_path
        if sub is not None and (sub.startswith("/") or ".." in sub.split("/")):
            raise InvalidSpec(
                f"{field}.subPath", f"{sub} must be a relative path without '..' segments"
            )


def _check_volume_source(volume: dict[str, Any], field: str) -> None:
    """Exactly one source, of the kinds the restricted Pod Security Standard allows."""
    sources = [k for k in volume if k != "name"]
    allowed = ", ".join(sorted(VOLUME_SOURCES))
    if len(sources) != 1:
        raise InvalidSpec(
            field,
            f"volume {volume['name']} needs exactly one source ({allowed}); got {len(sources)}",
        )
    [source] = sources
    if source not in VOLUME_SOURCES:
        raise InvalidSpec(
            f"{field}.{source}",
            f"{source} volumes are not allowed (the pods meet the restricted Pod Security "
            f"Standard): use one of {allowed}",
        )
    if source == "projected":
        projected = volume["projected"] if isinstance(volume["projected"], dict) else {}
        if not isinstance(projected.get("sources") or [], list):
            raise InvalidSpec(f"{field}.projected.sources", "must be a list of sources")
        for j, item in enumerate(projected.get("sources") or []):
            for kind in item if isinstance(item, dict) else ():
                if kind not in PROJECTED_SOURCES:
                    raise InvalidSpec(
                        f"{field}.projected.sources[{j}].{kind}",
                        f"{kind} is not allowed in a projected volume here (the pods mount no "
                        "service-account token): use configMap, secret or downwardAPI",
                    )


def _nested(a: str, b: str) -> bool:
    """Paths equal, or one inside the other."""
    a, b = a.rstrip("/") + "/", b.rstrip("/") + "/"
    return a.startswith(b) or b.startswith(a)


def _check_env_source(var: EnvVar, field: str) -> None:
    """value or valueFrom, and one source in valueFrom (CEL rules in the CRD say the same)."""
    if var.value_from is None:
        return
    if var.value is not None:
        raise InvalidSpec(f"{field}.valueFrom", "set value or valueFrom, not both")
    sources = var.value_from.model_dump(exclude_none=True, by_alias=True)
    if len(sources) != 1:
        raise InvalidSpec(
            f"{field}.valueFrom",
            "set exactly one of secretKeyRef, configMapKeyRef, fieldRef, resourceFieldRef",
        )


_QUANTITY_FIELDS = (
    ("cpu", "cpu"),
    ("cpuLimit", "cpu_limit"),
    ("memory", "memory"),
    ("ephemeralStorage", "ephemeral_storage"),
)


def _check_resources(resources: Resources) -> None:
    """Quantities as Kubernetes parses them, and CPU limits not below the requests, of serving
    and build containers. Not in CEL (int-or-string quantities): the API server would refuse
    every pod instead."""
    for prefix, values in (("resources", resources), ("resources.build", resources.build)):
        for alias, field in _QUANTITY_FIELDS:
            value = getattr(values, field)
            _check_quantity(f"spec.{prefix}.{alias}", value, "write it as 2, 500m or 1.5")
    if resources.cpu_limit is not None and _below(resources.cpu_limit, resources.cpu):
        raise InvalidSpec(
            "spec.resources.cpuLimit",
            f"cpuLimit {resources.cpu_limit} is less than the CPU request (resources.cpu "
            f"{resources.cpu}): raise it, or lower cpu",
        )
    own, build = resources.build, resources.for_build()
    if build.cpu_limit is None or not _below(build.cpu_limit, build.cpu):
        return
    if own.cpu_limit is not None:
        cpu_from = "resources.build.cpu" if own.cpu is not None else "resources.cpu"
        raise InvalidSpec(
            "spec.resources.build.cpuLimit",
            f"cpuLimit {own.cpu_limit} is less than the build's CPU request ({cpu_from} "
            f"{build.cpu}): raise it, or lower the request",
        )
    raise InvalidSpec(
        "spec.resources.build.cpu",
        f"the build's CPU request {build.cpu} is above the CPU limit it takes from "
        f"resources.cpuLimit ({build.cpu_limit}): set resources.build.cpuLimit too",
    )


def _check_quantity(field: str, value: str | None, example: str, positive: bool = False) -> None:
    """A quantity the API server takes: one it can parse, never negative (nor 0 where a size
    must be greater)."""
    if value is None:
        return
    try:
        number = quantity_value(value)
    except ValueError as exc:
        raise InvalidSpec(field, f"{exc}: {example}") from None
    if number < 0 or (positive and number == 0):
        raise InvalidSpec(
            field, f"must be {'greater than 0' if positive else 'at least 0'}, got {value}"
        )


def _below(limit: str, request: str) -> bool:
    return quantity_value(limit) < quantity_value(request)


def _check_scaling(spec: RerankerSpec) -> None:
    """Rollout, autoscaling and GPU-resource checks the schema cannot make (int-or-string,
    passed-through objects, reserved domains): refused here before anything is applied."""
    if _is_zero(spec.rollout.max_surge) and _is_zero(spec.rollout.max_unavailable):
        raise InvalidSpec(
            "spec.rollout.maxUnavailable",
            "maxSurge and maxUnavailable may not both be 0 (no pod could ever be replaced); "
            "on a pool without a spare GPU use maxSurge 0 and maxUnavailable 1",
        )
    if spec.autoscaling is not None:
        unknown = set(spec.autoscaling.behavior) - {"scaleUp", "scaleDown"}
        if unknown:
            raise InvalidSpec(
                "spec.autoscaling.behavior",
                f"unknown field {sorted(unknown)[0]} (scaleUp, scaleDown)",
            )
    resource = spec.accelerator.resource_name
    if resource is not None and resource.split("/")[0].endswith(("kubernetes.io", "k8s.io")):
        raise InvalidSpec(
            "spec.accelerator.resourceName",
            f"{resource} is not an extended resource (kubernetes.io and k8s.io are Kubernetes' own)",
        )


def _check_exposure(spec: RerankerSpec) -> None:
    """The Service, Ingress and HTTPRoute settings: what the API server would refuse on them."""
    for i, cidr in enumerate(spec.service.load_balancer_source_ranges):
        try:
            ipaddress.ip_network(cidr, strict=False)
        except ValueError:
            raise InvalidSpec(
                f"spec.service.loadBalancerSourceRanges[{i}]", f"{cidr} is not an IP network"
            ) from None
    if spec.service.load_balancer_source_ranges and spec.service.type != "LoadBalancer":
        raise InvalidSpec(
            "spec.service.loadBalancerSourceRanges",
            "loadBalancerSourceRanges needs type LoadBalancer",
        )
    if spec.http_route is not None:
        _check_parent_refs(spec.http_route.parent_refs)
    user_metadata = (
        ("spec.service.annotations", spec.service.annotations),
        ("spec.ingress.annotations", spec.ingress.annotations if spec.ingress else {}),
        ("spec.httpRoute.annotations", spec.http_route.annotations if spec.http_route else {}),
    )
    for field, keys in user_metadata:
        for k in keys:
            if k.startswith(OPERATOR_LABEL_PREFIXES):
                raise InvalidSpec(field, f"{k} is set by the operator")


# Pod labels the Job and Deployment controllers set: the API server refuses a Job whose pod
# template gives job-name or controller-uid another value, and pod-template-hash is the
# Deployment controller's.
CONTROLLER_POD_LABELS = ("job-name", "controller-uid", "pod-template-hash")
CONTROLLER_POD_LABEL_PREFIX = "batch.kubernetes.io/"


def _check_labels(field: str, labels: dict[str, str], *, on_pods: bool) -> None:
    """Label keys and values as the API server checks them (it would refuse the child, after
    its siblings were applied), and none of the operator's own keys (nor, on pods, the Job
    and Deployment controllers')."""
    for key, value in labels.items():
        if key.startswith(OPERATOR_LABEL_PREFIXES):
            raise InvalidSpec(field, f"{key} is set by the operator")
        if on_pods and (
            key in CONTROLLER_POD_LABELS or key.startswith(CONTROLLER_POD_LABEL_PREFIX)
        ):
            raise InvalidSpec(
                field, f"{key} is set on pods by Kubernetes' Job or Deployment controller"
            )
        _check_label(field, key, value)


def _check_label(field: str, key: str, value: str | None) -> None:
    """A label key (and value) as the API server checks them."""
    if not re.fullmatch(_QUALIFIED_NAME, key) or len(key.partition("/")[0]) > 253:
        raise InvalidSpec(
            field,
            f"{key!r} is not a label key: an optional DNS-subdomain prefix and '/', then a "
            "name of at most 63 letters, digits, '-', '_' or '.' that starts and ends with a "
            "letter or digit",
        )
    if value is not None and not re.fullmatch(LABEL_VALUE_PATTERN, value):
        raise InvalidSpec(
            field,
            f"{value!r} (label {key}) is not a label value: empty, or at most 63 letters, "
            "digits, '-', '_' or '.' that starts and ends with a letter or digit",
        )


def _check_placement(pod: PodSettings) -> None:
    """nodeSelector and tolerations as the API server checks them (its refusal would come
    after the Deployment's siblings were applied, naming no field of the Reranker)."""
    for key, value in pod.node_selector.items():
        _check_label("spec.pod.nodeSelector", key, value)
    for i, t in enumerate(pod.tolerations):
        field = f"spec.pod.tolerations[{i}]"
        if t.key:
            _check_label(f"{field}.key", t.key, None)
        elif t.operator != "Exists":
            raise InvalidSpec(f"{field}.operator", "must be Exists when key is empty")
        if t.operator == "Exists" and t.value:
            raise InvalidSpec(f"{field}.value", "must be empty when operator is Exists")
        if t.value:
            _check_label(f"{field}.value", t.key or "x", t.value)
        if t.toleration_seconds is not None and t.effect != "NoExecute":
            raise InvalidSpec(f"{field}.tolerationSeconds", "is for effect NoExecute only")


def _check_parent_refs(refs: tuple[ParentRef, ...]) -> None:
    """Gateway API's own rule: two refs to one Gateway need distinct sectionNames."""
    seen: dict[tuple[str, str], list[str | None]] = {}
    for i, ref in enumerate(refs):
        sections = seen.setdefault((ref.namespace or "", ref.name), [])
        if sections and (
            ref.section_name is None or None in sections or ref.section_name in sections
        ):
            raise InvalidSpec(
                f"spec.httpRoute.parentRefs[{i}]",
                f"Gateway {ref.name} is listed twice: give each ref its own sectionName",
            )
        sections.append(ref.section_name)


def check_name(name: str) -> None:
    """The Reranker's name names its Service and labels: a DNS-1035 label, at most 63 chars."""
    if len(name) > 63 or not re.match(NAME_PATTERN, name):
        raise InvalidSpec(
            "metadata.name",
            "must be a DNS-1035 label (lowercase letters, digits and '-', starting with a letter, "
            "at most 63 characters) because it names the Service",
        )


def parse_spec(body: dict[str, Any]) -> RerankerSpec:
    """Parse a Reranker object (or its kopf body) into a RerankerSpec with defaults applied.

    Raises InvalidSpec naming the first offending field.
    """
    raw = body.get("spec")
    if not isinstance(raw, dict):
        raise InvalidSpec("spec", "missing or not an object")
    name = (body.get("metadata") or {}).get("name")
    if name is not None:
        check_name(name)
    try:
        spec = RerankerSpec.model_validate(_normalise(raw))
    except ValidationError as exc:
        err = exc.errors()[0]
        raise InvalidSpec(
            _field_path(err["loc"]), err["msg"].removeprefix("Value error, ")
        ) from None
    _check_rules(spec)
    return spec
