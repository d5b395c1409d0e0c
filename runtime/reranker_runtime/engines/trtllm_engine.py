"""TensorRT-LLM engine: runs a `reranker-runtime build` engine directory on a CUDA GPU.

Packed input (the engine is built with remove_input_padding), as TensorRT-LLM's own BERT example
feeds it (examples/models/core/bert/run.py and utils.py `process_input`):

    input_ids       int32 [num_tokens]   every sequence's ids, concatenated
    input_lengths   int32 [batch]
    token_type_ids  int32 [num_tokens]   zeros for RoBERTa/XLM-R ("Roberta doesn't have
                                         token_type_ids, use all zeros")
    position_ids    int32 [num_tokens]   arange(len) per sequence, + padding_idx + 1 for
                                         RoBERTa/XLM-R (process_input: `position_ids + 1 + padding_idx`)
    max_input_length int32 [max_len]     only its shape matters (process_input:
                                         `torch.empty((max_input_length,))`)

and reads `logits` [batch, num_labels] (float32: BERTConfig sets logits_dtype='float32').
Shapes go through `Session.infer_shapes([TensorInfo(name, trt.DataType.INT32, shape)])`, outputs
are allocated from the inferred TensorInfo with `trt_dtype_to_torch`, then `Session.run(inputs,
outputs, stream)` (tensorrt_llm/runtime/session.py) on torch CUDA tensors.

Everything touching torch/tensorrt/tensorrt_llm is imported inside methods, so this module (and
`pack_batch`, which is pure numpy) imports without them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from reranker_runtime.engines.base import (
    EncodedPair,
    Engine,
    EngineInfo,
    packed_warmup_passes,
    release_cached_memory,
)
from reranker_runtime.engines.staging import Float32Readback, Int32Staging
from reranker_runtime.errors import EngineError, ModelLoadError
from reranker_runtime.model_family import ModelFamily

if TYPE_CHECKING:
    from reranker_runtime.engines.manifest import Manifest

log = logging.getLogger(__name__)

INPUT_NAMES = ("input_ids", "input_lengths", "token_type_ids", "position_ids", "max_input_length")


def installed_versions() -> dict[str, str]:
    """The installed TensorRT-LLM and TensorRT versions (empty without them): a TensorRT plan only
    deserializes with the versions that built it, so build records them and serve compares."""
    out: dict[str, str] = {}
    for dist in ("tensorrt_llm", "tensorrt"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[dist] = metadata.version(dist)
    return out


def pack_batch(batch: Sequence[EncodedPair], *, position_offset: int) -> dict[str, np.ndarray]:
    """Packed (padding-free) int32 inputs for a BERT-family TensorRT-LLM engine."""
    if not batch:
        raise ValueError("cannot pack an empty batch")
    lengths = np.fromiter((len(p.input_ids) for p in batch), dtype=np.int32, count=len(batch))
    if (lengths < 1).any():
        raise ValueError("every sequence needs at least one token")
    input_ids = np.concatenate([np.asarray(p.input_ids, dtype=np.int32) for p in batch])
    token_types = []
    for p in batch:
        if p.token_type_ids is None:
            token_types.append(np.zeros(len(p.input_ids), dtype=np.int32))
        else:
            if len(p.token_type_ids) != len(p.input_ids):
                raise ValueError(
                    f"token_type_ids has {len(p.token_type_ids)} entries for {len(p.input_ids)} input_ids"
                )
            token_types.append(np.asarray(p.token_type_ids, dtype=np.int32))
    position_ids = np.concatenate([np.arange(n, dtype=np.int32) + position_offset for n in lengths])
    return {
        "input_ids": input_ids,
        "input_lengths": lengths,
        "token_type_ids": np.concatenate(token_types),
        "position_ids": position_ids,
        "max_input_length": np.zeros(int(lengths.max()), dtype=np.int32),
    }


class TrtLlmEngine(Engine):
    def __init__(
        self,
        *,
        session: Any,
        tokenizer: Any,
        info: EngineInfo,
        position_offset: int,
        use_token_types: bool,
        device: str,
    ) -> None:
        self._session = session
        self._tokenizer = tokenizer
        self._info = info
        self._position_offset = position_offset
        self._use_token_types = use_token_types
        self._device = device
        self._lock = threading.Lock()
        self._stream: Any = None
        # Reused pinned host / device buffers (created with the stream, on the engine's GPU).
        self._staging: Int32Staging | None = None
        self._readback: Float32Readback | None = None
        self._outputs: dict[str, Any] = {}
        self._input_names: set[str] | None = None

    # ----------------------------------------------------------------------------------- load

    @classmethod
    def load(
        cls,
        engine_dir: str | Path,
        manifest: Manifest,
        *,
        device: str = "cuda",
        model_id: str | None = None,
    ) -> TrtLlmEngine:
        """Load `<engine_dir>/engine/rank0.engine` and the tokenizer from `<engine_dir>/checkpoint`.

        `manifest` is the directory's manifest, already validated and GPU-checked
        (reranker_runtime.engines.engine_dir). Model-family facts (position offset, token types,
        max length) come from the checkpoint's config.json through reranker_runtime.model_family,
        as they did when the engine was built."""
        engine_dir = Path(engine_dir)
        trt_dir = engine_dir / (manifest.paths.get("engine") or "engine")
        ckpt_dir = engine_dir / (manifest.paths.get("checkpoint") or "checkpoint")
        try:
            import torch
            from tensorrt_llm.runtime import Session
        except ImportError as e:
            raise ModelLoadError(
                f"{engine_dir} holds a TensorRT-LLM engine, but tensorrt_llm is not importable here ({e}); "
                "serve it with the TensorRT-LLM runtime image"
            ) from e
        if not torch.cuda.is_available():
            raise ModelLoadError(
                f"{engine_dir} holds a TensorRT-LLM engine, which needs a CUDA GPU; none is visible"
            )

        try:
            config = json.loads((trt_dir / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ModelLoadError(
                f"cannot read the TensorRT-LLM engine config {trt_dir / 'config.json'}: {e}"
            ) from e
        build_cfg = config.get("build_config", {})
        pretrained = config.get("pretrained_config", {})
        if not build_cfg.get("plugin_config", {}).get("remove_input_padding", False):
            raise ModelLoadError(
                f"{trt_dir} was built without remove_input_padding; rebuild it with `reranker-runtime build`"
            )
        world = pretrained.get("mapping", {}).get("world_size", 1)
        if world != 1:
            raise ModelLoadError(
                f"{trt_dir} is a {world}-GPU (tensor-parallel) engine; this runtime serves single-GPU engines"
            )
        max_batch = int(build_cfg.get("max_batch_size") or manifest.build.max_batch_size or 0)
        if max_batch < 1:
            raise ModelLoadError(
                f"{trt_dir} records no max_batch_size; rebuild it with `reranker-runtime build`"
            )
        max_len = int(build_cfg.get("max_input_len") or manifest.build.max_input_len)
        family = model_family_of(ckpt_dir, pretrained)
        # examples/models/core/bert/utils.py process_input: roberta positions + 1 + padding_idx.
        position_offset = family.position_offset
        num_labels = family.num_labels

        dev = device if device.startswith("cuda") else "cuda"
        torch_device = torch.device(dev)
        if torch_device.index is None:
            torch_device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(torch_device)
        engine_file = trt_dir / "rank0.engine"
        log.info(
            "loading TensorRT-LLM engine",
            extra={"engine_file": str(engine_file), "device": str(torch_device)},
        )
        try:
            session = Session.from_serialized_engine(engine_file.read_bytes())
        except Exception as e:
            raise ModelLoadError(
                f"cannot deserialize {engine_file}: {type(e).__name__}: {e}"
            ) from e

        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(ckpt_dir), use_fast=True)
        if not getattr(tokenizer, "is_fast", False):
            raise ModelLoadError(f"{ckpt_dir} has no fast tokenizer")
        info = EngineInfo(
            name="tensorrt-llm",
            model_id=model_id or manifest.inputs.checkpoint_repo,
            revision=manifest.resolved_revision or manifest.inputs.revision,
            device=str(torch_device),
            dtype=manifest.build.dtype,
            architecture=manifest.model.architecture,
            num_labels=num_labels,
            max_input_length=min(max_len, manifest.model.max_input_length),
            padded=False,
            max_batch_size=max_batch,
            max_batch_tokens=max_batch * max_len,
            extra={"engine_dir": str(engine_dir), "position_offset": position_offset},
        )
        engine = cls(
            session=session,
            tokenizer=tokenizer,
            info=info,
            position_offset=position_offset,
            use_token_types=family.uses_token_type_ids,
            device=str(torch_device),
        )
        engine._stream = torch.cuda.Stream(device=torch_device)
        engine._staging = Int32Staging(torch_device)
        engine._readback = Float32Readback()
        return engine

    # ------------------------------------------------------------------------------- interface

    @property
    def info(self) -> EngineInfo:
        return self._info

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    def _engine_inputs(self) -> set[str]:
        if self._input_names is None:
            import tensorrt as trt

            eng = self._session.engine
            names = (eng.get_tensor_name(i) for i in range(eng.num_io_tensors))
            self._input_names = {
                n for n in names if eng.get_tensor_mode(n) == trt.TensorIOMode.INPUT
            }
        return self._input_names

    def score(self, batch: Sequence[EncodedPair]) -> np.ndarray:
        info = self._info
        if not batch:
            return np.zeros((0, info.num_labels), dtype=np.float32)
        if info.max_batch_size is not None and len(batch) > info.max_batch_size:
            raise EngineError(
                f"batch of {len(batch)} sequences exceeds the engine's max batch size {info.max_batch_size}"
            )
        longest = max(len(p) for p in batch)
        if longest > info.max_input_length:
            raise EngineError(
                f"a sequence of {longest} tokens exceeds the engine's max input length {info.max_input_length}"
            )
        if not self._use_token_types:
            batch = [EncodedPair(p.input_ids, None) for p in batch]
        packed = pack_batch(batch, position_offset=self._position_offset)

        import tensorrt as trt
        import torch
        from tensorrt_llm._utils import trt_dtype_to_torch
        from tensorrt_llm.runtime import TensorInfo

        with self._lock, torch.cuda.device(self._device), torch.cuda.stream(self._stream):
            wanted = self._engine_inputs()
            missing = wanted - packed.keys()
            if missing:
                raise EngineError(
                    f"the engine expects inputs this runtime does not produce: {sorted(missing)}"
                )
            assert self._staging is not None and self._readback is not None
            # One pinned buffer, one non-blocking copy for all inputs (reused every batch).
            inputs = self._staging.stage({k: v for k, v in packed.items() if k in wanted})
            output_info = self._session.infer_shapes(
                [TensorInfo(name, trt.DataType.INT32, tuple(t.shape)) for name, t in inputs.items()]
            )
            outputs = {t.name: self._output(t, trt_dtype_to_torch) for t in output_info}
            if "logits" not in outputs:
                raise EngineError(f"the engine has no 'logits' output (outputs: {sorted(outputs)})")
            ok = self._session.run(inputs=inputs, outputs=outputs, stream=self._stream.cuda_stream)
            if not ok:
                raise EngineError("TensorRT execution failed (execute_async_v3 returned false)")
            host = self._readback.copy(outputs["logits"].float())
            self._stream.synchronize()  # the logits have arrived; the staging buffer is free again
            logits = host.numpy().copy()
        return logits.reshape(len(batch), info.num_labels).astype(np.float32, copy=False)

    def _output(self, tensor_info: Any, to_torch_dtype: Any) -> Any:
        """A view of a reused device buffer for this output, grown to the largest batch seen."""
        import torch

        shape = tuple(int(d) for d in tensor_info.shape)
        size = int(np.prod(shape)) if shape else 1
        dtype = to_torch_dtype(tensor_info.dtype)
        buffer = self._outputs.get(tensor_info.name)
        if buffer is None or buffer.numel() < size or buffer.dtype != dtype:
            buffer = torch.empty(size, dtype=dtype, device=self._device)
            self._outputs[tensor_info.name] = buffer
        return buffer[:size].view(shape)

    def warmup_plan(self, max_batch_tokens: int) -> list[tuple[int, int]]:
        """`packed_warmup_passes` within the profile's token and batch limits."""
        info = self._info
        budget = min(max_batch_tokens, info.max_batch_tokens or max_batch_tokens)
        return packed_warmup_passes(budget, info.max_input_length, info.max_batch_size or 1)

    def close(self) -> None:
        self._session = None
        release_cached_memory()


def model_family_of(ckpt_dir: Path, pretrained: dict[str, Any]) -> ModelFamily:
    """The model family of the checkpoint the engine was built from, checked against what
    TensorRT-LLM recorded in the engine config, so a mismatch fails loudly instead of
    mis-scoring (a wrong position offset shifts every position without an error)."""
    config_path = ckpt_dir / "config.json"
    try:
        family = ModelFamily.from_config(json.loads(config_path.read_text(encoding="utf-8")))
    except (OSError, ValueError) as e:  # UnsupportedModelError is a ValueError
        raise ModelLoadError(f"cannot use {config_path}: {e}") from e
    recorded_roberta = pretrained.get("is_roberta")
    recorded_pad = pretrained.get("pad_token_id")
    if (recorded_roberta is not None and bool(recorded_roberta) != family.is_roberta) or (
        family.is_roberta and recorded_pad is not None and recorded_pad != family.pad_token_id
    ):
        raise ModelLoadError(
            f"the TensorRT-LLM engine next to {config_path} was built for another model "
            f"(is_roberta {recorded_roberta}, pad_token_id {recorded_pad}; the checkpoint is a "
            f"{family.model_type} with pad_token_id {family.pad_token_id}); rebuild it with "
            "`reranker-runtime build`"
        )
    return family
