"""Session-wide fixtures: tiny local checkpoints (no hub), shared by every test area."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Never reach a model hub from tests.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tiny-models")


@pytest.fixture(scope="session")
def xlmr_reranker(tiny_models_dir: Path) -> Path:
    """XLM-RoBERTa reranker (one label), like bge-reranker-large but tiny."""
    from tiny_models import build_tiny_model

    return build_tiny_model("xlmr-reranker", tiny_models_dir / "xlmr-reranker")


@pytest.fixture(scope="session")
def bert_reranker(tiny_models_dir: Path) -> Path:
    """BERT reranker (one label, token_type_ids in use)."""
    from tiny_models import build_tiny_model

    return build_tiny_model("bert-reranker", tiny_models_dir / "bert-reranker")


@pytest.fixture(scope="session")
def xlmr_classifier(tiny_models_dir: Path) -> Path:
    """XLM-RoBERTa classifier with three labels (served by /predict only)."""
    from tiny_models import build_tiny_model

    return build_tiny_model("xlmr-classifier", tiny_models_dir / "xlmr-classifier")
