"""Model-family rules (reranker_runtime.model_family), pinned against transformers, and proof that
`serve --model` (the PyTorch engine) and `reranker-runtime build` accept and refuse the same
checkpoints with the same per-sequence limit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoConfig

from engines.helpers import mutate_checkpoint
from reranker_runtime.engine_build.checkpoint import validate_checkpoint
from reranker_runtime.engine_build.errors import CheckpointInvalidError
from reranker_runtime.engines.torch_engine import TorchEngine
from reranker_runtime.errors import ModelLoadError
from reranker_runtime.model_family import ModelFamily, UnsupportedModelError
from tiny_models import TINY_MAX_TOKENS

ARCHITECTURES = {
    "bert": "BertForSequenceClassification",
    "roberta": "RobertaForSequenceClassification",
    "xlm-roberta": "XLMRobertaForSequenceClassification",
}


def _config(family: str, **keys: object) -> dict[str, object]:
    """A config.json of `family`; a key given None is left out, others override."""
    config: dict[str, object] = {
        "architectures": [ARCHITECTURES[family]],
        "model_type": family,
        "max_position_embeddings": 514,
        "pad_token_id": 1,
        "id2label": {"0": "LABEL_0"},
    }
    for key, value in keys.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    return config


@pytest.mark.parametrize(
    ("model_type", "keys", "offset", "max_len", "token_types"),
    [
        ("xlm-roberta", {}, 2, 512, False),
        ("roberta", {}, 2, 512, False),
        ("bert", {"max_position_embeddings": 512, "pad_token_id": 0}, 0, 512, True),
        # transformers' RobertaConfig default pad_token_id 1 applies: still 512, never 513.
        ("roberta", {"pad_token_id": None}, 2, 512, False),
        ("xlm-roberta", {"pad_token_id": None}, 2, 512, False),
        ("xlm-roberta", {"pad_token_id": 0}, 1, 513, False),
        ("bert", {"pad_token_id": None, "max_position_embeddings": None}, 0, 512, True),
    ],
)
def test_rules(model_type: str, keys: dict, offset: int, max_len: int, token_types: bool) -> None:
    family = ModelFamily.from_config(_config(model_type, **keys))
    assert family.position_offset == offset
    assert family.max_input_length() == max_len
    assert family.uses_token_type_ids is token_types
    assert family.num_labels == 1


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
@pytest.mark.parametrize(
    "keys",
    [
        {},
        {"pad_token_id": None},
        {"max_position_embeddings": None},
        {"id2label": None},  # transformers' default: 2 labels
        {"id2label": None, "num_labels": 1},
        {"num_labels": 3},  # an explicit num_labels wins over id2label
    ],
)
def test_config_json_defaults_are_the_ones_transformers_applies(
    tmp_path: Path, model_type: str, keys: dict
) -> None:
    """serve reads a transformers config object, build reads config.json: same family."""
    config = _config(model_type, **keys)
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert ModelFamily.from_config(config) == ModelFamily.from_config(
        AutoConfig.from_pretrained(tmp_path)
    )


def test_tokenizer_limit() -> None:
    family = ModelFamily.from_config(_config("xlm-roberta"))
    assert family.max_input_length(256) == 256
    assert family.max_input_length(1024) == 512
    assert family.max_input_length(int(1e30)) == 512  # transformers' "no limit" sentinel
    assert family.max_input_length(None) == 512
    with pytest.raises(UnsupportedModelError, match=r"allows only 1 tokens"):
        family.max_input_length(1)


def test_trtllm_classes() -> None:
    assert ModelFamily.from_config(_config("xlm-roberta")).trtllm_class == (
        "RobertaForSequenceClassification"
    )
    assert ModelFamily.from_config(_config("bert")).trtllm_class == (
        "BertForSequenceClassification"
    )


@pytest.mark.parametrize(
    ("config", "needle"),
    [
        (
            {"architectures": ["CamembertForSequenceClassification"], "model_type": "camembert"},
            "CamembertForSequenceClassification (model_type 'camembert') is a sequence "
            "classifier, but not one of the BERT family",
        ),
        (
            {"architectures": ["DistilBertForSequenceClassification"], "model_type": "distilbert"},
            "not one of the BERT family",
        ),
        (
            {"architectures": ["ElectraForSequenceClassification"], "model_type": "electra"},
            "not one of the BERT family",
        ),
        ({"architectures": ["XLMRobertaModel"]}, "XLMRobertaModel is not a cross-encoder"),
        ({"architectures": None}, "names no architecture"),
        ({"model_type": "bert"}, "model_type 'bert' (expected 'xlm-roberta')"),
        ({"pad_token_id": "one"}, "needs an integer pad_token_id"),
        ({"max_position_embeddings": 0}, "no valid max_position_embeddings"),
        ({"num_labels": 0}, "num_labels 0"),
    ],
)
def test_refusals_say_what_is_wrong(config: dict, needle: str) -> None:
    with pytest.raises(UnsupportedModelError) as ei:
        ModelFamily.from_config(_config("xlm-roberta", **config))
    assert needle in str(ei.value)


# ------------------------------------------------------------------ serve and build agree


@pytest.mark.parametrize(
    ("fixture", "config", "tokenizer_max", "expected_len"),
    [
        ("xlmr_reranker", {}, None, TINY_MAX_TOKENS),
        ("bert_reranker", {}, None, TINY_MAX_TOKENS),
        # RoBERTa without pad_token_id: the class default (1) applies in both.
        (
            "xlmr_reranker",
            {
                "model_type": "roberta",
                "architectures": ["RobertaForSequenceClassification"],
                "pad_token_id": None,
            },
            None,
            TINY_MAX_TOKENS,
        ),
        ("xlmr_reranker", {}, 64, 64),  # the tokenizer's limit is the tighter one
        (
            "xlmr_reranker",
            {"model_type": "camembert", "architectures": ["CamembertForSequenceClassification"]},
            None,
            None,
        ),
        (
            "bert_reranker",
            {"model_type": "distilbert", "architectures": ["DistilBertForSequenceClassification"]},
            None,
            None,
        ),
        (
            "bert_reranker",
            {"model_type": "electra", "architectures": ["ElectraForSequenceClassification"]},
            None,
            None,
        ),
        ("xlmr_reranker", {"architectures": ["XLMRobertaModel"]}, None, None),
    ],
)
def test_serve_and_build_agree(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    fixture: str,
    config: dict,
    tokenizer_max: int | None,
    expected_len: int | None,
) -> None:
    model_dir = mutate_checkpoint(request.getfixturevalue(fixture), tmp_path / "m", config=config)
    if tokenizer_max is not None:
        path = model_dir / "tokenizer_config.json"
        path.write_text(
            json.dumps({**json.loads(path.read_text()), "model_max_length": tokenizer_max})
        )

    if expected_len is None:
        with pytest.raises(UnsupportedModelError) as family_error:
            ModelFamily.from_config(json.loads((model_dir / "config.json").read_text()))
        with pytest.raises(ModelLoadError) as serve_error:
            TorchEngine.load(str(model_dir), device="cpu")
        with pytest.raises(CheckpointInvalidError) as build_error:
            validate_checkpoint(model_dir)
        assert str(family_error.value) in str(serve_error.value)
        assert str(family_error.value) in build_error.value.message
        return

    engine = TorchEngine.load(str(model_dir), device="cpu")
    spec = validate_checkpoint(model_dir)
    assert engine.info.max_input_length == spec.max_input_length == expected_len
    assert engine.info.num_labels == spec.num_labels
    assert engine.uses_token_type_ids is spec.family.uses_token_type_ids
