#!/usr/bin/env python
"""Build a benchmark checkpoint locally (random weights, realistic shape, tokenizer trained here).

    python bench/make_model.py --size small --out /tmp/bench-model

Hubs are unreachable here; the forward-pass cost depends on the shape, not the weights. See
`reranker_runtime.bench.model` for the shapes (small = MiniLM-L6, base = bge-reranker-base,
large = bge-reranker-large).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runtime"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> int:
    from reranker_runtime.bench.model import SHAPES, build_bench_model

    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--size", choices=list(SHAPES), default="small")
    p.add_argument("--arch", choices=["xlmr", "bert"], default="xlmr")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    out = build_bench_model(args.out, args.size, args.arch, args.seed)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
