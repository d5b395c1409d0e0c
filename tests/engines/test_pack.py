"""Packed (remove_input_padding) inputs for the TensorRT-LLM engine, checked by hand and against
the PyTorch model: feeding HF the per-sequence slices of the packed arrays (position_ids
included) must reproduce the reference logits, which pins the position-offset convention."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from reranker_runtime.engine_build.checkpoint import validate_checkpoint
from reranker_runtime.engines.base import EncodedPair
from reranker_runtime.engines.trtllm_engine import INPUT_NAMES, pack_batch


def test_pack_by_hand_xlmr_offset() -> None:
    batch = [EncodedPair([0, 10, 11, 2]), EncodedPair([0, 12, 2])]
    p = pack_batch(batch, position_offset=2)
    assert set(p) == set(INPUT_NAMES)
    assert all(a.dtype == np.int32 for a in p.values())
    assert p["input_ids"].tolist() == [0, 10, 11, 2, 0, 12, 2]
    assert p["input_lengths"].tolist() == [4, 3]
    assert p["token_type_ids"].tolist() == [0] * 7
    assert p["position_ids"].tolist() == [2, 3, 4, 5, 2, 3, 4]
    assert p["max_input_length"].shape == (4,)  # only the shape carries the value


def test_pack_by_hand_bert_token_types() -> None:
    batch = [EncodedPair([2, 7, 3, 8, 9, 3], [0, 0, 0, 1, 1, 1]), EncodedPair([2, 5, 3], None)]
    p = pack_batch(batch, position_offset=0)
    assert p["input_ids"].tolist() == [2, 7, 3, 8, 9, 3, 2, 5, 3]
    assert p["input_lengths"].tolist() == [6, 3]
    assert p["token_type_ids"].tolist() == [0, 0, 0, 1, 1, 1, 0, 0, 0]
    assert p["position_ids"].tolist() == [0, 1, 2, 3, 4, 5, 0, 1, 2]
    assert p["max_input_length"].shape == (6,)


def test_pack_refuses_bad_batches() -> None:
    with pytest.raises(ValueError, match="empty"):
        pack_batch([], position_offset=0)
    with pytest.raises(ValueError, match="token_type_ids has 1 entries for 2 input_ids"):
        pack_batch([EncodedPair([1, 2], [0])], position_offset=0)
    with pytest.raises(ValueError, match="at least one token"):
        pack_batch([EncodedPair([])], position_offset=0)


@pytest.mark.parametrize("fixture", ["xlmr_reranker", "bert_reranker"])
def test_packed_arrays_reproduce_reference_logits(
    fixture: str, request: pytest.FixtureRequest
) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from tiny_models import reference_logits

    model_dir: Path = request.getfixturevalue(fixture)
    spec = validate_checkpoint(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    pairs = [
        ("what is the capital of france", "paris is the capital city of france"),
        ("gpu inference", "bananas and apples are fruit"),
        ("deep learning", "a fast model for search and rank of passage text with relevance score"),
    ]
    encs = [tok(q, d) for q, d in pairs]
    batch = [EncodedPair(e["input_ids"], e.get("token_type_ids")) for e in encs]
    packed = pack_batch(batch, position_offset=spec.position_offset)
    starts = np.concatenate([[0], np.cumsum(packed["input_lengths"])[:-1]])
    got = []
    with torch.inference_mode():
        for s, n in zip(starts, packed["input_lengths"], strict=True):
            sl = slice(int(s), int(s + n))
            kwargs = dict(
                input_ids=torch.tensor(packed["input_ids"][sl], dtype=torch.long)[None],
                position_ids=torch.tensor(packed["position_ids"][sl], dtype=torch.long)[None],
            )
            if spec.model_type == "bert":
                kwargs["token_type_ids"] = torch.tensor(
                    packed["token_type_ids"][sl], dtype=torch.long
                )[None]
            got.append(model(**kwargs).logits[0].tolist())
    np.testing.assert_allclose(got, reference_logits(model_dir, pairs), atol=1e-5)


def test_engine_family_comes_from_the_checkpoint_and_must_match_the_engine(
    xlmr_reranker: Path, bert_reranker: Path
) -> None:
    """The TensorRT-LLM engine takes its position offset and token types from the checkpoint's
    config.json (as the build did) and refuses an engine config that records another model."""
    from reranker_runtime.engines.trtllm_engine import model_family_of
    from reranker_runtime.errors import ModelLoadError

    xlmr = model_family_of(xlmr_reranker, {"is_roberta": True, "pad_token_id": 1})
    assert (xlmr.position_offset, xlmr.uses_token_type_ids) == (2, False)
    assert model_family_of(xlmr_reranker, {}).position_offset == 2  # nothing recorded: no check
    bert = model_family_of(bert_reranker, {"is_roberta": False})
    assert (bert.position_offset, bert.uses_token_type_ids) == (0, True)
    for recorded in ({"is_roberta": False}, {"pad_token_id": 0}):
        with pytest.raises(ModelLoadError, match=r"was built for another model"):
            model_family_of(xlmr_reranker, recorded)
