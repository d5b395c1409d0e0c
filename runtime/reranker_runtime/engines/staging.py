"""Reused host and device buffers for a batch's int32 inputs: one pinned host buffer, one device
buffer, one non-blocking copy per batch, instead of allocating and copying from pageable memory
for every input of every batch.

Each input gets a view aligned to 256 bytes (TensorRT requires I/O tensor addresses aligned so).
The caller must not stage the next batch before the previous copy has completed (the engines
synchronise on their stream at the end of every forward pass, when they read the logits back).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

ALIGN_ELEMENTS = 64  # 64 int32 = 256 bytes


def _aligned(n: int) -> int:
    return -(-n // ALIGN_ELEMENTS) * ALIGN_ELEMENTS


class Int32Staging:
    """`stage({name: int32 array})` -> {name: device tensor view}, through reused buffers."""

    def __init__(self, device: Any, *, pin: bool = True) -> None:
        import torch

        self._torch = torch
        self._device = device
        self._pin = pin
        self._host = self._new_host(0)
        self._dev = torch.empty(0, dtype=torch.int32, device=device)

    def _new_host(self, size: int) -> Any:
        host = self._torch.empty(size, dtype=self._torch.int32)
        return host.pin_memory() if self._pin else host

    @property
    def capacity(self) -> int:
        return int(self._host.numel())

    def stage(self, arrays: Mapping[str, np.ndarray]) -> dict[str, Any]:
        offsets: dict[str, tuple[int, int]] = {}
        total = 0
        for name, array in arrays.items():
            offsets[name] = (total, int(array.size))
            total += _aligned(int(array.size))
        if total > self.capacity:
            # Grow once to the largest batch seen (with headroom), then reuse.
            size = _aligned(total + total // 4)
            self._host = self._new_host(size)
            self._dev = self._torch.empty(size, dtype=self._torch.int32, device=self._device)
        host = self._host.numpy()
        for name, array in arrays.items():
            start, n = offsets[name]
            host[start : start + n] = array.reshape(-1)
        self._dev[:total].copy_(self._host[:total], non_blocking=self._pin)
        return {
            name: self._dev[start : start + n].view(arrays[name].shape)
            for name, (start, n) in offsets.items()
        }


class Float32Readback:
    """Reused pinned host buffer to read logits back with a non-blocking copy."""

    def __init__(self, *, pin: bool = True) -> None:
        import torch

        self._torch = torch
        self._pin = pin
        self._host = torch.empty(0, dtype=torch.float32)

    def copy(self, tensor: Any) -> Any:
        """Queue the copy of `tensor` (float32, any shape); synchronise the stream before reading
        the returned host tensor."""
        n = int(tensor.numel())
        if self._host.numel() < n:
            host = self._torch.empty(n + n // 4, dtype=self._torch.float32)
            self._host = host.pin_memory() if self._pin else host
        out = self._host[:n].view(tensor.shape)
        out.copy_(tensor, non_blocking=self._pin)
        return out
