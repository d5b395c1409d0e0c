"""Status derivation (pure): phases, conditions, transitions, the children's state readers."""

from __future__ import annotations

from typing import Any

import pytest

from reranker_operator import status
from reranker_operator.status import DeploymentState, Observed

KEY, OLD = "a" * 64, "b" * 64


def observed(
    engine: status.EngineState = "built", dep: DeploymentState | None = None, **kw: Any
) -> Observed:
    return Observed(
        name="rr", namespace="ml", generation=2, engine_key=KEY, job_name="rr-engine-aaaaaaaaaa",
        image="img", engine=engine, deployment=dep, endpoint="http://rr.ml.svc.cluster.local:8080", **kw,
    )  # fmt: skip


def dep(
    key: str = KEY, available: bool = True, rolled_out: bool = True, progress_failed: bool = False
) -> DeploymentState:
    ready = 1 if available else 0
    return DeploymentState(
        key, 1, 1, ready, available, rolled_out, progress_failed, "deadline exceeded"
    )


def conds(st: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in st["conditions"]}


@pytest.mark.parametrize(
    ("obs", "phase", "ready_reason"),
    [
        (observed("pending"), "Pending", "EngineBuilding"),
        (observed("building"), "Building", "EngineBuilding"),
        (observed("building", dep(OLD)), "Building", "EngineBuilding"),  # old engine serves
        (observed("built"), "Deploying", "Deploying"),  # Deployment not yet created
        (observed("built", dep(OLD)), "Deploying", "Deploying"),  # not yet rolled
        (observed("built", dep(rolled_out=False)), "Deploying", "Deploying"),
        (observed("built", dep(available=False)), "Deploying", "Deploying"),
        (observed("built", dep()), "Ready", "Ready"),
        (observed("failed", build_message="boom"), "Failed", "BuildFailed"),
        (observed("failed", dep(OLD), build_message="boom"), "Degraded", "BuildFailed"),
        (
            observed("built", dep(available=False, progress_failed=True)),
            "Failed",
            "ProgressDeadlineExceeded",
        ),
        (observed("built", dep(progress_failed=True)), "Degraded", "ProgressDeadlineExceeded"),
    ],
)
def test_phase_and_ready_reason(obs: Observed, phase: str, ready_reason: str) -> None:
    st = status.derive_status(obs, None, now="2026-01-01T00:00:00Z")
    assert st["phase"] == phase
    ready = conds(st)["Ready"]
    assert ready == ("True" if phase == "Ready" else "False", ready_reason)
    assert all(c["observedGeneration"] == 2 for c in st["conditions"])
    assert st["observedGeneration"] == 2


def test_old_engine_serving_while_building_is_available_not_ready() -> None:
    st = status.derive_status(observed("building", dep(OLD)), None)
    assert conds(st) == {
        "EngineReady": ("False", "Building"),
        "Available": ("True", "MinimumReplicasAvailable"),
        "Ready": ("False", "EngineBuilding"),
    }
    assert st["engine"]["servingKey"] == OLD and st["engine"]["key"] == KEY
    assert "still serving engine bbbbbbbbbb" in st["message"]


def test_build_failure_message_is_the_termination_message() -> None:
    st = status.derive_status(observed("failed", build_message="401 from the hub"), None)
    engine = next(c for c in st["conditions"] if c["type"] == "EngineReady")
    assert engine["reason"] == "BuildFailed" and "401 from the hub" in engine["message"]


def test_last_transition_time_moves_only_on_flips() -> None:
    first = status.derive_status(observed("building"), None, now="2026-01-01T00:00:00Z")
    same = status.derive_status(observed("building"), first, now="2026-01-01T00:05:00Z")
    assert same == first  # nothing to write
    assert status.status_patch(first, same) is None
    flipped = status.derive_status(observed("built", dep()), first, now="2026-01-01T00:10:00Z")
    times = {c["type"]: c["lastTransitionTime"] for c in flipped["conditions"]}
    assert times == dict.fromkeys(("EngineReady", "Available", "Ready"), "2026-01-01T00:10:00Z")
    # A reason change without a status flip keeps the time (metav1.Condition semantics).
    failed = status.derive_status(observed("failed"), first, now="2026-01-01T00:20:00Z")
    assert {c["type"]: c["lastTransitionTime"] for c in failed["conditions"]}[
        "EngineReady"
    ] == "2026-01-01T00:00:00Z"


def test_status_patch_deletes_keys_that_went_away() -> None:
    old = {"phase": "Ready", "engine": {"key": "a", "servingKey": "b"}, "endpoint": "x"}
    new = {"phase": "Failed", "engine": {"key": "a"}}
    assert status.status_patch(old, new) == {
        "phase": "Failed",
        "engine": {"servingKey": None},
        "endpoint": None,
    }


def test_invalid_spec_status_names_the_field() -> None:
    st = status.invalid_spec_status("spec.build.quantization", "fp8 needs ...", 3, None)
    assert st["phase"] == "Failed" and st["observedGeneration"] == 3
    assert conds(st)["Ready"] == ("False", "InvalidSpec")
    assert "spec.build.quantization" in st["message"]


@pytest.mark.parametrize(
    ("job_status", "state"),
    [
        (None, "pending"),
        ({}, "pending"),
        ({"active": 1}, "building"),
        ({"succeeded": 1}, "built"),
        ({"conditions": [{"type": "Complete", "status": "True"}]}, "built"),
        ({"active": 1, "conditions": [{"type": "FailureTarget", "status": "True"}]}, "failed"),
        ({"failed": 3, "conditions": [{"type": "Failed", "status": "True"}]}, "failed"),
        ({"failed": 1, "active": 1}, "building"),  # a retry under backoffLimit
    ],
)
def test_job_state(job_status: dict[str, Any] | None, state: str) -> None:
    job = None if job_status is None else {"status": job_status}
    assert status.job_state(job) == state


def test_termination_message_prefers_the_newest_failure() -> None:
    def pod(finished: str, message: str, code: int = 1) -> dict[str, Any]:
        term = {"exitCode": code, "finishedAt": finished, "message": message}
        return {"status": {"containerStatuses": [{"state": {"terminated": term}}]}}

    pods = [pod("2026-01-01T00:00:00Z", "first try"), pod("2026-01-01T00:05:00Z", "second try\n"),
            pod("2026-01-01T00:09:00Z", "ok", code=0)]  # fmt: skip
    assert status.termination_message(pods) == "second try"
    assert status.termination_message([]) == ""


def test_deployment_state_rollout() -> None:
    def deployment(**st: Any) -> dict[str, Any]:
        return {"metadata": {"generation": 2, "annotations": {"reranker.dev/engine-key": KEY}},
                "spec": {"replicas": 1}, "status": st}  # fmt: skip

    avail = [{"type": "Available", "status": "True"}]
    mid = status.deployment_state(
        deployment(observedGeneration=2, replicas=2, updatedReplicas=1, readyReplicas=1, availableReplicas=1,
                   conditions=avail), "reranker.dev/engine-key")  # fmt: skip
    assert mid.available and not mid.rolled_out and mid.engine_key == KEY
    done = status.deployment_state(
        deployment(observedGeneration=2, replicas=1, updatedReplicas=1, readyReplicas=1, availableReplicas=1,
                   conditions=avail), "reranker.dev/engine-key")  # fmt: skip
    assert done.available and done.rolled_out
    stale = status.deployment_state(
        deployment(observedGeneration=1, replicas=1, updatedReplicas=1), "x"
    )
    assert not stale.rolled_out and not stale.available
