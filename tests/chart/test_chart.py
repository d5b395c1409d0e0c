"""The Helm chart, rendered by the real Helm v4 SDK (helm-python-sdk), offline.

Every rendered manifest is checked with kubernetes-validate --strict; the chart's CRD must equal
crds/; the operator config it renders must load with the operator's own loader; RBAC must cover
exactly what the operator's code touches.
"""

from __future__ import annotations

import json
import re
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import helm_python
import jsonschema
import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "reranker-operator"
CRD_FILE = "rerankers.reranker.dev.yaml"
RELEASE = "rr"
NAMESPACE = "reranker-system"
# Oldest supported (Chart.yaml kubeVersion; CRD CEL rules use fieldPath) and newest known.
KUBE_VERSIONS = ["1.28.0", kubernetes_validate.utils.latest_version()]
CONFIG_PATH = "/etc/reranker-operator/config.yaml"


# ------------------------------------------------------------------------------------------------
# helpers


@pytest.fixture(scope="module")
def chart() -> helm_python.Chart:
    with helm_python.Chart.load(CHART) as loaded:
        yield loaded


def render(chart: helm_python.Chart, values: dict[str, Any] | None = None) -> dict[str, str]:
    return chart.render(values or {}, name=RELEASE, namespace=NAMESPACE)


def manifests(rendered: dict[str, str]) -> list[dict[str, Any]]:
    """Every Kubernetes object of a render (NOTES.txt excluded)."""
    objects = []
    for path, text in sorted(rendered.items()):
        if not path.endswith(".yaml"):
            continue
        objects.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return objects


def by_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def one(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = by_kind(objects, kind)
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def operator_role(objects: list[dict[str, Any]]) -> dict[str, Any]:
    """The operator's own ClusterRole (not the ones aggregated into admin, edit and view)."""
    return one([o for o in objects if not o["metadata"]["name"].endswith(
        ("-rerankers-edit", "-rerankers-view"))], "ClusterRole")  # fmt: skip


def operator_config_text(objects: list[dict[str, Any]]) -> str:
    return one(objects, "ConfigMap")["data"]["config.yaml"]


def container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    (c,) = one(objects, "Deployment")["spec"]["template"]["spec"]["containers"]
    return c


def assert_valid(objects: list[dict[str, Any]]) -> None:
    for obj in objects:
        if obj["apiVersion"].startswith("kopf.dev/"):
            # kopf's peering objects: a CRD of the chart, unknown to kubernetes-validate.
            assert set(obj) == {"apiVersion", "kind", "metadata"}
            continue
        for version in KUBE_VERSIONS:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(
                    f"{obj['kind']}/{obj['metadata']['name']} invalid for {version}: {exc.message}"
                    f" at {list(exc.absolute_path)}"
                )


NON_DEFAULT_VALUES: dict[str, Any] = {
    "fullnameOverride": "rr-op",
    "image": {
        "repository": "registry.example.com:5000/mirror/reranker-operator",
        "tag": "0.1.0",
        "digest": "sha256:" + "a" * 64,
        "pullPolicy": "Always",
    },
    "imagePullSecrets": [{"name": "mirror-pull"}],
    "watchNamespaces": ["ml-serving", "search"],
    "logFormat": "text",
    "verbose": True,
    "livenessPort": 9090,
    "livenessProbe": {
        "initialDelaySeconds": 0,
        "periodSeconds": 5,
        "timeoutSeconds": 2,
        "failureThreshold": 6,
    },
    "serviceAccount": {
        "create": True,
        "name": "reranker-op",
        "annotations": {"iam.gke.io/gcp-service-account": "x@y.iam.gserviceaccount.com"},
    },
    "priorityClassName": "system-cluster-critical",
    "podAnnotations": {"prometheus.io/scrape": "false"},
    "podLabels": {"team": "search"},
    "resources": {
        "requests": {"cpu": "50m", "memory": "64Mi"},
        "limits": {"cpu": 1, "memory": "1Gi"},
    },
    "nodeSelector": {"kubernetes.io/os": "linux"},
    "tolerations": [
        {"key": "dedicated", "operator": "Equal", "value": "infra", "effect": "NoSchedule"}
    ],
    "affinity": {
        "nodeAffinity": {
            "preferredDuringSchedulingIgnoredDuringExecution": [
                {
                    "weight": 50,
                    "preference": {
                        "matchExpressions": [
                            {"key": "node-role", "operator": "In", "values": ["infra"]}
                        ]
                    },
                }
            ]
        }
    },
    "runtimeImage": "registry.example.com:5000/mirror/reranker-runtime:0.1.0-trtllm",
    "runtimeImageCPU": "registry.example.com:5000/mirror/reranker-runtime-cpu@sha256:" + "1" * 64,
    "runtimeImagePullPolicy": "Always",
    "runtimeImagePullSecrets": [{"name": "mirror-pull"}],
    "accelerators": {
        # EKS with Karpenter: one more ORed term, a different taint.
        "L4": {
            "nodeSelectorTerms": [
                {
                    "matchExpressions": [
                        {
                            "key": "karpenter.k8s.aws/instance-gpu-name",
                            "operator": "In",
                            "values": ["l4"],
                        }
                    ]
                },
            ],
            "tolerations": [{"key": "gpu", "operator": "Exists"}],
            "runtimeClassName": "nvidia",
        },
        "H200": None,  # falls back to the operator's built-in entry
        "CPU": {"nodeSelector": {"pool": "cpu-inference"}},
    },
    "engineCache": {
        "size": "100Gi",
        "storageClassName": "filestore-rwx",
        "accessMode": "ReadWriteOnce",
        "retention": "Delete",
    },
    "buildJob": {"backoffLimit": 0, "activeDeadlineSeconds": 7200, "ttlSecondsAfterFinished": 0},
    "runtimePodSecurityContext": {
        "runAsNonRoot": True,
        "runAsUser": 2000,
        "fsGroup": 2000,
        "seccompProfile": {"type": "RuntimeDefault"},
    },
    "runtimeTerminationGracePeriodSeconds": 120,
}


# ------------------------------------------------------------------------------------------------
# lint and strict validation


OPENSHIFT_VALUES = yaml.safe_load(
    (REPO / "examples" / "helm" / "openshift-values.yaml").read_text()
)


@pytest.mark.parametrize(
    "values",
    [None, {"watchNamespaces": ["ml"]}, NON_DEFAULT_VALUES, OPENSHIFT_VALUES],
    ids=["defaults", "namespaced", "non-default", "openshift"],
)
def test_lint_has_no_errors(values: dict[str, Any] | None) -> None:
    report = helm_python.lint(CHART, values, strict=False, namespace=NAMESPACE)
    errors = [m for m in report["messages"] if m["severity"] >= 3] + list(report["errors"])
    assert not errors, report
    # Warnings would fail `helm lint --strict`; only info messages (e.g. "icon is recommended").
    assert all(m["severity"] <= 1 for m in report["messages"]), report


@pytest.mark.parametrize(
    "values",
    [
        {},
        {"watchNamespaces": ["ml", "search"]},
        NON_DEFAULT_VALUES,
        {"rbac": {"create": False}, "serviceAccount": {"create": False, "name": "reranker-op"}},
    ],
    ids=["defaults", "namespaced", "non-default", "no-rbac"],
)
def test_every_rendered_manifest_is_valid(chart: helm_python.Chart, values: dict[str, Any]) -> None:
    objects = manifests(render(chart, values))
    assert objects
    assert_valid(objects)


def test_crd_is_valid_for_kubernetes(chart: helm_python.Chart) -> None:
    names = sorted(c["name"] for c in chart.crds)
    assert names == ["crds/kopf-peering.yaml", f"crds/{CRD_FILE}"]
    for crd in chart.crds:
        assert_valid([d for d in yaml.safe_load_all(crd["data"]) if d])


# ------------------------------------------------------------------------------------------------
# defaults: what gets installed


def test_default_render_has_one_resource_per_template(chart: helm_python.Chart) -> None:
    rendered = render(chart)
    kinds = {}
    for path, text in rendered.items():
        if path.endswith(".yaml"):
            docs = [d for d in yaml.safe_load_all(text) if d]
            assert len({d["kind"] for d in docs}) <= 1, path
            for d in docs:
                kinds[d["kind"]] = kinds.get(d["kind"], 0) + 1
    assert kinds == {
        "ServiceAccount": 1,
        "ConfigMap": 1,
        "ClusterRole": 3,  # the operator's, and Rerankers in admin/edit and in view
        "ClusterRoleBinding": 1,
        "Deployment": 1,
    }


def test_rerankers_join_the_default_user_roles(chart: helm_python.Chart) -> None:
    """Namespace editors manage Rerankers and viewers read them, as built-in kinds (and never
    the operator's own rights); off with rbac.aggregateToDefaultRoles."""
    objects = manifests(render(chart))
    assert_valid(objects)
    roles = {r["metadata"]["name"]: r for r in by_kind(objects, "ClusterRole")}
    edit = next(r for n, r in roles.items() if n.endswith("-rerankers-edit"))
    view = next(r for n, r in roles.items() if n.endswith("-rerankers-view"))
    labels = edit["metadata"]["labels"]
    assert labels["rbac.authorization.k8s.io/aggregate-to-edit"] == "true"
    assert labels["rbac.authorization.k8s.io/aggregate-to-admin"] == "true"
    assert view["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-view"] == "true"
    assert grants(rules_of(edit), "reranker.dev", "rerankers") >= {"create", "patch", "delete"}
    assert grants(rules_of(view), "reranker.dev", "rerankers") == {"get", "list", "watch"}
    assert not grants(rules_of(view), "reranker.dev", "rerankers/status") - {"get", "list", "watch"}
    for role in (edit, view):  # Rerankers only: nothing of what the operator itself may do
        assert {g for rule in rules_of(role) for g in rule["apiGroups"]} == {"reranker.dev"}
    off = manifests(render(chart, {"rbac": {"create": True, "aggregateToDefaultRoles": False}}))
    assert len(by_kind(off, "ClusterRole")) == 1


def test_operator_deployment(chart: helm_python.Chart) -> None:
    objects = manifests(render(chart))
    deployment = one(objects, "Deployment")
    spec = deployment["spec"]
    assert spec["replicas"] == 1
    # kopf standalone: never two operators at once.
    assert spec["strategy"] == {"type": "Recreate", "rollingUpdate": None}
    pod = spec["template"]["spec"]
    assert pod["serviceAccountName"] == one(objects, "ServiceAccount")["metadata"]["name"]
    c = container(objects)
    assert c["args"][0] == "run"
    assert f"--config={CONFIG_PATH}" in c["args"]
    assert not any(a.startswith("--namespace") for a in c["args"])  # cluster-wide
    # Liveness on kopf's endpoint, on the port the operator is told to serve it on.
    assert "--liveness-port=8080" in c["args"]
    probe = c["livenessProbe"]["httpGet"]
    assert probe["path"] == "/healthz"
    assert {p["name"]: p["containerPort"] for p in c["ports"]}[probe["port"]] == 8080
    # The config file is the ConfigMap's config.yaml, mounted at the --config path.
    mount = next(m for m in c["volumeMounts"] if m["name"] == "config")
    assert f"{mount['mountPath']}/config.yaml" == CONFIG_PATH and mount["readOnly"] is True
    volume = next(v for v in pod["volumes"] if v["name"] == "config")
    assert volume["configMap"]["name"] == one(objects, "ConfigMap")["metadata"]["name"]
    # A config change rolls the pod.
    assert re.fullmatch(
        r"[0-9a-f]{64}", spec["template"]["metadata"]["annotations"]["checksum/config"]
    )
    for obj in objects:
        if obj["kind"] in ("Deployment", "ConfigMap", "ServiceAccount"):
            assert obj["metadata"]["namespace"] == NAMESPACE


def test_config_checksum_follows_the_config(chart: helm_python.Chart) -> None:
    def checksum(values: dict[str, Any]) -> str:
        deployment = one(manifests(render(chart, values)), "Deployment")
        return deployment["spec"]["template"]["metadata"]["annotations"]["checksum/config"]

    assert checksum({}) == checksum({"verbose": True})
    assert checksum({}) != checksum({"buildJob": {"backoffLimit": 5}})


def test_security_context_is_restricted(chart: helm_python.Chart) -> None:
    objects = manifests(render(chart))
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    c = container(objects)
    psc, sc = pod["securityContext"], c["securityContext"]
    assert psc["runAsNonRoot"] is True and psc["runAsUser"] == 10001
    assert psc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] == 10001
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert "privileged" not in sc and "add" not in sc["capabilities"]
    # Read-only root: /tmp is a writable emptyDir.
    tmp = next(m for m in c["volumeMounts"] if m["mountPath"] == "/tmp")
    assert next(v for v in pod["volumes"] if v["name"] == tmp["name"])["emptyDir"] is not None
    assert not pod.get("hostNetwork") and not pod.get("hostPID") and not pod.get("hostIPC")


def test_openshift_values_leave_the_ids_to_the_cluster(chart: helm_python.Chart) -> None:
    """examples/helm/openshift-values.yaml: no fixed user, group or fsGroup anywhere (OpenShift's
    restricted-v2 SCC assigns them from the namespace's range and refuses pods that name
    others), on the operator pod and on every pod the operator creates; the rest of the
    restricted profile stays."""
    from reranker_operator.builders import build_deployment, build_engine_job, engine_key_for
    from reranker_operator.spec import parse_spec

    objects = manifests(render(chart, OPENSHIFT_VALUES))
    ids = ("runAsUser", "runAsGroup", "fsGroup")
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    config = load_operator_config(operator_config_text(objects))
    reranker = yaml.safe_load((REPO / "examples" / "bge-reranker-large-l4.yaml").read_text())
    spec = parse_spec({**reranker, "spec": {**reranker["spec"], "engineCache": {"mode": "Shared"}}})
    key = engine_key_for(spec, config)
    created = [
        build_deployment("rr", "ml", spec, config, key)["spec"]["template"]["spec"],
        build_engine_job("rr", "ml", spec, config, key)["spec"]["template"]["spec"],
    ]
    for p in [pod, *created]:
        contexts = [p["securityContext"]] + [
            c["securityContext"] for c in p["containers"] + p.get("initContainers", [])
        ]
        for context in contexts:
            assert not set(ids) & set(context), context
            assert context["runAsNonRoot"] is True
        assert p["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = container(objects)["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["capabilities"] == {"drop": ["ALL"]}


def test_image_tag_is_pinned_to_the_package_version(chart: helm_python.Chart) -> None:
    # pyproject.toml is the one source of the version (tests/test_version.py checks the rest).
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert chart.metadata["appVersion"] == version
    assert chart.metadata["version"] == version
    assert chart.values["image"]["tag"] == version
    assert (
        container(manifests(render(chart)))["image"]
        == f"ghcr.io/reranker-dev/reranker-operator:{version}"
    )
    # The runtime image the operator deploys by default carries the same version.
    assert chart.values["runtimeImage"] == f"ghcr.io/reranker-dev/reranker-runtime:{version}"
    assert chart.values["runtimeImageCPU"] == f"ghcr.io/reranker-dev/reranker-runtime-cpu:{version}"


def test_image_digest_is_appended(chart: helm_python.Chart) -> None:
    digest = "sha256:" + "0" * 64
    c = container(manifests(render(chart, {"image": {"digest": digest}})))
    assert c["image"] == f"ghcr.io/reranker-dev/reranker-operator:0.1.0@{digest}"


# ------------------------------------------------------------------------------------------------
# RBAC


def rules_of(obj: dict[str, Any]) -> list[dict[str, Any]]:
    return obj.get("rules") or []


def grants(rules: list[dict[str, Any]], group: str, resource: str) -> set[str]:
    verbs: set[str] = set()
    for rule in rules:
        if group in rule["apiGroups"] and resource in rule["resources"]:
            verbs.update(rule["verbs"])
    return verbs


# Exactly the verbs the operator uses (reconcile.py through kube.py, and kopf: list/watch/patch on
# rerankers, status patches, watches on labelled Jobs and Deployments, Events).
NAMESPACED_GRANTS = {
    ("reranker.dev", "rerankers"): {"get", "list", "watch", "patch"},
    ("reranker.dev", "rerankers/status"): {"patch"},
    ("reranker.dev", "rerankers/finalizers"): {"update"},  # blockOwnerDeletion on children
    ("batch", "jobs"): {"get", "list", "watch", "create", "delete"},
    ("apps", "deployments"): {"get", "list", "watch", "create", "patch"},
    ("", "services"): {"get", "list", "watch", "create", "patch"},
    ("networking.k8s.io", "ingresses"): {"get", "list", "watch", "create", "patch", "delete"},
    ("gateway.networking.k8s.io", "httproutes"): {"get", "create", "patch", "delete"},
    ("", "persistentvolumeclaims"): {"get", "list", "watch", "create", "patch"},
    ("policy", "poddisruptionbudgets"): {"get", "list", "watch", "create", "patch", "delete"},
    ("autoscaling", "horizontalpodautoscalers"): {
        "get",
        "list",
        "watch",
        "create",
        "patch",
        "delete",
    },
    ("", "pods"): {"get", "list", "watch"},
    ("", "events"): {"create", "list"},
}


def assert_least_privilege(
    rules: list[dict[str, Any]], expected: dict[tuple[str, str], set[str]]
) -> None:
    granted: dict[tuple[str, str], set[str]] = {}
    for rule in rules:
        assert (
            "*" not in rule["verbs"]
            and "*" not in rule["resources"]
            and "*" not in rule["apiGroups"]
        )
        assert not rule.get("resourceNames") and not rule.get("nonResourceURLs")
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                granted.setdefault((group, resource), set()).update(rule["verbs"])
    assert granted == expected


def test_cluster_wide_rbac_is_least_privilege(chart: helm_python.Chart) -> None:
    objects = manifests(render(chart))
    role = operator_role(objects)
    expected = dict(NAMESPACED_GRANTS)
    # kopf lists and watches CRDs, never GETs one (kopf/_core/reactor/observation.py).
    expected[("apiextensions.k8s.io", "customresourcedefinitions")] = {"list", "watch"}
    assert_least_privilege(rules_of(role), expected)
    # Never secrets or configmaps: API keys and tokens are referenced by name, never read.
    assert not grants(rules_of(role), "", "secrets") and not grants(
        rules_of(role), "", "configmaps"
    )
    binding = one(objects, "ClusterRoleBinding")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": role["metadata"]["name"],
    }
    sa = one(objects, "ServiceAccount")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": NAMESPACE}
    ]
    assert not by_kind(objects, "Role") and not by_kind(objects, "RoleBinding")


# Kinds the operator touches only when the config asks for them: RBAC follows the same value.
OPT_IN_KINDS = {"ServiceMonitor": "ServiceMonitor", "PodMonitoring": "PodMonitoring"}


def test_rbac_covers_every_kind_the_operator_touches(chart: helm_python.Chart) -> None:
    from reranker_operator import kube as kube

    rules = rules_of(operator_role(manifests(render(chart))))
    for kind_name, kind in kube.KIND_BY_NAME.items():
        group = "" if kind.api_version == "v1" else kind.api_version.split("/")[0]
        if kind_name in OPT_IN_KINDS:
            assert not grants(rules, group, kind.plural), f"{kind_name} granted by default"
            opted = rules_of(
                operator_role(manifests(render(chart, {"monitoring": {"kind": kind_name}})))
            )
            assert grants(opted, group, kind.plural) == {"get", "create", "patch"}
            continue
        assert grants(rules, group, kind.plural), f"no RBAC rule for {group}/{kind.plural}"


@pytest.mark.parametrize("namespaces", [[], ["ml-serving", "search"]], ids=["cluster", "ns"])
def test_two_replicas_run_kopf_peering(chart: helm_python.Chart, namespaces: list[str]) -> None:
    objects = manifests(render(chart, {"replicaCount": 2, "watchNamespaces": namespaces}))
    assert_valid(objects)
    deployment = one(objects, "Deployment")
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["strategy"] == {"type": "Recreate", "rollingUpdate": None}
    fullname = deployment["metadata"]["name"]
    assert f"--peering={fullname}" in container(objects)["args"]
    from reranker_operator.cli import build_parser

    args = build_parser().parse_args(container(objects)["args"])
    assert args.peering == fullname and args.priority is None
    if namespaces:
        peerings = by_kind(objects, "KopfPeering")
        assert sorted(p["metadata"]["namespace"] for p in peerings) == namespaces
        for role in by_kind(objects, "Role"):
            assert grants(rules_of(role), "kopf.dev", "kopfpeerings") == {
                "get", "list", "watch", "patch",
            }  # fmt: skip
    else:
        assert one(objects, "ClusterKopfPeering")["metadata"]["name"] == fullname
        rules = rules_of(operator_role(objects))
        assert grants(rules, "kopf.dev", "clusterkopfpeerings") == {"get", "list", "watch", "patch"}
    # The peering CRDs the objects need ship with the chart.
    peering_crds = next(c for c in chart.crds if c["name"] == "crds/kopf-peering.yaml")
    kinds = {d["spec"]["names"]["kind"] for d in yaml.safe_load_all(peering_crds["data"]) if d}
    assert kinds == {"ClusterKopfPeering", "KopfPeering"}
    # Standby replicas are worth it on other nodes, and through a drain.
    selector = deployment["spec"]["selector"]["matchLabels"]
    pdb = one(objects, "PodDisruptionBudget")
    assert pdb["spec"] == {"minAvailable": 1, "selector": {"matchLabels": selector}}
    (term,) = deployment["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"][
        "preferredDuringSchedulingIgnoredDuringExecution"
    ]
    assert term["podAffinityTerm"]["labelSelector"]["matchLabels"] == selector
    own = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [{"matchExpressions": [
            {"key": "pool", "operator": "In", "values": ["system"]}]}]}}}  # fmt: skip
    mine = one(manifests(render(chart, {"replicaCount": 2, "affinity": own})), "Deployment")
    assert mine["spec"]["template"]["spec"]["affinity"] == own  # yours replaces the chart's


def test_one_replica_runs_standalone(chart: helm_python.Chart) -> None:
    objects = manifests(render(chart))
    assert not by_kind(objects, "PodDisruptionBudget")
    assert "affinity" not in one(objects, "Deployment")["spec"]["template"]["spec"]
    assert not any(o["apiVersion"].startswith("kopf.dev/") for o in objects)
    assert not any(a.startswith("--peering") for a in container(objects)["args"])
    assert not grants(rules_of(operator_role(objects)), "kopf.dev", "clusterkopfpeerings")


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch: an explicit null in the manifest deletes the live field, as in
    the strategic merge patch of Helm's three-way merge (client-side apply)."""
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def test_changing_replica_count_never_switches_the_strategy(chart: helm_python.Chart) -> None:
    """A switch from RollingUpdate to Recreate is refused while the API server's defaulted
    rollingUpdate block is there ("spec.strategy.rollingUpdate: Forbidden: may not be specified
    when strategy `type` is 'Recreate'", helm/helm#5144): every count renders Recreate, with an
    explicit `rollingUpdate: null` that removes the block an earlier chart version left."""
    strategies = []
    for count in (1, 2, 3):
        rendered = render(chart, {"replicaCount": count})
        text = rendered["reranker-operator/templates/deployment.yaml"]
        assert re.search(r"\n  strategy:\n    type: Recreate\n    rollingUpdate: null\n", text)
        deployment = one(manifests(rendered), "Deployment")
        assert_valid([deployment])  # an explicit null passes strict validation
        assert deployment["spec"]["replicas"] == count
        strategies.append(deployment["spec"]["strategy"])
    assert strategies[0] == strategies[1] == strategies[2]
    defaulted = {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": "25%"},
    }
    assert merge_patch(defaulted, strategies[0]) == {"type": "Recreate"}


def test_peering_priority_differs_per_pod() -> None:
    from reranker_operator.runner import peering_priority

    a, b = peering_priority("rr-reranker-operator-5d9c-abcde"), peering_priority("rr-x-fghij")
    assert a != b and a == peering_priority("rr-reranker-operator-5d9c-abcde") and a >= 0


def test_monitoring_config_reaches_the_operator(chart: helm_python.Chart) -> None:
    values = {
        "monitoring": {"kind": "PodMonitoring", "interval": "15s", "labels": {"team": "ml"}},
        "concurrencyMetric": "prometheus.googleapis.com|reranker_requests_in_flight|gauge",
    }
    loaded = load_operator_config(operator_config_text(manifests(render(chart, values))))
    assert loaded.monitoring.kind == "PodMonitoring" and loaded.monitoring.interval == "15s"
    assert loaded.monitoring.labels == {"team": "ml"}
    assert loaded.autoscaling.concurrency_metric == values["concurrencyMetric"]


def test_proxy_config_reaches_the_operator(chart: helm_python.Chart) -> None:
    values = {"proxy": {"httpsProxy": "http://proxy.corp:3128", "noProxy": ".svc,.cluster.local",
                        "caConfigMap": "corp-ca-bundle", "caConfigMapKey": "bundle.pem"}}  # fmt: skip
    loaded = load_operator_config(operator_config_text(manifests(render(chart, values))))
    assert loaded.proxy.https_proxy == "http://proxy.corp:3128" and loaded.proxy.http_proxy is None
    assert loaded.proxy.no_proxy == ".svc,.cluster.local"
    assert (loaded.proxy.ca_config_map, loaded.proxy.ca_config_map_key) == (
        "corp-ca-bundle",
        "bundle.pem",
    )


def _pod_template(objects: list[dict[str, Any]]) -> dict[str, Any]:
    return one(objects, "Deployment")["spec"]["template"]


def test_operator_metrics_port_is_served_and_annotated(chart: helm_python.Chart) -> None:
    objects = manifests(render(chart))
    c = container(objects)
    assert "--metrics-port=8081" in c["args"]
    assert {"name": "metrics", "containerPort": 8081, "protocol": "TCP"} in c["ports"]
    annotations = _pod_template(objects)["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == "8081"
    assert annotations["prometheus.io/path"] == "/metrics"
    assert "checksum/config" in annotations
    # Without monitoring.kind, no scrape object and no Service for it.
    assert not by_kind(objects, "Service") and not by_kind(objects, "ServiceMonitor")


def test_operator_metrics_off(chart: helm_python.Chart) -> None:
    objects = manifests(render(chart, {"metricsPort": 0, "monitoring": {"kind": "ServiceMonitor"}}))
    c = container(objects)
    assert "--metrics-port=0" in c["args"]
    assert [p["name"] for p in c["ports"]] == ["liveness"]
    assert not any(
        k.startswith("prometheus.io/") for k in _pod_template(objects)["metadata"]["annotations"]
    )
    assert not by_kind(objects, "Service") and not by_kind(objects, "ServiceMonitor")


def test_pod_annotations_win_over_the_charts(chart: helm_python.Chart) -> None:
    default = _pod_template(manifests(render(chart)))["metadata"]["annotations"]
    values = {
        "podAnnotations": {
            "prometheus.io/scrape": "false",
            "prometheus.io/path": "",
            "team": "ml",
            "checksum/config": "mine",
        }
    }
    annotations = _pod_template(manifests(render(chart, values)))["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "false" and annotations["team"] == "ml"
    assert annotations["prometheus.io/path"] == ""  # even an empty value is the user's
    assert annotations["prometheus.io/port"] == "8081"
    # The config checksum stays the chart's: it is what rolls the pod on a config change.
    assert annotations["checksum/config"] == default["checksum/config"] != "mine"


@pytest.mark.parametrize("key", ["app.kubernetes.io/name", "app.kubernetes.io/instance"])
def test_pod_labels_may_not_set_the_selector_labels(chart: helm_python.Chart, key: str) -> None:
    """A selector label in podLabels rendered the key twice, or a pod template the Deployment's
    (immutable) selector does not match."""
    with pytest.raises(helm_python.HelmRenderError, match=f"podLabels may not set {key}"):
        render(chart, {"podLabels": {key: "other"}})
    # Other keys, the chart's own included, come once, with the user's value.
    values = {"podLabels": {"team": "ml", "app.kubernetes.io/component": "reranker-operator"}}
    rendered = render(chart, values)
    objects = manifests(rendered)
    assert_valid(objects)
    labels = _pod_template(objects)["metadata"]["labels"]
    assert labels["team"] == "ml" and labels["app.kubernetes.io/component"] == "reranker-operator"
    selector = one(objects, "Deployment")["spec"]["selector"]["matchLabels"]
    assert selector.items() <= labels.items()
    template = rendered["reranker-operator/templates/deployment.yaml"].split("  template:")[1]
    assert template.count("app.kubernetes.io/component:") == 1


def test_metrics_and_liveness_ports_must_differ(chart: helm_python.Chart) -> None:
    with pytest.raises(Exception, match="metricsPort and livenessPort must differ"):
        render(chart, {"metricsPort": 8080})
    render(chart, {"metricsPort": 0, "livenessPort": 8080})  # off: no clash


def test_operator_service_monitor_scrapes_the_operator(chart: helm_python.Chart) -> None:
    values = {
        "monitoring": {"kind": "ServiceMonitor", "interval": "15s", "labels": {"release": "kps"}}
    }
    objects = manifests(render(chart, values))
    service, monitor = one(objects, "Service"), one(objects, "ServiceMonitor")
    kubernetes_validate.validate(service, "1.32.0", strict=True)
    pod_labels = _pod_template(objects)["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    (port,) = service["spec"]["ports"]
    assert port == {"name": "metrics", "port": 8081, "targetPort": "metrics", "protocol": "TCP"}
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "kps"
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    assert monitor["spec"]["endpoints"] == [
        {"port": "metrics", "path": "/metrics", "interval": "15s"}
    ]


def test_operator_pod_monitoring_scrapes_the_operator_pod(chart: helm_python.Chart) -> None:
    objects = manifests(render(chart, {"monitoring": {"kind": "PodMonitoring"}}))
    monitor = one(objects, "PodMonitoring")
    assert monitor["apiVersion"] == "monitoring.googleapis.com/v1"
    pod_labels = _pod_template(objects)["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in container(objects)["ports"]}
    assert not by_kind(objects, "Service")


DNS1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
DNS1035_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
DNS1123_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
LABEL_VALUE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?")
# Kinds whose names may be DNS-1123 subdomains of up to 253 characters; the chart still keeps
# every name within 63 (one rule for all), which a regression past it would break first.
SUBDOMAIN_KINDS = {"ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding", "ConfigMap"}


@pytest.mark.parametrize(
    "release",
    [
        "ml-platform-prod-eu-west1-reranker-stack-operator",  # 49: fullname cut at 63
        "a" * 53,  # Helm's longest release name
        "search-prod-eu-west1-reranker-operator-staging-ab",  # contains the chart name
    ],
)
@pytest.mark.parametrize(
    "values",
    [
        {"monitoring": {"kind": "ServiceMonitor"}, "replicaCount": 2},
        {
            "monitoring": {"kind": "PodMonitoring"},
            "replicaCount": 2,
            "watchNamespaces": ["ml-serving", "n" * 63],
        },
    ],
    ids=["cluster", "namespaced"],
)
def test_long_release_names_give_valid_names(
    chart: helm_python.Chart, release: str, values: dict[str, Any]
) -> None:
    """Names the chart derives by appending a suffix (the metrics Service, the ConfigMap, the
    aggregated ClusterRoles) shorten the full name first: a Service name is a DNS-1035 label of
    at most 63 characters, and a suffix cut off would make two names alike."""
    objects = manifests(chart.render(values, name=release, namespace=NAMESPACE))
    assert_valid([o for o in objects if not o["apiVersion"].startswith("monitoring.")])
    seen = set()
    for obj in objects:
        kind, name = obj["kind"], obj["metadata"]["name"]
        where = f"{kind}/{name} ({len(name)} characters)"
        assert (kind, obj["metadata"].get("namespace"), name) not in seen, where
        seen.add((kind, obj["metadata"].get("namespace"), name))
        assert len(name) <= 63, where
        if kind == "Service":
            assert DNS1035_LABEL.fullmatch(name), where
        elif kind in SUBDOMAIN_KINDS:
            assert DNS1123_SUBDOMAIN.fullmatch(name), where
        else:
            assert DNS1123_LABEL.fullmatch(name), where
        labels = dict(obj["metadata"].get("labels") or {})
        if kind == "Deployment":
            labels.update(obj["spec"]["template"]["metadata"]["labels"])
        for key, value in labels.items():
            assert len(value) <= 63 and LABEL_VALUE.fullmatch(value), f"{where}: {key}={value}"
    # The suffixes survive, and what refers to a name refers to the shortened one.
    names = {o["metadata"]["name"] for o in objects}
    for suffix in ("-config", "-rerankers-edit", "-rerankers-view"):
        assert any(n.endswith(suffix) for n in names), suffix
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    config = next(v for v in pod["volumes"] if v["name"] == "config")["configMap"]["name"]
    assert config == one(objects, "ConfigMap")["metadata"]["name"]
    if values["monitoring"]["kind"] == "ServiceMonitor":
        assert one(objects, "Service")["metadata"]["name"].endswith("-metrics")


# kube.Kube method -> the HTTP verbs (RBAC verbs) it issues.
KUBE_METHOD_VERBS = {
    "get": {"get"},
    "list": {"list"},
    "create": {"create"},
    "create_if_absent": {"get", "create"},
    "patch": {"patch"},
    "delete": {"delete"},
}


def test_rbac_covers_the_operators_direct_api_calls(chart: helm_python.Chart) -> None:
    """A static scan of `self.api.<method>(kube.<KIND>, ...)` calls in the operator: a new call
    needs a new RBAC verb (kmock, which the operator tests run against, enforces no RBAC)."""
    from reranker_operator import kube as kube

    rules = rules_of(operator_role(manifests(render(chart))))
    calls = []
    for source in (REPO / "operator" / "reranker_operator").glob("*.py"):
        for method, kind_name, tail in re.findall(
            r"\.api\.(\w+)\(\s*kube\.([A-Z_]+)\b([^)]*)", source.read_text()
        ):
            if method in KUBE_METHOD_VERBS and hasattr(kube, kind_name):
                calls.append((source.name, method, kind_name, 'subresource="status"' in tail))
    assert calls, "found no API calls to check: did kube.py's interface change?"
    for source, method, kind_name, status in calls:
        kind = getattr(kube, kind_name)
        group = "" if kind.api_version == "v1" else kind.api_version.split("/")[0]
        resource = kind.plural + ("/status" if status else "")
        missing = KUBE_METHOD_VERBS[method] - grants(rules, group, resource)
        assert not missing, (
            f"{source}: api.{method}(kube.{kind_name}) needs {missing} on {group}/{resource}"
        )


def test_watch_namespaces_gives_roles_per_namespace(chart: helm_python.Chart) -> None:
    objects = manifests(render(chart, {"watchNamespaces": ["ml-serving", "search"]}))
    roles, bindings = by_kind(objects, "Role"), by_kind(objects, "RoleBinding")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["ml-serving", "search"]
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["ml-serving", "search"]
    for role in roles:
        assert_least_privilege(rules_of(role), NAMESPACED_GRANTS)
    for binding in bindings:
        assert binding["roleRef"]["kind"] == "Role"
        assert binding["subjects"][0]["namespace"] == NAMESPACE
    # Cluster-scoped reads kopf needs in namespaced mode: CRDs, and namespaces to follow the
    # watched ones (kopf/_core/reactor/observation.py: listed and watched, never one read by
    # name, so no "get"). Nothing namespaced cluster-wide.
    assert_least_privilege(
        rules_of(operator_role(objects)),
        {
            ("apiextensions.k8s.io", "customresourcedefinitions"): {"list", "watch"},
            ("", "namespaces"): {"list", "watch"},
        },
    )
    args = container(objects)["args"]
    assert [a for a in args if a.startswith("--namespace")] == [
        "--namespace=ml-serving",
        "--namespace=search",
    ]


def test_rbac_and_service_account_can_be_disabled(chart: helm_python.Chart) -> None:
    objects = manifests(
        render(
            chart,
            {"rbac": {"create": False}, "serviceAccount": {"create": False, "name": "existing-sa"}},
        )
    )
    assert {o["kind"] for o in objects} == {"ConfigMap", "Deployment"}
    assert (
        one(objects, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"]
        == "existing-sa"
    )


@pytest.mark.parametrize("rbac", [True, False], ids=["rbac", "no-rbac"])
def test_an_existing_service_account_must_be_named(chart: helm_python.Chart, rbac: bool) -> None:
    """Without a name, serviceAccount.create false used to fall back to the namespace's `default`
    ServiceAccount, which every pod of the namespace runs as, and bound the operator's
    (cluster-wide) RBAC to it."""
    values = {"rbac": {"create": rbac}, "serviceAccount": {"create": False}}
    refused = r"serviceAccount\.create is false and serviceAccount\.name is empty"
    with pytest.raises(helm_python.HelmRenderError, match=refused):
        render(chart, values)
    with pytest.raises(helm_python.HelmRenderError, match=refused):
        render(chart, {**values, "serviceAccount": {"create": False, "name": ""}})
    named = {"rbac": {"create": rbac}, "serviceAccount": {"create": False, "name": "default"}}
    objects = manifests(render(chart, named))  # named explicitly: the user's choice
    assert one(objects, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == "default"


def test_non_default_values_reach_the_pod(chart: helm_python.Chart) -> None:
    objects = manifests(render(chart, NON_DEFAULT_VALUES))
    deployment = one(objects, "Deployment")
    assert deployment["metadata"]["name"] == "rr-op"
    pod = deployment["spec"]["template"]["spec"]
    c = container(objects)
    assert (
        c["image"] == "registry.example.com:5000/mirror/reranker-operator:0.1.0@sha256:" + "a" * 64
    )
    assert c["imagePullPolicy"] == "Always"
    assert pod["imagePullSecrets"] == [{"name": "mirror-pull"}]
    assert pod["serviceAccountName"] == "reranker-op"
    assert pod["priorityClassName"] == "system-cluster-critical"
    assert pod["nodeSelector"] == {"kubernetes.io/os": "linux"}
    assert pod["tolerations"] == NON_DEFAULT_VALUES["tolerations"]
    assert pod["affinity"] == NON_DEFAULT_VALUES["affinity"]
    assert c["resources"] == NON_DEFAULT_VALUES["resources"]
    assert deployment["spec"]["template"]["metadata"]["labels"]["team"] == "search"
    assert (
        deployment["spec"]["template"]["metadata"]["annotations"]["prometheus.io/scrape"] == "false"
    )
    assert "--liveness-port=9090" in c["args"] and "--log-format=text" in c["args"]
    assert "--verbose" in c["args"]
    assert c["livenessProbe"]["periodSeconds"] == 5
    assert {p["name"]: p["containerPort"] for p in c["ports"]}["liveness"] == 9090
    sa = one(objects, "ServiceAccount")
    assert sa["metadata"]["annotations"] == NON_DEFAULT_VALUES["serviceAccount"]["annotations"]


# ------------------------------------------------------------------------------------------------
# the operator config file


def load_operator_config(text: str):
    from reranker_operator import config as config

    return config.config_from_dict(yaml.safe_load(text))


def test_default_config_equals_the_operators_built_in_defaults(chart: helm_python.Chart) -> None:
    """The chart's defaults and the operator's built-in defaults are one set of numbers."""
    from reranker_operator import config as config

    loaded = load_operator_config(operator_config_text(manifests(render(chart))))
    assert loaded == config.OperatorConfig()
    assert loaded.runtime_image == config.DEFAULT_RUNTIME_IMAGE
    assert loaded.runtime_image_cpu == config.DEFAULT_RUNTIME_IMAGE_CPU
    assert loaded.placement("CPU").resource_name is None
    assert loaded.placement("L4").resource_name == "nvidia.com/gpu"
    assert loaded.engine_cache.storage_class_name is None


def test_non_default_config_parses_with_the_operators_loader(chart: helm_python.Chart) -> None:
    from reranker_operator import config as config

    loaded = load_operator_config(
        operator_config_text(manifests(render(chart, NON_DEFAULT_VALUES)))
    )
    assert loaded.runtime_image == NON_DEFAULT_VALUES["runtimeImage"]
    assert loaded.runtime_image_cpu == NON_DEFAULT_VALUES["runtimeImageCPU"]
    assert loaded.image_pull_policy == "Always"
    assert loaded.image_pull_secrets == ["mirror-pull"]
    l4 = loaded.placement("L4")
    assert l4.node_selector_terms == NON_DEFAULT_VALUES["accelerators"]["L4"]["nodeSelectorTerms"]
    assert l4.tolerations == [{"key": "gpu", "operator": "Exists"}]
    assert l4.runtime_class_name == "nvidia"
    assert loaded.placement("CPU").runtime_class_name is None
    assert l4.resource_name == "nvidia.com/gpu"  # kept from the chart default (Helm merges maps)
    assert loaded.placement("CPU").node_selector == {"pool": "cpu-inference"}
    assert loaded.placement("CPU").resource_name is None
    # A type set to null falls back to the operator's built-in entry.
    assert loaded.placement("H200") == config.default_accelerators()["H200"]
    assert loaded.engine_cache.size == "100Gi"
    assert loaded.engine_cache.storage_class_name == "filestore-rwx"
    assert loaded.engine_cache.access_mode == "ReadWriteOnce"
    assert loaded.engine_cache.retention == "Delete"
    assert (
        loaded.build_job.backoff_limit,
        loaded.build_job.active_deadline_seconds,
        loaded.build_job.ttl_seconds_after_finished,
    ) == (0, 7200, 0)
    assert loaded.pod_security_context["runAsUser"] == 2000
    assert loaded.termination_grace_period_seconds == 120


def test_deployment_args_parse_with_the_operators_cli(chart: helm_python.Chart) -> None:
    from reranker_operator.cli import build_parser

    for values in ({}, NON_DEFAULT_VALUES):
        args = build_parser().parse_args(container(manifests(render(chart, values)))["args"])
        assert args.command == "run"


# ------------------------------------------------------------------------------------------------
# values.schema.json


@pytest.mark.parametrize(
    "values",
    [
        {"unknownKey": 1},
        {"image": {"tag": "latest"}},
        {"image": {"tag": ""}},
        {"image": {"registry": "docker.io"}},
        {"image": {"pullPolicy": "Sometimes"}},
        {"image": {"digest": "md5:abc"}},
        {"imagePullSecrets": ["name-only"]},
        {"watchNamespaces": "ml"},
        {"watchNamespaces": ["Not_A_Namespace"]},
        {"watchNamespaces": ["ml", "ml"]},
        {"logFormat": "xml"},
        {"verbose": "yes"},
        {"livenessPort": "8080"},
        {"livenessPort": 80},
        {"livenessProbe": {"periodSeconds": 0}},
        {"rbac": {"create": "yes"}},
        {"rbac": {"create": True, "aggregate": True}},
        {"serviceAccount": {"automount": False}},
        {"resources": {"requests": {"cpu": "lots"}}},
        {"resources": {"claims": []}},
        {"nodeSelector": {"a": 1}},
        {"tolerations": [{"key": "x", "operator": "Maybe"}]},
        {"affinity": {"nodeAfinity": {}}},
        {"podSecurityContext": {"runAsUser": "root"}},
        {"podSecurityContext": {"seccompProfile": {"type": "Unconfined"}}},
        {"securityContext": {"capabilities": {"drop": "ALL"}}},
        {"securityContext": {"readOnlyRootFileSystem": True}},
        {"runtimeImage": "ghcr.io/reranker-dev/reranker-runtime"},
        {"runtimeImage": "ghcr.io/reranker-dev/reranker-runtime:latest"},
        {"runtimeImageCPU": "ghcr.io/reranker-dev/reranker-runtime-cpu"},
        {"runtimeImageCPU": ""},
        {"metricsPort": 80},
        {"metricsPort": -1},
        {"proxy": {"httpsProxy": 3128}},
        {"proxy": {"httpsProxy": "proxy.corp:3128"}},
        {"proxy": {"caConfigMap": "Corp_CA"}},
        {"proxy": {"caBundle": "x"}},
        {"metricsPort": "8081"},
        {"runtimeImagePullPolicy": "always"},
        {
            "accelerators": {
                "l4": {"resourceName": "nvidia.com/gpu", "nodeSelectorTerms": [], "tolerations": []}
            }
        },
        {
            "accelerators": {
                "B200": {
                    "resourceName": "nvidia.com/gpu",
                    "nodeSelectorTerms": [],
                    "tolerations": [],
                }
            }
        },
        {"accelerators": {"L4": {"gpuResource": "nvidia.com/gpu"}}},
        {"accelerators": {"L4": {"resourceName": 1}}},
        {
            "accelerators": {
                "L4": {
                    "nodeSelectorTerms": [
                        {"matchExpressions": [{"key": "k", "operator": "Equals"}]}
                    ]
                }
            }
        },
        {"accelerators": {"L4": {"tolerations": [{"effect": "NoExecuteNow"}]}}},
        {"accelerators": []},
        {"engineCache": {"size": "lots"}},
        {"engineCache": {"accessMode": "ReadOnlyMany"}},
        {"engineCache": {"retention": "Keep"}},
        {"engineCache": {"reclaimPolicy": "Retain"}},
        {"buildJob": {"backoffLimit": -1}},
        {"buildJob": {"activeDeadlineSeconds": "1h"}},
        {"buildJob": {"parallelism": 2}},
        {"runtimePodSecurityContext": {"privileged": True}},
        {"runtimeTerminationGracePeriodSeconds": -1},
        {"priorityClassName": 5},
        # Names anchored at both ends: a valid tail does not make "My_Operator" a DNS label.
        {"nameOverride": "My_Operator"},
        {"fullnameOverride": "Reranker_Operator"},
        {"priorityClassName": "High_priority"},
    ],
    ids=lambda v: json.dumps(v, sort_keys=True)[:60],
)
def test_schema_rejects_bad_values(chart: helm_python.Chart, values: dict[str, Any]) -> None:
    with pytest.raises(helm_python.HelmValuesError):
        render(chart, values)


def test_schema_forbids_unknown_keys_at_every_object_level() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())

    def walk(node: Any, where: str) -> None:
        if isinstance(node, dict):
            if node.get("type") == "object" or "properties" in node:
                # Either closed (additionalProperties false) or a typed map (additionalProperties
                # a schema), never open.
                assert (
                    "additionalProperties" in node and node["additionalProperties"] is not True
                ), where
                if where != "properties.global":
                    assert node["additionalProperties"] is False or "properties" not in node, where
            for key, child in node.items():
                walk(child, f"{where}.{key}" if where else key)
        elif isinstance(node, list):
            for i, child in enumerate(node):
                walk(child, f"{where}[{i}]")

    schema_without_global = dict(
        schema, properties={k: v for k, v in schema["properties"].items() if k != "global"}
    )
    walk(schema_without_global, "")
    jsonschema.Draft7Validator.check_schema(schema)
    jsonschema.Draft7Validator(schema).validate(yaml.safe_load((CHART / "values.yaml").read_text()))


def test_schema_accelerator_types_match_the_crd() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    crd = yaml.safe_load((REPO / "crds" / CRD_FILE).read_text())
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    crd_types = spec["properties"]["accelerator"]["properties"]["type"]["enum"]
    assert schema["properties"]["accelerators"]["propertyNames"]["enum"] == crd_types
    assert sorted(yaml.safe_load((CHART / "values.yaml").read_text())["accelerators"]) == sorted(
        crd_types
    )


# ------------------------------------------------------------------------------------------------
# the CRD copy


def test_chart_crd_is_identical_to_the_repository_crd(chart: helm_python.Chart) -> None:
    source = (REPO / "crds" / CRD_FILE).read_bytes()
    assert (CHART / "crds" / CRD_FILE).read_bytes() == source, "run scripts/sync-crd.sh"
    (loaded,) = [c for c in chart.crds if c["name"] == f"crds/{CRD_FILE}"]
    assert loaded["data"] == source.decode()


def test_sync_crd_check_passes() -> None:
    result = subprocess.run(
        ["bash", str(REPO / "scripts" / "sync-crd.sh"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# ------------------------------------------------------------------------------------------------
# documentation: values.yaml comments, NOTES, docs/helm.md


def test_every_value_is_commented() -> None:
    """Every key of values.yaml has a comment right above it, except the entries of structures that
    are documented as a whole (the accelerator map, security contexts, resources)."""
    documented_as_a_whole = {
        "accelerators",
        "podSecurityContext",
        "securityContext",
        "resources",
        "runtimePodSecurityContext",
    }
    lines = (CHART / "values.yaml").read_text().splitlines()
    parents: list[tuple[int, str]] = []
    missing = []
    for i, line in enumerate(lines):
        m = re.match(r"^( *)([A-Za-z][\w.-]*):", line)
        if not m:
            continue
        indent, key = len(m.group(1)), m.group(2)
        while parents and parents[-1][0] >= indent:
            parents.pop()
        path = [p for _, p in parents] + [key]
        parents.append((indent, key))
        if path[0] in documented_as_a_whole and len(path) > 1:
            continue
        if not lines[i - 1].lstrip().startswith("#"):
            missing.append(".".join(path))
    assert not missing, f"values without a comment: {missing}"


def test_notes_show_a_first_reranker(chart: helm_python.Chart) -> None:
    notes = render(chart)["reranker-operator/templates/NOTES.txt"]
    assert "kubectl apply" in notes and "kubectl get rr" in notes
    assert "port-forward" in notes and "/rerank" in notes
    # The inline example is a valid Reranker (validated against the CRD's own schema).
    example = yaml.safe_load(notes.split("<<'YAML'")[1].split("\n", 1)[1].split("  YAML")[0])
    assert example["kind"] == "Reranker"
    crd = yaml.safe_load((REPO / "crds" / CRD_FILE).read_text())
    openapi = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    jsonschema.validate(example["spec"], openapi["properties"]["spec"])
    for ref in re.findall(r"examples/[\w./-]+\.yaml", notes):
        assert (REPO / ref).is_file(), ref
    namespaced = render(chart, {"watchNamespaces": ["ml"]})["reranker-operator/templates/NOTES.txt"]
    assert "kubectl apply -n ml" in namespaced and "kubectl get rr -n ml" in namespaced
    # Every phase on the way to Ready (status.py's Phase), in order.
    phases = re.search(r"phase (Pending -> [\w >-]+ -> Ready)", notes)
    assert phases and phases.group(1) == "Pending -> Building -> Deploying -> Ready", notes
    assert "Degraded" in notes and "Failed" in notes


def notes_of(chart: helm_python.Chart, values: dict[str, Any]) -> str:
    return render(chart, values)["reranker-operator/templates/NOTES.txt"]


def test_notes_warn_while_the_images_are_the_unpublished_defaults(
    chart: helm_python.Chart,
) -> None:
    """The default images (ghcr.io/reranker-dev/...) are not published (docs/helm.md): the notes
    say so first, name each value still pointing there and how to set it."""
    notes = notes_of(chart, {})
    assert notes.startswith("WARNING: unpublished images"), notes[:200]
    warning = notes.split("The reranker operator")[0]
    for value, shown in (
        ("image.repository", "ghcr.io/reranker-dev/reranker-operator"),
        ("runtimeImage", "ghcr.io/reranker-dev/reranker-runtime:0.1.0"),
        ("runtimeImageCPU", "ghcr.io/reranker-dev/reranker-runtime-cpu:0.1.0"),
    ):
        assert f"{value}: {shown}" in warning and f"--set {value}=" in warning, value
    assert "ImagePullBackOff" in warning and f"helm upgrade {RELEASE}" in warning
    assert f"-n {NAMESPACE}" in warning
    # Only what is still unpublished is named.
    mirrored = {"image": {"repository": "registry.example.com/reranker-operator"}}
    partial = notes_of(chart, mirrored).split("The reranker operator")[0]
    assert "WARNING" in partial and "image.repository" not in partial
    assert "runtimeImage: " in partial and "runtimeImageCPU: " in partial
    # All three mirrored (NON_DEFAULT_VALUES): no warning.
    assert notes_of(chart, NON_DEFAULT_VALUES).startswith("The reranker operator")


def test_docs_list_every_value() -> None:
    docs = REPO / "docs" / "helm.md"
    if not docs.is_file():
        pytest.fail("docs/helm.md is missing")
    text = docs.read_text()
    values = yaml.safe_load((CHART / "values.yaml").read_text())

    def leaves(node: Any, prefix: str) -> list[str]:
        if (
            isinstance(node, dict)
            and node
            and prefix.split(".")[0]
            not in {
                "accelerators",
                "podSecurityContext",
                "securityContext",
                "resources",
                "runtimePodSecurityContext",
                "nodeSelector",
                "podAnnotations",
                "podLabels",
                "affinity",
            }
        ):
            return [
                leaf
                for k, v in node.items()
                for leaf in leaves(v, f"{prefix}.{k}" if prefix else k)
            ]
        return [prefix]

    missing = [leaf for leaf in leaves(values, "") if f"`{leaf}`" not in text]
    assert not missing, f"docs/helm.md does not list: {missing}"


# ------------------------------------------------------------------------------------------------
# the operator image


def test_operator_dockerfile_matches_the_chart(chart: helm_python.Chart) -> None:
    dockerfile = (REPO / "images" / "operator.Dockerfile").read_text()
    instructions = [line for line in dockerfile.splitlines() if line and not line.startswith("#")]
    froms = [line.split()[1] for line in instructions if line.startswith("FROM ")]
    assert froms == ["python:3.12-slim"]
    assert '"/src[operator]"' in dockerfile  # the operator extra only (no torch in this image)
    assert "USER 10001:10001" in instructions
    assert 'ENTRYPOINT ["reranker-operator"]' in instructions
    assert 'CMD ["run"]' in instructions
    # The chart's pod runs as the image's user; args start with the image's CMD.
    assert chart.values["securityContext"]["runAsUser"] == 10001
    assert chart.values["podSecurityContext"]["runAsUser"] == 10001
    assert container(manifests(render(chart)))["args"][0] == "run"


def test_the_operator_requires_a_kopf_with_what_it_uses() -> None:
    """runner.py sets settings.watching.label_selectors, which kopf has from 1.45.0 (1.44.6 has
    none): the `operator` extra, which the operator image installs, must not accept older."""
    from packaging.requirements import Requirement

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    (kopf,) = [Requirement(r) for r in extras["operator"] if Requirement(r).name == "kopf"]
    runner = (REPO / "operator" / "reranker_operator" / "runner.py").read_text()
    if "settings.watching.label_selectors" in runner:
        assert not kopf.specifier.contains("1.44.6"), kopf
        assert kopf.specifier.contains("1.45.0"), kopf
    dockerfile = (REPO / "images" / "operator.Dockerfile").read_text()
    assert 'pip install "/src[operator]"' in dockerfile  # the extra's bounds apply in the image
    assert not re.search(r"pip install[^\n]*\bkopf\b", dockerfile)  # no unpinned kopf of its own


def test_network_policy_lets_in_only_scrapes_and_out_only_dns_and_the_api_server(
    chart: helm_python.Chart,
) -> None:
    assert by_kind(manifests(render(chart)), "NetworkPolicy") == []  # opt-in
    monitoring = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "mon"}}}
    values = {"networkPolicy": {"enabled": True, "metricsFrom": [monitoring],
                                "apiServerCIDRs": ["10.0.0.1/32"]}}  # fmt: skip
    objects = manifests(render(chart, values))
    assert_valid(objects)
    policy = one(objects, "NetworkPolicy")["spec"]
    deployment = one(objects, "Deployment")
    assert policy["podSelector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    assert policy["ingress"] == [
        {"ports": [{"port": 8081, "protocol": "TCP"}], "from": [monitoring]}
    ]
    dns, api = policy["egress"]
    assert {p["port"] for p in dns["ports"]} == {53} and "to" not in dns
    assert [p["port"] for p in api["ports"]] == [443, 6443]
    assert api["to"] == [{"ipBlock": {"cidr": "10.0.0.1/32"}}]
    closed = one(manifests(render(chart, {"networkPolicy": {"enabled": True}, "metricsPort": 0})),
                 "NetworkPolicy")  # fmt: skip
    assert closed["spec"]["ingress"] == []


def test_extra_env_and_topology_spread_reach_the_operator_pod(chart: helm_python.Chart) -> None:
    spread = [{"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone",
               "whenUnsatisfiable": "ScheduleAnyway",
               "labelSelector": {"matchLabels": {"app.kubernetes.io/name": "reranker-operator"}}}]  # fmt: skip
    env = [{"name": "HTTPS_PROXY", "value": "http://proxy:3128"}]
    objects = manifests(render(chart, {"extraEnv": env, "topologySpreadConstraints": spread}))
    assert_valid(objects)
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    assert pod["topologySpreadConstraints"] == spread
    names = [e["name"] for e in container(objects)["env"]]
    assert names == ["POD_NAMESPACE", "HOME", "HTTPS_PROXY"]
    with pytest.raises(Exception, match="extraEnv"):
        render(chart, {"extraEnv": [{"name": "HOME", "value": "/root"}]})
