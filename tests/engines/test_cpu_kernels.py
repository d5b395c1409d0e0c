"""The CPU engine's choices at load: oneDNN's fused linear kernels compute what PyTorch's ops
do, `auto` races them and falls back (a forced oneDNN refuses) with the reason, every activation
the BERT family uses scores like the transformers reference, and serve says when the CPU and the
dtype are a poor match."""

from __future__ import annotations

import gc
import json
import platform
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from reranker_runtime.config import ServeSettings
from reranker_runtime.engines import cpu_kernels, factory, torch_engine
from reranker_runtime.engines.base import EncodedPair
from reranker_runtime.engines.cpu_kernels import (
    AtenLinear,
    KernelChoice,
    LinearKernel,
    OneDnnLinear,
    activation_of,
    choose_cpu_kernels,
    onednn_problem,
    race_kernels,
)
from reranker_runtime.engines.packed_engine import PackedEngine
from reranker_runtime.engines.torch_engine import TorchEngine
from reranker_runtime.errors import ModelLoadError
from tiny_models import mixed_pairs, reference_logits

LOGIT_TOL = 1e-4


@pytest.mark.skipif(platform.machine() != "x86_64", reason="CI's CPUs are x86-64")
def test_onednn_works_in_float32_on_this_cpu() -> None:
    """CI's CPUs (x86 with AVX2 or AVX-512) all run oneDNN in float32, so `--cpu-kernels
    onednn` loads on them."""
    assert onednn_problem(torch.float32) is None
    assert choose_cpu_kernels("onednn", torch.float32).kernels == "onednn"


@pytest.mark.parametrize("act", ["gelu", "gelu_new", "gelu_pytorch_tanh", "relu", "silu"])
def test_fused_linear_computes_what_pytorch_does(act: str) -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(37, 48, generator=gen)
    w, b = torch.randn(80, 48, generator=gen) / 7, torch.randn(80, generator=gen)
    residual = torch.randn(37, 80, generator=gen)
    activation = activation_of(act, torch.nn.SiLU())
    want = activation.torch_fn(F.linear(x, w, b))
    for linear in (OneDnnLinear(w, b, activation), AtenLinear(w, b, activation)):
        torch.testing.assert_close(linear(x), want, atol=1e-5, rtol=1e-5)
    want_sum = F.linear(x, w, b) + residual
    for plain in (OneDnnLinear(w, b, None), AtenLinear(w, b, None)):
        torch.testing.assert_close(plain.add_to(x, residual.clone()), want_sum)


def test_activation_names() -> None:
    module = torch.nn.SiLU()
    assert activation_of("gelu", module).onednn == ("gelu", "none")  # exact (erf) GELU
    assert activation_of("gelu_new", module).onednn == ("gelu", "tanh")
    unknown = activation_of("silu", module)
    assert unknown.onednn is None and unknown.torch_fn is module  # runs after the GEMM


def test_auto_races_the_kernels_and_a_forced_onednn_is_probed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bge_large_ffn = (1024, 4096)
    for dtype in (torch.float32, torch.bfloat16):
        assert choose_cpu_kernels("aten", dtype, None, bge_large_ffn).kernels == "aten"
        tiny = choose_cpu_kernels("auto", dtype, None, (32, 64))
        assert tiny == KernelChoice("aten", "auto: model too small to time its GEMMs")
    measured: list[float] = []
    monkeypatch.setattr(cpu_kernels, "race_kernels", lambda *_a: measured[-1])
    measured.append(2.2)  # float32 on an AMD CPU with AVX-512: MKL stays on AVX2
    fast = choose_cpu_kernels("auto", torch.float32, None, bge_large_ffn)
    assert (fast.kernels, fast.onednn_speedup) == ("onednn", 2.2)
    assert "oneDNN ran 2.20x as fast as aten on this CPU" in fast.reason
    measured.append(1.25)  # the threshold itself is enough
    assert choose_cpu_kernels("auto", torch.float32, None, bge_large_ffn).kernels == "onednn"
    measured.append(1.24)  # within the host's noise: aten, which keeps the page-cache weights
    assert choose_cpu_kernels("auto", torch.float32, None, bge_large_ffn).kernels == "aten"

    def out_of_memory(*_a: object) -> float:
        raise RuntimeError("DefaultCPUAllocator: not enough memory\ndetail")

    monkeypatch.setattr(cpu_kernels, "race_kernels", out_of_memory)
    failed = choose_cpu_kernels("auto", torch.float32, None, bge_large_ffn)
    assert failed == KernelChoice(
        "aten", "auto: timing oneDNN failed: DefaultCPUAllocator: not enough memory"
    )
    monkeypatch.setattr(cpu_kernels, "onednn_problem", lambda *_a: "no bf16 ISA here")
    fallback = choose_cpu_kernels("auto", torch.bfloat16, None, bge_large_ffn)
    assert fallback == KernelChoice("aten", "auto: no bf16 ISA here")
    with pytest.raises(ValueError, match="no bf16 ISA here; use --cpu-kernels aten"):
        choose_cpu_kernels("onednn", torch.bfloat16)
    monkeypatch.setattr(cpu_kernels, "onednn_problem", lambda *_a: None)
    assert choose_cpu_kernels("onednn", torch.bfloat16).kernels == "onednn"
    with pytest.raises(ValueError, match="unknown cpu kernels 'fast'"):
        choose_cpu_kernels("fast", torch.float32)


def test_the_race_times_both_kernels_on_this_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, str]] = []
    for cls in (AtenLinear, OneDnnLinear):
        for method in ("__call__", "add_to"):
            real = getattr(cls, method)

            def counted(self: LinearKernel, *args: torch.Tensor, _real: Any = real,
                        _name: str = f"{cls.__name__}.{method}") -> torch.Tensor:  # fmt: skip
                calls.append((_name, "x".join(map(str, args[0].shape))))
                return _real(self, *args)

            monkeypatch.setattr(cls, method, counted)
    speedup = race_kernels(torch.float32, activation_of("gelu", torch.nn.GELU()), 64, 256)
    assert speedup > 0  # a ratio of two timings of the same work, not a fixed value
    # One warm-up and RACE_REPEATS timed feed-forward blocks per kernel set: the GEMM up
    # (256 tokens x hidden 64) and the GEMM down added to the residual (x intermediate 256).
    runs = 1 + cpu_kernels.RACE_REPEATS
    for cls in ("AtenLinear", "OneDnnLinear"):
        mine = [c for c in calls if c[0].startswith(cls)]
        assert mine == [(f"{cls}.__call__", "256x64"), (f"{cls}.add_to", "256x256")] * runs


def test_the_probe_runs_the_models_own_activation(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[object] = []
    real = OneDnnLinear.__init__

    def spy(self: OneDnnLinear, weight: torch.Tensor, bias: object, activation: object) -> None:
        seen.append(activation)
        real(self, weight, bias, activation)

    monkeypatch.setattr(OneDnnLinear, "__init__", spy)
    tanh_gelu = activation_of("gelu_new", torch.nn.GELU())
    assert onednn_problem(torch.float32, tanh_gelu) is None
    assert seen == [tanh_gelu]


def test_a_failing_probe_is_a_problem(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*_a: object, **_k: object) -> torch.Tensor:
        raise RuntimeError("could not create a primitive descriptor\nmore detail")

    monkeypatch.setattr(OneDnnLinear, "__call__", broken)
    problem = onednn_problem(torch.float32)
    assert problem is not None and "could not create a primitive descriptor" in problem
    assert "more detail" not in problem


def test_serve_picks_the_packed_engine_with_pytorchs_ops_on_cpu(xlmr_reranker: Path) -> None:
    engine = factory.create_engine(ServeSettings(model=str(xlmr_reranker), device="cpu"))
    assert isinstance(engine, PackedEngine)
    assert engine.info.extra["cpu_kernels"] == "aten"
    forced = factory.create_engine(
        ServeSettings(model=str(xlmr_reranker), device="cpu", cpu_kernels="onednn")
    )
    assert isinstance(forced, PackedEngine) and forced.info.extra["cpu_kernels"] == "onednn"


def test_auto_serves_on_onednn_where_it_wins_the_race(
    xlmr_reranker: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A real model is large enough to race; the tiny one is let in by lowering the floor, and
    the race's verdict (2.2x: float32 on an AVX-512 AMD CPU) is given, since CI's CPUs vary."""
    shapes: list[tuple[int, int]] = []

    def race(_dtype: torch.dtype, _act: object, hidden: int, intermediate: int) -> float:
        shapes.append((hidden, intermediate))
        return 2.2

    monkeypatch.setattr(cpu_kernels, "RACE_MIN_WEIGHT", 0)
    monkeypatch.setattr(cpu_kernels, "race_kernels", race)
    with caplog.at_level("INFO", logger="reranker_runtime.engines.packed_engine"):
        engine = factory.create_engine(ServeSettings(model=str(xlmr_reranker), device="cpu"))
    assert isinstance(engine, PackedEngine) and engine.info.extra["cpu_kernels"] == "onednn"
    config = json.loads((xlmr_reranker / "config.json").read_text())
    assert shapes == [(config["hidden_size"], config["intermediate_size"])]
    assert "cpu kernels onednn (auto: oneDNN ran 2.20x as fast as aten" in caplog.text
    pairs = mixed_pairs(engine.tokenizer, 12, seed=5)
    batch = [EncodedPair(engine.tokenizer(q, t)["input_ids"]) for q, t in pairs]
    np.testing.assert_allclose(
        engine.score(batch), reference_logits(xlmr_reranker, pairs), rtol=0, atol=LOGIT_TOL
    )


@pytest.mark.parametrize(
    ("native", "dtype", "engine", "said"),
    [
        (False, "bfloat16", "auto", "bfloat16 is emulated"),
        (True, "auto", "auto", "--dtype bfloat16 served about 1.3x"),
        (True, "auto", "torch", "--dtype bfloat16 served about 1.3x"),
        (True, "float32", "auto", None),  # chosen: nothing to suggest
        (True, "bfloat16", "auto", None),
        (None, "auto", "auto", None),  # unknown CPU
        (False, "auto", "auto", None),
    ],
)
def test_serve_says_when_the_cpu_and_the_dtype_are_a_poor_match(
    xlmr_reranker: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    native: bool | None,
    dtype: str,
    engine: str,
    said: str | None,
) -> None:
    monkeypatch.setattr(torch_engine, "cpu_has_native_bf16", lambda: native)
    with caplog.at_level("INFO", logger="reranker_runtime.engines"):
        factory.create_engine(
            ServeSettings(model=str(xlmr_reranker), device="cpu", dtype=dtype, engine=engine)
        )
    advice = [r.getMessage() for r in caplog.records if r.getMessage().startswith("this CPU")]
    if said:
        assert len(advice) == 1 and said in advice[0]
    else:
        assert advice == []


def test_auto_does_not_race_where_oneDNN_cannot_serve(
    xlmr_reranker: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The padded engine and a torch.compile'd packed engine run PyTorch's own ops: no race."""

    def race(*_a: object) -> float:
        raise AssertionError("the race ran")

    monkeypatch.setattr(cpu_kernels, "RACE_MIN_WEIGHT", 0)
    monkeypatch.setattr(cpu_kernels, "race_kernels", race)
    padded = factory.create_engine(
        ServeSettings(model=str(xlmr_reranker), device="cpu", engine="torch")
    )
    assert isinstance(padded, TorchEngine) and padded.info.extra.get("cpu_kernels") is None
    with caplog.at_level("INFO", logger="reranker_runtime.engines.packed_engine"):
        compiled = PackedEngine.from_torch_engine(padded, compile_model=True)
    assert compiled.info.extra["cpu_kernels"] == "aten"
    assert "cpu kernels aten (torch.compile traces PyTorch's own ops)" in caplog.text


def test_onednn_with_an_engine_or_option_that_cannot_use_it_is_refused(
    xlmr_reranker: Path,
) -> None:
    with pytest.raises(ModelLoadError, match="--cpu-kernels onednn needs the packed engine"):
        factory.create_engine(
            ServeSettings(
                model=str(xlmr_reranker), device="cpu", engine="torch", cpu_kernels="onednn"
            )
        )
    with pytest.raises(ModelLoadError, match="--cpu-kernels onednn and --torch-compile"):
        factory.create_engine(
            ServeSettings(
                model=str(xlmr_reranker), device="cpu", cpu_kernels="onednn", torch_compile=True
            )
        )


def test_forcing_onednn_where_it_cannot_run_fails_at_load(
    xlmr_reranker: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cpu_kernels, "onednn_problem", lambda *_a: "no oneDNN here")
    with pytest.raises(ModelLoadError, match="--cpu-kernels onednn: no oneDNN here"):
        factory.create_engine(
            ServeSettings(model=str(xlmr_reranker), device="cpu", cpu_kernels="onednn")
        )


@pytest.mark.parametrize("act", ["gelu_new", "relu"])
def test_other_activations_score_like_the_reference(
    act: str, xlmr_reranker: Path, tmp_path: Path
) -> None:
    model_dir = tmp_path / act
    shutil.copytree(xlmr_reranker, model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config["hidden_act"] = act
    (model_dir / "config.json").write_text(json.dumps(config))
    engine = PackedEngine.load(str(model_dir), device="cpu", cpu_kernels="onednn")
    pairs = mixed_pairs(engine.tokenizer, 12, seed=4)
    batch = [EncodedPair(engine.tokenizer(q, t)["input_ids"]) for q, t in pairs]
    np.testing.assert_allclose(
        engine.score(batch), reference_logits(model_dir, pairs), rtol=0, atol=LOGIT_TOL
    )


def test_onednn_engine_lets_go_of_the_checkpoint_file(xlmr_reranker: Path, tmp_path: Path) -> None:
    """The oneDNN layers are copies; a tensor left viewing the memory-mapped safetensors file
    would keep the whole file resident next to them (double the weights' memory)."""
    model_dir = tmp_path / "model"
    shutil.copytree(xlmr_reranker, model_dir)

    def mapped() -> bool:
        return str(model_dir) in Path("/proc/self/maps").read_text()

    padded = TorchEngine.load(str(model_dir), device="cpu", dtype="float32")
    assert mapped()  # transformers maps the weights file: this test can see the difference
    engine = PackedEngine.from_torch_engine(padded, cpu_kernels="onednn")
    del padded
    gc.collect()
    assert not mapped()
    assert engine.score([EncodedPair([0, 5, 6, 2])]).shape == (1, 1)
