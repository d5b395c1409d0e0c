"""`serve --engine-dir DIR`: read the manifest and load the engine it describes.

The serve-time loader of what `reranker-runtime build` (reranker_runtime.engine_build) writes.
It lives with the engines because it is how engines are loaded; the build package may depend on
the engines, never the reverse.

"pytorch"      -> reranker_runtime.engines.torch_engine.TorchEngine on `<dir>/checkpoint`
"tensorrt-llm" -> reranker_runtime.engines.trtllm_engine.TrtLlmEngine on `<dir>/engine`, refused on
                  a GPU other than the one it was built for (the message names both).

Serving from an engine directory never reaches a model hub: HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE
are set before anything is loaded.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

from reranker_runtime.config import ServeSettings
from reranker_runtime.engines.base import Engine
from reranker_runtime.engines.gpu import describe, detect_gpu, same_gpu
from reranker_runtime.engines.manifest import GpuInfo, Manifest, ManifestError, read_manifest
from reranker_runtime.errors import ModelLoadError

log = logging.getLogger(__name__)


def set_offline() -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"


def check_serving_gpu(manifest: Manifest, current: GpuInfo | None, engine_dir: str | Path) -> None:
    """Refuse a TensorRT-LLM engine on a GPU other than the one it was built for."""
    built = manifest.gpu
    assert built is not None  # read_manifest guarantees it for tensorrt-llm
    if current is None:
        raise ModelLoadError(
            f"{engine_dir} holds a TensorRT-LLM engine built for {describe(built)}, but no CUDA GPU is "
            "visible to this container"
        )
    if not same_gpu(built, current):
        raise ModelLoadError(
            f"{engine_dir} holds a TensorRT-LLM engine built for {describe(built)}, but this pod runs on "
            f"{describe(current)}; TensorRT engines only run on the GPU model they were built on. "
            f"Rebuild the engine for this accelerator (--accelerator), or schedule the pods on {built.name} nodes."
        )


def check_serving_versions(
    manifest: Manifest, installed: dict[str, str], engine_dir: str | Path
) -> None:
    """A TensorRT plan only deserializes with the TensorRT (and TRT-LLM plugins) that built it."""
    for dist in ("tensorrt_llm", "tensorrt"):
        built, here = manifest.versions.get(dist), installed.get(dist)
        if built and here and built != here:
            raise ModelLoadError(
                f"{engine_dir} was built with {dist} {built}, but this image has {dist} {here}; "
                "engines only load with the TensorRT/TensorRT-LLM version that built them. Rebuild the "
                "engine with this image (`reranker-runtime build`), or serve with the image that built it."
            )


def load_engine_from_dir(
    path: str,
    settings: ServeSettings,
    *,
    gpu_detector: Callable[[], GpuInfo | None] = detect_gpu,
) -> Engine:
    set_offline()
    directory = Path(path)
    try:
        manifest = read_manifest(directory)
    except ManifestError as e:
        raise ModelLoadError(f"cannot serve {directory}: {e}") from e
    log.info(
        "loading engine directory",
        extra={
            "engine_dir": str(directory),
            "engine": manifest.engine,
            "checkpoint": manifest.inputs.checkpoint_repo,
            "revision": manifest.resolved_revision or manifest.inputs.revision,
            "built_at": manifest.created_at,
        },
    )
    if manifest.engine == "pytorch":
        from reranker_runtime.engines.torch_engine import TorchEngine

        ckpt = directory / (manifest.paths.get("checkpoint") or "checkpoint")
        return TorchEngine.load(
            str(ckpt),
            None,
            settings.device,
            settings.dtype,
            max_seq_len=manifest.inputs.max_seq_len,
            source=(
                manifest.inputs.checkpoint_repo,
                manifest.resolved_revision or manifest.inputs.revision,
            ),
        )

    # Imported here, not at the top: only a TensorRT-LLM directory needs this module.
    from reranker_runtime.engines.trtllm_engine import TrtLlmEngine, installed_versions

    check_serving_gpu(manifest, gpu_detector(), directory)
    check_serving_versions(manifest, installed_versions(), directory)

    device = settings.device if settings.device.startswith("cuda") else "cuda"
    return TrtLlmEngine.load(directory, manifest, device=device)
