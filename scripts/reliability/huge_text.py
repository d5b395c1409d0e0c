"""Send one 10 MB text to a running `reranker-runtime serve` and report time and server RSS.

    python scripts/reliability/huge_text.py URL PID [N] [--no-truncate]

With truncation (default) it sends the request N times (default 3) and prints the answer time and
the server's RSS (VmRSS of PID) after each; with --no-truncate it sends it once and prints the
422 and its time. The text is 10,000,000 characters of random English words.
"""

from __future__ import annotations

import json
import random
import sys
import time
import urllib.error
import urllib.request

WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "deep",
    "learning",
    "model",
    "inference",
]


def rss_mib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) // 1024
    raise RuntimeError("no VmRSS")


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    truncate = "--no-truncate" not in sys.argv
    url, pid = args[0], int(args[1])
    n = int(args[2]) if len(args) > 2 else 3
    rng = random.Random(0)
    text = " ".join(rng.choice(WORDS) for _ in range(2_000_000))[:10_000_000]
    body = json.dumps({"query": "what is deep learning", "texts": [text], "truncate": truncate})
    print(f"text {len(text)} chars, truncate={truncate}; RSS before {rss_mib(pid)} MiB")
    for i in range(n if truncate else 1):
        request = urllib.request.Request(
            url + "/rerank", data=body.encode(), headers={"content-type": "application/json"}
        )
        started = time.perf_counter()
        try:
            with urllib.request.urlopen(request, timeout=600) as response:
                response.read()
                status, detail = response.status, ""
        except urllib.error.HTTPError as err:
            status, detail = err.code, err.read().decode()[:200]
        elapsed = time.perf_counter() - started
        print(f"request {i + 1}: {status} in {elapsed:.2f} s; RSS {rss_mib(pid)} MiB {detail}")


if __name__ == "__main__":
    main()
