"""`reranker-runtime build`: checkpoint fetch + validation, manifest, TensorRT-LLM engine build,
atomic output; and `load_engine_from_dir` for `serve --engine-dir` (build/engine_dir.py)."""
