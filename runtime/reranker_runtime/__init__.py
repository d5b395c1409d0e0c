"""Inference runtime: a BEI/TEI-compatible rerank server and engine preparation."""

__version__ = "0.1.0"
