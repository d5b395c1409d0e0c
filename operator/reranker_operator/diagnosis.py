"""What the scheduler, the kubelet and the HPA say about a Reranker's pods: pure functions.

A Job whose pod cannot start still counts as `active`, and a Deployment only says "not
available" after its progress deadline. The reasons are on the pods (PodScheduled=False with
the scheduler's message, `waiting.reason: ImagePullBackOff`, `terminated.reason: OOMKilled`, ...),
on the PVC (Pending), and in the HPA's conditions. `pod_issue` turns the first of those into a
`PodIssue` (a CamelCase reason and one line naming the pod, the container and what to do), which
status.py puts into the phase, the message and the conditions.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any

from reranker_operator.builders import BUILD_CONTAINER

# A waiting container with one of these reasons will not start until someone changes something.
_IMAGE_REASONS = ("ImagePullBackOff", "ErrImagePull", "InvalidImageName", "ErrImageNeverPull")
_CONFIG_REASONS = ("CreateContainerConfigError", "CreateContainerError")
_VOLUME_WORDS = ("persistentvolumeclaim", "volume")
# A container restarted after a run shorter than this is crash-looping (the kubelet resets its
# back-off after 10 minutes of running).
CRASH_LOOP_RUN_SECONDS = 600
# A scheduled pod's containers wait with these while its volumes mount and its images pull.
_STARTING_REASONS = ("ContainerCreating", "PodInitializing")


@dataclass(frozen=True)
class PodIssue:
    """Why a pod does not run (or keeps failing)."""

    reason: str  # CamelCase, used as the condition's reason
    message: str
    stuck: bool  # will not resolve by waiting (or has waited past the configured time)
    since: str | None = None  # when a waitable issue (Unschedulable) began
    pod: str = ""


def parse_time(value: str | None) -> datetime.datetime | None:
    if not value:
        return None
    try:
        return datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def _name(obj: dict[str, Any]) -> str:
    return str((obj.get("metadata") or {}).get("name", ""))


def is_ready(pod: dict[str, Any]) -> bool:
    for cond in (pod.get("status") or {}).get("conditions") or []:
        if cond.get("type") == "Ready":
            return bool(cond.get("status") == "True")
    return False


def newest_first(pods: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Pods not being deleted, the most recently created first."""
    live = [p for p in pods if not (p.get("metadata") or {}).get("deletionTimestamp")]
    return sorted(
        live, key=lambda p: (p.get("metadata") or {}).get("creationTimestamp") or "", reverse=True
    )


def memory_limit(pod: dict[str, Any], container: str) -> str:
    spec = pod.get("spec") or {}
    for c in (spec.get("initContainers") or []) + (spec.get("containers") or []):
        if c.get("name") == container:
            return str(((c.get("resources") or {}).get("limits") or {}).get("memory", "none"))
    return "unknown"


def container_status(pod: dict[str, Any], name: str) -> dict[str, Any]:
    status = pod.get("status") or {}
    for cs in (status.get("initContainerStatuses") or []) + (status.get("containerStatuses") or []):
        if cs.get("name") == name:
            return dict(cs)
    return {}


def describe_termination(pod: dict[str, Any], container: str, term: dict[str, Any]) -> str:
    """One line for a terminated container: OOMKilled with the limit, else what it wrote."""
    output = (term.get("message") or "").strip()
    if term.get("reason") == "OOMKilled":
        # The build's memory can be raised alone (serving needs less than converting).
        field = "resources.build.memory" if container == BUILD_CONTAINER else "resources.memory"
        text = f"OOMKilled (memory limit {memory_limit(pod, container)}): raise spec.{field}"
        return f"{text}; last output: {output}" if output else text
    return output or f"{term.get('reason') or 'Error'} (exit code {term.get('exitCode')})"


def failed_termination(cs: dict[str, Any]) -> dict[str, Any] | None:
    """The container's failed termination that is current: its state, or its last state while it
    waits to be restarted (CrashLoopBackOff). None while it runs again or after a success."""
    state = cs.get("state") or {}
    term = state.get("terminated")
    if term is None and "waiting" in state:
        term = (cs.get("lastState") or {}).get("terminated")
    if term and term.get("exitCode", 1) != 0:
        return dict(term)
    return None


def pod_issue(
    pod: dict[str, Any],
    now: datetime.datetime,
    unschedulable_timeout: float,
    containers: tuple[str, ...] | None = None,
) -> PodIssue | None:
    """Why `pod` does not run, or None. `containers` limits the container checks to those names."""
    name = _name(pod)
    status = pod.get("status") or {}
    for cond in status.get("conditions") or []:
        if (
            cond.get("type") == "PodScheduled"
            and cond.get("status") == "False"
            and cond.get("reason") == "Unschedulable"
        ):
            since = cond.get("lastTransitionTime") or (pod.get("metadata") or {}).get(
                "creationTimestamp"
            )
            started = parse_time(since)
            waited = (now - started).total_seconds() if started else 0.0
            message = cond.get("message") or "no node fits"
            return PodIssue(
                reason="Unschedulable",
                message=f"pod {name} cannot be scheduled: {message}",
                stuck=waited >= unschedulable_timeout,
                since=since,
                pod=name,
            )
    statuses = (status.get("initContainerStatuses") or []) + (status.get("containerStatuses") or [])
    for cs in statuses:
        container = cs.get("name", "")
        if containers is not None and container not in containers:
            continue
        waiting = (cs.get("state") or {}).get("waiting") or {}
        reason, detail = waiting.get("reason"), waiting.get("message") or ""
        where = f"container {container} of pod {name}"
        if reason in _IMAGE_REASONS:
            return PodIssue(
                "ImagePullBackOff",
                f"{where} cannot pull image {cs.get('image', '')}: {detail or reason}; check the "
                "image name and the runtime image pull secrets",
                stuck=True,
                pod=name,
            )
        if reason in _CONFIG_REASONS:
            return PodIssue(
                "CreateContainerConfigError",
                f"{where} cannot start: {detail or reason}; create the Secret or key it names",
                stuck=True,
                pod=name,
            )
        term = failed_termination(cs)
        crashing = reason == "CrashLoopBackOff"
        if term is None and _restarted_again(cs, status):
            # The kubelet runs it again between back-offs: still crashing until it is ready,
            # or the status would flap between crashing and starting at every restart.
            term, crashing = dict((cs.get("lastState") or {}).get("terminated") or {}), True
        if term is not None and term.get("reason") == "OOMKilled":
            return PodIssue(
                "OOMKilled",
                f"{where} was {describe_termination(pod, container, term)}",
                True,
                pod=name,
            )
        if crashing:
            # A container that exits 0 loops too: its last termination says how it ended.
            term = term or (cs.get("lastState") or {}).get("terminated") or {}
            last = describe_termination(pod, container, term)
            return PodIssue(
                "CrashLoopBackOff",
                f"{where} keeps crashing ({cs.get('restartCount', 0)} restarts): {last}",
                stuck=True,
                pod=name,
            )
    started = parse_time(starting_since(pod))
    if started is not None and (now - started).total_seconds() >= unschedulable_timeout:
        waited = int((now - started).total_seconds())
        return PodIssue(
            "ContainersNotStarting",
            f"pod {name} was scheduled {waited} s ago and has started no container: usually a "
            "volume that cannot be mounted (a missing ConfigMap or Secret, a claim attached to "
            "another node) or an image pull that does not finish; `kubectl describe pod "
            f"{name}` shows its events",
            stuck=True,
            pod=name,
        )
    return None


def _restarted_again(cs: dict[str, Any], pod_status: dict[str, Any]) -> bool:
    """A (non-init) container running again, not ready yet, after at least two restarts the
    last of which ended a short run: crash-looping, between two back-offs. A long run that
    ended (a node reboot, a liveness kill after hours) is a restart, not a crash loop, as the
    kubelet's back-off, reset after 10 minutes of running, counts it."""
    if cs not in (pod_status.get("containerStatuses") or []):
        return False  # an init container (a build) that runs again is a new attempt
    last = (cs.get("lastState") or {}).get("terminated") or {}
    started, finished = parse_time(last.get("startedAt")), parse_time(last.get("finishedAt"))
    short_run = (
        started is not None
        and finished is not None
        and (finished - started).total_seconds() < CRASH_LOOP_RUN_SECONDS
    )
    return (
        "running" in (cs.get("state") or {})
        and not cs.get("ready")
        and int(cs.get("restartCount") or 0) >= 2
        and short_run
    )


def starting_since(pod: dict[str, Any]) -> str | None:
    """When a scheduled pod that has not started any container was scheduled; None once one
    runs or ran, before it is scheduled, or when a container waits for a named reason (an image
    pull failing, a missing Secret: `pod_issue` reports those). Mounting volumes happens in this
    window, and a mount that fails shows only in the pod's events."""
    status = pod.get("status") or {}
    if status.get("phase") not in (None, "Pending"):
        return None
    conditions = status.get("conditions") or []
    scheduled = next((c for c in conditions if c.get("type") == "PodScheduled"), None)
    if scheduled is None or scheduled.get("status") != "True":
        return None
    for cs in (status.get("initContainerStatuses") or []) + (status.get("containerStatuses") or []):
        state = cs.get("state") or {}
        if "running" in state or "terminated" in state or (cs.get("lastState") or {}):
            return None
        reason = (state.get("waiting") or {}).get("reason")
        if reason and reason not in _STARTING_REASONS:
            return None
    since = scheduled.get("lastTransitionTime") or (pod.get("metadata") or {}).get(
        "creationTimestamp"
    )
    return str(since) if since else None


def waiting_to_start(
    pods: list[dict[str, Any]], now: datetime.datetime, timeout: float
) -> list[str]:
    """`starting_since` of the pods still within `timeout`: when to look again."""
    found = []
    for pod in pods:
        since = starting_since(pod)
        started = parse_time(since)
        if since and started and (now - started).total_seconds() < timeout:
            found.append(since)
    return found


def first_issue(
    pods: list[dict[str, Any]],
    now: datetime.datetime,
    unschedulable_timeout: float,
    containers: tuple[str, ...] | None = None,
) -> PodIssue | None:
    """The issue of the newest pod that has one (pods that are Ready are skipped)."""
    for pod in newest_first(pods):
        if is_ready(pod):
            continue
        issue = pod_issue(pod, now, unschedulable_timeout, containers)
        if issue is not None:
            return issue
    return None


def with_volume_detail(issue: PodIssue | None, pvc: dict[str, Any] | None) -> PodIssue | None:
    """An Unschedulable pod waiting for an unbound cache PVC: say so, naming class and mode."""
    if issue is None or issue.reason != "Unschedulable" or pvc is None:
        return issue
    phase = (pvc.get("status") or {}).get("phase")
    message = issue.message.lower()
    if phase == "Bound" or not any(w in message for w in _VOLUME_WORDS):
        return issue
    # The scheduler names a missing claim (`persistentvolumeclaim "models" not found`): one that
    # is not the cache, such as a PVC checkpoint's, already speaks for itself.
    if 'persistentvolumeclaim "' in message and f'"{_name(pvc)}"' not in message:
        return issue
    spec = pvc.get("spec") or {}
    storage_class = spec.get("storageClassName") or "the cluster default StorageClass"
    modes = ", ".join(spec.get("accessModes") or []) or "unknown"
    return PodIssue(
        reason="VolumeNotBound",
        message=(
            f"PVC {_name(pvc)} is {phase or 'Pending'}: no volume of {storage_class} with access "
            f"mode {modes}; ReadWriteMany needs an RWX-capable class (Filestore, EFS, NFS), or use "
            f"engineCache.mode PerPod ({issue.message})"
        ),
        stuck=issue.stuck,
        since=issue.since,
        pod=issue.pod,
    )


# A Gateway (listener) the HTTPRoute names: (namespace, name, sectionName).
GatewayRef = tuple[str, str, str | None]


def route_condition(
    route: dict[str, Any] | None, parents: list[GatewayRef]
) -> dict[str, str] | None:
    """The HTTPRoute's standing with its Gateways, as one condition (status, reason, message,
    and `problem`: the phrase for the Reranker's message, empty when there is none to add), from
    the route's `status.parents` (Gateway API). False with the Gateway's own reason when a
    controller refused it (`Accepted=False`, e.g. NotAllowedByListeners) or cannot send to the
    Service (`ResolvedRefs=False`); True once every parent has accepted the route's current
    generation; False/Pending before that (no controller reports on a Gateway that does not
    exist). Several controllers may report on one parent: any refusal counts. None before the
    route exists."""
    if route is None:
        return None
    meta = route.get("metadata") or {}
    generation = meta.get("generation")
    # (parent, controller) -> its current conditions by type
    reports: dict[GatewayRef, list[dict[str, dict[str, Any]]]] = {}
    for parent in (route.get("status") or {}).get("parents") or []:
        ref = parent.get("parentRef") or {}
        key = (ref.get("namespace") or meta.get("namespace", ""), ref.get("name", ""),
               ref.get("sectionName"))  # fmt: skip
        current = {
            c.get("type", ""): c
            for c in parent.get("conditions") or []
            # A condition about an earlier spec of the route says nothing about this one.
            if generation is None or (c.get("observedGeneration") or generation) >= generation
        }
        reports.setdefault(key, []).append(current)

    def gateway(key: GatewayRef) -> str:
        namespace, name, section = key
        return f"Gateway {namespace}/{name}" + (f" (listener {section})" if section else "")

    for key in parents:
        for type_, problem in (
            ("Accepted", "the HTTPRoute is refused"),
            ("ResolvedRefs", "the HTTPRoute cannot send to the Service"),
        ):
            for report in reports.get(key, []):
                cond = report.get(type_)
                if cond is not None and cond.get("status") == "False":
                    reason = cond.get("reason") or f"Not{type_}"
                    said = clip(cond.get("message") or reason, 1024)  # readable
                    return {"status": "False", "reason": reason,
                            "message": f"{gateway(key)}: {said}", "problem": problem}  # fmt: skip
    waiting = [
        gateway(key)
        for key in parents
        if not any(r.get("Accepted", {}).get("status") == "True" for r in reports.get(key, []))
    ]
    if waiting:
        of = f" (generation {generation})" if generation is not None else ""
        return {
            "status": "False",
            "reason": "Pending",
            "message": f"not yet accepted by {', '.join(waiting)}: no Gateway controller has "
            f"accepted the route's current spec{of}; check that the Gateway exists and its "
            "controller runs (kubectl describe httproute)",
            "problem": "",
        }
    return {
        "status": "True",
        "reason": "Accepted",
        "message": "accepted by " + ", ".join(gateway(key) for key in parents),
        "problem": "",
    }


def clip(text: str, limit: int) -> str:
    """`text` cut to at most `limit` characters, an ellipsis marking the cut."""
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def scaling_condition(hpa: dict[str, Any] | None) -> dict[str, Any] | None:
    """The HPA's ScalingActive condition (False, e.g. FailedGetPodsMetric, when its metric cannot
    be read: no custom-metrics adapter), or None before the HPA controller has reported."""
    for cond in ((hpa or {}).get("status") or {}).get("conditions") or []:
        if cond.get("type") == "ScalingActive":
            return dict(cond)
    return None
