"""TensorRT-LLM conversion and engine build for BERT-family sequence classifiers.

Written against TensorRT-LLM's own source (the TensorRT "engine" workflow, not its PyTorch flow):

- tensorrt_llm/models/bert/model.py: `BertForSequenceClassification` (and its alias
  `RobertaForSequenceClassification`), `BertBase.from_hugging_face(hf_model_or_dir, dtype,
  mapping, quant_config)`; `BertBase.prepare_inputs(max_batch_size, max_input_len)` declares, with
  `remove_input_padding`, the inputs input_ids/token_type_ids/position_ids [num_tokens],
  input_lengths [batch] and max_input_length [max_len] over the profile
  batch [1..B] x length [1..L] x num_tokens [1..B*L]; the output is `logits` (logits_dtype
  float32, tensorrt_llm/models/bert/config.py). It ignores BuildConfig.max_num_tokens.
- tensorrt_llm/builder.py: `build(model, build_config) -> Engine`, `BuildConfig(max_input_len,
  max_seq_len, max_batch_size, plugin_config, output_timing_cache, ...)`, `Engine.save(dir)`
  (writes config.json + rank0.engine).
- tensorrt_llm/plugin/plugin.py: `PluginConfig` fields bert_attention_plugin, remove_input_padding,
  context_fmha. examples/models/core/bert/README.md: remove_input_padding and context FMHA both
  require the BERT attention plugin.
- tensorrt_llm/models/bert/convert.py: `quantize()` only logs "FP8 Support for Bert will come soon!"
  and load_weights_from_hf_model has "#TODO: add quantization support": there is no FP8/FP4 (or
  INT8) path for BERT-family encoders, hence the refusal below.

Everything that imports tensorrt_llm does it inside a function, so this module imports without it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from reranker_runtime.engine_build.checkpoint import ModelSpec
from reranker_runtime.engine_build.errors import (
    BuildArgumentError,
    CheckpointInvalidError,
    EngineBuildError,
    QuantizationUnsupportedError,
)
from reranker_runtime.engines.trtllm_engine import installed_versions

log = logging.getLogger(__name__)

QUANTIZATIONS = ("no_quant", "fp8", "fp4")
ENGINE_DTYPE = "float16"
# Upper bound on the profile's batch dimension.
MAX_BATCH_SIZE_CAP = 512
# With packed input a batch costs sum(lengths), so B decides how many *short* sequences one pass
# may carry: B = max_num_tokens // SHORT_PAIR_TOKENS lets pairs of 64+ tokens fill the whole
# budget (B = max_num_tokens // L would cap 256-token pairs at half of it). The price: TensorRT
# sizes activation memory for the profile's largest shapes (num_tokens up to B*L).
SHORT_PAIR_TOKENS = 64
# The BERT engine's attention settings. fp32 accumulation in the fused context attention:
# TensorRT-LLM's default (fp16 accumulation, faster) can drift over 24 layers; off only if a
# GPU measurement shows the scores unchanged.
PLUGIN_SETTINGS: dict[str, object] = {
    "bert_attention_plugin": ENGINE_DTYPE,
    "remove_input_padding": True,
    "context_fmha": True,
    "bert_context_fmha_fp32_acc": True,
}


@dataclass(frozen=True)
class Profile:
    max_batch_size: int  # B: most sequences per forward pass
    max_input_len: int  # L: most tokens per sequence

    @property
    def max_num_tokens(self) -> int:
        return self.max_batch_size * self.max_input_len


def derive_profile(
    max_num_tokens: int, model_max_len: int, max_seq_len: int | None = None
) -> Profile:
    """The engine's batch/length profile from the Reranker's token budget.

    L = min(max_seq_len or model max, model max, max_num_tokens): a sequence may not exceed the
    model's positions nor the whole budget. B = max(1, max_num_tokens // min(L,
    SHORT_PAIR_TOKENS)), capped at MAX_BATCH_SIZE_CAP: one pass carries the whole budget for
    pairs of SHORT_PAIR_TOKENS tokens or more. The runtime still caps a pass at max_num_tokens.
    """
    if max_num_tokens < 1:
        raise BuildArgumentError(f"--max-num-tokens must be >= 1, got {max_num_tokens}")
    if model_max_len < 1:
        raise BuildArgumentError(f"the model's max length must be >= 1, got {model_max_len}")
    if max_seq_len is not None and max_seq_len < 1:
        raise BuildArgumentError(f"--max-seq-len must be >= 1, got {max_seq_len}")
    length = min(max_seq_len or model_max_len, model_max_len, max_num_tokens)
    batch = max(1, min(max_num_tokens // min(length, SHORT_PAIR_TOKENS), MAX_BATCH_SIZE_CAP))
    return Profile(max_batch_size=batch, max_input_len=length)


def check_quantization(quantization: str, accelerator: str, architecture: str | None = None) -> str:
    """The engine dtype for a quantization request, or a refusal that says why (never a silent fp16)."""
    q = quantization.lower()
    if q not in QUANTIZATIONS:
        raise BuildArgumentError(
            f"--quantization {quantization!r} is not one of {', '.join(QUANTIZATIONS)}"
        )
    if accelerator.upper() == "CPU":
        if q != "no_quant":
            raise BuildArgumentError(
                f"--quantization {q} is GPU-only: the CPU engine runs the checkpoint in float32; use no_quant"
            )
        return "float32"
    if q != "no_quant":
        what = architecture or "BERT/RoBERTa/XLM-RoBERTa *ForSequenceClassification"
        raise QuantizationUnsupportedError(
            f"--quantization {q} is not available for {what}: TensorRT-LLM has no {q.upper()} path for "
            "BERT-family encoders (its BERT converter has no quantization support; "
            "tensorrt_llm/models/bert/convert.py quantize() only logs 'FP8 Support for Bert will come soon!'), "
            "and every architecture this build supports is one. Use --quantization no_quant "
            "(a float16 engine with packed input and fused attention)."
        )
    return ENGINE_DTYPE


def check_trtllm_compatible(spec: ModelSpec) -> None:
    """Checkpoint features TensorRT-LLM's BERT model cannot represent: refuse rather than mis-score."""
    if spec.position_embedding_type != "absolute":
        # tensorrt_llm/models/bert/config.py BERTConfig.from_hugging_face raises NotImplementedError.
        raise CheckpointInvalidError(
            f"{spec.architecture} uses position_embedding_type {spec.position_embedding_type!r}; "
            "TensorRT-LLM's BERT supports only 'absolute'. Build it for CPU, or pick another checkpoint."
        )
    if (
        spec.hidden_size
        and spec.intermediate_size
        and spec.intermediate_size != 4 * spec.hidden_size
    ):
        # tensorrt_llm/models/bert/model.py BertEncoderLayer: MLP(ffn_hidden_size=hidden_size * 4).
        raise CheckpointInvalidError(
            f"{spec.architecture} has intermediate_size {spec.intermediate_size} != 4 x hidden_size "
            f"({spec.hidden_size}); TensorRT-LLM's BERT encoder layer hard-codes a 4x MLP, so the "
            "weights would not fit. Build it for CPU, or pick another checkpoint."
        )


def build_engine(
    checkpoint_dir: Path, engine_dir: Path, spec: ModelSpec, profile: Profile, scratch: Path
) -> dict[str, str]:
    """Convert the HF checkpoint and build a float16 engine into engine_dir; returns versions."""
    try:
        # Concrete modules rather than the package's re-exports: they hold in every 1.x release,
        # while what tensorrt_llm/__init__.py re-exports has moved between versions.
        import tensorrt_llm
        from tensorrt_llm.builder import BuildConfig
        from tensorrt_llm.builder import build as trtllm_build
        from tensorrt_llm.models.bert.model import (
            BertForSequenceClassification,
            RobertaForSequenceClassification,
        )
        from tensorrt_llm.plugin.plugin import PluginConfig
    except ImportError as e:
        raise EngineBuildError(
            "tensorrt_llm is not importable in this image, so a TensorRT-LLM engine cannot be built "
            f"({e}). Use the runtime image built from images/runtime.Dockerfile (NVIDIA's TensorRT-LLM "
            "release image), or --accelerator CPU for a PyTorch engine."
        ) from e

    check_trtllm_compatible(spec)
    cls = RobertaForSequenceClassification if spec.is_roberta else BertForSequenceClassification
    try:
        log.info(
            "converting %s to TensorRT-LLM (%s, dtype %s)",
            spec.architecture,
            cls.__name__,
            ENGINE_DTYPE,
        )
        # BertBase.from_hugging_face(hf_model_or_dir, dtype='float16', mapping=None, quant_config=None)
        model = cls.from_hugging_face(str(checkpoint_dir), dtype=ENGINE_DTYPE)

        plugin_config = PluginConfig()
        # Attribute assignment works for both the dataclass and the newer pydantic PluginConfig.
        for name, value in PLUGIN_SETTINGS.items():
            setattr(plugin_config, name, value)
        scratch.mkdir(parents=True, exist_ok=True)
        build_config = BuildConfig(
            max_batch_size=profile.max_batch_size,
            max_input_len=profile.max_input_len,
            max_seq_len=profile.max_input_len,
            # Ignored by BERT (its prepare_inputs profiles tokens up to B*L); B*L keeps
            # _common.check_max_num_tokens from clamping it with a warning.
            max_num_tokens=profile.max_num_tokens,
            plugin_config=plugin_config,
            # Default is 'model.cache' in the working directory, which may be read-only.
            output_timing_cache=str(scratch / "timing.cache"),
        )
        log.info(
            "building TensorRT engine: max_batch_size=%d max_input_len=%d (num_tokens <= %d), "
            "bert_attention_plugin=%s remove_input_padding context_fmha (fp32 accumulation)",
            profile.max_batch_size,
            profile.max_input_len,
            profile.max_num_tokens,
            ENGINE_DTYPE,
        )
        engine = trtllm_build(model, build_config)  # builder.build(model, build_config) -> Engine
        engine.save(str(engine_dir))
    except (CheckpointInvalidError, EngineBuildError):
        raise
    except Exception as e:  # TensorRT/TRT-LLM raise assertions, RuntimeErrors, ...
        raise EngineBuildError(f"TensorRT-LLM engine build failed: {type(e).__name__}: {e}") from e
    if not (engine_dir / "rank0.engine").is_file():
        raise EngineBuildError(
            f"TensorRT-LLM reported success but wrote no {engine_dir}/rank0.engine"
        )
    versions = installed_versions()
    versions.setdefault("tensorrt_llm", getattr(tensorrt_llm, "__version__", "unknown"))
    return versions
