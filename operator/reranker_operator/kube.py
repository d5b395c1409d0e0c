"""A thin, dict-in/dict-out wrapper over the official `kubernetes` client.

Every kind the operator touches goes through one generic REST path (`Kind.path`), so the
reconcile code reads like `kube.get(JOB, ns, name)` and never deals with the client's generated
model classes. Authentication, TLS and proxies stay the client's job (`ApiClient`).

`patch` sends a JSON merge patch (RFC 7386) for a dict, or a JSON Patch (RFC 6902) for a list of
operations. Children are updated with JSON Patch operations that replace their whole `spec`
(field by field, `replicas` untouched, for a Deployment an autoscaler scales; see
builders.replacement_patch): a field the builders stop rendering disappears from the cluster
object, which a merge patch would leave behind.
"""

from __future__ import annotations

import builtins
import json
import logging
from dataclasses import dataclass
from typing import Any

from kubernetes import client as k8s_client
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException

from reranker_operator.builders import LABEL_MANAGED_BY, LABEL_RERANKER

log = logging.getLogger(__name__)

MERGE_PATCH = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"


@dataclass(frozen=True)
class Kind:
    """A namespaced resource: `api_version` as in manifests ("v1", "apps/v1"), and its plural."""

    api_version: str
    plural: str

    def path(self, namespace: str, name: str | None = None, subresource: str | None = None) -> str:
        base = "/api/v1" if self.api_version == "v1" else f"/apis/{self.api_version}"
        path = f"{base}/namespaces/{namespace}/{self.plural}"
        if name is not None:
            path += f"/{name}"
            if subresource is not None:
                path += f"/{subresource}"
        return path


RERANKER = Kind("reranker.dev/v1alpha1", "rerankers")
PVC = Kind("v1", "persistentvolumeclaims")
POD = Kind("v1", "pods")
SERVICE = Kind("v1", "services")
EVENT = Kind("v1", "events")
JOB = Kind("batch/v1", "jobs")
DEPLOYMENT = Kind("apps/v1", "deployments")
PDB = Kind("policy/v1", "poddisruptionbudgets")
HPA = Kind("autoscaling/v2", "horizontalpodautoscalers")
INGRESS = Kind("networking.k8s.io/v1", "ingresses")
HTTP_ROUTE = Kind("gateway.networking.k8s.io/v1", "httproutes")
SERVICE_MONITOR = Kind("monitoring.coreos.com/v1", "servicemonitors")
POD_MONITORING = Kind("monitoring.googleapis.com/v1", "podmonitorings")

KIND_BY_NAME: dict[str, Kind] = {
    "Reranker": RERANKER,
    "PersistentVolumeClaim": PVC,
    "Pod": POD,
    "Service": SERVICE,
    "Event": EVENT,
    "Job": JOB,
    "Deployment": DEPLOYMENT,
    "PodDisruptionBudget": PDB,
    "HorizontalPodAutoscaler": HPA,
    "Ingress": INGRESS,
    "HTTPRoute": HTTP_ROUTE,
    "ServiceMonitor": SERVICE_MONITOR,
    "PodMonitoring": POD_MONITORING,
}


def kind_of(obj: dict[str, Any]) -> Kind:
    return KIND_BY_NAME[obj["kind"]]


class ApiError(ApiException):
    """An API error response that names the request and reads in one line (for logs and kopf):
    `POST /apis/batch/v1/namespaces/ml/jobs: 503 ServiceUnavailable: <the server's message>`.
    The client's own `str(ApiException)` spans lines with every header and the raw body."""

    def __init__(self, method: str, path: str, http_resp: Any) -> None:
        super().__init__(http_resp=http_resp)
        self.method = method
        self.path = path

    def __str__(self) -> str:
        reason, message = self.reason or "", ""
        try:
            body = json.loads(self.body or "{}")
        except (TypeError, ValueError):
            body = None
        if isinstance(body, dict):  # a metav1.Status
            reason = body.get("reason") or reason
            message = body.get("message") or ""
        text = f"{self.method} {self.path}: {self.status} {reason}".rstrip()
        return f"{text}: {one_line(message)}" if message else text


class ApiUnreachable(OSError):
    """No answer from the API server (connection refused or reset, a timeout): transient, and,
    unlike the client's urllib3 errors, names the request."""

    def __init__(self, method: str, path: str, cause: BaseException) -> None:
        super().__init__(f"{method} {path}: no answer: {type(cause).__name__}: {cause}")


def one_line(text: str, limit: int = 300) -> str:
    """Whitespace collapsed, cut to `limit` characters: fit for a single log line."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def describe(exc: BaseException) -> str:
    """An exception in one line: ApiError and ApiUnreachable name the request; others read
    `Type: message`."""
    if isinstance(exc, (ApiError, ApiUnreachable)):
        return one_line(str(exc))
    if isinstance(exc, ApiException):
        return one_line(f"{exc.status} {exc.reason}")
    return one_line(f"{type(exc).__name__}: {exc}")


class NotOurs(Exception):
    """An object of the name the operator needs exists, but this operator did not make it for
    this Reranker: never adopted (nor patched), the user has to delete or rename it."""

    def __init__(self, live: dict[str, Any]) -> None:
        meta = live.get("metadata") or {}
        super().__init__(
            f"{live.get('kind', 'object')} {meta.get('namespace')}/{meta.get('name')} exists and "
            f"was not created by reranker-operator for this Reranker (labels "
            f"{LABEL_MANAGED_BY}, {LABEL_RERANKER}): delete or rename it"
        )


def is_ours(live: dict[str, Any], desired: dict[str, Any]) -> bool:
    """`live` carries `desired`'s managed-by and owning-Reranker labels."""
    have = (live.get("metadata") or {}).get("labels") or {}
    want = (desired.get("metadata") or {}).get("labels") or {}
    return all(have.get(k) == want.get(k) for k in (LABEL_MANAGED_BY, LABEL_RERANKER))


def is_transient(exc: BaseException) -> bool:
    """Worth retrying: conflicts, throttling, server errors, and network failures."""
    if isinstance(exc, ApiException):
        return exc.status in (409, 429) or (exc.status or 0) >= 500 or exc.status == 0
    return isinstance(exc, (OSError, TimeoutError)) or type(exc).__module__.startswith("urllib3")


def is_api_fault(exc: BaseException) -> bool:
    """The API's fault, not the operator's: a transient failure, an API refusal (403, 422, ...)
    or someone else's object in the way. Retried with a back-off, logged in one line; anything
    else is a bug."""
    return is_transient(exc) or isinstance(exc, (ApiException, NotOurs))


def load_api_client(host: str | None = None) -> k8s_client.ApiClient:
    """An ApiClient like kubectl's: `host` (tests), else in-cluster, else KUBECONFIG/~/.kube/config."""
    if host is not None:
        configuration = k8s_client.Configuration()
        configuration.host = host
        configuration.verify_ssl = False
        return k8s_client.ApiClient(configuration)
    configuration = k8s_client.Configuration()
    try:
        k8s_config.load_incluster_config(client_configuration=configuration)
    except k8s_config.ConfigException:
        k8s_config.load_kube_config(client_configuration=configuration)
    return k8s_client.ApiClient(configuration)


class Kube:
    """get / list / create / patch / delete on namespaced objects, as plain dicts."""

    def __init__(self, api_client: k8s_client.ApiClient, request_timeout: float = 30.0) -> None:
        self.api = api_client
        self.request_timeout = request_timeout

    def _request(
        self,
        method: str,
        path: str,
        body: Any = None,
        query: dict[str, str] | None = None,
        content_type: str | None = None,
    ) -> dict[str, Any]:
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type or "application/json"
        method_, url, headers_, body_, post = self.api.param_serialize(
            method=method,
            resource_path=path,
            query_params=list((query or {}).items()),
            header_params=headers,
            body=body,
            auth_settings=["BearerToken"],
        )
        try:
            response = self.api.call_api(
                method_, url, headers_, body_, post, _request_timeout=self.request_timeout
            )
            response.read()
        except Exception as exc:
            if isinstance(exc, ApiException) or not is_transient(exc):
                raise
            raise ApiUnreachable(method, path, exc) from exc
        if not 200 <= response.status <= 299:
            raise ApiError(method, path, response)
        return json.loads(response.data) if response.data else {}

    def get(self, kind: Kind, namespace: str, name: str) -> dict[str, Any] | None:
        """The object, or None when it does not exist."""
        try:
            return self._request("GET", kind.path(namespace, name))
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def list(
        self,
        kind: Kind,
        namespace: str,
        labels: dict[str, str] | None = None,
        fields: dict[str, str] | None = None,
    ) -> list[dict[str, Any]]:
        """Objects in `namespace` carrying all `labels`, and whose `fields` (dotted paths, such
        as `involvedObject.name`) have the values given."""
        query = {}
        if labels:
            query["labelSelector"] = ",".join(f"{k}={v}" for k, v in labels.items())
        if fields:
            query["fieldSelector"] = ",".join(f"{k}={v}" for k, v in fields.items())
        items = self._request("GET", kind.path(namespace), query=query).get("items") or []
        # Filter here too: cheap, and correct even where a server ignores the selector.
        return [i for i in items if _has_labels(i, labels or {}) and _has_fields(i, fields or {})]

    def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        meta = obj["metadata"]
        return self._request("POST", kind_of(obj).path(meta["namespace"]), body=obj)

    def create_if_absent(self, obj: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        """(the live object, created?). Never replaces an existing one: safe to repeat.

        An existing object is adopted only if it is ours (`is_ours`); otherwise `NotOurs`.
        """
        meta = obj["metadata"]
        existing = self.get(kind_of(obj), meta["namespace"], meta["name"])
        if existing is None:
            try:
                return self.create(obj), True
            except ApiException as exc:
                if exc.status != 409:
                    raise
                # AlreadyExists: another reconcile (a second replica, a previous operator whose
                # reply was lost) won the race. A conflict for an object that is gone again by
                # now is raised as it is (transient: retried).
                existing = self.get(kind_of(obj), meta["namespace"], meta["name"])
                if existing is None:
                    raise
        if not is_ours(existing, obj):
            raise NotOurs(existing)
        return existing, False

    def patch(
        self,
        kind: Kind,
        namespace: str,
        name: str,
        patch: dict[str, Any] | builtins.list[dict[str, Any]],  # `list` is a method here
        subresource: str | None = None,
    ) -> dict[str, Any]:
        """A merge patch (a dict) or a JSON Patch (a list of operations)."""
        content_type = JSON_PATCH if isinstance(patch, list) else MERGE_PATCH
        return self._request(
            "PATCH", kind.path(namespace, name, subresource), body=patch, content_type=content_type
        )

    def delete(self, kind: Kind, namespace: str, name: str) -> bool:
        """Delete in the background (dependents by the garbage collector); False if absent."""
        try:
            self._request(
                "DELETE", kind.path(namespace, name), body={"propagationPolicy": "Background"}
            )
            return True
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise


def _has_fields(obj: dict[str, Any], fields: dict[str, str]) -> bool:
    for path, value in fields.items():
        found: Any = obj
        for part in path.split("."):
            found = found.get(part) if isinstance(found, dict) else None
        if found != value:
            return False
    return True


def _has_labels(obj: dict[str, Any], labels: dict[str, str]) -> bool:
    have = (obj.get("metadata") or {}).get("labels") or {}
    return all(have.get(k) == v for k, v in labels.items())
