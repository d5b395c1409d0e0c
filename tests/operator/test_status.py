"""Status derivation (pure): phases, conditions, transitions, the children's state readers."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from reranker_operator import diagnosis, status
from reranker_operator.diagnosis import PodIssue
from reranker_operator.status import DeploymentState, Observed

KEY, OLD = "a" * 64, "b" * 64


def observed(
    engine: status.EngineState = "built", dep: DeploymentState | None = None, **kw: Any
) -> Observed:
    kw.setdefault("job_name", "rr-engine-aaaaaaaaaa")  # Shared mode unless a test says None
    return Observed(
        name="rr", namespace="ml", generation=2, engine_key=KEY, image="img", engine=engine,
        deployment=dep, endpoint="http://rr.ml.svc.cluster.local:8080", **kw,
    )  # fmt: skip


WAITING = PodIssue("Unschedulable", "pod p cannot be scheduled: 0/3 nodes", stuck=False)
STUCK = PodIssue("Unschedulable", "pod p cannot be scheduled: 0/3 nodes", stuck=True)
OOM = PodIssue("OOMKilled", "container reranker of pod p was OOMKilled (memory limit 10Gi)", True)
NOW = diagnosis.parse_time("2026-01-01T01:00:00Z")


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
        # What the pods say: waiting (Pending) until it is stuck, then Failed / Degraded.
        (observed("pending", engine_issue=WAITING), "Pending", "Unschedulable"),
        (observed("pending", engine_issue=STUCK), "Failed", "Unschedulable"),
        (observed("pending", dep(OLD), engine_issue=STUCK), "Degraded", "Unschedulable"),
        (observed("built", dep(available=False), serve_issue=OOM), "Failed", "OOMKilled"),
        (observed("built", dep(rolled_out=False), serve_issue=OOM), "Degraded", "OOMKilled"),
        (observed("built", dep(), serve_issue=OOM), "Ready", "Ready"),  # an old pod's past
    ],
)
def test_phase_and_ready_reason(obs: Observed, phase: str, ready_reason: str) -> None:
    st = status.derive_status(obs, None, now="2026-01-01T00:00:00Z")
    assert st["phase"] == phase
    ready = conds(st)["Ready"]
    assert ready == ("True" if phase == "Ready" else "False", ready_reason)
    assert all(c["observedGeneration"] == 2 for c in st["conditions"])
    assert st["observedGeneration"] == 2


def test_a_surge_pod_without_room_points_at_the_in_place_rollout() -> None:
    """Old pods serve and the new one cannot be scheduled: on a fixed GPU pool, the usual cause
    is no room for the surge pod, and the message says what to set."""
    hint = "set spec.rollout maxSurge 0 and maxUnavailable 1"
    # PerPod (no build Job): the new Deployment pod builds, and it is the one without room.
    st = status.derive_status(
        observed("pending", dep(OLD), engine_issue=STUCK, job_name=None), None
    )
    assert st["phase"] == "Degraded" and hint in st["message"]
    # Shared: the pod without room is the build Job's, which spec.rollout does not place.
    st = status.derive_status(observed("pending", dep(OLD), engine_issue=STUCK), None)
    assert hint not in st["message"]
    # ... but the Deployment's own new pod (the engine is built) is.
    st = status.derive_status(observed("built", dep(OLD), serve_issue=STUCK), None)
    assert hint in st["message"]
    # Not when nothing serves (nothing to replace), nor when the rollout already replaces in place.
    st = status.derive_status(observed("pending", engine_issue=STUCK), None)
    assert hint not in st["message"]
    in_place = dataclasses.replace(
        observed("pending", dep(OLD), engine_issue=STUCK, job_name=None), surge_rollout=False
    )
    assert hint not in status.derive_status(in_place, None)["message"]
    oom = status.derive_status(observed("built", dep(OLD), serve_issue=OOM), None)
    assert hint not in oom["message"]


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
    # With maxUnavailable 0 the Deployment's Available means "every replica": two of three
    # answering is serving.
    partial = status.deployment_state(
        deployment(observedGeneration=2, replicas=3, updatedReplicas=3, readyReplicas=2,
                   availableReplicas=2, conditions=[{"type": "Available", "status": "False"}]),
        "x")  # fmt: skip
    assert partial.available and partial.rolled_out


def test_a_count_change_after_ready_is_no_rollout() -> None:
    """`kubectl scale rr`, an autoscaler's step or the operator's own replicas patch bump the
    Deployment's generation before its controller has seen it: that rolls nothing, so Ready
    stays (no False and back, no second Ready event). A template change of ours does roll."""
    deployment = {"metadata": {"generation": 5, "annotations": {"k": KEY}},
                  "spec": {"replicas": 5},
                  "status": {"observedGeneration": 4, "replicas": 3, "updatedReplicas": 3,
                             "readyReplicas": 3, "availableReplicas": 3}}  # fmt: skip
    state = status.deployment_state(deployment, "k")
    assert not state.rolled_out and state.generation_pending
    ready = status.derive_status(observed("built", state), None)
    assert ready["phase"] != "Ready"  # never Ready before: a first rollout waits for the controller
    was_ready = {"conditions": [{"type": "Ready", "status": "True", "reason": "Ready",
                                 "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z"}],
                 "engine": {"servingKey": KEY}}  # fmt: skip
    kept = status.derive_status(observed("built", state), was_ready)
    assert kept["phase"] == "Ready" and conds(kept)["Ready"] == ("True", "Ready")
    # Ready for another engine (a rollout whose status write failed): not a count change.
    other = {**was_ready, "engine": {"servingKey": OLD}}
    assert status.derive_status(observed("built", state), other)["phase"] != "Ready"
    rolling = status.derive_status(observed("built", state, template_changed=True), was_ready)
    assert rolling["phase"] == "Deploying" and conds(rolling)["Ready"][0] == "False"


def test_replicas_still_coming_are_said_beside_the_ones_serving() -> None:
    state = DeploymentState(KEY, 3, 3, 2, True, True, False)
    st = status.derive_status(observed("built", state, serve_issue=WAITING), None)
    assert st["phase"] == "Deploying"
    assert st["message"].startswith(f"engine {KEY[:10]} serves on 2/3 replicas; waiting: pod p")
    # Mid-rollout of the same engine, the new pod stuck: it serves, and waiting will not help.
    rolling = DeploymentState(KEY, 3, 3, 2, True, False, False)
    st = status.derive_status(observed("built", rolling, serve_issue=STUCK), None)
    assert st["phase"] == "Degraded"
    assert st["message"].startswith(f"engine {KEY[:10]} serves on 2/3 replicas: pod p")


# ---------------------------------------------------------------- what the pods say (diagnosis)


def pod(status_: dict[str, Any], created: str = "2026-01-01T00:00:00Z") -> dict[str, Any]:
    return {
        "metadata": {"name": "p", "creationTimestamp": created},
        "spec": {"containers": [{"name": "reranker", "resources": {"limits": {"memory": "10Gi"}}}]},
        "status": status_,
    }


def test_unschedulable_is_stuck_only_after_the_timeout() -> None:
    since = "2026-01-01T00:50:00Z"  # 10 minutes before NOW
    cond = {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
            "message": "0/3 nodes are available", "lastTransitionTime": since}  # fmt: skip
    p = pod({"phase": "Pending", "conditions": [cond]})
    assert diagnosis.pod_issue(p, NOW, 900) == PodIssue(
        "Unschedulable", "pod p cannot be scheduled: 0/3 nodes are available", False, since, "p"
    )
    assert diagnosis.pod_issue(p, NOW, 300).stuck


def test_a_container_run_again_between_crashes_is_still_crashing() -> None:
    """Between back-offs the kubelet runs a crash-looping container again: until it is ready it
    is still crashing, or the status would flap (and post a Warning) at every restart."""
    crashed = {"terminated": {"exitCode": 1, "reason": "Error", "message": "bad weights",
                              "startedAt": "2026-01-01T00:58:00Z",
                              "finishedAt": "2026-01-01T00:58:40Z"}}  # fmt: skip

    def running(
        restarts: int, init: bool = False, last: dict[str, Any] = crashed
    ) -> dict[str, Any]:
        cs = {"name": "reranker", "ready": False, "restartCount": restarts,
              "state": {"running": {}}, "lastState": last}  # fmt: skip
        key = "initContainerStatuses" if init else "containerStatuses"
        return pod({"phase": "Running", "conditions": [{"type": "Ready", "status": "False"}],
                    key: [cs]})  # fmt: skip

    again = diagnosis.pod_issue(running(4), NOW, 900)
    assert again is not None and again.reason == "CrashLoopBackOff" and again.stuck
    assert "bad weights" in again.message
    assert diagnosis.pod_issue(running(1), NOW, 900) is None  # one crash: starting again
    assert diagnosis.pod_issue(running(4, init=True), NOW, 900) is None  # a build's new attempt
    oom = {"terminated": {**crashed["terminated"], "exitCode": 137, "reason": "OOMKilled"}}
    issue = diagnosis.pod_issue(running(3, last=oom), NOW, 900)
    assert issue is not None and issue.reason == "OOMKilled"
    # A server that exits 0 after 40 s loops just the same.
    done = {
        "terminated": {**crashed["terminated"], "exitCode": 0, "reason": "Completed", "message": ""}
    }
    issue = diagnosis.pod_issue(running(3, last=done), NOW, 900)
    assert issue is not None and "Completed (exit code 0)" in issue.message
    # Ended after hours (a node reboot, exit 255): a restart, not a crash loop.
    rebooted = {"terminated": {"exitCode": 255, "reason": "Unknown",
                               "startedAt": "2025-12-31T20:00:00Z",
                               "finishedAt": "2026-01-01T00:58:00Z"}}  # fmt: skip
    assert diagnosis.pod_issue(running(3, last=rebooted), NOW, 900) is None


def test_ready_pods_and_running_pods_have_no_issue() -> None:
    running = {"name": "reranker", "state": {"running": {}}}
    ready = pod({"conditions": [{"type": "Ready", "status": "True"}], "containerStatuses": [
        {"name": "reranker", "state": {"waiting": {"reason": "CrashLoopBackOff"}}}]})  # fmt: skip
    assert diagnosis.pod_issue(pod({"containerStatuses": [running]}), NOW, 900) is None
    assert diagnosis.first_issue([ready], NOW, 900) is None


def test_the_newest_pod_speaks_first() -> None:
    def crashing(message: str, created: str) -> dict[str, Any]:
        return pod({"containerStatuses": [{"name": "reranker",
            "state": {"waiting": {"reason": "CrashLoopBackOff"}},
            "lastState": {"terminated": {"exitCode": 1, "message": message}}}]}, created)  # fmt: skip

    old, new = crashing("old", "2026-01-01T00:00:00Z"), crashing("new", "2026-01-01T00:10:00Z")
    issue = diagnosis.first_issue([old, new], NOW, 900)
    assert (
        issue is not None and issue.reason == "CrashLoopBackOff" and issue.message.endswith("new")
    )


def test_volume_detail_only_for_a_volume_wait() -> None:
    pvc = {"metadata": {"name": "rr-engine-cache"}, "status": {"phase": "Pending"},
           "spec": {"accessModes": ["ReadWriteMany"]}}  # fmt: skip
    gpu = PodIssue("Unschedulable", "pod p cannot be scheduled: Insufficient nvidia.com/gpu", False)
    assert diagnosis.with_volume_detail(gpu, pvc) == gpu
    volume = PodIssue(
        "Unschedulable", "pod p: pod has unbound immediate PersistentVolumeClaims", True
    )
    detailed = diagnosis.with_volume_detail(volume, pvc)
    assert detailed is not None and detailed.reason == "VolumeNotBound" and detailed.stuck
    assert (
        "cluster default StorageClass" in detailed.message and "ReadWriteMany" in detailed.message
    )
    bound = {**pvc, "status": {"phase": "Bound"}}
    assert diagnosis.with_volume_detail(volume, bound) == volume
    # A missing claim the scheduler names, not the cache (a PVC checkpoint's): left as it is.
    checkpoint = PodIssue("Unschedulable", 'pod p cannot be scheduled: 0/3 nodes are available: '
                          'persistentvolumeclaim "models" not found.', False)  # fmt: skip
    assert diagnosis.with_volume_detail(checkpoint, pvc) == checkpoint
    missing_cache = PodIssue(
        "Unschedulable", 'persistentvolumeclaim "rr-engine-cache" not found', False
    )
    detailed = diagnosis.with_volume_detail(missing_cache, pvc)
    assert detailed is not None and detailed.reason == "VolumeNotBound"


def test_per_pod_engine_state_from_the_build_init_container() -> None:
    def with_build(state: dict[str, Any], last: dict[str, Any] | None = None) -> dict[str, Any]:
        build: dict[str, Any] = {"name": "build", "state": state}
        if last:
            build["lastState"] = last
        return pod({"initContainerStatuses": [build]})

    assert status.per_pod_engine_state([], "build") == ("pending", "")
    assert status.per_pod_engine_state([with_build({"running": {}})], "build")[0] == "building"
    done = with_build({"terminated": {"exitCode": 0}})
    assert status.per_pod_engine_state([done], "build") == ("built", "")
    crash = with_build(
        {"waiting": {"reason": "CrashLoopBackOff"}},
        {"terminated": {"exitCode": 3, "message": "fp8 refused"}},
    )
    assert status.per_pod_engine_state([crash], "build") == ("failed", "fp8 refused")
    # A retry that runs again is building, and says what the last attempt ended with.
    retry = with_build({"running": {}}, {"terminated": {"exitCode": 3, "message": "x"}})
    assert status.per_pod_engine_state([retry], "build") == ("building", "x")
    st = status.derive_status(observed("building", job_name=None, build_message="x"), None)
    assert st["phase"] == "Building"
    assert conds(st)["EngineReady"] == ("False", "Building")
    assert st["message"].endswith("retrying after a failed attempt: x")


def test_hpa_scaling_condition_becomes_a_condition() -> None:
    scaling = {"type": "ScalingActive", "status": "False", "reason": "FailedGetPodsMetric",
               "message": "no custom metrics API"}  # fmt: skip
    st = status.derive_status(observed("built", dep(), scaling=scaling), None)
    assert conds(st)["ScalingActive"] == ("False", "FailedGetPodsMetric")
    assert st["phase"] == "Ready" and "no custom metrics API" in st["message"]
    hpa = {"status": {"conditions": [scaling]}}
    assert diagnosis.scaling_condition(hpa) == scaling
    assert diagnosis.scaling_condition(None) is None


# ---------------------------------------------------------------- the Gateway's word on the route

GW, GW_HTTPS = ("gateway-system", "gw", None), ("gateway-system", "gw", "https")


def route(generation: int = 2, *parents: tuple[dict[str, Any], list[dict[str, Any]]]) -> dict:
    return {
        "metadata": {"name": "rr", "namespace": "ml", "generation": generation},
        "status": {"parents": [
            {"parentRef": ref, "controllerName": "example.net/gateway", "conditions": c}
            for ref, c in parents
        ]},
    }  # fmt: skip


def cond(type_: str, ok: bool, reason: str, generation: int = 2, message: str = "") -> dict:
    return {"type": type_, "status": "True" if ok else "False", "reason": reason,
            "message": message, "observedGeneration": generation}  # fmt: skip


GW_REF = {"group": "gateway.networking.k8s.io", "kind": "Gateway", "namespace": "gateway-system",
          "name": "gw"}  # fmt: skip
ACCEPTED = [cond("Accepted", True, "Accepted"), cond("ResolvedRefs", True, "ResolvedRefs")]


@pytest.mark.parametrize(
    ("the_route", "parents", "verdict", "says"),
    [
        (None, [GW], None, None),  # not created yet
        (route(2), [GW], ("False", "Pending"), "not yet accepted by Gateway gateway-system/gw"),
        (route(2, (GW_REF, ACCEPTED)), [GW], ("True", "Accepted"),
         "accepted by Gateway gateway-system/gw"),
        # The listener named in the spec is the one that must answer.
        (route(2, (GW_REF, ACCEPTED)), [GW_HTTPS], ("False", "Pending"), "(listener https)"),
        (route(2, ({**GW_REF, "sectionName": "https"}, ACCEPTED)), [GW_HTTPS], ("True", "Accepted"), ""),
        # A Gateway in another namespace that does not allow routes from ours.
        (route(2, (GW_REF, [cond("Accepted", False, "NotAllowedByListeners",
                                  message="no listener allows routes from namespace ml")])),
         [GW], ("False", "NotAllowedByListeners"),
         "Gateway gateway-system/gw: no listener allows routes from namespace ml"),
        (route(2, (GW_REF, [cond("Accepted", True, "Accepted"),
                             cond("ResolvedRefs", False, "BackendNotFound", message="service rr")])),
         [GW], ("False", "BackendNotFound"), "service rr"),
        # Accepted for the route's previous spec only: not yet for this one.
        (route(3, (GW_REF, ACCEPTED)), [GW], ("False", "Pending"), "not yet accepted"),
        # Two Gateways: one refusal is enough to say so, one silence keeps it pending.
        (route(2, (GW_REF, ACCEPTED)), [GW, ("ml", "internal", None)], ("False", "Pending"),
         "Gateway ml/internal"),
        (route(2, (GW_REF, ACCEPTED), ({"name": "internal"}, [cond("Accepted", False, "NoMatchingParent")])),
         [GW, ("ml", "internal", None)], ("False", "NoMatchingParent"), "Gateway ml/internal: NoMatchingParent"),
        # A refusal of the route's previous spec: this one is not yet answered.
        (route(3, (GW_REF, [cond("Accepted", False, "NotAllowedByListeners", generation=2)])),
         [GW], ("False", "Pending"), "current spec (generation 3)"),
        (route(2, (GW_REF, [cond("Accepted", True, "Accepted") | {"status": "Unknown", "reason": "Pending"}])),
         [GW], ("False", "Pending"), "not yet accepted"),
        # Two controllers on one Gateway: one refusal is a refusal, whatever the other says.
        (route(2, (GW_REF, ACCEPTED), (GW_REF, [cond("Accepted", False, "UnsupportedValue")])),
         [GW], ("False", "UnsupportedValue"), "Gateway gateway-system/gw"),
        # A controller that writes no observedGeneration speaks of the current spec.
        (route(2, (GW_REF, [{"type": "Accepted", "status": "True", "reason": "Accepted"}])),
         [GW], ("True", "Accepted"), "accepted by"),
    ],
)  # fmt: skip
def test_the_routes_acceptance_is_read_from_its_status(
    the_route: dict | None, parents: list, verdict: tuple | None, says: str | None
) -> None:
    got = diagnosis.route_condition(the_route, parents)
    if verdict is None:
        assert got is None
        return
    assert got is not None and (got["status"], got["reason"]) == verdict
    assert says in got["message"]
    # Only a refusal adds to the Reranker's message, in its own words.
    problem = {
        "Accepted": "",
        "Pending": "",
        "BackendNotFound": "the HTTPRoute cannot send to the Service",
    }
    assert got["problem"] == problem.get(got["reason"], "the HTTPRoute is refused")


def test_the_routes_acceptance_becomes_a_condition() -> None:
    refused = {"status": "False", "reason": "NotAllowedByListeners", "message": "Gateway x/gw: no",
               "problem": "the HTTPRoute is refused"}  # fmt: skip
    st = status.derive_status(observed("built", dep(), route=refused), None)
    assert conds(st)["RouteAccepted"] == ("False", "NotAllowedByListeners")
    # In-cluster clients are served: Ready, and the message says what the route's clients miss.
    assert st["phase"] == "Ready"
    assert st["message"].endswith(
        "; the HTTPRoute is refused (NotAllowedByListeners: Gateway x/gw: no)"
    )
    pending = {"status": "False", "reason": "Pending", "message": "not yet accepted", "problem": ""}
    st = status.derive_status(observed("built", dep(), route=pending), None)
    assert conds(st)["RouteAccepted"] == ("False", "Pending") and "HTTPRoute" not in st["message"]
    accepted = {"status": "True", "reason": "Accepted", "message": "accepted by x", "problem": ""}
    st = status.derive_status(observed("built", dep(), route=accepted), None)
    assert conds(st)["RouteAccepted"] == ("True", "Accepted")
    assert "RouteAccepted" not in conds(status.derive_status(observed("built", dep()), None))


def test_what_other_controllers_say_still_fits_the_schema() -> None:
    """An HPA's or a Gateway's reason and message go into conditions as they are, unless the
    CRD's schema would refuse them (then the whole status write would fail)."""
    long = "x" * 40000
    scaling = {"type": "ScalingActive", "status": "False", "reason": "failed-get metric",
               "message": long}  # fmt: skip
    st = status.derive_status(observed("built", dep(), scaling=scaling), None)
    (cond_,) = [c for c in st["conditions"] if c["type"] == "ScalingActive"]
    assert cond_["reason"] == "failedgetmetric"
    assert len(cond_["message"]) == status.MESSAGE_MAX and cond_["message"].endswith("\u2026")
    assert len(st["message"]) == status.MESSAGE_MAX
    assert status.safe_reason("NotAllowedByListeners") == "NotAllowedByListeners"
    assert status.safe_reason("1-bad") == "bad" and status.safe_reason("--") == "Unknown"
    refused = diagnosis.route_condition(
        route(2, (GW_REF, [cond("Accepted", False, "NotAllowedByListeners", message=long)])), [GW]
    )
    assert refused is not None and len(refused["message"]) < 1100  # clipped for reading


# ---------------------------------------------------------------- Shared cache pruning


@pytest.mark.parametrize(
    "history,built,key,keep,drop,kept",
    [
        ([], {"a"}, "a", 1, [], ["a"]),
        (["a"], {"a", "b"}, "b", 1, [], ["a", "b"]),
        (["a", "b"], {"a", "b", "c"}, "c", 1, ["a"], ["b", "c"]),
        (["a", "b"], {"a", "b", "c"}, "c", 0, ["a", "b"], ["c"]),
        (["a", "b"], {"a", "b", "c", "x"}, "c", 1, ["x", "a"], ["b", "c"]),  # x: never served
        (["b", "a"], {"a", "b"}, "b", 1, [], ["a", "b"]),  # a rollback to b keeps a
        (["a", "a", "b"], {"a", "b"}, "a", 5, [], ["b", "a"]),
    ],
)
def test_engines_to_keep(
    history: list[str], built: set[str], key: str, keep: int, drop: list[str], kept: list[str]
) -> None:
    from reranker_operator.reconcile import engines_to_keep

    assert engines_to_keep(history, built, key, keep) == (drop, kept)
