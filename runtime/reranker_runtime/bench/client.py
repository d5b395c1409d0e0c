"""HTTP side of the benchmark: drive /rerank with a bounded number of workers, and the report math.

Closed-loop load: `concurrency` workers each send one request, wait for its answer, send the
next. The run stops by itself after `n_requests` requests or once `duration_s` has passed (the
requests in flight then finish and count). Nothing is retried; every failure is counted by kind.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import math
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx

from reranker_runtime.bench.workload import RerankRequest


@dataclass(frozen=True)
class Sample:
    """One request's outcome. `start` is seconds since the run began."""

    start: float
    latency_s: float
    pairs: int
    status: int | None  # HTTP status; None when no response came (connection error, timeout)
    tokens: int | None = None  # x-compute-tokens
    error: str | None = None  # error kind: "http_<status>" or the exception's class name
    # The server's own account (TEI headers, ms): compute, tokenization, queue, inference.
    server_ms: dict[str, float] | None = None

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.error is None


def check_loopback(url: str) -> None:
    """The benchmark only talks to a server on this machine (it measures the server, not a net)."""
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return
    try:
        if ipaddress.ip_address(host).is_loopback:
            return
    except ValueError:
        pass
    raise ValueError(
        f"--url must point at a loopback address (127.0.0.1, ::1, localhost), got {url!r}"
    )


def make_client(concurrency: int, timeout_s: float) -> httpx.AsyncClient:
    limits = httpx.Limits(
        max_connections=concurrency + 2, max_keepalive_connections=concurrency + 2
    )
    # trust_env=False: no proxy from the environment on a loopback benchmark.
    return httpx.AsyncClient(timeout=httpx.Timeout(timeout_s), limits=limits, trust_env=False)


TIMING_HEADERS = {
    "x-compute-time": "compute",
    "x-tokenization-time": "tokenization",
    "x-queue-time": "queue",
    "x-inference-time": "inference",
}


def _timings(headers: httpx.Headers) -> dict[str, float] | None:
    out = {}
    for header, key in TIMING_HEADERS.items():
        value = headers.get(header)
        try:
            if value is not None:
                out[key] = float(value)
        except ValueError:
            pass
    return out or None


def _header_int(headers: httpx.Headers, name: str) -> int | None:
    value = headers.get(name)
    try:
        return int(float(value)) if value is not None else None
    except ValueError:
        return None


async def send(
    client: httpx.AsyncClient, url: str, req: RerankRequest, t0: float, **extra: Any
) -> Sample:
    """POST one /rerank request; never raises (a failure becomes a Sample with `error`)."""
    start = time.perf_counter()
    status: int | None = None
    tokens: int | None = None
    error: str | None = None
    timings: dict[str, float] | None = None
    try:
        resp = await client.post(f"{url}/rerank", json=req.body(**extra))
        status = resp.status_code
        tokens = _header_int(resp.headers, "x-compute-tokens")
        timings = _timings(resp.headers)
        if status != 200:
            error = f"http_{status}"
        else:
            body = resp.json()
            if not isinstance(body, list) or len(body) != len(req.texts):
                error = "bad_response"
    except httpx.HTTPError as exc:
        error = type(exc).__name__
    end = time.perf_counter()
    return Sample(start - t0, end - start, len(req.texts), status, tokens, error, timings)


async def drive(
    client: httpx.AsyncClient,
    url: str,
    make_request: Callable[[int], RerankRequest],
    concurrency: int,
    n_requests: int | None = None,
    duration_s: float | None = None,
) -> tuple[list[tuple[int, Sample]], float]:
    """Closed-loop load. Returns ([(request index, sample)] in completion order, wall seconds)."""
    if n_requests is None and duration_s is None:
        raise ValueError("give n_requests or duration_s")
    counter = iter(range(10**12))
    results: list[tuple[int, Sample]] = []
    t0 = time.perf_counter()

    async def worker() -> None:
        while True:
            i = next(counter)
            if n_requests is not None and i >= n_requests:
                return
            if duration_s is not None and time.perf_counter() - t0 >= duration_s:
                return
            req = make_request(i)
            results.append((i, await send(client, url, req, t0)))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results, time.perf_counter() - t0


async def sequential_latencies(
    client: httpx.AsyncClient, url: str, req: RerankRequest, repeats: int, warmup: int = 2
) -> list[Sample]:
    """The same request sent `warmup + repeats` times, one at a time; the measured samples."""
    for _ in range(warmup):
        await send(client, url, req, time.perf_counter())
    out = []
    for _ in range(repeats):
        out.append(await send(client, url, req, time.perf_counter()))
    return out


async def fairness_round(
    client: httpx.AsyncClient, url: str, large: RerankRequest, small: RerankRequest, delay_s: float
) -> dict[str, Any]:
    """Send `large`, then `small` after `delay_s`; time both from their own send."""
    t0 = time.perf_counter()
    large_task = asyncio.create_task(send(client, url, large, t0))
    await asyncio.sleep(delay_s)
    small_sample = await send(client, url, small, t0)
    large_sample = await large_task
    large_end = large_sample.start + large_sample.latency_s
    small_end = small_sample.start + small_sample.latency_s
    return {
        "large_ms": large_sample.latency_s * 1e3,
        "small_ms": small_sample.latency_s * 1e3,
        "small_sent_after_ms": small_sample.start * 1e3,
        "ratio": small_sample.latency_s / large_sample.latency_s
        if large_sample.latency_s
        else math.nan,
        # The case only means something when the small request was sent while the large one was
        # still being scored.
        "overlapped": small_sample.start < large_end,
        "small_finished_first": small_end < large_end,
        "ok": large_sample.ok and small_sample.ok,
        "errors": [s.error for s in (large_sample, small_sample) if s.error],
        "small_server_ms": small_sample.server_ms,
        "large_server_ms": large_sample.server_ms,
    }


async def get_info(client: httpx.AsyncClient, url: str) -> dict[str, Any]:
    try:
        resp = await client.get(f"{url}/info")
        return resp.json() if resp.status_code == 200 else {}
    except (httpx.HTTPError, ValueError):
        return {}


async def wait_healthy(url: str, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient(timeout=5.0, trust_env=False) as client:
        while time.monotonic() < deadline:
            try:
                if (await client.get(f"{url}/health")).status_code == 200:
                    return True
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.2)
    return False


# --- report math -----------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """q-th percentile (0..100) with linear interpolation between closest ranks (numpy's
    default); NaN for no values."""
    if not values:
        return math.nan
    if not 0 <= q <= 100:
        raise ValueError("q must be within 0..100")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(samples: Sequence[Sample], wall_s: float) -> dict[str, Any]:
    """Throughput over the run's wall time (successful requests only) and latency percentiles."""
    ok = [s for s in samples if s.ok]
    pairs = sum(s.pairs for s in ok)
    token_values = [s.tokens for s in ok if s.tokens is not None]
    tokens = sum(token_values) if token_values and len(token_values) == len(ok) else None
    lat_ms = [s.latency_s * 1e3 for s in ok]
    server_ms: dict[str, float] = {}
    for key in TIMING_HEADERS.values():
        values = [s.server_ms[key] for s in ok if s.server_ms and key in s.server_ms]
        if values:
            server_ms[key] = sum(values) / len(values)
    errors = Counter(s.error or "ok" for s in samples)
    errors.pop("ok", None)
    return {
        "requests": len(samples),
        "ok": len(ok),
        "errors": dict(sorted(errors.items())),
        "pairs": pairs,
        "tokens": tokens,
        "wall_s": wall_s,
        "requests_per_s": len(ok) / wall_s if wall_s > 0 else math.nan,
        "pairs_per_s": pairs / wall_s if wall_s > 0 else math.nan,
        "tokens_per_s": tokens / wall_s if tokens is not None and wall_s > 0 else None,
        "latency_ms": {
            "p50": percentile(lat_ms, 50),
            "p90": percentile(lat_ms, 90),
            "p99": percentile(lat_ms, 99),
            "mean": sum(lat_ms) / len(lat_ms) if lat_ms else math.nan,
            "max": max(lat_ms) if lat_ms else math.nan,
        },
        # Mean of the server's timing headers over the successful requests (ms).
        "server_ms_mean": server_ms,
    }


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if (
        numerator is None
        or denominator in (None, 0)
        or math.isnan(numerator)
        or math.isnan(denominator)
    ):
        return None
    return numerator / denominator


# --- the server's own counters (Prometheus, TEI names) ---------------------------------------

_METRICS = (
    "te_batch_next_size_count",  # forward passes
    "te_batch_next_size_sum",  # pairs in them
    "te_batch_next_tokens_sum",  # tokens they cost (padded: longest x n)
    "reranker_batch_inference_duration_seconds_sum",  # seconds the engine was busy
    "te_request_input_length_sum",  # real tokens of the requests
)


async def scrape_metrics(client: httpx.AsyncClient, url: str) -> dict[str, float] | None:
    """The server's batch counters from /metrics (None when it has none of them)."""
    try:
        resp = await client.get(f"{url}/metrics")
    except httpx.HTTPError:
        return None
    if resp.status_code != 200:
        return None
    out: dict[str, float] = {}
    for line in resp.text.splitlines():
        if line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        base = name.split("{", 1)[0]
        if base in _METRICS:
            with contextlib.suppress(ValueError):
                out[base] = out.get(base, 0.0) + float(value)
    return out or None


def batch_stats(
    before: dict[str, float] | None, after: dict[str, float] | None, wall_s: float
) -> dict[str, Any] | None:
    """What the server's batcher did between two scrapes: batch sizes, padding, busy time."""
    if not before or not after:
        return None
    d = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in _METRICS}
    batches = d["te_batch_next_size_count"]
    if batches <= 0:
        return None
    padded = d["te_batch_next_tokens_sum"]
    real = d["te_request_input_length_sum"]
    busy = d["reranker_batch_inference_duration_seconds_sum"]
    return {
        "batches": int(batches),
        "pairs_per_batch": d["te_batch_next_size_sum"] / batches,
        "tokens_per_batch": padded / batches,
        "seconds_per_batch": busy / batches,
        # Real tokens / tokens computed: 1.0 = no padding (the lone/fairness phases are excluded).
        "padding_efficiency": real / padded if padded > 0 else None,
        "engine_busy_fraction": busy / wall_s if wall_s > 0 else None,
        "computed_tokens_per_s": padded / busy if busy > 0 else None,
    }
