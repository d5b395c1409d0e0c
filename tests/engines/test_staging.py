"""Reused staging buffers: every input lands in its own 256-byte-aligned view, values intact, and
the buffers are reused (grown only for a larger batch)."""

from __future__ import annotations

import numpy as np
import torch

from reranker_runtime.engines.staging import Float32Readback, Int32Staging


def test_views_are_aligned_and_hold_the_inputs() -> None:
    staging = Int32Staging("cpu", pin=False)
    arrays = {
        "input_ids": np.arange(7, dtype=np.int32),
        "input_lengths": np.array([3, 4], dtype=np.int32),
        "position_ids": np.arange(7, dtype=np.int32) + 2,
        "max_input_length": np.zeros(4, dtype=np.int32),
    }
    staged = staging.stage(arrays)
    base = staged["input_ids"].data_ptr()
    for name, array in arrays.items():
        assert staged[name].dtype == torch.int32 and staged[name].is_contiguous()
        assert staged[name].tolist() == array.tolist()
        assert (staged[name].data_ptr() - base) % 256 == 0, name
    capacity = staging.capacity

    smaller = staging.stage({"input_ids": np.array([9, 8], dtype=np.int32)})
    assert smaller["input_ids"].tolist() == [9, 8]
    assert staging.capacity == capacity  # reused, not reallocated
    larger = staging.stage({"input_ids": np.arange(5000, dtype=np.int32)})
    assert larger["input_ids"].tolist() == list(range(5000))
    assert staging.capacity >= 5000


def test_readback_reuses_its_buffer() -> None:
    readback = Float32Readback(pin=False)
    first = readback.copy(torch.tensor([[1.5], [2.5]]))
    assert first.tolist() == [[1.5], [2.5]]
    second = readback.copy(torch.tensor([[3.0]]))
    assert second.tolist() == [[3.0]]
    assert second.data_ptr() == first.data_ptr()
