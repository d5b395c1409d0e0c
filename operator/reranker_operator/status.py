"""The Reranker's status, derived from what the reconcile observed: pure functions, no I/O.

Conditions follow `metav1.Condition` (type, status, reason in CamelCase, message,
lastTransitionTime, observedGeneration). `lastTransitionTime` only moves when a condition's
status flips, so a status write that changes nothing is skipped entirely (`status_patch`).

Meaning (docs/operator-lifecycle.md):
- EngineReady: the engine for the *current* spec (its engine key) is built.
- Available: the Deployment serves requests (any engine: an older one keeps serving while a new
  one builds).
- Ready = EngineReady and Available and the Deployment runs the current engine, rolled out.
"""

from __future__ import annotations

import datetime
import re
from dataclasses import dataclass
from typing import Any, Literal

from reranker_operator.diagnosis import (
    PodIssue,
    clip,
    container_status,
    describe_termination,
    failed_termination,
    is_ready,
    newest_first,
)

Phase = Literal["Pending", "Building", "Deploying", "Ready", "Degraded", "Failed"]

ENGINE_READY = "EngineReady"
AVAILABLE = "Available"
READY = "Ready"
SCALING_ACTIVE = "ScalingActive"  # mirrored from the HPA when autoscaling
ROUTE_ACCEPTED = "RouteAccepted"  # the HTTPRoute's Gateways' word, with spec.httpRoute
MESSAGE_MAX = 32768  # metav1.Condition's message limit, and the CRD's for status.message
_REASON_PATTERN = re.compile(r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$")  # metav1.Condition's


def safe_reason(reason: str) -> str:
    """A reason in metav1.Condition's form (CamelCase word characters, at most 1024): another
    controller's reason, which may not be, with the other characters dropped."""
    if _REASON_PATTERN.match(reason) and len(reason) <= 1024:
        return reason
    kept = re.sub(r"[^A-Za-z0-9_]", "", reason).lstrip("0123456789_")[:1024]
    return kept or "Unknown"


# Build state of the engine for the current key.
EngineState = Literal["pending", "building", "built", "failed"]


@dataclass(frozen=True)
class DeploymentState:
    """What the Deployment's status says (see `deployment_state`)."""

    engine_key: str | None  # the engine it serves (its reranker.dev/engine-key annotation)
    desired: int
    replicas: int
    ready_replicas: int
    available: bool
    rolled_out: bool  # no pods of an older template left, and the controller saw the last change
    progress_failed: bool  # Progressing=False (ProgressDeadlineExceeded)
    progress_message: str = ""
    # ReplicaFailure=True: the ReplicaSet cannot create (or delete) pods (a ResourceQuota, a
    # LimitRange, an admission webhook); no pod exists to say so. Its message, reason, since when.
    replica_failure: str = ""
    replica_failure_reason: str = ""
    replica_failure_since: str | None = None
    # Only new pods, but for a generation its controller has not observed yet: a change of the
    # replica count (ours, an autoscaler's) bumps the generation as a template change does.
    generation_pending: bool = False


@dataclass(frozen=True)
class Observed:
    """Everything the status is derived from, as gathered by one reconcile."""

    name: str
    namespace: str
    generation: int | None
    engine_key: str
    job_name: str | None  # the build Job (Shared mode); None when pods build their own engine
    image: str  # the runtime image the engine is built with
    engine: EngineState
    # The failed build's termination message; while a Job retries, its failed attempt's.
    build_message: str = ""
    built_at: str | None = None  # the build Job's completionTime, when this reconcile saw it
    deployment: DeploymentState | None = None
    endpoint: str | None = None
    external_endpoint: str | None = None  # the Ingress's URL, or a LoadBalancer's address
    selector: str | None = None
    engine_issue: PodIssue | None = None  # why the engine's preparation does not run
    serve_issue: PodIssue | None = None  # why the Deployment's new pods do not become ready
    scaling: dict[str, Any] | None = None  # the HPA's ScalingActive condition
    route: dict[str, str] | None = None  # diagnosis.route_condition of the HTTPRoute
    surge_rollout: bool = True  # spec.rollout starts new pods before old ones go (maxSurge > 0)
    template_changed: bool = False  # this reconcile created the Deployment or changed its pods

    @property
    def builder(self) -> str:
        return f"Job {self.job_name}" if self.job_name else "the pods' build init container"


def now_iso() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def short(key: str | None) -> str:
    return (key or "")[:10]


def condition(
    type_: str,
    status: bool,
    reason: str,
    message: str,
    generation: int | None,
    previous: list[dict[str, Any]] | None,
    now: str,
) -> dict[str, Any]:
    """A metav1.Condition; lastTransitionTime is kept from `previous` unless the status flips."""
    status_str = "True" if status else "False"
    transition = now
    for old in previous or []:
        if (
            old.get("type") == type_
            and old.get("status") == status_str
            and old.get("lastTransitionTime")
        ):
            transition = old["lastTransitionTime"]
    cond: dict[str, Any] = {
        "type": type_,
        "status": status_str,
        # Reasons and messages copied from other controllers (an HPA's, a Gateway's) must still
        # pass the CRD's schema, or the whole status write fails.
        "reason": safe_reason(reason),
        "message": clip(message, MESSAGE_MAX),
        "lastTransitionTime": transition,
    }
    if generation is not None:
        cond["observedGeneration"] = generation
    return cond


def get_condition(status: dict[str, Any] | None, type_: str) -> dict[str, Any] | None:
    for cond in (status or {}).get("conditions") or []:
        if cond.get("type") == type_:
            return cond
    return None


# --------------------------------------------------------------------------- children's state


def job_state(job: dict[str, Any] | None) -> EngineState:
    """pending (no pod yet), building, built (succeeded) or failed, from a Job's status."""
    if job is None:
        return "pending"
    status = job.get("status") or {}
    for cond in status.get("conditions") or []:
        if cond.get("status") != "True":
            continue
        if cond.get("type") in ("Complete", "SuccessCriteriaMet"):
            return "built"
        if cond.get("type") in ("Failed", "FailureTarget"):
            return "failed"
    if (status.get("succeeded") or 0) >= 1:
        return "built"
    if (status.get("active") or 0) >= 1:
        return "building"
    return "pending"


def job_failure_message(job: dict[str, Any]) -> str:
    """The Job's own Failed condition text (e.g. backoff limit, deadline), as a fallback."""
    for cond in (job.get("status") or {}).get("conditions") or []:
        if cond.get("type") in ("Failed", "FailureTarget") and cond.get("status") == "True":
            parts = [p for p in (cond.get("reason"), cond.get("message")) if p]
            return ": ".join(parts)
    return ""


def termination_message(pods: list[dict[str, Any]]) -> str:
    """The newest failed termination among a Job's pods: what `build` wrote, or OOMKilled with
    the memory limit."""
    found: list[tuple[str, str]] = []
    for pod in pods:
        for cs in (pod.get("status") or {}).get("containerStatuses") or []:
            for state in (cs.get("state") or {}, cs.get("lastState") or {}):
                term = state.get("terminated") or {}
                if term and term.get("exitCode", 1) != 0:
                    text = describe_termination(pod, cs.get("name", ""), term)
                    found.append((term.get("finishedAt") or "", text))
    if not found:
        return ""
    return max(found)[1]


def job_pods_running(pods: list[dict[str, Any]]) -> bool | None:
    """Whether a build pod runs (None: no pods seen). A Job counts a Pending pod as active."""
    if not pods:
        return None
    return any((p.get("status") or {}).get("phase") == "Running" for p in pods)


def per_pod_engine_state(
    pods: list[dict[str, Any]], build_container: str
) -> tuple[EngineState, str]:
    """PerPod mode: the engine's state from the pods that build it in an init container.

    built: a pod's build finished (or the pod is Ready); failed: the newest pod's build exited
    non-zero (its termination message, or OOMKilled with the limit); building: a build runs,
    with the failure of the attempt before it when the kubelet runs it again ("retrying").
    """
    pods = newest_first(pods)
    for pod in pods:
        term = (container_status(pod, build_container).get("state") or {}).get("terminated")
        if is_ready(pod) or (term is not None and term.get("exitCode") == 0):
            return "built", ""
    for pod in pods:
        cs = container_status(pod, build_container)
        failure = failed_termination(cs)
        if failure is not None:
            return "failed", describe_termination(pod, build_container, failure)
        if "running" in (cs.get("state") or {}):
            last = (cs.get("lastState") or {}).get("terminated") or {}
            failed = last.get("exitCode", 0) != 0
            return "building", describe_termination(pod, build_container, last) if failed else ""
    return "pending", ""


def deployment_state(deployment: dict[str, Any], engine_key_annotation: str) -> DeploymentState:
    meta = deployment.get("metadata") or {}
    spec = deployment.get("spec") or {}
    status = deployment.get("status") or {}
    desired = int(spec.get("replicas", 1))
    replicas = int(status.get("replicas") or 0)
    ready = int(status.get("readyReplicas") or 0)
    available_replicas = int(status.get("availableReplicas") or 0)
    conditions = {c.get("type"): c for c in status.get("conditions") or []}
    # Serving: any replica answers. Not the Deployment's own Available condition, which with
    # maxUnavailable 0 (the default rollout) means "every replica": one crashing pod of three,
    # or a scale-up waiting for a GPU, would read as nothing serving.
    available = (available_replicas or ready) > 0

    progressing = conditions.get("Progressing") or {}
    progress_failed = progressing.get("status") == "False"
    failure = conditions.get("ReplicaFailure") or {}
    failing = failure.get("status") == "True"

    # Rolled out: the controller saw the latest template, and only its pods remain.
    generation, observed = meta.get("generation"), status.get("observedGeneration")
    seen = generation is None or observed is None or observed >= generation
    updated = status.get("updatedReplicas")
    only_new = updated is None or int(updated) >= replicas
    return DeploymentState(
        engine_key=(meta.get("annotations") or {}).get(engine_key_annotation),
        desired=desired,
        replicas=replicas,
        ready_replicas=ready,
        available=available,
        rolled_out=seen and only_new,
        progress_failed=progress_failed,
        progress_message=progressing.get("message") or "",
        replica_failure=(failure.get("message") or "no message") if failing else "",
        replica_failure_reason=(failure.get("reason") or "FailedCreate") if failing else "",
        replica_failure_since=failure.get("lastTransitionTime") if failing else None,
        generation_pending=only_new and not seen,
    )


# --------------------------------------------------------------------------- derivation


def derive_status(
    observed: Observed, previous: dict[str, Any] | None, now: str | None = None
) -> dict[str, Any]:
    """The full status for `observed`; `previous` supplies unchanged lastTransitionTimes."""
    now = now or now_iso()
    prev_conditions = (previous or {}).get("conditions") or []
    gen = observed.generation
    key = observed.engine_key
    dep = observed.deployment
    serving_key = dep.engine_key if dep is not None else None
    available = dep is not None and dep.available
    serving_old = available and serving_key is not None and serving_key != key
    still_serving = f"; still serving engine {short(serving_key)}" if serving_old else ""
    preparing = observed.engine in ("pending", "building")
    engine_issue = observed.engine_issue if preparing else None
    serve_issue = observed.serve_issue
    # The Deployment's new pods: in Shared mode the engine's issue is the build Job's pod, which
    # spec.rollout does not place.
    new_pod_issue = serve_issue if observed.job_name else (engine_issue or serve_issue)
    if (
        serving_old
        and observed.surge_rollout
        and new_pod_issue is not None
        and new_pod_issue.reason == "Unschedulable"
    ):
        # The usual cause on a fixed GPU pool: no room for the surge pod beside the old ones.
        still_serving += (
            "; if no node has a spare GPU for the new pod, set spec.rollout maxSurge 0 and "
            "maxUnavailable 1 to replace pods in place"
        )
    # When something fails: Degraded while older pods keep serving, else Failed.
    broken: Phase = "Degraded" if available else "Failed"

    # EngineReady: the engine of the current spec.
    if observed.engine == "built":
        engine_cond = (True, "EngineBuilt", f"engine {short(key)} is built")
    elif observed.engine == "failed":
        detail = observed.build_message or "the build failed"
        engine_cond = (False, "BuildFailed", f"{observed.builder} failed: {detail}")
    elif engine_issue is not None:
        engine_cond = (False, engine_issue.reason, engine_issue.message)
    elif observed.engine == "building":
        engine_cond = (False, "Building", f"{observed.builder} is building engine {short(key)}")
    else:
        engine_cond = (
            False,
            "Building",
            f"{observed.builder} is waiting to start (engine {short(key)})",
        )
    if preparing and observed.build_message:
        engine_cond = (
            engine_cond[0],
            engine_cond[1],
            f"{engine_cond[2]}; retrying after a failed attempt: {observed.build_message}",
        )

    # Available: anything serving.
    if dep is None:
        available_cond = (
            False,
            "NotDeployed",
            "no runtime Deployment yet (waiting for the engine)",
        )
    elif dep.desired == 0:
        available_cond = (False, "ScaledToZero", "0 replicas (spec.replicas, or the autoscaler)")
    elif available:
        available_cond = (
            True,
            "MinimumReplicasAvailable",
            f"{dep.ready_replicas}/{dep.desired} replicas ready",
        )
    elif dep.progress_failed:
        available_cond = (
            False,
            "ProgressDeadlineExceeded",
            dep.progress_message or "the rollout is stuck",
        )
    elif serve_issue is not None:
        available_cond = (False, serve_issue.reason, serve_issue.message)
    else:
        available_cond = (
            False,
            "ReplicasNotReady",
            f"{dep.ready_replicas}/{dep.desired} replicas ready",
        )

    was_ready = (get_condition(previous, READY) or {}).get("status") == "True"
    # A generation its controller has not seen yet, after Ready, and no template change of ours:
    # a count change (`kubectl scale rr`, an autoscaler's step), which rolls nothing.
    was_serving = ((previous or {}).get("engine") or {}).get("servingKey")
    rolled_out = dep is not None and (
        dep.rolled_out
        or (
            dep.generation_pending
            and was_ready
            and not observed.template_changed
            and serving_key == was_serving
        )
    )
    rolled_to_current = dep is not None and serving_key == key and rolled_out
    serves_current = observed.engine == "built" and available and rolled_to_current
    # Ready, once every replica of the current engine is: a scale-up or a replaced pod then
    # keeps it, as long as nothing is stuck.
    full = dep is not None and dep.ready_replicas >= dep.desired
    ready = serves_current and (full or was_ready)
    short_handed = serves_current and serve_issue is not None and serve_issue.stuck and not full

    # Phase, Ready's reason and the message, from the most important fact down.
    if observed.engine == "failed":
        phase: Phase = broken
        ready_cond = (False, "BuildFailed", engine_cond[2])
        message = (
            f"engine build failed: {observed.build_message or observed.builder}{still_serving}"
        )
    elif dep is not None and dep.progress_failed and (serving_key == key or not available):
        phase = broken
        ready_cond = (
            False,
            "ProgressDeadlineExceeded",
            dep.progress_message or "the rollout is stuck",
        )
        message = f"the rollout of engine {short(serving_key)} is stuck: {dep.progress_message}"
    elif engine_issue is not None:
        ready_cond = (False, engine_issue.reason, engine_issue.message)
        if engine_issue.stuck:
            phase = broken
            message = f"engine {short(key)} cannot be prepared: {engine_issue.message}"
        else:
            phase = "Pending"
            message = f"engine {short(key)} is waiting: {engine_issue.message}"
        message += still_serving
    elif preparing:
        phase = "Building" if observed.engine == "building" else "Pending"
        ready_cond = (False, "EngineBuilding", engine_cond[2])
        message = engine_cond[2] + still_serving
    elif short_handed and serve_issue is not None and dep is not None:
        # It serves, on fewer replicas than asked for, and waiting will not add the others.
        phase = "Degraded"
        ready_cond = (False, serve_issue.reason, serve_issue.message)
        message = (
            f"engine {short(key)} serves on {dep.ready_replicas}/{dep.desired} replicas: "
            f"{serve_issue.message}"
        )
    elif dep is not None and dep.desired == 0 and not preparing:
        # Nothing serves, by choice: neither a failure nor a rollout.
        phase = "Pending"
        ready_cond = (False, "ScaledToZero", available_cond[2])
        built = "built" if observed.engine == "built" else "ready to build"
        message = f"engine {short(key)} is {built}; scaled to zero replicas"
    elif ready:
        phase = "Ready"
        ready_cond = (True, "Ready", f"serving engine {short(key)} at {observed.endpoint}")
        message = f"serving engine {short(key)}: {available_cond[2]}"
    elif serve_issue is not None:
        phase = broken if serve_issue.stuck else "Deploying"
        ready_cond = (False, serve_issue.reason, serve_issue.message)
        if available and serving_key == key and dep is not None:
            waiting = ": " if serve_issue.stuck else "; waiting: "
            message = (
                f"engine {short(key)} serves on {dep.ready_replicas}/{dep.desired} replicas"
                f"{waiting}{serve_issue.message}"
            )
        else:
            message = f"engine {short(key)} does not serve: {serve_issue.message}{still_serving}"
    else:
        phase = "Deploying"
        if serving_key != key:
            detail = f"rolling out engine {short(key)}"
        elif not available or rolled_out:
            detail = f"waiting for replicas ({available_cond[2]})"
        else:
            detail = f"rolling out ({available_cond[2]})"
        ready_cond = (False, "Deploying", detail)
        message = detail + still_serving

    conditions = [
        condition(ENGINE_READY, *engine_cond, gen, prev_conditions, now),
        condition(AVAILABLE, *available_cond, gen, prev_conditions, now),
        condition(READY, *ready_cond, gen, prev_conditions, now),
    ]
    scaling = observed.scaling
    if scaling is not None:
        active = scaling.get("status") == "True"
        reason = scaling.get("reason") or ("ValidMetricFound" if active else "ScalingInactive")
        text = scaling.get("message") or ""
        conditions.append(
            condition(SCALING_ACTIVE, active, reason, text, gen, prev_conditions, now)
        )
        if not active:
            message += f"; the autoscaler cannot scale ({reason}: {text})"
    route = observed.route
    if route is not None:
        accepted = route["status"] == "True"
        conditions.append(
            condition(
                ROUTE_ACCEPTED, accepted, route["reason"], route["message"], gen,
                prev_conditions, now,
            )
        )  # fmt: skip
        if route.get("problem"):
            # In-cluster clients are served; the route's clients are not.
            message += f"; {route['problem']} ({route['reason']}: {route['message']})"
    status: dict[str, Any] = {
        "phase": phase,
        "message": clip(message, MESSAGE_MAX),
        "conditions": conditions,
        "engine": {"key": key, "shortKey": short(key), "image": observed.image},
        "replicas": dep.replicas if dep is not None else 0,
        "readyReplicas": dep.ready_replicas if dep is not None else 0,
    }
    if observed.job_name:
        status["engine"]["jobName"] = observed.job_name
    if observed.engine == "built":
        prev_engine = (previous or {}).get("engine") or {}
        built_at = prev_engine.get("builtAt") if prev_engine.get("key") == key else None
        if built_at or observed.built_at:
            status["engine"]["builtAt"] = built_at or observed.built_at
    if serving_key:
        status["engine"]["servingKey"] = serving_key
    if gen is not None:
        status["observedGeneration"] = gen
    if observed.endpoint:
        status["endpoint"] = observed.endpoint
    if observed.external_endpoint:
        status["externalEndpoint"] = observed.external_endpoint
    if observed.selector:
        status["selector"] = observed.selector
    return status


def invalid_spec_status(
    field: str,
    message: str,
    generation: int | None,
    previous: dict[str, Any] | None,
    now: str | None = None,
) -> dict[str, Any]:
    """Failed, naming the field. Children already running are left alone (see the docs)."""
    text = f"invalid spec: {field}: {message}"
    return _not_ready_status("Failed", "InvalidSpec", text, generation, previous, now)


def refused_status(
    reason: str,
    message: str,
    generation: int | None,
    previous: dict[str, Any] | None,
    now: str | None = None,
) -> dict[str, Any]:
    """The API server refuses what the reconcile needs (RBAC, a quota, a missing API, a name
    taken): Degraded while the Deployment still serves, else Failed."""
    available = (get_condition(previous, AVAILABLE) or {}).get("status") == "True"
    phase: Phase = "Degraded" if available else "Failed"
    return _not_ready_status(phase, reason, message, generation, previous, now)


def _not_ready_status(
    phase: Phase,
    reason: str,
    text: str,
    generation: int | None,
    previous: dict[str, Any] | None,
    now: str | None,
) -> dict[str, Any]:
    """`previous` with Ready=False for `reason`: what is known of the children is kept."""
    now = now or now_iso()
    prev = dict(previous or {})
    prev_conditions = prev.get("conditions") or []
    conditions = [c for c in prev_conditions if c.get("type") != READY]
    conditions.append(condition(READY, False, reason, text, generation, prev_conditions, now))
    status: dict[str, Any] = {**prev, "phase": phase, "message": text, "conditions": conditions}
    if generation is not None:
        status["observedGeneration"] = generation
    return status


def status_patch(old: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any] | None:
    """A JSON merge patch turning `old` into `new` (None-valued keys delete); None if equal."""
    old = old or {}
    if old == new:
        return None
    return _merge_diff(old, new)


def _merge_diff(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    patch: dict[str, Any] = {}
    for key in old.keys() - new.keys():
        patch[key] = None
    for key, value in new.items():
        before = old.get(key)
        if isinstance(value, dict) and isinstance(before, dict):
            sub = _merge_diff(before, value)
            if sub:
                patch[key] = sub
        elif before != value or key not in old:
            patch[key] = value
    return patch
