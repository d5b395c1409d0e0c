"""Benchmark checkpoints built locally: random weights, realistic shapes, a tokenizer trained here.

Model hubs are unreachable from CI and from this project's build machines, so the benchmark runs
on a checkpoint whose *shape* matches a real reranker (the cost of a forward pass depends on the
shape, not on the weight values):

| size  | shape                                    | like                                  |
|-------|------------------------------------------|---------------------------------------|
| tiny  | hidden 32, 2 layers (tests only)         | -                                     |
| small | hidden 384, 6 layers, 12 heads, ffn 1536 | cross-encoder/ms-marco-MiniLM-L-6-v2  |
| base  | hidden 768, 12 layers, 12 heads, ffn 3072| BAAI/bge-reranker-base                |
| large | hidden 1024, 24 layers, 16 heads, ffn 4096| BAAI/bge-reranker-large              |

All are `XLMRobertaForSequenceClassification` (one label) by default, max input 512 tokens, like
the bge rerankers (`--arch bert` gives a BERT one). The vocabulary is small (the tokenizer is
trained on the workload's own text); this changes the embedding table's size, not the compute per
token.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

Size = Literal["tiny", "small", "base", "large"]
Arch = Literal["xlmr", "bert"]

SHAPES: dict[str, dict[str, int]] = {
    "tiny": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64),
    "small": dict(
        hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536
    ),
    "base": dict(
        hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072
    ),
    "large": dict(
        hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096
    ),
}
MAX_TOKENS = 512
# Smaller than the corpus's word list, so frequent words stay whole and rarer ones are split into
# pieces: about 1.3 tokens per word, like XLM-R on English prose (WordPiece needs a larger vocab
# for the same ratio).
VOCAB_SIZE = {"xlmr": 520, "bert": 1000}


def _train_tokenizer(arch: Arch, out: Path) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    from reranker_runtime.bench.workload import training_corpus

    text = training_corpus()
    fast: Any
    if arch == "xlmr":
        # transformers 5.x: the XLM-R/BERT tokenizer classes are the fast (Rust) ones.
        from transformers import XLMRobertaTokenizer

        specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
        tok = Tokenizer(models.Unigram())
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        trainer: trainers.Trainer = trainers.UnigramTrainer(
            vocab_size=VOCAB_SIZE[arch], special_tokens=specials, unk_token="<unk>"
        )
        tok.train_from_iterator(text, trainer=trainer)
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A </s>",
            pair="<s> $A </s> </s> $B </s>",
            special_tokens=[("<s>", 0), ("</s>", 2)],
        )
        fast = XLMRobertaTokenizer(tokenizer_object=tok, model_max_length=MAX_TOKENS)
    else:
        from transformers import BertTokenizer

        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        tok.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(vocab_size=VOCAB_SIZE[arch], special_tokens=specials)
        tok.train_from_iterator(text, trainer=trainer)
        cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
        )
        fast = BertTokenizer(tokenizer_object=tok, model_max_length=MAX_TOKENS)
    fast.save_pretrained(out)
    return fast


def build_bench_model(
    out_dir: Path | str, size: Size = "small", arch: Arch = "xlmr", seed: int = 0
) -> Path:
    """Write a `*ForSequenceClassification` checkpoint (one label) + fast tokenizer to out_dir."""
    import torch
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        XLMRobertaConfig,
        XLMRobertaForSequenceClassification,
    )

    if size not in SHAPES:
        raise ValueError(f"unknown size {size!r}; choose one of {', '.join(SHAPES)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    tokenizer = _train_tokenizer(arch, out)
    common: dict[str, Any] = dict(
        SHAPES[size], num_labels=1, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
    )
    model: XLMRobertaForSequenceClassification | BertForSequenceClassification
    if arch == "xlmr":
        xlmr_config = XLMRobertaConfig(
            vocab_size=len(tokenizer),
            max_position_embeddings=MAX_TOKENS + 2,  # XLM-R: padding_idx + 1 reserved slots
            type_vocab_size=1,
            pad_token_id=1,
            bos_token_id=0,
            eos_token_id=2,
            **common,
        )
        model = XLMRobertaForSequenceClassification(xlmr_config)
    else:
        bert_config = BertConfig(
            vocab_size=len(tokenizer),
            max_position_embeddings=MAX_TOKENS,
            type_vocab_size=2,
            pad_token_id=tokenizer.pad_token_id,
            **common,
        )
        model = BertForSequenceClassification(bert_config)
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    _readable_by_others(out)
    return out


def _readable_by_others(directory: Path) -> None:
    """Every file readable by all, as the tokenizer and config files are (the weights are
    written 0600): a server running as another user, e.g. the runtime image's uid 10001 with
    the directory mounted, can read them."""
    for path in directory.iterdir():
        if path.is_file():
            path.chmod(path.stat().st_mode | 0o044)
