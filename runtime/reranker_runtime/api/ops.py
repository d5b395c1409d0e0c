"""Operational routes: /health (readiness), /live (liveness), /info, /metrics."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from reranker_runtime import __version__
from reranker_runtime.api.deps import Runtime, get_runtime
from reranker_runtime.api.schemas import ErrorBody, InfoResponse, StatusBody
from reranker_runtime.errors import NotReadyError

router = APIRouter(tags=["Operations"])


@router.get(
    "/health",
    response_model=StatusBody,
    responses={503: {"model": ErrorBody, "description": "Loading, warming up or shutting down."}},
    summary="Readiness: 200 only when the model is loaded and warmed up",
)
async def health(runtime: Runtime = Depends(get_runtime)) -> JSONResponse:
    if runtime.ready:
        return JSONResponse({"status": "ok"})
    raise NotReadyError(runtime.not_ready_reason())


@router.get(
    "/live",
    response_model=StatusBody,
    responses={503: {"model": ErrorBody, "description": "The model failed to load."}},
    summary="Liveness: 200 while the process runs (also while loading)",
)
async def live(runtime: Runtime = Depends(get_runtime)) -> JSONResponse:
    if runtime.load_error:
        # A failed load is not going to fix itself: let the kubelet restart the container.
        return JSONResponse(
            {"error": runtime.not_ready_reason(), "error_type": "Unhealthy"}, status_code=503
        )
    return JSONResponse({"status": "alive"})


@router.get(
    "/info",
    response_model=InfoResponse,
    responses={503: {"model": ErrorBody, "description": "The model is not loaded yet."}},
    summary="Model, engine and server limits",
)
async def info(runtime: Runtime = Depends(get_runtime)) -> JSONResponse:
    if runtime.service is None:
        raise NotReadyError(runtime.not_ready_reason())
    return JSONResponse(build_info(runtime))


def build_info(runtime: Runtime) -> dict[str, Any]:
    settings = runtime.settings
    service = runtime.service
    assert service is not None, "callers check that the model is loaded"
    info = service.info
    id2label = {str(k): v for k, v in (info.id2label or {}).items()}
    kind = "reranker" if info.num_labels == 1 else "classifier"
    # The batcher's budget: `auto` resolved, the engine's own cap (TensorRT profile) applied.
    max_batch_tokens = service.max_batch_tokens
    max_batch_requests = settings.max_batch_requests
    if info.max_batch_size is not None:
        max_batch_requests = min(max_batch_requests or info.max_batch_size, info.max_batch_size)
    return {
        "model_id": info.model_id,
        "model_sha": info.revision or settings.revision,
        "served_model_name": settings.served_model_name or settings.model or info.model_id,
        "model_type": {
            kind: {"id2label": id2label, "label2id": {v: int(k) for k, v in id2label.items()}}
        },
        "architecture": info.architecture,
        "num_labels": info.num_labels,
        "engine": info.name,
        "device": info.device,
        "model_dtype": info.dtype,
        # CPU threads of the forward pass (PyTorch engine); size the pod's CPU request to match.
        "torch_threads": info.extra.get("torch_threads"),
        "max_input_length": info.max_input_length,
        "max_batch_tokens": max_batch_tokens,
        "max_batch_requests": max_batch_requests,
        "max_client_batch_size": settings.max_client_batch_size,
        "max_concurrent_requests": settings.max_concurrent_requests,
        "auto_truncate": settings.auto_truncate,
        "ready": runtime.ready,
        "version": __version__,
    }


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format."}},
    summary="Prometheus metrics (TEI names: te_*)",
)
async def prometheus_metrics() -> Response:
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)
