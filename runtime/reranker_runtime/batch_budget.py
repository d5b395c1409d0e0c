"""`--max-batch-tokens auto`: the token budget of one forward pass, chosen per device and engine.

- GPU: 16384, TEI's default. Large batches are what fill a GPU.
- CPU: 2048 tokens in flight, shared among the forward workers (`--cpu-workers`): 1024 per pass
  with the 2 workers of a 2-CPU machine. On CPU a forward pass of 1k-4k tokens computes the most
  tokens per second (larger ones spill out of the caches), and the tokens in flight bound how
  long a small request waits for a pass to end: at 2048 (one worker) the server beat 4096 and
  16384 on throughput, lone-request latency and fairness alike (docs/benchmarks.md).

Either way the budget is raised to the model's max input length when that is larger (one input
must fit one batch), and capped by the engine's own token limit (a TensorRT profile).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from reranker_runtime.config import AUTO

if TYPE_CHECKING:
    from reranker_runtime.engines.base import EngineInfo

GPU_MAX_BATCH_TOKENS = 16384  # TEI's default
CPU_MAX_BATCH_TOKENS = 2048


def parse_max_batch_tokens(text: str) -> int | Literal["auto"]:
    """`--max-batch-tokens` / RERANKER_MAX_BATCH_TOKENS: 'auto' or a positive integer."""
    value = text.strip().lower()
    if value == AUTO:
        return AUTO
    try:
        tokens = int(value)
    except ValueError:
        raise ValueError("expected 'auto' or a positive integer") from None
    if tokens < 1:
        raise ValueError("must be 'auto' or >= 1")
    return tokens


def auto_max_batch_tokens(
    device: str,
    max_input_length: int,
    engine_max_batch_tokens: int | None = None,
    cpu_workers: int = 1,
) -> int:
    """The budget `auto` stands for on this device, for a model of this max input length."""
    base = CPU_MAX_BATCH_TOKENS // max(1, cpu_workers) if device == "cpu" else GPU_MAX_BATCH_TOKENS
    budget = max(base, max_input_length)
    if engine_max_batch_tokens is not None:
        budget = min(budget, engine_max_batch_tokens)
    return budget


def resolve_max_batch_tokens(
    requested: int | Literal["auto"], info: EngineInfo, cpu_workers: int = 1
) -> int:
    """The flag's value as the batcher gets it: an explicit number as given (the batcher still
    applies the engine's own cap, with a warning), `auto` per `auto_max_batch_tokens`."""
    if requested == AUTO:
        return auto_max_batch_tokens(
            info.device, info.max_input_length, info.max_batch_tokens, cpu_workers
        )
    return int(requested)
