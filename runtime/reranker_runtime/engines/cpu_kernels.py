"""The packed engine's encoder linear layers on CPU: PyTorch's ops, or oneDNN GEMMs with fused
epilogues (opt-in).

`aten` (the default): `F.linear`, which runs the GEMM through the BLAS (MKL in PyTorch's x86
wheels), then the activation and the residual add as separate passes. `onednn`: oneDNN's inner
product (`torch.ops.mkldnn._linear_pointwise`, the op `torch.compile`'s CPU backend emits) with
the weight converted once at load (`to_mkldnn`) and GELU or the residual add in the GEMM's
epilogue. Measured on an AMD EPYC (2 cores, AVX2), the server with oneDNN was about 1.1x as fast
as with aten while the host was loaded and 0.77x and 0.90x (two A/B pairs) on a quiet host
(docs/benchmarks.md), so `auto` keeps PyTorch's ops; `onednn` stays available to measure on
other CPUs.

The op is PyTorch-internal, so `--cpu-kernels onednn` probes it at load: it must exist, run the
engine's dtype and the model's activation on this CPU and match `F.linear` on a small problem;
otherwise the load fails naming the reason.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from reranker_runtime.config import CPU_KERNEL_CHOICES


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


def choose_cpu_kernels(
    requested: str, dtype: torch.dtype, activation: Activation | None = None
) -> str:
    """ "onednn" or "aten" for a CPU packed engine. auto: aten, the faster on a quiet machine
    (see the module docstring); onednn: required, after the probe (ValueError naming what
    fails)."""
    if requested not in CPU_KERNEL_CHOICES:
        raise ValueError(f"unknown cpu kernels {requested!r}; use {', '.join(CPU_KERNEL_CHOICES)}")
    if requested in ("auto", "aten"):
        return "aten"
    problem = onednn_problem(dtype, activation)
    if problem is not None:
        raise ValueError(f"--cpu-kernels onednn: {problem}; use --cpu-kernels aten (or auto)")
    return "onednn"
