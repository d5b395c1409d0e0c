"""The engine interface: what the batcher and service need from a model backend.

An engine owns the weights and the forward pass. Tokenization happens outside it (in the
service, with the engine's tokenizer) so every engine sees the same token ids; the engine only
turns a batch of already-tokenized sequences into logits.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np


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


class Engine(ABC):
    """A loaded model that scores batches of encoded pairs.

    Implementations must be safe to call `score` from one worker thread at a time (the batcher
    never runs two forward passes of one engine concurrently), unless they raise
    `max_concurrent_scores`.
    """

    # How many `score` calls the batcher may run at once. 2 lets an engine prepare the next batch
    # (packing, host-to-device copy) while the device runs the current one; such an engine
    # serialises its device work itself.
    max_concurrent_scores: int = 1

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

    def warmup(self, max_batch_tokens: int) -> None:
        """Run forward passes at the full token budget so the first request pays no start-up
        cost (allocator growth, kernel selection) and an out-of-memory shows at start."""
        max_len = self.info.max_input_length
        n = max(1, max_batch_tokens // max_len)
        if self.info.max_batch_size is not None:
            n = min(n, self.info.max_batch_size)
        pad = self.tokenizer.pad_token_id or 0
        self.score([EncodedPair(input_ids=[pad] * max_len, token_type_ids=[0] * max_len)] * n)
        self.score([EncodedPair(input_ids=[pad] * 8, token_type_ids=[0] * 8)])

    def close(self) -> None:  # noqa: B027 - optional hook: most engines hold nothing to free
        """Release resources (GPU memory); called on shutdown."""
