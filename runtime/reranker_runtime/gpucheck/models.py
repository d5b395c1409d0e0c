"""Checkpoints the GPU check builds on the spot (no hub): tiny XLM-R/RoBERTa/BERT models and a
random model of bge-reranker-large's shape, with tokenizers trained here."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

Arch = Literal["xlmr", "roberta", "bert"]

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
# BAAI/bge-reranker-large: XLM-R large.
LARGE = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096)
MAX_TOKENS = 512


def build_model(
    out_dir: Path | str,
    arch: Arch,
    shape: dict[str, int],
    *,
    initializer_range: float = 0.02,
    seed: int = 0,
    dtype: Any = None,
) -> Path:
    """Write a one-label `*ForSequenceClassification` checkpoint with a fast tokenizer.

    A wide `initializer_range` (0.5 for the tiny models) makes scores depend strongly on the
    input, so a mix-up between pairs shows far above float tolerance."""
    import torch
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        RobertaConfig,
        RobertaForSequenceClassification,
        XLMRobertaConfig,
        XLMRobertaForSequenceClassification,
    )

    # The benchmark's tokenizer trainer (same corpus, same special tokens).
    from reranker_runtime.bench.model import _train_tokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    tokenizer = _train_tokenizer("bert" if arch == "bert" else "xlmr", out)
    common: dict[str, Any] = dict(
        shape,
        num_labels=1,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        initializer_range=initializer_range,
        vocab_size=len(tokenizer),
    )
    model: Any
    if arch == "bert":
        config = BertConfig(
            max_position_embeddings=MAX_TOKENS,
            type_vocab_size=2,
            pad_token_id=tokenizer.pad_token_id,
            **common,
        )
        model = BertForSequenceClassification(config)
    else:
        roberta_like = dict(
            max_position_embeddings=MAX_TOKENS + 2,  # padding_idx + 1 reserved position slots
            type_vocab_size=1,
            pad_token_id=1,
            bos_token_id=0,
            eos_token_id=2,
            **common,
        )
        if arch == "roberta":
            model = RobertaForSequenceClassification(RobertaConfig(**roberta_like))
        else:
            model = XLMRobertaForSequenceClassification(XLMRobertaConfig(**roberta_like))
    if dtype is not None:
        model = model.to(dtype)
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    return out
