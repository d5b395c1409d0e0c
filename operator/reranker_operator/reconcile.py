"""Reconcile one Reranker: make its children match the spec, then write what they say to status.

Every step is safe to repeat (after a crash, a restart, or a second trigger for the same
object): children are created only when absent and patched only when the builders' spec-hash
annotation differs; an engine counts as built once its key is in the cache PVC's
`reranker.dev/built-engines` annotation, which outlives operator restarts and (with retention
Retain) the Reranker itself.

The engine-build Job (Shared mode) is kept while it can still help, and replaced when it cannot:
a failed or not-yet-started Job whose pod template no longer matches the spec (memory raised
after an OOMKill, a toleration added) is deleted and created anew; a finished Job whose engine is
not on the cache volume (the claim was re-created) builds again; a pending or running Job for an
engine nobody wants any more (the spec moved on) is cancelled, so it frees its GPU.

The whole reconcile reads the Reranker afresh and is serialised per Reranker within this
process, so the Reranker's own handlers and its children's event handlers can all call it.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from kubernetes.client.exceptions import ApiException

from reranker_operator import builders, diagnosis, kube, status
from reranker_operator.config import OperatorConfig
from reranker_operator.metrics import OperatorMetrics
from reranker_operator.spec import InvalidSpec, RerankerSpec, parse_spec

log = logging.getLogger(__name__)

ANNOTATION_BUILT = "reranker.dev/built-engines"  # on the cache PVC: comma-separated engine keys
# On the cache PVC: the engines served, oldest first (what pruning keeps the newest of).
ANNOTATION_HISTORY = "reranker.dev/engine-history"
# On the cache PVC: engines whose build was cancelled midway; the next prune removes what they left.
ANNOTATION_ABANDONED = "reranker.dev/abandoned-engines"
COMPONENT = "reranker-operator"


@dataclass(frozen=True)
class Outcome:
    """What one reconcile ended with (for handlers and logs)."""

    phase: str | None  # None: the Reranker is gone or being deleted
    invalid: InvalidSpec | None = None


def _key_list(pvc: dict[str, Any] | None, annotation: str) -> list[str]:
    """The engine keys an annotation of the cache PVC lists. Anything else there (written by
    hand: `..` would make a prune delete the whole cache) is ignored."""
    value = (((pvc or {}).get("metadata") or {}).get("annotations") or {}).get(annotation) or ""
    return [k for k in value.split(",") if builders.is_engine_key(k)]


def built_keys(pvc: dict[str, Any] | None) -> set[str]:
    return set(_key_list(pvc, ANNOTATION_BUILT))


def _annotation(obj: dict[str, Any], key: str) -> str | None:
    return ((obj.get("metadata") or {}).get("annotations") or {}).get(key)


def _created(obj: dict[str, Any]) -> datetime.datetime | None:
    return diagnosis.parse_time((obj.get("metadata") or {}).get("creationTimestamp"))


def _labels(obj: dict[str, Any]) -> dict[str, str]:
    return dict((obj.get("metadata") or {}).get("labels") or {})


def _is_server(pod: dict[str, Any]) -> bool:
    return _labels(pod).get(builders.LABEL_COMPONENT) == builders.COMPONENT_SERVER


def _pod_key(pod: dict[str, Any]) -> str | None:
    return _annotation(pod, builders.ANNOTATION_ENGINE_KEY)


# The Job controller labels its pods with the Job's uid (1.27's key first, then the legacy one).
_CONTROLLER_UID = ("batch.kubernetes.io/controller-uid", "controller-uid")


def _pod_template(deployment: dict[str, Any] | None) -> Any:
    return ((deployment or {}).get("spec") or {}).get("template")


_RERANKER_PATHS = f"/apis/{kube.RERANKER.api_version}/"


def _is_reranker_write(exc: ApiException) -> bool:
    """Whether the refused request was the operator's own write of a Reranker (its status)."""
    return isinstance(exc, kube.ApiError) and exc.path.startswith(_RERANKER_PATHS)


def _deadline_passed(job: dict[str, Any]) -> bool:
    """Whether the Job failed for its activeDeadlineSeconds."""
    return any(
        c.get("type") in ("Failed", "FailureTarget")
        and c.get("status") == "True"
        and c.get("reason") == "DeadlineExceeded"
        for c in (job.get("status") or {}).get("conditions") or []
    )


def _waiting_note(previous: dict[str, Any] | None, job_name: str) -> str:
    """What the last status said stopped the build's pod from starting, or "" when the build
    was running (or nothing was said): the reason and message of EngineReady then."""
    engine = status.get_condition(previous, status.ENGINE_READY) or {}
    reason, message = engine.get("reason"), engine.get("message", "")
    same_job = ((previous or {}).get("engine") or {}).get("jobName") == job_name
    if reason == "BuildFailed" and _NEVER_STARTED in message and same_job:
        # Said already: every later reconcile keeps the same words (and posts no new event).
        start = message.index(_NEVER_STARTED) + len(_NEVER_STARTED)
        end = message.rfind(_ONCE_FIXED)
        return message[start:end] if end > start else ""
    if engine.get("status") == "False" and reason not in _NOT_A_POD_ISSUE:
        return f"{reason}: {engine.get('message', '')}"  # Unschedulable, ImagePullBackOff, ...
    if (previous or {}).get("phase") == "Pending":
        return "it was still waiting to start"
    return ""


_NOT_A_POD_ISSUE = (None, "Building", "BuildFailed", "EngineBuilt")
_NEVER_STARTED = "; its pod never started ("
_ONCE_FIXED = "); once that is fixed, "


def _finished(pod: dict[str, Any]) -> bool:
    return (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed")


def _pods_of_job(
    pods: list[dict[str, Any]], job_name: str, job: dict[str, Any] | None
) -> list[dict[str, Any]]:
    """The pods of Job `job_name`, without those of an earlier Job of that name (replaced, its
    pods not garbage-collected yet): they would tell the new Job's state with the old's words."""
    uid = ((job or {}).get("metadata") or {}).get("uid")
    found = []
    for pod in pods:
        labels = _labels(pod)
        if labels.get("job-name") != job_name:
            continue
        pod_uid = next((labels[k] for k in _CONTROLLER_UID if k in labels), None)
        if uid and pod_uid and pod_uid != uid:
            continue
        found.append(pod)
    return found


def _is_build_job(job: dict[str, Any]) -> bool:
    return _labels(job).get(builders.LABEL_COMPONENT) == builders.COMPONENT_BUILD


def _unfinished(job: dict[str, Any]) -> bool:
    return status.job_state(job) in ("pending", "building")


def _init_done(pod: dict[str, Any]) -> bool:
    """The build init container finished (PerPod): later problems are the server's."""
    cs = diagnosis.container_status(pod, builders.BUILD_CONTAINER)
    term = (cs.get("state") or {}).get("terminated") or {}
    return diagnosis.is_ready(pod) or term.get("exitCode") == 0


def _serving_key(pods: list[dict[str, Any]], key: str) -> str | None:
    """The engine the Reranker's Ready pods serve: the current key if any pod serves it, else the
    one most of them serve; None when no pod is Ready."""
    keys = Counter(
        _pod_key(p) for p in pods if _is_server(p) and diagnosis.is_ready(p) and _pod_key(p)
    )
    if not keys:
        return None
    return key if key in keys else keys.most_common(1)[0][0]


def _stale_build_reason(
    live: dict[str, Any],
    desired: dict[str, Any],
    pvc: dict[str, Any],
    job_pods: list[dict[str, Any]],
) -> str | None:
    """Why the existing build Job of the current engine cannot give it; None when it can."""
    state = status.job_state(live)
    if state == "built":
        job_created, pvc_created = _created(live), _created(pvc)
        if job_created and pvc_created and job_created < pvc_created:
            # It built into a claim that was deleted since: the engine is not on this one.
            return "it built the engine into an earlier cache volume; building it again"
        return None
    if _annotation(live, builders.ANNOTATION_SPEC_HASH) == _annotation(
        desired, builders.ANNOTATION_SPEC_HASH
    ):
        return None  # what the spec asks for: a failure stands until the cause is fixed
    if state == "failed":
        return "the spec changed since it failed; building again with the new pod settings"
    if state == "pending" or status.job_pods_running(job_pods) is not True:
        return "the spec changed before its pod started; starting one with the new pod settings"
    return None  # running: a build under way is left to finish (or to fail, then replaced)


def _refused_pods_issue(
    reason: str,
    what: str,
    refusal: str,
    since: str | None,
    now: datetime.datetime,
    timeout: float,
) -> diagnosis.PodIssue:
    """Pods a controller cannot create. A quota may free up by itself (an old pod terminating,
    another team's Job ending): waiting, then stuck after `timeout`. Any other refusal (a missing
    service account, PodSecurity admission, a webhook) needs a change: stuck at once."""
    quota = "exceeded quota" in refusal
    message = f"{what}: {refusal}"
    if quota:
        message += (
            "; raise the namespace's ResourceQuota or lower spec.resources (the build: "
            "spec.resources.build)"
        )
    started = diagnosis.parse_time(since)
    waited = (now - started).total_seconds() if started else 0.0
    stuck = not quota or started is None or waited >= timeout
    return diagnosis.PodIssue(reason, message, stuck=stuck, since=since)


def _replica_failure_issue(
    dep: status.DeploymentState, now: datetime.datetime, timeout: float
) -> diagnosis.PodIssue:
    """The Deployment's ReplicaFailure condition as an issue."""
    reason = dep.replica_failure_reason
    what = (
        "the Deployment cannot create pods"
        if reason == "FailedCreate"
        else f"the Deployment reports {reason}"
    )
    return _refused_pods_issue(
        reason, what, dep.replica_failure, dep.replica_failure_since, now, timeout
    )


@dataclass(frozen=True)
class _Engine:
    """The engine for the current key (Shared mode), as `_ensure_engine` found it."""

    state: status.EngineState
    message: str = ""  # the failed build's termination message; building: an earlier attempt's
    built_at: str | None = None
    issue: diagnosis.PodIssue | None = None  # why the build waits, when it is not its pod's fault
    pods: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # the build Job's


@dataclass(frozen=True)
class _EngineView:
    """What one mode's steps found: the Deployment, the engine's state and what the pods say."""

    deployment: dict[str, Any] | None
    engine: status.EngineState
    build_message: str
    built_at: str | None
    job_name: str | None  # Shared: the build Job
    pvc: dict[str, Any] | None  # Shared: the cache PVC
    jobs: list[dict[str, Any]]  # Shared: the Reranker's Jobs (builds and prunes)
    engine_issue: diagnosis.PodIssue | None
    serve_issue: diagnosis.PodIssue | None


def refusal_message(exc: ApiException) -> str:
    """The API server's own words for a refused object (its Status body's message)."""
    try:
        message = json.loads(exc.body or "{}").get("message")
    except (ValueError, AttributeError):
        message = None
    return f"the API server refused a child: {message or exc.reason or exc.status}"


RETRIED = "the operator retries until it succeeds"
REFUSAL_RECHECK_SECONDS = 60.0  # a lasting refusal is retried at least this often
TIMED_RETRY_SECONDS = 15.0  # a timer's reconcile that met a transient API fault: again after
# Routes are not watched: one no Gateway has answered yet is read again this often, a refused
# one every REFUSAL_RECHECK_SECONDS, an accepted one this often.
ROUTE_RECHECK_SECONDS = 30.0
ROUTE_ACCEPTED_RECHECK_SECONDS = 300.0


def lasting_refusal(exc: ApiException) -> tuple[str, str] | None:
    """(reason, message) for an API answer that retrying alone will not change, saying what to
    do; None for anything else (transient, or handled elsewhere)."""
    what = kube.describe(exc)
    if exc.status == 403:
        return "Forbidden", (
            f"the API server refused a request: {what}. Grant the operator's service account "
            "that permission (the chart's ClusterRole or Role), or lift the ResourceQuota or "
            f"admission policy it names; {RETRIED}"
        )
    if exc.status == 404 and getattr(exc, "method", None) == "POST":
        return "MissingAPI", (
            f"this cluster does not serve that API: {what}. Install its CRDs, or turn off what "
            f"needs it (a monitor: the chart's monitoring.kind); {RETRIED}"
        )
    return None


def engines_to_keep(
    history: list[str], built: set[str], key: str, keep: int
) -> tuple[list[str], list[str]]:
    """(engines to delete, engines kept, oldest first): `key` (now served) and the `keep` most
    recently served before it. Built engines never served (superseded builds) count as oldest."""
    served = [k for k in dict.fromkeys(history) if k in built and k != key]
    order = [*sorted(built - set(history) - {key}), *served, key]
    return order[: -(1 + keep)], order[-(1 + keep) :]


class Reconciler:
    """Holds the API wrapper and the operator config; `reconcile(ns, name)` is the entry point."""

    def __init__(
        self, api: kube.Kube, config: OperatorConfig, metrics: OperatorMetrics | None = None
    ) -> None:
        self.api = api
        self.config = config
        self.metrics = metrics or OperatorMetrics()
        self._locks: dict[tuple[str, str], threading.Lock] = {}
        self._locks_guard = threading.Lock()
        # One pending recheck per Reranker: (when it is due on the monotonic clock, its timer).
        self._timers: dict[tuple[str, str], tuple[float, threading.Timer]] = {}
        self._timers_stopped = False

    def _lock(self, namespace: str, name: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault((namespace, name), threading.Lock())

    def reconcile(self, namespace: str, name: str) -> Outcome:
        with self._lock(namespace, name):
            started = time.monotonic()
            result: str | None = "error"
            try:
                outcome = self._reconcile_named(namespace, name)
                if outcome.phase is None:
                    result = None  # gone: nothing was reconciled
                else:
                    result = "ok" if outcome.invalid is None else "invalid_spec"
                return outcome
            except Exception as exc:
                if kube.is_api_fault(exc):
                    result = "api_error"
                raise
            finally:
                if result is not None:
                    self.metrics.reconciled(result, time.monotonic() - started)

    def _reconcile_named(self, namespace: str, name: str) -> Outcome:
        body = self.api.get(kube.RERANKER, namespace, name)
        if body is None or (body.get("metadata") or {}).get("deletionTimestamp"):
            # Gone (children follow by garbage collection) or going: nothing to do.
            return Outcome(phase=None)
        try:
            return self._reconcile(body)
        except InvalidSpec as exc:  # a spec this cluster cannot serve (see _ensure_exposure)
            return self._invalid(body, exc)
        except ApiException as exc:
            if exc.status in (400, 422) and _is_reranker_write(exc):
                # The operator's own status write, not the spec, was refused. A child's event
                # is not retried by kopf: look again on a timer too.
                meta = body["metadata"]
                self._recheck_after(meta["namespace"], meta["name"], REFUSAL_RECHECK_SECONDS)
                raise
            if exc.status in (400, 422):
                # The API server refused a child as rendered (e.g. a spec.pod.affinity the CRD
                # passes through unchecked): an invalid spec, not something a retry fixes.
                return self._invalid(body, InvalidSpec("spec", refusal_message(exc)))
            refusal = lasting_refusal(exc)
            if refusal is not None:
                self._refused(body, *refusal)
            raise  # retried by the handler
        except kube.NotOurs as exc:
            self._refused(body, "NameTaken", f"{exc}; {RETRIED}")
            raise

    def _refused(self, body: dict[str, Any], reason: str, message: str) -> None:
        """Put a refusal that only a person can fix on the Reranker's status (once per change),
        while the handler keeps retrying. A status write refused too is only logged."""
        meta = body["metadata"]
        previous = body.get("status") or {}
        new = status.refused_status(reason, message, meta.get("generation"), previous)
        try:
            if self._write_status(body, previous, new):
                self._event(body, "Warning", "ApiRefused", message)
        except (ApiException, OSError) as exc:
            log.warning(
                "could not write the refusal to status",
                extra={"reranker": f"{meta['namespace']}/{meta['name']}", "error": str(exc)},
            )
        # The Reranker's handler retries its own failures; a child's event does not, and may be
        # the last trigger for a long time: retry on a timer whatever started this one.
        self._recheck_after(meta["namespace"], meta["name"], REFUSAL_RECHECK_SECONDS)

    def _invalid(self, body: dict[str, Any], exc: InvalidSpec) -> Outcome:
        meta = body["metadata"]
        previous = body.get("status") or {}
        new = status.invalid_spec_status(exc.field, exc.message, meta.get("generation"), previous)
        if self._write_status(body, previous, new):
            self._event(body, "Warning", "InvalidSpec", f"{exc.field}: {exc.message}")
        log.warning(
            "invalid spec",
            extra={"reranker": f"{meta['namespace']}/{meta['name']}", "field": exc.field},
        )
        return Outcome(phase="Failed", invalid=exc)

    # ------------------------------------------------------------------ the steps

    def _reconcile(self, body: dict[str, Any]) -> Outcome:
        meta = body["metadata"]
        name, namespace = meta["name"], meta["namespace"]
        generation = meta.get("generation")
        previous = body.get("status") or {}

        try:
            spec = parse_spec(body)
        except InvalidSpec as exc:
            return self._invalid(body, exc)

        owner = builders.owner_reference(body)
        key = builders.engine_key_for(spec, self.config)
        shared = builders.cache_mode(spec, self.config) == "Shared"
        # Every pod of this Reranker (build Jobs' and the Deployment's), for what they report.
        pods = self.api.list(kube.POD, namespace, {builders.LABEL_RERANKER: name})
        now = datetime.datetime.now(datetime.UTC)
        deployment = self.api.get(kube.DEPLOYMENT, namespace, name)

        if shared:
            view = self._shared_engine(body, spec, key, owner, deployment, pods, now)
        else:
            view = self._per_pod_engine(body, spec, key, owner, deployment, pods, now)
        # A rollout starts when this reconcile created the Deployment or changed its pods'
        # template; any other change of it (a replica count: ours, an autoscaler's) rolls nothing.
        template_changed = _pod_template(deployment) != _pod_template(view.deployment)
        deployment, engine, build_message = view.deployment, view.engine, view.build_message
        job_name, pvc = view.job_name, view.pvc
        engine_issue, serve_issue = view.engine_issue, view.serve_issue

        # Status from what the children and their pods say now.
        dep_state = (
            status.deployment_state(deployment, builders.ANNOTATION_ENGINE_KEY)
            if deployment
            else None
        )
        if dep_state is not None and not shared:
            # The Ready pods tell which engine answers (old ones, mid-rollout); without them, the
            # Deployment's own word: a rolled-out, available Deployment of this key has pods
            # that finished their build.
            serving = _serving_key(pods, key)
            if serving is not None:
                dep_state = dataclasses.replace(dep_state, engine_key=serving)
            elif dep_state.engine_key == key and dep_state.available and dep_state.rolled_out:
                engine, build_message = "built", ""
        if dep_state is not None and dep_state.replica_failure:
            # No pod was created, so none can tell: the Deployment's own condition does. It may
            # pass by itself (an old pod's quota freed as it terminates in an in-place rollout):
            # stuck after the timeout, like Unschedulable.
            refused = _replica_failure_issue(
                dep_state, now, self.config.unschedulable_timeout_seconds
            )
            serve_issue = serve_issue or refused
            if not shared and engine == "pending":
                engine_issue = engine_issue or refused  # PerPod: the pods build the engine too
        # A LoadBalancer's address comes from the cloud, on the Service's status.
        service = ingress = None
        if spec.ingress is not None:
            ingress = self.api.get(kube.INGRESS, namespace, name)
        elif spec.service.type == "LoadBalancer":
            service = self.api.get(kube.SERVICE, namespace, name)
        scaling = None
        if spec.autoscaling is not None and spec.autoscaling.metric != "External":
            scaling = diagnosis.scaling_condition(self.api.get(kube.HPA, namespace, name))
        route = None
        if spec.http_route is not None:
            parents = [
                (ref.namespace or namespace, ref.name, ref.section_name)
                for ref in spec.http_route.parent_refs
            ]
            route = diagnosis.route_condition(
                self.api.get(kube.HTTP_ROUTE, namespace, name), parents
            )
            if route is not None:
                # HTTPRoutes are not watched (the Gateway API is an add-on): look again, soon
                # while no Gateway has answered, now and then once one has (it may change its
                # mind: a listener edited, the Gateway deleted).
                if route["status"] == "True":
                    delay = ROUTE_ACCEPTED_RECHECK_SECONDS
                elif route["problem"]:
                    delay = REFUSAL_RECHECK_SECONDS
                else:  # not answered yet (or a Gateway's own Accepted=False/Pending)
                    delay = ROUTE_RECHECK_SECONDS
                self._recheck_after(namespace, name, delay)
        observed = status.Observed(
            name=name,
            namespace=namespace,
            generation=generation,
            engine_key=key,
            job_name=job_name,
            image=builders.runtime_image(spec, self.config),
            engine=engine,
            build_message=build_message,
            built_at=view.built_at,
            deployment=dep_state,
            endpoint=builders.endpoint_url(name, namespace),
            external_endpoint=builders.external_endpoint(spec, service, ingress),
            selector=builders.selector_string(name),
            engine_issue=engine_issue,
            serve_issue=serve_issue,
            scaling=scaling,
            route=route,
            surge_rollout=spec.rollout.surges,
            template_changed=template_changed,
        )
        new = status.derive_status(observed, previous)
        if pvc is not None and new["phase"] == "Ready" and dep_state and dep_state.rolled_out:
            # The rollout to `key` succeeded: engines beyond the ones to keep can go. A refusal
            # there does not stop serving: the status says it, in the same write.
            problem = self._prune_engines(body, spec, pvc, view.jobs, key)
            if problem:
                new["message"] += f"; {problem}"
                # A Ready Reranker sees few events: look again, as for any lasting refusal.
                self._recheck_after(namespace, name, REFUSAL_RECHECK_SECONDS)
        if self._write_status(body, previous, new):
            self._transition_events(body, previous, new)
        for issue in (engine_issue, serve_issue):
            if issue is not None and not issue.stuck and issue.since:
                self._recheck_when_stuck(namespace, name, issue.since, now)
        # A pod that never starts (a mount failing) changes no more: look again at the timeout.
        timeout = self.config.unschedulable_timeout_seconds
        for since in diagnosis.waiting_to_start(pods, now, timeout):
            self._recheck_when_stuck(namespace, name, since, now)
        return Outcome(phase=new["phase"])

    def _shared_engine(
        self,
        body: dict[str, Any],
        spec: RerankerSpec,
        key: str,
        owner: dict[str, Any],
        deployment: dict[str, Any] | None,
        pods: list[dict[str, Any]],
        now: datetime.datetime,
    ) -> _EngineView:
        """Shared mode: the cache PVC, the build Job, and the Deployment once the key is built."""
        meta = body["metadata"]
        name, namespace = meta["name"], meta["namespace"]
        timeout = self.config.unschedulable_timeout_seconds
        job_name = builders.job_name(name, key)
        # The engine cache (created once; a PVC's spec is mostly immutable afterwards: only
        # its labels follow spec.labels).
        desired_pvc = builders.build_engine_cache_pvc(name, namespace, spec, self.config, owner)
        pvc, created = self.api.create_if_absent(desired_pvc)
        relabel = None if created else builders.relabel_patch(desired_pvc, pvc)
        if relabel is not None:
            pvc = self.api.patch(kube.PVC, namespace, builders.cache_pvc_name(name), relabel)
        jobs = self.api.list(kube.JOB, namespace, {builders.LABEL_RERANKER: name})
        serving_key = (
            _annotation(deployment, builders.ANNOTATION_ENGINE_KEY) if deployment else None
        )
        cancelled = self._cancel_superseded_builds(body, jobs, {key, serving_key})
        if cancelled:
            pvc = self._record_abandoned(pvc, cancelled)
        # The engine: built already, or its Job (created only when absent).
        engine = self._ensure_engine(body, spec, pvc, key, job_name, pods, jobs)
        engine_issue = engine.issue or diagnosis.with_volume_detail(
            diagnosis.first_issue(engine.pods, now, timeout), pvc
        )
        # Serving: roll the Deployment only to a built engine; until then the Deployment keeps
        # its engine (only its replica count follows the spec), and everything around it is kept
        # as the spec says.
        if engine.state == "built":
            deployment = self._ensure_deployment(body, spec, key, owner, deployment)
        elif deployment is not None:
            deployment = self._scale_to_spec(spec, deployment)
        self._ensure_exposure(body, spec, owner, deployment is not None)
        serve_issue = diagnosis.first_issue([p for p in pods if _is_server(p)], now, timeout)
        return _EngineView(
            deployment, engine.state, engine.message, engine.built_at, job_name, pvc, jobs,
            engine_issue, serve_issue,
        )  # fmt: skip

    def _per_pod_engine(
        self,
        body: dict[str, Any],
        spec: RerankerSpec,
        key: str,
        owner: dict[str, Any],
        deployment: dict[str, Any] | None,
        pods: list[dict[str, Any]],
        now: datetime.datetime,
    ) -> _EngineView:
        """PerPod mode: the Deployment always runs the current engine; its pods build it first."""
        meta = body["metadata"]
        timeout = self.config.unschedulable_timeout_seconds
        # Build Jobs of an earlier Shared mode would hold their GPUs for nothing (what they
        # wrote stays on the cache PVC, which a switch to PerPod leaves in place).
        jobs = self.api.list(kube.JOB, meta["namespace"], {builders.LABEL_RERANKER: meta["name"]})
        cancelled = self._cancel_superseded_builds(body, jobs, set())
        if cancelled:
            # Pruned there if the Reranker goes back to Shared.
            pvc = self.api.get(kube.PVC, meta["namespace"], builders.cache_pvc_name(meta["name"]))
            if pvc is not None and kube.is_ours(
                pvc,
                {"metadata": {"labels": builders.labels(meta["name"], builders.COMPONENT_CACHE)}},
            ):
                self._record_abandoned(pvc, cancelled)
        deployment = self._ensure_deployment(body, spec, key, owner, deployment)
        self._ensure_exposure(body, spec, owner, True)
        key_pods = [p for p in pods if _is_server(p) and _pod_key(p) == key]
        engine, build_message = status.per_pod_engine_state(key_pods, builders.BUILD_CONTAINER)
        building = [p for p in key_pods if not _init_done(p)]
        engine_issue = diagnosis.first_issue(building, now, timeout)
        if engine == "pending" and (deployment.get("spec") or {}).get("replicas") == 0:
            engine_issue = diagnosis.PodIssue(
                "ScaledToZero",
                "0 replicas (spec.replicas, or the autoscaler): each pod builds its engine when "
                "it starts",
                stuck=False,
            )
        serving = [p for p in key_pods if _init_done(p)]
        serve_issue = diagnosis.first_issue(serving, now, timeout, (builders.SERVE_CONTAINER,))
        if engine == "built":
            # Once a pod has built the engine, a pod still building is one more replica to come
            # (a scale-up, a pod replaced after a node went): what stops it stops serving.
            serve_issue = serve_issue or engine_issue
        return _EngineView(
            deployment, engine, build_message, None, None, None, [], engine_issue, serve_issue
        )

    def _ensure_engine(
        self,
        body: dict[str, Any],
        spec: RerankerSpec,
        pvc: dict[str, Any],
        key: str,
        job_name: str,
        pods: list[dict[str, Any]],
        jobs: list[dict[str, Any]],
    ) -> _Engine:
        """The engine for `key` (Shared mode): built, or its build Job's state."""
        meta = body["metadata"]
        name, namespace = meta["name"], meta["namespace"]
        if key in built_keys(pvc):
            return _Engine("built")
        pruning = self._pruning(jobs, key)
        if pruning is not None:
            # A prune Job created earlier would delete this engine's directory under the build.
            return _Engine("pending", issue=diagnosis.PodIssue(
                "WaitingForPrune",
                f"Job {pruning} is deleting an earlier copy of engine {key[:10]} from the "
                "cache; the build starts when it has finished",
                stuck=False,
            ))  # fmt: skip

        desired = builders.build_engine_job(
            name, namespace, spec, self.config, key, builders.owner_reference(body)
        )
        live = self.api.get(kube.JOB, namespace, job_name)
        if live is not None:
            if not kube.is_ours(live, desired):
                raise kube.NotOurs(live)
            replaced = self._replace_stale_build(
                body, live, desired, pvc, _pods_of_job(pods, job_name, live)
            )
            if replaced is not None:
                return replaced

        job, created = self.api.create_if_absent(desired)
        job_pods = _pods_of_job(pods, job_name, job)
        if created:
            log.info(
                "engine build started", extra={"reranker": f"{namespace}/{name}", "job": job_name}
            )
            self._event(body, "Normal", "BuildStarted", f"Job {job_name} builds engine {key[:10]}")

        state = status.job_state(job)
        if state == "built":
            self._record_built(pvc, key)
            self._event(body, "Normal", "EngineBuilt", f"engine {key[:10]} built by Job {job_name}")
            built_at = (job.get("status") or {}).get("completionTime") or status.now_iso()
            return _Engine("built", built_at=built_at)
        if state == "failed":
            # Listed again: the failed pod may be newer than this reconcile's first look.
            listed = self.api.list(kube.POD, namespace, {"job-name": job_name})
            job_pods = _pods_of_job(listed, job_name, job)
            message = status.termination_message(job_pods) or status.job_failure_message(job)
            waited = _waiting_note(body.get("status"), job_name)
            if waited and _deadline_passed(job):
                # The Job's deadline counts time spent Pending too: the pod never ran, and the
                # scheduler's word (no GPU node) is gone with it.
                message += (
                    f"{_NEVER_STARTED}{waited}{_ONCE_FIXED}"
                    f"`kubectl delete job {job_name} -n {namespace}` builds again"
                )
            return _Engine("failed", message, pods=job_pods)
        # The Job retries (backoffLimit): an earlier attempt's failed pod is history, not why
        # this one waits; the message says it happened.
        attempts = [p for p in job_pods if _finished(p)]
        job_pods = [p for p in job_pods if not _finished(p)]
        retrying = status.termination_message(attempts)
        if state == "building" and status.job_pods_running(job_pods) is False:
            state = "pending"  # the Job counts its Pending pod as active
        issue = None
        if state == "pending" and not job_pods:
            issue = self._job_create_failure(body, job)
        return _Engine(state, retrying, issue=issue, pods=job_pods)

    def _job_create_failure(
        self, body: dict[str, Any], job: dict[str, Any]
    ) -> diagnosis.PodIssue | None:
        """Why a Job has no pod: the Job controller's FailedCreate events (a ResourceQuota, a
        LimitRange, an admission webhook refused the pod). Nothing else says so: the Job's
        status does not change, so the operator looks again on a timer while it has no pod."""
        meta = job["metadata"]
        timeout = self.config.unschedulable_timeout_seconds
        self._recheck_after(
            body["metadata"]["namespace"], body["metadata"]["name"], min(30.0, timeout)
        )
        fields = {
            "involvedObject.kind": "Job",
            "involvedObject.name": meta["name"],
            "reason": "FailedCreate",
        }
        try:
            listed = self.api.list(kube.EVENT, meta["namespace"], fields=fields)
        except ApiException as exc:
            if kube.is_transient(exc):
                raise
            # Only an explanation: RBAC without `events list` (an older chart) must not stop
            # the reconcile.
            log.warning("cannot read the build Job's events", extra={"error": kube.describe(exc)})
            return None
        events = [
            e
            for e in listed
            if (e.get("involvedObject") or {}).get("uid") in (None, meta.get("uid"))
        ]
        if not events:
            return None

        def last_seen(event: dict[str, Any]) -> str:
            series = event.get("series") or {}
            return str(
                series.get("lastObservedTime")
                or event.get("lastTimestamp")
                or event.get("eventTime")
                or ""
            )

        newest = max(events, key=last_seen)
        firsts = [e.get("firstTimestamp") or e.get("eventTime") for e in events]
        since = min((f for f in firsts if f), default=None)
        return _refused_pods_issue(
            "FailedCreate",
            f"Job {meta['name']} cannot create its pod",
            str(newest.get("message") or "FailedCreate"),
            since,
            datetime.datetime.now(datetime.UTC),
            timeout,
        )

    def _replace_stale_build(
        self,
        body: dict[str, Any],
        live: dict[str, Any],
        desired: dict[str, Any],
        pvc: dict[str, Any],
        job_pods: list[dict[str, Any]],
    ) -> _Engine | None:
        """Delete the existing build Job when it cannot give the engine the spec wants; the
        engine's state meanwhile. None: the Job stays and tells the state."""
        meta = live["metadata"]
        namespace, job_name = meta["namespace"], meta["name"]
        reason = _stale_build_reason(live, desired, pvc, job_pods)
        if reason is None and not meta.get("deletionTimestamp"):
            return None
        if reason is not None and not meta.get("deletionTimestamp"):
            self.api.delete(kube.JOB, namespace, job_name)
            log.info(
                "engine build replaced",
                extra={"reranker": f"{namespace}/{body['metadata']['name']}", "job": job_name,
                       "reason": reason},
            )  # fmt: skip
            self._event(body, "Normal", "BuildRestarted", f"Job {job_name} replaced: {reason}")
            if self.api.get(kube.JOB, namespace, job_name) is None:
                return None  # gone already: the caller creates the new Job
        # Its deletion (an event on the Job) triggers the next reconcile; a timer covers a
        # deletion event lost to a watch reconnect.
        self._recheck_after(body["metadata"]["namespace"], body["metadata"]["name"], 10.0)
        return _Engine("pending", issue=diagnosis.PodIssue(
            "ReplacingBuild",
            f"the previous build Job {job_name} is being deleted; a new one starts when it is gone",
            stuck=False,
        ))  # fmt: skip

    @staticmethod
    def _pruning(jobs: list[dict[str, Any]], key: str) -> str | None:
        """The name of an unfinished prune Job that deletes engine `key`, if any."""
        target = f"{builders.ENGINES_MOUNT}/{key}"
        for job in jobs:
            if _labels(job).get(builders.LABEL_COMPONENT) != builders.COMPONENT_PRUNE:
                continue
            containers = job["spec"]["template"]["spec"].get("containers") or []
            if _unfinished(job) and any(target in (c.get("args") or []) for c in containers):
                return str(job["metadata"]["name"])
        return None

    def _cancel_superseded_builds(
        self, body: dict[str, Any], jobs: list[dict[str, Any]], wanted: set[str | None]
    ) -> list[str]:
        """Delete build Jobs still pending or running for an engine nobody wants any more
        (neither the spec's nor the one served): on a fixed GPU pool they hold the GPU the
        current build needs. Returns their engine keys."""
        meta = body["metadata"]
        cancelled: list[str] = []
        for job in jobs:
            job_key = _annotation(job, builders.ANNOTATION_ENGINE_KEY)
            if (
                not _is_build_job(job)
                or job_key is None
                or job_key in wanted
                or not _unfinished(job)
                or job["metadata"].get("deletionTimestamp")
            ):
                continue
            job_name = job["metadata"]["name"]
            self.api.delete(kube.JOB, meta["namespace"], job_name)
            cancelled.append(job_key)
            self._event(
                body, "Normal", "BuildCancelled",
                f"Job {job_name} cancelled: engine {job_key[:10]} is no longer wanted by the spec",
            )  # fmt: skip
        return cancelled

    def _record_abandoned(self, pvc: dict[str, Any], keys: list[str]) -> dict[str, Any]:
        """Note cancelled builds on the PVC (`ANNOTATION_ABANDONED`): the next prune removes what
        they wrote. Returns the PVC as patched."""
        abandoned = sorted({*_key_list(pvc, ANNOTATION_ABANDONED), *keys})
        return self.api.patch(
            kube.PVC, pvc["metadata"]["namespace"], pvc["metadata"]["name"],
            {"metadata": {"annotations": {ANNOTATION_ABANDONED: ",".join(abandoned)}}},
        )  # fmt: skip

    def _recheck_when_stuck(
        self, namespace: str, name: str, since: str, now: datetime.datetime
    ) -> None:
        """Reconcile again when an Unschedulable pod passes the timeout: no event may come then."""
        started = diagnosis.parse_time(since) or now
        delay = self.config.unschedulable_timeout_seconds - (now - started).total_seconds() + 1
        self._recheck_after(namespace, name, delay)

    def _recheck_after(self, namespace: str, name: str, delay: float) -> None:
        """Reconcile again in `delay` seconds. One pending timer per Reranker, the soonest: a
        later recheck it replaces is armed again by the reconcile it runs (each reconcile arms
        what its findings need)."""
        if self._timers_stopped:
            return  # shutting down: a reconcile still running arms nothing
        timer_key = (namespace, name)
        delay = max(delay, 1.0)
        due = time.monotonic() + delay
        with self._locks_guard:
            pending = self._timers.get(timer_key)
            if pending is not None and pending[1].is_alive():
                if pending[0] <= due:
                    return
                pending[1].cancel()
            timer = threading.Timer(delay, self._timed_reconcile, (namespace, name))
            timer.daemon = True
            self._timers[timer_key] = (due, timer)
        timer.start()

    def _timed_reconcile(self, namespace: str, name: str) -> None:
        with self._locks_guard:
            pending = self._timers.get((namespace, name))
            if pending is not None and pending[1] is threading.current_thread():
                del self._timers[(namespace, name)]
        try:
            self.reconcile(namespace, name)
        except Exception as exc:  # a timer thread has no caller to raise to: log it
            log.warning(
                "timed reconcile failed",
                extra={"reranker": f"{namespace}/{name}", "error": str(exc)},
            )
            if kube.is_transient(exc):
                # Timers are set again only by a reconcile that finishes: without this, the
                # check this timer was for (an Unschedulable pod's timeout) would never come.
                # A lasting refusal has armed its own, slower recheck (_refused).
                self._recheck_after(namespace, name, TIMED_RETRY_SECONDS)

    def stop_timers(self) -> None:
        self._timers_stopped = True
        with self._locks_guard:
            for _, timer in self._timers.values():
                timer.cancel()
            self._timers.clear()

    def _prune_engines(
        self,
        body: dict[str, Any],
        spec: RerankerSpec,
        pvc: dict[str, Any],
        jobs: list[dict[str, Any]],
        key: str,
    ) -> str | None:
        """Keep the served engine and the `keepEngines` most recently served before it; delete
        the rest from the cache with a Job, with what cancelled builds left behind, and forget
        them. Their build Jobs go too: a later need for one of them builds it again. Returns
        what stops it when the API server refuses (retried at the next reconcile)."""
        try:
            self._prune(body, spec, pvc, jobs, key)
        except (ApiException, kube.NotOurs) as exc:
            if kube.is_transient(exc):
                raise
            meta = body["metadata"]
            log.warning(
                "cannot prune the engine cache",
                extra={
                    "reranker": f"{meta['namespace']}/{meta['name']}",
                    "error": kube.describe(exc),
                },
            )
            return f"unused engines stay in the cache: {kube.describe(exc)}"
        return None

    def _prune(
        self,
        body: dict[str, Any],
        spec: RerankerSpec,
        pvc: dict[str, Any],
        jobs: list[dict[str, Any]],
        key: str,
    ) -> None:
        history = _key_list(pvc, ANNOTATION_HISTORY)
        built = built_keys(pvc) | {key}
        abandoned = set(_key_list(pvc, ANNOTATION_ABANDONED))
        if history and history[-1] == key and built <= set(history) and not abandoned:
            return  # nothing new since the last look
        drop, kept = engines_to_keep(history, built, key, self.config.engine_cache.keep_engines)
        drop = sorted({*drop, *(abandoned - set(kept))})
        meta = body["metadata"]
        if drop:
            for job in jobs:
                if (
                    _is_build_job(job)
                    and _annotation(job, builders.ANNOTATION_ENGINE_KEY) in drop
                    and not job["metadata"].get("deletionTimestamp")
                ):
                    self.api.delete(kube.JOB, meta["namespace"], job["metadata"]["name"])
            # Named after the cache's version too: the same keys dropped again (A, B, A, ...
            # with keepEngines 0) need a new Job, not the finished one of a day ago.
            job = builders.build_prune_job(
                meta["name"], meta["namespace"], spec, self.config, drop,
                builders.owner_reference(body), pvc,
            )  # fmt: skip
            _, created = self.api.create_if_absent(job)
            if created:
                self._event(
                    body, "Normal", "EnginesPruned",
                    f"deleting {len(drop)} unused engine(s) from the cache: "
                    + ", ".join(k[:10] for k in drop),
                )  # fmt: skip
        self.api.patch(
            kube.PVC, pvc["metadata"]["namespace"], pvc["metadata"]["name"],
            {"metadata": {"annotations": {
                ANNOTATION_BUILT: ",".join(sorted(kept)), ANNOTATION_HISTORY: ",".join(kept),
                ANNOTATION_ABANDONED: None}}},
        )  # fmt: skip

    def _record_built(self, pvc: dict[str, Any], key: str) -> None:
        meta = pvc["metadata"]
        keys = sorted(built_keys(pvc) | {key})
        self.api.patch(
            kube.PVC, meta["namespace"], meta["name"],
            {"metadata": {"annotations": {ANNOTATION_BUILT: ",".join(keys)}}},
        )  # fmt: skip

    def _ensure_deployment(
        self,
        body: dict[str, Any],
        spec: RerankerSpec,
        key: str,
        owner: dict[str, Any],
        deployment: dict[str, Any] | None,
    ) -> dict[str, Any]:
        """The Deployment serving engine `key` as the spec says."""
        meta = body["metadata"]
        name, namespace = meta["name"], meta["namespace"]
        desired = builders.build_deployment(name, namespace, spec, self.config, key, owner)
        previous_key = None
        if deployment is not None:
            previous_key = _annotation(deployment, builders.ANNOTATION_ENGINE_KEY)
        deployment = self._scale_to_spec(spec, self._apply(desired, deployment))
        if previous_key and previous_key != key:
            self._event(
                body, "Normal", "RollingOut", f"rolling the Deployment to engine {key[:10]}"
            )
        return deployment

    def _scale_to_spec(self, spec: RerankerSpec, deployment: dict[str, Any]) -> dict[str, Any]:
        """Undo a `kubectl scale deployment`: the Reranker's spec.replicas (or its own scale
        subresource, `kubectl scale reranker`) is the count; with autoscaling the HPA owns it."""
        have = (deployment.get("spec") or {}).get("replicas")
        auto = spec.autoscaling
        if auto is not None and (auto.metric == "External" or have != 0):
            # The HPA owns the count. But an HPA never scales up from zero (where an External
            # autoscaler the spec moved away from left it): that one starts at its minimum.
            return deployment
        want = spec.desired_replicas
        if have == want:
            return deployment
        meta = deployment["metadata"]
        log.info(
            "restoring the replica count",
            extra={"child": f"{meta['namespace']}/{meta['name']}", "replicas": want},
        )
        return self.api.patch(
            kube.DEPLOYMENT, meta["namespace"], meta["name"], {"spec": {"replicas": want}}
        )

    def _ensure_exposure(
        self, body: dict[str, Any], spec: RerankerSpec, owner: dict[str, Any], deployed: bool
    ) -> None:
        """Everything around the Deployment: Service, monitor, Ingress, PDB, HPA, HTTPRoute.
        The HPA waits for the Deployment (`deployed`): it would only warn FailedGetScale."""
        meta = body["metadata"]
        name, namespace = meta["name"], meta["namespace"]
        self._apply(builders.build_service(name, namespace, spec, owner))
        monitor = builders.build_monitor(name, namespace, spec, self.config, owner)
        if monitor is not None:
            # Only the configured kind is touched: its CRD (and RBAC) may be all there is.
            self._apply(monitor)
        owned_labels = builders.labels(name, builders.COMPONENT_SERVER)
        # The HTTPRoute last: a cluster without the Gateway API stops the reconcile there.
        for kind, child in (
            (kube.INGRESS, builders.build_ingress(name, namespace, spec, owner)),
            (kube.PDB, builders.build_pdb(name, namespace, spec, owner)),
            (kube.HPA, builders.build_hpa(name, namespace, spec, owner, self.config)),
            (kube.HTTP_ROUTE, builders.build_http_route(name, namespace, spec, owner)),
        ):
            if kind == kube.HPA and child is not None and not deployed:
                continue
            if child is not None:
                self._apply_optional_kind(kind, child)
                continue
            # No longer wanted (no ingress or route / 1 replica / no autoscaling): delete ours only, never
            # a user's object that happens to have the Reranker's name.
            live = self.api.get(kind, namespace, name)
            if live is not None and kube.is_ours(live, {"metadata": {"labels": owned_labels}}):
                self.api.delete(kind, namespace, name)

    def _apply_optional_kind(self, kind: kube.Kind, child: dict[str, Any]) -> None:
        """Apply a child whose API a cluster may not serve: the Gateway API is an add-on."""
        try:
            self._apply(child)
        except ApiException as exc:
            # Only a create: a PATCH's 404 is a route deleted meanwhile (the next reconcile).
            created = isinstance(exc, kube.ApiError) and exc.method == "POST"
            if exc.status != 404 or kind != kube.HTTP_ROUTE or not created:
                raise
            # The collection itself is missing: no retry installs the Gateway API's CRDs.
            raise InvalidSpec(
                "spec.httpRoute",
                "this cluster does not serve the Gateway API (gateway.networking.k8s.io/v1 "
                "HTTPRoute): install its CRDs and touch the Reranker (an annotation change "
                "retries it), or remove spec.httpRoute",
            ) from None

    def _apply(self, desired: dict[str, Any], live: dict[str, Any] | None = None) -> dict[str, Any]:
        """Create, or replace the owned fields when the builders' spec-hash annotation differs."""
        meta = desired["metadata"]
        kind = kube.kind_of(desired)
        if live is None:
            live, created = self.api.create_if_absent(desired)
            if created:
                return live
        want = meta["annotations"][builders.ANNOTATION_SPEC_HASH]
        have = (live["metadata"].get("annotations") or {}).get(builders.ANNOTATION_SPEC_HASH)
        if have == want:
            return live
        log.info(
            "patching child",
            extra={"kind": desired["kind"], "child": f"{meta['namespace']}/{meta['name']}"},
        )
        patch = builders.replacement_patch(desired, live)
        return self.api.patch(kind, meta["namespace"], meta["name"], patch)

    # ------------------------------------------------------------------ status and events

    def _write_status(self, body: dict[str, Any], old: dict[str, Any], new: dict[str, Any]) -> bool:
        patch = status.status_patch(old, new)
        if patch is None:
            return False
        meta = body["metadata"]
        self.api.patch(
            kube.RERANKER, meta["namespace"], meta["name"], {"status": patch}, subresource="status"
        )
        self.metrics.phase_changed(old.get("phase"), new["phase"])
        log.info(
            "status",
            extra={
                "reranker": f"{meta['namespace']}/{meta['name']}",
                "phase": new.get("phase"),
                "detail": new.get("message"),
            },
        )
        return True

    def _transition_events(
        self, body: dict[str, Any], old: dict[str, Any], new: dict[str, Any]
    ) -> None:
        """Events on condition flips only, so a repeated reconcile posts nothing twice."""
        old_engine = status.get_condition(old, status.ENGINE_READY) or {}
        new_engine = status.get_condition(new, status.ENGINE_READY) or {}
        if new_engine.get("reason") == "BuildFailed" and (
            old_engine.get("reason") != "BuildFailed"
            or old_engine.get("message") != new_engine.get("message")
        ):
            self._event(body, "Warning", "BuildFailed", new_engine.get("message", ""))
        old_ready = status.get_condition(old, status.READY) or {}
        new_ready = status.get_condition(new, status.READY) or {}
        if new_ready.get("status") == "True" and old_ready.get("status") != "True":
            self._event(body, "Normal", "Ready", new_ready.get("message", ""))
        # Going Failed or Degraded, or failing for another reason: a Warning (once per change)
        # for `kubectl describe` and event-based alerting. A failed build has its own above.
        phase, reason = new.get("phase"), new_ready.get("reason", "")
        if (
            phase in ("Failed", "Degraded")
            and reason != "BuildFailed"
            and (old.get("phase") != phase or old_ready.get("reason") != reason)
        ):
            self._event(body, "Warning", reason, new.get("message", ""))

    def _event(self, body: dict[str, Any], type_: str, reason: str, message: str) -> None:
        """Post a core/v1 Event on the Reranker; a failure to post is logged, never fatal."""
        meta = body["metadata"]
        now = status.now_iso()
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {
                "name": f"{meta['name']}.{time.time_ns():x}",
                "namespace": meta["namespace"],
            },
            "involvedObject": {
                "apiVersion": body.get("apiVersion", "reranker.dev/v1alpha1"),
                "kind": body.get("kind", "Reranker"),
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta.get("uid"),
            },
            "type": type_,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": COMPONENT},
            "reportingComponent": COMPONENT,
            "reportingInstance": COMPONENT,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        try:
            self.api.create(event)
            self.metrics.event_posted(type_, reason)
        except (ApiException, OSError) as exc:
            log.warning("could not post an event", extra={"reason": reason, "error": str(exc)})
