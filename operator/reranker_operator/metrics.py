"""The operator's own Prometheus metrics (`reranker-operator run --metrics-port`).

What a platform team alerts on: reconciles that fail (API errors, bugs), specs refused, engine
builds that fail, Rerankers turning Failed or Degraded, and reconciles that get slow. Only
counters and a histogram: with kopf peering the stand-by replicas reconcile nothing, so their
series stay flat and `sum(rate(...))` over all replicas is right. A Reranker's current state is
its status, not a metric of the operator: kube-state-metrics exports it (docs/operator.md,
"Monitoring the operator").
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    start_http_server,
)

from reranker_operator import __version__

log = logging.getLogger(__name__)

# No `*_created` series (one per label set, doubling what a scrape carries), as in the runtime.
disable_created_metrics()

# ok: status written; invalid_spec: refused, status says Failed; api_error: the API server
# failed or refused, or someone else's object is in the way (retried with a back-off); error: a
# bug (kopf logs its traceback and retries). A trigger for a Reranker that is gone (its children's
# deletions) reconciles nothing and is not counted.
RESULTS = ("ok", "invalid_spec", "api_error", "error")
PHASES = ("Pending", "Building", "Deploying", "Ready", "Degraded", "Failed")
# Every event the reconciler posts on a Reranker (reconcile.py; a test keeps the two in step).
EVENTS = (
    ("Warning", "InvalidSpec"),
    ("Warning", "BuildFailed"),
    ("Warning", "ApiRefused"),
    ("Normal", "BuildStarted"),
    ("Normal", "BuildRestarted"),
    ("Normal", "BuildCancelled"),
    ("Normal", "EngineBuilt"),
    ("Normal", "RollingOut"),
    ("Normal", "Ready"),
    ("Normal", "EnginesPruned"),
)


class OperatorMetrics:
    """One registry per operator (and per test), so nothing is shared through a global."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        Gauge(
            "reranker_operator_build_info",
            "Always 1; the operator's version in a label.",
            ["version"],
            registry=self.registry,
        ).labels(version=__version__).set(1)
        self.reconciles = Counter(
            "reranker_operator_reconciles",
            "Reconciles of a Reranker, by result: ok, invalid_spec, api_error (retried), "
            "error (a bug, retried).",
            ["result"],
            registry=self.registry,
        )
        self.reconcile_seconds = Histogram(
            "reranker_operator_reconcile_duration_seconds",
            "Time of one reconcile (API calls included), whatever its result.",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=self.registry,
        )
        self.phase_transitions = Counter(
            "reranker_operator_phase_transitions",
            "Rerankers whose status.phase changed, by the phase entered.",
            ["phase"],
            registry=self.registry,
        )
        self.events = Counter(
            "reranker_operator_events",
            "Kubernetes Events posted on Rerankers, by type and reason.",
            ["type", "reason"],
            registry=self.registry,
        )
        # Every label value exists from the start at 0, so rate() and increase() see the first
        # failure (a series that appears with value 1 has no increase to show).
        for result in RESULTS:
            self.reconciles.labels(result=result)
        for phase in PHASES:
            self.phase_transitions.labels(phase=phase)
        for type_, reason in EVENTS:
            self.events.labels(type=type_, reason=reason)

    def reconciled(self, result: str, seconds: float) -> None:
        self.reconciles.labels(result=result).inc()
        self.reconcile_seconds.observe(seconds)

    def phase_changed(self, old: str | None, new: str) -> None:
        if new != old:
            self.phase_transitions.labels(phase=new).inc()

    def event_posted(self, type_: str, reason: str) -> None:
        self.events.labels(type=type_, reason=reason).inc()

    def serve(self, port: int, host: str = "0.0.0.0") -> Callable[[], None]:
        """Serve GET /metrics on host:port in a daemon thread; returns the function that stops it."""
        server, thread = start_http_server(port, addr=host, registry=self.registry)
        log.info("serving metrics", extra={"url": f"http://{host}:{server.server_port}/metrics"})

        def stop() -> None:
            server.shutdown()
            server.server_close()
            thread.join(timeout=5)

        return stop
