#!/usr/bin/env bash
# Issue 9's CPU targets in one run, on 2 CPUs of this machine (the case the targets name):
#   1. the server at its defaults against CrossEncoder.predict (fp32), quiet;
#   2. the same with a busy-loop neighbour on the second CPU (a shared Kubernetes node);
#   3. the server in bfloat16 against CrossEncoder fp32, where the CPU computes bf16 natively;
#   4. how long a 24-layer/1024 model (bge-reranker-large's shape) takes to be ready.
# Each of 1-3 also runs the lone-request and fairness checks. About 11 minutes on a 2-core AMD
# EPYC (Zen 5); offline (the models are built on the spot, random weights).
#
#   scripts/cpu-check.sh [OUT_DIR]        # default OUT_DIR: cpu-check-report
#
# Every server runs with --device cpu (the baseline, CrossEncoder, always runs on the CPU): on a
# GPU host, `serve`'s default device (auto) would pick the GPU and compare it with the CPU.
#
# Writes OUT_DIR/summary.md (the CPU, then each run's verdicts: paste it into
# docs/benchmarks.md with the date), and per run NAME.txt, NAME.json and NAME-serve.log.
# ROUNDS (default 3), REQUESTS (default 32), CPUS (default: the first two CPUs this process
# may use), PYTHON (default python3) and CPUINFO (default /proc/cpuinfo) can be set, and RUNS:
# the runs to make, of "fp32-quiet fp32-neighbour bf16-quiet bf16-neighbour warmup" (default
# all; the bf16 ones only where the CPU has native bf16).
set -euo pipefail
out="${1:-cpu-check-report}"
python="${PYTHON:-python3}"
rounds="${ROUNDS:-3}"
requests="${REQUESTS:-32}"
runs=" ${RUNS:-fp32-quiet fp32-neighbour bf16-quiet bf16-neighbour warmup} "
for name in $runs; do
    case "$name" in
        fp32-quiet | fp32-neighbour | bf16-quiet | bf16-neighbour | warmup) ;;
        *) echo "cpu-check: unknown run '$name' in RUNS (fp32-quiet fp32-neighbour bf16-quiet bf16-neighbour warmup)" >&2; exit 2 ;;
    esac
done
wanted() { [[ "$runs" == *" $1 "* ]]; }
cpuinfo="${CPUINFO:-/proc/cpuinfo}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cpus="${CPUS:-$("$python" -c 'import os; print(",".join(map(str, sorted(os.sched_getaffinity(0))[:2])))')}"
if ! [[ "$cpus" =~ ^[0-9]+,[0-9]+$ ]]; then
    echo "cpu-check: needs two CPUs, as CPUS=a,b (got '$cpus'): the targets are for 2 cores" >&2
    exit 2
fi
neighbour_cpu="${cpus##*,}"
if ! command -v taskset >/dev/null; then
    echo "cpu-check: needs taskset (util-linux) to pin the server, the baseline and the neighbour" >&2
    exit 2
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
export PYTHONPATH="$here/runtime${PYTHONPATH:+:$PYTHONPATH}"
runtime=("$python" -m reranker_runtime.cli)
mkdir -p "$out"
trap 'kill $(jobs -p) 2>/dev/null || true' EXIT

free_port() {
    "$python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

native_bf16=no
if grep -qwE 'avx512_bf16|amx_bf16' "$cpuinfo"; then native_bf16=yes; fi
{
    echo "# CPU check, $(date -u +%Y-%m-%dT%H:%MZ)"
    echo
    echo "- CPU: $(grep -m1 'model name' "$cpuinfo" | cut -d: -f2- | xargs)," \
        "$(grep -m1 -E '^cpu family' "$cpuinfo" | cut -d: -f2 | xargs | sed 's/^/family /')" \
        "$(grep -m1 -E '^model\s*:' "$cpuinfo" | cut -d: -f2 | xargs | sed 's/^/model /')"
    echo "- SIMD: $(grep -m1 -ow -E 'avx512_bf16|amx_bf16|avx512f|avx2' "$cpuinfo" | sort -u | xargs)"
    echo "- native bf16: $native_bf16; CPUs used: $cpus (neighbour on $neighbour_cpu)"
    echo "- $("$python" -c 'import torch; print("torch", torch.__version__, "capability", torch.backends.cpu.get_cpu_capability())')"
    echo "- command: scripts/cpu-check.sh (ROUNDS=$rounds REQUESTS=$requests RUNS='$(echo $runs)')"
    echo
} >"$out/summary.md"
cat "$out/summary.md"

sizes=small
if wanted warmup; then sizes="small large"; fi
echo "cpu-check: building the benchmark models (small: MiniLM-L6's shape; large, for warmup: bge-reranker-large's)"
for size in $sizes; do
    if ! "$python" "$here/bench/make_model.py" --size "$size" --out "$out/model-$size" \
        >"$out/make-model-$size.log" 2>&1; then
        echo "cpu-check: building the $size model failed: see $out/make-model-$size.log" >&2
        exit 1
    fi
done

# run NAME NEIGHBOUR(yes|no) [serve flags...]: the server on $cpus, the bench (and its
# in-process CrossEncoder baseline) on the same CPUs, a busy loop on the last one if asked.
run() {
    local name="$1" neighbour="$2"
    shift 2
    if ! wanted "$name"; then return 0; fi
    local port
    port="$(free_port)"
    echo "cpu-check: $name"
    taskset -c "$cpus" "${runtime[@]}" serve --model "$out/model-small" --device cpu \
        --host 127.0.0.1 --port "$port" --log-format text "$@" >"$out/$name-serve.log" 2>&1 &
    local server=$!
    local busy=""
    if [ "$neighbour" = yes ]; then
        taskset -c "$neighbour_cpu" "$python" -c 'while True: pass' &
        busy=$!
    fi
    taskset -c "$cpus" "${runtime[@]}" bench --url "http://127.0.0.1:$port" \
        --model "$out/model-small" --concurrency 8 --requests "$requests" --rounds "$rounds" \
        --fairness --fairness-rounds 1 --threads 2 --wait-healthy 120 \
        --output "$out/$name.json" >"$out/$name.txt" 2>"$out/$name-bench.log" || true
    kill "$server" ${busy:+"$busy"} 2>/dev/null || true
    wait "$server" ${busy:+"$busy"} 2>/dev/null || true
    {
        echo "## $name"
        echo
        echo '```'
        grep -E '^(server|load|baseline|lone|fairness|  pairs/s|  per round|  ratio|  (PASS|MISS|n/a))' \
            "$out/$name.txt" \
            || echo "no result: see $name.txt, $name-bench.log and $name-serve.log"
        echo '```'
        echo
    } | tee -a "$out/summary.md"
}

run fp32-quiet no
run fp32-neighbour yes
if [ "$native_bf16" = yes ]; then
    run bf16-quiet no --dtype bfloat16
    run bf16-neighbour yes --dtype bfloat16
elif wanted bf16-quiet || wanted bf16-neighbour; then
    echo -e "## bf16\n\nnot run: this CPU has no native bfloat16 (no avx512_bf16 or amx_bf16)\n" \
        | tee -a "$out/summary.md"
fi

if ! wanted warmup; then exit 0; fi
echo "cpu-check: warm-up of the 24-layer/1024 model"
port="$(free_port)"
started="$(date +%s.%N)"
taskset -c "$cpus" "${runtime[@]}" serve --model "$out/model-large" --device cpu \
    --host 127.0.0.1 --port "$port" --log-format text >"$out/warmup-serve.log" 2>&1 &
server=$!
ready=""
for _ in $(seq 1 600); do
    if "$python" -c "import urllib.request, sys; urllib.request.urlopen('http://127.0.0.1:$port/health', timeout=1)" 2>/dev/null; then
        ready="$("$python" -c "print(round($(date +%s.%N) - $started, 1))")"
        break
    fi
    if ! kill -0 "$server" 2>/dev/null; then break; fi
    sleep 0.2
done
kill "$server" 2>/dev/null || true
wait "$server" 2>/dev/null || true
{
    echo "## warm-up, 24 layers x 1024 (fp32, defaults; target: warm-up < 15 s)"
    echo
    echo '```'
    echo "ready ${ready:-never (see warmup-serve.log)} s after the process started"
    grep -E 'cpu kernels|engine warmed up' "$out/warmup-serve.log" | sed 's/^[0-9-]* [0-9:]* //' || true
    echo '```'
} | tee -a "$out/summary.md"
