"""examples/monitoring/: the kube-state-metrics config reads fields the CRD's status has, and
every alert parses as PromQL and reads metrics that exist (the operator's, the runtime's, and the
ones that config makes). No Prometheus or kube-state-metrics runs here."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import promql_parser
import pytest
import yaml
from prometheus_client import generate_latest

from reranker_operator.metrics import PHASES, OperatorMetrics
from reranker_runtime import metrics as runtime_metrics

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
    """Every sample name a /metrics page can carry, labelled metrics without samples included."""
    names = set()
    for line in page.decode().splitlines():
        if line.startswith("# TYPE "):
            name, kind = line.split()[2:4]
            base = name.removesuffix("_total")
            suffixes = {"histogram": ("_bucket", "_sum", "_count")}.get(kind, ("", "_total"))
            names.update(base + s for s in suffixes)
    return names


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
    promql_parser.parse(rule["expr"])
    known = (
        exposed_names(generate_latest(OperatorMetrics().registry))
        | exposed_names(runtime_metrics.render())  # the runtime's /metrics page
        | ksm_names()
    )
    read = set(re.findall(r"\b(?:kube_reranker|reranker|te)_[a-z_]+\b", rule["expr"]))
    assert read and read <= known, read - known
    assert rule["labels"]["severity"] in ("critical", "warning")
    assert rule["annotations"]["summary"]
