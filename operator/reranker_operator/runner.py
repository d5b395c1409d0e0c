"""`reranker-operator run`: the kopf operator, with kubectl's kubeconfig resolution.

Runs standalone (no kopf peering) by default: deploy ONE replica. With `--peering NAME` several
replicas run kopf peering through the (Cluster)KopfPeering object NAME: the one with the
highest priority works, the others stand by and take over when its keep-alive lapses (the chart
installs kopf's peering CRDs, the object and its RBAC when replicaCount > 1).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import logging
import os
import socket
from collections.abc import Sequence
from typing import Any

import kopf
from kubernetes import config as k8s_config

from reranker_operator import builders, handlers, kube, spec
from reranker_operator.config import CONFIG_ENV, ConfigError, OperatorConfig, load_config
from reranker_operator.metrics import OperatorMetrics
from reranker_operator.reconcile import Reconciler

NAMESPACES_ENV = "RERANKER_OPERATOR_NAMESPACES"
PREFIX = spec.API_GROUP  # kopf's own annotations: reranker.dev/last-handled-configuration, ...

log = logging.getLogger(__name__)


def operator_settings(
    *,
    server_timeout: float = 300,
    client_timeout: float = 330,
    request_timeout: float = 60,
) -> kopf.OperatorSettings:
    """kopf settings. Also used by the tests (with shorter timeouts)."""
    settings = kopf.OperatorSettings()
    # Without these, a silently dropped watch connection can hang forever.
    settings.watching.server_timeout = server_timeout
    settings.watching.client_timeout = client_timeout
    settings.watching.connect_timeout = 30
    settings.networking.request_timeout = request_timeout
    # kopf's bookkeeping goes to annotations: the CRD's status schema would prune it from status,
    # and the user's status is ours alone.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=PREFIX, key="last-handled-configuration"
    )
    # Kubernetes events for handler warnings/errors (our own events are posted by the reconciler).
    settings.posting.enabled = True
    settings.posting.level = logging.WARNING
    settings.posting.reporting_component = "reranker-operator"
    settings.peering.standalone = True
    # Only the operator's own children are watched (a server-side filter; handlers filter too):
    # without it, every Service, Ingress, pod ... of the cluster streams into the operator.
    managed = f"{builders.LABEL_MANAGED_BY}=reranker-operator"
    for resource in handlers.WATCHED_CHILDREN:
        settings.watching.label_selectors[resource] = managed
    return settings


def make_registry(tuning: handlers.Tuning | None = None) -> kopf.OperatorRegistry:
    """The operator's handlers plus kopf's login through the `kubernetes` client's resolution
    (in-cluster service account, else $KUBECONFIG / ~/.kube/config), like kubectl."""
    registry = kopf.OperatorRegistry()
    kopf.on.login(registry=registry)(kopf.login_via_client)
    handlers.register(registry, tuning or handlers.Tuning())
    return registry


def make_memo(
    api: kube.Kube, config: OperatorConfig, metrics: OperatorMetrics | None = None
) -> kopf.Memo:
    return kopf.Memo(reconciler=Reconciler(api, config, metrics))


def parse_namespaces(values: Sequence[str] | None) -> list[str]:
    """--namespace may repeat and take comma lists; the env var is a comma list."""
    raw = list(values or [])
    if not raw and os.environ.get(NAMESPACES_ENV):
        raw = [os.environ[NAMESPACES_ENV]]
    return [ns.strip() for item in raw for ns in item.split(",") if ns.strip()]


def add_run_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "run",
        help="run the operator (kubeconfig: in-cluster, else $KUBECONFIG or ~/.kube/config)",
        description="Watch Reranker resources and reconcile their engines, Deployments and Services.",
    )
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument(
        "--namespace", "-n", action="append", metavar="NS",
        help=f"watch this namespace (repeatable, or comma-separated; env {NAMESPACES_ENV})",
    )  # fmt: skip
    scope.add_argument(
        "--all-namespaces", "-A", action="store_true",
        help="watch every namespace (the default when no namespace is given)",
    )  # fmt: skip
    parser.add_argument("--config", metavar="PATH", help=f"operator config YAML (env {CONFIG_ENV})")
    parser.add_argument(
        "--liveness-port", type=port_number, default=8080,
        help="serve kopf's liveness probe on http://0.0.0.0:PORT/healthz (0: off)",
    )  # fmt: skip
    parser.add_argument(
        "--metrics-port", type=port_number, default=8081,
        help="serve the operator's Prometheus metrics on http://0.0.0.0:PORT/metrics (0: off; "
        "not the liveness port)",
    )  # fmt: skip
    parser.add_argument("--log-format", choices=("json", "text"), default="json")
    parser.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    parser.add_argument(
        "--peering", metavar="NAME", default=None,
        help="run with kopf peering through the (Cluster)KopfPeering object NAME, which must "
        "exist: of several replicas only the one with the highest priority works, the others "
        "stand by (default: standalone, one replica)",
    )  # fmt: skip
    parser.add_argument(
        "--priority", type=int, default=None,
        help="peering priority (default: derived from the host name, i.e. the pod name, so "
        "replicas differ; kopf pauses every operator of equal priority)",
    )  # fmt: skip
    parser.set_defaults(func=run_command)


def port_number(text: str) -> int:
    """A TCP port for argparse: 0 (off) to 65535."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port {port} is outside 0-65535")
    return port


def peering_priority(hostname: str) -> int:
    """A stable, practically unique priority per pod: kopf pauses all peers of equal priority."""
    return int(hashlib.sha256(hostname.encode()).hexdigest()[:7], 16)


def run_command(args: argparse.Namespace) -> int:
    kopf.configure(
        verbose=args.verbose,
        log_format=kopf.LogFormat.JSON if args.log_format == "json" else kopf.LogFormat.FULL,
    )
    if not args.verbose:
        logging.getLogger("aiohttp.access").setLevel(logging.WARNING)  # liveness probes every few s
    if args.metrics_port and args.metrics_port == args.liveness_port:
        log.error(
            f"--metrics-port and --liveness-port are both {args.metrics_port}: give them "
            "different ports (defaults: 8081 and 8080), or turn metrics off with --metrics-port 0"
        )
        return 2
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        log.error(f"invalid operator config: {exc}")
        return 2
    namespaces = [] if args.all_namespaces else parse_namespaces(args.namespace)
    try:
        api = kube.Kube(kube.load_api_client())
    except k8s_config.ConfigException as exc:
        log.error(f"no Kubernetes credentials (in-cluster or kubeconfig): {exc}")
        return 2
    liveness = f"http://0.0.0.0:{args.liveness_port}/healthz" if args.liveness_port else None
    log.info(
        "starting reranker-operator",
        extra={
            "namespaces": namespaces or "all",
            "runtime_image": config.runtime_image,
            "runtime_image_cpu": config.runtime_image_cpu,
        },
    )
    settings = operator_settings()
    peering: dict[str, Any] = {"standalone": True}
    if args.peering:
        # With peering the object must exist: never fall back to standalone next to a peer.
        settings.peering.mandatory = True
        priority = args.priority
        if priority is None:
            priority = peering_priority(socket.gethostname())
        peering = {"standalone": False, "peering_name": args.peering, "priority": priority}
    metrics = OperatorMetrics()
    stop_metrics = None
    if args.metrics_port:
        try:
            stop_metrics = metrics.serve(args.metrics_port)
        except OSError as exc:
            log.error(
                f"cannot serve metrics on port {args.metrics_port}: {exc}; choose another "
                "--metrics-port, or 0 to turn them off"
            )
            return 2
    memo = make_memo(api, config, metrics)
    try:
        asyncio.run(
            kopf.operator(
                registry=make_registry(),
                settings=settings,
                memo=memo,
                clusterwide=not namespaces,
                namespaces=namespaces,
                liveness_endpoint=liveness,
                **peering,
            )
        )
    finally:
        memo.reconciler.stop_timers()
        if stop_metrics is not None:
            stop_metrics()
    return 0
