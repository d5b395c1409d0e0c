#!/usr/bin/env python
"""One GEMM at a time on CPU, PyTorch's ops (`F.linear`: MKL in float32) against oneDNN's fused
linear, the two kernel sets of `--cpu-kernels` (engines/cpu_kernels.py), in GFLOP/s: the shapes
of the MiniLM and bge-reranker-large feed-forward layers, with exact GELU, best of --repeats.

    python bench/cpu_gemm.py                  # 1 thread, float32 and bfloat16
    python bench/cpu_gemm.py --threads 2

docs/benchmarks.md has a run (MKL stays on AVX2 on AMD CPUs; oneDNN uses AVX-512).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runtime"))

# [tokens, in] x [in, out]
SHAPES = [
    (1024, 384, 1536),
    (1024, 1536, 384),
    (1024, 1024, 4096),
    (1024, 4096, 1024),
    (16, 1024, 3072),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    import torch

    from reranker_runtime.engines.cpu_kernels import activation_of, make_linear

    torch.set_num_threads(args.threads)
    gelu = activation_of("gelu", torch.nn.GELU())
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"{args.threads} thread(s); GFLOP/s")  # fmt: skip
    for dtype in (torch.float32, torch.bfloat16):
        for rows, n_in, n_out in SHAPES:
            x = torch.randn(rows, n_in).to(dtype)
            w, b = (torch.randn(n_out, n_in) / n_in**0.5).to(dtype), torch.zeros(n_out, dtype=dtype)
            speed = {}
            for kind in ("aten", "onednn"):
                linear = make_linear(kind, w, b, gelu)
                best = float("inf")
                with torch.inference_mode():
                    for _ in range(2 + args.repeats):  # the first two warm up
                        start = time.perf_counter()
                        linear(x)
                        best = min(best, time.perf_counter() - start)
                speed[kind] = 2 * rows * n_in * n_out / best / 1e9
            print(f"{dtype!s:15s} {rows:5d} x {n_in:4d} -> {n_out:4d}   aten {speed['aten']:6.1f}"
                  f"   onednn {speed['onednn']:6.1f}   ({speed['onednn'] / speed['aten']:.2f}x)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
