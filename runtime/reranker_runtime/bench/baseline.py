"""In-process references, run only after the server phases so they never share the cores with it.

- `crossencoder_throughput`: sentence-transformers `CrossEncoder(model_dir, device="cpu")
  .predict(pairs, batch_size=...)` on exactly the pairs the server scored, fp32: what a user gets
  without a server.
- `pure_compute`: one forward pass of one request's pairs with `transformers` directly (same
  tokenizer, same dtype and attention as the server's PyTorch engine), no HTTP, no queue: the
  floor a lone request's latency is compared with.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Sequence

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
    queries = [q for q, _ in pairs]
    texts = [t for _, t in pairs]
    enc = tok(queries, texts, truncation=False)
    return [len(ids) for ids in enc["input_ids"]]


def crossencoder_throughput(
    model_dir: str,
    pairs: Sequence[tuple[str, str]],
    batch_size: int = 32,
    warmup_pairs: int = 64,
) -> dict[str, Any]:
    import torch
    from sentence_transformers import CrossEncoder

    model = CrossEncoder(model_dir, device="cpu", model_kwargs={"dtype": torch.float32})
    pairs = [tuple(p) for p in pairs]
    model.predict(pairs[:warmup_pairs], batch_size=batch_size, show_progress_bar=False)
    t0 = time.perf_counter()
    scores = model.predict(pairs, batch_size=batch_size, show_progress_bar=False)
    seconds = time.perf_counter() - t0
    return {
        "impl": "sentence-transformers CrossEncoder.predict",
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "batch_size": batch_size,
        "torch_threads": torch.get_num_threads(),
        "pairs": len(pairs),
        "seconds": seconds,
        "pairs_per_s": len(pairs) / seconds if seconds > 0 else float("nan"),
        "n_scores": len(scores),
    }


def pure_compute(
    model_dir: str,
    pairs: Sequence[tuple[str, str]],
    dtype: str = "float32",
    repeats: int = 10,
    warmup: int = 3,
) -> dict[str, Any]:
    """Median time of one padded forward pass of `pairs` (one batch), plus its tokenization."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if dtype not in DTYPES:
        dtype = "float32"
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(
        model_dir, dtype=getattr(torch, dtype), attn_implementation="sdpa"
    ).eval()
    queries = [q for q, _ in pairs]
    texts = [t for _, t in pairs]

    tok_times = []
    for _ in range(max(repeats, 3)):
        t0 = time.perf_counter()
        enc = tok(queries, texts, padding=True, truncation=False, return_tensors="pt")
        tok_times.append(time.perf_counter() - t0)
    fwd_times = []
    with torch.inference_mode():
        for i in range(warmup + repeats):
            t0 = time.perf_counter()
            model(**enc).logits.float()
            if i >= warmup:
                fwd_times.append(time.perf_counter() - t0)
    lengths = enc["attention_mask"].sum(dim=1).tolist()
    return {
        "impl": "transformers forward, one batch",
        "dtype": dtype,
        "torch_threads": torch.get_num_threads(),
        "pairs": len(pairs),
        "padded_shape": list(enc["input_ids"].shape),
        "real_tokens": int(sum(lengths)),
        "forward_ms": statistics.median(fwd_times) * 1e3,
        "forward_min_ms": min(fwd_times) * 1e3,
        "tokenize_ms": statistics.median(tok_times) * 1e3,
    }
