#!/usr/bin/env python
"""Engine-only CPU throughput, in one process: CrossEncoder-style batches of the transformers
model against the runtime's engines on the server's batches, interleaved rounds.

    python bench/engine_compare.py --model /tmp/bench-model              # 4 rounds, 2048 tokens

The workload's pairs are tokenized once. "crossencoder batches" = 32 pairs at a time in
length order, padded, run by the padded (transformers) engine: what `CrossEncoder.predict`
computes. The others cut the same length-ordered pairs into `--budget`-token batches, as the
server's batcher does (the padded engine counts longest x n, the packed one the sum). Every round
runs every configuration once on the same pairs; the ratios are per round, then the median.
Set OMP_WAIT_POLICY / OMP_NUM_THREADS as the server does (PASSIVE, the CPUs) to compare like
with like. docs/benchmarks.md has a run.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="checkpoint directory")
    parser.add_argument("--budget", type=int, default=2048, help="tokens per server batch")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--requests", type=int, default=16, help="workload requests of 16 pairs")
    args = parser.parse_args()

    from reranker_runtime.bench.workload import make_requests
    from reranker_runtime.engines.base import EncodedPair, Engine
    from reranker_runtime.engines.packed_engine import PackedEngine
    from reranker_runtime.engines.torch_engine import TorchEngine

    padded = TorchEngine.load(args.model, device="cpu", dtype="float32")
    aten = PackedEngine.from_torch_engine(padded, cpu_kernels="aten")
    onednn = PackedEngine.from_torch_engine(padded, cpu_kernels="onednn")
    pairs = [p for r in make_requests(7, args.requests) for p in r.pairs()]
    ids = padded.tokenizer([q for q, _ in pairs], [t for _, t in pairs], truncation=True)
    encoded = sorted((EncodedPair(i) for i in ids["input_ids"]), key=len, reverse=True)
    real_tokens = sum(len(p) for p in encoded)

    def cut(cost: Callable[[list[EncodedPair]], int]) -> list[list[EncodedPair]]:
        batches: list[list[EncodedPair]] = [[]]
        for pair in encoded:
            if batches[-1] and cost([*batches[-1], pair]) > args.budget:
                batches.append([])
            batches[-1].append(pair)
        return batches

    padded_batches = cut(lambda b: max(len(p) for p in b) * len(b))
    packed_batches = cut(lambda b: sum(len(p) for p in b))
    configs: dict[str, tuple[Engine, Sequence[list[EncodedPair]]]] = {
        "crossencoder batches (32 pairs, padded)": (
            padded,
            [encoded[i : i + 32] for i in range(0, len(encoded), 32)],
        ),
        f"torch engine, {args.budget}-token batches": (padded, padded_batches),
        "packed engine, --cpu-kernels aten": (aten, packed_batches),
        "packed engine, --cpu-kernels onednn": (onednn, packed_batches),
    }
    for engine, batches in configs.values():  # warm every shape once
        engine.score(batches[0])
    rates: dict[str, list[float]] = {name: [] for name in configs}
    for _ in range(args.rounds):
        for name, (engine, batches) in configs.items():
            started = time.perf_counter()
            for batch in batches:
                engine.score(batch)
            rates[name].append(real_tokens / (time.perf_counter() - started))
    base = rates["crossencoder batches (32 pairs, padded)"]
    print(f"{len(encoded)} pairs, {real_tokens} real tokens, {args.rounds} rounds")
    for name, values in rates.items():
        per_round = [v / b for v, b in zip(values, base, strict=True)]
        print(
            f"{name:42s} {statistics.median(values):8.0f} real tokens/s  "
            f"{statistics.median(per_round):.2f}x  (rounds {', '.join(f'{r:.2f}' for r in per_round)})"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
