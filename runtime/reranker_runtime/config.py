"""Server settings: one typed object, filled from CLI flags or RERANKER_* environment variables.

The operator configures runtime pods through these environment variables, so their names are a
contract (tests/contract checks both sides).
"""

from __future__ import annotations

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
    max_concurrent_requests: int = 512  # requests in flight before 429
    auto_truncate: bool = False  # truncate over-long inputs even when the request says not to
    api_key: str | None = None
    log_format: str = "json"  # json | text
    log_level: str = "info"
    # Intra-op CPU threads of the forward pass; auto: the CPUs this process may use.
    torch_threads: int | Literal["auto"] = AUTO


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
    "api_key": "RERANKER_API_KEY",
    "log_format": "RERANKER_LOG_FORMAT",
    "log_level": "RERANKER_LOG_LEVEL",
    "torch_threads": "RERANKER_TORCH_THREADS",
}
