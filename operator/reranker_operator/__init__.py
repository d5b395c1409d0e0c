"""Kubernetes operator for Reranker custom resources."""

__version__ = "0.1.0"
