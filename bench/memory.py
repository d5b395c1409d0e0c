"""Resident memory of `serve` under a varied mix of requests, per memory-allocator setup.

Each setup starts its own server on the same model. Worker threads then send the same seeded mix
for `--seconds`: /rerank, /v2/rerank and /predict bodies with 1-64 texts of 20-4,000 characters,
some with max_chunks_per_doc. The server's VmRSS is sampled every 10 s. The load then stops, and
after `--idle` seconds the idle RSS is read. Printed per setup: start, peak, end-of-load and idle
RSS, the requests answered, and the ratios to the first setup.

Setups:
- `glibc-untrimmed` is glibc's malloc with `--malloc-trim-interval 0`, the behaviour before
  allocator.py.
- `glibc` is the default: malloc_trim every 5 s.
- `jemalloc` preloads it with LD_PRELOAD, as the runtime image does. It needs libjemalloc2
  installed (`apt-get install libjemalloc2`) and is skipped with a message otherwise.

    .venv/bin/python bench/memory.py --model /tmp/bench-model [--seconds 300 --workers 5]
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

JEMALLOC_GLOBS = (
    "/usr/lib/*/libjemalloc.so.2",
    "/usr/lib/libjemalloc.so.2",
    "/usr/lib64/libjemalloc.so.2",
)
SYLLABLES = [
    "ba",
    "se",
    "ten",
    "in",
    "fer",
    "ence",
    "rank",
    "er",
    "mod",
    "el",
    "doc",
    "u",
    "ment",
    "que",
    "ry",
    "lat",
    "en",
    "cy",
    "cross",
    "co",
    "der",
    "to",
    "ken",
    "pod",
    "clus",
]


def vocabulary(rng: random.Random) -> list[str]:
    words = ["".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 4))) for _ in range(3000)]
    return words + ["the", "a", "of", "and", "is", "to", "in", "for"] * 30


def text(rng: random.Random, words: list[str], lo: int, hi: int) -> str:
    """A text of lo..hi characters, log-uniform: every length shows up."""
    n = int(math.exp(rng.uniform(math.log(lo), math.log(hi))))
    parts: list[str] = []
    length = 0
    while length < n:
        parts.append(rng.choice(words))
        length += len(parts[-1]) + 1
    return " ".join(parts)[:n].strip() or "x"


def request(rng: random.Random, words: list[str]) -> tuple[str, dict[str, Any]]:
    kind = rng.random()
    texts = [text(rng, words, 20, 4000) for _ in range(rng.choice([1, 2, 4, 8, 16, 32, 64]))]
    query = text(rng, words, 10, 200)
    if kind < 0.5:
        return "/rerank", {"query": query, "texts": texts, "truncate": True}
    if kind < 0.7:
        return "/v2/rerank", {"model": "m", "query": query, "documents": texts}
    if kind < 0.85:
        body = {"query": query, "texts": texts[:8], "truncate": True, "max_chunks_per_doc": 4}
        return "/rerank", body
    return "/predict", {"inputs": [[query, t] for t in texts[:16]], "truncate": True}


def rss_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) in KiB."""
    fields = dict(
        line.split(":", 1)
        for line in Path(f"/proc/{pid}/status").read_text().splitlines()
        if ":" in line
    )
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


def run_setup(
    name: str, args: argparse.Namespace, extra_env: dict[str, str], flags: list[str]
) -> dict[str, Any]:
    port = args.port
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, **extra_env}
    cmd = [
        sys.executable, "-m", "reranker_runtime.cli", "serve", "--model", args.model,
        "--host", "127.0.0.1", "--port", str(port), "--prometheus-port", "0",
        "--log-format", "text", "--log-level", "warning", *flags,
    ]  # fmt: skip
    server = subprocess.Popen(cmd, env=env)
    try:
        for _ in range(300):
            time.sleep(0.5)
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
        else:
            raise SystemExit(f"{name}: the server did not become ready")
        start_rss, _ = rss_kib(server.pid)
        stop = threading.Event()
        answered = [0] * args.workers

        def work(i: int) -> None:
            rng = random.Random(1000 + i)
            words = vocabulary(random.Random(7))
            with httpx.Client(timeout=300) as client:
                while not stop.is_set():
                    path, body = request(rng, words)
                    if client.post(base + path, json=body).status_code == 200:
                        answered[i] += 1

        threads = [threading.Thread(target=work, args=(i,)) for i in range(args.workers)]
        for t in threads:
            t.start()
        began = time.monotonic()
        samples = []
        while time.monotonic() - began < args.seconds:
            time.sleep(min(10.0, max(0.0, args.seconds - (time.monotonic() - began))))
            samples.append(rss_kib(server.pid)[0])
            print(
                f"  {name}: {time.monotonic() - began:5.0f} s  rss {samples[-1] / 1024:6.0f} MiB",
                flush=True,
            )
        stop.set()
        for t in threads:
            t.join()
        time.sleep(args.idle)
        idle_rss, peak = rss_kib(server.pid)
        return {
            "setup": name,
            "start_mib": round(start_rss / 1024),
            "peak_mib": round(peak / 1024),
            "end_of_load_mib": round(samples[-1] / 1024),
            "idle_mib": round(idle_rss / 1024),
            "answered": sum(answered),
        }
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True)
    parser.add_argument("--seconds", type=float, default=300.0, help="load per setup (default 300)")
    parser.add_argument("--idle", type=float, default=15.0, help="wait after the load (default 15)")
    parser.add_argument("--workers", type=int, default=5, help="client threads (default 5)")
    parser.add_argument("--port", type=int, default=8197)
    parser.add_argument("--setups", default="glibc-untrimmed,glibc,jemalloc")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    jemalloc = next((p for pattern in JEMALLOC_GLOBS for p in sorted(glob.glob(pattern))), None)
    setups = {
        "glibc-untrimmed": ({}, ["--malloc-trim-interval", "0"]),
        "glibc": ({}, []),
        "jemalloc": ({"LD_PRELOAD": jemalloc or ""}, []),
    }
    results = []
    for name in args.setups.split(","):
        if name == "jemalloc" and jemalloc is None:
            print("jemalloc: skipped, libjemalloc.so.2 not found (apt-get install libjemalloc2)")
            continue
        env, flags = setups[name]
        print(f"{name}: {args.seconds:.0f} s of load, {args.workers} clients", flush=True)
        results.append(run_setup(name, args, env, flags))

    print()
    print("| setup | start | peak | end of load | idle | answered |")
    print("|---|---|---|---|---|---|")
    first = results[0]
    for r in results:
        ratio = f" ({r['peak_mib'] / first['peak_mib']:.2f}x)" if r is not first else ""
        answered = f" ({r['answered'] / first['answered']:.2f}x)" if r is not first else ""
        print(
            f"| {r['setup']} | {r['start_mib']} MiB | {r['peak_mib']} MiB{ratio} | "
            f"{r['end_of_load_mib']} MiB | {r['idle_mib']} MiB | {r['answered']}{answered} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
