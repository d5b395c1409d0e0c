"""Tokenization of long texts: one `encode` per text (the GIL held throughout, as before) against
`encode_bounded_many` (batches that release it, what the runtime does now).

Requests are tokenized on a thread pool, so what matters is not one request alone but several
at once and the event loop beside them: this prints, per variant, the wall time of one request,
of `--concurrent` requests at once, and the longest stall of a thread that only wants to wake
up every millisecond beside one request (the event loop's stand-in; a core is left free, so only
the GIL can hold it up), in interleaved rounds, with the ratios.

    .venv/bin/python bench/tokenization.py --model /tmp/bench-model [--texts 500 --chars 4000]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import threading
import time
from collections.abc import Callable, Sequence

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # as `serve` sets it

from tokenizers import Tokenizer

from reranker_runtime.text_bounds import encode_bounded_many

WORDS = [
    "the",
    "of",
    "and",
    "reranking",
    "kubernetes",
    "cluster",
    "documents",
    "query",
    "relevance",
    "model",
    "inference",
    "gpu",
    "latency",
    "throughput",
    "batching",
    "tokenizer",
    "window",
    "capital",
    "france",
    "paris",
    "river",
    "learning",
    "deep",
]
MAX_TOKENS = 511  # one token past a 512-token model's text window, as the runtime asks


def one_by_one(tok: Tokenizer, texts: Sequence[str]) -> None:
    # The former path for a text longer than MAX_TOKENS characters (its first piece).
    piece = (MAX_TOKENS + 2) * 8 + 256
    kept = [tok.encode(text[:piece], add_special_tokens=False) for text in texts]
    assert len(kept) == len(texts)


def batched(tok: Tokenizer, texts: Sequence[str]) -> None:
    encode_bounded_many(tok, texts, MAX_TOKENS)


def measure(
    fn: Callable[[Tokenizer, Sequence[str]], None],
    tok: Tokenizer,
    texts: Sequence[str],
    concurrent: int,
) -> tuple[float, float]:
    """(wall seconds of `concurrent` requests at once, longest ticker stall in ms)."""
    stop = threading.Event()
    stalls: list[float] = []

    def ticker() -> None:
        while not stop.is_set():
            t = time.perf_counter()
            time.sleep(0.001)
            stalls.append(time.perf_counter() - t - 0.001)

    tick = threading.Thread(target=ticker)
    tick.start()
    workers = [threading.Thread(target=fn, args=(tok, texts)) for _ in range(concurrent)]
    t0 = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    wall = time.perf_counter() - t0
    stop.set()
    tick.join()
    return wall, 1000 * max(stalls, default=0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a model directory with tokenizer.json")
    parser.add_argument("--texts", type=int, default=500, help="texts per request")
    parser.add_argument("--chars", type=int, default=4000, help="characters per text")
    parser.add_argument("--concurrent", type=int, default=2, help="requests at once")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    tok = Tokenizer.from_file(os.path.join(args.model, "tokenizer.json"))
    rng = random.Random(0)
    texts = []
    for _ in range(args.texts):
        words: list[str] = []
        while sum(len(w) + 1 for w in words) < args.chars:
            words.append(rng.choice(WORDS))
        texts.append(" ".join(words)[: args.chars])
    variants = {"encode per text (before)": one_by_one, "encode_bounded_many (now)": batched}
    results: dict[str, dict[str, list[float]]] = {
        name: {"alone": [], "together": [], "stall": []} for name in variants
    }
    print(f"cpu: {os.cpu_count()} visible; {args.texts} texts x {args.chars} chars per request")
    for r in range(args.rounds):
        for name, fn in variants.items():  # interleaved: the machine's drift hits both
            # The stall with one request: a core is free, so only the GIL can hold the ticker.
            alone, stall = measure(fn, tok, texts, 1)
            together, _ = measure(fn, tok, texts, args.concurrent)
            results[name]["alone"].append(alone)
            results[name]["together"].append(together)
            results[name]["stall"].append(stall)
            print(
                f"round {r + 1} {name}: 1 request {alone * 1000:.0f} ms, "
                f"{args.concurrent} at once {together * 1000:.0f} ms, "
                f"longest stall beside 1 request {stall:.1f} ms"
            )
    before, now = (results[n] for n in variants)
    print("\nmedians (before / now):")
    for key, unit in (("alone", "ms"), ("together", "ms"), ("stall", "ms")):
        b = statistics.median(before[key]) * (1000 if unit == "ms" and key != "stall" else 1)
        n = statistics.median(now[key]) * (1000 if unit == "ms" and key != "stall" else 1)
        label = {"alone": "1 request", "together": f"{args.concurrent} at once"}.get(
            key, "longest stall of a 1 ms ticker beside 1 request"
        )
        print(f"  {label}: {b:.1f} / {n:.1f} {unit} = {b / n:.2f}x")


if __name__ == "__main__":
    main()
