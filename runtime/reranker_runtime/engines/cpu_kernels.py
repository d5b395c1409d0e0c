"""The packed engine's encoder linear layers on CPU: oneDNN GEMMs with fused epilogues.

`F.linear` on CPU runs the GEMM through the BLAS (MKL in PyTorch's x86 wheels), then the
activation and the residual add as separate passes over the activations. oneDNN's inner product
(`torch.ops.mkldnn._linear_pointwise`, the op `torch.compile`'s CPU backend emits) takes the
weight as a oneDNN tensor, converted once at load (`to_mkldnn`), and runs GELU or the residual
add in the GEMM's epilogue. On an AMD EPYC (2 cores, AVX2) the GEMMs of bge shapes ran 10-30%
faster and the packed engine's forward pass about 1.18x (docs/benchmarks.md).

The op is PyTorch-internal, so `choose_cpu_kernels` probes it at load: it must exist, run the
engine's dtype and the model's activation on this CPU and match `F.linear` on a small problem;
otherwise the engine runs the plain PyTorch ops ("aten"), which compute the same thing.
`--cpu-kernels` (RERANKER_CPU_KERNELS) forces either. For bfloat16/float16, `auto` takes oneDNN
only on CPUs with native bf16 (AVX512-BF16 or AMX): elsewhere oneDNN may accept them (any
AVX-512 CPU) but emulates them, unmeasured against PyTorch's own emulation.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from reranker_runtime.config import CPU_KERNEL_CHOICES

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Activation:
    """An activation, as PyTorch computes it and as oneDNN's epilogue names it."""

    name: str  # the checkpoint's hidden_act
    torch_fn: Callable[[torch.Tensor], torch.Tensor]
    onednn: tuple[str, str] | None  # (attr, algorithm) of _linear_pointwise; None: not fusable


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


# transformers' ACT2FN names of the BERT family's activations.
_ACTIVATIONS: dict[str, Activation] = {
    "gelu": Activation("gelu", F.gelu, ("gelu", "none")),
    "gelu_new": Activation("gelu_new", _gelu_tanh, ("gelu", "tanh")),
    "gelu_pytorch_tanh": Activation("gelu_pytorch_tanh", _gelu_tanh, ("gelu", "tanh")),
    "relu": Activation("relu", F.relu, ("relu", "")),
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
    def add(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """x W^T + b + residual."""


class AtenLinear(LinearKernel):
    def __init__(
        self, weight: torch.Tensor, bias: torch.Tensor | None, activation: Activation | None
    ) -> None:
        self.weight = weight
        self.bias = bias
        self._act = activation.torch_fn if activation else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        return self._act(y) if self._act else y

    def add(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias).add_(residual)


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

    def add(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
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
        pairs = [(fused(x), plain(x)), (fused.add(x, residual), plain.add(x, residual))]
    except RuntimeError as exc:  # e.g. "could not create a primitive descriptor" (no bf16 ISA)
        return f"oneDNN cannot run {dtype} linear layers on this CPU: {str(exc).splitlines()[0]}"
    for got, want in pairs:
        if not torch.allclose(got.float(), want.float(), atol=tolerance, rtol=tolerance):
            return f"oneDNN's fused linear ({act.name}) disagrees with F.linear on this CPU"
    return None


def choose_cpu_kernels(
    requested: str, dtype: torch.dtype, activation: Activation | None = None
) -> str:
    """ "onednn" or "aten" for a CPU packed engine. auto: oneDNN when it works here (see
    onednn_problem; for half types only on CPUs with native bf16), logged either way; onednn:
    required (ValueError naming the reason)."""
    if requested not in CPU_KERNEL_CHOICES:
        raise ValueError(f"unknown cpu kernels {requested!r}; use {', '.join(CPU_KERNEL_CHOICES)}")
    if requested == "aten":
        return "aten"
    problem = onednn_problem(dtype, activation)
    if problem is None and requested == "auto" and dtype != torch.float32:
        from reranker_runtime.engines.torch_engine import cpu_has_native_bf16

        if not cpu_has_native_bf16():
            problem = f"{dtype} is emulated on this CPU (no avx512_bf16 or amx_bf16)"
    if problem is None:
        return "onednn"
    if requested == "onednn":
        raise ValueError(f"--cpu-kernels onednn: {problem}; use --cpu-kernels aten (or auto)")
    level = logging.WARNING if "disagrees" in problem else logging.INFO
    logger.log(level, "cpu kernels: plain PyTorch ops (%s)", problem, extra={"reason": problem})
    return "aten"
