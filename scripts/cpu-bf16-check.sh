#!/usr/bin/env bash
# Issue 9's bfloat16 CPU target on a CPU with native bf16 (AVX512-BF16 or AMX): the server with
# --dtype bfloat16 against CrossEncoder.predict in float32, both on the same 2 CPUs, plus the
# bf16-vs-fp32 score drift. About 2 minutes; offline (the model is built on the spot).
#
#   scripts/cpu-bf16-check.sh [OUT_DIR]       # default OUT_DIR: cpu-bf16-report
#
# Writes OUT_DIR/bench.txt, OUT_DIR/bench.json, OUT_DIR/drift.txt and OUT_DIR/serve.log. On a
# CPU without native bf16 it stops at once with exit code 2 (bf16 is emulated there and slower
# than fp32: nothing to measure); RERANKER_BF16_CHECK_ANY_CPU=1 runs it anyway (to test this
# script). CPUS (default: the first two CPUs this process may use), PYTHON and CPUINFO (default
# /proc/cpuinfo) can be set.
set -euo pipefail
out="${1:-cpu-bf16-report}"
python="${PYTHON:-python3}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

cpuinfo="${CPUINFO:-/proc/cpuinfo}"
if ! grep -qwE 'avx512_bf16|amx_bf16' "$cpuinfo" && [ "${RERANKER_BF16_CHECK_ANY_CPU:-0}" != 1 ]; then
    echo "cpu-bf16-check: this CPU has no avx512_bf16 or amx_bf16 flag (no native bfloat16):" \
        "nothing to measure" >&2
    exit 2
fi
cpus="${CPUS:-$("$python" -c 'import os; print(",".join(map(str, sorted(os.sched_getaffinity(0))[:2])))')}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
export PYTHONPATH="$here/runtime${PYTHONPATH:+:$PYTHONPATH}"
runtime=("$python" -m reranker_runtime.cli)
port="$("$python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
mkdir -p "$out"

echo "cpu-bf16-check: CPUs $cpus; $(grep -m1 'model name' "$cpuinfo" | cut -d: -f2- | xargs)"
"$python" "$here/bench/make_model.py" --size small --out "$out/model" >/dev/null 2>&1

taskset -c "$cpus" "${runtime[@]}" serve --model "$out/model" --device cpu --dtype bfloat16 \
    --host 127.0.0.1 --port "$port" --log-format text >"$out/serve.log" 2>&1 &
server=$!
trap 'kill "$server" 2>/dev/null || true' EXIT

# The bench waits for /health itself; the baseline (fp32 CrossEncoder) runs on the same CPUs.
taskset -c "$cpus" "${runtime[@]}" bench --url "http://127.0.0.1:$port" --model "$out/model" \
    --concurrency 8 --requests 16 --rounds 2 --lone-repeats 3 --threads 2 --wait-healthy 60 \
    --output "$out/bench.json" | tee "$out/bench.txt"
kill "$server" 2>/dev/null || true

taskset -c "$cpus" "$python" "$here/bench/bf16_drift.py" --model "$out/model" 2>/dev/null \
    | tee "$out/drift.txt"
