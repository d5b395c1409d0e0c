"""The process's memory allocator: which one is in use, and giving memory back on glibc's; and
the garbage collector's heap, frozen once the model is loaded (`freeze_heap`).

Under a varied mix of requests (texts of every length and count), the server's resident memory
under glibc's malloc kept growing: 0.48 to 1.0 GB in 5 minutes of a MiniLM-sized model, and it
stayed there when the load stopped. Python's own memory stayed flat. Each new shape of
activations leaves freed memory that glibc keeps inside its arenas, fragmented, and does not
return. For a pod with a memory limit that is a slow walk towards an OOM kill.

Two remedies were measured side by side (docs/benchmarks.md, "CPU: memory under a varied mix"):

- jemalloc, preloaded (`LD_PRELOAD`), returns freed memory by itself and stayed near 0.55 GB,
  at the same throughput. The runtime image preloads it.
- With glibc's malloc, `malloc_trim(0)` every few seconds returns the free pages of every arena.
  Resident memory stayed near 0.65 GB, at the same throughput. `serve` does that
  (`--malloc-trim-interval`, default 5 s) when it finds glibc's malloc in use, for installs
  without jemalloc (a laptop, a pip install).
"""

from __future__ import annotations

import ctypes
import gc
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from reranker_runtime.logging import log_fields

log = logging.getLogger(__name__)

PROC_SELF_MAPS = Path("/proc/self/maps")
# Shared-library names of the allocators a process may have preloaded, as they appear in its maps.
_PRELOADED = (("libjemalloc", "jemalloc"), ("libtcmalloc", "tcmalloc"), ("libmimalloc", "mimalloc"))


def freeze_heap() -> None:
    """After load and warm-up: collect what they left, then move every surviving object (torch,
    transformers, the model: a few hundred thousand) out of the garbage collector's sight.
    Python's full collections while serving then scan only what requests create, and the exit
    no longer collects them one by one: SIGTERM to exit took 2.7 s on a tiny model, 0.8 s
    frozen (2-core AMD EPYC)."""
    started = time.perf_counter()
    gc.collect()
    gc.freeze()
    log.debug(
        "garbage collector heap frozen",
        extra=log_fields(
            objects=gc.get_freeze_count(), seconds=round(time.perf_counter() - started, 3)
        ),
    )


def allocator_from_maps(maps: str) -> str | None:
    """The preloaded allocator named in a /proc/<pid>/maps text, or None."""
    for line in maps.splitlines():
        path = line.rsplit(None, 1)[-1] if line.strip() else ""
        name = path.rsplit("/", 1)[-1]
        for prefix, allocator in _PRELOADED:
            if name.startswith(prefix):
                return allocator
    return None


def detect_allocator() -> str:
    """jemalloc, tcmalloc or mimalloc when preloaded; glibc when its malloc serves the process
    (malloc_trim exists); otherwise unknown (macOS, musl)."""
    try:
        preloaded = allocator_from_maps(PROC_SELF_MAPS.read_text())
    except OSError:  # not Linux
        preloaded = None
    if preloaded is not None:
        return preloaded
    return "glibc" if _malloc_trim() is not None else "unknown"


def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, looked up among the symbols the process has loaded (None on musl,
    macOS)."""
    try:
        trim: Callable[[int], int] = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    return trim


class MallocTrimmer:
    """A daemon thread that calls glibc's `malloc_trim(0)` every `interval_s` seconds, which
    hands the free pages of every malloc arena back to the kernel. It runs beside the forward
    passes; a trim of a 1 GB heap takes milliseconds."""

    def __init__(self, interval_s: float) -> None:
        trim = _malloc_trim()
        if trim is None:
            raise RuntimeError("malloc_trim is not available: not glibc's malloc")
        self._trim = trim
        self.interval_s = interval_s
        self.trims = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="malloc-trim", daemon=True)

    def start(self) -> MallocTrimmer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._trim(0)
            self.trims += 1


def start_memory_management(trim_interval_s: float) -> MallocTrimmer | None:
    """Log the allocator in use; on glibc's malloc start trimming every `trim_interval_s`
    seconds (0: never). Returns the trimmer to stop at exit, if one runs."""
    allocator = detect_allocator()
    trimming = allocator == "glibc" and trim_interval_s > 0
    log.info(
        "memory allocator",
        extra=log_fields(
            allocator=allocator,
            malloc_trim_interval_s=trim_interval_s if trimming else None,
        ),
    )
    if allocator == "glibc" and not trimming:
        log.info(
            "glibc malloc without trimming: resident memory grows with varied requests and is "
            "not given back (--malloc-trim-interval, or preload jemalloc: docs/runtime-api.md)"
        )
    return MallocTrimmer(trim_interval_s).start() if trimming else None
