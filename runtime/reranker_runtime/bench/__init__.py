"""`reranker-runtime bench`: seeded rerank workload, HTTP load driver, in-process baselines."""
