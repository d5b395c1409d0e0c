"""Profile derivation (batch/length from max_num_tokens) and the quantization refusals."""

from __future__ import annotations

import pytest

from reranker_runtime.engine_build.checkpoint import ModelSpec
from reranker_runtime.engine_build.errors import (
    BuildArgumentError,
    CheckpointInvalidError,
    QuantizationUnsupportedError,
)
from reranker_runtime.engine_build.trtllm import (
    MAX_BATCH_SIZE_CAP,
    SHORT_PAIR_TOKENS,
    Profile,
    check_quantization,
    check_trtllm_compatible,
    derive_profile,
)
from reranker_runtime.model_family import ModelFamily


@pytest.mark.parametrize(
    ("max_num_tokens", "model_max", "max_seq_len", "expected"),
    [
        # B = budget // 64: one pass carries the whole budget for pairs of 64+ tokens.
        (16384, 512, None, Profile(256, 512)),  # XLM-R default: 256 x 512
        (16384, 512, 256, Profile(256, 256)),  # a shorter max_seq_len lowers B x L
        (16384, 512, 1024, Profile(256, 512)),  # never beyond the model's positions
        (8192, 512, 300, Profile(128, 300)),
        (256, 512, None, Profile(4, 256)),  # a sequence never exceeds the whole budget
        (512, 512, None, Profile(8, 512)),
        (1_000_000, 8, None, Profile(MAX_BATCH_SIZE_CAP, 8)),  # capped
    ],
)
def test_derive_profile(
    max_num_tokens: int, model_max: int, max_seq_len: int | None, expected: Profile
) -> None:
    p = derive_profile(max_num_tokens, model_max, max_seq_len)
    assert p == expected
    assert p.max_num_tokens == p.max_batch_size * p.max_input_len
    short = min(p.max_input_len, SHORT_PAIR_TOKENS)
    assert p.max_batch_size == min(MAX_BATCH_SIZE_CAP, max(1, max_num_tokens // short))


@pytest.mark.parametrize("args", [(0, 512, None), (1024, 0, None), (1024, 512, 0)])
def test_derive_profile_refuses_nonsense(args) -> None:
    with pytest.raises(BuildArgumentError):
        derive_profile(*args)


@pytest.mark.parametrize("q", ["fp8", "fp4", "FP8"])
@pytest.mark.parametrize("accel", ["L4", "H100", "H200"])
def test_fp8_fp4_refused_for_bert_family(q: str, accel: str) -> None:
    with pytest.raises(QuantizationUnsupportedError) as ei:
        check_quantization(q, accel, "XLMRobertaForSequenceClassification")
    msg = ei.value.message
    assert (
        f"--quantization {q.lower()} is not available for XLMRobertaForSequenceClassification"
        in msg
    )
    assert f"TensorRT-LLM has no {q.upper()} path for BERT-family encoders" in msg
    assert "no_quant" in msg  # says what to do instead
    assert ei.value.exit_code == 13


def test_no_quant_is_fp16_on_gpu_fp32_on_cpu() -> None:
    assert check_quantization("no_quant", "L4") == "float16"
    assert check_quantization("no_quant", "CPU") == "float32"


@pytest.mark.parametrize("q", ["fp8", "fp4"])
def test_quantization_on_cpu_is_an_argument_error(q: str) -> None:
    with pytest.raises(BuildArgumentError, match=f"--quantization {q} is GPU-only"):
        check_quantization(q, "CPU")


def test_unknown_quantization() -> None:
    with pytest.raises(BuildArgumentError, match="int4"):
        check_quantization("int4", "L4")


def _spec(**over) -> ModelSpec:
    config = {
        "architectures": [over.pop("architecture", "XLMRobertaForSequenceClassification")],
        "model_type": over.pop("model_type", "xlm-roberta"),
        "num_labels": 1,
        "max_position_embeddings": 514,
        "pad_token_id": over.pop("pad_token_id", 1),
    }
    base = dict(
        family=ModelFamily.from_config(config),
        max_input_length=512,
        hidden_size=1024,
        intermediate_size=4096,
        position_embedding_type="absolute",
    )
    base.update(over)
    return ModelSpec(**base)


def test_trtllm_compatibility_checks() -> None:
    check_trtllm_compatible(_spec())
    with pytest.raises(CheckpointInvalidError, match="position_embedding_type 'relative_key'"):
        check_trtllm_compatible(_spec(position_embedding_type="relative_key"))
    with pytest.raises(
        CheckpointInvalidError, match=r"intermediate_size 64 != 4 x hidden_size \(32\)"
    ):
        check_trtllm_compatible(_spec(hidden_size=32, intermediate_size=64))


def test_position_offset_convention() -> None:
    # examples/models/core/bert/utils.py process_input: roberta -> + 1 + padding_idx; bert -> 0
    assert _spec().position_offset == 2
    assert (
        _spec(model_type="roberta", architecture="RobertaForSequenceClassification").position_offset
        == 2
    )
    assert (
        _spec(
            model_type="bert", architecture="BertForSequenceClassification", pad_token_id=0
        ).position_offset
        == 0
    )
    assert _spec().trtllm_class == "RobertaForSequenceClassification"
    assert (
        _spec(model_type="bert", architecture="BertForSequenceClassification").trtllm_class
        == "BertForSequenceClassification"
    )
