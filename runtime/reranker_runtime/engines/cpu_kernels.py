"""The packed engine's encoder linear layers on CPU: PyTorch's ops or oneDNN GEMMs with fused
epilogues, `auto` timing both on this CPU at load.

`aten`: `F.linear`, which runs the GEMM through the BLAS (MKL in PyTorch's x86 wheels), then the
activation and the residual add as separate passes. `onednn`: oneDNN's inner product
(`torch.ops.mkldnn._linear_pointwise`, the op `torch.compile`'s CPU backend emits) with the
weight converted once at load (`to_mkldnn`) and GELU or the residual add in the GEMM's epilogue.

Which is faster depends on the CPU (docs/benchmarks.md): on an AMD EPYC with AVX2 they were
within about 10% of each other, aten ahead on a quiet host; on an AMD EPYC with AVX-512 (Zen 5)
oneDNN's float32 GEMMs ran 2.0-2.4x MKL's, which takes its AVX2 path on AMD CPUs. So `auto`
races the two on a feed-forward block of the model's shape at the pass's thread count and takes
oneDNN only when it is clearly faster (`ONEDNN_MIN_SPEEDUP`); test-sized models skip the race.

The op is PyTorch-internal, so oneDNN is probed first: it must exist, run the engine's dtype and
the model's activation on this CPU and match `F.linear` on a small problem. `auto` falls back to
aten naming the reason; a forced `--cpu-kernels onednn` fails at load.
"""

from __future__ import annotations

import statistics
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from reranker_runtime.config import CPU_KERNEL_CHOICES

# auto takes oneDNN only when its feed-forward block runs at least this much faster than aten's.
# Below that the two swing past each other with the host's load (AVX2: 1.1-1.2x in GEMMs, yet
# aten ahead in the server on a quiet host; bfloat16 on AVX512-BF16: 1.0-1.1x), and aten keeps
# the weights in the checkpoint's page cache instead of a private copy. Where oneDNN wins, it
# wins by 2x (float32 on AMD CPUs with AVX-512: docs/benchmarks.md).
ONEDNN_MIN_SPEEDUP = 1.25
# The race's GEMM: this many token rows (a CPU pass carries about 1,000 tokens) times the
# model's FFN weight, timed this many times each, interleaved, after one warm-up call each.
RACE_ROWS = 256
RACE_REPEATS = 5
# FFN weights with fewer entries than this (test-sized models) skip the race and run aten: their
# GEMMs take microseconds, and timing them would only measure noise.
RACE_MIN_WEIGHT = 1 << 18


@dataclass(frozen=True)
class Activation:
    """An activation, as PyTorch computes it and as oneDNN's epilogue names it."""

    name: str  # the checkpoint's hidden_act
    torch_fn: Callable[[torch.Tensor], torch.Tensor]
    onednn: tuple[str, str] | None  # (attr, algorithm) of _linear_pointwise; None: not fusable
    # The same function computed in place (the GEMM's fresh output is not read again: no
    # second [tokens, ffn] buffer); None: only torch_fn.
    in_place: Callable[[torch.Tensor], torch.Tensor] | None = None


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def _gelu_(x: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten.gelu_(x)


def _gelu_tanh_(x: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten.gelu_(x, approximate="tanh")


# transformers' ACT2FN names of the BERT family's activations.
_ACTIVATIONS: dict[str, Activation] = {
    "gelu": Activation("gelu", F.gelu, ("gelu", "none"), _gelu_),
    "gelu_new": Activation("gelu_new", _gelu_tanh, ("gelu", "tanh"), _gelu_tanh_),
    "gelu_pytorch_tanh": Activation("gelu_pytorch_tanh", _gelu_tanh, ("gelu", "tanh"), _gelu_tanh_),
    "relu": Activation("relu", F.relu, ("relu", ""), torch.relu_),
}


def activation_of(hidden_act: Any, module: Callable[[torch.Tensor], torch.Tensor]) -> Activation:
    """The activation of a checkpoint's `hidden_act`; one we cannot name runs as its module."""
    known = _ACTIVATIONS.get(hidden_act) if isinstance(hidden_act, str) else None
    return known or Activation(str(hidden_act), module, None)


class LinearKernel(ABC):
    """y = x W^T + b, optionally followed by an activation or added to a residual. Holds its
    own weight tensors (not an nn.Module: `.to()` or `state_dict()` of a module holding one
    does not see them)."""

    @abstractmethod
    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def add_to(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """x W^T + b + residual. The caller gives `residual` up: a kernel may write the
        result into it."""


class AtenLinear(LinearKernel):
    def __init__(
        self, weight: torch.Tensor, bias: torch.Tensor | None, activation: Activation | None
    ) -> None:
        self.weight = weight
        self.bias = bias
        self._act = (activation.in_place or activation.torch_fn) if activation else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        return self._act(y) if self._act else y

    def add_to(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        # The GEMM accumulates into the residual (beta = 1): no output buffer, no extra pass.
        if self.bias is not None:
            residual = residual.add_(self.bias)
        return residual.addmm_(x, self.weight.t())


class OneDnnLinear(LinearKernel):
    def __init__(
        self, weight: torch.Tensor, bias: torch.Tensor | None, activation: Activation | None
    ) -> None:
        # Copies, so the engine holds no view of the checkpoint's memory-mapped file (see
        # PackedEncoder): the oneDNN weight replaces the dense one.
        self.weight = weight.detach().to_mkldnn()
        self.bias = bias.detach().clone() if bias is not None else None
        self._act = activation
        attr, algorithm = (activation.onednn if activation else None) or ("none", "")
        self._attr, self._algorithm = attr, algorithm

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.mkldnn._linear_pointwise(
            x, self.weight, self.bias, self._attr, [], self._algorithm
        )
        if self._act is not None and self._act.onednn is None:
            y = self._act.torch_fn(y)
        return y

    def add_to(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise.binary(x, residual, self.weight, self.bias, "add")


def make_linear(
    kernels: str,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    activation: Activation | None = None,
) -> LinearKernel:
    if kernels == "onednn":
        return OneDnnLinear(weight, bias, activation)
    return AtenLinear(weight, bias, activation)


def onednn_problem(dtype: torch.dtype, activation: Activation | None = None) -> str | None:
    """Why oneDNN's fused linear cannot serve `dtype` on this CPU, or None when it can: it must
    exist and match F.linear, with the model's activation (default: exact GELU) and the residual
    add fused, on a small problem."""
    if not torch.backends.mkldnn.is_available():
        return "this PyTorch has no oneDNN (mkldnn) support"
    if not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return "this PyTorch has no torch.ops.mkldnn._linear_pointwise"
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, 64, generator=gen).to(dtype)
    w = (torch.randn(96, 64, generator=gen) / 8).to(dtype)
    b = torch.randn(96, generator=gen).to(dtype)
    residual = torch.randn(16, 96, generator=gen).to(dtype)
    act = activation or _ACTIVATIONS["gelu"]
    tolerance = 1e-4 if dtype == torch.float32 else 5e-2
    try:
        fused, plain = OneDnnLinear(w, b, act), AtenLinear(w, b, act)
        pairs = [
            (fused(x), plain(x)),
            (fused.add_to(x, residual.clone()), plain.add_to(x, residual.clone())),
        ]
    except RuntimeError as exc:  # e.g. "could not create a primitive descriptor" (no bf16 ISA)
        return f"oneDNN cannot run {dtype} linear layers on this CPU: {str(exc).splitlines()[0]}"
    for got, want in pairs:
        if not torch.allclose(got.float(), want.float(), atol=tolerance, rtol=tolerance):
            return f"oneDNN's fused linear ({act.name}) disagrees with F.linear on this CPU"
    return None


@dataclass(frozen=True)
class KernelChoice:
    """The kernels a CPU packed engine runs, and why (for the load log)."""

    kernels: str  # "onednn" | "aten"
    reason: str
    onednn_speedup: float | None = None  # measured by auto: aten's GEMM time / oneDNN's


def race_kernels(
    dtype: torch.dtype,
    activation: Activation | None,
    hidden: int,
    intermediate: int,
    rows: int = RACE_ROWS,
    repeats: int = RACE_REPEATS,
) -> float:
    """oneDNN's speed relative to aten's on this CPU: the median, over `repeats` interleaved
    pairs of runs, of aten's time / oneDNN's for one feed-forward block of the model's shape on
    `rows` tokens (the GEMM up with the activation, the GEMM down added to the residual: most of
    a layer's work, epilogues included). Random weights: a GEMM's time does not depend on the
    values."""
    gen = torch.Generator().manual_seed(0)

    def weights(n_out: int, n_in: int) -> tuple[torch.Tensor, torch.Tensor]:
        w = torch.randn(n_out, n_in, generator=gen) / n_in**0.5
        return w.to(dtype), torch.zeros(n_out, dtype=dtype)

    x = torch.randn(rows, hidden, generator=gen).to(dtype)
    up, down = weights(intermediate, hidden), weights(hidden, intermediate)
    blocks = {
        kind: (make_linear(kind, *up, activation), make_linear(kind, *down))
        for kind in ("aten", "onednn")
    }

    def seconds(kind: str) -> float:
        up_proj, down_proj = blocks[kind]
        start = time.perf_counter()
        down_proj.add_to(up_proj(x), x.clone())
        return time.perf_counter() - start

    def ratio(i: int) -> float:
        # Each kernel goes first in every other pair: neither gains from the order (caches,
        # clock ramp-up).
        if i % 2:
            onednn = seconds("onednn")
            return seconds("aten") / max(onednn, 1e-9)
        aten = seconds("aten")
        return aten / max(seconds("onednn"), 1e-9)

    with torch.inference_mode():
        seconds("aten"), seconds("onednn")  # warm-up: oneDNN builds its primitives on first use
        ratios = [ratio(i) for i in range(repeats)]
    return statistics.median(ratios)


def choose_cpu_kernels(
    requested: str,
    dtype: torch.dtype,
    activation: Activation | None = None,
    ffn_shape: tuple[int, int] | None = None,
) -> KernelChoice:
    """The kernels for a CPU packed engine. aten: as asked. onednn: after the probe (ValueError
    naming what fails). auto: aten where oneDNN cannot run or the model is test-sized (or
    `ffn_shape`, (hidden, intermediate), is unknown); otherwise whichever `race_kernels`
    finds faster, oneDNN needing `ONEDNN_MIN_SPEEDUP`."""
    if requested not in CPU_KERNEL_CHOICES:
        raise ValueError(f"unknown cpu kernels {requested!r}; use {', '.join(CPU_KERNEL_CHOICES)}")
    if requested == "aten":
        return KernelChoice("aten", "requested")
    if requested == "onednn":
        problem = onednn_problem(dtype, activation)
        if problem is not None:
            raise ValueError(f"--cpu-kernels onednn: {problem}; use --cpu-kernels aten (or auto)")
        return KernelChoice("onednn", "requested")
    if ffn_shape is None or ffn_shape[0] * ffn_shape[1] < RACE_MIN_WEIGHT:
        return KernelChoice("aten", "auto: model too small to time its GEMMs")
    problem = onednn_problem(dtype, activation)
    if problem is not None:
        return KernelChoice("aten", f"auto: {problem}")
    try:
        speedup = race_kernels(dtype, activation, *ffn_shape)
    except RuntimeError as exc:  # e.g. out of memory at the model's shape: not worth a failed load
        return KernelChoice("aten", f"auto: timing oneDNN failed: {str(exc).splitlines()[0]}")
    kernels = "onednn" if speedup >= ONEDNN_MIN_SPEEDUP else "aten"
    return KernelChoice(
        kernels,
        f"auto: oneDNN ran {speedup:.2f}x as fast as aten on this CPU, "
        f"needs {ONEDNN_MIN_SPEEDUP:.2f}x",
        speedup,
    )
