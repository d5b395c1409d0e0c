"""The packed engine's linear layers on CPU: oneDNN with pre-packed weights and fused epilogues.

`F.linear` on CPU hands the weight to the BLAS (MKL in PyTorch's x86 wheels) in its row-major
layout on every call, then runs the activation and the residual add as separate passes over the
activations. oneDNN, the library behind `torch.compile`'s CPU weight-prepacking path
(`torch.ops.mkldnn._linear_pointwise`), takes the weight once in its own blocked layout and runs
GELU or the residual add in the GEMM's epilogue. On an AMD EPYC (2 cores, AVX2) the GEMMs of a
bge-shaped layer ran 10-30% faster and the packed engine's forward pass about 1.18x
(docs/benchmarks.md).

The op is PyTorch-internal, so `choose_cpu_kernels` probes it at load: it must exist, accept the
engine's dtype on this CPU (oneDNN refuses bfloat16 on CPUs without native bf16) and match
`F.linear` on a small problem; otherwise the engine runs the plain PyTorch ops ("aten"), which
compute the same thing. `--cpu-kernels` (RERANKER_CPU_KERNELS) forces either.
"""

from __future__ import annotations

import logging
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


class Linear:
    """y = x W^T + b, optionally followed by an activation or added to a residual."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def add(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """x W^T + b + residual."""
        raise NotImplementedError


class AtenLinear(Linear):
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


class OneDnnLinear(Linear):
    def __init__(
        self, weight: torch.Tensor, bias: torch.Tensor | None, activation: Activation | None
    ) -> None:
        # Copies, so the engine holds no view of the checkpoint's memory-mapped file (see
        # PackedEncoder): the blocked weight replaces the dense one.
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
) -> Linear:
    if kernels == "onednn":
        return OneDnnLinear(weight, bias, activation)
    return AtenLinear(weight, bias, activation)


def onednn_problem(dtype: torch.dtype) -> str | None:
    """Why oneDNN's fused linear cannot serve `dtype` on this CPU, or None when it can: it must
    exist and match F.linear (activation and residual epilogues included) on a small problem."""
    if not torch.backends.mkldnn.is_available():
        return "this PyTorch has no oneDNN (mkldnn) support"
    if not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return "this PyTorch has no torch.ops.mkldnn._linear_pointwise"
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, 64, generator=gen).to(dtype)
    w = (torch.randn(96, 64, generator=gen) / 8).to(dtype)
    b = torch.randn(96, generator=gen).to(dtype)
    residual = torch.randn(16, 96, generator=gen).to(dtype)
    gelu = _ACTIVATIONS["gelu"]
    tolerance = 1e-4 if dtype == torch.float32 else 5e-2
    try:
        fused, plain = OneDnnLinear(w, b, gelu), AtenLinear(w, b, gelu)
        pairs = [(fused(x), plain(x)), (fused.add(x, residual), plain.add(x, residual))]
    except RuntimeError as exc:  # e.g. "could not create a primitive descriptor" (no bf16 ISA)
        return f"oneDNN cannot run {dtype} linear layers on this CPU: {str(exc).splitlines()[0]}"
    for got, want in pairs:
        if not torch.allclose(got.float(), want.float(), atol=tolerance, rtol=tolerance):
            return "oneDNN's fused linear disagrees with F.linear on this CPU"
    return None


def choose_cpu_kernels(requested: str, dtype: torch.dtype) -> str:
    """ "onednn" or "aten" for a CPU packed engine. auto: oneDNN when it works here (see
    onednn_problem), logged either way; onednn: required (ValueError naming the reason)."""
    if requested not in CPU_KERNEL_CHOICES:
        raise ValueError(f"unknown cpu kernels {requested!r}; use {', '.join(CPU_KERNEL_CHOICES)}")
    if requested == "aten":
        return "aten"
    problem = onednn_problem(dtype)
    if problem is None:
        return "onednn"
    if requested == "onednn":
        raise ValueError(f"--cpu-kernels onednn: {problem}; use --cpu-kernels aten (or auto)")
    logger.info("cpu kernels: plain PyTorch ops (%s)", problem, extra={"reason": problem})
    return "aten"
