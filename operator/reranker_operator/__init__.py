"""Kubernetes operator for Reranker custom resources."""

from importlib.metadata import PackageNotFoundError, version

try:
    # The version is pyproject.toml's, read from the installed distribution (one source).
    __version__ = version("reranker-stack")
except PackageNotFoundError:  # a source tree on sys.path that was never installed
    __version__ = "0+unknown"
