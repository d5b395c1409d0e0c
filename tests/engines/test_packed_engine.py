"""Packed (padding-free) PyTorch engine: scores against the fp32 per-pair reference.

CPU tests run the grouped and nested attention backends for real and the varlen backend (CUDA
only) through an exact emulation of `varlen_attn`, including the padded static layout the CUDA
graphs replay. GPU tests (marked `gpu`) check float16/bfloat16 against the fp32 reference.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from reranker_runtime.config import ServeSettings
from reranker_runtime.engines import base, factory, packed_engine
from reranker_runtime.engines.base import EncodedPair, release_cached_memory
from reranker_runtime.engines.packed_engine import PackedEngine, family_facts, pack
from reranker_runtime.engines.torch_engine import TorchEngine
from reranker_runtime.errors import ModelLoadError
from tiny_models import TINY_MAX_TOKENS, build_tiny_model, corpus, mixed_pairs, reference_logits

SCORE_TOL = 1e-5  # on sigmoid scores (the bar)
LOGIT_TOL = 1e-4  # raw logits of a few units: float summation order differs from the reference

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def sigmoid(x: Any) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))


@pytest.fixture(scope="session")
def roberta_reranker(tiny_models_dir: Path) -> Path:
    return build_tiny_model("roberta-reranker", tiny_models_dir / "roberta-reranker")


@pytest.fixture(scope="session")
def models(
    xlmr_reranker: Path, roberta_reranker: Path, bert_reranker: Path, xlmr_classifier: Path
) -> dict[str, Path]:
    return {
        "xlmr": xlmr_reranker,
        "roberta": roberta_reranker,
        "bert": bert_reranker,
        "classifier": xlmr_classifier,
    }


_PADDED: dict[str, TorchEngine] = {}


def padded_engine(model_dir: Path) -> TorchEngine:
    key = str(model_dir)
    if key not in _PADDED:
        _PADDED[key] = TorchEngine.load(key, device="cpu", dtype="float32")
    return _PADDED[key]


def encode(tokenizer: Any, pairs: list[tuple[str, str]]) -> list[EncodedPair]:
    out = []
    for query, text in pairs:
        enc = tokenizer(query, text)
        out.append(EncodedPair(enc["input_ids"], enc.get("token_type_ids")))
    return out


_REFERENCES: dict[tuple[str, int], tuple[list[tuple[str, str]], np.ndarray]] = {}


def pairs_and_reference(model_dir: Path, tokenizer: Any, seed: int) -> tuple[list, np.ndarray]:
    """40 mixed-length pairs and their fp32 per-pair reference logits (computed once)."""
    key = (str(model_dir), seed)
    if key not in _REFERENCES:
        pairs = mixed_pairs(tokenizer, 40, seed=seed)
        _REFERENCES[key] = (pairs, np.array(reference_logits(model_dir, pairs)))
    return _REFERENCES[key]


def emulated_varlen(q, k, v, cu_q, cu_k, max_q, max_k):
    """varlen_attn's semantics on CPU: attention within each [cu[i], cu[i+1]) run; empty runs
    (the CUDA-graph layout's spare rows) produce nothing, as in the flash kernel."""
    assert cu_q.dtype == torch.int32 and cu_k.dtype == torch.int32  # what the CUDA kernel needs
    bounds = cu_q.tolist()
    assert max(b - a for a, b in itertools.pairwise(bounds)) <= max_q
    out = torch.zeros_like(q)
    for a, b in itertools.pairwise(bounds):
        if b > a:
            o = F.scaled_dot_product_attention(*(t[a:b].transpose(0, 1) for t in (q, k, v)))
            out[a:b] = o.transpose(0, 1)
    return out


# ------------------------------------------------------------------------------ correctness


@pytest.mark.parametrize(
    ("attention", "kernels"),
    [("grouped", "onednn"), ("grouped", "aten"), ("nested", "aten"), ("varlen", "aten")],
)
@pytest.mark.parametrize("kind", ["xlmr", "roberta", "bert", "classifier"])
def test_scores_match_reference(
    kind: str,
    attention: str,
    kernels: str,
    models: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if attention == "varlen":
        monkeypatch.setattr(packed_engine, "_varlen_attn", emulated_varlen)
    model_dir = models[kind]
    engine = PackedEngine.from_torch_engine(
        padded_engine(model_dir), attention=attention, cpu_kernels=kernels
    )
    assert engine.info.extra["cpu_kernels"] == kernels
    pairs, ref = pairs_and_reference(model_dir, engine.tokenizer, seed=11)
    batch = encode(engine.tokenizer, pairs)
    lengths = [len(p) for p in batch]
    assert max(lengths) > 2 * min(lengths)  # really mixed lengths
    assert len(set(lengths)) > 10  # many chunks / sequence boundaries
    if attention == "grouped":  # runs of several equal-length sequences and lone ones
        counts = [c.count for c in engine.pack(batch).chunks()]
        assert max(counts) > 1 and min(counts) == 1

    logits = engine.score(batch)
    assert logits.dtype == np.float32 and logits.shape == (len(pairs), engine.info.num_labels)
    np.testing.assert_allclose(logits, ref, rtol=0, atol=LOGIT_TOL)
    if kind != "classifier":
        np.testing.assert_allclose(sigmoid(logits), sigmoid(ref), rtol=0, atol=SCORE_TOL)


def test_nested_backend_gives_pytorch_both_length_bounds(
    models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without min_seqlen and max_seqlen PyTorch reads them back from the offsets on the device,
    three times per layer: a GPU stall each (torch/nested/_internal/sdpa.py)."""
    seen: list[tuple[int | None, int | None]] = []
    real = torch.nested.nested_tensor_from_jagged

    def recording(values: torch.Tensor, offsets: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        seen.append((kwargs.get("min_seqlen"), kwargs.get("max_seqlen")))
        return real(values, offsets, **kwargs)

    monkeypatch.setattr(torch.nested, "nested_tensor_from_jagged", recording)
    engine = PackedEngine.from_torch_engine(padded_engine(models["xlmr"]), attention="nested")
    lengths = [7, 30, 12, 30]
    engine.score([EncodedPair([0] + [5] * (n - 2) + [2]) for n in lengths])
    assert seen and set(seen) == {(min(lengths), max(lengths))}


def test_grouped_attention_calls() -> None:
    """One call per run of equal lengths, each a plain view of the (longest-first) stream."""
    lengths = [5, 100, 90, 100, 63, 5, 5, 1]
    packed = pack(
        [EncodedPair([1] * n) for n in lengths],
        position_offset=0,
        use_token_type_ids=False,
        max_input_length=512,
        vocab_size=10,
        type_vocab_size=1,
    )
    chunks = packed.chunks()
    assert [(c.count, c.length) for c in chunks] == [(2, 100), (1, 90), (1, 63), (3, 5), (1, 1)]
    assert [(c.start, c.end) for c in chunks] == [
        (0, 200),
        (200, 290),
        (290, 353),
        (353, 368),
        (368, 369),
    ]


@pytest.mark.parametrize("kernels", ["aten", "onednn"])  # `auto` picks either, by CPU
def test_cpu_forward_passes_may_run_at_once(models: dict[str, Path], kernels: str) -> None:
    """--cpu-workers: score() called from several threads at once gives each batch's own
    scores, whichever kernels the linear layers run (oneDNN's weights are shared too)."""
    engine = PackedEngine.from_torch_engine(padded_engine(models["xlmr"]), cpu_kernels=kernels)
    assert engine.reentrant_on_cpu and engine.info.extra["cpu_kernels"] == kernels
    batches = [
        encode(engine.tokenizer, mixed_pairs(engine.tokenizer, 10, seed=seed)) for seed in range(4)
    ]
    alone = [engine.score(b) for b in batches]
    with ThreadPoolExecutor(3) as pool:
        together = list(pool.map(engine.score, batches * 3))
    for got, want in zip(together, alone * 3, strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def test_scores_do_not_depend_on_batch_neighbours(models: dict[str, Path]) -> None:
    engine = PackedEngine.from_torch_engine(padded_engine(models["xlmr"]))
    batch = encode(engine.tokenizer, mixed_pairs(engine.tokenizer, 24, seed=3))
    together = engine.score(batch)
    alone = np.concatenate([engine.score([p]) for p in batch])
    np.testing.assert_allclose(together, alone, rtol=0, atol=LOGIT_TOL)
    # Equal lengths (one mask-free chunk) and a single token.
    same = [EncodedPair([0, 7, 8, 2])] * 5 + [EncodedPair([0])]
    np.testing.assert_allclose(
        engine.score(same), np.concatenate([engine.score([p]) for p in same]), atol=LOGIT_TOL
    )


def test_cuda_graph_span_follows_the_batch_not_the_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """A graph's max_seqlen is the batch's longest sequence rounded up to a power of two: on an
    8192-token model, short pairs do not launch attention blocks for 8192 tokens. A longer
    batch gets a graph of its own; one within the span reuses it."""
    captured: list[tuple[int, int, int]] = []

    def capture(runner: Any, tokens: int, rows: int, span: int) -> Any:
        captured.append((tokens, rows, span))
        layout = packed_engine._Graph.layout(None, tokens, rows, span, 1, 2)
        cu = layout[3 * tokens : 3 * tokens + rows + 1]
        assert int(cu[-1]) == tokens and int(np.diff(cu).max()) <= span  # padding fits the span
        return SimpleNamespace(tokens=tokens, rows=rows, span=span)

    monkeypatch.setattr(packed_engine._Graph, "capture", staticmethod(capture))
    runner = object.__new__(packed_engine._CudaRunner)
    runner._max_len, runner._max_graphs = 8192, 64
    runner._graphs = {}
    runner._graphs_enabled, runner.capture_error = True, None
    assert runner._graph_for(4000, 16, 250).span == 256
    assert runner._graph_for(4010, 16, 256).span == 256  # the same graph
    assert runner._graph_for(4000, 16, 257).span == 512
    assert runner._graph_for(9000, 1, 8192).span == 8192  # never beyond the model's limit
    assert [span for _, _, span in captured] == [256, 512, 8192]
    assert packed_engine.graph_span(10, 32) == 32  # a model shorter than the smallest span


def test_cuda_graph_layout_scores_like_eager(
    models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The static buffer a CUDA graph replays (stream padded to a token bucket with spare
    sequences of at most the graph's span, spare rows empty) gives the same logits for the real
    sequences: with long pairs (span = the model's maximum) and short ones (a smaller span)."""
    monkeypatch.setattr(packed_engine, "_varlen_attn", emulated_varlen)
    for kind, short in itertools.product(("xlmr", "bert"), (False, True)):
        engine = PackedEngine.from_torch_engine(padded_engine(models[kind]), attention="varlen")
        pairs = encode(engine.tokenizer, mixed_pairs(engine.tokenizer, 9, seed=5))
        if short:  # cut like a truncation: still valid sequences
            pairs = [
                EncodedPair(p.input_ids[:40], p.token_type_ids and p.token_type_ids[:40])
                for p in pairs
            ]
        packed = engine.pack(pairs)
        n, total = len(packed.lengths), packed.num_tokens
        # The span a graph would use for this batch.
        max_len = packed_engine.graph_span(packed.max_len, engine.info.max_input_length)
        assert (max_len < engine.info.max_input_length) == short
        tokens = packed_engine._bucket(total + 300, 128)  # spare tokens > the span: spare seqs
        rows = packed_engine._bucket(n + 300 // max_len + 4, 8)
        offset = engine._facts.position_offset
        layout = torch.from_numpy(
            packed_engine._Graph.layout(packed, tokens, rows, max_len, 1, offset)
        )
        cu = layout[3 * tokens : 3 * tokens + rows + 1]
        assert int(cu[-1]) == tokens and (cu[1:] - cu[:-1]).max() <= max_len
        with torch.inference_mode():
            static = engine._encoder(
                layout[:tokens],
                layout[tokens : 2 * tokens],
                layout[2 * tokens : 3 * tokens],
                layout[3 * tokens + rows + 1 :],
                cu,
                max_len,
            )[:n]
            eager = engine._run_cpu(packed)
        np.testing.assert_allclose(static.numpy(), eager, rtol=0, atol=LOGIT_TOL)


def test_position_ids_restart_per_sequence_with_family_offset() -> None:
    batch = [EncodedPair([0, 5, 2]), EncodedPair([0, 6, 7, 8, 2], [0, 0, 0, 1, 1])]
    packed = pack(
        batch,
        position_offset=2,
        use_token_type_ids=True,
        max_input_length=8,
        vocab_size=10,
        type_vocab_size=2,
    )
    # Longest first; positions restart at padding_idx + 1 = 2 for each sequence.
    assert packed.order.tolist() == [1, 0]
    assert packed.input_ids.tolist() == [0, 6, 7, 8, 2, 0, 5, 2]
    assert packed.position_ids.tolist() == [2, 3, 4, 5, 6, 2, 3, 4]
    assert packed.token_type_ids.tolist() == [0, 0, 0, 1, 1, 0, 0, 0]
    assert packed.cu_seqlens.tolist() == [0, 5, 8]


@pytest.mark.parametrize(
    ("batch", "message"),
    [
        ([EncodedPair([1] * 9)], r"a sequence of 9 tokens exceeds the model's limit of 8"),
        ([EncodedPair([1, 10])], r"token ids must be in \[0, 10\)"),
        ([EncodedPair([1, 2], [0])], r"token_type_ids has 1 entries for 2 input_ids"),
        ([EncodedPair([1, 2], [0, 2])], r"token_type_ids must be in \[0, 2\)"),
        ([EncodedPair([])], r"at least one token"),
    ],
)
def test_pack_refuses_what_the_model_cannot_take(batch: list[EncodedPair], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        pack(
            batch,
            position_offset=0,
            use_token_type_ids=True,
            max_input_length=8,
            vocab_size=10,
            type_vocab_size=2,
        )


def test_info_and_limits(models: dict[str, Path]) -> None:
    engine = PackedEngine.from_torch_engine(padded_engine(models["xlmr"]))
    info = engine.info
    assert info.name == "pytorch-packed"
    assert info.padded is False  # the batcher counts real tokens
    assert (info.device, info.dtype, info.max_input_length) == ("cpu", "float32", TINY_MAX_TOKENS)
    assert info.extra["attention"] == "grouped"
    assert engine.score([]).shape == (0, 1)
    with pytest.raises(ValueError, match="exceeds the model's limit of 128"):
        engine.score([EncodedPair([0] + [5] * 200 + [2])])
    engine.warmup(1024)


def test_warmup_logs_its_progress(
    models: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    engine = PackedEngine.from_torch_engine(padded_engine(models["xlmr"]))
    with caplog.at_level(logging.INFO, logger="reranker_runtime.engines.base"):
        engine.warmup(1024)
    # CPU: one full-length sequence whatever the budget (a bounded start), then a short one.
    messages = [r.getMessage() for r in caplog.records]
    assert messages[0] == f"warming up: 1 x {TINY_MAX_TOKENS} tokens, 1 x 8 tokens"
    assert messages[1].startswith(f"warm-up pass 1/2: 1 x {TINY_MAX_TOKENS} tokens in ")
    assert messages[2].startswith("warm-up pass 2/2: 1 x 8 tokens in ")


def test_gpu_warmup_plan_covers_both_extremes_of_the_budget(models: dict[str, Path]) -> None:
    engine = PackedEngine.from_torch_engine(padded_engine(models["xlmr"]))
    engine._cuda = object()  # the plan only asks "on a GPU?"
    assert engine.warmup_plan(1024) == [
        (1024 // TINY_MAX_TOKENS, TINY_MAX_TOKENS),
        (128, 8),
        (1, 8),
    ]


def test_gpu_passes_stay_within_the_attention_kernels_launch_grid(
    models: dict[str, Path],
) -> None:
    """Flash and memory-efficient attention launch a grid row per sequence, and CUDA allows
    65,535: on a GPU a pass holds at most CUDA_MAX_SEQUENCES_PER_PASS sequences, however large
    the budget and short the inputs (the batcher splits by info.max_batch_size)."""
    assert base.gpu_max_batch_size("cuda:1") == base.CUDA_MAX_SEQUENCES_PER_PASS < 65_535 // 1.2
    assert base.gpu_max_batch_size("cpu") is None
    engine = PackedEngine.from_torch_engine(padded_engine(models["xlmr"]))
    assert engine.info.max_batch_size is None  # CPU: no kernel grid to respect
    engine._cuda = object()  # the plan only asks "on a GPU?"
    engine._info = dataclasses.replace(engine.info, max_batch_size=base.gpu_max_batch_size("cuda"))
    plan = engine.warmup_plan(1 << 20)
    assert max(n for n, _ in plan) == base.CUDA_MAX_SEQUENCES_PER_PASS


@pytest.mark.parametrize(
    ("dtype", "head_dim", "capability", "expected"),
    [
        (torch.bfloat16, 64, (9, 0), "varlen"),  # H100/H200
        (torch.float16, 64, (8, 9), "varlen"),  # L4
        (torch.bfloat16, 36, (9, 0), "nested"),  # the flash kernel needs a multiple of 8
        (torch.bfloat16, 320, (9, 0), "nested"),  # and at most 256
        (torch.float32, 64, (9, 0), "nested"),  # flash has no fp32
        (torch.float16, 64, (7, 5), "nested"),  # T4: flash needs sm_80
    ],
)
def test_attention_backend_for_a_gpu(
    dtype: torch.dtype,
    head_dim: int,
    capability: tuple[int, int],
    expected: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(packed_engine, "_varlen_attn", emulated_varlen)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert packed_engine.choose_attention(torch.device("cuda"), dtype, head_dim) == expected
    assert packed_engine.choose_attention(torch.device("cpu"), dtype, head_dim) == "grouped"


def _flash_refuses(*args: Any) -> Any:  # a PyTorch build whose flash kernels predate the GPU
    raise RuntimeError("FlashAttention only supports Ampere GPUs or newer.")


def test_varlen_probe_runs_one_tiny_call(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(packed_engine, "_varlen_attn", emulated_varlen)
    assert packed_engine.varlen_probe_error(torch.device("cpu"), torch.float32, 2, 8) is None
    monkeypatch.setattr(packed_engine, "_varlen_attn", _flash_refuses)
    error = packed_engine.varlen_probe_error(torch.device("cpu"), torch.float32, 2, 8)
    assert error == "RuntimeError: FlashAttention only supports Ampere GPUs or newer."
    monkeypatch.setattr(packed_engine, "_varlen_attn", lambda q, *a: q[:1])
    error = packed_engine.varlen_probe_error(torch.device("cpu"), torch.float32, 2, 8)
    assert error is not None and "wrong shape" in error


@pytest.mark.parametrize("probe_error", [None, "RuntimeError: FlashAttention only supports Ampere"])
def test_a_gpu_whose_varlen_kernel_fails_runs_nested(
    probe_error: str | None,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A GPU newer than PyTorch's flash kernels (a Blackwell sm_100 on a build that knows sm_8x
    and sm_90) passes choose_attention; the probe at load catches it, names the GPU and the
    error, and the engine runs the nested backend instead of failing at warm-up."""
    probes: list[tuple[Any, ...]] = []

    def probe(*args: Any) -> str | None:
        probes.append(args)
        return probe_error

    monkeypatch.setattr(packed_engine, "_varlen_attn", emulated_varlen)
    monkeypatch.setattr(packed_engine, "varlen_probe_error", probe)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (10, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA B200")
    cuda = torch.device("cuda")
    with caplog.at_level(logging.WARNING, logger="reranker_runtime.engines.packed_engine"):
        backend = packed_engine.usable_attention(cuda, torch.bfloat16, 16, 64)
    assert probes == [(cuda, torch.bfloat16, 16, 64)]
    if probe_error is None:
        assert backend == "varlen" and not caplog.records
    else:
        assert backend == "nested"
        [record] = caplog.records
        assert record.getMessage() == (
            "varlen attention does not run on NVIDIA B200 (sm_100) "
            f"({probe_error}); using the nested backend"
        )
    # No probe where varlen is not the choice: the CPU, float32 on a GPU.
    assert packed_engine.usable_attention(torch.device("cpu"), torch.bfloat16, 16, 64) == "grouped"
    assert packed_engine.usable_attention(cuda, torch.float32, 16, 64) == "nested"
    assert len(probes) == 1


def test_the_engine_loads_with_the_probed_backend(
    models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """from_torch_engine asks usable_attention (the probed choice), not choose_attention; an
    explicit attention is taken as given."""
    asked: list[tuple[Any, ...]] = []

    def usable(*args: Any) -> str:
        asked.append(args)
        return "nested"

    monkeypatch.setattr(packed_engine, "usable_attention", usable)
    padded = padded_engine(models["xlmr"])
    engine = PackedEngine.from_torch_engine(padded)
    assert engine.info.extra["attention"] == "nested" and len(asked) == 1
    heads = padded._model.config.num_attention_heads
    assert asked[0][2:] == (heads, padded._model.config.hidden_size // heads)
    engine = PackedEngine.from_torch_engine(padded, attention="grouped")
    assert engine.info.extra["attention"] == "grouped" and len(asked) == 1


def test_a_failed_cuda_graph_capture_turns_graphs_off(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A capture that fails (out of memory on a small GPU) costs one warning: that batch and
    every later one run without a graph instead of failing, and nothing is captured again (on
    PyTorch <= 2.11 the allocator may still think the failed capture is under way)."""
    attempts: list[tuple[int, int]] = []

    def failing_capture(runner: Any, tokens: int, rows: int, span: int) -> Any:
        attempts.append((tokens, rows))
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(packed_engine._Graph, "capture", staticmethod(failing_capture))
    runner = object.__new__(packed_engine._CudaRunner)  # its state, without a GPU
    runner._max_len, runner._max_graphs = TINY_MAX_TOKENS, 64
    runner._graphs = {}
    runner._graphs_enabled, runner.capture_error = True, None
    with caplog.at_level(logging.WARNING, logger="reranker_runtime.engines.packed_engine"):
        assert runner._graph_for(300, 5, 100) is None
        assert runner._graph_for(301, 5, 100) is None  # the same bucket
        assert runner._graph_for(4000, 40, 120) is None  # another one
    assert len(attempts) == 1
    assert [r.getMessage() for r in caplog.records] == [
        "CUDA graph capture failed; this engine runs without graphs from now on"
    ]
    # What gpu-check reports for the engine: it ran eager, and why.
    assert runner.graph_stats == {
        "graphs_enabled": False,
        "graphs_captured": 0,
        "graph_capture_error": "RuntimeError: CUDA out of memory",
    }


def test_release_cached_memory_survives_a_failed_capture(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # PyTorch <= 2.11 after a failed capture: empty_cache fails an internal assert.
    def asserting() -> None:
        raise RuntimeError("INTERNAL ASSERT FAILED: captures_underway.empty()")

    monkeypatch.setattr(torch.cuda, "empty_cache", asserting)
    with caplog.at_level(logging.WARNING, logger="reranker_runtime.engines.base"):
        release_cached_memory()
    assert "could not release the CUDA memory cache" in caplog.text


def test_family_facts() -> None:
    def config(**over: Any) -> SimpleNamespace:
        values: dict[str, Any] = dict(
            architectures=["XLMRobertaForSequenceClassification"],
            model_type="xlm-roberta",
            pad_token_id=1,
            max_position_embeddings=514,
            num_labels=1,
        )
        values.update(over)
        return SimpleNamespace(**values)

    assert family_facts(config()).position_offset == 2
    bert = family_facts(
        config(architectures=["BertForSequenceClassification"], model_type="bert", pad_token_id=0)
    )
    assert (bert.position_offset, bert.head, bert.uses_token_type_ids) == (0, "bert", True)
    with pytest.raises(ModelLoadError, match="DistilBertForSequenceClassification"):
        family_facts(
            config(architectures=["DistilBertForSequenceClassification"], model_type="distilbert")
        )
    with pytest.raises(ModelLoadError, match="absolute position embeddings only"):
        family_facts(config(position_embedding_type="relative_key"))


def test_load_defaults_to_float32_on_cpu(models: dict[str, Path]) -> None:
    engine = PackedEngine.load(str(models["bert"]), device="cpu")
    assert engine.info.dtype == "float32"
    assert engine.info.architecture == "BertForSequenceClassification"


# ---------------------------------------------------------------------------------- factory


@pytest.mark.parametrize(
    ("requested", "device", "kind", "trt", "chosen"),
    [
        ("auto", "cpu", None, False, "packed"),
        ("auto", "cpu", "pytorch", False, "packed"),
        ("auto", "cuda", None, False, "packed"),
        ("auto", "cuda", "pytorch", False, "packed"),
        ("auto", "cuda", "tensorrt-llm", True, "trtllm"),
        ("auto", "cuda", "tensorrt-llm", False, "packed"),
        ("packed", "cpu", None, False, "packed"),
        ("torch", "cuda", "tensorrt-llm", True, "torch"),
        ("trtllm", "cuda", "tensorrt-llm", True, "trtllm"),
    ],
)
def test_choose_engine(
    requested: str, device: str, kind: str | None, trt: bool, chosen: str
) -> None:
    assert (
        factory.choose_engine(requested, device=device, engine_dir_kind=kind, trtllm_available=trt)
        == chosen
    )


@pytest.mark.parametrize("kind", [None, "pytorch"])
def test_trtllm_needs_a_tensorrt_llm_engine_dir(kind: str | None) -> None:
    with pytest.raises(
        ModelLoadError, match="--engine trtllm serves a TensorRT-LLM engine directory"
    ):
        factory.choose_engine("trtllm", device="cuda", engine_dir_kind=kind, trtllm_available=True)


def test_factory_packed(models: dict[str, Path]) -> None:
    engine = factory.create_engine(
        ServeSettings(model=str(models["roberta"]), device="cpu", engine="packed")
    )
    assert isinstance(engine, PackedEngine)
    assert engine.info.dtype == "float32"


def test_factory_auto_keeps_padded_engine_for_other_families(
    models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*_a: Any, **_k: Any) -> PackedEngine:
        raise ModelLoadError("the packed engine serves model_type ...; use --engine torch")

    monkeypatch.setattr(PackedEngine, "from_torch_engine", refuse)
    padded = padded_engine(models["xlmr"])
    assert factory._to_packed(padded, ServeSettings(), strict=False) is padded
    with pytest.raises(ModelLoadError, match="use --engine torch"):
        factory._to_packed(padded, ServeSettings(), strict=True)


def test_factory_packed_on_a_cpu_engine_dir(xlmr_reranker: Path, tmp_path: Path) -> None:
    from engines.helpers import inputs
    from reranker_runtime.engine_build import command

    out = tmp_path / "engine-dir"
    command.run_build(inputs(xlmr_reranker), out)
    settings = ServeSettings(engine_dir=str(out), device="cpu", engine="packed")
    engine = factory.create_engine(settings)
    assert isinstance(engine, PackedEngine)
    assert engine.info.model_id == str(xlmr_reranker)
    pairs = [("what is the capital", "paris is the capital city of france")]
    np.testing.assert_allclose(
        engine.score(encode(engine.tokenizer, pairs)),
        reference_logits(xlmr_reranker, pairs),
        atol=LOGIT_TOL,
    )


# --------------------------------------------------------------------------- over HTTP


async def test_50_concurrent_requests_and_truncation_over_http(models: dict[str, Path]) -> None:
    from runtime.api_support import (
        QUERY,
        long_text,
        serving,
        settings_for,
        truncated_reference,
    )

    model_dir = models["xlmr"]
    engine = PackedEngine.from_torch_engine(padded_engine(model_dir))
    rng = random.Random(1)
    words = " ".join(corpus(200, seed=3)).split()
    requests = []
    for _ in range(50):
        query = " ".join(rng.choice(words) for _ in range(rng.randint(1, 5)))
        texts = [
            " ".join(rng.choice(words) for _ in range(rng.randint(1, 20)))
            for _ in range(rng.randint(1, 8))
        ]
        requests.append((query, texts))
    async with serving(settings_for(model_dir, engine="packed"), engine) as client:
        info = (await client.get("/info")).json()
        assert info["engine"] == "pytorch-packed"
        assert info["cpu_kernels"] == engine.info.extra["cpu_kernels"] == "aten"
        responses = await asyncio.gather(
            *(client.post("/rerank", json={"query": q, "texts": t}) for q, t in requests)
        )
        text = long_text()
        cut = await client.post(
            "/rerank",
            json={"query": QUERY, "texts": [text], "truncate": True, "raw_scores": True},
        )
    ref = reference_logits(model_dir, [(q, t) for q, texts in requests for t in texts])
    offset = 0
    for (_query, texts), resp in zip(requests, responses, strict=True):
        assert resp.status_code == 200, resp.text
        by_index = {item["index"]: item["score"] for item in resp.json()}
        assert sorted(by_index) == list(range(len(texts)))
        for i in range(len(texts)):
            assert by_index[i] == pytest.approx(sigmoid(ref[offset + i][0]), abs=SCORE_TOL)
        offset += len(texts)
    assert cut.status_code == 200, cut.text
    assert cut.json()[0]["score"] == pytest.approx(
        truncated_reference(model_dir, QUERY, text, "right"), abs=LOGIT_TOL
    )


# ------------------------------------------------------------------------------------ GPU


_GPU = (pytest.mark.gpu, needs_gpu)


@pytest.mark.parametrize(
    ("device", "dtype", "graphs"),
    [
        # CPU bfloat16 stands in for the GPU's half precision in CI (same rule, same models).
        ("cpu", torch.bfloat16, False),
        *(
            pytest.param("cuda", dtype, graphs, marks=_GPU)
            for dtype in (torch.float16, torch.bfloat16)
            for graphs in (False, True)
        ),
    ],
)
@pytest.mark.parametrize("kind", ["xlmr", "roberta", "bert"])
def test_half_precision_matches_reference(
    kind: str, device: str, graphs: bool, dtype: torch.dtype, models: dict[str, Path]
) -> None:
    """Judged as gpu-check judges it (checks.correctness_row): against the fp32 reference, within
    the dtype's tolerance or 1.5x the error of transformers itself at this dtype, pair by pair
    (the tiny models' large logits drift up to 0.2 in bfloat16 whatever runs them), mean logit
    error and rank agreement too."""
    from reranker_runtime.gpucheck import checks

    if device == "cuda" and dtype == torch.bfloat16 and torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("bfloat16 needs sm_80+")
    model_dir = models[kind]
    name = str(dtype).removeprefix("torch.")
    padded = TorchEngine.load(str(model_dir), device=device, dtype=name)
    engine = PackedEngine.from_torch_engine(padded, cuda_graphs=graphs)
    pairs, ref = pairs_and_reference(model_dir, engine.tokenizer, seed=11)
    batch = encode(engine.tokenizer, pairs)
    per_group = 8
    baseline = checks.compare(
        checks.reference_logits(str(model_dir), batch, device, name), ref, per_group
    )
    for _ in range(2):  # the second pass replays the captured graph
        row = checks.correctness_row(
            kind, "packed", name, engine, batch, ref, per_group, cpu=False, baseline=baseline
        )
        assert row["ok"], row
    # Batching must not change a score beyond the dtype's fixed tolerance (same engine, same
    # dtype: the model's own drift from fp32 does not enter here).
    scores = sigmoid(engine.score(batch[:8]))
    alone = sigmoid(np.concatenate([engine.score([p]) for p in batch[:8]]))
    np.testing.assert_allclose(alone, scores, rtol=0, atol=checks.SCORE_TOL[name])
    if device == "cuda" and torch.cuda.get_device_capability() >= (8, 0):
        assert engine.info.extra["attention"] == "varlen"


@pytest.mark.gpu
@needs_gpu
def test_gpu_fp32_matches_reference(models: dict[str, Path]) -> None:
    model_dir = models["xlmr"]
    engine = PackedEngine.load(str(model_dir), device="cuda", dtype="float32")
    assert engine.info.extra["attention"] == "nested"  # flash kernels take no float32
    pairs = mixed_pairs(engine.tokenizer, 30, seed=2)
    np.testing.assert_allclose(
        sigmoid(engine.score(encode(engine.tokenizer, pairs))),
        sigmoid(np.array(reference_logits(model_dir, pairs))),
        rtol=0,
        atol=1e-4,
    )


@pytest.mark.gpu
@needs_gpu
def test_gpu_default_dtype_is_bfloat16_where_native(models: dict[str, Path]) -> None:
    engine = PackedEngine.load(str(models["bert"]), device="cuda")
    native = torch.cuda.get_device_capability() >= (8, 0)
    assert engine.info.dtype == ("bfloat16" if native else "float16")


# ------------------------------------------------------------- overlapped batches (batcher)


async def test_batcher_runs_two_scores_at_once_for_an_engine_that_allows_it(
    models: dict[str, Path],
) -> None:
    """The packed engine on CUDA sets max_concurrent_scores = 2, so the next batch is packed and
    copied while the current one runs; here a CPU engine with the same flag must see two score
    calls in flight together (a barrier both must reach), and every score stays right."""
    import dataclasses
    import threading

    from reranker_runtime.batching import Batcher

    inner = PackedEngine.from_torch_engine(padded_engine(models["xlmr"]))
    barrier = threading.Barrier(2, timeout=10)

    class Overlapping(PackedEngine):
        max_concurrent_scores = 2

        def __init__(self) -> None:
            self.__dict__.update(inner.__dict__)
            self._info = dataclasses.replace(inner.info, device="cuda:0")  # GPU pipelining
            self.calls = 0

        def score(self, batch: Any) -> np.ndarray:
            self.calls += 1
            if self.calls <= 2:
                barrier.wait()  # raises BrokenBarrierError if the calls do not overlap
            return super().score(batch)

    engine = Overlapping()
    batcher = Batcher(engine, max_batch_tokens=256)
    await batcher.start(warmup=False)
    try:
        batch = encode(engine.tokenizer, mixed_pairs(engine.tokenizer, 24, seed=9))
        results = await asyncio.gather(
            batcher.score("a", batch[:12]), batcher.score("b", batch[12:])
        )
    finally:
        await batcher.stop()
    assert engine.calls >= 2
    together = np.concatenate([r.logits for r in results])
    np.testing.assert_allclose(together, inner.score(batch), rtol=0, atol=LOGIT_TOL)
