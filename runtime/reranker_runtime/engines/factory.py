"""Pick and load the engine a `serve` invocation asks for."""

from __future__ import annotations

import logging

from reranker_runtime import config
from reranker_runtime.config import ServeSettings
from reranker_runtime.engines.base import Engine

logger = logging.getLogger(__name__)


def create_engine(settings: ServeSettings) -> Engine:
    """`--engine-dir` (a prepared engine directory) wins over `--model`; with neither, the
    default model is loaded with the PyTorch engine. Raises ModelLoadError."""
    if settings.engine_dir:
        # Imported lazily: the engine-directory loader may pull in TensorRT-LLM.
        from reranker_runtime.build.engine_dir import load_engine_from_dir

        logger.info("loading prepared engine directory", extra={"engine_dir": settings.engine_dir})
        return load_engine_from_dir(settings.engine_dir, settings)

    from reranker_runtime.engines.torch_engine import TorchEngine

    model = settings.model or config.DEFAULT_MODEL
    return TorchEngine.load(model, settings.revision, settings.device, settings.dtype)
