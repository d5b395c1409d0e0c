#!/usr/bin/env python
"""How far bfloat16 scores move from float32 ones: the packed engine on CPU, both precisions, the
same benchmark workload pairs.

    python bench/bf16_drift.py --model /tmp/bench-model            # 32 requests of 16 pairs

Prints the max / mean / p99 |delta| of the sigmoid scores, the top-1 and pairwise-order agreement
within each request, and the median spread of a request's float32 scores (rank agreement means
little when that spread is tiny, as with random weights). On a CPU without native bf16 the
bfloat16 engine is emulated (slow, same numbers). docs/benchmarks.md has a run.
"""

from __future__ import annotations

import argparse
import itertools

import numpy as np


def sigmoid(x: np.ndarray) -> np.ndarray:
    return np.asarray(1.0 / (1.0 + np.exp(-x.astype(np.float64))))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="checkpoint directory")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--seed", type=int, default=3)
    args = parser.parse_args()

    from reranker_runtime.bench.workload import make_requests
    from reranker_runtime.engines.base import EncodedPair
    from reranker_runtime.engines.packed_engine import PackedEngine

    fp32 = PackedEngine.load(args.model, device="cpu", dtype="float32")
    bf16 = PackedEngine.load(args.model, device="cpu", dtype="bfloat16")
    deltas: list[float] = []
    spreads: list[float] = []
    orders: list[float] = []
    top1 = 0
    requests = make_requests(args.seed, args.requests)
    for request in requests:
        ids = fp32.tokenizer(
            [request.query] * len(request.texts), list(request.texts), truncation=True
        )["input_ids"]
        batch = [EncodedPair(seq) for seq in ids]
        a, b = sigmoid(fp32.score(batch)[:, 0]), sigmoid(bf16.score(batch)[:, 0])
        deltas.extend(np.abs(a - b).tolist())
        spreads.append(float(a.max() - a.min()))
        top1 += int(a.argmax() == b.argmax())
        pairs = list(itertools.combinations(range(len(a)), 2))
        orders.append(
            float(np.mean([np.sign(a[i] - a[j]) == np.sign(b[i] - b[j]) for i, j in pairs]))
        )
    d = np.array(deltas)
    print(
        f"pairs {len(d)}  max|delta| {d.max():.2e}  mean {d.mean():.2e}  "
        f"p99 {np.quantile(d, 0.99):.2e}  top-1 agreement {top1}/{len(requests)}  "
        f"pairwise order agreement {np.mean(orders):.4f}  "
        f"median fp32 score spread per request {np.median(spreads):.2e}  "
        f"bf16 kernels {bf16.info.extra['cpu_kernels']}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
