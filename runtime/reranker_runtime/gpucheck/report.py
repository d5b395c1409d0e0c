"""The Markdown rendering of a gpu-check report (the JSON report holds the same data)."""

from __future__ import annotations

from typing import Any

from reranker_runtime.gpucheck.checks import FLOP_CONVENTION


def _f(value: Any, fmt: str = ".1f") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return format(value, fmt)
    return str(value)


def ran_as(row: dict[str, Any]) -> str:
    """`varlen, 12 CUDA graphs`; a graphed engine that captured none says it ran eager."""
    parts = [str(row["attention"])] if row.get("attention") else []
    if row.get("graph_capture_error"):
        parts.append(f"EAGER: graph capture failed ({row['graph_capture_error'][:120]})")
    elif row.get("graphs_enabled") or row.get("graphs_captured"):
        captured = row.get("graphs_captured") or 0
        parts.append(f"{captured} CUDA graphs" if captured else "EAGER: no CUDA graph captured")
    return ", ".join(parts).replace("|", "/")


def render_markdown(r: dict[str, Any]) -> str:
    env = r["environment"]
    lines = ["# reranker-runtime gpu-check", ""]
    if r.get("complete") is False:
        lines += [
            "> **Incomplete**: the run stopped (or is still running) after the sections below.",
            "",
        ]
    if r.get("note"):
        lines += [f"> {r['note']}", ""]
    lines += ["## Environment", "", "| | |", "|---|---|"]
    for key in (
        "gpu",
        "compute_capability",
        "gpu_memory_gib",
        "driver",
        "torch",
        "torch_cuda",
        "cudnn",
        "varlen_attn",
        "cpu",
        "torch_threads",
        "python",
        "reranker_runtime",
    ):
        if key in env:
            lines.append(f"| {key} | {_f(env[key])} |")
    lines += [
        "",
        f"Mode: {r['mode']}{' (quick)' if r.get('quick') else ''}; wall time {_f(r.get('wall_s'))} s.",
        "",
    ]

    if r.get("peak"):
        lines += [
            "## Dense peak (TFLOP/s)",
            "",
            "| dtype | datasheet | measured matmul |",
            "|---|---|---|",
        ]
        for dtype, p in r["peak"].items():
            lines.append(
                f"| {dtype} | {_f(p.get('datasheet_tflops'))} | {_f(p.get('matmul_tflops'))} |"
            )
        lines.append("")

    if "correctness" in r:
        lines += [
            "## Correctness against the fp32 per-pair reference",
            "",
            "float32: an engine passes within the score tolerance. float16/bfloat16: against "
            "the baseline of transformers itself at that dtype, pair by pair (a random model "
            "drifts from fp32 in half precision whatever runs it): max score delta and mean "
            "logit delta within the tolerance or 1.5x the baseline's, rank concordance at most "
            "0.03 below the baseline's (at least 0.95 where the baseline reaches 0.98).",
            "",
            "| model | engine | dtype | max abs score delta | max abs logit delta | rank concordance "
            "| mean abs logit delta | top-1 | baseline: score delta / mean logit delta / "
            "concordance | allowed score delta | ok |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
    for c in r.get("correctness", []):
        if "error" in c:
            lines.append(
                f"| {c['model']} | {c['engine']} | {c['dtype']} | error: {c['error']} | | | | | | | no |"
            )
            continue
        baseline = (
            f"{c['baseline_max_abs_score_delta']:.2e} / {c['baseline_mean_abs_logit_delta']:.2e} / "
            f"{c['baseline_rank_concordance']:.3f}"
            if "baseline_max_abs_score_delta" in c
            else "-"
        )
        lines.append(
            f"| {c['model']} | {c['engine']} | {c['dtype']} | {c['max_abs_score_delta']:.2e} | "
            f"{c['max_abs_logit_delta']:.2e} | {c['rank_concordance']:.3f} | "
            f"{c['mean_abs_logit_delta']:.2e} | {c['top1_agreement']:.2f} | "
            f"{baseline} | {c['allowed_score_delta']:.1e} | {'yes' if c['ok'] else '**NO**'} |"
        )
    lines.append("")

    t = r.get("throughput") or {}
    if t.get("rows"):
        lines += [
            f"## Engine throughput ({t['model_shape']} shape, budget {t['max_batch_tokens']} tokens per pass)",
            "",
            "Engine only (no HTTP): median over interleaved rounds. `mixed` = realistic pairs (30-200 "
            "words) cut into batches by each engine's cost model.",
            "",
            f"TFLOP/s counts {t.get('flop_convention') or FLOP_CONVENTION}",
            "",
            "| dtype | tokens/pair | engine | ran as | pairs/s | tokens/s | TFLOP/s | % datasheet peak | % matmul peak |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for row in t["rows"]:
            if "error" in row:
                lines.append(
                    f"| {row['dtype']} | {row['tokens_per_pair']} | error: {row['error']} | | | | | | |"
                )
                continue
            lines.append(
                f"| {row['dtype']} | {row['tokens_per_pair']} | {row['engine']} | {ran_as(row)} | "
                f"{_f(row['pairs_per_s'])} | "
                f"{_f(row['tokens_per_s'], '.0f')} | {_f(row.get('tflops'))} | "
                f"{_f(row.get('pct_datasheet_peak'))} | {_f(row.get('pct_matmul_peak'))} |"
            )
        lines.append("")
        if t.get("ratios"):
            lines += ["Packed over padded, per round (same conditions): median [min, max]", ""]
            for q in t["ratios"]:
                x = q["packed_over_padded"]
                lines.append(
                    f"- {q['dtype']}, {q['tokens_per_pair']} tokens/pair: {x['median']:.2f}x "
                    f"[{x['min']:.2f}, {x['max']:.2f}]"
                )
            lines.append("")

    s = r.get("server")
    if s:
        lines += ["## Server end to end", ""]
        if "error" in s:
            lines.append(f"error: {s['error']}")
        if "pairs_per_s" in s:  # the load ran (an error may have come after it)
            if "error" in s:
                lines.append("")
            lat = s["latency_ms"]
            lines += [
                f"Packed engine, {s['dtype']}, concurrency {s['concurrency']}, requests of 16 texts of "
                f"~{_f(s['tokens_per_pair'], '.0f')} tokens per pair, {_f(s['wall_s'])} s:",
                "",
                f"- {_f(s['pairs_per_s'])} pairs/s, p50 {_f(lat['p50'])} ms, p99 {_f(lat['p99'])} ms, "
                f"errors {s['errors'] or 'none'}",
                f"- server / engine-only throughput at {s['target_tokens_per_pair']} tokens: "
                f"{_f(s['server_over_engine'], '.2f')}",
            ]
            if s.get("partial"):
                lines.append(
                    "- lone 16-pair request: not measured (the section stopped, or is still "
                    "running, after the load)"
                )
            else:
                lines.append(
                    f"- lone 16-pair request {_f(s.get('lone_16_pair_ms'))} ms vs engine "
                    f"{_f(s.get('lone_16_pair_engine_ms'))} ms ({_f(s.get('lone_over_engine'), '.2f')}x)"
                )
        lines.append("")
    if r.get("skipped"):
        lines += ["## Skipped", ""] + [f"- {x}" for x in r["skipped"]] + [""]
    return "\n".join(lines)
