"""Operational routes: /health (readiness; also GET / and GET /ping, as TEI serves it for the
Inference API and SageMaker), /live (liveness), /metrics (open), and /info (behind the API key: it
reveals the model and the server's limits). All read the lifecycle."""

from __future__ import annotations

import os

from fastapi import APIRouter, Request
from fastapi.responses import Response

from reranker_runtime import __version__, metrics
from reranker_runtime.api.auth import ProtectedRoute
from reranker_runtime.api.deps import get_lifecycle
from reranker_runtime.api.schemas import ErrorBody, InfoResponse, ModelCard, ModelList, StatusBody
from reranker_runtime.lifecycle import Lifecycle, State

router = APIRouter(tags=["Operations"])
info_router = APIRouter(tags=["Operations"], route_class=ProtectedRoute)


@router.get(
    "/health",
    response_model=StatusBody,
    responses={503: {"model": ErrorBody, "description": "Loading, warming up or shutting down."}},
    summary="Readiness: 200 only when the model is loaded and warmed up",
)
async def health(request: Request) -> StatusBody:
    lifecycle = get_lifecycle(request)
    if not lifecycle.ready:
        raise lifecycle.not_ready_error()
    return StatusBody(status="ok")


for _path, _who in (("/", "Hugging Face Inference API"), ("/ping", "SageMaker")):
    router.add_api_route(
        _path,
        health,
        methods=["GET"],
        response_model=StatusBody,
        responses={503: {"model": ErrorBody, "description": "Not ready."}},
        summary=f"Readiness, as /health ({_who} probe, TEI)",
        name=f"health_{_path.strip('/') or 'root'}",
    )


@router.get(
    "/live",
    response_model=StatusBody,
    responses={503: {"model": ErrorBody, "description": "The model failed to load."}},
    summary="Liveness: 200 while the process runs (also while loading)",
)
async def live(request: Request) -> StatusBody:
    lifecycle = get_lifecycle(request)
    if lifecycle.state is State.FAILED:
        # A failed load is not going to fix itself: let the kubelet restart the container.
        raise lifecycle.not_ready_error()
    return StatusBody(status="alive")


@info_router.get(
    "/info",
    response_model=InfoResponse,
    responses={503: {"model": ErrorBody, "description": "The model is not loaded yet."}},
    summary="Model, engine and server limits",
)
async def info(request: Request) -> InfoResponse:
    return build_info(get_lifecycle(request))


async def models(request: Request) -> ModelList:
    """The one model this server serves, for clients that discover models first (LiteLLM,
    Open WebUI, OpenAI-style SDKs, Infinity's clients)."""
    lifecycle = get_lifecycle(request)
    info = build_info(lifecycle)
    card = ModelCard(
        id=info.served_model_name,
        created=lifecycle.created,
        root=info.model_id,
        max_model_len=info.max_input_length,
        capabilities=["rerank" if info.num_labels == 1 else "classify"],
    )
    return ModelList(data=[card])


for _path, _who in (("/v1/models", "OpenAI and vLLM"), ("/models", "Infinity")):
    info_router.add_api_route(
        _path,
        models,
        methods=["GET"],
        response_model=ModelList,
        responses={503: {"model": ErrorBody, "description": "The model is not loaded yet."}},
        summary=f"The served model ({_who}'s model list)",
    )


def build_info(lifecycle: Lifecycle) -> InfoResponse:
    """What /info reports; limits are the batcher's, the ones in force."""
    service = lifecycle.service
    if service is None:
        raise lifecycle.not_ready_error()
    settings = lifecycle.settings
    info = service.info
    batcher = service.batcher
    id2label = {str(k): v for k, v in (info.id2label or {}).items()}
    kind = "reranker" if info.num_labels == 1 else "classifier"
    return InfoResponse(
        model_id=info.model_id,
        model_sha=info.revision or settings.revision,
        served_model_name=settings.served_model_name or settings.model or info.model_id,
        model_type={
            kind: {"id2label": id2label, "label2id": {v: int(k) for k, v in id2label.items()}}
        },
        architecture=info.architecture,
        num_labels=info.num_labels,
        engine=info.name,
        device=info.device,
        model_dtype=info.dtype,
        torch_threads=info.extra.get("torch_threads"),
        cpu_workers=batcher.workers if info.device == "cpu" else None,
        cpu_kernels=info.extra.get("cpu_kernels"),
        max_input_length=info.max_input_length,
        max_batch_tokens=batcher.max_batch_tokens,
        max_batch_requests=batcher.max_batch_requests,
        max_client_batch_size=settings.max_client_batch_size,
        max_concurrent_requests=settings.max_concurrent_requests,
        auto_truncate=settings.auto_truncate,
        tokenization_workers=service.tokenization_workers,
        ready=lifecycle.ready,
        version=__version__,
        # TEI reports its build's git sha and image label; ours come from the image's
        # environment (the Dockerfile sets them), when set.
        sha=os.environ.get("RERANKER_GIT_SHA") or None,
        docker_label=os.environ.get("DOCKER_LABEL") or None,
    )


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format."}},
    summary="Prometheus metrics (TEI's te_* names and labels; ours: reranker_*)",
)
async def prometheus_metrics() -> Response:
    return Response(metrics.render(), media_type=metrics.CONTENT_TYPE)
