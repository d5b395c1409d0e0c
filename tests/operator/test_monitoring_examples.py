"""examples/monitoring/: the kube-state-metrics config reads fields the CRD's status has, and
every alert parses as PromQL and reads metrics that exist (the operator's, the runtime's, and the
ones that config makes). No Prometheus or kube-state-metrics runs here."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import promql_parser
import pytest
import yaml
from prometheus_client import generate_latest

from reranker_operator import status
from reranker_operator.metrics import EVENTS, PHASES, RESULTS, OperatorMetrics
from reranker_runtime import metrics as runtime_metrics
from reranker_runtime.api import errors

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples" / "monitoring"
CRD = yaml.safe_load((ROOT / "crds" / "rerankers.reranker.dev.yaml").read_text())
(VERSION,) = CRD["spec"]["versions"]
SCHEMA = VERSION["schema"]["openAPIV3Schema"]


def ksm_resource() -> dict[str, Any]:
    values = yaml.safe_load((EXAMPLES / "kube-prometheus-stack-values.yaml").read_text())
    (resource,) = values["kube-state-metrics"]["customResourceState"]["config"]["spec"]["resources"]
    return resource


def schema_at(path: list[str], node: dict[str, Any] = SCHEMA) -> dict[str, Any]:
    for key in path:
        node = node["items"] if node.get("type") == "array" else node
        assert key in node.get("properties", {}), f"{'.'.join(path)}: no {key!r} in the CRD"
        node = node["properties"][key]
    return node


def exposed_names(page: bytes) -> set[str]:
    """Every sample name a /metrics page can carry, labelled metrics without samples included:
    the name its TYPE line gives (counters: `_total` from prometheus_client, none for TEI's),
    and a histogram's series."""
    names = set()
    for line in page.decode().splitlines():
        if line.startswith("# TYPE "):
            name, kind = line.split()[2:4]
            suffixes = ("_bucket", "_sum", "_count") if kind == "histogram" else ("",)
            names.update(name + s for s in suffixes)
    return names


def selectors(node: Any) -> Iterator[Any]:
    """Every vector selector of a parsed PromQL expression."""
    if type(node).__name__ == "VectorSelector":
        yield node
    for attr in dir(node):
        if attr.startswith("_") or attr in ("parse", "prettify"):
            continue
        value = getattr(node, attr)
        for child in value if isinstance(value, list) else [value]:
            if type(child).__module__ == "promql_parser" and hasattr(child, "prettify"):
                yield from selectors(child)


ERR_VALUES = (
    {reason for _, reason in errors.FAILURE_REASONS}
    | set(errors._REASON_BY_STATUS.values())
    | {errors.DROPPED, "inference", "model_type"}
)
CONDITION_TYPES = {
    status.ENGINE_READY,
    status.AVAILABLE,
    status.READY,
    status.SCALING_ACTIVE,
    status.ROUTE_ACCEPTED,
}
# metric -> label -> the values it takes (None: any value that status.py writes as a literal).
LABEL_VALUES: dict[str, dict[str, set[str] | None]] = {
    "reranker_operator_reconciles_total": {"result": set(RESULTS)},
    "reranker_operator_phase_transitions_total": {"phase": set(PHASES)},
    "reranker_operator_events_total": {
        "type": {t for t, _ in EVENTS},
        "reason": {r for _, r in EVENTS},
    },
    "te_request_failure": {"err": ERR_VALUES},
    "kube_reranker_status_phase": {"phase": set(PHASES)},
    "kube_reranker_status_condition": {"type": CONDITION_TYPES, "reason": None},
}


def ksm_names() -> set[str]:
    resource = ksm_resource()
    return {f"{resource['metricNamePrefix']}_{m['name']}" for m in resource["metrics"]}


def rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load((EXAMPLES / "prometheus-rules.yaml").read_text())
    return [rule for group in doc["spec"]["groups"] for rule in group["rules"]]


def test_kube_state_metrics_reads_the_rerankers_status() -> None:
    resource = ksm_resource()
    gvk = resource["groupVersionKind"]
    assert (gvk["group"], gvk["version"], gvk["kind"]) == (
        CRD["spec"]["group"], VERSION["name"], CRD["spec"]["names"]["kind"]
    )  # fmt: skip
    for path in resource["labelsFromPath"].values():
        assert path[0] == "metadata" and path[1] in ("name", "namespace")
    for metric in resource["metrics"]:
        each = metric["each"]
        spec = each[each["type"][0].lower() + each["type"][1:]]
        if "path" in spec:
            node = schema_at(spec["path"])
            for sub in [*spec.get("labelsFromPath", {}).values(), spec.get("valueFrom", [])]:
                if sub:
                    schema_at(sub, node)
        for sub in spec.get("labelsFromPath", {}).values():
            if "path" not in spec:
                schema_at(sub)
        if each["type"] == "StateSet":
            assert spec["list"] == schema_at(spec["path"])["enum"] == list(PHASES)


@pytest.mark.parametrize("rule", rules(), ids=lambda r: r["alert"])
def test_alert_parses_and_reads_metrics_that_exist(rule: dict[str, Any]) -> None:
    known = (
        exposed_names(generate_latest(OperatorMetrics().registry))
        | exposed_names(runtime_metrics.render())  # the runtime's /metrics page
        | ksm_names()
    )
    found = list(selectors(promql_parser.parse(rule["expr"])))
    assert found and {s.name for s in found} <= known, {s.name for s in found} - known
    status_source = (ROOT / "operator" / "reranker_operator" / "status.py").read_text()
    for selector in found:
        for matcher in selector.matchers.matchers:
            allowed = LABEL_VALUES.get(selector.name, {})
            assert matcher.name in allowed, f"{selector.name} has no label {matcher.name}"
            for value in matcher.value.split("|"):
                expected = allowed[matcher.name]
                if expected is None:
                    assert f'"{value}"' in status_source, f"{matcher.name}={value}"
                else:
                    assert value in expected, f"{selector.name}{{{matcher.name}={value!r}}}"
    assert rule["labels"]["severity"] in ("critical", "warning")
    assert rule["annotations"]["summary"]


def test_every_event_the_reconciler_posts_is_counted_from_zero() -> None:
    source = (ROOT / "operator" / "reranker_operator" / "reconcile.py").read_text()
    posted = set(re.findall(r'self\._event\(\s*body,\s*"(\w+)",\s*"(\w+)"', source))
    assert posted == set(EVENTS)
