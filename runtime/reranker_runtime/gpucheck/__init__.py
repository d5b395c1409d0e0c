"""`reranker-runtime gpu-check`: correctness and throughput of the GPU path in one command
(see gpucheck/command.py and docs/benchmarks.md)."""
