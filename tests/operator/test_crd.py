"""The Reranker CRD: a valid CRD object, a structural schema, examples accepted, bad ones refused.

The openAPIV3Schema is checked with jsonschema, after the API server's defaulting. Its CEL rules
(x-kubernetes-validations) are run by a CEL interpreter (cel-python, with RE2 regexes as
Kubernetes' CEL has them), each on the node it is attached to, as the API server runs them. The
operator enforces the same rules again in code (spec.parse_spec), and a property test checks
that the two refuse exactly the same specs.
"""

from __future__ import annotations

import copy
import functools
import itertools
import re
import typing
from decimal import Decimal
from pathlib import Path
from typing import Any

import celpy
import jsonschema
import kubernetes_validate
import pytest
import yaml
from celpy import celtypes

from reranker_operator import spec as spec_mod
from reranker_operator.spec import QUANTITY_PATTERN, InvalidSpec, parse_spec, quantity_value

ROOT = Path(__file__).resolve().parents[2]
CRD_PATH = ROOT / "crds" / "rerankers.reranker.dev.yaml"
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
BAD_EXAMPLES = sorted((ROOT / "examples" / "bad").glob("*.yaml"))


# ---------------------------------------------------------------- helpers


@functools.lru_cache(maxsize=1)
def _crd_text() -> str:
    return CRD_PATH.read_text()


def load_crd() -> dict[str, Any]:
    return yaml.load(_crd_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def crd_schema(crd: dict[str, Any]) -> dict[str, Any]:
    (version,) = crd["spec"]["versions"]
    return version["schema"]["openAPIV3Schema"]


def strip_k8s_extensions(node: Any) -> Any:
    """The schema as plain JSON Schema: x-kubernetes-* keys dropped."""
    if isinstance(node, dict):
        return {
            k: strip_k8s_extensions(v) for k, v in node.items() if not k.startswith("x-kubernetes-")
        }
    if isinstance(node, list):
        return [strip_k8s_extensions(v) for v in node]
    return node


def apply_defaults(schema: dict[str, Any], obj: Any) -> Any:
    """Structural-schema defaulting as the API server does it (defaults, then recurse)."""
    if isinstance(obj, dict) and "properties" in schema:
        for key, sub in schema["properties"].items():
            if key not in obj and "default" in sub:
                obj[key] = copy.deepcopy(sub["default"])
            if key in obj:
                obj[key] = apply_defaults(sub, obj[key])
    elif isinstance(obj, list) and "items" in schema:
        return [apply_defaults(schema["items"], item) for item in obj]
    return obj


@functools.lru_cache(maxsize=1)
def validator() -> jsonschema.Validator:
    return jsonschema.Draft202012Validator(strip_k8s_extensions(crd_schema(load_crd())))


def schema_errors(obj: dict[str, Any]) -> list[str]:
    return [f"{'.'.join(map(str, e.path))}: {e.message}" for e in validator().iter_errors(obj)]


def defaulted(obj: dict[str, Any]) -> dict[str, Any]:
    return apply_defaults(_cached_schema(), copy.deepcopy(obj))


def cel_rules(crd: dict[str, Any]) -> list[str]:
    rules: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            rules.extend(r["rule"] for r in node.get("x-kubernetes-validations", []))
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(crd_schema(crd))
    return rules


@functools.cache
def _cached_schema() -> dict[str, Any]:
    """The CRD's openAPIV3Schema, parsed once: only read, never changed."""
    return crd_schema(load_crd())


def _compile_cel(rule: str) -> celpy.Runner:
    env = celpy.Environment()
    return env.program(env.compile(rule))


# Compiled once, when the module loads: compiling raises the recursion limit (lark), which
# hypothesis warns about when it happens inside a test.
CEL_PROGRAMS = {rule: _compile_cel(rule) for rule in cel_rules(load_crd())}


def cel_errors(obj: dict[str, Any]) -> list[str]:
    """The CRD's CEL rules run as the API server runs them, on an object after defaulting: each
    rule on every node of the object it is attached to, with `self` bound to that node. Returns
    `path: message` for every rule that evaluates to false. An evaluation error (which the API
    server would also refuse) raises, failing the test loudly. No rule sits under
    additionalProperties, so the walk follows properties and items only."""
    errors: list[str] = []

    def walk(schema: dict[str, Any], value: Any, path: str) -> None:
        for validation in schema.get("x-kubernetes-validations", []):
            result = CEL_PROGRAMS[validation["rule"]].evaluate({"self": value})
            if not (isinstance(result, celtypes.BoolType) and bool(result)):
                where = f"{path or '<object>'}{validation.get('fieldPath', '')}"
                errors.append(f"{where}: {validation['message']}")
        if isinstance(value, dict):
            for key, sub in (schema.get("properties") or {}).items():
                if key in value:
                    walk(sub, value[key], f"{path}.{key}" if path else key)
        elif isinstance(value, list) and "items" in schema:
            for i, item in enumerate(value):
                walk(schema["items"], item, f"{path}[{i}]")

    walk(_cached_schema(), celpy.json_to_cel(obj), "")
    return errors


def reranker(spec: dict[str, Any], name: str = "rr-test") -> dict[str, Any]:
    return {
        "apiVersion": "reranker.dev/v1alpha1",
        "kind": "Reranker",
        "metadata": {"name": name},
        "spec": spec,
    }


MINIMAL = {"checkpoint": {"repo": "BAAI/bge-reranker-large"}}


# ---------------------------------------------------------------- the CRD object


def test_crd_passes_kubernetes_validate_strict() -> None:
    kubernetes_validate.validate(load_crd(), "1.32.0", strict=True)


def test_crd_names_scope_subresources_and_columns() -> None:
    crd = load_crd()
    assert crd["metadata"]["name"] == "rerankers.reranker.dev"
    spec = crd["spec"]
    assert spec["group"] == "reranker.dev" and spec["scope"] == "Namespaced"
    assert spec["names"]["kind"] == "Reranker" and spec["names"]["shortNames"] == ["rr"]
    (version,) = spec["versions"]
    assert version["name"] == "v1alpha1" and version["served"] and version["storage"]
    assert version["subresources"]["status"] == {}
    assert version["subresources"]["scale"] == {
        "specReplicasPath": ".spec.replicas",
        "statusReplicasPath": ".status.replicas",
        "labelSelectorPath": ".status.selector",
    }
    default_columns = [
        c["name"] for c in version["additionalPrinterColumns"] if not c.get("priority")
    ]
    assert default_columns == ["Ready", "Phase", "Accelerator", "Engine", "Replicas", "Age"]
    wide = [c["name"] for c in version["additionalPrinterColumns"] if c.get("priority") == 1]
    assert wide == ["Model", "Revision", "Endpoint", "External", "Message"]


def _walk_schema(
    node: dict[str, Any], path: str = ""
) -> typing.Iterator[tuple[str, dict[str, Any]]]:
    yield path, node
    for key, sub in (node.get("properties") or {}).items():
        yield from _walk_schema(sub, f"{path}.{key}")
    if "items" in node:
        yield from _walk_schema(node["items"], f"{path}[]")


# Kubernetes' own Affinity, TopologySpreadConstraint and Volume, passed through to the pods, and
# the HPA's behavior (the API server validates them on the Deployment and the HPA); nothing else
# keeps unknown fields.
PASSED_THROUGH = {
    ".spec.pod.affinity",
    ".spec.pod.topologySpreadConstraints[]",
    ".spec.runtime.volumes[]",
    ".spec.autoscaling.behavior",
}


def test_schema_is_structural_and_prunes_nothing_we_write() -> None:
    kept = set()
    for path, node in _walk_schema(crd_schema(load_crd())):
        assert "type" in node or node.get("x-kubernetes-int-or-string"), f"{path} has no type"
        # kopf's progress belongs in annotations, never in a catch-all status.
        if node.get("x-kubernetes-preserve-unknown-fields"):
            kept.add(path)
    assert kept == PASSED_THROUGH


def test_junctors_are_structural() -> None:
    """The API server's structural-schema rule for logical junctors: inside anyOf/allOf/oneOf/not
    no `type` (nor any other structure) may appear, except int-or-string's exact
    `anyOf: [{type: integer}, {type: string}]`; value checks (pattern, minimum) go beside it.
    A CRD breaking it is refused on install: nothing else would notice."""
    int_or_string = [{"type": "integer"}, {"type": "string"}]
    for path, node in _walk_schema(crd_schema(load_crd())):
        for junctor in ("allOf", "oneOf", "not"):
            assert junctor not in node, f"{path}: {junctor} (not used here; check its rules)"
        if "anyOf" in node:
            assert node.get("x-kubernetes-int-or-string") is True, path
            assert node["anyOf"] == int_or_string, f"{path}: anyOf must be exactly {int_or_string}"


def test_status_schema_declares_what_the_operator_writes() -> None:
    status = {
        "phase": "Degraded",
        "message": "engine build failed; the previous engine keeps serving",
        "observedGeneration": 3,
        "endpoint": "http://rr.default.svc.cluster.local:8080",
        "replicas": 2,
        "readyReplicas": 2,
        "selector": "app.kubernetes.io/name=reranker,app.kubernetes.io/instance=rr",
        "engine": {
            "key": "a" * 64,
            "shortKey": "a" * 10,
            "jobName": "rr-engine-aaaaaaaaaa",
            "image": "ghcr.io/reranker-dev/reranker-runtime:0.1.0",
            "builtAt": "2025-01-01T00:00:00Z",
            "servingKey": "b" * 64,
        },
        "conditions": [
            {
                "type": t,
                "status": "False",
                "reason": "BuildFailed",
                "message": "OOMKilled",
                "lastTransitionTime": "2025-01-01T00:00:00Z",
                "observedGeneration": 3,
            }
            for t in ("EngineReady", "Available", "Ready")
        ],
    }
    status_schema = crd_schema(load_crd())["properties"]["status"]
    declared = set(status_schema["properties"])
    assert set(status) <= declared
    assert set(status["engine"]) <= set(status_schema["properties"]["engine"]["properties"])
    assert status_schema["properties"]["phase"]["enum"] == [
        "Pending",
        "Building",
        "Deploying",
        "Ready",
        "Degraded",
        "Failed",
    ]
    assert schema_errors({**reranker(MINIMAL), "status": status}) == []
    bad = copy.deepcopy(status)
    bad["conditions"][0]["reason"] = "not camel case!"
    assert schema_errors({**reranker(MINIMAL), "status": bad})


def test_spec_model_enums_match_the_crd() -> None:
    props = crd_schema(load_crd())["properties"]["spec"]["properties"]
    pairs = [
        (spec_mod.Source, props["checkpoint"]["properties"]["source"]),
        (spec_mod.Quantization, props["build"]["properties"]["quantization"]),
        (spec_mod.AcceleratorType, props["accelerator"]["properties"]["type"]),
        (spec_mod.AccessMode, props["engineCache"]["properties"]["accessMode"]),
        (spec_mod.Retention, props["engineCache"]["properties"]["retention"]),
        (spec_mod.AutoscalingMetric, props["autoscaling"]["properties"]["metric"]),
        (spec_mod.ServiceType, props["service"]["properties"]["type"]),
    ]
    for literal, node in pairs:
        assert list(typing.get_args(literal)) == node["enum"]


# ---------------------------------------------------------------- defaults


def test_crd_defaults_match_the_spec_model() -> None:
    obj = defaulted(reranker(MINIMAL))
    spec = obj["spec"]
    assert spec["checkpoint"] == {
        "repo": "BAAI/bge-reranker-large",
        "revision": "main",
        "source": "HF",
    }
    assert spec["build"] == {"quantization": "no_quant", "maxNumTokens": 16384}
    assert spec["accelerator"] == {"type": "L4", "count": 1}
    assert spec["resources"] == {"cpu": "1", "memory": "10Gi"}
    assert spec["runtime"] == {"autoTruncate": True, "grpc": False}
    assert spec["service"] == {"type": "ClusterIP"} and "ingress" not in spec
    assert spec["rollout"] == {"maxSurge": 1, "maxUnavailable": 0}
    assert (
        "replicas" not in spec and "autoscaling" not in spec
    )  # no default may trip replicas XOR autoscaling
    assert schema_errors(obj) == []
    # Defaulting in code (the emulator does none) gives what the API server's defaulting gives.
    assert parse_spec(obj) == parse_spec(reranker(MINIMAL))


def test_autoscaling_defaults_do_not_trip_the_exclusivity_rule() -> None:
    obj = defaulted(reranker({**MINIMAL, "autoscaling": {"maxReplicas": 3}}))
    assert obj["spec"]["autoscaling"] == {
        "minReplicas": 1,
        "maxReplicas": 3,
        "metric": "Concurrency",
        "targetConcurrency": 16,
        "targetCPUUtilization": 70,
    }
    assert "replicas" not in obj["spec"]
    assert parse_spec(obj).autoscaling is not None


# ---------------------------------------------------------------- examples


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_validates(path: Path) -> None:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert docs
    for obj in docs:
        assert schema_errors(obj) == []
        assert schema_errors(defaulted(obj)) == []
        assert cel_errors(defaulted(obj)) == []
        parse_spec(obj)
        assert parse_spec(defaulted(obj)) == parse_spec(obj)


# file -> (refused by the schema itself, or by a CEL rule; the field spec.py names)
BAD = {
    "unknown-quantization.yaml": ("schema", "spec.build.quantization"),
    "negative-max-num-tokens.yaml": ("schema", "spec.build.maxNumTokens"),
    "replicas-and-autoscaling.yaml": ("cel", "spec"),
    "fp8-on-t4.yaml": ("cel", "spec.build.quantization"),
    "fp4.yaml": ("cel", "spec.build.quantization"),
    "cpu-gpu-count.yaml": ("cel", "spec.accelerator.count"),
    "multi-gpu.yaml": ("cel", "spec.accelerator.count"),
    "max-seq-len-over-budget.yaml": ("cel", "spec.build.maxSeqLen"),
    "pvc-path-escapes.yaml": ("cel", "spec.checkpoint.repo"),
}


def test_every_bad_example_is_listed() -> None:
    assert sorted(p.name for p in BAD_EXAMPLES) == sorted(BAD)


@pytest.mark.parametrize("path", BAD_EXAMPLES, ids=lambda p: p.name)
def test_bad_example_is_refused(path: Path) -> None:
    layer, field = BAD[path.name]
    obj = yaml.safe_load(path.read_text())
    if layer == "schema":
        assert schema_errors(obj), "the openAPIV3Schema should refuse it"
    else:
        assert schema_errors(defaulted(obj)) == [], "only the CEL rule should refuse it"
        assert cel_errors(defaulted(obj)), "the CEL rules should refuse it"
    with pytest.raises(InvalidSpec) as exc:
        parse_spec(obj)
    assert exc.value.field == field


# ---------------------------------------------------------------- CEL rules, mirrored in spec.py

# (case, spec, field parse_spec names, a fragment of the CRD rule that covers it)
CEL_CASES = [
    ("replicas-and-autoscaling", {**MINIMAL, "replicas": 2, "autoscaling": {"maxReplicas": 3}}, "spec",
     "!(has(self.replicas) && has(self.autoscaling))"),
    ("fp8-on-a100", {**MINIMAL, "build": {"quantization": "fp8"}, "accelerator": {"type": "A100"}},
     "spec.build.quantization", "self.accelerator.type in ['L4', 'H100', 'H200']"),
    ("fp8-on-a10g", {**MINIMAL, "build": {"quantization": "fp8"}, "accelerator": {"type": "A10G"}},
     "spec.build.quantization", "self.accelerator.type in ['L4', 'H100', 'H200']"),
    ("fp4-on-h200", {**MINIMAL, "build": {"quantization": "fp4"}, "accelerator": {"type": "H200"}},
     "spec.build.quantization", "self.build.quantization != 'fp4'"),
    ("quantization-on-cpu", {**MINIMAL, "build": {"quantization": "fp8"}, "accelerator": {"type": "CPU"}},
     "spec.build.quantization", "self.build.quantization == 'no_quant'"),
    ("count-on-cpu", {**MINIMAL, "accelerator": {"type": "CPU", "count": 2}}, "spec.accelerator.count",
     "!has(self.count) || self.count == 1"),
    ("multi-gpu", {**MINIMAL, "accelerator": {"type": "H100", "count": 2}}, "spec.accelerator.count",
     "!has(self.count) || self.count == 1"),
    ("seq-len-over-budget", {**MINIMAL, "build": {"maxNumTokens": 512, "maxSeqLen": 1024}},
     "spec.build.maxSeqLen", "self.maxSeqLen <= "),
    ("seq-len-over-default-budget", {**MINIMAL, "build": {"maxSeqLen": 20000}}, "spec.build.maxSeqLen",
     "self.maxSeqLen <= "),
    ("min-over-max", {**MINIMAL, "autoscaling": {"minReplicas": 5, "maxReplicas": 2}},
     "spec.autoscaling.minReplicas", "<= self.maxReplicas"),
    ("batch-tokens-under-seq-len", {**MINIMAL, "build": {"maxSeqLen": 1024}, "runtime": {"maxBatchTokens": 512}},
     "spec.runtime.maxBatchTokens", "self.runtime.maxBatchTokens >= self.build.maxSeqLen"),
    ("pvc-without-claim", {"checkpoint": {"repo": "models/bge", "source": "PVC"}},
     "spec.checkpoint.repo", "self.source != 'PVC' || (self.repo.matches("),
    ("pvc-claim-not-dns", {"checkpoint": {"repo": "pvc://Models/bge", "source": "PVC"}},
     "spec.checkpoint.repo", "self.source != 'PVC' || (self.repo.matches("),
    ("pvc-url-on-hf", {"checkpoint": {"repo": "pvc://models/bge"}},
     "spec.checkpoint.source", "self.source == 'PVC' || !self.repo.startsWith('pvc://')"),
    ("revision-on-a-volume", {"checkpoint": {"repo": "pvc://models/bge", "source": "PVC", "revision": "v2"}},
     "spec.checkpoint.revision", "self.revision == 'main'"),
    ("resource-name-on-cpu", {**MINIMAL, "accelerator": {"type": "CPU", "resourceName": "nvidia.com/gpu"}},
     "spec.accelerator.resourceName", "self.type != 'CPU'"),
    ("source-ranges-on-cluster-ip", {**MINIMAL, "service": {"loadBalancerSourceRanges": ["10.0.0.0/8"]}},
     "spec.service.loadBalancerSourceRanges", "self.type == 'LoadBalancer'"),
    ("revision-on-s3", {"checkpoint": {"repo": "s3://b/bge", "source": "S3", "revision": "v2"}},
     "spec.checkpoint.revision", "self.revision == 'main'"),
    ("endpoint-on-gcs", {"checkpoint": {"repo": "gs://b/bge", "source": "GCS", "endpoint": "https://gcs.corp"}},
     "spec.checkpoint.endpoint", "self.source in ['HF', 'S3']"),
    ("unpinned-plain-http", {"checkpoint": {"repo": "http://x/m.tar.gz", "source": "REMOTE_URL"}},
     "spec.checkpoint.revision", "self.revision.matches('^sha256:"),
    ("endpoint-on-a-url", {"checkpoint": {"repo": "https://x/m.tar.gz", "source": "REMOTE_URL",
        "endpoint": "https://mirror.corp"}}, "spec.checkpoint.endpoint", "self.source in ['HF', 'S3']"),
    ("env-value-and-value-from", {**MINIMAL, "runtime": {"env": [{"name": "A", "value": "1",
        "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}]}},
     "spec.runtime.env[0].valueFrom", "!(has(self.value) && has(self.valueFrom))"),
    ("env-two-sources", {**MINIMAL, "runtime": {"env": [{"name": "A", "valueFrom": {
        "fieldRef": {"fieldPath": "metadata.name"}, "secretKeyRef": {"name": "s", "key": "k"}}}]}},
     "spec.runtime.env[0].valueFrom", "(has(self.secretKeyRef) ? 1 : 0)"),
    ("env-no-source", {**MINIMAL, "runtime": {"env": [{"name": "X"}, {"name": "A", "valueFrom": {}}]}},
     "spec.runtime.env[1].valueFrom", "(has(self.secretKeyRef) ? 1 : 0)"),
    ("env-cpu-divisor", {**MINIMAL, "runtime": {"env": [{"name": "A", "valueFrom": {
        "resourceFieldRef": {"resource": "limits.cpu", "divisor": "100m"}}}]}},
     "spec.runtime.env[0].valueFrom.resourceFieldRef.divisor", "string(self.divisor) in"),
    ("env-memory-divisor", {**MINIMAL, "runtime": {"env": [{"name": "A", "valueFrom": {
        "resourceFieldRef": {"resource": "requests.memory", "divisor": -1}}}]}},
     "spec.runtime.env[0].valueFrom.resourceFieldRef.divisor", "string(self.divisor) in"),
    ("env-memory-divisor-in-m", {**MINIMAL, "runtime": {"env": [{"name": "A", "valueFrom": {
        "resourceFieldRef": {"resource": "limits.hugepages-2Mi", "divisor": "1m"}}}]}},
     "spec.runtime.env[0].valueFrom.resourceFieldRef.divisor", "string(self.divisor) in"),
]  # fmt: skip


@pytest.mark.parametrize("case,spec,field,rule", CEL_CASES, ids=[c[0] for c in CEL_CASES])
def test_cel_rule_is_in_the_crd_and_enforced_in_code(
    case: str, spec: dict, field: str, rule: str
) -> None:
    (validation,) = [v for v in _all_validations(load_crd()) if rule in v["rule"]]
    assert schema_errors(defaulted(reranker(spec))) == []  # jsonschema alone lets it through
    # The API server refuses it with that rule's message; the operator refuses it too.
    assert [e for e in cel_errors(defaulted(reranker(spec))) if validation["message"] in e]
    with pytest.raises(InvalidSpec) as exc:
        parse_spec(reranker(spec))
    assert exc.value.field == field
    assert exc.value.message


@pytest.mark.parametrize(
    "spec",
    [
        {**MINIMAL, "build": {"quantization": "fp8"}, "accelerator": {"type": t}}
        for t in ("L4", "H100", "H200")
    ]
    + [
        {**MINIMAL, "accelerator": {"type": "CPU", "count": 1}},
        {**MINIMAL, "build": {"maxNumTokens": 512, "maxSeqLen": 512}},
        {**MINIMAL, "autoscaling": {"minReplicas": 3, "maxReplicas": 3}},
        {**MINIMAL, "replicas": 0},
        {"checkpoint": {"repo": "pvc://models", "source": "PVC"}},
        {"checkpoint": {"repo": "pvc://models.team-a/BAAI/bge-reranker-large/", "source": "PVC"}},
        {"checkpoint": {"repo": "BAAI/bge-reranker-large", "revision": "v2"}},
        {**MINIMAL, "service": {"type": "LoadBalancer", "loadBalancerSourceRanges": ["10.0.0.0/8", "fd00::/8"]}},
        {**MINIMAL, "rollout": {"maxSurge": 0, "maxUnavailable": 1}},
        {**MINIMAL, "accelerator": {"type": "H100", "resourceName": "nvidia.com/mig-1g.10gb"}},
        {**MINIMAL, "accelerator": {"type": "L4", "resourceName": "nvidia.com/gpu.shared"}},
        {**MINIMAL, "rollout": {"maxSurge": "25%", "maxUnavailable": "10%"}},
        {**MINIMAL, "pod": {"imagePullSecrets": ["regcred"], "schedulerName": "volcano"}},
        {**MINIMAL, "ingress": {"host": "*.rerank.example.com", "path": "/v1/rerank", "className": "nginx"}},
        {**MINIMAL, "ingress": {"host": "localhost", "path": "/.well-known/..x/a-b_c~/"}},
        {**MINIMAL, "httpRoute": {"parentRefs": [{"name": "gw", "namespace": "gateway-system",
                                                  "sectionName": "https"},
                                                 {"name": "gw", "namespace": "gateway-system",
                                                  "sectionName": "http"}],
                                  "path": "/v1/rerank;x=1:@!$&'()*+,~",
                                  "hostnames": ["rerank.example.com", "*.example.com"]}},
        {**MINIMAL, "service": {"type": "LoadBalancer", "loadBalancerSourceRanges": ["0.0.0.0/0", "::/0", "2001:db8::/32"]}},
        {**MINIMAL, "runtime": {"env": [
            {"name": "EMPTY"},
            {"name": "PLAIN", "value": ""},
            {"name": "OTEL_EXPORTER_OTLP_HEADERS", "valueFrom": {"secretKeyRef": {"name": "otel", "key": "headers", "optional": True}}},
            {"name": "REGION", "valueFrom": {"configMapKeyRef": {"name": "cluster-info.v1", "key": "REGION_NAME"}}},
            {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name", "apiVersion": "v1"}}},
            {"name": "TEAM", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app.kubernetes.io/part-of']"}}},
            {"name": "HOST_IPS", "valueFrom": {"fieldRef": {"fieldPath": "status.hostIPs"}}},
            {"name": "MEMORY_MIB", "valueFrom": {"resourceFieldRef": {"resource": "limits.memory", "divisor": "1Mi"}}},
            {"name": "CPUS", "valueFrom": {"resourceFieldRef": {"resource": "requests.cpu", "divisor": 1}}},
            {"name": "HUGE", "valueFrom": {"resourceFieldRef": {"resource": "limits.hugepages-2Mi"}}},
            {"name": "MILLICPUS", "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu", "divisor": "1m"}}},
            {"name": "DISK_GIB", "valueFrom": {"resourceFieldRef": {"resource": "requests.ephemeral-storage", "divisor": "1Gi"}}},
            {"name": "OWNER", "valueFrom": {"fieldRef": {"fieldPath": "metadata.annotations['example.com/owner.v2']"}}},
            {"name": "DOTTED", "valueFrom": {"secretKeyRef": {"name": "s", "key": ".env"}}},
        ]}},
    ],
)  # fmt: skip
def test_possible_combinations_are_accepted(spec: dict) -> None:
    assert schema_errors(defaulted(reranker(spec))) == []
    assert cel_errors(defaulted(reranker(spec))) == []
    parse_spec(reranker(spec))


def test_fp4_message_names_blackwell() -> None:
    with pytest.raises(InvalidSpec, match="Blackwell"):
        parse_spec(reranker({**MINIMAL, "build": {"quantization": "fp4"}}))
    assert any("Blackwell" in r.get("message", "") for r in _all_validations(load_crd()))


def _all_validations(crd: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            out.extend(node.get("x-kubernetes-validations", []))
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(crd_schema(crd))
    return out


@pytest.mark.parametrize("name", ["9lives", "Upper", "a" * 64, "dots.not.allowed", "trailing-"])
def test_name_must_be_a_dns1035_label(name: str) -> None:
    assert cel_errors(defaulted(reranker(MINIMAL, name=name)))
    with pytest.raises(InvalidSpec) as exc:
        parse_spec(reranker(MINIMAL, name=name))
    assert exc.value.field == "metadata.name"


@pytest.mark.parametrize("name", ["a", "rr-1", "a" * 63, "bge-reranker-large"])
def test_dns1035_names_are_accepted(name: str) -> None:
    assert cel_errors(defaulted(reranker(MINIMAL, name=name))) == []
    parse_spec(reranker(MINIMAL, name=name))


def test_every_cel_rule_compiles() -> None:
    assert len(CEL_PROGRAMS) == len(cel_rules(load_crd())) == 19  # each compiled at import


def test_exposure_patterns_are_the_operators() -> None:
    props = crd_schema(load_crd())["properties"]["spec"]["properties"]
    ingress, service = props["ingress"]["properties"], props["service"]["properties"]
    assert ingress["host"]["pattern"] == spec_mod.HOST_PATTERN
    assert ingress["path"]["pattern"] == spec_mod.INGRESS_PATH_PATTERN
    route = props["httpRoute"]["properties"]
    assert route["hostnames"]["items"]["pattern"] == spec_mod.HOST_PATTERN
    assert route["path"]["pattern"] == spec_mod.ROUTE_PATH_PATTERN
    assert service["loadBalancerSourceRanges"]["items"]["pattern"] == spec_mod.CIDR_PATTERN
    checkpoint = props["checkpoint"]["properties"]
    assert checkpoint["endpoint"]["pattern"] == spec_mod.ENDPOINT_PATTERN


@pytest.mark.parametrize(
    "endpoint",
    ["https://user:pw@mirror.corp", "ftp://mirror.corp", "https://mirror.corp/api?x=1",
     "https://mirror.corp/#a", "https://", "mirror.corp", "https://mirror corp"],
)  # fmt: skip
def test_checkpoint_endpoint_is_a_plain_http_url(endpoint: str) -> None:
    obj = reranker({"checkpoint": {"repo": "BAAI/bge-reranker-large", "endpoint": endpoint}})
    assert schema_errors(obj), "the CRD schema should refuse it too"
    with pytest.raises(InvalidSpec) as exc:
        parse_spec(obj)
    assert exc.value.field == "spec.checkpoint.endpoint"


@pytest.mark.parametrize(
    "checkpoint",
    [{"repo": "BAAI/bge-reranker-large", "endpoint": "https://artifactory.corp/api/huggingfaceml/hf"},
     {"repo": "s3://models/bge", "source": "S3", "endpoint": "http://minio.minio.svc:9000"}],
)  # fmt: skip
def test_checkpoint_endpoint_is_accepted_for_hf_and_s3(checkpoint: dict[str, str]) -> None:
    obj = defaulted(reranker({"checkpoint": checkpoint}))
    assert schema_errors(obj) == [] and cel_errors(obj) == []
    assert parse_spec(obj).checkpoint.endpoint == checkpoint["endpoint"]


def test_env_source_patterns_are_the_operators() -> None:
    props = crd_schema(load_crd())["properties"]["spec"]["properties"]["runtime"]["properties"]
    sources = props["env"]["items"]["properties"]["valueFrom"]["properties"]
    for ref in ("secretKeyRef", "configMapKeyRef"):
        assert sources[ref]["properties"]["name"]["pattern"] == spec_mod.SECRET_NAME_PATTERN
        assert sources[ref]["properties"]["key"]["pattern"] == spec_mod.CONFIG_KEY_PATTERN
    field_path = sources["fieldRef"]["properties"]["fieldPath"]["pattern"]
    assert field_path == spec_mod.ENV_FIELD_PATH_PATTERN
    assert (
        sources["fieldRef"]["properties"]["fieldPath"]["maxLength"] == spec_mod.ENV_FIELD_PATH_MAX
    )
    resource = sources["resourceFieldRef"]["properties"]
    assert resource["resource"]["pattern"] == spec_mod.ENV_RESOURCE_PATTERN
    [divisor_rule] = [r for r in cel_rules(load_crd()) if "string(self.divisor)" in r]
    assert str(list(spec_mod.CPU_DIVISORS)) in divisor_rule
    assert str(list(spec_mod.QUANTITY_DIVISORS)) in divisor_rule
    assert resource["divisor"]["pattern"] == spec_mod.QUANTITY_PATTERN


def test_pvc_rule_uses_the_operators_patterns() -> None:
    # The rule's regexes are spec.py's, written once as a CEL string (backslashes doubled).
    [rule] = [r for r in cel_rules(load_crd()) if r.startswith("self.source != 'PVC'")]
    for pattern in (
        spec_mod.PVC_REPO_PATTERN,
        spec_mod.PVC_CLAIM_LENGTH_PATTERN,
        spec_mod.PVC_DOT_SEGMENT_PATTERN,
    ):
        assert f"'{pattern.replace(chr(92), chr(92) * 2)}'" in rule


def _absent_or(*values: Any) -> list[Any]:
    return [None, *values]


def _fields(**fields: Any) -> dict[str, Any]:
    return {k: v for k, v in fields.items() if v is not None}


def rule_edge_specs() -> typing.Iterator[dict[str, Any]]:
    """Specs over every field a CEL rule reads, valid and not. No rule reads fields from two of
    these groups, so each group is enumerated in full with the others left valid. The numbers sit
    on each rule's edges (one under, at and one over a budget, explicit or defaulted), so a rule
    moved by one value in one place and not the other is found."""
    for quantization in typing.get_args(spec_mod.Quantization):
        for accel in typing.get_args(spec_mod.AcceleratorType):
            for count in _absent_or(1, 2):
                for resource in _absent_or("nvidia.com/mig-1g.10gb"):
                    accelerator = _fields(type=accel, count=count, resourceName=resource)
                    yield {
                        **MINIMAL,
                        "build": {"quantization": quantization},
                        "accelerator": accelerator,
                    }
    for max_num_tokens in _absent_or(512, 16384):
        for max_seq_len in _absent_or(511, 512, 513, 16384, 16385):
            for max_batch_tokens in _absent_or(511, 512, 513, 16385):
                build = _fields(maxNumTokens=max_num_tokens, maxSeqLen=max_seq_len)
                runtime = _fields(maxBatchTokens=max_batch_tokens)
                yield {**MINIMAL, "build": build, "runtime": runtime}
    claim_253, claim_254 = "a" * 253, "a" * 254
    repos = ["BAAI/bge-reranker-large", "s3://b/bge", "pvc://models", "pvc://models/", "pvc://m/a/b",
             "pvc://models.team-a/bge/v2/", "pvc://Models/x", "pvc://-m/x", "pvc://m.", "pvc://m//x",
             "pvc://m/../x", "pvc://m/./x", "pvc://m/..x/.y", "pvc://m/..", "pvc://", "models/x",
             f"pvc://{claim_253}/x", f"pvc://{claim_254}/x", f"pvc://{claim_253}",
             "pvc://models\n", "pvc://m/..\n", "pvc://m/x\n/y"]  # fmt: skip
    # Every repo form with PVC; for the other sources only whether a repo looks like a PVC's
    # matters to the rules (and the revision), so a few forms each keep the run short.
    other_repos = ["BAAI/bge-reranker-large", "pvc://models", "pvc://m/../x", "pvc://Models/x"]
    urls = ["https://m.corp/x.tar.gz", "http://m.corp/x.tar.gz", "HTTP://m.corp/x.tar.gz",
            "httpx://m", "s3://http://x"]  # fmt: skip
    pin = "sha256:" + "a" * 64
    for source in typing.get_args(spec_mod.Source):
        for repo in repos if source == "PVC" else [*other_repos, *urls]:
            for revision in _absent_or("main", "v2", pin, "sha256:", pin + "0"):
                yield {"checkpoint": _fields(repo=repo, source=source, revision=revision)}
    for service_type in _absent_or(*typing.get_args(spec_mod.ServiceType)):
        for ranges in _absent_or([], ["10.0.0.0/8"]):
            yield {
                **MINIMAL,
                "service": _fields(type=service_type, loadBalancerSourceRanges=ranges),
            }
    one_of_each = {
        "secretKeyRef": {"name": "s", "key": "k"},
        "configMapKeyRef": {"name": "c", "key": "k"},
        "fieldRef": {"fieldPath": "metadata.name"},
        "resourceFieldRef": {"resource": "limits.cpu"},
    }
    for value in _absent_or("1"):
        for chosen in itertools.chain.from_iterable(
            itertools.combinations(one_of_each, n) for n in range(3)
        ):
            for value_from in _absent_or({k: one_of_each[k] for k in chosen}):
                var = _fields(name="A", value=value, valueFrom=value_from)
                yield {**MINIMAL, "runtime": {"env": [var]}}
    for resource in ("limits.cpu", "requests.memory", "limits.hugepages-1Gi"):
        for divisor in _absent_or(1, "1", "1m", "1Mi", "1Gi", "100m", 0, -1, "2"):
            ref = _fields(resource=resource, divisor=divisor)
            var = {"name": "A", "valueFrom": {"resourceFieldRef": ref}}
            yield {**MINIMAL, "runtime": {"env": [var]}}
    for replicas in _absent_or(0, 1):
        yield _fields(**MINIMAL, replicas=replicas)
        for max_replicas in (1, 2, 3):
            for min_replicas in _absent_or(1, 2, 3):
                autoscaling = _fields(minReplicas=min_replicas, maxReplicas=max_replicas)
                yield _fields(**MINIMAL, replicas=replicas, autoscaling=autoscaling)


def test_the_api_server_and_the_operator_refuse_the_same_specs() -> None:
    """What the CEL rules let into the cluster, the operator serves, and what they refuse, it
    refuses too: the rules are written twice (CRD and spec.py), and must not drift apart."""
    disagreements, refused = [], 0
    specs = list(rule_edge_specs())
    for spec in specs:
        obj = defaulted(reranker(spec))
        assert schema_errors(obj) == []  # only CEL may refuse these
        refused_by_cel = cel_errors(obj)
        try:
            parse_spec(obj)
            refused_in_code = ""
        except InvalidSpec as exc:
            refused_in_code = str(exc)
        refused += bool(refused_by_cel)
        if bool(refused_by_cel) != bool(refused_in_code):
            disagreements.append((spec, refused_by_cel, refused_in_code))
    assert disagreements == []
    assert 0.2 < refused / len(specs) < 0.8  # both verdicts well represented


@pytest.mark.parametrize(
    "spec,field",
    [
        ({}, "spec.checkpoint"),
        ({"checkpoint": {"repo": ""}}, "spec.checkpoint.repo"),
        (
            {**MINIMAL, "build": {"maxNumTokens": 1000}},
            "spec.build.maxNumTokens",
        ),  # not a multiple of 64
        ({**MINIMAL, "build": {"maxNumTokens": 262144}}, "spec.build.maxNumTokens"),
        ({**MINIMAL, "accelerator": {"type": "V100"}}, "spec.accelerator.type"),
        ({**MINIMAL, "resources": {"memory": "lots"}}, "spec.resources.memory"),
        ({**MINIMAL, "checkpoint": {"repo": "x", "source": "FTP"}}, "spec.checkpoint.source"),
        ({**MINIMAL, "engineCache": {"accessMode": "ReadOnlyMany"}}, "spec.engineCache.accessMode"),
        ({**MINIMAL, "autoscaling": {"minReplicas": 1}}, "spec.autoscaling.maxReplicas"),
        ({**MINIMAL, "runtime": {"env": [{"name": "1BAD"}]}}, "spec.runtime.env[0].name"),
        (
            {**MINIMAL, "pod": {"tolerations": [{"operator": "Maybe"}]}},
            "spec.pod.tolerations[0].operator",
        ),
        ({**MINIMAL, "pod": {"labels": {"team": "x" * 64}}}, "spec.pod.labels.team"),
        ({**MINIMAL, "pod": {"runtimeClassName": "Nvidia"}}, "spec.pod.runtimeClassName"),
        ({**MINIMAL, "service": {"type": "ExternalName"}}, "spec.service.type"),
        ({**MINIMAL, "rollout": {"maxSurge": "25"}}, "spec.rollout.maxSurge"),
        ({**MINIMAL, "rollout": {"maxUnavailable": "150%"}}, "spec.rollout.maxUnavailable"),
        ({**MINIMAL, "httpRoute": {"parentRefs": [{"name": "gw"}], "path": "/a#b"}}, "spec.httpRoute.path"),
        ({**MINIMAL, "httpRoute": {"parentRefs": [{"name": "gw"}], "path": "/a?b=1"}}, "spec.httpRoute.path"),
        ({**MINIMAL, "httpRoute": {"parentRefs": [{"name": "gw"}], "path": "/caf\u00e9"}}, "spec.httpRoute.path"),
        ({**MINIMAL, "accelerator": {"resourceName": "gpu"}}, "spec.accelerator.resourceName"),
        ({**MINIMAL, "accelerator": {"resourceName": "nvidia.com/mig 1g"}}, "spec.accelerator.resourceName"),
        ({**MINIMAL, "rollout": {"maxUnavailable": -1}}, "spec.rollout.maxUnavailable"),
        ({**MINIMAL, "rollout": {"maxSurge": "1.5%"}}, "spec.rollout.maxSurge"),
        ({**MINIMAL, "pod": {"imagePullSecrets": ["Regcred"]}}, "spec.pod.imagePullSecrets[0]"),
        ({**MINIMAL, "pod": {"schedulerName": "my scheduler"}}, "spec.pod.schedulerName"),
        ({**MINIMAL, "service": {"labels": {"team": "x" * 64}}}, "spec.service.labels.team"),
        ({**MINIMAL, "service": {"loadBalancerSourceRanges": ["10.0.0.0"]}},
         "spec.service.loadBalancerSourceRanges[0]"),
        ({**MINIMAL, "ingress": {"path": "/"}}, "spec.ingress.host"),
        ({**MINIMAL, "ingress": {"host": "Rerank.Example.com"}}, "spec.ingress.host"),
        ({**MINIMAL, "ingress": {"host": "https://rerank.example.com"}}, "spec.ingress.host"),
        ({**MINIMAL, "ingress": {"host": "a.example.com", "path": "rerank"}}, "spec.ingress.path"),
        ({**MINIMAL, "ingress": {"host": "a.example.com", "path": "/a b"}}, "spec.ingress.path"),
        # What the API server refuses in an Ingress or a Service, refused up front instead.
        ({**MINIMAL, "ingress": {"host": "10.0.0.1"}}, "spec.ingress.host"),
        ({**MINIMAL, "httpRoute": {"hostnames": ["a.example.com"]}}, "spec.httpRoute.parentRefs"),
        ({**MINIMAL, "httpRoute": {"parentRefs": []}}, "spec.httpRoute.parentRefs"),
        ({**MINIMAL, "httpRoute": {"parentRefs": [{"name": "gw", "namespace": "Gateway_System"}]}},
         "spec.httpRoute.parentRefs[0].namespace"),
        ({**MINIMAL, "httpRoute": {"parentRefs": [{"name": "gw"}], "hostnames": ["10.0.0.1"]}},
         "spec.httpRoute.hostnames[0]"),
        ({**MINIMAL, "httpRoute": {"parentRefs": [{"name": "gw"}], "path": "/a/../b"}},
         "spec.httpRoute.path"),
        ({**MINIMAL, "ingress": {"host": "a" * 64 + ".example.com"}}, "spec.ingress.host"),
        ({**MINIMAL, "ingress": {"host": "a.example.com", "path": "/v1//rerank"}}, "spec.ingress.path"),
        ({**MINIMAL, "ingress": {"host": "a.example.com", "path": "/v1/../admin"}}, "spec.ingress.path"),
        ({**MINIMAL, "ingress": {"host": "a.example.com", "path": "/v1/."}}, "spec.ingress.path"),
        ({**MINIMAL, "ingress": {"host": "a.example.com", "path": "/v1%2frerank"}}, "spec.ingress.path"),
        ({**MINIMAL, "service": {"type": "LoadBalancer", "loadBalancerSourceRanges": ["1.2.3.4/99"]}},
         "spec.service.loadBalancerSourceRanges[0]"),
        ({**MINIMAL, "service": {"type": "LoadBalancer", "loadBalancerSourceRanges": ["999.1.1.1/8"]}},
         "spec.service.loadBalancerSourceRanges[0]"),
        ({**MINIMAL, "ingress": {"host": "a.example.com", "path": "/a\x0bb"}}, "spec.ingress.path"),
        ({**MINIMAL, "ingress": {"host": "a.example.com", "path": "/a\tb"}}, "spec.ingress.path"),
        ({**MINIMAL, "service": {"type": "LoadBalancer", "loadBalancerSourceRanges": ["fd00::/129"]}},
         "spec.service.loadBalancerSourceRanges[0]"),
        ({**MINIMAL, "ingress": {"host": "a.example.com", "tlsSecretName": "Tls"}},
         "spec.ingress.tlsSecretName"),
        # runtime.env[].valueFrom: what the API server would refuse on the Deployment.
        ({**MINIMAL, "runtime": {"env": [{"name": "A", "valueFrom": {"secretKeyRef": {"name": "Otel", "key": "k"}}}]}},
         "spec.runtime.env[0].valueFrom.secretKeyRef.name"),
        ({**MINIMAL, "runtime": {"env": [{"name": "A", "valueFrom": {"secretKeyRef": {"name": "otel"}}}]}},
         "spec.runtime.env[0].valueFrom.secretKeyRef.key"),
        ({**MINIMAL, "runtime": {"env": [{"name": "A", "valueFrom": {"configMapKeyRef": {"name": "c", "key": "a/b"}}}]}},
         "spec.runtime.env[0].valueFrom.configMapKeyRef.key"),
        ({**MINIMAL, "runtime": {"env": [{"name": "A", "valueFrom": {"fieldRef": {"fieldPath": "spec.containers"}}}]}},
         "spec.runtime.env[0].valueFrom.fieldRef.fieldPath"),
        ({**MINIMAL, "runtime": {"env": [{"name": "A", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels"}}}]}},
         "spec.runtime.env[0].valueFrom.fieldRef.fieldPath"),
        ({**MINIMAL, "runtime": {"env": [{"name": "A", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name", "apiVersion": "v2"}}}]}},
         "spec.runtime.env[0].valueFrom.fieldRef.apiVersion"),
        ({**MINIMAL, "runtime": {"env": [{"name": "A", "valueFrom": {"resourceFieldRef": {"resource": "limits.gpu"}}}]}},
         "spec.runtime.env[0].valueFrom.resourceFieldRef.resource"),
        ({**MINIMAL, "runtime": {"env": [{"name": "A", "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu", "divisor": "1 core"}}}]}},
         "spec.runtime.env[0].valueFrom.resourceFieldRef.divisor"),
        ({**MINIMAL, "runtime": {"env": [{"name": "A", "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu", "divisor": 0.5}}}]}},
         "spec.runtime.env[0].valueFrom.resourceFieldRef.divisor"),
        ({**MINIMAL, "runtime": {"env": [{"name": "A", "valueFrom": {"secretKeyRef": {"name": "s", "key": ".."}}}]}},
         "spec.runtime.env[0].valueFrom.secretKeyRef.key"),
        ({**MINIMAL, "runtime": {"env": [{"name": "A", "valueFrom": {"configMapKeyRef": {"name": "c", "key": "..data"}}}]}},
         "spec.runtime.env[0].valueFrom.configMapKeyRef.key"),
        ({**MINIMAL, "runtime": {"env": [{"name": "A", "valueFrom": {"secretKeyRef": {"name": "s", "key": "."}}}]}},
         "spec.runtime.env[0].valueFrom.secretKeyRef.key"),
        ({**MINIMAL, "runtime": {"env": [{"name": "A", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['bad key!']"}}}]}},
         "spec.runtime.env[0].valueFrom.fieldRef.fieldPath"),
        ({**MINIMAL, "runtime": {"env": [{"name": "A", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['" + "a" * 64 + "']"}}}]}},
         "spec.runtime.env[0].valueFrom.fieldRef.fieldPath"),
        *[({**MINIMAL, "runtime": {"volumes": [{"name": "a", "emptyDir": {}}],
            "volumeMounts": [{"name": "a", "mountPath": path}]}}, "spec.runtime.volumeMounts[0].mountPath")
          for path in ("data", "/data/", "/data/../engines", "/./engines", "//data", "/a/.")],
        ({**MINIMAL, "runtime": {"volumes": [{"name": "Bad_Name", "emptyDir": {}}]}},
         "spec.runtime.volumes[0].name"),
    ],
)  # fmt: skip
def test_schema_and_model_refuse_the_same_values(spec: dict, field: str) -> None:
    assert schema_errors(reranker(spec)), "the CRD schema should refuse it too"
    with pytest.raises(InvalidSpec) as exc:
        parse_spec(reranker(spec))
    assert exc.value.field == field


def test_code_only_checks_name_the_field() -> None:
    # Past the schema (no CEL for these): operator-owned or duplicate env names, unknown fields.
    with pytest.raises(InvalidSpec) as exc:
        parse_spec(
            reranker(
                {**MINIMAL, "runtime": {"env": [{"name": "RERANKER_ENGINE_DIR", "value": "/x"}]}}
            )
        )
    assert exc.value.field == "spec.runtime.env[0].name"
    # TEI's name of an operator-owned setting too: API_KEY would bypass apiKeySecret.
    with pytest.raises(InvalidSpec, match="API_KEY is set by the operator") as exc:
        parse_spec(reranker({**MINIMAL, "runtime": {"env": [{"name": "X"}, {"name": "API_KEY"}]}}))
    assert exc.value.field == "spec.runtime.env[1].name"
    with pytest.raises(InvalidSpec) as exc:
        parse_spec(reranker({**MINIMAL, "runtime": {"env": [{"name": "A"}, {"name": "A"}]}}))
    assert exc.value.field == "spec.runtime.env[1].name"
    with pytest.raises(InvalidSpec) as exc:
        parse_spec(reranker({**MINIMAL, "build": {"max_num_tokens": 64}}))
    assert exc.value.field == "spec.build.max_num_tokens"
    with pytest.raises(InvalidSpec) as exc:
        parse_spec({"metadata": {"name": "x"}})
    assert exc.value.field == "spec"
    # Not in CEL (int-or-string values): a rollout that could never replace a pod.
    for zero in (0, "0%"):
        obj = reranker({**MINIMAL, "rollout": {"maxSurge": zero, "maxUnavailable": "0%"}})
        assert schema_errors(defaulted(obj)) == [] and cel_errors(defaulted(obj)) == []
        with pytest.raises(InvalidSpec, match="may not both be 0") as exc:
            parse_spec(obj)
        assert exc.value.field == "spec.rollout.maxUnavailable"
    # Checks the schema does not make (the API server makes them on the Deployment, the Service
    # and the HTTPRoute): refused before anything is applied.
    code_only = [
        ({"accelerator": {"resourceName": "kubernetes.io/gpu"}}, "spec.accelerator.resourceName",
         "not an extended resource"),
        ({"httpRoute": {"parentRefs": [{"name": "gw"}, {"name": "gw"}]}},
         "spec.httpRoute.parentRefs[1]", "listed twice"),
        ({"httpRoute": {"parentRefs": [{"name": "gw", "sectionName": "a"}, {"name": "gw"}]}},
         "spec.httpRoute.parentRefs[1]", "listed twice"),
        ({"service": {"type": "LoadBalancer", "loadBalancerSourceRanges": [":/64"]}},
         "spec.service.loadBalancerSourceRanges[0]", "not an IP network"),
        ({"service": {"type": "LoadBalancer", "loadBalancerSourceRanges": ["1::2::3/64"]}},
         "spec.service.loadBalancerSourceRanges[0]", "not an IP network"),
        ({"resources": {"cpu": 2, "cpuLimit": "1500m"}}, "spec.resources.cpuLimit",
         "less than the CPU request"),
        ({"runtime": {"volumes": [{"name": "tmp", "emptyDir": {}}]}}, "spec.runtime.volumes[0].name",
         "volume of the operator's"),
        ({"runtime": {"volumes": [{"name": "a", "emptyDir": {}}, {"name": "a", "secret": {"secretName": "s"}}]}},
         "spec.runtime.volumes[1].name", "duplicate volume a"),
        ({"runtime": {"volumes": [{"name": "a"}]}}, "spec.runtime.volumes[0]", "exactly one source"),
        ({"runtime": {"volumes": [{"name": "a", "emptyDir": {}, "secret": {"secretName": "s"}}]}},
         "spec.runtime.volumes[0]", "exactly one source .* got 2"),
        # What the restricted Pod Security Standard refuses: the node's files, a pod token.
        ({"runtime": {"volumes": [{"name": "a", "hostPath": {"path": "/"}}]}},
         "spec.runtime.volumes[0].hostPath", "hostPath volumes are not allowed"),
        ({"runtime": {"volumes": [{"name": "a", "nfs": {"server": "n", "path": "/"}}]}},
         "spec.runtime.volumes[0].nfs", "not allowed"),
        ({"runtime": {"volumes": [{"name": "a", "projected": {"sources": [{"secret": {"name": "s"}},
            {"serviceAccountToken": {"path": "t"}}]}}]}},
         "spec.runtime.volumes[0].projected.sources[1].serviceAccountToken", "not allowed in a projected"),
        *[({"runtime": {"volumes": [{"name": "a", "emptyDir": {}}], "volumeMounts": [
            {"name": "a", "mountPath": "/data", "subPath": sub}]}}, "spec.runtime.volumeMounts[0].subPath",
           "relative path without '..'") for sub in ("/etc", "../x", "a/../../b", "..")],
        ({"runtime": {"volumeMounts": [{"name": "a", "mountPath": "/a"}]}}, "spec.runtime.volumeMounts[0].name",
         "no volume named a"),
        *[({"runtime": {"volumes": [{"name": "a", "emptyDir": {}}], "volumeMounts": [
            {"name": "a", "mountPath": path}]}}, "spec.runtime.volumeMounts[0].mountPath", "overlaps the operator's")
          for path in ("/engines", "/engines/x", "/tmp", "/etc", "/", "/checkpoint/m", "/etc/reranker")],
        ({"runtime": {"volumes": [{"name": "a", "emptyDir": {}}], "volumeMounts": [
            {"name": "a", "mountPath": "/data"}, {"name": "a", "mountPath": "/data", "subPath": "x"}]}},
         "spec.runtime.volumeMounts[1].mountPath", "mounted twice"),
        ({"resources": {"cpuLimit": "0.5"}}, "spec.resources.cpuLimit", "resources.cpu 1"),
        # The build's own CPU request and limit, and the limit it takes from the serving one.
        ({"resources": {"build": {"cpu": 4, "cpuLimit": 2}}}, "spec.resources.build.cpuLimit",
         r"less than the build's CPU request \(resources.build.cpu 4\)"),
        ({"resources": {"cpu": 3, "build": {"cpuLimit": "2"}}}, "spec.resources.build.cpuLimit",
         r"\(resources.cpu 3\)"),
        ({"resources": {"cpuLimit": 2, "build": {"cpu": 4}}}, "spec.resources.build.cpu",
         "set resources.build.cpuLimit too"),
        ({"resources": {"build": {"memory": "8e0.5"}}}, "spec.resources.build.memory",
         "not a quantity Kubernetes accepts"),
        # The schema's quantity pattern lets these through; Kubernetes' parser does not.
        ({"resources": {"cpu": "1e1.5"}}, "spec.resources.cpu", "not a quantity Kubernetes accepts"),
        ({"resources": {"memory": "8e0.5"}}, "spec.resources.memory", "not a quantity Kubernetes accepts"),
        ({"resources": {"ephemeralStorage": "1e99999999999999999999"}}, "spec.resources.ephemeralStorage",
         "not a quantity Kubernetes accepts"),
    ]  # fmt: skip
    for fields, field, needle in code_only:
        obj = reranker({**MINIMAL, **fields})
        assert schema_errors(defaulted(obj)) == [] and cel_errors(defaulted(obj)) == []
        with pytest.raises(InvalidSpec, match=needle) as exc:
            parse_spec(obj)
        assert exc.value.field == field
    assert parse_spec(reranker({**MINIMAL, "rollout": {"maxSurge": "150%"}}))  # surge may
    # The HPA's behavior is passed through, but a misspelt direction is named here.
    with pytest.raises(InvalidSpec, match="unknown field scaledown") as exc:
        parse_spec(
            reranker({**MINIMAL, "autoscaling": {"maxReplicas": 2, "behavior": {"scaledown": {}}}})
        )
    assert exc.value.field == "spec.autoscaling.behavior"


@pytest.mark.parametrize(
    "pod,field",
    [
        ({"labels": {"app.kubernetes.io/instance": "other"}}, "spec.pod.labels"),
        ({"annotations": {"reranker.dev/engine-key": "x"}}, "spec.pod.annotations"),
        ({"affinity": {"nodeAffinty": {}}}, "spec.pod.affinity"),
        ({"service": {"labels": {"app.kubernetes.io/name": "x"}}}, "spec.service.labels"),
        ({"service": {"annotations": {"reranker.dev/spec-hash": "x"}}}, "spec.service.annotations"),
        ({"ingress": {"host": "a.b", "annotations": {"reranker.dev/x": "y"}}},
         "spec.ingress.annotations"),
        ({"httpRoute": {"parentRefs": [{"name": "gw"}], "annotations": {"app.kubernetes.io/x": "y"}}},
         "spec.httpRoute.annotations"),
    ],
)  # fmt: skip
def test_pod_settings_may_not_override_the_operators(pod: dict, field: str) -> None:
    fields = pod if set(pod) & {"service", "ingress", "httpRoute"} else {"pod": pod}
    assert schema_errors(reranker({**MINIMAL, **fields})) == []
    with pytest.raises(InvalidSpec) as exc:
        parse_spec(reranker({**MINIMAL, **fields}))
    assert exc.value.field == field


def test_int_quantities_are_accepted() -> None:
    resources = {"cpu": 2, "memory": "8Gi", "cpuLimit": 4, "ephemeralStorage": 20000000000}
    obj = reranker({**MINIMAL, "resources": resources, "engineCache": {"size": "10Gi"}})
    assert schema_errors(obj) == []
    parsed = parse_spec(obj).resources
    assert (parsed.cpu, parsed.cpu_limit, parsed.ephemeral_storage) == ("2", "4", "20000000000")
    # A limit equal to the request however it is written; bad quantities refused by both.
    for cpu, limit in ((1, "1000m"), ("500m", "0.5"), ("2", "2e0"), ("100m", "1e-1")):
        obj = reranker({**MINIMAL, "resources": {"cpu": cpu, "cpuLimit": limit}})
        assert schema_errors(obj) == [] and parse_spec(obj).resources.cpu_limit == limit
    # The build's own, as ints too; a build limit above the serving one is the build's.
    build = {"cpu": 4, "memory": 34359738368, "cpuLimit": 4, "ephemeralStorage": "50Gi"}
    obj = reranker({**MINIMAL, "resources": {"cpu": 1, "cpuLimit": 2, "build": build}})
    assert schema_errors(obj) == [] and cel_errors(defaulted(obj)) == []
    own = parse_spec(obj).resources.for_build()
    assert (own.cpu, own.memory, own.cpu_limit) == ("4", "34359738368", "4")
    for field in ("cpuLimit", "ephemeralStorage"):
        obj = reranker({**MINIMAL, "resources": {"build": {field: "2 cores"}}})
        assert schema_errors(obj)
        with pytest.raises(InvalidSpec) as exc:
            parse_spec(obj)
        assert exc.value.field == f"spec.resources.build.{field}"
    for field in ("cpuLimit", "ephemeralStorage"):
        obj = reranker({**MINIMAL, "resources": {field: "2 cores"}})
        assert schema_errors(obj)
        with pytest.raises(InvalidSpec) as exc:
            parse_spec(obj)
        assert exc.value.field == f"spec.resources.{field}"


@pytest.mark.parametrize(
    ("quantity", "value"),
    [("1", "1"), ("500m", "0.5"), ("1.5Gi", str(1.5 * 2**30)), ("2k", "2000"), ("1e3", "1000"),
     ("1E-3", "0.001"), ("+2", "2"), (".5", "0.5"), ("5.", "5"), ("250u", "0.00025"),
     ("1n", "1e-9"), ("3Ei", str(3 * 2**60)), ("2E", "2e18"), ("1e+3", "1000"), ("1M", "1000000"),
     ("1e0004", "1e4"), ("1e-1000", "1e-1000"), ("2e999999999", "2e999999999")],
)  # fmt: skip
def test_quantity_value_reads_every_form_the_pattern_allows(quantity: str, value: str) -> None:
    assert re.fullmatch(QUANTITY_PATTERN.strip("^$"), quantity)
    assert quantity_value(quantity) == Decimal(value)


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"pod": {"affinity": {"nodeAffinity": "x"}}}, "spec.pod.affinity.nodeAffinity"),
        ({"pod": {"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": "abc"}}}}},
         "spec.pod.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution"
         ".nodeSelectorTerms"),
        ({"pod": {"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{"matchExpressions": "x"}]}}}}},
         "spec.pod.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution"
         ".nodeSelectorTerms[0].matchExpressions"),
        ({"runtime": {"volumes": [{"name": "v", "projected": {"sources": 5}}]}},
         "spec.runtime.volumes[0].projected.sources"),
        ({"resources": {"cpu": -1}}, "spec.resources.cpu"),
        ({"resources": {"memory": "-10Gi"}}, "spec.resources.memory"),
        ({"resources": {"build": {"cpu": "-1"}}}, "spec.resources.build.cpu"),
        ({"resources": {"cpu": "1", "cpuLimit": "1e4294967295"}}, "spec.resources.cpuLimit"),
        ({"engineCache": {"size": "-1Gi"}}, "spec.engineCache.size"),
        ({"engineCache": {"mode": "Shared", "size": "0"}}, "spec.engineCache.size"),
        ({"engineCache": {"size": "20e1.5"}}, "spec.engineCache.size"),
        ({"pod": {"nodeSelector": {"bad key": "v"}}}, "spec.pod.nodeSelector"),
        ({"pod": {"nodeSelector": {"pool": "v" * 64}}}, "spec.pod.nodeSelector"),
        ({"pod": {"tolerations": [{"value": "x"}]}}, "spec.pod.tolerations[0].operator"),
        ({"pod": {"tolerations": [{"key": "bad key", "operator": "Exists"}]}},
         "spec.pod.tolerations[0].key"),
        ({"pod": {"tolerations": [{"key": "k", "operator": "Exists", "value": "v"}]}},
         "spec.pod.tolerations[0].value"),
        ({"pod": {"tolerations": [{"key": "k", "value": "a b"}]}}, "spec.pod.tolerations[0].value"),
        ({"pod": {"tolerations": [{"key": "k", "effect": "NoSchedule", "tolerationSeconds": 5}]}},
         "spec.pod.tolerations[0].tolerationSeconds"),
    ],
)  # fmt: skip
def test_what_the_schema_passes_but_kubernetes_refuses_is_an_invalid_spec(
    fields: dict, field: str
) -> None:
    """Accepted by the CRD (passed-through objects, signed quantities), refused by the operator
    naming the field, before anything is applied: not a crash of every reconcile (a shape the
    merge of node affinities cannot take), nor children the API server refuses."""
    obj = reranker({**MINIMAL, **fields})
    assert schema_errors(obj) == [] and cel_errors(defaulted(obj)) == []
    with pytest.raises(InvalidSpec) as exc:
        parse_spec(obj)
    assert exc.value.field == field


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"engineCache": {"mode": "Shared", "storageClassName": "Fast SSD"}},
         "spec.engineCache.storageClassName"),
        ({"runtime": {"image": "registry.example.com/reranker-runtime:1 "}}, "spec.runtime.image"),
    ],
)  # fmt: skip
def test_names_kubernetes_would_refuse_on_the_pvc_or_every_pod_are_refused(
    fields: dict, field: str
) -> None:
    obj = reranker({**MINIMAL, **fields})
    assert schema_errors(obj)
    with pytest.raises(InvalidSpec) as exc:
        parse_spec(obj)
    assert exc.value.field == field


def test_runtime_volumes_of_the_restricted_kinds_are_accepted() -> None:
    volumes = [
        {"name": "ca", "configMap": {"name": "corp-ca"}},
        {"name": "token", "secret": {"secretName": "t"}},
        {"name": "shm", "emptyDir": {"medium": "Memory"}},
        {"name": "models", "persistentVolumeClaim": {"claimName": "m"}},
        {"name": "vault", "csi": {"driver": "secrets-store.csi.k8s.io"}},
        {"name": "both", "projected": {"sources": [{"configMap": {"name": "a"}},
                                                   {"secret": {"name": "b"}}]}},
    ]  # fmt: skip
    mounts = [
        {"name": v["name"], "mountPath": f"/mnt/{v['name']}", "readOnly": True} for v in volumes
    ] + [{"name": "ca", "mountPath": "/etc/otlp/ca.crt", "subPath": "certs/ca.crt"}]
    obj = defaulted(reranker({**MINIMAL, "runtime": {"volumes": volumes, "volumeMounts": mounts}}))
    assert schema_errors(obj) == [] and cel_errors(obj) == []
    runtime = parse_spec(obj).runtime
    assert runtime.volumes == tuple(volumes) and len(runtime.volume_mounts) == len(volumes) + 1
