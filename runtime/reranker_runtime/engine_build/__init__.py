"""`reranker-runtime build`: checkpoint fetch + validation, TensorRT-LLM engine build (or the
checkpoint cached for the PyTorch engine), and the atomic output of an engine directory.

Serving such a directory is the engines' job (reranker_runtime.engines.engine_dir); this package
may import the engines and reranker_runtime.model_family, never the reverse."""
