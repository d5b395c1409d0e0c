"""PyTorch engine: `transformers` AutoModelForSequenceClassification, SDPA attention, CPU or CUDA.

Serves the checkpoints `reranker_runtime.model_family` accepts (BERT, RoBERTa, XLM-RoBERTa
cross-encoders), with the limits it computes, so this engine, the TensorRT-LLM engine and
`reranker-runtime build` agree on what a model accepts.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from reranker_runtime import hub
from reranker_runtime.engines.base import (
    EncodedPair,
    Engine,
    EngineInfo,
    gpu_max_batch_size,
    release_cached_memory,
)
from reranker_runtime.errors import ModelLoadError
from reranker_runtime.model_family import ModelFamily, UnsupportedModelError

logger = logging.getLogger(__name__)

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


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


class TorchEngine(Engine):
    """Scores padded batches with a `transformers` sequence-classification model."""

    reentrant_on_cpu = True  # an eval-mode model under inference_mode: nothing is mutated

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

        # A hub id: ask the hub once, without retries, whether it can be reached at all (hub.py).
        # When it cannot, read the cache only instead of retrying for half a minute.
        hub_id = hub.looks_like_hub_id(model)
        offline = hub_id and hub.offline_mode()
        unreachable = hub.unreachable_reason(model, revision) if hub_id and not offline else None
        cache_only: dict[str, Any] = {"local_files_only": True} if unreachable else {}
        try:
            config = AutoConfig.from_pretrained(model, revision=revision, **cache_only)
        except Exception as exc:
            raise ModelLoadError(
                hub.config_error(model, revision, exc, offline=offline, unreachable=unreachable)
            ) from exc
        if unreachable:
            logger.warning(
                "the Hugging Face hub at %s cannot be reached (%s); loading %r from the hub cache "
                "at %s",
                hub.endpoint(),
                unreachable,
                model,
                hub.cache_dir(),
            )
        try:
            family = ModelFamily.from_config(config)
        except UnsupportedModelError as exc:
            raise ModelLoadError(f"cannot serve {model!r}: {exc}") from exc

        try:
            tokenizer = AutoTokenizer.from_pretrained(
                model, revision=revision, use_fast=True, **cache_only
            )
        except Exception as exc:
            raise ModelLoadError(
                f"cannot load the tokenizer of {model!r}: {hub.one_line(exc)}. The checkpoint "
                "needs a fast tokenizer (tokenizer.json)"
            ) from exc
        if not getattr(tokenizer, "is_fast", False):
            raise ModelLoadError(
                f"{model!r} has only a slow (Python) tokenizer; this runtime needs a fast tokenizer. "
                "Save one with tokenizer.save_pretrained() from a PreTrainedTokenizerFast (tokenizer.json)"
            )

        hf_model, attn = _load_model(
            AutoModelForSequenceClassification, model, revision, torch_dtype, cache_only
        )
        hf_model.to(dev)
        hf_model.eval()

        num_labels = family.num_labels
        id2label = {int(k): str(v) for k, v in (hf_model.config.id2label or {}).items()}
        architecture = family.architecture
        try:
            limit = family.max_input_length(getattr(tokenizer, "model_max_length", None))
        except UnsupportedModelError as exc:
            raise ModelLoadError(f"cannot serve {model!r}: {exc}") from exc
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
            max_batch_size=gpu_max_batch_size(str(torch.device(dev))),
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
        return cls(hf_model, tokenizer, info, use_token_type_ids=family.uses_token_type_ids)

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
            release_cached_memory()


def _load_model(
    auto_cls: Any,
    model: str,
    revision: str | None,
    dtype: torch.dtype,
    cache_only: dict[str, Any] | None = None,
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
                **(cache_only or {}),
            )
        except (ValueError, ImportError) as exc:
            if attn == "sdpa" and "attn" in str(exc).lower():
                logger.info(
                    "SDPA not supported by this model; using eager attention",
                    extra={"error": str(exc)},
                )
                last_exc = exc
                continue
            raise ModelLoadError(
                f"cannot load the weights of {model!r}: {hub.one_line(exc)}"
            ) from exc
        except Exception as exc:
            raise ModelLoadError(
                f"cannot load the weights of {model!r}: {hub.one_line(exc)}"
            ) from exc
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
