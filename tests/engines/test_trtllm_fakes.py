"""The TensorRT-LLM code paths with TensorRT-LLM faked (it cannot be installed here): the build's
plugin settings (fp32 accumulation in fused attention) and profile, and the engine call through
reused staging buffers."""

from __future__ import annotations

import contextlib
import logging
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from reranker_runtime.engine_build import trtllm
from reranker_runtime.engines.base import EncodedPair, EngineInfo
from reranker_runtime.engines.staging import Float32Readback, Int32Staging
from reranker_runtime.engines.trtllm_engine import TrtLlmEngine


def _modules(monkeypatch: pytest.MonkeyPatch, **modules: types.ModuleType) -> None:
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)


def _module(name: str, **attributes: Any) -> types.ModuleType:
    module = types.ModuleType(name)
    vars(module).update(attributes)
    return module


# ----------------------------------------------------------------------------------- build


def test_build_turns_on_fp32_accumulation_and_packed_attention(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    seen: dict[str, Any] = {}

    class PluginConfig:
        pass

    class BuildConfig:
        def __init__(self, **kwargs: Any) -> None:
            seen["build_config"] = kwargs

    class Model:
        @classmethod
        def from_hugging_face(cls, path: str, dtype: str) -> Model:
            seen["model"] = (cls.__name__, dtype)
            return cls()

    class RobertaForSequenceClassification(Model):
        pass

    class BertForSequenceClassification(Model):
        pass

    class Engine:
        def save(self, path: str) -> None:
            Path(path).mkdir(parents=True, exist_ok=True)
            (Path(path) / "rank0.engine").write_bytes(b"engine")

    def build(model: Any, config: Any) -> Engine:
        return Engine()

    root = _module("tensorrt_llm", __version__="1.0.0")
    builder = _module("tensorrt_llm.builder", BuildConfig=BuildConfig, build=build)
    bert = _module(
        "tensorrt_llm.models.bert.model",
        RobertaForSequenceClassification=RobertaForSequenceClassification,
        BertForSequenceClassification=BertForSequenceClassification,
    )
    plugin = _module("tensorrt_llm.plugin.plugin", PluginConfig=PluginConfig)
    _modules(
        monkeypatch,
        **{
            "tensorrt_llm": root,
            "tensorrt_llm.builder": builder,
            "tensorrt_llm.models.bert.model": bert,
            "tensorrt_llm.plugin.plugin": plugin,
        },
    )
    spec = types.SimpleNamespace(
        architecture="XLMRobertaForSequenceClassification",
        is_roberta=True,
        position_embedding_type="absolute",
        hidden_size=1024,
        intermediate_size=4096,
    )
    profile = trtllm.derive_profile(16384, 512)
    trtllm.build_engine(tmp_path / "ckpt", tmp_path / "engine", spec, profile, tmp_path / "scratch")

    plugin_config = seen["build_config"]["plugin_config"]
    assert plugin_config.bert_context_fmha_fp32_acc is True
    assert plugin_config.remove_input_padding is True and plugin_config.context_fmha is True
    assert plugin_config.bert_attention_plugin == "float16"
    assert seen["model"] == ("RobertaForSequenceClassification", "float16")
    assert seen["build_config"]["max_batch_size"] == 256
    assert seen["build_config"]["max_input_len"] == 512


@pytest.mark.parametrize("pair_tokens", [64, 128, 256, 512])
def test_one_pass_carries_the_full_budget_for_short_pairs(pair_tokens: int) -> None:
    profile = trtllm.derive_profile(16384, 512)
    assert profile.max_input_len == 512
    # Today's workloads (64-512 tokens per pair) fill the 16384-token budget in one pass.
    assert min(profile.max_batch_size, 16384 // pair_tokens) * pair_tokens == 16384


# ---------------------------------------------------------------------------------- serving


class _FakeSession:
    """Scores a sequence as the sum of its token ids; records the input buffers it was given."""

    def __init__(self) -> None:
        self.pointers: list[dict[str, int]] = []
        self.lengths: list[list[int]] = []  # the sequence lengths of each call

    def infer_shapes(self, infos: list[Any]) -> list[Any]:
        batch = next(i.shape[0] for i in infos if i.name == "input_lengths")
        return [types.SimpleNamespace(name="logits", dtype="FLOAT", shape=(batch, 1))]

    def run(
        self, inputs: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor], stream: Any
    ) -> bool:
        self.pointers.append({k: v.data_ptr() for k, v in inputs.items()})
        ids, lengths = inputs["input_ids"].tolist(), inputs["input_lengths"].tolist()
        self.lengths.append(lengths)
        start = 0
        for row, n in enumerate(lengths):
            outputs["logits"][row, 0] = float(sum(ids[start : start + n]))
            start += n
        return True


def _fake_engine(monkeypatch: pytest.MonkeyPatch, session: _FakeSession) -> TrtLlmEngine:
    """A TrtLlmEngine over `session`: max 16 tokens a sequence, 8 sequences and 128 tokens a pass."""
    trt = _module("tensorrt", DataType=types.SimpleNamespace(INT32="INT32"))
    utils = _module("tensorrt_llm._utils", trt_dtype_to_torch=lambda dtype: torch.float32)
    runtime = _module(
        "tensorrt_llm.runtime",
        TensorInfo=lambda name, dtype, shape: types.SimpleNamespace(name=name, shape=shape),
    )
    _modules(
        monkeypatch, tensorrt=trt, **{"tensorrt_llm._utils": utils, "tensorrt_llm.runtime": runtime}
    )
    # CPU stands in for the GPU: no CUDA device or stream contexts.
    monkeypatch.setattr(torch.cuda, "device", lambda _d: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "stream", lambda _s: contextlib.nullcontext())

    info = EngineInfo(
        name="tensorrt-llm",
        model_id="m",
        revision=None,
        device="cpu",
        dtype="float16",
        architecture="XLMRobertaForSequenceClassification",
        num_labels=1,
        max_input_length=16,
        padded=False,
        max_batch_size=8,
        max_batch_tokens=128,
    )
    engine = TrtLlmEngine(
        session=session,
        tokenizer=types.SimpleNamespace(pad_token_id=1),
        info=info,
        position_offset=2,
        use_token_types=False,
        device="cpu",
    )
    engine._stream = types.SimpleNamespace(cuda_stream=0, synchronize=lambda: None)
    engine._staging = Int32Staging("cpu", pin=False)
    engine._readback = Float32Readback(pin=False)
    engine._input_names = {"input_ids", "input_lengths", "position_ids", "max_input_length"}
    return engine


def test_engine_call_reuses_staging_and_output_buffers(monkeypatch: pytest.MonkeyPatch) -> None:
    session = _FakeSession()
    engine = _fake_engine(monkeypatch, session)
    first = [EncodedPair([0, 5, 2]), EncodedPair([0, 7, 8, 9, 2])]
    second = [EncodedPair([0, 3, 2]), EncodedPair([0, 4, 2]), EncodedPair([0, 1, 1, 2])]
    np.testing.assert_array_equal(engine.score(first), [[7.0], [26.0]])
    np.testing.assert_array_equal(engine.score(second), [[5.0], [6.0], [4.0]])
    # Same staging buffer for both batches: nothing allocated or copied from pageable memory anew.
    assert session.pointers[0]["input_ids"] == session.pointers[1]["input_ids"]
    assert set(session.pointers[0]) == engine._input_names


def test_engine_warmup_logs_its_progress(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    session = _FakeSession()
    engine = _fake_engine(monkeypatch, session)
    with caplog.at_level(logging.INFO, logger="reranker_runtime.engines.base"):
        engine.warmup(1024)  # above the profile's 128 tokens: the profile's cap wins
    # Full-length sequences at the budget, the most short ones the profile takes, one short one.
    assert session.lengths == [[16] * 8, [8] * 8, [8]]
    messages = [r.getMessage() for r in caplog.records]
    assert messages[0] == "warming up: 8 x 16 tokens, 8 x 8 tokens, 1 x 8 tokens"
    assert messages[1].startswith("warm-up pass 1/3: 8 x 16 tokens in ")
    assert messages[2].startswith("warm-up pass 2/3: 8 x 8 tokens in ")
    assert messages[3].startswith("warm-up pass 3/3: 1 x 8 tokens in ")
    fields = caplog.records[1].__dict__["fields"]
    assert (fields["sequences"], fields["tokens_each"]) == (8, 16) and fields["seconds"] >= 0
