#!/usr/bin/env bash
# Prove the GPU path in one command: correctness, engine throughput and the server end to end.
#
#   scripts/gpu-check.sh [OUT_DIR] [extra gpu-check flags]
#
# Runs from this checkout with the machine's own CUDA PyTorch (>= 2.10); it needs the runtime's
# other packages (FastAPI, uvicorn, pydantic, transformers: scripts/device-wheels.sh fetches the
# ones a bare GPU image lacks). No install is needed: `pip install --no-deps -e .` offline fails
# in build isolation (it cannot fetch setuptools); add --no-build-isolation where setuptools >= 77
# is installed, if you want the command on PATH.
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
