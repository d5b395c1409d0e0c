"""Pick and load the engine a `serve` invocation asks for.

`--engine` (RERANKER_ENGINE):

    torch    the padded transformers model (engines/torch_engine.py), CPU or CUDA
    packed   the padding-free PyTorch engine (engines/packed_engine.py), CPU or CUDA
    trtllm   the TensorRT-LLM engine of an `--engine-dir` built with `reranker-runtime build`
    auto     (default) see `choose_engine`
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
from pathlib import Path

from reranker_runtime import config
from reranker_runtime.config import ServeSettings
from reranker_runtime.cpu_threads import applied_cpu_plan, plan_cpu_threads
from reranker_runtime.engines.base import Engine
from reranker_runtime.engines.engine_dir import load_engine_from_dir, set_offline
from reranker_runtime.engines.manifest import ManifestError, read_manifest
from reranker_runtime.errors import ModelLoadError

logger = logging.getLogger(__name__)


def trtllm_installed() -> bool:
    return importlib.util.find_spec("tensorrt_llm") is not None


def choose_engine(
    requested: str, *, device: str, engine_dir_kind: str | None, trtllm_available: bool
) -> str:
    """The engine to load: "torch", "packed" or "trtllm".

    auto: an engine directory holding a TensorRT-LLM engine -> trtllm when TensorRT-LLM is
    installed, else the packed engine on the directory's checkpoint (logged); otherwise packed,
    on GPUs (no padding, varlen attention) and CPUs alike (fused QKV, no masks, the last layer's
    FFN for the first tokens only: faster than the padded model, docs/benchmarks.md).
    A model the packed engine does not handle stays on the padded one (create_engine).
    Raises ModelLoadError for a choice that cannot work."""
    if requested == "trtllm":
        if engine_dir_kind != "tensorrt-llm":
            raise ModelLoadError(
                "--engine trtllm serves a TensorRT-LLM engine directory (`reranker-runtime build` "
                "on a GPU, then --engine-dir DIR); "
                + (
                    f"{engine_dir_kind!r} engine directories hold a checkpoint only: use --engine torch or packed"
                    if engine_dir_kind
                    else "none was given"
                )
            )
        return "trtllm"
    if requested in ("torch", "packed"):
        return requested
    if requested != "auto":
        raise ModelLoadError(
            f"unknown --engine {requested!r}; use {', '.join(config.ENGINE_CHOICES)}"
        )
    if engine_dir_kind == "tensorrt-llm":
        if trtllm_available:
            return "trtllm"
        logger.warning(
            "the engine directory holds a TensorRT-LLM engine but tensorrt_llm is not installed "
            "here; serving its checkpoint with the packed PyTorch engine"
        )
    return "packed"


def create_engine(settings: ServeSettings) -> Engine:
    """`--engine-dir` (a prepared engine directory) wins over `--model`; with neither, the
    default model. On CPU a reentrant engine runs `--cpu-workers` forward passes at once.
    Raises ModelLoadError."""
    from reranker_runtime.engines.torch_engine import resolve_device

    try:
        device = resolve_device(settings.device)
    except ModelLoadError as exc:  # --device cuda with no GPU visible: a driver may be why
        problem = _gpu_driver_problem()
        raise ModelLoadError(f"{exc}. {problem}" if problem else str(exc)) from None
    applied = applied_cpu_plan()
    if device != "cpu" and applied is not None:
        # No CPU forward workers on a GPU: `serve` split the CPUs among them before it knew
        # the device, so give them all back to the one host-side thread pool.
        import torch

        torch.set_num_threads(applied.single_pass_threads)
    # Not configured by `serve` (a test, an embedding application): what the settings give.
    plan = applied or plan_cpu_threads(settings.torch_threads, settings.cpu_workers)
    engine = _create_engine(settings, device)
    if device == "cpu" and settings.dtype == "auto" and engine.info.dtype == "float32":
        _suggest_bfloat16()
    if device == "cpu" and engine.reentrant_on_cpu:
        engine.max_concurrent_scores = plan.workers
        logger.info(
            "cpu forward workers",
            extra={"cpu_workers": plan.workers, "torch_threads": plan.threads},
        )
    return engine


def _create_engine(settings: ServeSettings, device: str) -> Engine:
    if device == "cpu" and settings.device == "auto":
        _warn_if_the_gpu_is_unusable()
    kind = _engine_dir_kind(settings.engine_dir) if settings.engine_dir else None
    chosen = choose_engine(
        settings.engine,
        device=device,
        engine_dir_kind=kind,
        trtllm_available=kind == "tensorrt-llm" and trtllm_installed(),
    )
    logger.info("engine chosen", extra={"requested": settings.engine, "engine": chosen})
    if settings.cpu_kernels == "onednn":
        if device != "cpu":
            logger.warning("--cpu-kernels applies on CPU only; ignored on %s", device)
        elif chosen != "packed":
            raise ModelLoadError(
                f"--cpu-kernels onednn needs the packed engine, not --engine {settings.engine} "
                f"({chosen}); use --engine packed or auto, or drop --cpu-kernels"
            )

    if chosen == "trtllm":
        from reranker_runtime.engines.cuda_driver import ensure_driver_supported

        ensure_driver_supported()  # names the host driver and the one the image's CUDA needs
    engine_dir = settings.engine_dir
    if engine_dir and not (kind == "tensorrt-llm" and chosen != "trtllm"):
        logger.info("loading prepared engine directory", extra={"engine_dir": engine_dir})
        if chosen == "packed" and settings.dtype == "auto":
            settings = dataclasses.replace(settings, dtype=_packed_default_dtype(device))
        engine = load_engine_from_dir(engine_dir, settings)
        return (
            _to_packed(engine, settings, strict=_packed_required(settings, device))
            if chosen == "packed"
            else engine
        )

    if engine_dir:  # a TensorRT-LLM directory served by a PyTorch engine
        return _load_checkpoint_of(engine_dir, settings, chosen, device)

    model = settings.model or config.DEFAULT_MODEL
    if chosen == "torch":
        from reranker_runtime.engines.torch_engine import TorchEngine

        return TorchEngine.load(model, settings.revision, device, settings.dtype)
    return _load_packed(model, settings, device, strict=_packed_required(settings, device))


def _packed_required(settings: ServeSettings, device: str) -> bool:
    """Whether a model the packed engine cannot serve is an error rather than a fallback to the
    padded engine: it was asked for, by name or, on CPU, by its oneDNN kernels."""
    return settings.engine == "packed" or (device == "cpu" and settings.cpu_kernels == "onednn")


def _gpu_driver_problem() -> str | None:
    """A GPU node whose driver is too old for the image's CUDA shows no GPU to PyTorch: why."""
    from reranker_runtime.engines import cuda_driver

    return cuda_driver.driver_problem(
        cuda_driver.host_driver_version(), cuda_driver.image_cuda_version()
    )


def _warn_if_the_gpu_is_unusable() -> None:
    """Say why instead of serving on CPU without a word."""
    problem = _gpu_driver_problem()
    if problem:
        logger.warning("no usable GPU, serving on CPU: %s", problem)


def _suggest_bfloat16() -> None:
    """float32 is the CPU default (bfloat16 moves scores: the user chooses that), but a CPU
    that computes bfloat16 natively serves it markedly faster: say so once, at start."""
    from reranker_runtime.engines.torch_engine import cpu_has_native_bf16

    if cpu_has_native_bf16():
        logger.info(
            "this CPU computes bfloat16 natively (avx512_bf16 or amx_bf16): --dtype bfloat16 "
            "served about 1.3x float32's throughput on such a CPU, scores within about 1e-3 of "
            "float32's (docs/benchmarks.md); float32 stays the default"
        )


def _packed_default_dtype(device: str) -> str:
    from reranker_runtime.engines.packed_engine import default_dtype

    return default_dtype(device)


def _load_packed(
    model: str,
    settings: ServeSettings,
    device: str,
    *,
    strict: bool,
    max_seq_len: int | None = None,
    source: tuple[str, str | None] | None = None,
) -> Engine:
    from reranker_runtime.engines.torch_engine import TorchEngine

    dtype = _packed_default_dtype(device) if settings.dtype == "auto" else settings.dtype
    padded = TorchEngine.load(
        model,
        None if source else settings.revision,
        device,
        dtype,
        max_seq_len=max_seq_len,
        source=source,
    )
    return _to_packed(padded, settings, strict=strict)


def _to_packed(engine: Engine, settings: ServeSettings, *, strict: bool) -> Engine:
    """The packed engine over a loaded TorchEngine's model; under auto, a model the packed
    engine does not handle stays on the padded one."""
    from reranker_runtime.engines.packed_engine import PackedEngine
    from reranker_runtime.engines.torch_engine import TorchEngine

    if not isinstance(engine, TorchEngine):
        return engine
    try:
        return PackedEngine.from_torch_engine(
            engine,
            compile_model=settings.torch_compile,
            cuda_graphs=settings.cuda_graphs,
            cpu_kernels=settings.cpu_kernels,
        )
    except ModelLoadError as exc:
        if strict:
            raise
        logger.warning("serving with the padded PyTorch engine: %s", exc)
        return engine


def _engine_dir_kind(engine_dir: str) -> str | None:
    """The manifest's engine kind, or None when it cannot be read (the directory loader then
    reports what is wrong)."""
    try:
        manifest = json.loads((Path(engine_dir) / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    kind = manifest.get("engine") if isinstance(manifest, dict) else None
    return kind if isinstance(kind, str) else None


def _load_checkpoint_of(
    engine_dir: str, settings: ServeSettings, chosen: str, device: str
) -> Engine:
    """Serve the checkpoint cached in a TensorRT-LLM engine directory with a PyTorch engine."""
    set_offline()
    try:
        manifest = read_manifest(engine_dir)
    except ManifestError as e:
        raise ModelLoadError(f"cannot serve {engine_dir}: {e}") from e
    checkpoint = str(Path(engine_dir) / (manifest.paths.get("checkpoint") or "checkpoint"))
    source = (
        manifest.inputs.checkpoint_repo,
        manifest.resolved_revision or manifest.inputs.revision,
    )
    if chosen == "torch":
        from reranker_runtime.engines.torch_engine import TorchEngine

        return TorchEngine.load(
            checkpoint,
            None,
            device,
            settings.dtype,
            max_seq_len=manifest.inputs.max_seq_len,
            source=source,
        )
    return _load_packed(
        checkpoint,
        settings,
        device,
        strict=True,
        max_seq_len=manifest.inputs.max_seq_len,
        source=source,
    )
