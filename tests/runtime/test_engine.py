"""PyTorch engine: loading, refusals, limits, and scores against the fp32 per-pair reference."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from reranker_runtime.config import ServeSettings
from reranker_runtime.engines import factory
from reranker_runtime.engines.base import EncodedPair, Engine, EngineInfo
from reranker_runtime.engines.factory import create_engine
from reranker_runtime.engines.torch_engine import TorchEngine, cpu_has_native_bf16
from reranker_runtime.errors import ModelLoadError
from tiny_models import TINY_MAX_TOKENS, mixed_pairs, reference_logits

# Scores (sigmoid of logits) must match the reference within 1e-5. Raw logits of the tiny
# models (initializer_range 0.5, chosen to amplify mix-ups) move by up to ~3e-5 when a
# sequence is padded inside a batch (different float summation order), hence 1e-4 for them.
SCORE_TOL = 1e-5
LOGIT_TOL = 1e-4


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))


def encode(engine: TorchEngine, pairs: list[tuple[str, str]]) -> list[EncodedPair]:
    out = []
    for query, text in pairs:
        enc = engine.tokenizer(query, text)
        out.append(EncodedPair(enc["input_ids"], enc.get("token_type_ids")))
    return out


@pytest.mark.parametrize("kind", ["xlmr", "bert", "classifier"])
def test_batched_scores_match_reference(
    kind: str,
    xlmr_engine,
    bert_engine,
    classifier_engine,
    xlmr_reranker,
    bert_reranker,
    xlmr_classifier,
) -> None:
    engine, model_dir = {
        "xlmr": (xlmr_engine, xlmr_reranker),
        "bert": (bert_engine, bert_reranker),
        "classifier": (classifier_engine, xlmr_classifier),
    }[kind]
    pairs = mixed_pairs(engine.tokenizer, 40, seed=11)
    lengths = [len(p) for p in encode(engine, pairs)]
    assert max(lengths) > 2 * min(lengths)  # a batch with real padding

    logits = engine.score(encode(engine, pairs))
    ref = np.array(reference_logits(model_dir, pairs))
    assert logits.dtype == np.float32
    assert logits.shape == (len(pairs), engine.info.num_labels)
    np.testing.assert_allclose(logits, ref, rtol=0, atol=LOGIT_TOL)
    if kind != "classifier":
        np.testing.assert_allclose(sigmoid(logits), sigmoid(ref), rtol=0, atol=SCORE_TOL)


def test_info(xlmr_engine, bert_engine, classifier_engine) -> None:
    info = xlmr_engine.info
    assert info.name == "pytorch"
    assert (info.device, info.dtype) == ("cpu", "float32")
    assert info.architecture == "XLMRobertaForSequenceClassification"
    assert info.num_labels == 1
    assert info.padded is True
    assert info.extra["attn_implementation"] == "sdpa"
    # XLM-R: 130 positions minus (pad_token_id + 1) = 128; BERT has no offset.
    assert info.max_input_length == TINY_MAX_TOKENS
    assert bert_engine.info.max_input_length == TINY_MAX_TOKENS
    assert bert_engine.uses_token_type_ids and not xlmr_engine.uses_token_type_ids
    assert classifier_engine.info.num_labels == 3
    assert classifier_engine.info.id2label == {0: "negative", 1: "neutral", 2: "positive"}


def test_max_input_length_is_the_tighter_limit(tmp_path: Path, xlmr_reranker: Path) -> None:
    # A tokenizer limit below the model's positions wins.
    import shutil

    model_dir = tmp_path / "short"
    shutil.copytree(xlmr_reranker, model_dir)
    config_path = model_dir / "tokenizer_config.json"
    cfg = json.loads(config_path.read_text())
    cfg["model_max_length"] = 64
    config_path.write_text(json.dumps(cfg))
    assert TorchEngine.load(str(model_dir), device="cpu").info.max_input_length == 64


def test_empty_batch(xlmr_engine) -> None:
    assert xlmr_engine.score([]).shape == (0, 1)


def test_too_long_sequence_raises(xlmr_engine) -> None:
    with pytest.raises(ValueError, match=r"exceeds the model's limit of 128"):
        xlmr_engine.score([EncodedPair([0] + [5] * 200 + [2])])


@pytest.mark.parametrize(
    ("flags", "native"),
    [("fpu avx512f avx512_bf16", True), ("fpu amx_bf16", True), ("fpu avx2 avx512f", False)],
)
def test_native_bf16_detection(tmp_path: Path, flags: str, native: bool) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
    assert cpu_has_native_bf16(str(cpuinfo)) is native
    assert cpu_has_native_bf16(str(tmp_path / "missing")) is None


def test_bfloat16_on_cpu(xlmr_reranker: Path, xlmr_engine) -> None:
    engine = TorchEngine.load(str(xlmr_reranker), device="cpu", dtype="bfloat16")
    assert engine.info.dtype == "bfloat16"
    pairs = mixed_pairs(xlmr_engine.tokenizer, 30, seed=5)
    batch = encode(xlmr_engine, pairs)
    low, full = engine.score(batch), xlmr_engine.score(batch)
    assert low.dtype == np.float32
    # bf16 keeps ~3 significant digits: close, not equal.
    np.testing.assert_allclose(sigmoid(low), sigmoid(full), atol=0.15)
    assert np.corrcoef(low[:, 0], full[:, 0])[0, 1] > 0.95


class RecordingEngine(Engine):
    """Delegates to a real engine and records the sequence lengths of every forward pass."""

    def __init__(self, inner: Engine, **info_overrides: Any) -> None:
        self._inner = inner
        self._info = dataclasses.replace(inner.info, **info_overrides)
        self.batches: list[list[int]] = []

    @property
    def info(self) -> EngineInfo:
        return self._info

    @property
    def tokenizer(self) -> Any:
        return self._inner.tokenizer

    def score(self, batch: Sequence[EncodedPair]) -> np.ndarray:
        self.batches.append([len(pair) for pair in batch])
        return self._inner.score(batch)


@pytest.mark.parametrize(
    ("device", "budget", "max_batch_size", "full_batch"),
    [
        ("cuda", 1024, None, [TINY_MAX_TOKENS] * 8),  # 8 x 128 = the whole budget
        ("cuda", 1000, None, [TINY_MAX_TOKENS] * 7),  # as many full-length sequences as fit
        ("cuda", 100, None, [TINY_MAX_TOKENS]),  # at least one full-length sequence
        ("cuda", 1024, 3, [TINY_MAX_TOKENS] * 3),  # never beyond the engine's own batch limit
        ("cpu", 1024, None, [TINY_MAX_TOKENS]),  # CPU: one full-length sequence, any budget
    ],
)
def test_warmup_runs_the_largest_batch_first(
    xlmr_engine, device: str, budget: int, max_batch_size: int | None, full_batch: list[int]
) -> None:
    # The plan follows the engine's device (the forward passes run on the CPU engine beneath).
    engine = RecordingEngine(xlmr_engine, device=device, max_batch_size=max_batch_size)
    engine.warmup(budget)
    assert engine.batches[0] == full_batch  # the pass that would run out of memory, at start
    assert len(engine.batches) == 2 and len(engine.batches[1]) == 1  # then one short sequence


def test_refuses_base_model_without_head(tmp_path: Path, xlmr_reranker: Path) -> None:
    from transformers import AutoTokenizer, XLMRobertaConfig, XLMRobertaModel

    out = tmp_path / "base"
    config = XLMRobertaConfig(
        vocab_size=400,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=TINY_MAX_TOKENS + 2,
        pad_token_id=1,
    )
    XLMRobertaModel(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(xlmr_reranker).save_pretrained(out)
    with pytest.raises(
        ModelLoadError, match=r"XLMRobertaModel is not a cross-encoder.*ForSequenceClassification"
    ):
        TorchEngine.load(str(out), device="cpu")


def test_refuses_other_model_families(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "gpt2", "architectures": ["GPT2ForSequenceClassification"]})
    )
    with pytest.raises(ModelLoadError, match=r"'gpt2'.*not one of the BERT family"):
        TorchEngine.load(str(tmp_path), device="cpu")


def test_refuses_missing_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"cannot read the model config"):
        TorchEngine.load(str(tmp_path / "nowhere"), device="cpu")


def test_refuses_bad_device_and_dtype(xlmr_reranker: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"unknown --dtype"):
        TorchEngine.load(str(xlmr_reranker), device="cpu", dtype="int3")
    with pytest.raises(ModelLoadError, match=r"unknown --device"):
        TorchEngine.load(str(xlmr_reranker), device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ModelLoadError, match=r"no CUDA GPU"):
            TorchEngine.load(str(xlmr_reranker), device="cuda")


def test_factory_loads_torch_engine(xlmr_reranker: Path) -> None:
    engine = create_engine(
        ServeSettings(model=str(xlmr_reranker), device="cpu", dtype="float32", engine="torch")
    )
    assert isinstance(engine, TorchEngine)
    assert engine.info.model_id == str(xlmr_reranker)


def test_factory_prefers_engine_dir(monkeypatch: pytest.MonkeyPatch, xlmr_engine) -> None:
    seen = []

    def load_engine_from_dir(path, settings):
        seen.append((path, settings))
        return xlmr_engine

    monkeypatch.setattr(factory, "load_engine_from_dir", load_engine_from_dir)
    settings = ServeSettings(model="ignored", engine_dir="/engines/abc", engine="torch")
    assert create_engine(settings) is xlmr_engine
    assert seen == [("/engines/abc", settings)]
