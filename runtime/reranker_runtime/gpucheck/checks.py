"""The measurements of `reranker-runtime gpu-check`: environment, dense peak, correctness against
the fp32 per-pair reference, engine throughput, and the server end to end."""

from __future__ import annotations

import asyncio
import math
import os
import re
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from reranker_runtime.bench.command import cpu_model
from reranker_runtime.engines.base import EncodedPair, Engine
from reranker_runtime.engines.cuda_driver import host_driver_version

# Dense (no sparsity) fp16/bf16 tensor-core peaks in TFLOP/s from NVIDIA's datasheets, matched on
# the CUDA device name, first match wins (so each NVL/PCIe row precedes its SXM row). (fp16,
# bf16); None where the GPU has no bf16 tensor cores. NVIDIA's Hopper tables give the figures
# "with sparsity": the dense peak is half. A GPU missing here (H800, whose figures no NVIDIA
# datasheet at hand confirms; any newer GPU) gets no datasheet peak: the report shows the
# measured matmul instead.
KNOWN_PEAKS: tuple[tuple[str, float, float | None], ...] = (
    # NVIDIA H200 page, H200 NVL column: FP16/BF16 Tensor Core 1,671 TFLOPS with sparsity.
    (r"\bH200\b.*\bNVL\b", 835.0, 835.0),
    (r"\bH200\b", 989.0, 989.0),  # SXM: 1,979 with sparsity
    # GH200 Grace Hopper Superchip datasheet: FP16/BF16 Tensor Core 1,979 (sparse) | 990 dense,
    # for both its HBM3 (96 GB) and HBM3e (144 GB) versions. CUDA names it "NVIDIA GH200 480GB"
    # or "NVIDIA GH200 144G HBM3e"; \bH200\b does not match inside "GH200".
    (r"\bGH200\b", 990.0, 990.0),
    (r"\bH100\b.*\bNVL\b", 835.0, 835.0),
    (r"\bH100\b.*\bPCIe\b", 756.0, 756.0),
    (r"\bH100\b", 989.0, 989.0),  # SXM
    (r"\bA100\b", 312.0, 312.0),
    (r"\bL40S\b", 362.0, 362.0),
    (r"\bL4\b", 121.0, 121.0),
    (r"\bA10G\b", 70.0, 70.0),  # AWS does not publish it; the commonly cited figure
    (r"\bA10\b", 125.0, 125.0),
    (r"\bT4\b", 65.0, None),
)

# Score tolerances against the fp32 reference (sigmoid of the logit, so in [0, 1]).
SCORE_TOL = {"float32": 1e-4, "float16": 2e-2, "bfloat16": 5e-2}
SCORE_TOL_CPU_FP32 = 1e-5
MIN_CONCORDANCE = 0.95  # fraction of within-query orderings that agree with the reference
# In float16/bfloat16 a random model's scores can drift from fp32 past SCORE_TOL, and close scores
# swap, whatever the engine (CPU bfloat16 stand-in: transformers itself missed 0.05 and 0.95 on
# the tiny XLM-R and the large shape; on the test suite's tiny XLM-R its max score error is 0.2).
# The yardstick there is transformers at the same dtype, one pair at a time: an engine passes
# when its max score error and its mean logit error are within the tolerance or this factor of
# that baseline's, and its rank concordance at most this much below the baseline's. The mean
# catches an engine that is a little wrong everywhere, which one outlier pair would hide in a max.
BASELINE_FACTOR = 1.5
BASELINE_CONCORDANCE_SLACK = 0.03
MEAN_LOGIT_TOL = {"float16": 0.01, "bfloat16": 0.05}


class Deadline:
    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


def known_peak(gpu_name: str, dtype: str) -> float | None:
    for pattern, fp16, bf16 in KNOWN_PEAKS:
        if re.search(pattern, gpu_name):
            return fp16 if dtype == "float16" else bf16
    return None


def environment(device: str) -> dict[str, Any]:
    import platform

    import torch

    import reranker_runtime

    env: dict[str, Any] = {
        "device": device,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "reranker_runtime": reranker_runtime.__version__,
        "varlen_attn": _has_varlen(),
        "cpu": cpu_model(),
        "torch_threads": torch.get_num_threads(),
    }
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(device))
        env.update(
            gpu=props.name,
            compute_capability=f"{props.major}.{props.minor}",
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            driver=host_driver_version(),
            cudnn=torch.backends.cudnn.version(),
        )
    return env


def _has_varlen() -> bool:
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


def measured_matmul_tflops(device: str, dtype_name: str, size: int = 8192) -> float:
    """Dense matmul throughput (TFLOP/s): the best of a few timed [size x size] products."""
    import torch

    dtype = getattr(torch, dtype_name)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize(device)
    best = math.inf
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(10):
            a @ b
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3 / 10)
    del a, b
    return 2 * size**3 / best / 1e12


# What a throughput row's TFLOP/s counts (stated in both reports).
FLOP_CONVENTION = (
    "model FLOPs: the full forward pass of every layer for every token (linear layers and "
    "attention, 2 FLOPs per multiply-add; the head left out), counted the same for every engine "
    "whatever it skips or pads, as MFU counts them. The packed engine's last layer runs its "
    "output projection and FFN for each pair's first token only (about 3% of bge-reranker-"
    "large's FLOPs at 256 tokens), so its hardware FLOP/s are that much below the figure; "
    "TFLOP/s ranks the engines exactly as pairs/s does."
)


def flops_per_pair(config: Any, tokens: int) -> float:
    """Model FLOPs of one `tokens`-token sequence's forward pass: linear layers and attention of
    every layer, in full, for every token (the head is negligible). One count for every engine
    (FLOP_CONVENTION): not what an engine executes, what the model needs, so padded and packed
    compare like pairs/s. bge-reranker-large at 256 tokens: ~161 GFLOP."""
    h, i, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    per_token_layer = 2 * (4 * h * h + 2 * h * i) + 4 * tokens * h
    return float(layers * tokens * per_token_layer)


# ------------------------------------------------------------------------------ correctness


def workload_pairs(n_queries: int, texts_per_query: int, seed: int) -> list[tuple[str, str]]:
    from reranker_runtime.bench.workload import make_request

    pairs: list[tuple[str, str]] = []
    for i in range(n_queries):
        req = make_request(seed, i, n_passages=texts_per_query, min_words=3, max_words=160)
        pairs += req.pairs()
    return pairs


def encode(tokenizer: Any, pairs: Sequence[tuple[str, str]], max_len: int) -> list[EncodedPair]:
    out = []
    for query, text in pairs:
        enc = tokenizer(query, text, truncation="only_second", max_length=max_len)
        out.append(EncodedPair(enc["input_ids"], enc.get("token_type_ids")))
    return out


def reference_logits(
    model_dir: str, batch: Sequence[EncodedPair], device: str, dtype: str = "float32"
) -> np.ndarray:
    """The model's forward pass (transformers) on each sequence alone, no batching: the fp32
    reference, or (another dtype) the baseline a half-precision engine is held to."""
    import torch
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(
        model_dir, dtype=getattr(torch, dtype)
    )
    model.to(device).eval()
    rows = []
    with torch.inference_mode():
        for pair in batch:
            ids = torch.tensor([pair.input_ids], device=device)
            kwargs = {}
            if pair.token_type_ids is not None:
                kwargs["token_type_ids"] = torch.tensor([pair.token_type_ids], device=device)
            rows.append(model(input_ids=ids, **kwargs).logits[0].float().cpu().numpy())
    del model
    return np.stack(rows)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))


def compare(logits: np.ndarray, ref: np.ndarray, texts_per_query: int) -> dict[str, float]:
    """max |Δ| of scores and logits, and rank agreement within each query's texts."""
    got, want = logits[:, 0], ref[:, 0]
    concordant = total = top1 = queries = 0
    for start in range(0, len(want), texts_per_query):
        g, w = got[start : start + texts_per_query], want[start : start + texts_per_query]
        queries += 1
        top1 += int(np.argmax(g) == np.argmax(w))
        for a in range(len(w)):
            for b in range(a + 1, len(w)):
                if w[a] != w[b]:
                    total += 1
                    concordant += int((g[a] - g[b]) * (w[a] - w[b]) > 0)
    return {
        "max_abs_score_delta": float(np.max(np.abs(_sigmoid(got) - _sigmoid(want)))),
        "max_abs_logit_delta": float(np.max(np.abs(got - want))),
        "mean_abs_logit_delta": float(np.mean(np.abs(got - want))),
        "rank_concordance": concordant / total if total else 1.0,
        "top1_agreement": top1 / queries if queries else 1.0,
        "reference_score_spread": float(np.ptp(_sigmoid(want))),
    }


def correctness_row(
    model_name: str,
    engine_name: str,
    dtype: str,
    engine: Engine,
    batch: Sequence[EncodedPair],
    ref: np.ndarray,
    texts_per_query: int,
    *,
    cpu: bool,
    baseline: dict[str, float] | None = None,
) -> dict[str, Any]:
    """One engine at one dtype against the fp32 reference. `baseline`: `compare()` of
    transformers itself at this dtype, pair by pair (half precision only; see BASELINE_FACTOR)."""
    row: dict[str, Any] = {"model": model_name, "engine": engine_name, "dtype": dtype}
    try:
        logits = engine.score(batch)
    except Exception as exc:  # a failing engine is a finding, not a crash of the check
        row.update(ok=False, error=f"{type(exc).__name__}: {exc}")
        return row
    row.update(compare(logits, ref, texts_per_query))
    tol = SCORE_TOL_CPU_FP32 if (cpu and dtype == "float32") else SCORE_TOL[dtype]
    row["tolerance"] = tol
    if baseline is None:
        row["allowed_score_delta"] = tol
        row["ok"] = bool(
            row["max_abs_score_delta"] <= tol
            and (dtype == "float32" or row["rank_concordance"] >= MIN_CONCORDANCE)
        )
        return row
    allowed = max(tol, BASELINE_FACTOR * baseline["max_abs_score_delta"])
    allowed_mean = max(MEAN_LOGIT_TOL[dtype], BASELINE_FACTOR * baseline["mean_abs_logit_delta"])
    min_concordance = min(
        MIN_CONCORDANCE, baseline["rank_concordance"] - BASELINE_CONCORDANCE_SLACK
    )
    row.update(
        baseline_max_abs_score_delta=baseline["max_abs_score_delta"],
        baseline_mean_abs_logit_delta=baseline["mean_abs_logit_delta"],
        baseline_rank_concordance=baseline["rank_concordance"],
        allowed_score_delta=allowed,
        allowed_mean_logit_delta=allowed_mean,
        min_rank_concordance=min_concordance,
        ok=bool(
            row["max_abs_score_delta"] <= allowed
            and row["mean_abs_logit_delta"] <= allowed_mean
            and row["rank_concordance"] >= min_concordance
        ),
    )
    return row


# ------------------------------------------------------------------------------- throughput


def uniform_batch(tokens: int, budget: int, vocab: int, cls: int, sep: int) -> list[EncodedPair]:
    """budget // tokens sequences of exactly `tokens` tokens (random ids, fixed seed)."""
    rng = np.random.default_rng(tokens)
    n = max(1, budget // tokens)
    body = rng.integers(5, vocab, size=(n, max(0, tokens - 2))).tolist()
    return [EncodedPair([cls, *row, sep][:tokens]) for row in body]


def mixed_batches(
    lengths_pairs: Sequence[EncodedPair], budget: int, padded: bool
) -> list[list[EncodedPair]]:
    """Realistic batches: pairs sorted longest first, cut by the engine's cost model (padded:
    longest x n; packed: sum), as the batcher forms them under load."""
    ordered = sorted(lengths_pairs, key=len, reverse=True)
    batches: list[list[EncodedPair]] = []
    current: list[EncodedPair] = []
    for pair in ordered:
        trial = [*current, pair]
        cost = max(map(len, trial)) * len(trial) if padded else sum(map(len, trial))
        if current and cost > budget:
            batches.append(current)
            current = [pair]
        else:
            current = trial
    if current:
        batches.append(current)
    return batches


@dataclass
class Config:
    label: str
    engine: Engine
    batches: list[list[EncodedPair]]


def interleaved_throughput(
    configs: Sequence[Config], rounds: int, seconds_per_run: float, sync: Callable[[], None]
) -> dict[str, dict[str, Any]]:
    """Each round runs every configuration once (for `seconds_per_run`, at least one pass over
    its batches), so a noisy neighbour slows all of them alike; returns per-config medians."""
    for c in configs:  # warm-up: allocator growth, kernel choice, CUDA graph capture
        for b in c.batches:
            c.engine.score(b)
    sync()
    runs: dict[str, list[tuple[float, float]]] = {c.label: [] for c in configs}
    for _ in range(rounds):
        for c in configs:
            pairs = tokens = 0
            start = time.perf_counter()
            while True:
                for b in c.batches:
                    c.engine.score(b)
                    pairs += len(b)
                    tokens += sum(len(p) for p in b)
                sync()
                elapsed = time.perf_counter() - start
                if elapsed >= seconds_per_run:
                    break
            runs[c.label].append((pairs / elapsed, tokens / elapsed))
    return {
        label: {
            "pairs_per_s": statistics.median(r[0] for r in values),
            "tokens_per_s": statistics.median(r[1] for r in values),
            "pairs_per_s_runs": [round(r[0], 2) for r in values],
        }
        for label, values in runs.items()
    }


def paired_ratios(
    results: dict[str, dict[str, Any]], numerator: str, denominator: str
) -> dict[str, float] | None:
    """Per-round ratio numerator/denominator (same round = same machine conditions)."""
    if numerator not in results or denominator not in results:
        return None
    num, den = results[numerator]["pairs_per_s_runs"], results[denominator]["pairs_per_s_runs"]
    ratios = [a / b for a, b in zip(num, den, strict=True) if b > 0]
    if not ratios:
        return None
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}


# --------------------------------------------------------------------------- server end to end


def serve_in_thread(settings: Any, engine: Engine, port: int) -> tuple[Any, threading.Thread]:
    """The real app (uvicorn, HTTP on loopback) over an already loaded engine."""
    import uvicorn

    from reranker_runtime.api.app import create_app

    app = create_app(settings, engine=engine)
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, access_log=False)
    )
    thread = threading.Thread(target=server.run, name="gpu-check-server", daemon=True)
    thread.start()
    return server, thread


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def words_for_tokens(tokenizer: Any, target_tokens: int, seed: int) -> int:
    """Passage length in words that gives pairs of about `target_tokens` tokens."""
    from reranker_runtime.bench.workload import make_request

    probe = make_request(seed, 0, n_passages=4, min_words=100, max_words=100)
    per_pair = [len(tokenizer(q, t)["input_ids"]) for q, t in probe.pairs()]
    query_tokens = len(tokenizer(probe.query)["input_ids"])
    per_word = (statistics.mean(per_pair) - query_tokens) / 100
    return max(1, round((target_tokens - query_tokens) / max(per_word, 0.1)))


def server_end_to_end(
    engine: Engine,
    settings: Any,
    *,
    concurrency: int,
    duration_s: float,
    words: int,
    seed: int,
    ready_within_s: float = 300.0,
    stop_by: float | None = None,
    on_load_measured: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Closed-loop load at `concurrency` (requests of 16 texts), then a lone 16-text request
    timed over HTTP and against the engine alone on the same pairs. A server that is not ready
    within `ready_within_s`, or whose thread has ended (its start-up failed), is an error.
    `on_load_measured` gets the load's summary as soon as it is measured (before the lone
    requests, the server's shutdown and the engine-only timing), so a caller can save it where a
    kill would otherwise lose it. The shutdown is awaited for at most 60 s, and not past
    `stop_by` (time.monotonic()) where given."""
    import httpx

    from reranker_runtime.bench.client import drive, make_client, summarize
    from reranker_runtime.bench.workload import make_request

    def request(i: int) -> Any:
        return make_request(seed, i, n_passages=16, min_words=words, max_words=words)

    def lone_batch() -> list[EncodedPair]:  # the lone request's pairs, as the server encodes them
        return encode(engine.tokenizer, request(10**6).pairs(), engine.info.max_input_length)

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server, thread = serve_in_thread(settings, engine, port)

    async def run() -> dict[str, Any]:
        ready_by = time.monotonic() + ready_within_s
        async with httpx.AsyncClient(trust_env=False) as probe:
            while True:
                try:
                    if (await probe.get(f"{url}/health")).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if not thread.is_alive():
                    raise RuntimeError("the server stopped before it was ready (see its log)")
                if time.monotonic() > ready_by:
                    raise RuntimeError(f"the server was not ready within {ready_within_s:.0f} s")
                await asyncio.sleep(0.05)
        async with make_client(concurrency, 600) as client:
            await drive(client, url, request, concurrency, n_requests=concurrency)  # warm-up
            results, wall = await drive(client, url, request, concurrency, duration_s=duration_s)
            summary = summarize([s for _, s in results], wall)
            summary["tokens_per_pair"] = statistics.mean(len(p) for p in lone_batch())
            if on_load_measured is not None:
                on_load_measured(dict(summary))
            lone = []
            for i in range(5):
                start = time.perf_counter()
                resp = await client.post(f"{url}/rerank", json=request(10**6 + i).body())
                resp.raise_for_status()
                lone.append(time.perf_counter() - start)
        summary["lone_16_pair_ms"] = statistics.median(lone) * 1e3
        return summary

    try:
        summary = asyncio.run(run())
    finally:
        server.should_exit = True
        limit = 60.0 if stop_by is None else min(60.0, stop_by - time.monotonic())
        thread.join(timeout=max(1.0, limit))
    batch = lone_batch()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        engine.score(batch)
        times.append(time.perf_counter() - start)
    summary["lone_16_pair_engine_ms"] = statistics.median(times) * 1e3
    return summary


def cuda_sync(device: str) -> Callable[[], None]:
    if not device.startswith("cuda"):
        return lambda: None
    import torch

    return lambda: torch.cuda.synchronize(torch.device(device))


def default_threads() -> int | None:
    value = os.environ.get("OMP_NUM_THREADS")
    return int(value) if value and value.isdigit() else None
