"""Pick and load the engine a `serve` invocation asks for."""

from __future__ import annotations

from reranker_runtime import config
from reranker_runtime.config import ServeSettings
from reranker_runtime.engines.base import Engine
from reranker_runtime.engines.engine_dir import load_engine_from_dir


def create_engine(settings: ServeSettings) -> Engine:
    """`--engine-dir` (a prepared engine directory) wins over `--model`; with neither, the
    default model is loaded with the PyTorch engine. Raises ModelLoadError."""
    if settings.engine_dir:
        return load_engine_from_dir(settings.engine_dir, settings)

    # Imported here: torch takes seconds to import, and `--help` should not wait for it.
    from reranker_runtime.engines.torch_engine import TorchEngine

    model = settings.model or config.DEFAULT_MODEL
    return TorchEngine.load(model, settings.revision, settings.device, settings.dtype)
