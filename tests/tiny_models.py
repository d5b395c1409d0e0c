"""Tiny checkpoints built on the spot (random weights, a tokenizer trained here): no hub needed.

`build_tiny_model(kind, out_dir)` writes a `save_pretrained` directory (safetensors + fast
tokenizer) and `reference_logits(model_dir, pairs)` is the ground truth every score is checked
against: the model's fp32 forward pass on each pair alone, no batching.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

Kind = Literal["xlmr-reranker", "bert-reranker", "xlmr-classifier", "roberta-reranker"]

# Positions usable by tokens (XLM-R reserves padding_idx + 1 = 2 extra position slots).
TINY_MAX_TOKENS = 128

_WORDS = [
    "the",
    "a",
    "of",
    "to",
    "and",
    "in",
    "is",
    "for",
    "on",
    "that",
    "with",
    "as",
    "by",
    "at",
    "from",
    "it",
    "this",
    "be",
    "are",
    "was",
    "an",
    "or",
    "which",
    "deep",
    "learning",
    "model",
    "inference",
    "fast",
    "provider",
    "search",
    "engine",
    "rank",
    "query",
    "text",
    "document",
    "baseten",
    "kubernetes",
    "cluster",
    "gpu",
    "tensor",
    "batch",
    "token",
    "score",
    "relevance",
    "passage",
    "answer",
    "what",
    "who",
    "where",
    "when",
    "why",
    "how",
    "paris",
    "france",
    "capital",
    "city",
    "river",
    "music",
    "art",
    "science",
    "data",
    "apple",
    "banana",
    "orange",
    "fruit",
    "computer",
    "network",
    "server",
    "client",
    "request",
    "response",
    "latency",
]


def corpus(n_sentences: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [
        " ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 30))) for _ in range(n_sentences)
    ]


def mixed_pairs(tokenizer: Any, n: int, seed: int) -> list[tuple[str, str]]:
    """(query, text) pairs of very different lengths, all within the model's limit."""
    rng = random.Random(seed)
    sentences = corpus(200, seed=seed)
    pairs: list[tuple[str, str]] = []
    while len(pairs) < n:
        query = rng.choice(sentences)
        text = " ".join(rng.choice(sentences) for _ in range(rng.randint(1, 4)))
        if len(tokenizer(query, text)["input_ids"]) <= TINY_MAX_TOKENS:
            pairs.append((query, text))
    return pairs


def _xlmr_tokenizer(out_dir: Path):
    from transformers import XLMRobertaTokenizerFast

    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=400, special_tokens=specials, unk_token="<unk>")
    tok.train_from_iterator(corpus(), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>",
        pair="<s> $A </s> </s> $B </s>",
        special_tokens=[("<s>", 0), ("</s>", 2)],
    )
    fast = XLMRobertaTokenizerFast(tokenizer_object=tok, model_max_length=TINY_MAX_TOKENS)
    fast.save_pretrained(out_dir)
    return fast


def _roberta_tokenizer(out_dir: Path):
    """Byte-level BPE with RoBERTa's special tokens <s>=0 <pad>=1 </s>=2 <unk>=3 <mask>=4."""
    from transformers import RobertaTokenizerFast

    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>",
        pair="<s> $A </s> </s> $B </s>",
        special_tokens=[("<s>", 0), ("</s>", 2)],
    )
    fast = RobertaTokenizerFast(tokenizer_object=tok, model_max_length=TINY_MAX_TOKENS)
    fast.save_pretrained(out_dir)
    return fast


def _bert_tokenizer(out_dir: Path):
    from transformers import BertTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=400, special_tokens=specials)
    tok.train_from_iterator(corpus(), trainer=trainer)
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    fast = BertTokenizerFast(tokenizer_object=tok, model_max_length=TINY_MAX_TOKENS)
    fast.save_pretrained(out_dir)
    return fast


def build_tiny_model(kind: Kind, out_dir: Path | str, seed: int = 0) -> Path:
    """Write a tiny `*ForSequenceClassification` checkpoint with a fast tokenizer to out_dir."""
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        RobertaConfig,
        RobertaForSequenceClassification,
        XLMRobertaConfig,
        XLMRobertaForSequenceClassification,
    )

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    common = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        initializer_range=0.5,
    )
    if kind.startswith("xlmr"):
        tokenizer = _xlmr_tokenizer(out)
        num_labels = 3 if kind == "xlmr-classifier" else 1
        config = XLMRobertaConfig(
            vocab_size=len(tokenizer),
            max_position_embeddings=TINY_MAX_TOKENS + 2,
            type_vocab_size=1,
            pad_token_id=1,
            bos_token_id=0,
            eos_token_id=2,
            num_labels=num_labels,
            **common,
        )
        if num_labels == 3:
            config.id2label = {0: "negative", 1: "neutral", 2: "positive"}
            config.label2id = {v: k for k, v in config.id2label.items()}
        model = XLMRobertaForSequenceClassification(config)
    elif kind == "roberta-reranker":
        tokenizer = _roberta_tokenizer(out)
        config = RobertaConfig(
            vocab_size=len(tokenizer),
            max_position_embeddings=TINY_MAX_TOKENS + 2,
            type_vocab_size=1,
            pad_token_id=1,
            bos_token_id=0,
            eos_token_id=2,
            num_labels=1,
            **common,
        )
        model = RobertaForSequenceClassification(config)
    else:
        tokenizer = _bert_tokenizer(out)
        config = BertConfig(
            vocab_size=len(tokenizer),
            max_position_embeddings=TINY_MAX_TOKENS,
            type_vocab_size=2,
            pad_token_id=tokenizer.pad_token_id,
            num_labels=1,
            **common,
        )
        model = BertForSequenceClassification(config)
    # A wide initializer (above) makes logits depend strongly on the input, so a mix-up between
    # pairs would show far above float tolerance.
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    return out


def reference_logits(
    model_dir: Path | str,
    pairs: Sequence[tuple[str, str] | str],
    truncation: bool = False,
) -> list[list[float]]:
    """Ground truth: fp32 forward on each pair (or single text) alone, no padding, no batching."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, torch_dtype=torch.float32)
    model.eval()
    out: list[list[float]] = []
    with torch.inference_mode():
        for pair in pairs:
            if isinstance(pair, str):
                enc = tokenizer(pair, return_tensors="pt", truncation=truncation)
            else:
                enc = tokenizer(pair[0], pair[1], return_tensors="pt", truncation=truncation)
            out.append(model(**enc).logits[0].float().tolist())
    return out
