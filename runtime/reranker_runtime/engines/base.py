"""The engine interface: what the batcher and service need from a model backend.

An engine owns the weights and the forward pass. Tokenization happens outside it (in the
service, with the engine's tokenizer) so every engine sees the same token ids; the engine only
turns a batch of already-tokenized sequences into logits.
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

# On CPU the warm-up's long pass is one sequence of at most this many tokens (see warmup_passes).
CPU_WARMUP_TOKENS = 512
SHORT_WARMUP_TOKENS = 8


@dataclass(frozen=True)
class EncodedPair:
    """One tokenized sequence (a query/text pair, or a single text for /predict)."""

    input_ids: list[int]
    token_type_ids: list[int] | None = None

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass(frozen=True)
class EngineInfo:
    """What /info reports about the engine and what the batcher budgets with."""

    name: str  # "pytorch" | "tensorrt-llm"
    model_id: str  # repo id or path the weights came from
    revision: str | None
    device: str  # "cpu", "cuda", "cuda:0"
    dtype: str  # "float32", "float16", "bfloat16"
    architecture: str  # e.g. "XLMRobertaForSequenceClassification"
    num_labels: int
    max_input_length: int  # most tokens one sequence may have (model positions)
    # True when a batch costs `longest * n` tokens (padded engines); False when it costs the
    # sum of the lengths (packed engines such as TensorRT-LLM with remove_input_padding).
    padded: bool = True
    # Hard limit on sequences per forward pass (a TensorRT profile's max batch); None = none.
    max_batch_size: int | None = None
    # Hard limit on tokens per forward pass imposed by the engine itself; None = none.
    max_batch_tokens: int | None = None
    id2label: dict[int, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


# Sequences in one forward pass on a GPU. The attention kernels launch one grid row (flash:
# gridDim.y, memory-efficient SDPA: gridDim.z) per sequence, and CUDA caps those at 65,535: a
# budget of 131,072 tokens or more in 2-token inputs would go past it. 32,768 leaves room for the
# packed engine's CUDA-graph buckets (rows rounded up by at most 1/8 plus padding sequences).
CUDA_MAX_SEQUENCES_PER_PASS = 32_768


def gpu_max_batch_size(device: str) -> int | None:
    """EngineInfo.max_batch_size of a PyTorch engine on `device`: the cap above on a GPU."""
    return CUDA_MAX_SEQUENCES_PER_PASS if device.startswith("cuda") else None


def warmup_passes(
    device: str, max_batch_tokens: int, max_input_length: int, max_batch_size: int | None = None
) -> list[tuple[int, int]]:
    """(sequences, tokens each) of every warm-up pass: a long pass, then one short sequence (the
    other end of the length range).

    GPU: the long pass fills the budget with full-length sequences, so an out-of-memory shows at
    start, not on the first large request. CPU: one sequence of up to CPU_WARMUP_TOKENS, whatever
    the budget. It starts the thread pool and the kernels just as well, and its cost stays a few
    seconds for a 24-layer model (a 16384-token pass took 71 s on 2 cores). Memory is the only
    reason to fill the budget, and on CPU a pass's activations are small next to the weights: a
    2048-token pass of a 24-layer/1024 model adds about 130 MiB to its 1.2 GiB of fp32 weights,
    growing about linearly with the budget."""
    if device == "cpu":
        long_pass = (1, min(max_input_length, CPU_WARMUP_TOKENS))
    else:
        n = max(1, max_batch_tokens // max_input_length)
        if max_batch_size is not None:
            n = min(n, max_batch_size)
        long_pass = (n, max_input_length)
    return [long_pass, (1, min(SHORT_WARMUP_TOKENS, max_input_length))]


def packed_warmup_passes(
    max_batch_tokens: int, max_input_length: int, max_batch_size: int | None = None
) -> list[tuple[int, int]]:
    """A packed engine's warm-up on a GPU: full-length sequences at the budget, the most short
    sequences the budget holds (its other extreme: allocator growth and kernel choice), then one
    short sequence; `max_batch_size` (a TensorRT profile's) caps the sequences of a pass."""
    short = min(SHORT_WARMUP_TOKENS, max_input_length)

    def sequences(n: int) -> int:
        return max(1, n if max_batch_size is None else min(n, max_batch_size))

    return [
        (sequences(max_batch_tokens // max_input_length), max_input_length),
        (sequences(max_batch_tokens // short), short),
        (1, short),
    ]


class Engine(ABC):
    """A loaded model that scores batches of encoded pairs.

    Implementations must be safe to call `score` from one worker thread at a time (the batcher
    never runs two forward passes of one engine concurrently), unless they raise
    `max_concurrent_scores`.
    """

    # How many `score` calls the batcher may run at once. 2 lets an engine prepare the next batch
    # (packing, host-to-device copy) while the device runs the current one; such an engine
    # serialises its device work itself. On CPU, the number of forward passes that run in
    # parallel (--cpu-workers), for engines whose `score` is reentrant there.
    max_concurrent_scores: int = 1
    # `score` may run on several threads at once on CPU (no shared mutable state): the factory
    # then sets max_concurrent_scores to the CPU forward workers.
    reentrant_on_cpu: bool = False

    @property
    @abstractmethod
    def info(self) -> EngineInfo: ...

    @property
    @abstractmethod
    def tokenizer(self) -> Any:
        """A `transformers` fast tokenizer (PreTrainedTokenizerFast) for this model."""

    @abstractmethod
    def score(self, batch: Sequence[EncodedPair]) -> np.ndarray:
        """Run one forward pass; returns raw logits, float32, shape [len(batch), num_labels]."""

    def warmup_plan(self, max_batch_tokens: int) -> list[tuple[int, int]]:
        """(sequences, tokens each) of every warm-up pass, in order: `warmup_passes`. An engine
        whose costs have other extremes (a packed engine's many short sequences) overrides it."""
        info = self.info
        return warmup_passes(
            info.device, max_batch_tokens, info.max_input_length, info.max_batch_size
        )

    def warmup(self, max_batch_tokens: int) -> None:
        """Run the passes of `warmup_plan` so the first request pays no start-up cost
        (thread pools, allocator growth, kernel selection) and, on GPUs, an out-of-memory shows
        at start. Logs the plan, then each pass with its shape and time."""
        passes = self.warmup_plan(max_batch_tokens)
        logger.info(
            "warming up: %s",
            ", ".join(f"{n} x {length} tokens" for n, length in passes),
            extra={"fields": {"passes": len(passes), "max_batch_tokens": max_batch_tokens}},
        )
        pad = self.tokenizer.pad_token_id or 0
        for i, (n, length) in enumerate(passes, start=1):
            started = time.perf_counter()
            self.score([EncodedPair(input_ids=[pad] * length, token_type_ids=[0] * length)] * n)
            seconds = time.perf_counter() - started
            logger.info(
                "warm-up pass %d/%d: %d x %d tokens in %.2f s",
                i,
                len(passes),
                n,
                length,
                seconds,
                extra={
                    "fields": {"sequences": n, "tokens_each": length, "seconds": round(seconds, 3)}
                },
            )

    def close(self) -> None:  # noqa: B027 - optional hook: most engines hold nothing to free
        """Release resources (GPU memory); called on shutdown."""


def release_cached_memory() -> None:
    """`torch.cuda.empty_cache()`, logged instead of raised when it fails: on PyTorch <= 2.11 a
    CUDA graph capture that failed can leave the caching allocator believing a capture is
    still under way (pytorch#180395), and empty_cache then fails an internal assert. The cache
    stays allocated; nothing else is wrong."""
    import torch

    try:
        torch.cuda.empty_cache()
    except RuntimeError as exc:
        logger.warning("could not release the CUDA memory cache", extra={"error": str(exc)})
