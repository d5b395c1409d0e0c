"""Server settings: one typed object, filled from CLI flags or RERANKER_* environment variables.

The operator configures runtime pods through these environment variables, so their names are a
contract (tests/contract checks both sides).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

DEFAULT_MODEL = "BAAI/bge-reranker-large"
# A setting the server chooses at start from the machine and the model (batch_budget.py,
# cpu_threads.py); /info and the start-up log report the number chosen.
AUTO: Literal["auto"] = "auto"


@dataclass(frozen=True)
class ServeSettings:
    model: str | None = None  # HF repo id or local directory (`--model`, RERANKER_MODEL)
    revision: str | None = None  # `--revision`, RERANKER_REVISION
    engine_dir: str | None = None  # prepared engine directory (`--engine-dir`, RERANKER_ENGINE_DIR)
    served_model_name: str | None = None  # name reported in /info and Cohere/Jina responses
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto | float32 | float16 | bfloat16
    host: str = "0.0.0.0"
    port: int = 8080
    # Token budget of one forward pass (padded: longest * n); auto: 2048 on CPU, 16384 on GPU.
    max_batch_tokens: int | Literal["auto"] = AUTO
    max_batch_requests: int | None = None  # most sequences in one forward pass
    max_client_batch_size: int = 1000  # most texts/inputs in one request
    max_concurrent_requests: int = 512  # scoring requests in flight before 429
    # Truncate over-long inputs of a request that does not send `truncate` (TEI's default: true).
    auto_truncate: bool = True
    max_request_characters: int = 4_000_000  # characters in one request's texts; more -> 413
    request_read_timeout: float = 30.0  # seconds to receive a request's headers and body
    max_connections: int = 2048  # open HTTP connections; more are refused (503) and closed
    # Long texts scored as windows (docs/runtime-batching.md, "Long texts"): default windows per
    # text (1 = no chunking), tokens shared by consecutive windows, and most windows per request.
    max_chunks_per_doc: int = 1
    chunk_overlap_tokens: int = 32
    max_chunks_per_request: int = 4096
    request_timeout: float | None = None  # default deadline of a request in seconds; None: none
    api_key: str | None = None  # None: no key; never blank (refused: it would mean open)
    log_format: str = "json"  # json | text
    log_level: str = "info"
    # TEI's flags (router/src/main.rs): same names, same defaults where TEI has one.
    payload_limit: int = 2_000_000  # request body bytes; more -> 413 (TEI's default)
    prometheus_port: int = 9000  # /metrics also served here (0: off); TEI's default
    cors_allow_origin: tuple[str, ...] | None = None  # None: any origin, like TEI
    hf_cache: str | None = None  # hub download cache (HF_HUB_CACHE); None: huggingface_hub's
    hf_token: str | None = (
        None  # hub token (sets HF_TOKEN); None: huggingface_hub's (HF_TOKEN, login)
    )
    tokenization_workers: int | None = (
        None  # tokenizer threads; None: default_tokenization_workers()
    )
    grpc_port: int = 0  # TEI's gRPC API (grpc_api/) on this port as well; 0: off
    # OpenTelemetry traces (tracing.py): OTLP/gRPC collector URL (None: off), the service.name
    # resource attribute, and whether JSON log lines leave out trace_id/span_id (TEI's flags).
    otlp_endpoint: str | None = None
    otlp_service_name: str | None = None  # None: OTEL_SERVICE_NAME, else "reranker-runtime"
    disable_spans: bool = False
    # auto | torch | packed | trtllm (engines/factory.py `choose_engine` says what auto picks)
    engine: str = "auto"
    torch_compile: bool = False  # packed engine: torch.compile the forward pass
    cuda_graphs: bool = False  # packed engine: CUDA graphs per token-count bucket
    cpu_kernels: str = "auto"  # packed engine on CPU: auto | onednn | aten (engines/cpu_kernels.py)
    # Intra-op CPU threads of one forward pass; auto: the usable CPUs / cpu_workers.
    torch_threads: int | Literal["auto"] = AUTO
    # Forward passes run at once on CPU (cpu_threads.py); auto: 2 where 2+ CPUs are usable.
    cpu_workers: int | Literal["auto"] = AUTO
    # Seconds between malloc_trim(0) calls under glibc's malloc (allocator.py); 0: never.
    malloc_trim_interval: float = 5.0

    def __post_init__(self) -> None:
        # HTTP takes a blank key as none (open) and gRPC as one to match: neither may be.
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("api_key must not be blank: None serves without a key")


# flag name -> environment variable. Every `serve` flag is settable through its variable.
SERVE_ENV_VARS: dict[str, str] = {
    "model": "RERANKER_MODEL",
    "revision": "RERANKER_REVISION",
    "engine_dir": "RERANKER_ENGINE_DIR",
    "served_model_name": "RERANKER_SERVED_MODEL_NAME",
    "device": "RERANKER_DEVICE",
    "dtype": "RERANKER_DTYPE",
    "host": "RERANKER_HOST",
    "port": "RERANKER_PORT",
    "max_batch_tokens": "RERANKER_MAX_BATCH_TOKENS",
    "max_batch_requests": "RERANKER_MAX_BATCH_REQUESTS",
    "max_client_batch_size": "RERANKER_MAX_CLIENT_BATCH_SIZE",
    "max_concurrent_requests": "RERANKER_MAX_CONCURRENT_REQUESTS",
    "auto_truncate": "RERANKER_AUTO_TRUNCATE",
    "max_request_characters": "RERANKER_MAX_REQUEST_CHARACTERS",
    "request_read_timeout": "RERANKER_REQUEST_READ_TIMEOUT",
    "max_connections": "RERANKER_MAX_CONNECTIONS",
    "max_chunks_per_doc": "RERANKER_MAX_CHUNKS_PER_DOC",
    "chunk_overlap_tokens": "RERANKER_CHUNK_OVERLAP_TOKENS",
    "max_chunks_per_request": "RERANKER_MAX_CHUNKS_PER_REQUEST",
    "request_timeout": "RERANKER_REQUEST_TIMEOUT",
    "api_key": "RERANKER_API_KEY",
    "log_format": "RERANKER_LOG_FORMAT",
    "log_level": "RERANKER_LOG_LEVEL",
    "payload_limit": "RERANKER_PAYLOAD_LIMIT",
    "prometheus_port": "RERANKER_PROMETHEUS_PORT",
    "cors_allow_origin": "RERANKER_CORS_ALLOW_ORIGIN",
    "hf_cache": "RERANKER_HF_CACHE",
    "hf_token": "RERANKER_HF_TOKEN",
    "tokenization_workers": "RERANKER_TOKENIZATION_WORKERS",
    "grpc_port": "RERANKER_GRPC_PORT",
    "otlp_endpoint": "RERANKER_OTLP_ENDPOINT",
    "otlp_service_name": "RERANKER_OTLP_SERVICE_NAME",
    "disable_spans": "RERANKER_DISABLE_SPANS",
    "engine": "RERANKER_ENGINE",
    "torch_compile": "RERANKER_TORCH_COMPILE",
    "cuda_graphs": "RERANKER_CUDA_GRAPHS",
    "cpu_kernels": "RERANKER_CPU_KERNELS",
    "torch_threads": "RERANKER_TORCH_THREADS",
    "cpu_workers": "RERANKER_CPU_WORKERS",
    "malloc_trim_interval": "RERANKER_MALLOC_TRIM_INTERVAL",
}

ENGINE_CHOICES = ("auto", "torch", "packed", "trtllm")
CPU_KERNEL_CHOICES = ("auto", "onednn", "aten")

# TEI's own variable for the same setting (router/src/main.rs, `#[clap(long, env)]`), read when
# the RERANKER_* one is unset, so a TEI deployment's environment keeps working. Not HOSTNAME:
# every shell and pod sets it to the machine's name, and listening there would shut out localhost
# (kubectl port-forward, sidecars). TEI's JSON_OUTPUT is read as --log-format json/text.
TEI_ENV_VARS: dict[str, str] = {
    "model": "MODEL_ID",
    "revision": "REVISION",
    "served_model_name": "SERVED_MODEL_NAME",
    "dtype": "DTYPE",
    "port": "PORT",
    "max_batch_tokens": "MAX_BATCH_TOKENS",
    "max_batch_requests": "MAX_BATCH_REQUESTS",
    "max_client_batch_size": "MAX_CLIENT_BATCH_SIZE",
    "max_concurrent_requests": "MAX_CONCURRENT_REQUESTS",
    "auto_truncate": "AUTO_TRUNCATE",
    "api_key": "API_KEY",
    "payload_limit": "PAYLOAD_LIMIT",
    "prometheus_port": "PROMETHEUS_PORT",
    "cors_allow_origin": "CORS_ALLOW_ORIGIN",
    "hf_cache": "HUGGINGFACE_HUB_CACHE",
    "hf_token": "HF_API_TOKEN",  # TEI's hidden alias; its HF_TOKEN huggingface_hub reads itself
    "tokenization_workers": "TOKENIZATION_WORKERS",
    "otlp_endpoint": "OTLP_ENDPOINT",
    "otlp_service_name": "OTLP_SERVICE_NAME",
    "disable_spans": "DISABLE_SPANS",
}
# A TEI variable is skipped where this one is set: huggingface_hub reads HF_HUB_CACHE before
# HUGGINGFACE_HUB_CACHE, and HF_TOKEN before anything we would set from HF_API_TOKEN.
TEI_ENV_SHADOWED_BY: dict[str, str] = {"hf_cache": "HF_HUB_CACHE", "hf_token": "HF_TOKEN"}
TEI_JSON_OUTPUT_ENV = "JSON_OUTPUT"


def default_tokenization_workers() -> int:
    """Tokenizer threads when --tokenization-workers is unset: Python's default thread-pool size
    (CPUs + 4, at most 32). TEI's default (CPUs - 1) would give a 2-CPU pod one thread, and one
    long request's tokenization would then hold up every other request's."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return min(32, cpus + 4)
