"""Reconciler paths an in-memory API server cannot produce: the API server refusing a child."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any, cast

import pytest
from kubernetes.client.exceptions import ApiException

from reranker_operator import builders, kube
from reranker_operator.config import OperatorConfig
from reranker_operator.reconcile import ANNOTATION_BUILT, Reconciler, built_keys
from reranker_operator.spec import parse_spec

REFUSAL = (
    'Deployment.apps "rr" is invalid: spec.template.spec.affinity.nodeAffinity.'
    "requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms[0].matchExpressions[0]"
    '.operator: Unsupported value: "Inside"'
)


class RefusingApi:
    """Just enough of kube.Kube: a Reranker, and an API server that refuses Deployments."""

    def __init__(self, body: dict[str, Any] | None) -> None:
        self.body = body
        self.status_patches: list[dict[str, Any]] = []
        self.events: list[dict[str, Any]] = []

    def get(self, kind: kube.Kind, namespace: str, name: str) -> dict[str, Any] | None:
        return self.body if kind == kube.RERANKER else None

    def list(self, kind: kube.Kind, namespace: str, labels: Any = None) -> list[dict[str, Any]]:
        return []

    def create_if_absent(self, obj: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        if obj["kind"] == "Deployment":
            error = ApiException(status=422, reason="Unprocessable Entity")
            error.body = json.dumps({"kind": "Status", "message": REFUSAL})
            raise error
        return obj, True

    def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        self.events.append(obj)
        return obj

    def patch(self, kind: kube.Kind, namespace: str, name: str, patch: Any, **_: Any) -> Any:
        assert kind == kube.RERANKER
        self.status_patches.append(patch["status"])
        return {}


def test_a_child_refused_by_the_api_server_is_an_invalid_spec_with_its_message() -> None:
    body = {
        "apiVersion": "reranker.dev/v1alpha1",
        "kind": "Reranker",
        "metadata": {"name": "rr", "namespace": "ml", "uid": "u", "generation": 3},
        "spec": {
            "checkpoint": {"repo": "BAAI/bge-reranker-large"},
            "pod": {"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [{"matchExpressions": [
                    {"key": "zone", "operator": "Inside", "values": ["a"]}]}]}}}},
        },
    }  # fmt: skip
    api = RefusingApi(body)
    outcome = Reconciler(cast(kube.Kube, api), OperatorConfig()).reconcile("ml", "rr")
    assert outcome.phase == "Failed" and outcome.invalid is not None
    (written,) = api.status_patches
    assert written["phase"] == "Failed" and "Unsupported value" in written["message"]
    ready = next(c for c in written["conditions"] if c["type"] == "Ready")
    assert ready["reason"] == "InvalidSpec" and ready["observedGeneration"] == 3
    assert [e["reason"] for e in api.events] == ["InvalidSpec"]


class NoGatewayApi(RefusingApi):
    """An API server without the Gateway API: every HTTPRoute request answers 404."""

    # Its GETs of routes answer 404, which kube.Kube.get returns as None (the inherited get).
    def create_if_absent(self, obj: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        if obj["kind"] == "HTTPRoute":
            response = SimpleNamespace(
                status=404, reason="Not Found", data=b"{}", headers={}, getheaders=lambda: {}
            )
            raise kube.ApiError("POST", "/apis/gateway.networking.k8s.io/v1/...", response)
        return obj, True


def test_an_http_route_without_the_gateway_api_fails_saying_so() -> None:
    body = {
        "apiVersion": "reranker.dev/v1alpha1",
        "kind": "Reranker",
        "metadata": {"name": "rr", "namespace": "ml", "uid": "u", "generation": 2},
        "spec": {"checkpoint": {"repo": "BAAI/bge-reranker-large"},
                 "httpRoute": {"parentRefs": [{"name": "gw"}]}},
    }  # fmt: skip
    api = NoGatewayApi(body)
    outcome = Reconciler(cast(kube.Kube, api), OperatorConfig()).reconcile("ml", "rr")
    assert outcome.phase == "Failed" and outcome.invalid is not None
    assert outcome.invalid.field == "spec.httpRoute"
    (written,) = api.status_patches
    assert "does not serve the Gateway API" in written["message"]
    # Without spec.httpRoute, the same cluster is fine: its 404s read as "no route".
    del body["spec"]["httpRoute"]
    api = NoGatewayApi(body)
    assert Reconciler(cast(kube.Kube, api), OperatorConfig()).reconcile("ml", "rr").invalid is None


def counted(reconciler: Reconciler, result: str) -> float:
    value = reconciler.metrics.registry.get_sample_value(
        "reranker_operator_reconciles_total", {"result": result}
    )
    assert value is not None
    return value


def test_metrics_count_what_a_reconcile_ended_with_and_nothing_for_a_gone_reranker() -> None:
    body = {
        "apiVersion": "reranker.dev/v1alpha1",
        "kind": "Reranker",
        "metadata": {"name": "rr", "namespace": "ml", "uid": "u", "generation": 1},
        "spec": {"checkpoint": {"repo": "BAAI/bge-reranker-large"}, "accelerator": {"count": 2}},
    }
    reconciler = Reconciler(cast(kube.Kube, RefusingApi(body)), OperatorConfig())
    reconciler.reconcile("ml", "rr")
    assert counted(reconciler, "invalid_spec") == 1
    # The Reranker deleted: its children's deletion events still trigger reconciles.
    gone = Reconciler(cast(kube.Kube, RefusingApi(None)), OperatorConfig())
    assert gone.reconcile("ml", "rr").phase is None
    assert {
        r: counted(gone, r) for r in ("ok", "invalid_spec", "api_error", "error")
    } == dict.fromkeys(("ok", "invalid_spec", "api_error", "error"), 0.0)
    assert (
        gone.metrics.registry.get_sample_value("reranker_operator_reconcile_duration_seconds_count")
        == 0
    )


def _job(state: dict[str, Any], created: str, spec_hash: str = "h") -> dict[str, Any]:
    return {
        "metadata": {
            "creationTimestamp": created,
            "annotations": {"reranker.dev/spec-hash": spec_hash},
        },
        "status": state,
    }


COMPLETE = {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}
FAILED = {"failed": 3, "conditions": [{"type": "Failed", "status": "True"}]}
RUNNING_POD = [{"status": {"phase": "Running"}}]
PENDING_POD = [{"status": {"phase": "Pending"}}]


def test_a_build_job_is_stale_only_when_it_cannot_give_the_engine() -> None:
    from reranker_operator.reconcile import _stale_build_reason as stale

    pvc = {"metadata": {"creationTimestamp": "2026-12-02T10:00:00Z"}}
    desired = _job({}, "", "h")
    # Finished before the cache claim was (re-)created: its engine is not on this claim.
    assert stale(_job(COMPLETE, "2026-12-02T09:00:00Z"), desired, pvc, [])
    assert stale(_job(COMPLETE, "2026-12-02T10:00:05Z"), desired, pvc, []) is None
    # Failed or not started under other pod settings: replaced; under the same: kept.
    assert "failed" in (stale(_job(FAILED, "", "old"), desired, pvc, []) or "")
    assert stale(_job(FAILED, "", "h"), desired, pvc, []) is None
    assert stale(_job({}, "", "old"), desired, pvc, [])
    assert stale(_job({"active": 1}, "", "old"), desired, pvc, PENDING_POD)
    # A build that runs is left to finish.
    assert stale(_job({"active": 1}, "", "old"), desired, pvc, RUNNING_POD) is None


def test_a_replaced_jobs_state_is_not_read_from_its_predecessors_pods() -> None:
    from reranker_operator.reconcile import _pods_of_job

    def pod(job: str, uid: str | None) -> dict[str, Any]:
        labels = {"job-name": job}
        if uid:
            labels["batch.kubernetes.io/controller-uid"] = uid
        return {"metadata": {"name": f"{job}-{uid}", "labels": labels}}

    old, new, unlabelled, other = pod("j", "u1"), pod("j", "u2"), pod("j", None), pod("k", "u2")
    job = {"metadata": {"name": "j", "uid": "u2"}}
    assert _pods_of_job([old, new, unlabelled, other], "j", job) == [new, unlabelled]
    assert _pods_of_job([old, new], "j", None) == [old, new]  # no Job yet: nothing to tell


def test_the_soonest_recheck_wins_and_a_later_one_waits_for_it() -> None:
    """One timer per Reranker: a 60 s refusal recheck must not wait behind a 900 s one (the
    reconcile it runs arms the later one again)."""
    import time

    reconciler = Reconciler(cast(kube.Kube, RefusingApi(None)), OperatorConfig())
    try:
        reconciler._recheck_after("ml", "rr", 900.0)
        reconciler._recheck_after("ml", "rr", 60.0)
        due, timer = reconciler._timers[("ml", "rr")]
        assert due - time.monotonic() < 61
        reconciler._recheck_after("ml", "rr", 900.0)  # later: the pending one stays
        assert reconciler._timers[("ml", "rr")] == (due, timer)
    finally:
        reconciler.stop_timers()


def test_engine_keys_on_the_cache_pvc_are_keys_or_ignored() -> None:
    """The prune Job deletes /engines/<key> for the keys the PVC's annotations list: an entry
    written there by hand (`..`, a path) is ignored, never deleted."""
    key = "ab" * 32
    listed = f"..,{key},../x,/engines,{key.upper()},{key}0"
    assert built_keys({"metadata": {"annotations": {ANNOTATION_BUILT: listed}}}) == {key}
    spec = parse_spec({"metadata": {"name": "rr"}, "spec": {"checkpoint": {"repo": "a/b"}}})
    with pytest.raises(ValueError, match="not engine keys"):
        builders.build_prune_job("rr", "ns", spec, OperatorConfig(), [key, ".."])


def api_error(
    status: int, reason: str, method: str = "GET", path: str = "/apis/reranker.dev/v1alpha1"
) -> kube.ApiError:
    response = SimpleNamespace(
        status=status, reason=reason, data=b"{}", headers={}, getheaders=lambda: {}
    )
    return kube.ApiError(method, path, response)


class FailingApi(RefusingApi):
    """An API server answering every read with `error`."""

    def __init__(self, error: kube.ApiError) -> None:
        super().__init__(None)
        self.error = error

    def get(self, kind: kube.Kind, namespace: str, name: str) -> dict[str, Any] | None:
        raise self.error


def test_a_timed_reconcile_that_meets_an_api_fault_is_tried_again() -> None:
    """Only a finished reconcile sets timers: a timed one (an Unschedulable pod's timeout) that
    failed would otherwise never come back."""
    failing = FailingApi(api_error(503, "Service Unavailable"))
    reconciler = Reconciler(cast(kube.Kube, failing), OperatorConfig())
    try:
        reconciler._timed_reconcile("ml", "rr")
        assert ("ml", "rr") in reconciler._timers
    finally:
        reconciler.stop_timers()


class StatusRefusingApi(RefusingApi):
    """Children are accepted; the Reranker's status write is refused once with 422."""

    def create_if_absent(self, obj: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        return obj, True

    def patch(self, kind: kube.Kind, namespace: str, name: str, patch: Any, **_: Any) -> Any:
        if kind == kube.RERANKER and not self.status_patches:
            self.status_patches.append({})
            path = f"/apis/reranker.dev/v1alpha1/namespaces/{namespace}/rerankers/{name}/status"
            raise api_error(422, "Unprocessable Entity", "PATCH", path)
        return super().patch(kind, namespace, name, patch)


def test_a_refused_status_write_is_not_blamed_on_the_spec() -> None:
    body = {
        "apiVersion": "reranker.dev/v1alpha1",
        "kind": "Reranker",
        "metadata": {"name": "rr", "namespace": "ml", "uid": "u", "generation": 2},
        "spec": {"checkpoint": {"repo": "BAAI/bge-reranker-large"}},
    }
    api = StatusRefusingApi(body)
    reconciler = Reconciler(cast(kube.Kube, api), OperatorConfig())
    try:
        with pytest.raises(ApiException):  # retried by the handler, not a PermanentError
            reconciler.reconcile("ml", "rr")
        assert api.events == []  # no InvalidSpec warning
        assert len(api.status_patches) == 1  # no InvalidSpec status written either
    finally:
        reconciler.stop_timers()


def test_only_the_rerankers_own_writes_count_as_the_operators() -> None:
    from reranker_operator.reconcile import _is_reranker_write

    def refused(path: str) -> kube.ApiError:
        return api_error(422, "Unprocessable Entity", "PATCH", path)

    assert _is_reranker_write(
        refused("/apis/reranker.dev/v1alpha1/namespaces/ml/rerankers/rr/status")
    )
    # A child in a namespace named "rerankers" is still a child (its 422 is the spec's).
    assert not _is_reranker_write(refused("/apis/apps/v1/namespaces/rerankers/deployments/rr"))


def test_a_timed_reconcile_refused_for_good_is_not_retried_every_15_s() -> None:
    forbidden = FailingApi(api_error(403, "Forbidden"))
    reconciler = Reconciler(cast(kube.Kube, forbidden), OperatorConfig())
    try:
        reconciler._timed_reconcile("ml", "rr")
        assert ("ml", "rr") not in reconciler._timers
    finally:
        reconciler.stop_timers()


def test_the_never_started_note_is_kept_for_its_own_job_only() -> None:
    from reranker_operator.reconcile import _waiting_note

    said = "DeadlineExceeded; its pod never started (Unschedulable: no GPU); once that is fixed, "
    previous = {
        "phase": "Failed",
        "engine": {"jobName": "rr-engine-a"},
        "conditions": [{"type": "EngineReady", "status": "False", "reason": "BuildFailed",
                        "message": said + "`kubectl delete job rr-engine-a -n ml` builds again"}],
    }  # fmt: skip
    assert _waiting_note(previous, "rr-engine-a") == "Unschedulable: no GPU"
    assert _waiting_note(previous, "rr-engine-b") == ""  # another engine's Job: not its words


def test_no_timer_is_armed_once_the_timers_are_stopped() -> None:
    reconciler = Reconciler(cast(kube.Kube, RefusingApi(None)), OperatorConfig())
    reconciler.stop_timers()
    reconciler._recheck_after("ml", "rr", 60.0)
    assert reconciler._timers == {}
