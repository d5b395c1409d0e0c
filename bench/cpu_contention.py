#!/usr/bin/env python
"""Time one fixed forward pass under OpenMP settings, with and without a busy neighbour process.

    python bench/cpu_contention.py --model /tmp/bench-model            # all settings, interleaved
    python bench/cpu_contention.py --model /tmp/bench-model --outer 3 --rounds 3 --repeats 5

Each setting (torch threads x OMP_WAIT_POLICY) runs in its own child process, because OpenMP
reads its variables once, when it starts. A child times a 12 x 160-token fp32 forward pass in its
main thread (median of --repeats), alternating without and with a busy loop pinned to the last
CPU (`taskset`), --rounds times; the parent runs every setting once per --outer round, so the
settings are interleaved in time. Each line is JSON: wall ms and process CPU ms per pass. CPU ms
above what one thread needs for the same pass is spinning. docs/benchmarks.md has a run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

SETTINGS = (("2", None), ("2", "PASSIVE"), ("1", None))


def child(model_dir: str, rounds: int, repeats: int) -> None:
    import torch
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(
        model_dir, attn_implementation="sdpa"
    ).eval()
    ids = torch.randint(5, 500, (12, 160), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)

    def once() -> tuple[float, float]:
        t0, c0 = time.perf_counter(), time.process_time()
        with torch.inference_mode():
            model(input_ids=ids, attention_mask=mask)
        return (time.perf_counter() - t0) * 1e3, (time.process_time() - c0) * 1e3

    for _ in range(3):
        once()
    last_cpu = str(max(os.sched_getaffinity(0)))
    label = {
        "threads": torch.get_num_threads(),
        "policy": os.environ.get("OMP_WAIT_POLICY", "default"),
    }
    for r in range(rounds):
        for neighbour in (False, True):
            busy = (
                subprocess.Popen(
                    ["taskset", "-c", last_cpu, sys.executable, "-c", "while True: pass"]
                )
                if neighbour
                else None
            )
            time.sleep(0.2)
            try:
                runs = [once() for _ in range(repeats)]
            finally:
                if busy is not None:
                    busy.kill()
                    busy.wait()
            line = dict(
                label,
                round=r,
                neighbour=neighbour,
                wall_ms=round(statistics.median(w for w, _ in runs), 1),
                cpu_ms=round(statistics.median(c for _, c in runs), 1),
            )
            print(json.dumps(line), flush=True)


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", required=True, help="model directory (bench/make_model.py)")
    p.add_argument("--outer", type=int, default=2, help="interleaved passes over the settings")
    p.add_argument("--rounds", type=int, default=3, help="neighbour off/on rounds per child")
    p.add_argument("--repeats", type=int, default=5, help="forward passes per measurement")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.model, args.rounds, args.repeats)
        return 0
    for _ in range(args.outer):
        for threads, policy in SETTINGS:
            env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
            env.update(OMP_NUM_THREADS=threads, HF_HUB_OFFLINE="1")
            if policy:
                env["OMP_WAIT_POLICY"] = policy
            cmd = [sys.executable, __file__, "--child", "--model", args.model]
            cmd += ["--rounds", str(args.rounds), "--repeats", str(args.repeats)]
            subprocess.run(cmd, env=env, check=True, stderr=subprocess.DEVNULL)
    return 0


if __name__ == "__main__":
    sys.exit(main())
