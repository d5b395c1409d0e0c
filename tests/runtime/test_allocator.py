"""The memory allocator (allocator.py): which one serves the process, and memory given back
under glibc's malloc."""

from __future__ import annotations

import ctypes
import logging
import time
from pathlib import Path

import pytest

from reranker_runtime import allocator
from reranker_runtime.allocator import (
    MallocTrimmer,
    allocator_from_maps,
    detect_allocator,
    start_memory_management,
)

MAPS_LINE = "7f1c2a000000-7f1c2a0b0000 r-xp 00000000 08:01 1234   {path}\n"


@pytest.mark.parametrize(
    ("library", "expected"),
    [
        ("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2", "jemalloc"),
        ("/usr/local/lib/libjemalloc.so.2", "jemalloc"),
        ("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4.5.10", "tcmalloc"),
        ("/usr/lib/libmimalloc.so.2", "mimalloc"),
        ("/usr/lib/x86_64-linux-gnu/libc.so.6", None),
        ("[heap]", None),
    ],
)
def test_a_preloaded_allocator_is_found_in_the_process_maps(
    library: str, expected: str | None
) -> None:
    maps = MAPS_LINE.format(path="/usr/bin/python3.11") + MAPS_LINE.format(path=library) + "\n"
    assert allocator_from_maps(maps) == expected


def test_this_process_runs_on_glibc_malloc() -> None:
    # The test machines are glibc Linux without a preloaded allocator: what a pip install gets.
    assert detect_allocator() == "glibc"


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS in /proc/self/status")


def test_the_trimmer_gives_freed_memory_back_to_the_kernel() -> None:
    # 128 MiB in 64 KiB blocks (below glibc's mmap threshold: from the heap), touched, then every
    # other block freed: 64 MiB of holes between live blocks, which free() cannot return. They
    # stay resident, as an arena's fragments do in the server, until malloc_trim.
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    block, count = 64 * 1024, 2048
    blocks = [libc.malloc(block) for _ in range(count)]
    assert all(blocks)
    for address in blocks:
        ctypes.memset(address, 1, block)
    for address in blocks[::2]:
        libc.free(address)
    held = _rss_kib()
    trimmer = MallocTrimmer(interval_s=0.01).start()
    try:
        for _ in range(1000):  # a bounded wait for the first trim
            if trimmer.trims:
                break
            time.sleep(0.01)
        trimmer.stop()
        returned_mib = (held - _rss_kib()) / 1024
    finally:
        trimmer.stop()
        for address in blocks[1::2]:
            libc.free(address)
    assert trimmer.trims >= 1
    assert returned_mib > 48, f"{returned_mib:.0f} of the 64 MiB freed were returned"


def test_serve_trims_on_glibc_and_says_which_allocator_it_found(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.INFO, logger=allocator.__name__):
        trimmer = start_memory_management(5.0)
    assert trimmer is not None and trimmer.interval_s == 5.0
    trimmer.stop()
    (line,) = [r for r in caplog.records if r.getMessage() == "memory allocator"]
    assert line.__dict__["fields"] == {"allocator": "glibc", "malloc_trim_interval_s": 5.0}


def test_trimming_turned_off_says_what_that_costs(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger=allocator.__name__):
        assert start_memory_management(0) is None
    assert any("--malloc-trim-interval" in r.getMessage() for r in caplog.records)


def test_freeze_heap_moves_the_live_objects_out_of_the_collectors_sight() -> None:
    import gc

    from reranker_runtime.allocator import freeze_heap

    try:
        freeze_heap()
        assert gc.get_freeze_count() > 10_000  # this test process: pytest, torch, ...
    finally:
        gc.unfreeze()  # the rest of the suite collects as usual
