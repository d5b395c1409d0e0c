"""In-process references. They are loaded before the server phases (idle memory, no CPU) and run
only *between* server measurements, never at the same time, so the server and the references
never compete for the same cores.

- `CrossEncoderBaseline`: sentence-transformers `CrossEncoder(model_dir, device="cpu")
  .predict(pairs, batch_size=...)` in fp32 on exactly the pairs the server scored: what a user
  gets without a server.
- `PureCompute`: one forward pass of one request's pairs with `transformers` directly (same
  tokenizer, same dtype and SDPA attention as the server's PyTorch engine, padded to the longest
  pair like the engine), no HTTP, no queue: the floor a lone request's latency is compared with.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from typing import Any

DTYPES = ("float32", "float16", "bfloat16")


def torch_threads(threads: int | None) -> int:
    import torch

    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def count_tokens(model_dir: str, pairs: Sequence[tuple[str, str]]) -> list[int]:
    """Tokens per pair with the model's own tokenizer (special tokens included, no truncation)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    enc = tok([q for q, _ in pairs], [t for _, t in pairs], truncation=False)
    return [len(ids) for ids in enc["input_ids"]]


class MissingExtraError(RuntimeError):
    """A package of an optional extra is not installed (the message says which to install)."""


class CrossEncoderBaseline:
    impl = "sentence-transformers CrossEncoder.predict"

    def __init__(self, model_dir: str, batch_size: int = 32) -> None:
        import torch

        try:
            from sentence_transformers import CrossEncoder
        except ImportError as exc:
            raise MissingExtraError(
                "the CrossEncoder baseline needs sentence-transformers: install the bench extra "
                "(pip install 'reranker-stack[bench]'), or run bench with --no-baseline"
            ) from exc

        self.model = CrossEncoder(model_dir, device="cpu", model_kwargs={"dtype": torch.float32})
        self.batch_size = batch_size
        self.dtype = str(next(self.model.parameters()).dtype).removeprefix("torch.")

    def warmup(self, pairs: Sequence[tuple[str, str]]) -> None:
        self.model.predict(list(pairs), batch_size=self.batch_size, show_progress_bar=False)

    def run(self, pairs: Sequence[tuple[str, str]]) -> dict[str, Any]:
        import torch

        pairs = [(query, text) for query, text in pairs]
        t0 = time.perf_counter()
        scores = self.model.predict(pairs, batch_size=self.batch_size, show_progress_bar=False)
        seconds = time.perf_counter() - t0
        assert len(scores) == len(pairs)
        return {
            "impl": self.impl,
            "dtype": self.dtype,
            "batch_size": self.batch_size,
            "torch_threads": torch.get_num_threads(),
            "pairs": len(pairs),
            "seconds": seconds,
            "pairs_per_s": len(pairs) / seconds if seconds > 0 else float("nan"),
        }


class PureCompute:
    impl = "transformers forward, one padded batch"

    def __init__(self, model_dir: str, dtype: str = "float32") -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from reranker_runtime.model_family import ModelFamily

        self.dtype = dtype if dtype in DTYPES else "float32"
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForSequenceClassification.from_pretrained(
            model_dir, dtype=getattr(torch, self.dtype), attn_implementation="sdpa"
        ).eval()
        # The server's limit: longer pairs are cut (the text, from the right), as it cuts them.
        self.max_length = ModelFamily.from_config(self.model.config).max_input_length(
            self.tokenizer.model_max_length
        )
        self.enc: Any = None
        self.tokenize_times: list[float] = []
        self.forward_times: list[float] = []

    def prepare(self, pairs: Sequence[tuple[str, str]], repeats: int = 5) -> None:
        """Tokenize the pairs (timed, `repeats` times) and keep the padded batch."""
        queries = [q for q, _ in pairs]
        texts = [t for _, t in pairs]
        for _ in range(repeats):
            t0 = time.perf_counter()
            self.enc = self.tokenizer(
                queries,
                texts,
                padding=True,
                truncation="only_second",
                max_length=self.max_length,
                return_tensors="pt",
            )
            self.tokenize_times.append(time.perf_counter() - t0)

    def forward(self, record: bool = True) -> float:
        import torch

        t0 = time.perf_counter()
        with torch.inference_mode():
            self.model(**self.enc).logits.float()
        dt = time.perf_counter() - t0
        if record:
            self.forward_times.append(dt)
        return dt

    def report(self) -> dict[str, Any]:
        import torch

        lengths = self.enc["attention_mask"].sum(dim=1).tolist()
        return {
            "impl": self.impl,
            "dtype": self.dtype,
            "torch_threads": torch.get_num_threads(),
            "pairs": len(lengths),
            "padded_shape": list(self.enc["input_ids"].shape),
            "real_tokens": int(sum(lengths)),
            "repeats": len(self.forward_times),
            "forward_ms": statistics.median(self.forward_times) * 1e3,
            "forward_min_ms": min(self.forward_times) * 1e3,
            "tokenize_ms": statistics.median(self.tokenize_times) * 1e3,
        }
