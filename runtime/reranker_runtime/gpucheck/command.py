"""`reranker-runtime gpu-check`: one command that proves (or disproves) the GPU path.

    reranker-runtime gpu-check --out gpu-check-report          # on a CUDA machine, offline
    reranker-runtime gpu-check --device cpu --quick --out DIR  # the CPU self-test (CI)

Writes DIR/gpu-check.json and DIR/gpu-check.md: environment (GPU, driver, CUDA, PyTorch), dense
peak (datasheet table and a measured matmul), correctness of the padded and packed engines against
the fp32 per-pair reference (tiny XLM-R/RoBERTa/BERT and a random bge-reranker-large-shaped
model), engine throughput at 128/256/512 tokens per pair (padded vs packed, float16 vs bfloat16,
with and without CUDA graphs) and the server end to end at concurrency 64.

Exit codes: 0 all correctness checks passed; 1 a correctness check failed (the reports are
written); 2 no CUDA GPU for --device cuda (nothing is run) or a bad argument.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from reranker_runtime.gpucheck import checks
from reranker_runtime.gpucheck.models import Arch

SHAPE_CHOICES = ("tiny", "small", "base", "large")
# The server section's time besides its load (--server-seconds): the server's start and warm-up
# over the already loaded engine, and its warm-up requests; then 5 lone requests, its shutdown and
# 5 engine passes. Its load figures are written as soon as they exist, so a kill in the steps
# after the load keeps them.
SERVER_START_S = 15.0
SERVER_AFTER_LOAD_S = 15.0


def add_gpu_check_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "gpu-check",
        help="Check the GPU path: correctness, engine throughput, server end to end (JSON + Markdown report)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", default="gpu-check-report", help="report directory (created)")
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default: cuda)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="self-test: tiny models only, short runs (what CI runs on CPU); no GPU figures",
    )
    parser.add_argument(
        "--shape",
        choices=SHAPE_CHOICES,
        default=None,
        help="model shape for throughput and the server (default: large, i.e. bge-reranker-large; tiny with --quick)",
    )
    parser.add_argument(
        "--tokens", default=None, help="tokens per pair, comma-separated (default: 128,256,512)"
    )
    parser.add_argument(
        "--max-batch-tokens", type=int, default=16384, help="token budget of one pass"
    )
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default: 3)")
    parser.add_argument(
        "--seconds", type=float, default=None, help="seconds per measured run (default: 1.0)"
    )
    parser.add_argument("--concurrency", type=int, default=None, help="server load (default: 64)")
    parser.add_argument(
        "--server-seconds", type=float, default=None, help="server load duration (default: 20)"
    )
    parser.add_argument(
        "--dtypes",
        default=None,
        help="throughput dtypes (default: bfloat16,float16 on GPU, float32 on CPU)",
    )
    parser.add_argument(
        "--torch-compile",
        action="store_true",
        help="also measure the packed engine under torch.compile (minutes)",
    )
    parser.add_argument("--skip-server", action="store_true", help="no server end-to-end run")
    parser.add_argument(
        "--time-limit",
        type=float,
        default=330.0,
        help="seconds; later sections are skipped past it (default: 330)",
    )
    parser.set_defaults(func=run_gpu_check)
    return parser


_T0 = time.monotonic()


def _log(message: str) -> None:
    print(f"[gpu-check {time.monotonic() - _T0:6.1f}s] {message}", file=sys.stderr, flush=True)


def run_gpu_check(args: argparse.Namespace) -> int:
    device = args.device.strip().lower()
    if device != "cpu" and not (device == "cuda" or device.startswith("cuda:")):
        print(
            f"reranker-runtime gpu-check: error: --device {args.device!r}: use cuda, cuda:N or cpu",
            file=sys.stderr,
        )
        return 2
    import torch

    if device != "cpu" and not torch.cuda.is_available():
        print(
            "reranker-runtime gpu-check: error: no CUDA GPU is visible to PyTorch "
            f"(torch {torch.__version__}, built for CUDA {torch.version.cuda or 'none: a CPU-only build'}). "
            "Run it on a machine with an NVIDIA GPU and a CUDA build of PyTorch >= 2.10, or run the CPU "
            "self-test with --device cpu --quick (no GPU figures).",
            file=sys.stderr,
        )
        return 2
    if device == "cuda":
        device = f"cuda:{torch.cuda.current_device()}"
    logging.basicConfig(level=logging.WARNING)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()

    def checkpoint(partial: dict[str, Any]) -> None:
        write_reports(out_dir, {**partial, "wall_s": round(time.monotonic() - started, 1)})

    report = GpuCheck(args, device).run(checkpoint)
    report["wall_s"] = round(time.monotonic() - started, 1)
    report["complete"] = True
    write_reports(out_dir, report)
    _log(f"reports written: {out_dir / 'gpu-check.json'}, {out_dir / 'gpu-check.md'}")
    failed = [r for r in report["correctness"] if not r.get("ok")]
    if failed:
        _log(f"{len(failed)} correctness check(s) failed: see the report")
        return 1
    return 0


class GpuCheck:
    def __init__(self, args: argparse.Namespace, device: str) -> None:
        self.args = args
        self.device = device
        self.cpu = device == "cpu"
        self.quick = bool(args.quick)
        self.deadline = checks.Deadline(args.time_limit)
        self.shape = args.shape or ("tiny" if self.quick else "large")
        self.tokens = [
            int(t) for t in (args.tokens or ("128" if self.quick else "128,256,512")).split(",")
        ]
        self.rounds = args.rounds or (1 if self.quick else 3)
        self.seconds = args.seconds if args.seconds is not None else (0.05 if self.quick else 1.0)
        self.concurrency = args.concurrency or (8 if self.quick else 64)
        self.server_seconds = args.server_seconds or (1.0 if self.quick else 20.0)
        default_dtypes = "float32" if self.cpu else "bfloat16,float16"
        self.dtypes = (args.dtypes or default_dtypes).split(",")
        self.skipped: list[str] = []
        self.sync = checks.cuda_sync(device)

    # ------------------------------------------------------------------------------ sections

    def run(self, checkpoint: Callable[[dict[str, Any]], None] = lambda _: None) -> dict[str, Any]:
        """The sections in order; `checkpoint` gets the report so far after each one."""
        report: dict[str, Any] = {
            "complete": False,
            "mode": "cpu-self-test" if self.cpu else "gpu",
            "quick": self.quick,
            "note": (
                "CPU run: these figures are not GPU figures; the GPU sections (peak, CUDA graphs) are absent"
                if self.cpu
                else None
            ),
            "environment": checks.environment(self.device),
            "settings": {
                "shape": self.shape,
                "tokens_per_pair": self.tokens,
                "max_batch_tokens": self.args.max_batch_tokens,
                "rounds": self.rounds,
                "seconds_per_run": self.seconds,
                "dtypes": self.dtypes,
                "concurrency": self.concurrency,
                "server_seconds": self.server_seconds,
            },
        }
        report["skipped"] = self.skipped
        report["peak"] = self.peak()
        checkpoint(report)
        with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
            self.tmp = Path(tmp)
            report["correctness"] = self.correctness()
            checkpoint(report)
            report["throughput"] = self.throughput(report["peak"])
            checkpoint(report)

            def server_load_measured(partial: dict[str, Any]) -> None:
                report["server"] = partial
                checkpoint(report)

            report["server"] = self.server(report["throughput"], server_load_measured)
        return report

    def peak(self) -> dict[str, Any]:
        if self.cpu:
            return {}
        name = checks.environment(self.device)["gpu"]
        out: dict[str, Any] = {}
        for dtype in ("float16", "bfloat16"):
            measured = None
            try:
                measured = checks.measured_matmul_tflops(
                    self.device, dtype, 4096 if self.quick else 8192
                )
            except Exception as exc:
                _log(f"matmul {dtype} failed: {exc}")
            out[dtype] = {
                "datasheet_tflops": checks.known_peak(name, dtype),
                "matmul_tflops": measured,
            }
        _log(f"peak: {out}")
        return out

    def _model(self, arch: Arch, shape: str) -> Path:
        from reranker_runtime.gpucheck.models import LARGE, TINY, build_model

        path = self.tmp / f"{arch}-{shape}"
        if path.exists():
            return path
        import torch

        if shape == "tiny":
            return build_model(path, arch, TINY, initializer_range=0.5)
        from reranker_runtime.bench.model import SHAPES

        dims = LARGE if shape == "large" else SHAPES[shape]
        # Saved in float16 (half the disk and load time); the reference computes in float32.
        return build_model(path, arch, dims, dtype=torch.float16)

    def _engines(self, model_dir: Path, dtype: str, *, graphs: bool) -> dict[str, Any]:
        from reranker_runtime.engines.packed_engine import PackedEngine
        from reranker_runtime.engines.torch_engine import TorchEngine

        padded = TorchEngine.load(str(model_dir), device=self.device, dtype=dtype)
        engines: dict[str, Any] = {
            "padded": padded,
            "packed": PackedEngine.from_torch_engine(padded),
        }
        if graphs and not self.cpu:
            engines["packed+graphs"] = PackedEngine.from_torch_engine(padded, cuda_graphs=True)
        if self.args.torch_compile:
            engines["packed+compile"] = PackedEngine.from_torch_engine(padded, compile_model=True)
        return engines

    def correctness(self) -> list[dict[str, Any]]:
        models: list[tuple[Arch, str]] = [("xlmr", "tiny"), ("roberta", "tiny"), ("bert", "tiny")]
        if not self.cpu:
            models.append(("xlmr", "large"))
        else:
            self.skipped.append("correctness on the bge-reranker-large shape: GPU only")
        dtypes = ["float32"] if self.cpu else ["float32", "float16", "bfloat16"]
        rows: list[dict[str, Any]] = []
        for arch, shape in models:
            if self.deadline.left() < 60 and rows:
                self.skipped.append(f"correctness {arch}-{shape}: out of time")
                continue
            model_dir = self._model(arch, shape)
            per_query = 8
            n_queries = 8 if shape == "large" else 3 if self.quick else 6
            pairs = checks.workload_pairs(n_queries, per_query, seed=7)
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
            batch = checks.encode(tokenizer, pairs, min(512, int(tokenizer.model_max_length)))
            ref = checks.reference_logits(str(model_dir), batch, self.device)
            for dtype in dtypes:
                try:
                    baseline = None
                    if dtype != "float32":
                        half_ref = checks.reference_logits(
                            str(model_dir), batch, self.device, dtype
                        )
                        baseline = checks.compare(half_ref, ref, per_query)
                        _log(f"correctness baseline {arch}-{shape} {dtype}: {baseline}")
                    engines = self._engines(model_dir, dtype, graphs=dtype != "float32")
                except Exception as exc:  # a finding for this dtype; the others still run
                    rows.append(_load_error(f"{arch}-{shape}", dtype, exc))
                    continue
                for name, engine in engines.items():
                    row = checks.correctness_row(
                        f"{arch}-{shape}",
                        name,
                        dtype,
                        engine,
                        batch,
                        ref,
                        per_query,
                        cpu=self.cpu,
                        baseline=baseline,
                    )
                    rows.append(row)
                    _log(f"correctness {row}")
                del engines
                self._free()
        return rows

    def throughput(self, peak: dict[str, Any]) -> dict[str, Any]:
        from transformers import AutoConfig

        from reranker_runtime.bench.workload import make_request

        model_dir = self._model("xlmr", self.shape)
        config = AutoConfig.from_pretrained(str(model_dir))
        budget = self.args.max_batch_tokens
        rows: list[dict[str, Any]] = []
        ratios: list[dict[str, Any]] = []
        self.keep: dict[str, Any] = {}
        for dtype in self.dtypes:
            if self.deadline.left() < 90:
                self.skipped.append(f"throughput {dtype}: out of time")
                continue
            try:
                engines = self._engines(model_dir, dtype, graphs=True)
            except Exception as exc:
                error = _load_error(self.shape, dtype, exc)
                rows.append({"dtype": dtype, "tokens_per_pair": "all", "error": error["error"]})
                continue
            tokenizer = engines["padded"].tokenizer
            cls_id = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else 0
            sep_id = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else 2
            workloads: list[tuple[str, dict[str, list[Any]]]] = []
            for tokens in self.tokens:
                batch = checks.uniform_batch(tokens, budget, int(config.vocab_size), cls_id, sep_id)
                workloads.append((str(tokens), {name: [batch] for name in engines}))
            mixed_pairs = [
                p
                for i in range(2 if self.quick else 8 if self.cpu else 32)
                for p in make_request(11, i, n_passages=16, min_words=30, max_words=200).pairs()
            ]
            encoded = checks.encode(tokenizer, mixed_pairs, engines["padded"].info.max_input_length)
            workloads.append(
                (
                    "mixed",
                    {
                        name: checks.mixed_batches(encoded, budget, padded=name == "padded")
                        for name in engines
                    },
                )
            )
            for tokens_label, batches in workloads:
                if self.deadline.left() < 60:
                    self.skipped.append(f"throughput {dtype} {tokens_label} tokens: out of time")
                    continue
                configs = [checks.Config(name, engines[name], batches[name]) for name in engines]
                try:
                    results = checks.interleaved_throughput(
                        configs, self.rounds, self.seconds, self.sync
                    )
                except Exception as exc:
                    rows.append(
                        {
                            "dtype": dtype,
                            "tokens_per_pair": tokens_label,
                            "error": f"{type(exc).__name__}: {exc}",
                        }
                    )
                    _log(f"throughput {dtype} {tokens_label} failed: {exc}")
                    continue
                for name, r in results.items():
                    row = {"dtype": dtype, "tokens_per_pair": tokens_label, "engine": name, **r}
                    row.update(_ran_as(engines[name]))
                    if tokens_label != "mixed":
                        achieved = (
                            checks.flops_per_pair(config, int(tokens_label))
                            * r["pairs_per_s"]
                            / 1e12
                        )
                        row["tflops"] = achieved
                        p = peak.get(dtype) or {}
                        for key, source in (
                            ("pct_datasheet_peak", "datasheet_tflops"),
                            ("pct_matmul_peak", "matmul_tflops"),
                        ):
                            row[key] = 100 * achieved / p[source] if p.get(source) else None
                    rows.append(row)
                    _log(f"throughput {row}")
                ratio = checks.paired_ratios(results, "packed", "padded")
                if ratio:
                    ratios.append(
                        {
                            "dtype": dtype,
                            "tokens_per_pair": tokens_label,
                            "packed_over_padded": ratio,
                        }
                    )
            if dtype == self.dtypes[0]:
                self.keep = {"dtype": dtype, "engine": engines["packed"], "model_dir": model_dir}
            del engines
            self._free()
        return {
            "model_shape": self.shape,
            "max_batch_tokens": budget,
            "flop_convention": checks.FLOP_CONVENTION,
            "rows": rows,
            "ratios": ratios,
        }

    def server(
        self,
        throughput: dict[str, Any],
        on_load_measured: Callable[[dict[str, Any]], None] = lambda _: None,
    ) -> dict[str, Any] | None:
        """The server end to end. `on_load_measured` gets the section as soon as the load's
        figures exist (`"partial": true`, the lone-request ones still to come): the caller
        writes the reports then, so a kill in the steps after the load keeps them."""
        if self.args.skip_server:
            self.skipped.append("server: --skip-server")
            return None
        if not getattr(self, "keep", None):
            self.skipped.append("server: no engine measured")
            return None
        needed = SERVER_START_S + self.server_seconds + SERVER_AFTER_LOAD_S
        if self.deadline.left() < needed:
            self.skipped.append(
                f"server: out of time ({self.deadline.left():.0f} s left of --time-limit, "
                f"{needed:.0f} s needed)"
            )
            return None
        from reranker_runtime.config import ServeSettings

        engine = self.keep["engine"]
        dtype = self.keep["dtype"]
        settings = ServeSettings(
            model=str(self.keep["model_dir"]),
            device=self.device,
            dtype=dtype,
            max_batch_tokens=self.args.max_batch_tokens,
            max_client_batch_size=1000,
            max_concurrent_requests=1024,
            log_format="text",
            log_level="warning",
        )
        target = 256 if 256 in self.tokens else self.tokens[0]
        words = checks.words_for_tokens(engine.tokenizer, target, seed=5)
        engine_only = next(
            (
                r["pairs_per_s"]
                for r in throughput["rows"]
                if r.get("engine") == "packed"
                and r["dtype"] == dtype
                and r["tokens_per_pair"] == str(target)
            ),
            None,
        )

        def section(summary: dict[str, Any]) -> dict[str, Any]:
            summary.update(
                engine="packed",
                dtype=dtype,
                concurrency=self.concurrency,
                target_tokens_per_pair=target,
                engine_only_pairs_per_s=engine_only,
                server_over_engine=(summary["pairs_per_s"] / engine_only if engine_only else None),
            )
            return summary

        measured: dict[str, Any] = {}

        def load_measured(summary: dict[str, Any]) -> None:
            _log(f"server load {summary}")
            measured.update(section(summary), partial=True)
            try:
                on_load_measured(dict(measured))
            except Exception as exc:  # a report that cannot be written must not stop the check
                _log(f"writing the server's load figures failed: {exc}")

        try:
            summary = checks.server_end_to_end(
                engine,
                settings,
                concurrency=self.concurrency,
                duration_s=self.server_seconds,
                words=words,
                seed=5,
                # What is left of --time-limit once the load and what follows it have run.
                ready_within_s=max(
                    10.0, self.deadline.left() - self.server_seconds - SERVER_AFTER_LOAD_S
                ),
                # Waiting for the server to stop may not run past --time-limit.
                stop_by=self.deadline.end,
                on_load_measured=load_measured,
            )
        except Exception as exc:  # after the load, its figures stay (`partial`) with the error
            _log(f"server run failed: {exc}")
            return {**measured, "error": f"{type(exc).__name__}: {exc}"}
        section(summary)
        summary["lone_over_engine"] = (
            summary["lone_16_pair_ms"] / summary["lone_16_pair_engine_ms"]
            if summary["lone_16_pair_engine_ms"]
            else None
        )
        _log(f"server {summary}")
        return summary

    def _free(self) -> None:
        gc.collect()
        if not self.cpu:
            from reranker_runtime.engines.base import release_cached_memory

            release_cached_memory()


def _ran_as(engine: Any) -> dict[str, Any]:
    """What a throughput row really ran: the attention backend, and for the packed engine how
    many CUDA graphs it captured (a `packed+graphs` row whose captures failed ran eager)."""
    facts: dict[str, Any] = {"attention": engine.info.extra.get("attention")}
    facts.update(getattr(engine, "graph_stats", {}))
    return facts


def _load_error(model: str, dtype: str, exc: Exception) -> dict[str, Any]:
    _log(f"loading the engines for {model} {dtype} failed: {exc}")
    return {
        "model": model,
        "engine": "(loading)",
        "dtype": dtype,
        "ok": False,
        "error": f"{type(exc).__name__}: {exc}",
    }


def write_reports(out_dir: Path, report: dict[str, Any]) -> None:
    """Both reports, as far as the run has got (written after every section, so a run cut short
    by a time limit still reports what it measured; `complete` says whether it finished)."""
    from reranker_runtime.gpucheck.report import render_markdown

    _write_atomically(out_dir / "gpu-check.json", json.dumps(_json_safe(report), indent=2) + "\n")
    _write_atomically(out_dir / "gpu-check.md", render_markdown(report))


def _write_atomically(path: Path, text: str) -> None:
    # A kill (the outer `timeout`'s SIGTERM) mid-write leaves the previous report, not half of one.
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    os.replace(partial, path)


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, int | float | str | bool) or value is None:
        return value
    return str(value)
