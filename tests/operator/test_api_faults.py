"""The operator under API faults: 5xx for a while, 409 on create and on patch, dropped watches.

Each scenario runs the real kopf operator against kmock's emulator with faults injected mid-flow
(kmock_env.FaultyKubernetes) and checks what a user relies on:
- the operator converges to the same children and status as a run without faults (a baseline run
  of the same flow on a clean emulator, computed once per session);
- no second Job is ever created (the emulator counts accepted POSTs);
- each fault that reaches a reconcile is logged once, in one line, with its back-off, and without
  a traceback.
The tests' kopf back-offs are short (kmock_env.fast_tuning, fault_settings), so each scenario takes
a few seconds; the same code paths run with the production back-offs (docs/operator-lifecycle.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import kmock
import kopf
import pytest

from kmock_env import (
    RESET,
    Cluster,
    Fault,
    FaultyKubernetes,
    OperatorRunner,
    declare_resources,
    fast_settings,
    wait_for,
)
from reranker_operator import builders
from reranker_operator.config import OperatorConfig
from reranker_operator.spec import parse_spec

pytestmark = pytest.mark.kmock(cls=FaultyKubernetes)

NAME = "bge"
# The Shared engine cache: its build Job is the child whose duplication a fault could cause.
SPEC: dict[str, Any] = {
    "checkpoint": {"repo": "BAAI/bge-reranker-large", "revision": "main"},
    "accelerator": {"type": "L4"},
    "replicas": 1,
    "engineCache": {"mode": "Shared"},
}
KEY = builders.engine_key_for(parse_spec({"spec": SPEC}), OperatorConfig())
JOB = builders.job_name(NAME, KEY)

# Paths of the requests the faults aim at.
JOBS = r"/apis/batch/v1/namespaces/ml/jobs$"
DEPLOYMENTS = r"/apis/apps/v1/namespaces/ml/deployments$"
DEPLOYMENT = rf"/apis/apps/v1/namespaces/ml/deployments/{NAME}$"
STATUS = rf"/rerankers/{NAME}/status$"
SERVICES = r"/api/v1/namespaces/ml/services$"


def fault_settings() -> kopf.OperatorSettings:
    settings = fast_settings()
    settings.networking.error_backoffs = (0.1, 0.2, 0.4, 0.8)  # kopf's own requests: 1.5s
    return settings


# --------------------------------------------------------------------------- flows


Hook = Callable[[], Awaitable[None]]


async def _nothing() -> None:
    return None


async def to_ready(cluster: Cluster, before_success: Hook = _nothing) -> None:
    """Create -> build Job -> succeeded -> Deployment -> ready, as in test_operator_flows.

    `before_success` runs once the Job is running, before the test marks it succeeded.
    """
    await cluster.create_reranker(NAME, SPEC)
    await wait_for(lambda: cluster.get(cluster.JOB, JOB), "the build Job")
    await cluster.job_running(JOB)
    await before_success()
    await cluster.job_succeeded(JOB)
    await wait_for(lambda: cluster.get(cluster.DEPLOYMENT, NAME), "the Deployment")
    await cluster.deployment_ready(NAME)
    await wait_for(lambda: cluster.status(NAME).get("phase") == "Ready", "phase Ready")


async def to_ready_then_scaled(
    cluster: Cluster, before_success: Hook = _nothing, before_scaling: Hook = _nothing
) -> None:
    """to_ready, then 3 replicas: the Deployment is patched (and a PDB created), no new Job."""
    await to_ready(cluster, before_success)
    await before_scaling()
    await cluster.update_spec(NAME, {"replicas": 3})
    await wait_for(
        lambda: (cluster.get(cluster.DEPLOYMENT, NAME) or {})["spec"].get("replicas") == 3,
        "the Deployment patched to 3 replicas",
    )
    await cluster.deployment_ready(NAME, 3)
    await wait_for(
        lambda: (
            cluster.status(NAME).get("readyReplicas") == 3
            and cluster.status(NAME).get("observedGeneration") == 2
            and cluster.status(NAME).get("phase") == "Ready"
        ),
        "Ready with 3 replicas at generation 2",
    )


async def idle_and_building(cluster: Cluster) -> None:
    """Building, and kopf done with the Reranker's own handler (its progress annotation gone;
    the emulator's lack of resourceVersions can make kopf run it twice): from here on, the
    Job's events are the only trigger of a reconcile."""

    def idle() -> bool:
        meta = (cluster.get(cluster.RERANKER, NAME) or {}).get("metadata") or {}
        annotations = meta.get("annotations") or {}
        return (
            cluster.status(NAME).get("phase") == "Building"
            and "reranker.dev/last-handled-configuration" in annotations
            and "reranker.dev/reconcile" not in annotations
        )

    await wait_for(idle, "phase Building, and kopf idle")
    await asyncio.sleep(0.5)  # kopf's repeated cycles over its own patches settle
    assert idle()


Flow = Callable[..., Awaitable[None]]


def snapshot(cluster: Cluster) -> dict[str, Any]:
    """Children and status as a user sees them, without what differs run to run (uid, times)."""
    reranker = cluster.get(cluster.RERANKER, NAME) or {}
    status = copy.deepcopy(reranker.get("status") or {})
    for condition in status.get("conditions") or []:
        condition.pop("lastTransitionTime", None)
    (status.get("engine") or {}).pop("builtAt", None)
    children: dict[str, Any] = {}
    for resource in (cluster.PVC, cluster.JOB, cluster.DEPLOYMENT, cluster.SERVICE, cluster.PDB):
        children[resource] = sorted(
            (
                {
                    "name": obj["metadata"]["name"],
                    "labels": obj["metadata"].get("labels"),
                    "annotations": obj["metadata"].get("annotations"),
                    "ownerReferences": obj["metadata"].get("ownerReferences"),
                    "spec": obj.get("spec"),
                }
                for obj in cluster.list(resource)
            ),
            key=lambda child: str(child["name"]),
        )
    # The operator's own events (kopf also posts its log messages as events: not compared).
    reasons = sorted(
        {e["reason"] for e in cluster.events() if e.get("reportingInstance") == "reranker-operator"}
    )
    state = {"status": status, "children": children, "events": reasons}
    uid = (reranker.get("metadata") or {}).get("uid", "")
    return json.loads(json.dumps(state).replace(uid, "<uid>")) if uid else state


_BASELINES: dict[str, dict[str, Any]] = {}


async def baseline(flow: Flow) -> dict[str, Any]:
    """The state `flow` ends in without faults (a clean emulator and operator; cached)."""
    if flow.__name__ not in _BASELINES:
        async with FaultyKubernetes() as server, kmock.Server(server):
            declare_resources(server)
            operator = OperatorRunner(str(server.url), settings=fault_settings)
            await operator.start()
            try:
                await flow(Cluster(server))
            finally:
                await operator.stop()
            _BASELINES[flow.__name__] = snapshot(Cluster(server))
    return _BASELINES[flow.__name__]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture()
async def cluster(kmock: FaultyKubernetes) -> Cluster:
    declare_resources(kmock)
    return Cluster(kmock)


@pytest.fixture()
async def operator(kmock: FaultyKubernetes, cluster: Cluster) -> AsyncIterator[OperatorRunner]:
    op = OperatorRunner(str(kmock.url), settings=fault_settings)
    await op.start()
    try:
        yield op
    finally:
        await op.stop()


@pytest.fixture()
def logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO)
    return caplog


def fault_lines(logs: pytest.LogCaptureFixture, *fragments: str) -> list[logging.LogRecord]:
    """Log records whose message carries all `fragments`."""
    return [r for r in logs.records if all(f in r.getMessage() for f in fragments)]


async def ready_false(cluster: Cluster, reason: str) -> dict[str, Any]:
    """The Reranker's Ready condition once it is False for `reason`."""
    return await wait_for(
        lambda: (c := cluster.condition(NAME, "Ready")).get("reason") == reason and c,
        f"Ready=False {reason}",
    )


async def assert_logged_once_per_retry(
    logs: pytest.LogCaptureFixture, fault: Fault, *fragments: str
) -> None:
    """Each injected fault: exactly one log line naming it and its back-off, no traceback.
    Waited for: a write stored before its error (`commit`) can make the state converge before
    the reconcile that got the error has logged it."""
    assert fault.injected > 0, "the fault never fired: the scenario tests nothing"
    with contextlib.suppress(AssertionError):  # the count is checked below, with the messages
        await wait_for(
            lambda: len(fault_lines(logs, str(fault.status), *fragments)) >= fault.injected,
            "a log line per injected fault",
            timeout=5,
        )
    records = fault_lines(logs, str(fault.status), *fragments)
    messages = [r.getMessage() for r in records]
    assert len(records) == fault.injected, messages
    for record in records:
        message = record.getMessage()
        assert "\n" not in message, message
        assert "retrying in" in message, message
        assert record.exc_info is None, message


async def converges(
    cluster: Cluster,
    kmock: FaultyKubernetes,
    flow: Flow,
    *,
    like: Flow | None = None,
    lost_events: frozenset[str] = frozenset(),
    **hooks: Hook,
) -> None:
    """Run `flow` (under whatever faults are armed), then compare with the fault-free run of
    `like` (default: `flow` itself).

    `lost_events`: event reasons allowed to be missing (events are best effort: one posted right
    after a write whose reply was lost is not posted again by the retry).
    """
    await flow(cluster, **hooks)
    # One Job object, and the API server accepted exactly one Job creation.
    assert [j["metadata"]["name"] for j in cluster.list(cluster.JOB)] == [JOB]
    assert kmock.created(JOBS) == 1
    expected = copy.deepcopy(await baseline(like or flow))
    expected["events"] = [e for e in expected["events"] if e not in lost_events]

    def same() -> bool:
        state = snapshot(cluster)
        state["events"] = [e for e in state["events"] if e not in lost_events]
        return state == expected

    try:  # the last events are posted right after the status write the flow waited for
        await wait_for(same, "the state of the fault-free run", timeout=5)
    finally:
        state = snapshot(cluster)
        state["events"] = [e for e in state["events"] if e not in lost_events]
        assert state == expected
    assert kmock.created(JOBS) == 1


# --------------------------------------------------------------------------- 5xx


async def test_faults_5xx_while_the_job_is_created(
    cluster: Cluster, operator: OperatorRunner, kmock: FaultyKubernetes, logs: Any
) -> None:
    # Three refusals, then a 500 after the Job was stored (the reply was lost): the retry must
    # find that Job, not create a second one.
    refused = kmock.inject("POST", JOBS, 503, times=3)
    lost = kmock.inject("POST", JOBS, 500, after=3, commit=True)
    # BuildStarted is posted by the reconcile that created the Job: here its reply was lost.
    await converges(cluster, kmock, to_ready, lost_events=frozenset({"BuildStarted"}))
    assert refused.injected == 3 and lost.injected == 1
    # Each failed attempt is a reconcile the operator's metrics count as an API error.
    errors = operator.reconciler.metrics.registry.get_sample_value(
        "reranker_operator_reconciles_total", {"result": "api_error"}
    )
    assert errors == refused.injected + lost.injected
    # Either handler may meet the fault (the Reranker's, or a child's event: the cache PVC's
    # creation triggers one), each with its own back-off.
    await assert_logged_once_per_retry(logs, refused, "POST", "/jobs", "retrying in")
    await assert_logged_once_per_retry(logs, lost, "POST", "/jobs", "retrying in")


async def test_faults_5xx_while_status_is_patched(
    cluster: Cluster, operator: OperatorRunner, kmock: FaultyKubernetes, logs: Any
) -> None:
    # The first status write (Pending) goes through; the next three fail, the third one after
    # it was stored.
    refused = kmock.inject("PATCH", STATUS, 503, after=1, times=2)
    lost = kmock.inject("PATCH", STATUS, 500, after=3, commit=True)
    # The Ready event follows the status write that turned Ready: if that write's reply was
    # lost, the retry finds the status already written and posts no event (at most once).
    await converges(cluster, kmock, to_ready, lost_events=frozenset({"Ready"}))
    assert refused.injected == 2 and lost.injected == 1
    await assert_logged_once_per_retry(logs, refused, "PATCH", "/status", "retrying in")
    await assert_logged_once_per_retry(logs, lost, "PATCH", "/status", "retrying in")


async def test_faults_5xx_while_the_deployment_is_created_and_patched(
    cluster: Cluster, operator: OperatorRunner, kmock: FaultyKubernetes, logs: Any
) -> None:
    # The Deployment is created by the reconcile that the Job's success triggers: a child's
    # event, the only trigger there is once the Reranker's own handler is done. It fails more
    # often than a few quick attempts could cover (4 of the tests' 5 attempts: fast_tuning).
    create = kmock.inject("POST", DEPLOYMENTS, 503, times=4)
    patch = kmock.inject("PATCH", DEPLOYMENT, 500, times=3)

    await converges(
        cluster, kmock, to_ready_then_scaled, before_success=lambda: idle_and_building(cluster)
    )
    assert create.injected == 4 and patch.injected == 3
    await assert_logged_once_per_retry(logs, create, "POST", "/deployments", "retrying in")
    await assert_logged_once_per_retry(logs, patch, "PATCH", "/deployments/bge", "retrying in")


async def test_faults_api_outage_mid_flow(
    cluster: Cluster, operator: OperatorRunner, kmock: FaultyKubernetes
) -> None:
    """Every request of the operator and of kopf (lists and watches too) fails for a while,
    and the build Job succeeds meanwhile."""

    async def through_an_outage(cluster: Cluster) -> None:
        await cluster.create_reranker(NAME, SPEC)
        await wait_for(lambda: cluster.get(cluster.JOB, JOB), "the build Job")
        await cluster.job_running(JOB)
        await idle_and_building(cluster)
        down = kmock.inject("*", "", 503, times=None, watch=True)
        kmock.drop_watches()  # the open streams break too
        await cluster.job_succeeded(JOB)
        await asyncio.sleep(0.6)  # shorter than kopf's own retries (fault_settings)
        down.stop()
        assert down.injected > 0
        await wait_for(lambda: cluster.get(cluster.DEPLOYMENT, NAME), "the Deployment")
        await cluster.deployment_ready(NAME)
        await wait_for(lambda: cluster.status(NAME).get("phase") == "Ready", "phase Ready")

    await converges(cluster, kmock, through_an_outage, like=to_ready)


async def test_faults_connection_reset_while_the_service_is_created(
    cluster: Cluster, operator: OperatorRunner, kmock: FaultyKubernetes, logs: Any
) -> None:
    # No answer at all: once before the Service is stored, once after (the reply is lost).
    refused = kmock.inject("POST", SERVICES, RESET)
    lost = kmock.inject("POST", SERVICES, RESET, after=1, commit=True)
    await converges(cluster, kmock, to_ready)
    assert refused.injected == 1 and lost.injected == 1
    lines = fault_lines(logs, "POST /api/v1/namespaces/ml/services: no answer", "retrying in")
    assert len(lines) == 2, [r.getMessage() for r in lines]
    assert all("\n" not in r.getMessage() and r.exc_info is None for r in lines)


# --------------------------------------------------------------------------- 409


async def test_faults_409_on_create(
    cluster: Cluster, operator: OperatorRunner, kmock: FaultyKubernetes, logs: Any
) -> None:
    # Another writer (a second operator replica) creates the Job first: it is adopted as ours.
    raced = kmock.inject("POST", JOBS, 409, commit=True)
    # A conflict for an object that is gone again by the time it is read: retried.
    phantom = kmock.inject("POST", DEPLOYMENTS, 409, times=2)
    await converges(cluster, kmock, to_ready, lost_events=frozenset({"BuildStarted"}))
    assert raced.injected == 1 and phantom.injected == 2
    await assert_logged_once_per_retry(logs, phantom, "POST", "/deployments", "retrying in")


async def test_faults_an_object_that_is_not_ours_is_never_adopted(
    cluster: Cluster, operator: OperatorRunner, kmock: FaultyKubernetes, logs: Any
) -> None:
    # Someone else's Job already has the build Job's name (the operator's create would get 409).
    await cluster.create(
        cluster.JOB,
        {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {"name": JOB, "labels": {"team": "other"}},
            "spec": {"template": {"spec": {"containers": [{"name": "x", "image": "busybox"}]}}},
        },
    )
    await cluster.create_reranker(NAME, SPEC)
    refusal = "was not created by reranker-operator for this Reranker"
    # The Reranker's handler retries the refusal (a child's event only logs it, once).
    retried = ("Handler 'reconcile' failed temporarily", refusal)
    await wait_for(lambda: len(fault_lines(logs, *retried)) >= 2, "two refusals")
    for record in fault_lines(logs, *retried):
        message = record.getMessage()
        assert f"Job ml/{JOB} exists" in message and "retrying in" in message, message
        assert "\n" not in message and record.exc_info is None, message
    job = cluster.get(cluster.JOB, JOB) or {}
    assert job["metadata"]["labels"] == {"team": "other"}  # neither adopted nor patched
    assert kmock.created(JOBS) == 1  # the test's own
    assert cluster.get(cluster.DEPLOYMENT, NAME) is None
    # The status says what is in the way and what to do.
    ready = await ready_false(cluster, "NameTaken")
    assert f"Job ml/{JOB} exists" in ready["message"] and "delete or rename it" in ready["message"]
    assert cluster.status(NAME)["phase"] == "Failed"
    (event,) = await wait_for(lambda: cluster.events("ApiRefused"), "an ApiRefused event")
    assert event["type"] == "Warning"

    # Once it is gone, the handler's next retry builds our own Job: no nudge needed.
    await cluster.delete(cluster.JOB, JOB)
    await wait_for(
        lambda: (
            (((cluster.get(cluster.JOB, JOB) or {}).get("metadata") or {}).get("labels") or {}).get(
                builders.LABEL_RERANKER
            )
            == NAME
        ),
        "the operator's own Job",
    )


async def test_faults_409_on_patch(
    cluster: Cluster, operator: OperatorRunner, kmock: FaultyKubernetes, logs: Any
) -> None:
    status = kmock.inject("PATCH", STATUS, 409, after=1, times=2)
    deployment = kmock.inject("PATCH", DEPLOYMENT, 409, times=2)
    await converges(cluster, kmock, to_ready_then_scaled)
    assert status.injected == 2 and deployment.injected == 2
    await assert_logged_once_per_retry(logs, status, "PATCH", "/status", "Conflict", "retrying in")
    await assert_logged_once_per_retry(logs, deployment, "PATCH", "/deployments/bge", "retrying in")


# --------------------------------------------------------------------------- watch streams

JOB_WATCH = r"/apis/batch/v1/jobs$"
RERANKER_WATCH = r"/apis/reranker.dev/v1alpha1/rerankers$"


async def test_faults_dropped_watches_mid_flow(
    cluster: Cluster, operator: OperatorRunner, kmock: FaultyKubernetes
) -> None:
    async def drop_job_watch() -> None:
        await idle_and_building(cluster)
        assert kmock.drop_watches(JOB_WATCH) == 1

    async def drop_reranker_watch() -> None:
        assert kmock.drop_watches(RERANKER_WATCH) == 1

    # The Job's success and the spec change each happen right as their watch breaks.
    async def scaled_with_drops(cluster: Cluster) -> None:
        await to_ready(cluster, before_success=drop_job_watch)
        await wait_for(lambda: kmock.open_watches(RERANKER_WATCH), "the Reranker watch")
        await drop_reranker_watch()
        await cluster.update_spec(NAME, {"replicas": 3})
        await wait_for(
            lambda: (cluster.get(cluster.DEPLOYMENT, NAME) or {})["spec"].get("replicas") == 3,
            "the Deployment patched to 3 replicas",
        )
        await cluster.deployment_ready(NAME, 3)
        await wait_for(
            lambda: (
                cluster.status(NAME).get("readyReplicas") == 3
                and cluster.status(NAME).get("observedGeneration") == 2
            ),
            "Ready with 3 replicas at generation 2",
        )

    await scaled_with_drops(cluster)
    expected = await baseline(to_ready_then_scaled)
    await wait_for(lambda: snapshot(cluster) == expected, "the state of the fault-free run", 5)
    assert kmock.created(JOBS) == 1


async def test_faults_silent_watch_is_reconnected(
    cluster: Cluster, kmock: FaultyKubernetes
) -> None:
    """A watch that stays open but delivers nothing (a half-open connection behind a load
    balancer): kopf's inactivity timeout reconnects it, and the missed success is seen."""

    def settings() -> kopf.OperatorSettings:
        settings = fault_settings()
        settings.watching.inactivity_timeout = 1.0  # production: kopf's 70s (docs)
        settings.watching.client_timeout = 60  # so that only the inactivity timeout can help
        return settings

    async def stall_job_watch() -> None:
        await idle_and_building(cluster)
        assert kmock.stall_watches(JOB_WATCH) == 1

    operator = OperatorRunner(str(kmock.url), settings=settings)
    await operator.start()
    try:
        await converges(cluster, kmock, to_ready, before_success=stall_job_watch)
    finally:
        await operator.stop()


async def test_faults_a_lasting_refusal_is_on_the_status_until_it_is_lifted(
    cluster: Cluster, operator: OperatorRunner, kmock: FaultyKubernetes
) -> None:
    """403 on the Service (RBAC missing, a quota): Failed with the API server's words and what to
    do; the handler keeps retrying, so once the cause is gone it converges by itself."""
    forbidden = kmock.inject("POST", SERVICES, 403, times=None)
    await cluster.create_reranker(NAME, SPEC)
    ready = await ready_false(cluster, "Forbidden")
    assert "POST /api/v1/namespaces/ml/services: 403" in ready["message"]
    assert "ClusterRole" in ready["message"] and "retries" in ready["message"]
    assert cluster.status(NAME)["phase"] == "Failed"
    await wait_for(lambda: forbidden.injected >= 3, "retried")
    forbidden.stop()
    await wait_for(lambda: cluster.get(cluster.SERVICE, NAME), "the Service, once allowed")
    await cluster.job_succeeded(JOB)
    await wait_for(lambda: cluster.get(cluster.DEPLOYMENT, NAME), "the Deployment")
    await cluster.deployment_ready(NAME)
    await wait_for(lambda: cluster.status(NAME).get("phase") == "Ready", "phase Ready")


async def test_faults_a_missing_monitoring_api_names_what_to_install(
    cluster: Cluster, kmock: FaultyKubernetes
) -> None:
    """monitoring.kind ServiceMonitor on a cluster without the Prometheus Operator's CRDs: the
    create answers 404 (no such collection), which the status explains."""
    config = OperatorConfig.model_validate({"monitoring": {"kind": "ServiceMonitor"}})
    kmock.inject("POST", r"/servicemonitors$", 404, times=None)
    op = OperatorRunner(str(kmock.url), config, settings=fault_settings)
    await op.start()
    try:
        await cluster.create_reranker(NAME, SPEC)
        ready = await ready_false(cluster, "MissingAPI")
        assert "servicemonitors: 404" in ready["message"]
        assert "monitoring.kind" in ready["message"] and "CRDs" in ready["message"]
    finally:
        await op.stop()


async def test_faults_a_refused_prune_keeps_serving_and_says_so(
    cluster: Cluster, kmock: FaultyKubernetes
) -> None:
    """The prune Job refused (a Job quota, an admission policy): still Ready, the message says
    the cache keeps the unused engines, and the status does not flip back and forth."""
    op = OperatorRunner(
        str(kmock.url), OperatorConfig.model_validate({"engineCache": {"keepEngines": 0}}),
        settings=fault_settings,
    )  # fmt: skip
    await op.start()
    try:
        await to_ready(cluster)
        kmock.inject("POST", JOBS, 403, after=1, times=None)  # the new build passes, not the prune
        new_job = builders.job_name(NAME, builders.engine_key_for(
            parse_spec({"spec": {**SPEC, "build": {"maxNumTokens": 8192}}}), OperatorConfig()))  # fmt: skip
        await cluster.update_spec(NAME, {"build": {"maxNumTokens": 8192}})
        await wait_for(lambda: cluster.get(cluster.JOB, new_job), "the new build Job")
        await cluster.job_succeeded(new_job)
        await wait_for(lambda: cluster.get(cluster.DEPLOYMENT, NAME), "the Deployment")
        await cluster.deployment_ready(NAME)
        await wait_for(
            lambda: "unused engines stay in the cache" in cluster.status(NAME).get("message", ""),
            "the refused prune in the message",
        )
        assert cluster.status(NAME)["phase"] == "Ready"
        assert "403" in cluster.status(NAME)["message"]
        assert ("ml", NAME) in op.reconciler._timers  # looked at again within a minute
        # Ready once at first, once on the new engine (posted just after the status write).
        await wait_for(lambda: len(cluster.events("Ready")) == 2, "the second Ready event")
        ready_events = len(cluster.events("Ready"))
        await cluster.patch(cluster.RERANKER, NAME, {"metadata": {"labels": {"nudge": "1"}}})
        await asyncio.sleep(1.0)  # reconciles in between: none flips the status
        assert cluster.status(NAME)["phase"] == "Ready"
        assert len(cluster.events("Ready")) == ready_events and not cluster.events("ApiRefused")
    finally:
        await op.stop()


async def test_faults_events_not_readable_only_lose_an_explanation(
    cluster: Cluster, operator: OperatorRunner, kmock: FaultyKubernetes
) -> None:
    """RBAC of an older chart (events: create only): the build Job's events are read only to
    explain a Job without a pod; a 403 there must not fail the reconcile."""
    forbidden = kmock.inject("GET", r"/api/v1/namespaces/ml/events$", 403, times=None)
    await cluster.create_reranker(NAME, SPEC)
    await wait_for(lambda: cluster.get(cluster.JOB, JOB), "the build Job")
    await wait_for(lambda: forbidden.injected >= 1, "the events read")
    await wait_for(lambda: cluster.status(NAME).get("phase") == "Pending", "phase Pending")
    assert cluster.condition(NAME, "Ready").get("reason") != "Forbidden"
