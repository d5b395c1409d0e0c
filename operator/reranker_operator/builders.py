"""Pure manifest builders: (name, namespace, spec, config, engine key) -> plain dicts.

No I/O and no Kubernetes client here: the handlers apply what these return, `render` prints it,
and the tests validate it against the official schemas. Container commands, arguments and
environment variables follow the operator -> runtime contract in docs/architecture.md exactly.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from typing import Any

from reranker_operator.config import OperatorConfig
from reranker_operator.engine_key import engine_key as compute_engine_key
from reranker_operator.spec import (
    API_GROUP,
    API_VERSION,
    ENDPOINT_VARIABLES,
    KIND,
    EnvVar,
    ProbeOverride,
    RerankerSpec,
)

PORT = 8080
GRPC_PORT = 50051  # TEI's gRPC API when spec.runtime.grpc (gRPC's customary port)
ENGINES_MOUNT = "/engines"
CACHE_VOLUME = "engine-cache"  # Shared mode: the PVC
ENGINE_VOLUME = "engine"  # PerPod mode: the pod's own emptyDir
TMP_VOLUME = "tmp"
# checkpoint.source PVC: the user's claim, mounted read-only in the build container only.
CHECKPOINT_VOLUME = "checkpoint"
CHECKPOINT_MOUNT = "/checkpoint"
# The operator config's proxy.caConfigMap, in the build container only.
CA_VOLUME = "ca-bundle"
CA_MOUNT = "/etc/reranker/ca"
CA_FILE = f"{CA_MOUNT}/ca.crt"
# Every client the build may use reads one of these: OpenSSL/urllib and httpx (the hub),
# requests (GCS, Azure), botocore (S3), the gcloud CLI.
CA_ENV = (
    "SSL_CERT_FILE",
    "REQUESTS_CA_BUNDLE",
    "AWS_CA_BUNDLE",
    "CLOUDSDK_CORE_CUSTOM_CA_CERTS_FILE",
)
BUILD_CONTAINER = "build"  # the Job's container, or the init container in PerPod mode
SERVE_CONTAINER = "reranker"

# Label / annotation keys.
LABEL_NAME = "app.kubernetes.io/name"
LABEL_INSTANCE = "app.kubernetes.io/instance"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_PART_OF = "app.kubernetes.io/part-of"
LABEL_RERANKER = f"{API_GROUP}/reranker"  # the owning Reranker's name
LABEL_ENGINE = f"{API_GROUP}/engine"  # engine key's first 10 hex chars (label values <= 63)
ANNOTATION_ENGINE_KEY = f"{API_GROUP}/engine-key"  # the full engine key
ANNOTATION_SPEC_HASH = f"{API_GROUP}/spec-hash"  # hash of the child as built: patch when it differs
ANNOTATION_RETENTION = f"{API_GROUP}/retention"
# The user's label and annotation keys (spec.service, spec.ingress) on a child, as JSON: the
# next patch removes the ones no longer in the spec, and leaves other controllers' keys alone.
ANNOTATION_USER_KEYS = f"{API_GROUP}/user-metadata-keys"
# `kubectl rollout restart` (and Argo CD's, Lens's and k9s's restart) stamps this on the pod
# template; the operator keeps it, or its next change would roll every pod a second time.
ANNOTATION_RESTARTED_AT = "kubectl.kubernetes.io/restartedAt"

COMPONENT_SERVER = "server"
COMPONENT_BUILD = "engine-build"
COMPONENT_CACHE = "engine-cache"
COMPONENT_PRUNE = "engine-prune"

# Deletes engine directories from the Shared cache (the runtime image has python3).
# Each argument is an engine directory: it goes with what a build of it left behind (the
# runtime's atomic layout: `.<key>.tmp-*` directories of a build cut short, its `.<key>.lock`).
_PRUNE_SCRIPT = (
    "import glob, os, shutil, sys\n"
    "for path in sys.argv[1:]:\n"
    "    head, key = os.path.split(path)\n"
    "    for leftover in [path, *glob.glob(os.path.join(head, '.' + key + '.tmp-*'))]:\n"
    "        shutil.rmtree(leftover, ignore_errors=True)\n"
    "    if os.path.exists(os.path.join(head, '.' + key + '.lock')):\n"
    "        os.remove(os.path.join(head, '.' + key + '.lock'))\n"
    "    print('removed', path)\n"
)
# A prune is seconds of work: a pod that cannot run within this is given up (and the build of an
# engine it would delete, which waits for it, goes ahead).
PRUNE_DEADLINE_SECONDS = 600

# The runtime's in-flight requests gauge (runtime/reranker_runtime/metrics.py), the
# concurrency autoscaling metric (its name in the custom metrics API is configurable:
# config.autoscaling.concurrencyMetric). Needs a custom-metrics adapter (docs/operator.md).
IN_FLIGHT_METRIC = "reranker_requests_in_flight"

_JOB_NAME_MAX = 63  # Job names become the pods' `job-name` label value: a 63-char limit.


# --------------------------------------------------------------------------- names and labels


def short_name(name: str, limit: int) -> str:
    """`name` if it fits in `limit` chars, else a prefix plus `-<8 hex of sha256(name)>`: two
    long names that share a prefix still get distinct results."""
    if len(name) <= limit:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    return name[: limit - len(digest) - 1].rstrip("-") + "-" + digest


_ENGINE_KEY = re.compile(r"[0-9a-f]{64}")


def is_engine_key(text: str) -> bool:
    """Whether `text` is an engine key (sha256 hex), the only thing a path under /engines is
    built from."""
    return _ENGINE_KEY.fullmatch(text) is not None


def job_name(name: str, key: str) -> str:
    """`<name>-engine-<key[:10]>` within 63 chars (see short_name for long Reranker names)."""
    suffix = f"-engine-{key[:10]}"
    return short_name(name, _JOB_NAME_MAX - len(suffix)) + suffix


def cache_pvc_name(name: str) -> str:
    return f"{name}-engine-cache"


def endpoint_url(name: str, namespace: str) -> str:
    return f"http://{name}.{namespace}.svc.cluster.local:{PORT}"


def selector_labels(name: str) -> dict[str, str]:
    """Labels selecting the serving pods (Deployment, Service, PDB)."""
    return {LABEL_NAME: "reranker", LABEL_INSTANCE: name, LABEL_COMPONENT: COMPONENT_SERVER}


def selector_string(name: str) -> str:
    """`selector_labels` as a label-selector string, for `status.selector` (scale subresource)."""
    return ",".join(f"{k}={v}" for k, v in selector_labels(name).items())


def labels(name: str, component: str) -> dict[str, str]:
    """Common labels of every child; `reranker.dev/reranker=<name>` finds them all."""
    return {
        LABEL_NAME: "reranker",
        LABEL_INSTANCE: name,
        LABEL_COMPONENT: component,
        LABEL_MANAGED_BY: "reranker-operator",
        LABEL_PART_OF: "reranker",
        LABEL_RERANKER: name,
    }


def owner_reference(body: dict[str, Any]) -> dict[str, Any]:
    """A controller owner reference to the Reranker `body` (children are garbage-collected)."""
    meta = body.get("metadata") or {}
    return {
        "apiVersion": f"{API_GROUP}/{API_VERSION}",
        "kind": KIND,
        "name": meta["name"],
        "uid": meta.get("uid", ""),
        "controller": True,
        "blockOwnerDeletion": True,
    }


def runtime_image(spec: RerankerSpec, config: OperatorConfig) -> str:
    """The image for build Jobs and runtime pods: spec.runtime.image, else the config's image
    for the accelerator (the CPU image for accelerator.type CPU, the GPU image otherwise)."""
    if spec.runtime.image:
        return spec.runtime.image
    return config.runtime_image if spec.accelerator.is_gpu else config.runtime_image_cpu


def engine_key_for(spec: RerankerSpec, config: OperatorConfig) -> str:
    """The engine key of `spec` with the image it would run (see engine_key.engine_key)."""
    return compute_engine_key(spec, runtime_image(spec, config))


def spec_hash(obj: dict[str, Any]) -> str:
    """sha256 of a child's labels, annotations (minus this hash) and spec: compare to patch."""
    meta = obj.get("metadata") or {}
    annotations = {
        k: v for k, v in (meta.get("annotations") or {}).items() if k != ANNOTATION_SPEC_HASH
    }
    payload = {
        "labels": meta.get("labels") or {},
        "annotations": annotations,
        "spec": obj.get("spec"),
    }
    return hashlib.sha256(
        json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()


def replacement_patch(desired: dict[str, Any], live: dict[str, Any]) -> list[dict[str, Any]]:
    """A JSON Patch (RFC 6902) making `live` match `desired` exactly where the operator owns it.

    `spec` is replaced as a whole, so a field the builders no longer render (a GPU toleration
    after a switch to CPU) is removed. Labels and annotations are merged over the live ones (other
    controllers annotate our children, e.g. `deployment.kubernetes.io/revision`), except the
    user's keys an earlier render recorded (ANNOTATION_USER_KEYS) and this one drops. A
    Deployment's pod template keeps the live `kubectl rollout restart` stamp, so a later change
    that leaves the pods as they are (the replica count) rolls none of them. A Deployment
    rendered without `replicas` (an autoscaler owns it) has its spec replaced field by field,
    `replicas` untouched, so it keeps whatever count is live when the patch lands. JSON Patch
    rather than server-side apply: both a real API server and the in-memory one used in tests
    implement its operations alike, whereas the latter treats an apply patch as a merge patch.
    """
    meta = desired["metadata"]
    ops = [
        {"op": "add", "path": f"/metadata/{field}", "value": value}
        for field, value in _merged_metadata(desired, live).items()
    ]
    if "ownerReferences" in meta:
        ops.append(
            {"op": "add", "path": "/metadata/ownerReferences", "value": meta["ownerReferences"]}
        )
    spec = copy.deepcopy(desired["spec"])
    live_spec = live.get("spec") or {}
    if desired["kind"] == "Service":
        spec.update(_service_fields_set_by_the_cluster(spec, live_spec))
    if desired["kind"] == "Deployment":
        _keep_restart_stamp(spec, live_spec)
    if desired["kind"] == "Deployment" and "replicas" not in spec:
        # An autoscaler owns the count and may change it between our read and this patch:
        # replace every other field of the spec one by one and never write `replicas` (a
        # stale count would undo the autoscaler's step until its next poll).
        ops += [{"op": "remove", "path": f"/spec/{_pointer(k)}"}
                for k in live_spec if k not in spec and k != "replicas"]  # fmt: skip
        ops += [{"op": "add", "path": f"/spec/{_pointer(k)}", "value": v} for k, v in spec.items()]
        return ops
    ops.append({"op": "add", "path": "/spec", "value": spec})
    return ops


def relabel_patch(desired: dict[str, Any], live: dict[str, Any]) -> list[dict[str, Any]] | None:
    """A JSON Patch giving `live` the labels `desired` renders (spec.labels added or removed),
    its spec left alone: for the cache PVC, whose spec is immutable once bound. None when the
    labels and the record of the user's keys already match."""
    live_meta = live.get("metadata") or {}
    live_annotations = live_meta.get("annotations") or {}
    merged = _merged_metadata(desired, live)
    record = merged["annotations"].get(ANNOTATION_USER_KEYS)
    if merged["labels"] == (live_meta.get("labels") or {}) and record == live_annotations.get(
        ANNOTATION_USER_KEYS
    ):
        return None
    ops: list[dict[str, Any]] = [
        {"op": "add", "path": "/metadata/labels", "value": merged["labels"]}
    ]
    # Only the record itself: the live annotations (the cache's built-engines list) stay.
    record_path = f"/metadata/annotations/{_pointer(ANNOTATION_USER_KEYS)}"
    if record is not None:
        if not live_annotations:
            ops.append({"op": "add", "path": "/metadata/annotations", "value": {}})
        ops.append({"op": "add", "path": record_path, "value": record})
    elif ANNOTATION_USER_KEYS in live_annotations:
        ops.append({"op": "remove", "path": record_path})
    return ops


def _merged_metadata(desired: dict[str, Any], live: dict[str, Any]) -> dict[str, dict[str, str]]:
    """`desired`'s labels and annotations merged over the live ones (other controllers add
    theirs), less the user's keys an earlier render recorded and this one drops."""
    meta, live_meta = desired["metadata"], live.get("metadata") or {}
    dropped = _user_keys(live)
    dropped["annotations"] = [*dropped.get("annotations", []), ANNOTATION_USER_KEYS]
    merged: dict[str, dict[str, str]] = {}
    for field in ("labels", "annotations"):
        kept = {
            k: v for k, v in (live_meta.get(field) or {}).items() if k not in dropped.get(field, ())
        }
        merged[field] = {**kept, **(meta.get(field) or {})}
    return merged


def _keep_restart_stamp(spec: dict[str, Any], live_spec: dict[str, Any]) -> None:
    live_annotations = (live_spec.get("template") or {}).get("metadata", {}).get("annotations")
    stamp = (live_annotations or {}).get(ANNOTATION_RESTARTED_AT)
    if stamp is not None:
        template_meta = spec["template"].setdefault("metadata", {})
        template_meta.setdefault("annotations", {}).setdefault(ANNOTATION_RESTARTED_AT, stamp)


def _pointer(key: str) -> str:
    """A key as one JSON Pointer (RFC 6901) reference token."""
    return key.replace("~", "~0").replace("/", "~1")


def _service_fields_set_by_the_cluster(
    desired: dict[str, Any], live: dict[str, Any]
) -> dict[str, Any]:
    """What the API server or a webhook set on the live Service and a replaced spec must keep:
    the allocated IPs, and on a LoadBalancer the class a controller's webhook chose (immutable
    once set: dropping it is refused). Node ports the API server keeps by itself."""
    fields = ["clusterIP", "clusterIPs", "ipFamilies", "ipFamilyPolicy"]
    if desired.get("type") == live.get("type") == "LoadBalancer":
        fields += ["loadBalancerClass", "allocateLoadBalancerNodePorts"]
    return {f: copy.deepcopy(live[f]) for f in fields if f in live and f not in desired}


def _user_keys(obj: dict[str, Any]) -> dict[str, list[str]]:
    """The user's label and annotation keys recorded on a child (ANNOTATION_USER_KEYS)."""
    raw = ((obj.get("metadata") or {}).get("annotations") or {}).get(ANNOTATION_USER_KEYS)
    try:
        keys = json.loads(raw) if raw else {}
    except ValueError:
        return {}
    return keys if isinstance(keys, dict) else {}


def _with_user_metadata(
    meta: dict[str, Any], labels_: dict[str, str], annotations: dict[str, str]
) -> dict[str, Any]:
    """`meta` plus the user's labels and annotations (ours win), their keys recorded."""
    meta["labels"] = {**labels_, **meta["labels"]}
    meta["annotations"] = {**annotations, **(meta.get("annotations") or {})}
    if labels_ or annotations:
        record = {"labels": sorted(labels_), "annotations": sorted(annotations)}
        meta["annotations"][ANNOTATION_USER_KEYS] = json.dumps(record, separators=(",", ":"))
    if not meta["annotations"]:
        del meta["annotations"]
    return meta


def _finish(obj: dict[str, Any], owner: dict[str, Any] | None) -> dict[str, Any]:
    meta = obj["metadata"]
    if owner is not None:
        meta["ownerReferences"] = [copy.deepcopy(owner)]
    meta.setdefault("annotations", {})[ANNOTATION_SPEC_HASH] = spec_hash(obj)
    return obj


def _metadata(
    name: str,
    namespace: str,
    labels_: dict[str, str],
    annotations: dict[str, str] | None = None,
    *,
    user_labels: dict[str, str] | None = None,
    user_annotations: dict[str, str] | None = None,
) -> dict[str, Any]:
    """A child's metadata: the operator's labels and annotations over the user's (spec.labels,
    and the child's own such as spec.service.labels), whose keys are recorded."""
    meta: dict[str, Any] = {"name": name, "namespace": namespace, "labels": labels_}
    if annotations:
        meta["annotations"] = annotations
    return _with_user_metadata(meta, user_labels or {}, user_annotations or {})


# --------------------------------------------------------------------------- pod pieces


def _container_security_context() -> dict[str, Any]:
    # Pod Security Standards "restricted"; /tmp and /engines are the only writable paths.
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _container_resources(
    spec: RerankerSpec, config: OperatorConfig, *, builds: bool = False
) -> dict[str, Any]:
    # No CPU limit unless cpuLimit (throttling hurts tokenization latency); memory and
    # ephemeral storage: limit = request. The build's own fields over the serving ones.
    resources = spec.resources.for_build() if builds else spec.resources
    requests = {"cpu": resources.cpu, "memory": resources.memory}
    limits: dict[str, Any] = {"memory": resources.memory}
    if resources.cpu_limit is not None:
        limits["cpu"] = resources.cpu_limit
    if resources.ephemeral_storage is not None:
        requests["ephemeral-storage"] = limits["ephemeral-storage"] = resources.ephemeral_storage
    resource_name = (
        spec.accelerator.resource_name or config.placement(spec.accelerator.type).resource_name
    )
    if spec.accelerator.is_gpu and resource_name:
        limits[resource_name] = str(spec.accelerator.count)
    return {"requests": requests, "limits": limits}


def _and_terms(ours: list[dict[str, Any]], theirs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Two ORed lists of nodeSelectorTerms, ANDed: every pair of terms joined."""
    if not ours or not theirs:
        return copy.deepcopy(ours or theirs)
    joined = []
    for a in ours:
        for b in theirs:
            term = {
                field: copy.deepcopy(a.get(field, []) + b.get(field, []))
                for field in ("matchExpressions", "matchFields")
                if a.get(field) or b.get(field)
            }
            joined.append(term)
    return joined


def _pod_placement(spec: RerankerSpec, config: OperatorConfig) -> dict[str, Any]:
    """nodeAffinity / nodeSelector / tolerations: the accelerator's (GPU engines are
    GPU-specific), merged with spec.pod's (both must hold)."""
    placement = config.placement(spec.accelerator.type)
    user = spec.pod
    out: dict[str, Any] = {}
    affinity = copy.deepcopy(user.affinity)
    node_affinity = affinity.setdefault("nodeAffinity", {})
    required = node_affinity.get("requiredDuringSchedulingIgnoredDuringExecution") or {}
    terms = _and_terms(placement.node_selector_terms, required.get("nodeSelectorTerms") or [])
    if terms:
        node_affinity["requiredDuringSchedulingIgnoredDuringExecution"] = {
            "nodeSelectorTerms": terms
        }
    if not node_affinity:
        del affinity["nodeAffinity"]
    if affinity:
        out["affinity"] = affinity
    node_selector = {**placement.node_selector, **user.node_selector}
    if node_selector:
        out["nodeSelector"] = node_selector
    tolerations = copy.deepcopy(placement.tolerations)
    for toleration in user.tolerations:
        extra = toleration.model_dump(by_alias=True, exclude_none=True)
        if extra not in tolerations:
            tolerations.append(extra)
    if tolerations:
        out["tolerations"] = tolerations
    return out


def _node_placement(spec: RerankerSpec, config: OperatorConfig) -> dict[str, Any]:
    """`_pod_placement` without pod (anti-)affinity: which nodes, not which neighbours."""
    placement = _pod_placement(spec, config)
    affinity = placement.pop("affinity", {})
    if "nodeAffinity" in affinity:
        placement["affinity"] = {"nodeAffinity": affinity["nodeAffinity"]}
    return placement


def _pod_common(spec: RerankerSpec, config: OperatorConfig) -> dict[str, Any]:
    pod: dict[str, Any] = {
        "securityContext": copy.deepcopy(config.pod_security_context),
        # The runtime never talks to the API server, and Service links would inject variables
        # such as RERANKER_PORT=tcp://... for a Service named `reranker`. (Workload Identity
        # and IRSA / Pod Identity need no API token: they inject their own credentials.)
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        **_pod_placement(spec, config),
    }
    settings = spec.pod
    if settings.service_account_name:
        pod["serviceAccountName"] = settings.service_account_name
    if settings.priority_class_name:
        pod["priorityClassName"] = settings.priority_class_name
    runtime_class = (
        settings.runtime_class_name or config.placement(spec.accelerator.type).runtime_class_name
    )
    if runtime_class:
        pod["runtimeClassName"] = runtime_class
    if settings.topology_spread_constraints:
        pod["topologySpreadConstraints"] = copy.deepcopy(list(settings.topology_spread_constraints))
    pull_secrets = _pull_secrets(spec, config)
    if pull_secrets:
        pod["imagePullSecrets"] = pull_secrets
    if settings.scheduler_name:
        pod["schedulerName"] = settings.scheduler_name
    return pod


def _pull_secrets(spec: RerankerSpec, config: OperatorConfig) -> list[dict[str, str]]:
    """The operator config's image pull secrets, then the Reranker's own, each once."""
    names = dict.fromkeys([*config.image_pull_secrets, *spec.pod.image_pull_secrets])
    return [{"name": n} for n in names]


def _pod_metadata(
    spec: RerankerSpec, labels_: dict[str, str], annotations: dict[str, str]
) -> dict[str, Any]:
    """Pod template metadata: spec.labels, spec.pod's labels and annotations, then the
    operator's."""
    return {
        "labels": {**spec.labels, **spec.pod.labels, **labels_},
        "annotations": {**spec.pod.annotations, **annotations},
    }


def cache_mode(spec: RerankerSpec, config: OperatorConfig) -> str:
    """PerPod (each pod builds its engine) or Shared (a Job builds into the cache PVC)."""
    return spec.engine_cache.mode or config.engine_cache.mode


def cache_size(spec: RerankerSpec, config: OperatorConfig) -> str:
    return spec.engine_cache.size or config.engine_cache.size


def _user_volume_mounts(spec: RerankerSpec) -> list[dict[str, Any]]:
    """spec.runtime.volumeMounts, as the container's (only the fields given)."""
    return [m.model_dump(by_alias=True, exclude_defaults=True) for m in spec.runtime.volume_mounts]


def _volumes(
    name: str, spec: RerankerSpec, config: OperatorConfig, read_only: bool, builds: bool
) -> list[dict[str, Any]]:
    """The pod's volumes; `builds`: the pod runs the build container (Job, or PerPod's init)."""
    volumes = [{"name": TMP_VOLUME, "emptyDir": {}}]
    if cache_mode(spec, config) == "PerPod":
        # Pod-local: any pod starts on any node, and nothing needs ReadWriteMany. The limit
        # evicts a pod whose engine outgrows it; it reserves nothing on the node.
        volumes.insert(
            0, {"name": ENGINE_VOLUME, "emptyDir": {"sizeLimit": cache_size(spec, config)}}
        )
    else:
        claim: dict[str, Any] = {"claimName": cache_pvc_name(name)}
        if read_only:
            claim["readOnly"] = True
        volumes.insert(0, {"name": CACHE_VOLUME, "persistentVolumeClaim": claim})
    pvc_claim = spec.checkpoint.pvc_claim
    if builds and pvc_claim is not None:
        volumes.append(
            {
                "name": CHECKPOINT_VOLUME,
                "persistentVolumeClaim": {"claimName": pvc_claim, "readOnly": True},
            }
        )
    proxy = config.proxy
    if builds and proxy.ca_config_map:
        items = [{"key": proxy.ca_config_map_key, "path": "ca.crt"}]
        volumes.append(
            {"name": CA_VOLUME, "configMap": {"name": proxy.ca_config_map, "items": items}}
        )
    return volumes


# Never through the proxy: the pod itself, the cloud's credential endpoints (GKE Workload
# Identity's metadata server, EC2 instance metadata over IPv4 and IPv6, the EKS Pod Identity
# agent: through a proxy they fail, or answer for the proxy's node), and the cluster's own
# services (an in-cluster MinIO).
ALWAYS_NO_PROXY = (
    "localhost",
    "127.0.0.1",
    "169.254.169.254",
    "fd00:ec2::254",
    "169.254.170.23",
    "fd00:ec2::23",
    "metadata.google.internal",
    ".svc",
    ".cluster.local",
)


def _proxy_env(config: OperatorConfig) -> list[dict[str, str]]:
    """The build's proxy and CA bundle variables (both spellings: tools read one or the other)."""
    proxy = config.proxy
    env: list[dict[str, str]] = []
    no_proxy = None
    if proxy.http_proxy or proxy.https_proxy:
        listed = [h.strip() for h in (proxy.no_proxy or "").split(",") if h.strip()]
        no_proxy = ",".join(dict.fromkeys([*listed, *ALWAYS_NO_PROXY]))
    for name, value in (
        ("HTTP_PROXY", proxy.http_proxy),
        ("HTTPS_PROXY", proxy.https_proxy),
        ("NO_PROXY", no_proxy),
    ):
        if value:
            env += [_env(name, value), _env(name.lower(), value)]
    if proxy.ca_config_map:
        env += [_env(name, CA_FILE) for name in CA_ENV]
    return env


def _engine_volume_name(spec: RerankerSpec, config: OperatorConfig) -> str:
    return ENGINE_VOLUME if cache_mode(spec, config) == "PerPod" else CACHE_VOLUME


def _env(name: str, value: str) -> dict[str, str]:
    return {"name": name, "value": value}


def _probe(path: str, defaults: dict[str, int], override: ProbeOverride) -> dict[str, Any]:
    probe: dict[str, Any] = {"httpGet": {"path": path, "port": "http"}, **defaults}
    for key, value in override.model_dump(by_alias=True, exclude_none=True).items():
        probe[key] = value
    return probe


# Startup is generous: engine load + warm-up at the full token budget can take minutes.
STARTUP_PROBE = {"periodSeconds": 10, "timeoutSeconds": 5, "failureThreshold": 90}  # 15 min
READINESS_PROBE = {"periodSeconds": 10, "timeoutSeconds": 5, "failureThreshold": 3}
LIVENESS_PROBE = {"periodSeconds": 20, "timeoutSeconds": 5, "failureThreshold": 3}


# --------------------------------------------------------------------------- children


def build_engine_cache_pvc(
    name: str,
    namespace: str,
    spec: RerankerSpec,
    config: OperatorConfig,
    owner: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The engine cache PVC `<name>-engine-cache`. Owned (deleted with the Reranker) only with
    retention Delete; with Retain it outlives the Reranker so a re-created one reuses its engines."""
    cache, defaults = spec.engine_cache, config.engine_cache
    retention = cache.retention or defaults.retention
    pvc_spec: dict[str, Any] = {
        "accessModes": [cache.access_mode or defaults.access_mode],
        "volumeMode": "Filesystem",
        "resources": {"requests": {"storage": cache_size(spec, config)}},
    }
    storage_class = cache.storage_class_name or defaults.storage_class_name
    if storage_class:
        pvc_spec["storageClassName"] = storage_class
    obj = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": _metadata(
            cache_pvc_name(name),
            namespace,
            labels(name, COMPONENT_CACHE),
            {ANNOTATION_RETENTION: retention},
            user_labels=spec.labels,
        ),
        "spec": pvc_spec,
    }
    return _finish(obj, owner if retention == "Delete" else None)


def build_args(spec: RerankerSpec, key: str) -> list[str]:
    """`reranker-runtime build` arguments (contract: docs/architecture.md)."""
    args = [
        "--checkpoint-repo", spec.checkpoint.repo,
        "--revision", spec.checkpoint.revision,
        "--source", spec.checkpoint.source,
        "--quantization", spec.build.quantization,
        "--max-num-tokens", str(spec.build.max_num_tokens),
    ]  # fmt: skip
    if spec.build.max_seq_len is not None:
        args += ["--max-seq-len", str(spec.build.max_seq_len)]
    if spec.checkpoint.pvc_claim is not None:
        args += ["--checkpoint-mount", CHECKPOINT_MOUNT]
    args += ["--accelerator", spec.accelerator.type, "--output", f"{ENGINES_MOUNT}/{key}"]
    return args


def build_container(spec: RerankerSpec, config: OperatorConfig, key: str) -> dict[str, Any]:
    """The `reranker-runtime build` container: the Job's (Shared) or the init container (PerPod).
    It writes /engines/<key> on the engine volume; a complete engine makes it a no-op."""
    container: dict[str, Any] = {
        "name": BUILD_CONTAINER,
        "image": runtime_image(spec, config),
        "imagePullPolicy": config.image_pull_policy,
        "command": ["reranker-runtime", "build"],
        "args": build_args(spec, key),
        "env": [
            _env("HF_HOME", f"{ENGINES_MOUNT}/.hf-home"),  # downloads cached on the volume
            _env("RERANKER_LOG_FORMAT", "json"),
            _env("HOME", "/tmp"),  # read-only root filesystem
            *_proxy_env(config),
        ],
        "resources": _container_resources(spec, config, builds=True),
        "volumeMounts": [
            {"name": _engine_volume_name(spec, config), "mountPath": ENGINES_MOUNT},
            {"name": TMP_VOLUME, "mountPath": "/tmp"},
        ],
        "securityContext": _container_security_context(),
        # The build writes its failure reason to /dev/termination-log; the logs' tail otherwise.
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if spec.checkpoint.pvc_claim is not None:
        container["volumeMounts"].append(
            {"name": CHECKPOINT_VOLUME, "mountPath": CHECKPOINT_MOUNT, "readOnly": True}
        )
    if config.proxy.ca_config_map:
        container["volumeMounts"].append(
            {"name": CA_VOLUME, "mountPath": CA_MOUNT, "readOnly": True}
        )
    if spec.checkpoint.endpoint is not None:
        variable = ENDPOINT_VARIABLES[spec.checkpoint.source]
        container["env"].append(_env(variable, spec.checkpoint.endpoint))
    if spec.checkpoint.secret_name:
        container["envFrom"] = [{"secretRef": {"name": spec.checkpoint.secret_name}}]
    return container


def build_engine_job(
    name: str,
    namespace: str,
    spec: RerankerSpec,
    config: OperatorConfig,
    key: str,
    owner: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The engine-preparation Job `<name>-engine-<key[:10]>` (Shared mode), on the serving
    accelerator."""
    job_labels = {**labels(name, COMPONENT_BUILD), LABEL_ENGINE: key[:10]}
    container = build_container(spec, config, key)
    jobs = config.build_job
    obj = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": _metadata(
            job_name(name, key),
            namespace,
            job_labels,
            {ANNOTATION_ENGINE_KEY: key},
            user_labels=spec.labels,
        ),
        "spec": {
            "backoffLimit": jobs.backoff_limit,
            "activeDeadlineSeconds": jobs.active_deadline_seconds,
            "ttlSecondsAfterFinished": jobs.ttl_seconds_after_finished,
            "template": {
                "metadata": _pod_metadata(spec, job_labels, {ANNOTATION_ENGINE_KEY: key}),
                "spec": {
                    "restartPolicy": "Never",
                    **_pod_common(spec, config),
                    "containers": [container],
                    "volumes": _volumes(name, spec, config, read_only=False, builds=True),
                },
            },
        },
    }
    return _finish(obj, owner)


def prune_job_name(name: str, keys: list[str], cache_version: str = "") -> str:
    """`<name>-prune-<hash of the keys and the cache PVC's resourceVersion>`: a retry of the same
    prune finds its Job, a later prune of the same keys gets a new one."""
    digest = hashlib.sha256((",".join(sorted(keys)) + "@" + cache_version).encode()).hexdigest()[
        :10
    ]
    suffix = f"-prune-{digest}"
    return short_name(name, _JOB_NAME_MAX - len(suffix)) + suffix


def build_prune_job(
    name: str,
    namespace: str,
    spec: RerankerSpec,
    config: OperatorConfig,
    keys: list[str],
    owner: dict[str, Any] | None = None,
    cache: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A Job deleting the engines `keys` from the Shared cache PVC (no GPU needed). `cache`, the
    live PVC, gives the Job's name its version and the pod its placement: the claim keeps the
    access mode it was created with, whatever the spec says now."""
    not_keys = [k for k in keys if not is_engine_key(k)]
    if not_keys:  # the script deletes /engines/<key>: `..` would be the whole cache
        raise ValueError(f"not engine keys: {not_keys}")
    cache_meta, cache_spec = (cache or {}).get("metadata") or {}, (cache or {}).get("spec") or {}
    access_modes = cache_spec.get("accessModes") or [
        spec.engine_cache.access_mode or config.engine_cache.access_mode
    ]
    job_labels = labels(name, COMPONENT_PRUNE)
    container: dict[str, Any] = {
        "name": "prune",
        "image": runtime_image(spec, config),
        "imagePullPolicy": config.image_pull_policy,
        "command": ["python3", "-c", _PRUNE_SCRIPT],
        "args": [f"{ENGINES_MOUNT}/{k}" for k in sorted(keys)],
        "resources": {
            "requests": {"cpu": "100m", "memory": "128Mi"},
            "limits": {"memory": "256Mi"},
        },
        "volumeMounts": [{"name": CACHE_VOLUME, "mountPath": ENGINES_MOUNT}],
        "securityContext": _container_security_context(),
    }
    pod: dict[str, Any] = {
        "restartPolicy": "Never",
        "securityContext": copy.deepcopy(config.pod_security_context),
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        # On the serving pods' nodes: the runtime image is there already and so is the volume.
        # Their node affinity only: pod (anti-)affinity written for servers is not the prune's.
        **_node_placement(spec, config),
        "containers": [container],
        "volumes": [
            {"name": CACHE_VOLUME, "persistentVolumeClaim": {"claimName": cache_pvc_name(name)}}
        ],
    }
    if "ReadWriteMany" not in access_modes:
        # The volume is attached to the servers' node: only a pod beside them can mount it.
        pod.setdefault("affinity", {})["podAffinity"] = {
            "requiredDuringSchedulingIgnoredDuringExecution": [
                {"labelSelector": {"matchLabels": selector_labels(name)},
                 "topologyKey": "kubernetes.io/hostname"}
            ]
        }  # fmt: skip
    pull_secrets = _pull_secrets(spec, config)
    if pull_secrets:
        pod["imagePullSecrets"] = pull_secrets
    obj = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": _metadata(
            prune_job_name(name, keys, cache_meta.get("resourceVersion", "")),
            namespace,
            job_labels,
            user_labels=spec.labels,
        ),
        "spec": {
            "backoffLimit": 3,
            "activeDeadlineSeconds": PRUNE_DEADLINE_SECONDS,
            "ttlSecondsAfterFinished": config.build_job.ttl_seconds_after_finished,
            "template": {"metadata": {"labels": {**spec.labels, **job_labels}}, "spec": pod},
        },
    }
    return _finish(obj, owner)


def serve_env(spec: RerankerSpec, key: str) -> list[dict[str, Any]]:
    """`reranker-runtime serve` environment (contract: docs/architecture.md)."""
    rt = spec.runtime
    env: list[dict[str, Any]] = [
        _env("RERANKER_ENGINE_DIR", f"{ENGINES_MOUNT}/{key}"),
        _env("RERANKER_PORT", str(PORT)),
        _env("RERANKER_SERVED_MODEL_NAME", rt.served_model_name or spec.checkpoint.repo),
        _env("RERANKER_MAX_BATCH_TOKENS", str(spec.max_batch_tokens)),
    ]
    # Unset limits are left to the runtime's defaults.
    optional = {
        "RERANKER_MAX_BATCH_REQUESTS": rt.max_batch_requests,
        "RERANKER_MAX_CLIENT_BATCH_SIZE": rt.max_client_batch_size,
        "RERANKER_MAX_CONCURRENT_REQUESTS": rt.max_concurrent_requests,
    }
    env += [_env(var, str(value)) for var, value in optional.items() if value is not None]
    env.append(_env("RERANKER_AUTO_TRUNCATE", "true" if rt.auto_truncate else "false"))
    if rt.grpc:
        env.append(_env("RERANKER_GRPC_PORT", str(GRPC_PORT)))
    if rt.api_key_secret is not None:
        env.append(
            {
                "name": "RERANKER_API_KEY",
                "valueFrom": {
                    "secretKeyRef": {"name": rt.api_key_secret.name, "key": rt.api_key_secret.key}
                },
            }
        )
    env += [
        _env("RERANKER_LOG_FORMAT", "json"),
        _env("HF_HUB_OFFLINE", "1"),  # the engine directory holds everything: never reach a hub
        _env("HOME", "/tmp"),
        _env("HF_HOME", "/tmp/hf-home"),
    ]
    env += [_user_env(e) for e in rt.env]
    return env


def _user_env(var: EnvVar) -> dict[str, Any]:
    """A spec.runtime.env entry as the container's EnvVar (valueFrom passed through)."""
    if var.value_from is not None:
        return {
            "name": var.name,
            "valueFrom": var.value_from.model_dump(exclude_none=True, by_alias=True),
        }
    return _env(var.name, var.value or "")


def build_deployment(
    name: str,
    namespace: str,
    spec: RerankerSpec,
    config: OperatorConfig,
    key: str,
    owner: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The runtime Deployment `<name>` serving the engine `key` (which may be an older key than
    the spec's while a new engine builds). `replicas` is omitted when autoscaling (HPA owns it)."""
    probes = spec.runtime.probes
    container: dict[str, Any] = {
        "name": SERVE_CONTAINER,
        "image": runtime_image(spec, config),
        "imagePullPolicy": config.image_pull_policy,
        "command": ["reranker-runtime", "serve"],
        "env": serve_env(spec, key),
        "ports": [{"name": "http", "containerPort": PORT, "protocol": "TCP"}]
        + (
            [{"name": "grpc", "containerPort": GRPC_PORT, "protocol": "TCP"}]
            if spec.runtime.grpc
            else []
        ),
        "startupProbe": _probe("/health", STARTUP_PROBE, probes.startup),
        "readinessProbe": _probe("/health", READINESS_PROBE, probes.readiness),
        "livenessProbe": _probe("/live", LIVENESS_PROBE, probes.liveness),
        "resources": _container_resources(spec, config),
        "volumeMounts": [
            {
                "name": _engine_volume_name(spec, config),
                "mountPath": ENGINES_MOUNT,
                "readOnly": True,
            },
            {"name": TMP_VOLUME, "mountPath": "/tmp"},
            *_user_volume_mounts(spec),
        ],
        "securityContext": _container_security_context(),
        # Give endpoints time to drop the pod before the server stops accepting requests.
        "lifecycle": {"preStop": {"exec": {"command": ["sleep", "5"]}}},
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    pod_labels = {**labels(name, COMPONENT_SERVER), LABEL_ENGINE: key[:10]}
    pod_annotations = {
        ANNOTATION_ENGINE_KEY: key,
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(PORT),
        "prometheus.io/path": "/metrics",
    }
    dep_spec: dict[str, Any] = {
        "selector": {"matchLabels": selector_labels(name)},
        # By default surge, never remove a serving pod first: old pods serve until new ones are
        # ready. spec.rollout trades that for no spare GPU (maxSurge 0, maxUnavailable 1).
        "strategy": {
            "type": "RollingUpdate",
            "rollingUpdate": {
                "maxUnavailable": spec.rollout.max_unavailable,
                "maxSurge": spec.rollout.max_surge,
            },
        },
        "revisionHistoryLimit": 3,
        # Beyond the startup probe's budget, so Progressing=False means a real problem.
        "progressDeadlineSeconds": _progress_deadline(spec, config),
        "template": {
            "metadata": _pod_metadata(spec, pod_labels, pod_annotations),
            "spec": {
                **_pod_common(spec, config),
                "terminationGracePeriodSeconds": config.termination_grace_period_seconds,
                "containers": [container],
                "volumes": _volumes(
                    name,
                    spec,
                    config,
                    read_only=True,
                    builds=cache_mode(spec, config) == "PerPod",
                )
                + [copy.deepcopy(v) for v in spec.runtime.volumes],
            },
        },
    }
    if cache_mode(spec, config) == "PerPod":
        # Each pod builds (or, after a restart, finds) its engine before serving it.
        pod_spec = dep_spec["template"]["spec"]
        pod_spec["initContainers"] = [build_container(spec, config, key)]
    if spec.autoscaling is None:
        dep_spec = {"replicas": spec.desired_replicas, **dep_spec}
    obj = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(
            name,
            namespace,
            labels(name, COMPONENT_SERVER),
            {ANNOTATION_ENGINE_KEY: key},
            user_labels=spec.labels,
        ),
        "spec": dep_spec,
    }
    return _finish(obj, owner)


INT32_MAX = 2**31 - 1


def _progress_deadline(spec: RerankerSpec, config: OperatorConfig) -> int:
    startup = _probe("/health", STARTUP_PROBE, spec.runtime.probes.startup)
    budget = (
        startup.get("initialDelaySeconds", 0)
        + startup["periodSeconds"] * startup["failureThreshold"]
    )
    if cache_mode(spec, config) == "PerPod":
        budget += config.build_job.active_deadline_seconds  # the init container's build
    return min(max(600, budget + 300), INT32_MAX)  # an int32 field


def build_service(
    name: str, namespace: str, spec: RerankerSpec, owner: dict[str, Any] | None = None
) -> dict[str, Any]:
    """ClusterIP Service `<name>` on port 8080 (see endpoint_url), and 50051 for TEI's gRPC API
    when spec.runtime.grpc (appProtocol h2c: plain-text HTTP/2, for meshes and gateways)."""
    ports: list[dict[str, Any]] = [
        {"name": "http", "port": PORT, "targetPort": "http", "protocol": "TCP"}
    ]
    if spec.runtime.grpc:
        ports.append(
            {
                "name": "grpc",
                "port": GRPC_PORT,
                "targetPort": "grpc",
                "protocol": "TCP",
                "appProtocol": "kubernetes.io/h2c",
            }
        )
    settings = spec.service
    service_spec: dict[str, Any] = {
        "type": settings.type,
        "selector": selector_labels(name),
        "ports": ports,
    }
    if settings.load_balancer_source_ranges:
        service_spec["loadBalancerSourceRanges"] = list(settings.load_balancer_source_ranges)
    meta = _metadata(
        name,
        namespace,
        labels(name, COMPONENT_SERVER),
        user_labels={**spec.labels, **settings.labels},
        user_annotations=settings.annotations,
    )
    obj = {"apiVersion": "v1", "kind": "Service", "metadata": meta, "spec": service_spec}
    return _finish(obj, owner)


def build_ingress(
    name: str, namespace: str, spec: RerankerSpec, owner: dict[str, Any] | None = None
) -> dict[str, Any] | None:
    """The Ingress `<name>` for spec.ingress (host + path prefix -> the Service's http port),
    or None when the spec asks for none."""
    ingress = spec.ingress
    if ingress is None:
        return None
    rule = {
        "host": ingress.host,
        "http": {
            "paths": [
                {
                    "path": ingress.path,
                    "pathType": "Prefix",
                    "backend": {"service": {"name": name, "port": {"name": "http"}}},
                }
            ]
        },
    }
    ingress_spec: dict[str, Any] = {"rules": [rule]}
    if ingress.class_name:
        ingress_spec["ingressClassName"] = ingress.class_name
    if ingress.tls_secret_name:
        ingress_spec["tls"] = [{"hosts": [ingress.host], "secretName": ingress.tls_secret_name}]
    return _route_to_service(
        "networking.k8s.io/v1", "Ingress", name, namespace, spec, ingress.annotations,
        ingress_spec, owner,
    )  # fmt: skip


def build_http_route(
    name: str, namespace: str, spec: RerankerSpec, owner: dict[str, Any] | None = None
) -> dict[str, Any] | None:
    """The Gateway API HTTPRoute `<name>` for spec.httpRoute (its hostnames + path prefix -> the
    Service's port 8080), or None when the spec asks for none."""
    route = spec.http_route
    if route is None:
        return None
    parent_refs = [
        {
            "name": ref.name,
            **({"namespace": ref.namespace} if ref.namespace else {}),
            **({"sectionName": ref.section_name} if ref.section_name else {}),
        }
        for ref in route.parent_refs
    ]
    route_spec: dict[str, Any] = {
        "parentRefs": parent_refs,
        "rules": [
            {
                "matches": [{"path": {"type": "PathPrefix", "value": route.path}}],
                "backendRefs": [{"name": name, "port": PORT}],
            }
        ],
    }
    if route.hostnames:
        route_spec["hostnames"] = list(route.hostnames)
    return _route_to_service(
        "gateway.networking.k8s.io/v1",
        "HTTPRoute",
        name,
        namespace,
        spec,
        route.annotations,
        route_spec,
        owner,
    )


def _route_to_service(
    api_version: str,
    kind: str,
    name: str,
    namespace: str,
    spec: RerankerSpec,
    annotations: dict[str, str],
    spec_: dict[str, Any],
    owner: dict[str, Any] | None,
) -> dict[str, Any]:
    """An Ingress or HTTPRoute `<name>` to the Service, with the user's labels and annotations."""
    meta = _metadata(
        name,
        namespace,
        labels(name, COMPONENT_SERVER),
        user_labels=spec.labels,
        user_annotations=annotations,
    )
    obj = {"apiVersion": api_version, "kind": kind, "metadata": meta, "spec": spec_}
    return _finish(obj, owner)


def external_endpoint(
    spec: RerankerSpec, service: dict[str, Any] | None, ingress: dict[str, Any] | None
) -> str | None:
    """Where clients outside the cluster call: the Ingress's URL once the Ingress exists (in
    Shared mode it is created with the Deployment, after the first build), else a LoadBalancer
    Service's address once the cloud has assigned one (None until then, and for ClusterIP and
    NodePort)."""
    if spec.ingress is not None:
        return spec.ingress.url if ingress is not None else None
    if spec.service.type != "LoadBalancer" or service is None:
        return None
    for entry in ((service.get("status") or {}).get("loadBalancer") or {}).get("ingress") or []:
        address = entry.get("hostname") or entry.get("ip")
        if address:
            host = f"[{address}]" if ":" in address else address  # IPv6
            return f"http://{host}:{PORT}"
    return None


def build_pdb(
    name: str, namespace: str, spec: RerankerSpec, owner: dict[str, Any] | None = None
) -> dict[str, Any] | None:
    """A PodDisruptionBudget (one pod down at a time) when there may be more than one replica
    (spec.replicas, or the autoscaler's maximum); else None."""
    most = spec.autoscaling.max_replicas if spec.autoscaling is not None else spec.desired_replicas
    if most <= 1:
        return None
    obj = {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _metadata(
            name, namespace, labels(name, COMPONENT_SERVER), user_labels=spec.labels
        ),
        "spec": {
            "maxUnavailable": 1,
            "selector": {"matchLabels": selector_labels(name)},
            # A pod that never became ready protects nothing: let node drains evict it.
            "unhealthyPodEvictionPolicy": "AlwaysAllow",
        },
    }
    return _finish(obj, owner)


def build_monitor(
    name: str,
    namespace: str,
    spec: RerankerSpec,
    config: OperatorConfig,
    owner: dict[str, Any] | None = None,
) -> dict[str, Any] | None:
    """The ServiceMonitor (Prometheus Operator) or PodMonitoring (GKE managed Prometheus) that
    scrapes the runtime pods' /metrics, when the operator config asks for one; else None."""
    monitoring = config.monitoring
    if monitoring.kind is None:
        return None
    endpoint = {"port": "http", "path": "/metrics", "interval": monitoring.interval}
    api_version = (
        "monitoring.coreos.com/v1"
        if monitoring.kind == "ServiceMonitor"
        else "monitoring.googleapis.com/v1"
    )
    obj = {
        "apiVersion": api_version,
        "kind": monitoring.kind,
        # The config's labels (what Prometheus selects monitors by) over spec.labels.
        "metadata": _metadata(
            name,
            namespace,
            {**monitoring.labels, **labels(name, COMPONENT_SERVER)},
            user_labels=spec.labels,
        ),
        "spec": {
            # A ServiceMonitor selects the Service (same labels as the pods), a PodMonitoring
            # the pods; both scrape the named container port.
            "selector": {"matchLabels": selector_labels(name)},
            "endpoints": [endpoint],
        },
    }
    return _finish(obj, owner)


def build_hpa(
    name: str,
    namespace: str,
    spec: RerankerSpec,
    owner: dict[str, Any] | None = None,
    config: OperatorConfig | None = None,
) -> dict[str, Any] | None:
    """An autoscaling/v2 HPA on the Deployment when spec.autoscaling is set; else None.

    One metric, never both: with metric Concurrency, the Pods metric `reranker_requests_in_flight`
    (average in-flight requests per pod; needs a custom-metrics adapter such as
    prometheus-adapter); with metric CPU, CPU utilisation (metrics-server only). Mixing them
    would let a missing adapter silently block every scale-down.
    """
    auto = spec.autoscaling
    if auto is None or auto.metric == "External":  # External: the user's autoscaler owns it
        return None
    if auto.metric == "CPU":
        metric: dict[str, Any] = {
            "type": "Resource",
            "resource": {
                "name": "cpu",
                "target": {
                    "type": "Utilization",
                    "averageUtilization": auto.target_cpu_utilization,
                },
            },
        }
    else:
        metric = {
            "type": "Pods",
            "pods": {
                "metric": {"name": (config or OperatorConfig()).autoscaling.concurrency_metric},
                "target": {"type": "AverageValue", "averageValue": str(auto.target_concurrency)},
            },
        }
    obj = {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": _metadata(
            name, namespace, labels(name, COMPONENT_SERVER), user_labels=spec.labels
        ),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
            "minReplicas": auto.min_replicas,
            "maxReplicas": auto.max_replicas,
            "metrics": [metric],
            # Accelerator pods are slow to start: scale down gently, unless the spec says how.
            "behavior": {
                "scaleDown": {
                    "stabilizationWindowSeconds": 300,
                    "policies": [{"type": "Pods", "value": 1, "periodSeconds": 60}],
                },
                **copy.deepcopy(auto.behavior),
            },
        },
    }
    return _finish(obj, owner)


def build_children(
    name: str,
    namespace: str,
    spec: RerankerSpec,
    config: OperatorConfig,
    owner: dict[str, Any] | None = None,
    key: str | None = None,
) -> list[dict[str, Any]]:
    """Every child for `spec` in apply order: [PVC, Job] (Shared mode), Deployment, Service,
    [Ingress], [HTTPRoute], [PDB], [HPA], [monitor]."""
    key = key or engine_key_for(spec, config)
    children: list[dict[str, Any] | None] = []
    if cache_mode(spec, config) == "Shared":
        children += [
            build_engine_cache_pvc(name, namespace, spec, config, owner),
            build_engine_job(name, namespace, spec, config, key, owner),
        ]
    children += [
        build_deployment(name, namespace, spec, config, key, owner),
        build_service(name, namespace, spec, owner),
        build_ingress(name, namespace, spec, owner),
        build_http_route(name, namespace, spec, owner),
        build_pdb(name, namespace, spec, owner),
        build_hpa(name, namespace, spec, owner, config),
        build_monitor(name, namespace, spec, config, owner),
    ]
    return [c for c in children if c is not None]
