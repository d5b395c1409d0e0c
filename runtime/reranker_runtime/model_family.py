"""What this runtime knows about the models it serves: one place, used by every engine and by
`reranker-runtime build`, so serving and building accept the same checkpoints and agree on their
limits.

Accepted: BERT-family cross-encoders whose first `architectures` entry is one of

    BertForSequenceClassification         model_type "bert"
    RobertaForSequenceClassification      model_type "roberta"
    XLMRobertaForSequenceClassification   model_type "xlm-roberta"   (e.g. the BGE rerankers)

Nothing else, not even close relatives (CamemBERT, DistilBERT, ELECTRA): a checkpoint is accepted
only if every engine that may be asked to serve it handles it, and the TensorRT-LLM path maps only
these three classes (onto its BERT and RoBERTa models).

API (`ModelFamily.from_config(config)` takes a parsed config.json dict or a transformers config):

    family = ModelFamily.from_config(config)     # UnsupportedModelError (a ValueError) otherwise
    family.architecture, family.model_type, family.num_labels
    family.position_offset       # first position id: pad_token_id + 1 (RoBERTa, XLM-R), 0 (BERT)
    family.uses_token_type_ids   # BERT: segment ids of the pair; RoBERTa/XLM-R: none (all zero)
    family.max_input_length(tokenizer_max_length)   # most tokens one sequence may have
    family.trtllm_class          # TensorRT-LLM class the build converts it with

The rules, as transformers applies them (tests/test_model_family.py pins them against it):

- A key missing from config.json takes the transformers config class default: pad_token_id 1 for
  RoBERTa/XLM-R (0 for BERT), max_position_embeddings 512, num_labels from id2label, else 2
  (an explicit num_labels wins over id2label).
- RoBERTa-style models number positions from padding_idx + 1, so of max_position_embeddings
  positions (514 for XLM-R) pad_token_id + 1 are unusable (512 tokens remain).
- The maximum input length is the smaller of that and the tokenizer's model_max_length (when the
  tokenizer declares a real one).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# architecture -> (its model_type, the TensorRT-LLM class it is converted with). TensorRT-LLM maps
# every non-"bert" model_type to its RoBERTa path (tensorrt_llm/models/bert/config.py,
# BERTConfig.from_hugging_face: `is_roberta = hf_config.model_type != "bert"`).
SUPPORTED_ARCHITECTURES: dict[str, tuple[str, str]] = {
    "BertForSequenceClassification": ("bert", "BertForSequenceClassification"),
    "RobertaForSequenceClassification": ("roberta", "RobertaForSequenceClassification"),
    "XLMRobertaForSequenceClassification": ("xlm-roberta", "RobertaForSequenceClassification"),
}
ROBERTA_FAMILY = frozenset({"roberta", "xlm-roberta"})

# transformers' config class defaults (BertConfig, RobertaConfig, XLMRobertaConfig), applied
# when config.json leaves a key out, as AutoConfig does.
_DEFAULT_PAD_TOKEN_ID = {"bert": 0, "roberta": 1, "xlm-roberta": 1}
_DEFAULT_MAX_POSITION_EMBEDDINGS = 512
_DEFAULT_NUM_LABELS = 2
# What from_config reads from a transformers config object.
_CONFIG_KEYS = (
    "architectures",
    "model_type",
    "pad_token_id",
    "max_position_embeddings",
    "num_labels",
    "id2label",
)
# transformers sets model_max_length to ~1e30 when a tokenizer declares no limit.
_SANE_TOKENIZER_MAX = 1_000_000
# Shorter than this, not even [CLS] query [SEP] text [SEP] fits.
MIN_INPUT_LENGTH = 2

EXAMPLE_MODEL = "BAAI/bge-reranker-large"


class UnsupportedModelError(ValueError):
    """The checkpoint is not a model this runtime serves; the message says why and what to use."""


@dataclass(frozen=True)
class ModelFamily:
    """The facts every engine and the build need about an accepted checkpoint."""

    architecture: str  # e.g. "XLMRobertaForSequenceClassification"
    model_type: str  # "bert" | "roberta" | "xlm-roberta"
    num_labels: int
    max_position_embeddings: int
    pad_token_id: int | None  # None only for BERT (which does not need it)

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | Any) -> ModelFamily:
        """From a parsed config.json (missing keys take transformers' defaults) or a loaded
        transformers config object (defaults already applied). Raises UnsupportedModelError."""
        if not isinstance(config, Mapping):
            config = {key: getattr(config, key) for key in _CONFIG_KEYS if hasattr(config, key)}

        architectures = config.get("architectures") or []
        if not isinstance(architectures, list | tuple):
            architectures = []
        architecture = str(architectures[0]) if architectures else None
        model_type = str(config.get("model_type") or "")
        _check_architecture(architecture, model_type)
        assert architecture is not None  # _check_architecture refuses a missing one

        default_pad = _DEFAULT_PAD_TOKEN_ID[model_type]
        pad = config.get("pad_token_id", default_pad)
        is_roberta = model_type in ROBERTA_FAMILY
        if is_roberta and not _is_int(pad):
            raise UnsupportedModelError(
                f"config.json of this {architecture} sets pad_token_id to {pad!r}; a RoBERTa-family "
                "model numbers its positions from pad_token_id + 1, so it needs an integer "
                "pad_token_id (1 for RoBERTa and XLM-RoBERTa): fix config.json"
            )

        positions = config.get("max_position_embeddings", _DEFAULT_MAX_POSITION_EMBEDDINGS)
        if not _is_int(positions) or positions < 1:
            raise UnsupportedModelError(
                f"config.json has no valid max_position_embeddings ({positions!r}); a positive "
                "integer is required"
            )
        family = cls(
            architecture=architecture,
            model_type=model_type,
            num_labels=_num_labels(config),
            max_position_embeddings=int(positions),
            pad_token_id=int(pad) if _is_int(pad) else None,
        )
        if family.num_labels < 1:
            raise UnsupportedModelError(
                f"{architecture} has num_labels {family.num_labels}; a reranker has one output "
                "(a relevance logit)"
            )
        if family.position_limit < MIN_INPUT_LENGTH:
            raise UnsupportedModelError(
                f"{architecture} allows only {family.position_limit} tokens per sequence "
                f"(max_position_embeddings {positions}, position offset {family.position_offset})"
            )
        return family

    @property
    def is_roberta(self) -> bool:
        return self.model_type in ROBERTA_FAMILY

    @property
    def position_offset(self) -> int:
        """The first position id: RoBERTa/XLM-R positions start at padding_idx + 1 (2 for
        XLM-R); BERT's at 0."""
        if not self.is_roberta:
            return 0
        assert self.pad_token_id is not None  # from_config requires it for RoBERTa
        return self.pad_token_id + 1

    @property
    def uses_token_type_ids(self) -> bool:
        """BERT reads segment ids (0 query, 1 text); RoBERTa/XLM-R have one segment type."""
        return self.model_type == "bert"

    @property
    def position_limit(self) -> int:
        """Most tokens the model's position embeddings allow."""
        return self.max_position_embeddings - self.position_offset

    @property
    def trtllm_class(self) -> str:
        return SUPPORTED_ARCHITECTURES[self.architecture][1]

    def max_input_length(self, tokenizer_max_length: object = None) -> int:
        """Most tokens one sequence may have: the position limit, or the tokenizer's
        model_max_length when that is smaller (ignored when it is not a real limit)."""
        limit = self.position_limit
        declared = tokenizer_max_length
        if (
            isinstance(declared, int | float)
            and not isinstance(declared, bool)
            and 1 <= declared < _SANE_TOKENIZER_MAX
        ):
            limit = min(limit, int(declared))
        if limit < MIN_INPUT_LENGTH:
            raise UnsupportedModelError(
                f"{self.architecture} allows only {limit} tokens per sequence (the tokenizer's "
                f"model_max_length is {tokenizer_max_length}); fix tokenizer_config.json"
            )
        return limit


def _check_architecture(architecture: str | None, model_type: str) -> None:
    supported = ", ".join(SUPPORTED_ARCHITECTURES)
    if architecture is None:
        raise UnsupportedModelError(
            f"config.json names no architecture (architectures is empty or missing); a reranker is "
            f"one of {supported}. If the checkpoint has a trained classification head, declare it "
            "in config.json, e.g. 'architectures': ['XLMRobertaForSequenceClassification']"
        )
    if architecture not in SUPPORTED_ARCHITECTURES:
        if architecture.endswith("ForSequenceClassification"):
            why = (
                f"{architecture} (model_type {model_type!r}) is a sequence classifier, but not "
                "one of the BERT family this runtime serves"
            )
        else:
            why = (
                f"{architecture} is not a cross-encoder: it is not a *ForSequenceClassification "
                "model, and a base or embedding checkpoint has no trained scoring head"
            )
        raise UnsupportedModelError(
            f"unsupported architecture: {why}. Supported architectures: {supported} "
            f"(e.g. {EXAMPLE_MODEL})"
        )
    expected = SUPPORTED_ARCHITECTURES[architecture][0]
    if model_type != expected:
        raise UnsupportedModelError(
            f"config.json says architecture {architecture} but model_type {model_type!r} "
            f"(expected {expected!r}); fix config.json"
        )


def _num_labels(config: Mapping[str, Any]) -> int:
    # transformers: an explicit num_labels wins over id2label; neither means 2.
    if _is_int(config.get("num_labels")):
        return int(config["num_labels"])
    id2label = config.get("id2label")
    if isinstance(id2label, Mapping) and id2label:
        return len(id2label)
    return _DEFAULT_NUM_LABELS


def _is_int(value: object) -> bool:
    # bool is an int subclass; true/false is never a token id or a count.
    return isinstance(value, int) and not isinstance(value, bool)
