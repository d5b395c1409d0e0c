#!/usr/bin/env python
"""The packed engine's CPU attention (the grouped backend): one unmasked SDPA call per run of
equal-length sequences, as the engine runs it, against the layout it replaced: runs of similar
lengths padded to their longest (at most 12.5% padding) with the padded keys masked. For
~2,000-token batches of pairs with lengths drawn from a range, and adversarial mixes (every length
different).

    OMP_WAIT_POLICY=PASSIVE python bench/cpu_attention.py                             # MiniLM
    OMP_WAIT_POLICY=PASSIVE python bench/cpu_attention.py --heads 16 --head-dim 64    # bge-large

Each figure: the best of 3 repetitions, both layouts alternating twice. docs/benchmarks.md has
a run.
"""

from __future__ import annotations

import argparse
import functools
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runtime"))

RANGES = ((5, 15), (20, 40), (40, 80), (60, 70), (80, 160), (200, 300), (400, 512))
MAX_PADDING = 0.125  # the replaced layout's bound


def masked_runs(lengths: list[int]) -> list[tuple[int, int, int, Any, Any, Any]]:
    """The replaced layout: (start, count, longest, gather, scatter, key mask) per run of
    similar lengths (longest first) padded by at most MAX_PADDING."""
    import torch

    runs = []
    first, start = 0, 0
    while first < len(lengths):
        longest, total, last = lengths[first], lengths[first], first + 1
        while last < len(lengths) and longest * (last - first + 1) <= (1 + MAX_PADDING) * (
            total + lengths[last]
        ):
            total += lengths[last]
            last += 1
        lens = torch.tensor(lengths[first:last])
        slot = torch.arange(longest)
        valid = slot[None, :] < lens[:, None]
        seq_start = torch.cumsum(lens, 0) - lens
        gather = torch.where(valid, seq_start[:, None] + slot[None, :], 0).reshape(-1)
        scatter = torch.nonzero(valid.reshape(-1)).reshape(-1)
        runs.append((start, last - first, longest, gather, scatter, valid[:, None, None, :]))
        first, start = last, start + total
    return runs


def masked_attention(qkv: Any, runs: list[tuple[int, int, int, Any, Any, Any]]) -> Any:
    import torch.nn.functional as F

    tokens, _, heads, dim = qkv.shape
    out = qkv.new_empty(tokens, heads, dim)
    for start, count, longest, gather, scatter, mask in runs:
        end = start + len(scatter)
        seg = qkv[start:end].index_select(0, gather).view(count, longest, 3, heads, dim)
        q, k, v = (seg[:, :, i].transpose(1, 2) for i in range(3))
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        o = o.transpose(1, 2).reshape(count * longest, heads, dim)
        out[start:end] = o.index_select(0, scatter)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=2048, help="tokens per batch")
    args = parser.parse_args()

    import torch

    from reranker_runtime.engines.base import EncodedPair
    from reranker_runtime.engines.packed_engine import _grouped_attention, pack

    def best_ms(fn: Callable[[], object], reps: int = 3, iters: int = 5) -> float:
        fn()
        best = float("inf")
        for _ in range(reps):
            started = time.perf_counter()
            for _ in range(iters):
                fn()
            best = min(best, (time.perf_counter() - started) / iters)
        return best * 1e3

    rng = random.Random(0)
    mixes: list[tuple[str, list[int]]] = []
    for low, high in RANGES:
        lengths: list[int] = []
        while sum(lengths) + high <= args.tokens:
            lengths.append(rng.randint(low, high))
        mixes.append((f"{low}-{high}", lengths))
    mixes.append(("1-63, each once", list(range(1, 64))))
    mixes.append(("2-45, each twice", list(range(2, 46)) * 2))
    mixes.append(("30-59, each once", list(range(30, 60))))
    print(f"heads {args.heads} x dim {args.head_dim}, torch threads {torch.get_num_threads()}")
    print(
        f"{'pair tokens':>16s} {'pairs':>6s} {'masked runs':>12s} {'equal runs':>11s} {'ratio':>6s}"
    )
    with torch.inference_mode():
        for label, lengths in mixes:
            packed = pack(
                [EncodedPair([1] * n) for n in lengths],
                position_offset=0,
                use_token_type_ids=False,
                max_input_length=max(lengths),
                vocab_size=2,
                type_vocab_size=1,
            )
            qkv = torch.randn(packed.num_tokens, 3, args.heads, args.head_dim)
            equal = packed.chunks()
            masked = masked_runs(packed.lengths.tolist())
            want = _grouped_attention(qkv, equal)
            assert torch.allclose(masked_attention(qkv, masked), want, atol=1e-5)
            times = {"masked": 0.0, "equal": 0.0}
            for _ in range(2):
                times["masked"] += best_ms(functools.partial(masked_attention, qkv, masked))
                times["equal"] += best_ms(functools.partial(_grouped_attention, qkv, equal))
            print(
                f"{label:>16s} {len(lengths):6d} {times['masked'] / 2:10.2f}ms "
                f"{times['equal'] / 2:9.2f}ms {times['masked'] / times['equal']:6.2f}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
