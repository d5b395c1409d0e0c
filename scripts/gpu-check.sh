#!/usr/bin/env bash
# Prove the GPU path in one command: correctness, engine throughput and the server end to end.
#
#   pip install --no-deps -e .        # into the machine's own CUDA PyTorch (>= 2.10)
#   scripts/gpu-check.sh [OUT_DIR] [extra gpu-check flags]
#
# Offline (no hub: every model is built on the spot); under 6 minutes on an L4 or H200. Writes
# OUT_DIR/gpu-check.json and OUT_DIR/gpu-check.md (default OUT_DIR: gpu-check-report). Without a
# CUDA GPU it stops at once with exit code 2.
set -euo pipefail
out="${1:-gpu-check-report}"
shift || true
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
if command -v reranker-runtime >/dev/null 2>&1; then
    exec reranker-runtime gpu-check --out "$out" "$@"
fi
# Not installed as a command: run from this checkout.
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$here/runtime${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python3}" -m reranker_runtime.cli gpu-check --out "$out" "$@"
