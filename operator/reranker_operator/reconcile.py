"""Reconcile one Reranker: make its children match the spec, then write what they say to status.

Every step is safe to repeat (after a crash, a restart, or a second trigger for the same
object): children are created only when absent and patched only when the builders' spec-hash
annotation differs; the engine-build Job is never recreated while it exists; an engine counts
as built once its key is in the cache PVC's `reranker.dev/built-engines` annotation, which
outlives operator restarts and (with retention Retain) the Reranker itself.

The whole reconcile reads the Reranker afresh and is serialised per Reranker within this
process, so the Reranker's own handlers and its children's event handlers can all call it.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

from kubernetes.client.exceptions import ApiException

from reranker_operator import builders, kube, status
from reranker_operator.config import OperatorConfig
from reranker_operator.spec import InvalidSpec, RerankerSpec, parse_spec

log = logging.getLogger(__name__)

ANNOTATION_BUILT = "reranker.dev/built-engines"  # on the cache PVC: comma-separated engine keys
COMPONENT = "reranker-operator"


@dataclass(frozen=True)
class Outcome:
    """What one reconcile ended with (for handlers and logs)."""

    phase: str | None  # None: the Reranker is gone or being deleted
    invalid: InvalidSpec | None = None


def built_keys(pvc: dict[str, Any] | None) -> set[str]:
    value = ((pvc or {}).get("metadata") or {}).get("annotations", {}).get(ANNOTATION_BUILT) or ""
    return {k for k in value.split(",") if k}


class Reconciler:
    """Holds the API wrapper and the operator config; `reconcile(ns, name)` is the entry point."""

    def __init__(self, api: kube.Kube, config: OperatorConfig) -> None:
        self.api = api
        self.config = config
        self._locks: dict[tuple[str, str], threading.Lock] = {}
        self._locks_guard = threading.Lock()

    def _lock(self, namespace: str, name: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault((namespace, name), threading.Lock())

    def reconcile(self, namespace: str, name: str) -> Outcome:
        with self._lock(namespace, name):
            body = self.api.get(kube.RERANKER, namespace, name)
            if body is None or (body.get("metadata") or {}).get("deletionTimestamp"):
                # Gone (children follow by garbage collection) or going: nothing to do.
                return Outcome(phase=None)
            return self._reconcile(body)

    # ------------------------------------------------------------------ the steps

    def _reconcile(self, body: dict[str, Any]) -> Outcome:
        meta = body["metadata"]
        name, namespace = meta["name"], meta["namespace"]
        generation = meta.get("generation")
        previous = body.get("status") or {}

        try:
            spec = parse_spec(body)
        except InvalidSpec as exc:
            new = status.invalid_spec_status(exc.field, exc.message, generation, previous)
            if self._write_status(body, previous, new):
                self._event(body, "Warning", "InvalidSpec", f"{exc.field}: {exc.message}")
            log.warning(
                "invalid spec", extra={"reranker": f"{namespace}/{name}", "field": exc.field}
            )
            return Outcome(phase="Failed", invalid=exc)

        owner = builders.owner_reference(body)
        key = builders.engine_key_for(spec, self.config)
        job_name = builders.job_name(name, key)

        # 1. The engine cache (created once; a PVC's spec is mostly immutable afterwards).
        pvc, _ = self.api.create_if_absent(
            builders.build_engine_cache_pvc(name, namespace, spec, self.config, owner)
        )

        # 2. The engine: built already, or its Job (created only when absent).
        engine, build_message, built_at = self._ensure_engine(body, spec, pvc, key, job_name)

        # 3. Serving: roll the Deployment only to a built engine; until then, leave it alone.
        deployment = self.api.get(kube.DEPLOYMENT, namespace, name)
        if engine == "built":
            deployment = self._ensure_serving(body, spec, key, owner, deployment)

        # 4. Status from what the children say now.
        dep_state = (
            status.deployment_state(deployment, builders.ANNOTATION_ENGINE_KEY)
            if deployment
            else None
        )
        observed = status.Observed(
            name=name,
            namespace=namespace,
            generation=generation,
            engine_key=key,
            job_name=job_name,
            image=builders.runtime_image(spec, self.config),
            engine=engine,
            build_message=build_message,
            built_at=built_at,
            deployment=dep_state,
            endpoint=builders.endpoint_url(name, namespace),
            selector=builders.selector_string(name),
        )
        new = status.derive_status(observed, previous)
        if self._write_status(body, previous, new):
            self._transition_events(body, previous, new)
        return Outcome(phase=new["phase"])

    def _ensure_engine(
        self, body: dict[str, Any], spec: RerankerSpec, pvc: dict[str, Any], key: str, job_name: str
    ) -> tuple[status.EngineState, str, str | None]:
        """(state, failure message, completion time) of the engine for `key`."""
        meta = body["metadata"]
        name, namespace = meta["name"], meta["namespace"]
        if key in built_keys(pvc):
            return "built", "", None

        # Created only when absent; an existing Job of that name is used only if it is ours.
        desired = builders.build_engine_job(
            name, namespace, spec, self.config, key, builders.owner_reference(body)
        )
        job, created = self.api.create_if_absent(desired)
        if created:
            log.info(
                "engine build started", extra={"reranker": f"{namespace}/{name}", "job": job_name}
            )
            self._event(body, "Normal", "BuildStarted", f"Job {job_name} builds engine {key[:10]}")

        state = status.job_state(job)
        if state == "built":
            self._record_built(pvc, key)
            self._event(body, "Normal", "EngineBuilt", f"engine {key[:10]} built by Job {job_name}")
            return "built", "", (job.get("status") or {}).get("completionTime") or status.now_iso()
        if state == "failed":
            pods = self.api.list(kube.POD, namespace, {"job-name": job_name})
            message = status.termination_message(pods) or status.job_failure_message(job)
            return "failed", message, None
        return state, "", None

    def _record_built(self, pvc: dict[str, Any], key: str) -> None:
        meta = pvc["metadata"]
        keys = sorted(built_keys(pvc) | {key})
        self.api.patch(
            kube.PVC, meta["namespace"], meta["name"],
            {"metadata": {"annotations": {ANNOTATION_BUILT: ",".join(keys)}}},
        )  # fmt: skip

    def _ensure_serving(
        self,
        body: dict[str, Any],
        spec: RerankerSpec,
        key: str,
        owner: dict[str, Any],
        deployment: dict[str, Any] | None,
    ) -> dict[str, Any]:
        meta = body["metadata"]
        name, namespace = meta["name"], meta["namespace"]
        desired = builders.build_deployment(name, namespace, spec, self.config, key, owner)
        previous_key = None
        if deployment is not None:
            previous_key = (deployment["metadata"].get("annotations") or {}).get(
                builders.ANNOTATION_ENGINE_KEY
            )
        deployment = self._apply(desired, deployment)
        if previous_key and previous_key != key:
            self._event(
                body, "Normal", "RollingOut", f"rolling the Deployment to engine {key[:10]}"
            )

        self._apply(builders.build_service(name, namespace, owner))
        for kind, child in (
            (kube.PDB, builders.build_pdb(name, namespace, spec, owner)),
            (kube.HPA, builders.build_hpa(name, namespace, spec, owner)),
        ):
            if child is not None:
                self._apply(child)
            elif self.api.get(kind, namespace, name) is not None:
                self.api.delete(
                    kind, namespace, name
                )  # no longer wanted (1 replica / no autoscaling)
        return deployment

    def _apply(self, desired: dict[str, Any], live: dict[str, Any] | None = None) -> dict[str, Any]:
        """Create, or merge-patch when the builders' spec-hash annotation differs."""
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
        patch = {
            "metadata": {
                k: meta[k] for k in ("labels", "annotations", "ownerReferences") if k in meta
            }
        }
        patch["spec"] = desired["spec"]
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
        except (ApiException, OSError) as exc:
            log.warning("could not post an event", extra={"reason": reason, "error": str(exc)})
