#!/usr/bin/env bash
# Everything a lent GPU machine can prove, in one run of under 10 minutes, for the device tool:
#
#   scripts/device-wheels.sh                                   # here, once: .whl/ (FastAPI etc.)
#   run(command="bash scripts/device-check.sh", carry=[".whl"], timeout_s=600)
#
# 1. the machine: GPU, driver, CPU model and flags;
# 2. scripts/gpu-check.sh (issue 8: correctness and throughput of the GPU path, <= 6 min);
# 3. scripts/cpu-bf16-check.sh (issue 9: the server in bfloat16 on 2 of the host's CPUs against
#    CrossEncoder fp32, and the score drift), when the host CPU has native bf16 (<= 2.5 min).
# Reports go to $OUT (the device tool returns it) or ./device-report. A step that fails does not
# stop the next one; the exit code is the first failure's. WHEELS (default .whl) and CPUINFO
# (default /proc/cpuinfo) can be set.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out="${OUT:-device-report}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
wheels="${WHEELS:-.whl}"
cpuinfo="${CPUINFO:-/proc/cpuinfo}"
export CPUINFO="$cpuinfo"
if ls "$wheels"/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site "$wheels"/*.whl || exit 1
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD/runtime:$PWD/operator${PYTHONPATH:+:$PYTHONPATH}"
status=0
step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $out/NAME.log
    local name="$1" limit="$2"
    shift 2
    echo "== $name (at most ${limit}s)"
    timeout "$limit" "$@" 2>&1 | tee "$out/$name.log"
    local rc="${PIPESTATUS[0]}"
    echo "== $name: exit $rc"
    if [ "$rc" -ne 0 ] && [ "$status" -eq 0 ]; then status="$rc"; fi
}
{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 || true
    grep -m1 'model name' "$cpuinfo"
    nproc
    grep -m1 -ow -E 'avx512_bf16|amx_bf16' "$cpuinfo" | sort -u | grep . || echo "no native bf16 flags"
    python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'
} 2>&1 | tee "$out/machine.txt"
# --no-deps hides a missing package until the server starts minutes later: check the imports now.
if ! python3 -c 'import fastapi, uvicorn, pydantic, transformers, torch, reranker_runtime.api.app'; then
    echo "a package the runtime needs is missing: run scripts/device-wheels.sh here and carry .whl" >&2
    exit 3
fi
# 360 + 150 s and the set-up stay under the device tool's 600 s per command. gpu-check writes its
# JSON after every section, so a step cut short still reports what it measured.
step gpu-check 360 bash scripts/gpu-check.sh "$out/gpu-check"
if grep -qw -E 'avx512_bf16|amx_bf16' "$cpuinfo"; then
    step cpu-bf16-check 150 bash scripts/cpu-bf16-check.sh "$out/cpu-bf16"
else
    echo "== cpu-bf16-check: skipped, the host CPU has no native bfloat16"
fi
exit "$status"
