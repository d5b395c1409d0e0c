"""TensorRT-LLM on a real GPU: build a tiny engine, load it, serve it; scores within fp16
tolerance of the PyTorch fp32 reference. Skipped without tensorrt_llm and a supported GPU."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from engines.helpers import ServeProcess, inputs

pytestmark = pytest.mark.trtllm

PAIRS = [
    ("what is the capital of france", "paris is the capital city of france"),
    ("gpu inference", "bananas and apples are fruit"),
    ("deep learning", "a fast model for search and rank of passage text with relevance"),
    ("kubernetes cluster", "the server sends a response to the client request"),
    ("a", "b"),
]


def _accelerator() -> str:
    try:
        import tensorrt_llm  # noqa: F401
    except ImportError as e:
        pytest.skip(f"tensorrt_llm is not installed ({e})")
    from reranker_runtime.engine_build import gpu
    from reranker_runtime.engines.gpu import detect_gpu

    detected = detect_gpu()
    if detected is None:
        pytest.skip("no CUDA GPU visible")
    for name in gpu.GPU_ACCELERATORS:
        if gpu.matches(name, detected):
            return name
    pytest.skip(f"{detected.name} is not one of the accelerator types {gpu.GPU_ACCELERATORS}")


def _tiny_trt_compatible(kind: str, out: Path) -> Path:
    """A tests/tiny_models checkpoint (same tokenizer) re-initialised with intermediate_size =
    4 * hidden_size (TensorRT-LLM's BERT layer hard-codes a 4x MLP) and head size 32."""
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from tiny_models import build_tiny_model

    src = build_tiny_model(kind, out / "src")
    cfg = AutoConfig.from_pretrained(src)
    cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size = 64, 2, 256
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():  # the wide init tiny_models uses, so pair mix-ups show
            if p.dim() > 1:
                p.normal_(std=0.5)
    dst = out / kind
    model.save_pretrained(dst, safe_serialization=True)
    for f in src.iterdir():
        if f.name.startswith("tokenizer") or f.name in ("special_tokens_map.json", "vocab.txt"):
            shutil.copy(f, dst / f.name)
    return dst


@pytest.mark.parametrize("kind", ["xlmr-reranker", "bert-reranker"])
def test_trtllm_engine_matches_reference(kind: str, tmp_path: Path) -> None:
    accel = _accelerator()
    from reranker_runtime.config import ServeSettings
    from reranker_runtime.engine_build.command import run_build
    from reranker_runtime.engines.base import EncodedPair
    from reranker_runtime.engines.engine_dir import load_engine_from_dir
    from reranker_runtime.engines.manifest import read_manifest
    from tiny_models import reference_logits

    ckpt = _tiny_trt_compatible(kind, tmp_path)
    out = tmp_path / "engine-dir"
    res = run_build(inputs(ckpt, accelerator=accel, max_num_tokens=1024), out)
    assert res.status == "built"
    m = read_manifest(out)
    assert (
        m.engine == "tensorrt-llm" and m.build.max_input_len == 128 and m.build.max_batch_size == 8
    )
    assert "tensorrt_llm" in m.versions

    engine = load_engine_from_dir(str(out), ServeSettings(device="cuda"))
    info = engine.info
    assert (info.name, info.padded, info.max_batch_size, info.max_batch_tokens) == (
        "tensorrt-llm",
        False,
        8,
        1024,
    )
    engine.warmup(1024)
    encs = [engine.tokenizer(q, d) for q, d in PAIRS]
    got = engine.score([EncodedPair(e["input_ids"], e.get("token_type_ids")) for e in encs])
    ref = np.asarray(reference_logits(ckpt, PAIRS), dtype=np.float32)
    assert got.dtype == np.float32 and got.shape == ref.shape
    np.testing.assert_allclose(got, ref, atol=5e-2, rtol=2e-2)
    # batching must not change a score beyond fp16 noise
    alone = np.concatenate(
        [engine.score([EncodedPair(e["input_ids"], e.get("token_type_ids"))]) for e in encs]
    )
    np.testing.assert_allclose(got, alone, atol=2e-2)
    engine.close()

    query, texts = PAIRS[0][0], [d for _, d in PAIRS]
    with ServeProcess(
        {"RERANKER_ENGINE_DIR": str(out), "RERANKER_MAX_BATCH_TOKENS": "1024"}, timeout=300
    ) as server:
        served = server.rerank_raw(query, texts)
    ref_q = reference_logits(ckpt, [(query, t) for t in texts])
    np.testing.assert_allclose(served, [x[0] for x in ref_q], atol=5e-2, rtol=2e-2)
