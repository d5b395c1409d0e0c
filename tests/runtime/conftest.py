"""Runtime test fixtures: real PyTorch engines on the tiny checkpoints, loaded once per session.

Engines are shared and never mutated: `TorchEngine.close()` keeps the weights, so a service built
on one may be stopped and the engine reused. Wrap one in `runtime.fakes.ControlledEngine` to hold,
delay or fail forward passes.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from reranker_runtime.engines.torch_engine import TorchEngine


@pytest.fixture(scope="session")
def xlmr_engine(xlmr_reranker: Path) -> TorchEngine:
    """XLM-R reranker (one label, no token_type_ids, max_input_length 128), fp32 on CPU."""
    return TorchEngine.load(str(xlmr_reranker), device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def bert_engine(bert_reranker: Path) -> TorchEngine:
    """BERT reranker (one label, token_type_ids in use), fp32 on CPU."""
    return TorchEngine.load(str(bert_reranker), device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def classifier_engine(xlmr_classifier: Path) -> TorchEngine:
    """XLM-R classifier with three labels (negative, neutral, positive), fp32 on CPU."""
    return TorchEngine.load(str(xlmr_classifier), device="cpu", dtype="float32")
