"""PyTorch engine: `transformers` AutoModelForSequenceClassification, SDPA attention, CPU or CUDA.

Only BERT-family cross-encoders are served (BERT, RoBERTa, XLM-RoBERTa and close relatives):
their inputs are one token sequence, their position limit is known, and the TensorRT-LLM engine
serves the same family, so both engines agree on what a model accepts.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from reranker_runtime.engines.base import EncodedPair, Engine, EngineInfo
from reranker_runtime.errors import ModelLoadError

logger = logging.getLogger(__name__)

# model_type -> position-id offset. RoBERTa-style models number positions from
# padding_idx + 1, so (pad_token_id + 1) of their max_position_embeddings are unusable.
_ROBERTA_FAMILY = frozenset({"roberta", "xlm-roberta", "camembert"})
SUPPORTED_MODEL_TYPES = frozenset(
    {"bert", "roberta", "xlm-roberta", "camembert", "distilbert", "electra"}
)

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}
# tokenizer.model_max_length is ~1e30 when a tokenizer does not declare a limit.
_SANE_MAX_LENGTH = 1_000_000


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when a GPU is visible, else 'cpu'; validate explicit choices."""
    device = (device or "auto").strip().lower()
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return "cpu"
    if device == "cuda" or device.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ModelLoadError(
                f"--device {device} was requested but no CUDA GPU is visible to PyTorch; "
                "use --device cpu (or auto) or run on a GPU node"
            )
        return device
    raise ModelLoadError(f"unknown --device {device!r}; use auto, cpu, cuda or cuda:N")


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """'auto' -> float16 on GPU, float32 on CPU; explicit names (and fp16/bf16 aliases) as given."""
    name = (dtype or "auto").strip().lower()
    if name == "auto":
        return torch.float16 if device.startswith("cuda") else torch.float32
    if name not in _DTYPES:
        raise ModelLoadError(f"unknown --dtype {dtype!r}; use auto, float32, float16 or bfloat16")
    return _DTYPES[name]


def cpu_has_native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool | None:
    """Whether the CPU computes bfloat16 natively (AVX512-BF16 or AMX); None when unknown."""
    try:
        flags = set(Path(cpuinfo).read_text().split())
    except OSError:
        return None
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def max_input_length(config: Any, tokenizer: Any) -> int:
    """The real per-sequence limit: model positions (minus RoBERTa's offset) and tokenizer limit."""
    positions = int(getattr(config, "max_position_embeddings", 0) or 0)
    if config.model_type in _ROBERTA_FAMILY:
        pad = config.pad_token_id if config.pad_token_id is not None else 1
        positions -= pad + 1
    limits = [positions] if positions > 0 else []
    tok_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(tok_max, int) and 0 < tok_max < _SANE_MAX_LENGTH:
        limits.append(tok_max)
    if not limits:
        raise ModelLoadError(
            "cannot tell the model's maximum input length (no max_position_embeddings in "
            "config.json and no model_max_length in the tokenizer config); add one of them"
        )
    return min(limits)


class TorchEngine(Engine):
    """Scores padded batches with a `transformers` sequence-classification model."""

    def __init__(
        self, model: Any, tokenizer: Any, info: EngineInfo, *, use_token_type_ids: bool
    ) -> None:
        self._model = model
        self._tokenizer = tokenizer
        self._info = info
        self._use_token_type_ids = use_token_type_ids
        self._device = torch.device(info.device)
        pad = tokenizer.pad_token_id
        if pad is None:
            pad = getattr(model.config, "pad_token_id", None)
        self._pad_id = int(pad) if pad is not None else 0

    @classmethod
    def load(
        cls,
        model: str,
        revision: str | None = None,
        device: str = "auto",
        dtype: str = "auto",
        *,
        max_seq_len: int | None = None,
        source: tuple[str, str | None] | None = None,
    ) -> TorchEngine:
        """Load and validate a checkpoint (local directory or hub id). Raises ModelLoadError.

        `max_seq_len` caps the per-input length below the model's own maximum (the build's
        `--max-seq-len`, so a long-context model fits a smaller token budget); `source` is the
        (model id, revision) to report when `model` is a cached copy, e.g. in an engine dir."""
        from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

        dev = resolve_device(device)
        torch_dtype = resolve_dtype(dtype, dev)
        if dev == "cpu" and torch_dtype == torch.bfloat16 and cpu_has_native_bf16() is False:
            logger.warning(
                "this CPU has no native bfloat16 (no avx512_bf16 or amx_bf16): bfloat16 is emulated "
                "and usually slower than float32 here; use --dtype float32 (or auto)",
            )
        started = time.perf_counter()

        try:
            config = AutoConfig.from_pretrained(model, revision=revision)
        except Exception as exc:
            raise ModelLoadError(
                f"cannot read the model config of {model!r} (revision {revision or 'default'}): {exc}. "
                "Check the model id or path, the revision, network access / HF_TOKEN, or HF_HUB_OFFLINE"
            ) from exc
        _check_supported(model, config)

        try:
            tokenizer = AutoTokenizer.from_pretrained(model, revision=revision, use_fast=True)
        except Exception as exc:
            raise ModelLoadError(
                f"cannot load the tokenizer of {model!r}: {exc}. The checkpoint needs a fast "
                "tokenizer (tokenizer.json)"
            ) from exc
        if not getattr(tokenizer, "is_fast", False):
            raise ModelLoadError(
                f"{model!r} has only a slow (Python) tokenizer; this runtime needs a fast tokenizer. "
                "Save one with tokenizer.save_pretrained() from a PreTrainedTokenizerFast (tokenizer.json)"
            )

        hf_model, attn = _load_model(
            AutoModelForSequenceClassification, model, revision, torch_dtype
        )
        hf_model.to(dev)
        hf_model.eval()

        num_labels = int(hf_model.config.num_labels)
        id2label = {int(k): str(v) for k, v in (hf_model.config.id2label or {}).items()}
        forward_params = inspect.signature(hf_model.forward).parameters
        use_tt = (
            "token_type_ids" in tokenizer.model_input_names and "token_type_ids" in forward_params
        )
        architecture = (config.architectures or [type(hf_model).__name__])[0]
        limit = max_input_length(config, tokenizer)
        if max_seq_len is not None:
            if max_seq_len < 1:
                raise ModelLoadError(f"max_seq_len must be positive, got {max_seq_len}")
            limit = min(limit, max_seq_len)
        model_id, reported_revision = source or (model, revision)
        info = EngineInfo(
            name="pytorch",
            model_id=model_id,
            revision=reported_revision,
            device=str(torch.device(dev)),
            dtype=_dtype_name(torch_dtype),
            architecture=architecture,
            num_labels=num_labels,
            max_input_length=limit,
            padded=True,
            max_batch_size=None,
            max_batch_tokens=None,
            id2label=id2label,
            extra={
                "attn_implementation": attn,
                "model_type": config.model_type,
                "torch_threads": torch.get_num_threads(),
            },
        )
        logger.info(
            "model loaded",
            extra={
                "model": model,
                "revision": revision,
                "architecture": architecture,
                "device": info.device,
                "dtype": info.dtype,
                "attn_implementation": attn,
                "num_labels": num_labels,
                "max_input_length": info.max_input_length,
                "load_s": round(time.perf_counter() - started, 3),
            },
        )
        return cls(hf_model, tokenizer, info, use_token_type_ids=use_tt)

    @property
    def info(self) -> EngineInfo:
        return self._info

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    @property
    def uses_token_type_ids(self) -> bool:
        return self._use_token_type_ids

    def score(self, batch: Sequence[EncodedPair]) -> np.ndarray:
        n = len(batch)
        if n == 0:
            return np.zeros((0, self._info.num_labels), dtype=np.float32)
        longest = max(len(p) for p in batch)
        if longest > self._info.max_input_length:
            raise ValueError(
                f"a sequence of {longest} tokens exceeds the model's limit of {self._info.max_input_length}"
            )
        # Pad to the longest sequence of this batch only; padded positions are masked out.
        ids = np.full((n, longest), self._pad_id, dtype=np.int64)
        mask = np.zeros((n, longest), dtype=np.int64)
        types = np.zeros((n, longest), dtype=np.int64) if self._use_token_type_ids else None
        for i, pair in enumerate(batch):
            length = len(pair.input_ids)
            ids[i, :length] = pair.input_ids
            mask[i, :length] = 1
            if types is not None and pair.token_type_ids is not None:
                types[i, :length] = pair.token_type_ids
        inputs = {
            "input_ids": torch.from_numpy(ids).to(self._device),
            "attention_mask": torch.from_numpy(mask).to(self._device),
        }
        if types is not None:
            inputs["token_type_ids"] = torch.from_numpy(types).to(self._device)
        with torch.inference_mode():
            logits = self._model(**inputs).logits
        return logits.float().cpu().numpy()

    def close(self) -> None:
        # Only cached allocator blocks are released: the weights go with the engine object.
        # Keeping the engine usable lets a caller that injected it (tests, an embedding app)
        # reuse it after a service on top of it has stopped.
        if self._device.type == "cuda":
            torch.cuda.empty_cache()


def _check_supported(model: str, config: Any) -> None:
    model_type = getattr(config, "model_type", None)
    architectures = list(getattr(config, "architectures", None) or [])
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelLoadError(
            f"{model!r} is a {model_type!r} model ({', '.join(architectures) or 'unknown architecture'}); "
            f"this runtime serves BERT-family cross-encoders only (model_type one of "
            f"{', '.join(sorted(SUPPORTED_MODEL_TYPES))}), e.g. BAAI/bge-reranker-large"
        )
    if not any(a.endswith("ForSequenceClassification") for a in architectures):
        raise ModelLoadError(
            f"{model!r} is not a cross-encoder: its architecture is {', '.join(architectures) or 'not declared'}, "
            "not *ForSequenceClassification. A base or embedding checkpoint has no trained scoring head; "
            "use a reranker checkpoint (e.g. BAAI/bge-reranker-large) or declare "
            "'architectures': ['...ForSequenceClassification'] in config.json if the head is trained"
        )


def _load_model(
    auto_cls: Any, model: str, revision: str | None, dtype: torch.dtype
) -> tuple[Any, str]:
    """Load with SDPA attention, falling back to eager where a model does not support it."""
    last_exc: Exception | None = None
    for attn in ("sdpa", "eager"):
        try:
            hf_model, loading_info = auto_cls.from_pretrained(
                model,
                revision=revision,
                dtype=dtype,
                attn_implementation=attn,
                output_loading_info=True,
            )
        except (ValueError, ImportError) as exc:
            if attn == "sdpa" and "attn" in str(exc).lower():
                logger.info(
                    "SDPA not supported by this model; using eager attention",
                    extra={"error": str(exc)},
                )
                last_exc = exc
                continue
            raise ModelLoadError(f"cannot load the weights of {model!r}: {exc}") from exc
        except Exception as exc:
            raise ModelLoadError(f"cannot load the weights of {model!r}: {exc}") from exc
        missing = [
            k for k in loading_info.get("missing_keys", []) if "classifier" in k or "score" in k
        ]
        if missing:
            raise ModelLoadError(
                f"{model!r} has no trained classification head (missing weights: {', '.join(sorted(missing))}); "
                "its scores would be random. Use a cross-encoder checkpoint (e.g. BAAI/bge-reranker-large)"
            )
        return hf_model, attn
    raise ModelLoadError(f"cannot load {model!r} with any attention implementation: {last_exc}")
