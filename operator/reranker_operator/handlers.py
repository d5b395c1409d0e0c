"""kopf handler registration only: every handler is a thin call into `reconcile.Reconciler`.

Triggers (all end in the same idempotent `Reconciler.reconcile(namespace, name)`):
- a Reranker is created, its spec/labels/annotations change, or the operator (re)starts;
- one of its Jobs, its Deployment, their pods, its cache PVC or its HPA changes (kopf.on.event
  on objects labelled `app.kubernetes.io/managed-by=reranker-operator`), so status follows what
  the scheduler, the kubelet and the controllers report;
- an Unschedulable pod reaches the configured timeout (a one-shot timer in the Reconciler: no
  event may come at that moment).

No deletion handlers and no kopf timers/daemons: both would put a kopf finalizer on every Reranker.
Children go by ownerReferences (the garbage collector), which needs no operator at all.

Handlers are sync: the official `kubernetes` client blocks, so kopf runs them in its thread pool.
The reconciler comes from kopf's `memo` (see runner.make_memo).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import kopf
from kubernetes.client.exceptions import ApiException

from reranker_operator import builders, kube
from reranker_operator.reconcile import Reconciler
from reranker_operator.spec import API_GROUP, API_VERSION, PLURAL

MANAGED: dict[str, Any] = {  # values: a label value or kopf.PRESENT
    builders.LABEL_MANAGED_BY: "reranker-operator",
    builders.LABEL_RERANKER: kopf.PRESENT,
}
Logger = logging.Logger | logging.LoggerAdapter[Any]


@dataclass(frozen=True)
class Tuning:
    """Retry/timeout knobs: kopf retries forever unless told otherwise."""

    retries: int = 20  # attempts of the Reranker handler before giving up until the next change
    backoff: float = 15.0  # seconds between attempts (also TemporaryError's delay)
    timeout: float = 30 * 60.0  # overall budget of one handling, seconds
    event_attempts: int = 3  # a child's event handler: tries before leaving it to the next event
    event_backoff: float = 2.0


def register(registry: kopf.OperatorRegistry, tuning: Tuning = Tuning()) -> None:
    """Register every handler of the operator into `registry`."""

    @kopf.on.resume(
        API_GROUP,
        API_VERSION,
        PLURAL,
        registry=registry,
        id="reconcile",
        retries=tuning.retries,
        backoff=tuning.backoff,
        timeout=tuning.timeout,
    )
    @kopf.on.create(
        API_GROUP,
        API_VERSION,
        PLURAL,
        registry=registry,
        id="reconcile",
        retries=tuning.retries,
        backoff=tuning.backoff,
        timeout=tuning.timeout,
    )
    @kopf.on.update(
        API_GROUP,
        API_VERSION,
        PLURAL,
        registry=registry,
        id="reconcile",
        retries=tuning.retries,
        backoff=tuning.backoff,
        timeout=tuning.timeout,
    )
    def reconcile_reranker(namespace: str | None, name: str, memo: Any, **_: Any) -> None:
        if namespace is None:  # Rerankers are namespaced: kopf always passes one
            return None
        reconciler: Reconciler = memo.reconciler
        try:
            outcome = reconciler.reconcile(namespace, name)
        except Exception as exc:
            if kube.is_transient(exc):
                raise kopf.TemporaryError(
                    f"transient API error: {exc}", delay=tuning.backoff
                ) from exc
            raise
        if outcome.invalid is not None:
            # Status already says Failed/InvalidSpec; retrying cannot help until the spec changes.
            raise kopf.PermanentError(str(outcome.invalid))
        return None  # nothing for kopf to store in status

    @kopf.on.event("batch", "v1", "jobs", labels=MANAGED, registry=registry)
    def job_event(
        body: kopf.Body, namespace: str | None, memo: Any, logger: Logger, **_: Any
    ) -> None:
        _reconcile_owner(memo.reconciler, namespace, body, tuning, logger)

    @kopf.on.event("apps", "v1", "deployments", labels=MANAGED, registry=registry)
    def deployment_event(
        body: kopf.Body, namespace: str | None, memo: Any, logger: Logger, **_: Any
    ) -> None:
        _reconcile_owner(memo.reconciler, namespace, body, tuning, logger)

    # What the scheduler and kubelet say (Unschedulable, ImagePullBackOff, OOMKilled, ...) is on
    # the pods; an unbound cache is on its PVC; a missing metric on the HPA.
    @kopf.on.event("v1", "pods", labels=MANAGED, registry=registry)
    def pod_event(
        body: kopf.Body, namespace: str | None, memo: Any, logger: Logger, **_: Any
    ) -> None:
        _reconcile_owner(memo.reconciler, namespace, body, tuning, logger)

    @kopf.on.event("v1", "persistentvolumeclaims", labels=MANAGED, registry=registry)
    def pvc_event(
        body: kopf.Body, namespace: str | None, memo: Any, logger: Logger, **_: Any
    ) -> None:
        _reconcile_owner(memo.reconciler, namespace, body, tuning, logger)

    @kopf.on.event(
        "autoscaling", "v2", "horizontalpodautoscalers", labels=MANAGED, registry=registry
    )
    def hpa_event(
        body: kopf.Body, namespace: str | None, memo: Any, logger: Logger, **_: Any
    ) -> None:
        _reconcile_owner(memo.reconciler, namespace, body, tuning, logger)


def _reconcile_owner(
    reconciler: Reconciler, namespace: str | None, body: kopf.Body, tuning: Tuning, logger: Logger
) -> None:
    """Reconcile the Reranker a child belongs to.

    kopf never retries event handlers, so transient API errors get a few bounded attempts here
    (this runs in a worker thread; the short sleep blocks nothing else). After that the next
    event of any child, or the Reranker's own handler, reconciles again.
    """
    owner = body.metadata.labels.get(builders.LABEL_RERANKER)
    if not owner or namespace is None:
        return
    for attempt in range(1, tuning.event_attempts + 1):
        try:
            reconciler.reconcile(namespace, owner)
            return
        except (ApiException, OSError) as exc:
            if not kube.is_transient(exc) or attempt == tuning.event_attempts:
                logger.warning(f"reconcile of Reranker {owner} after a child's event failed: {exc}")
                return
            time.sleep(tuning.event_backoff * attempt)
