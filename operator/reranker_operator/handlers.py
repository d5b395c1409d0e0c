"""kopf handler registration only: every handler is a thin call into `reconcile.Reconciler`.

Triggers (all end in the same idempotent `Reconciler.reconcile(namespace, name)`):
- a Reranker is created, its spec/labels/annotations change, or the operator (re)starts;
- one of its Jobs, its Deployment, their pods, its Service, Ingress, PDB, cache PVC or HPA changes (kopf.on.event
  on objects labelled `app.kubernetes.io/managed-by=reranker-operator`), so status follows what
  the scheduler, the kubelet and the controllers report;
- a one-shot timer of the Reconciler, where no event may come: an issue that may pass by itself
  (Unschedulable, no container started, a quota) reaches the configured timeout; a minute after
  a lasting API refusal; every 30 s while a build Job has no pod; shortly after a build Job was
  deleted to be replaced.

No deletion handlers and no kopf timers/daemons: both would put a kopf finalizer on every Reranker.
Children go by ownerReferences (the garbage collector), which needs no operator at all.

The official `kubernetes` client blocks: the Reranker's handler is sync (kopf runs it in its
thread pool); the children's event handlers are async and run the reconcile in the same pool, so
their retry waits are cancellable sleeps. The reconciler comes from kopf's `memo`
(see runner.make_memo).

API faults (docs/operator-lifecycle.md, "Under API faults"): transient errors (`kube.is_transient`:
5xx, 429, 409, network) are retried with a back-off and logged once per attempt, in one line,
without a traceback; so are API refusals and `kube.NotOurs` in the Reranker's handler, which
retries until it succeeds (a refusal is on the Reranker's status meanwhile: fixing RBAC, a quota
or a name in the way needs no nudge of the Reranker afterwards).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import kopf

from reranker_operator import builders, kube
from reranker_operator.reconcile import Reconciler
from reranker_operator.spec import API_GROUP, API_VERSION, PLURAL

MANAGED: dict[str, Any] = {
    builders.LABEL_MANAGED_BY: "reranker-operator",
    builders.LABEL_RERANKER: kopf.PRESENT,
}


# The children whose events reconcile their Reranker (runner.py filters each watch by label on
# the API server), and what each tells:
WATCHED_CHILDREN: tuple[tuple[str, str] | tuple[str, str, str], ...] = (
    ("batch", "v1", "jobs"),  # a build or prune finished or failed
    ("apps", "v1", "deployments"),  # rollouts, replicas, ReplicaFailure
    ("v1", "pods"),  # what the scheduler and the kubelet say: Unschedulable, OOMKilled, ...
    ("v1", "services"),  # a LoadBalancer's address, set by the cloud's controller
    ("v1", "persistentvolumeclaims"),  # an unbound cache claim
    ("autoscaling", "v2", "horizontalpodautoscalers"),  # a metric the HPA cannot read
    # An Ingress or PDB deleted or edited by hand is put back at once. (HTTPRoutes and monitors
    # are not watched: their APIs are add-ons a cluster may lack; the next reconcile restores them.)
    ("networking.k8s.io", "v1", "ingresses"),
    ("policy", "v1", "poddisruptionbudgets"),
)


@dataclass(frozen=True)
class Tuning:
    """Retry knobs. The Reranker's handler retries until it succeeds, waiting `backoff`, then
    twice as long each time up to `max_backoff`; a child's event is retried `retries` times."""

    retries: int = 20  # attempts of one child's event
    backoff: float = 15.0  # the Reranker handler's first back-off; a child event's longest
    max_backoff: float = 300.0  # the Reranker handler's longest back-off
    event_backoff: float = 2.0  # a child's event: first back-off, doubling up to `backoff`


def register(registry: kopf.OperatorRegistry, tuning: Tuning = Tuning()) -> None:
    """Register every handler of the operator into `registry`."""

    @kopf.on.resume(
        API_GROUP,
        API_VERSION,
        PLURAL,
        registry=registry,
        id="reconcile",
        backoff=tuning.backoff,
    )
    @kopf.on.create(
        API_GROUP,
        API_VERSION,
        PLURAL,
        registry=registry,
        id="reconcile",
        backoff=tuning.backoff,
    )
    @kopf.on.update(
        API_GROUP,
        API_VERSION,
        PLURAL,
        registry=registry,
        id="reconcile",
        backoff=tuning.backoff,
    )
    def reconcile_reranker(
        namespace: str | None, name: str, memo: kopf.Memo, retry: int, logger: kopf.Logger, **_: Any
    ) -> None:
        if namespace is None:  # never: Rerankers are namespaced (typed so by kopf)
            return None
        reconciler: Reconciler = memo.reconciler
        try:
            outcome = reconciler.reconcile(namespace, name)
        except Exception as exc:
            # API faults, API refusals (403, 404, ...) and someone else's object in the way: one
            # line per attempt (kopf logs it at ERROR, without a traceback). Anything else is a
            # bug: its traceback, once per attempt. Both retried, ever more slowly.
            delay = reranker_delay(tuning, retry)
            if not kube.is_api_fault(exc):
                logger.exception("reconcile failed unexpectedly (a bug: please report it)")
            raise kopf.TemporaryError(
                f"{kube.describe(exc)}; retrying in {delay:g}s", delay=delay
            ) from exc
        if outcome.invalid is not None:
            # Status already says Failed/InvalidSpec; retrying cannot help until the spec changes.
            raise kopf.PermanentError(str(outcome.invalid))
        return None  # nothing for kopf to store in status

    async def child_event(
        body: kopf.Body, namespace: str | None, memo: kopf.Memo, logger: kopf.Logger, **_: Any
    ) -> None:
        await _reconcile_owner(memo.reconciler, namespace, body, tuning, logger)

    for resource in WATCHED_CHILDREN:
        kopf.on.event(*resource, id=f"{resource[-1]}_event", labels=MANAGED, registry=registry)(
            child_event
        )


def reranker_delay(tuning: Tuning, retry: int) -> float:
    """Back-off of the Reranker's handler after its `retry`-th retry (0 first): doubling from
    `backoff`, capped at `max_backoff`."""
    return float(min(tuning.backoff * 2 ** min(retry, 32), tuning.max_backoff))


def event_delay(tuning: Tuning, attempt: int) -> float:
    """Back-off after failed attempt `attempt` (1-based) of a child's event: doubling from
    `event_backoff`, capped at `backoff` (the Reranker handler's own delay)."""
    return float(min(tuning.event_backoff * 2 ** (attempt - 1), tuning.backoff))


async def _reconcile_owner(
    reconciler: Reconciler,
    namespace: str | None,
    body: kopf.Body,
    tuning: Tuning,
    logger: kopf.Logger,
) -> None:
    """Reconcile the Reranker a child belongs to.

    kopf never retries event handlers, and this event may be the only trigger there will be (a
    Job that succeeded during an API outage changes no more), so transient API errors are retried
    here up to `tuning.retries` attempts with a capped doubling back-off (`event_delay`), each
    failure logged once in one line. The reconcile runs in a worker thread (the `kubernetes`
    client blocks); the waits are asyncio sleeps, so a stopping operator cancels them at once.
    """
    owner = body.metadata.labels.get(builders.LABEL_RERANKER)
    if not owner or namespace is None:  # not ours / never (Jobs, Deployments are namespaced)
        return
    loop = asyncio.get_running_loop()
    for attempt in range(1, tuning.retries + 1):
        try:
            await loop.run_in_executor(None, reconciler.reconcile, namespace, owner)
            return
        except Exception as exc:
            if not kube.is_api_fault(exc):
                raise  # a bug: kopf logs its traceback
            what = f"reconcile of Reranker {owner} after a {body.get('kind', 'child')}'s event"
            if not kube.is_transient(exc):  # a refusal: the Reranker's own handler retries it
                logger.warning(f"{what} failed: {kube.describe(exc)}")
                return
            if attempt == tuning.retries:
                logger.warning(
                    f"{what} failed: {kube.describe(exc)}; giving up after {attempt} attempts "
                    "until the next change of the Reranker or of its children"
                )
                return
            delay = event_delay(tuning, attempt)
            logger.warning(f"{what} failed: {kube.describe(exc)}; retrying in {delay:g}s")
            await asyncio.sleep(delay)
