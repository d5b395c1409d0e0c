#!/usr/bin/env python
"""CPU forward workers against OpenMP wait settings: the packed engine's passes over the same
workload batches, one pass at a time on 2 threads (passive, spinning) or 2 passes at once on 1
thread each (what `serve` runs on 2 CPUs, cpu_threads.py). Quiet, or with a busy-loop neighbour
pinned to the last CPU.

    python bench/cpu_workers.py --model /tmp/bench-model --rounds 3
    python bench/cpu_workers.py --model /tmp/bench-model --rounds 2 --neighbour
    python bench/cpu_workers.py --model /tmp/bench-model --cpu-kernels onednn

Each setting runs in its own child process (OpenMP reads its variables once, at start) and times
all batches --repeats times (median); the parent interleaves the settings, reversing the order
every other round. Printed: wall and process CPU ms per setting, and per round the first
setting's wall time over each one's (> 1: faster). docs/benchmarks.md has a run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

RUNTIME = str(Path(__file__).resolve().parents[1] / "runtime")

# name -> (environment, forward passes at once)
SETTINGS: dict[str, tuple[dict[str, str], int]] = {
    "1 pass x 2 threads, passive": ({"OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": "PASSIVE"}, 1),
    "1 pass x 2 threads, spinning": ({"OMP_NUM_THREADS": "2"}, 1),
    "2 passes x 1 thread, passive": ({"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}, 2),
}


def child(model: str, workers: int, budget: int, requests: int, repeats: int, kernels: str) -> None:
    sys.path.insert(0, RUNTIME)
    import random
    from concurrent.futures import ThreadPoolExecutor

    from reranker_runtime.bench.workload import make_requests
    from reranker_runtime.engines.base import EncodedPair
    from reranker_runtime.engines.packed_engine import PackedEngine
    from reranker_runtime.engines.torch_engine import TorchEngine

    padded = TorchEngine.load(model, device="cpu", dtype="float32")
    engine = PackedEngine.from_torch_engine(padded, cpu_kernels=kernels)
    pairs = [p for r in make_requests(7, requests) for p in r.pairs()]
    ids = padded.tokenizer([q for q, _ in pairs], [t for _, t in pairs], truncation=True)
    encoded = [EncodedPair(i) for i in ids["input_ids"]]
    random.Random(1).shuffle(encoded)  # arrival order, as the server's batches see it
    batches: list[list[EncodedPair]] = [[]]
    for pair in encoded:
        if batches[-1] and sum(len(p) for p in batches[-1]) + len(pair) > budget:
            batches.append([])
        batches[-1].append(pair)
    pool = ThreadPoolExecutor(workers)
    for batch in batches[:workers]:
        engine.score(batch)
    runs = []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        list(pool.map(engine.score, batches))
        runs.append(((time.perf_counter() - wall) * 1e3, (time.process_time() - cpu) * 1e3))
    print(
        json.dumps(
            {
                "wall_ms": statistics.median(r[0] for r in runs),
                "cpu_ms": statistics.median(r[1] for r in runs),
            }
        )
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--requests", type=int, default=6, help="workload requests of 16 pairs")
    parser.add_argument("--budget", type=int, default=2048, help="tokens per pass")
    parser.add_argument("--neighbour", action="store_true", help="busy loop on the last CPU")
    parser.add_argument(
        "--cpu-kernels", default="aten", choices=["aten", "onednn"], help="the engine's kernels"
    )
    parser.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.model, args.child, args.budget, args.requests, args.repeats, args.cpu_kernels)
        return 0

    names = list(SETTINGS)
    results: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    last_cpu = str(max(os.sched_getaffinity(0)))
    for r in range(args.rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            variables, workers = SETTINGS[name]
            env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "GOMP_"))}
            env.update(variables)
            busy = (
                subprocess.Popen(
                    ["taskset", "-c", last_cpu, sys.executable, "-c", "while True: pass"]
                )
                if args.neighbour
                else None
            )
            try:
                proc = subprocess.run(
                    [sys.executable, __file__, "--model", args.model, "--child", str(workers),
                     "--budget", str(args.budget), "--requests", str(args.requests),
                     "--repeats", str(args.repeats), "--cpu-kernels", args.cpu_kernels],
                    env=env, capture_output=True, text=True, check=True,
                )  # fmt: skip
            finally:
                if busy is not None:
                    busy.kill()
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            results[name].append(result)
            print(f"round {r + 1}: {name}: {result}", flush=True)
    base = [x["wall_ms"] for x in results[names[0]]]
    print(
        f"\n{'neighbour on CPU ' + last_cpu if args.neighbour else 'quiet'}; per round: {names[0]!r} wall / this"
    )
    for name in names:
        walls = [x["wall_ms"] for x in results[name]]
        cpu = statistics.median(x["cpu_ms"] for x in results[name])
        ratios = ", ".join(f"{b / w:.2f}" for b, w in zip(base, walls, strict=True))
        print(f"{name:32s} wall {statistics.median(walls):8.0f} ms  cpu {cpu:8.0f} ms  {ratios}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
