"""CPU threads for the forward pass, chosen from the CPUs this process may actually use.

PyTorch sizes its OpenMP pool from the machine's core count, and GNU OpenMP (the libgomp in
PyTorch's CPU wheels) lets idle pool threads spin between parallel regions. In a pod that shares
its node, both hurt: a pool wider than the pod's CPU limit is throttled by the kernel's CFS quota,
and a spinning thread steals the core that the busy thread next to it (or the tokenizer, or the
event loop) needs. docs/benchmarks.md ("CPU threads and contention") has the measurements.

A forward pass on several OpenMP threads also meets at a barrier after every parallel region
(hundreds per pass, more inside each GEMM): a passive thread must be woken at each one, a
spinning one burns the core, and a thread that shares its core with a neighbour holds the other
back. So on CPU the server runs **forward workers**: several forward passes at once, each on its
own few threads (on 2 CPUs: two single-threaded passes), which meet at no barrier at all. Measured
on an AMD EPYC with 2 cores (docs/benchmarks.md), engine only: 1.2-1.3x the throughput of one
pass on two passive threads on a quiet machine, 1.3-1.5x with a busy neighbour on one core.

`serve` therefore calls `configure_cpu_threads` before PyTorch is imported:

- CPU forward workers (`--cpu-workers`, default `auto`) = 2 when the process may use 2 CPUs or
  more, else 1; with an explicit thread count, as many as fit the CPUs (at most 2).
- torch threads per forward pass (`--torch-threads`, default `auto`) = the CPUs this process may
  use divided by the workers, at least 1. The CPUs: the affinity mask (`taskset`, a cpuset) and,
  when set, the cgroup CPU limit (a Kubernetes `limits.cpu`), rounded down, at least 1. An
  explicit `OMP_NUM_THREADS` is honoured when the flag is `auto`.
- `OMP_WAIT_POLICY=PASSIVE`: idle OpenMP threads sleep at once instead of spinning.
- `TOKENIZERS_PARALLELISM=false`: each request is tokenized on one thread; requests are
  tokenized concurrently anyway, and a second thread pool only competes with the forward pass.

Variables already set in the environment are left as they are, so each choice can be overridden.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from reranker_runtime.config import AUTO

logger = logging.getLogger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_SELF_CGROUP = Path("/proc/self/cgroup")

# Set when absent; a value already in the environment wins (the documented override).
DEFAULT_ENVIRONMENT: dict[str, str] = {
    "OMP_WAIT_POLICY": "PASSIVE",
    "TOKENIZERS_PARALLELISM": "false",
}
# The thread count itself goes to every library that reads one.
THREAD_COUNT_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


@dataclass(frozen=True)
class CpuLimits:
    """The CPUs available to this process."""

    affinity: int  # CPUs in the affinity mask
    quota: float | None = None  # cgroup CPU limit in CPUs (cpu.max / cfs_quota); None = none

    @property
    def usable(self) -> int:
        """Whole CPUs the process can keep busy: the affinity, capped by the quota rounded
        down (a pool wider than the quota is throttled), at least 1."""
        cpus = max(1, self.affinity)
        if self.quota is not None:
            cpus = min(cpus, max(1, math.floor(self.quota)))
        return cpus


@dataclass(frozen=True)
class ThreadPlan:
    """What `configure_cpu_threads` decided, for the start-up log."""

    threads: int  # per forward pass
    source: str  # "--torch-threads", "OMP_NUM_THREADS" or "auto"
    workers: int  # forward passes at once on CPU
    limits: CpuLimits
    environment: dict[str, str] = field(default_factory=dict)  # variables as now set
    torch_already_loaded: bool = False


# -- pure parsing / choice ----------------------------------------------------------------------


def parse_cpu_max(text: str) -> float | None:
    """cgroup v2 `cpu.max` ("QUOTA PERIOD", QUOTA may be "max") -> CPUs, None when unlimited."""
    parts = text.split()
    if len(parts) != 2 or parts[0] == "max":
        return None
    try:
        quota, period = int(parts[0]), int(parts[1])
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def parse_cfs_quota(quota_text: str, period_text: str) -> float | None:
    """cgroup v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us` -> CPUs, None when unlimited (-1)."""
    try:
        quota, period = int(quota_text.strip()), int(period_text.strip())
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def parse_torch_threads(text: str) -> int | Literal["auto"]:
    """`--torch-threads` / RERANKER_TORCH_THREADS: 'auto' or a positive integer."""
    value = text.strip().lower()
    if value == AUTO:
        return AUTO
    try:
        threads = int(value)
    except ValueError:
        raise ValueError("expected 'auto' or a positive integer") from None
    if threads < 1:
        raise ValueError("must be 'auto' or >= 1")
    return threads


def parse_cpu_workers(text: str) -> int | Literal["auto"]:
    """`--cpu-workers` / RERANKER_CPU_WORKERS: 'auto' or a positive integer."""
    return parse_torch_threads(text)  # the same form


# auto: two forward passes at once. Two already meet at no barrier on 2 CPUs; more would split a
# many-core pod's CPUs into single-threaded passes, each batch slower to finish (latency).
AUTO_CPU_WORKERS = 2


def _explicit_threads(
    requested: int | Literal["auto"], omp_num_threads: str | None
) -> tuple[int, str] | None:
    """The thread count a user set: the flag, else a valid OMP_NUM_THREADS."""
    if requested != AUTO:
        return int(requested), "--torch-threads"
    if omp_num_threads:
        try:
            from_env = int(omp_num_threads.split(",")[0])
        except ValueError:
            from_env = 0
        if from_env >= 1:
            return from_env, "OMP_NUM_THREADS"
    return None


def choose_workers(
    requested: int | Literal["auto"],
    limits: CpuLimits,
    requested_threads: int | Literal["auto"] = AUTO,
    omp_num_threads: str | None = None,
) -> int:
    """CPU forward workers: the flag; auto: AUTO_CPU_WORKERS when the usable CPUs allow, as many
    passes of the user's thread count as fit (at most AUTO_CPU_WORKERS), at least 1."""
    if requested != AUTO:
        return int(requested)
    explicit = _explicit_threads(requested_threads, omp_num_threads)
    per_pass = explicit[0] if explicit else 1
    return max(1, min(AUTO_CPU_WORKERS, limits.usable // per_pass))


def choose_threads(
    requested: int | Literal["auto"],
    limits: CpuLimits,
    omp_num_threads: str | None = None,
    workers: int = 1,
) -> tuple[int, str]:
    """(threads per forward pass, where the number came from): the flag, else a valid
    OMP_NUM_THREADS, else the usable CPUs shared among the workers."""
    explicit = _explicit_threads(requested, omp_num_threads)
    if explicit:
        return explicit
    return max(1, limits.usable // max(1, workers)), AUTO


# -- reading the machine ------------------------------------------------------------------------


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def _ancestors(root: Path, cgroup_path: str) -> list[Path]:
    """root/a/b, root/a, root: a limit anywhere up the hierarchy applies to the process. Paths
    that do not exist (the host's path seen from inside a container) are skipped by the caller."""
    parts = [p for p in cgroup_path.split("/") if p and p not in (".", "..")]
    return [root.joinpath(*parts[:i]) for i in range(len(parts), -1, -1)]


def read_cgroup_quota(
    root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_SELF_CGROUP
) -> float | None:
    """The tightest CPU limit (in CPUs) of this process's cgroups, v2 or v1; None when none."""
    text = _read(proc_cgroup)
    if text is None:
        return None
    limits: list[float] = []
    for line in text.splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "":  # cgroup v2 (unified)
            for directory in _ancestors(root, path):
                cpu_max = _read(directory / "cpu.max")
                quota = parse_cpu_max(cpu_max) if cpu_max is not None else None
                if quota is not None:
                    limits.append(quota)
        elif "cpu" in controllers.split(","):  # cgroup v1, mounted as cpu or cpu,cpuacct
            for mount in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):
                for directory in _ancestors(root / mount, path):
                    q = _read(directory / "cpu.cfs_quota_us")
                    p = _read(directory / "cpu.cfs_period_us")
                    quota = parse_cfs_quota(q, p) if q is not None and p is not None else None
                    if quota is not None:
                        limits.append(quota)
    return min(limits) if limits else None


def _affinity() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def detect_cpu_limits(
    affinity: Callable[[], int] = _affinity,
    quota: Callable[[], float | None] = read_cgroup_quota,
) -> CpuLimits:
    return CpuLimits(affinity=affinity(), quota=quota())


# -- applying -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class CpuPlan:
    workers: int  # forward passes at once on CPU
    threads: int  # torch threads per forward pass
    source: str  # where the thread count came from
    single_pass_threads: int  # the thread count with one pass at a time (on a GPU)


# The plan `configure_cpu_threads` applied in this process (the engine factory reads it: the
# environment then holds the per-pass thread count, no longer the user's own).
_applied: CpuPlan | None = None


def plan_cpu_threads(
    requested: int | Literal["auto"] = AUTO,
    requested_workers: int | Literal["auto"] = AUTO,
    *,
    limits: CpuLimits | None = None,
    environ: Mapping[str, str] | None = None,
) -> CpuPlan:
    """The CPU forward workers and threads, changing nothing."""
    env = os.environ if environ is None else environ
    limits = limits or detect_cpu_limits()
    omp = env.get("OMP_NUM_THREADS")
    workers = choose_workers(requested_workers, limits, requested, omp)
    threads, source = choose_threads(requested, limits, omp, workers)
    single, _ = choose_threads(requested, limits, omp, 1)
    return CpuPlan(workers, threads, source, single)


def applied_cpu_plan() -> CpuPlan | None:
    """The plan `configure_cpu_threads` applied to this process; None when it never ran (a
    test, an embedding application)."""
    return _applied


def configure_cpu_threads(
    requested: int | Literal["auto"] = AUTO,
    requested_workers: int | Literal["auto"] = AUTO,
    *,
    limits: CpuLimits | None = None,
    environ: MutableMapping[str, str] | None = None,
) -> ThreadPlan:
    """Choose the CPU forward workers and their torch thread count, and set the
    OpenMP/tokenizer variables.

    Call before PyTorch is imported: OpenMP reads its variables once, when it starts. When torch
    is already loaded (an embedding application, a test), the thread count is applied through
    `torch.set_num_threads` and the wait policy stays whatever OpenMP started with."""
    global _applied
    env = os.environ if environ is None else environ
    limits = limits or detect_cpu_limits()
    plan = plan_cpu_threads(requested, requested_workers, limits=limits, environ=env)
    if environ is None:  # this process's own setup (a test passes its own mapping)
        _applied = plan
    for name in THREAD_COUNT_VARIABLES:
        env[name] = str(plan.threads)
    for name, value in DEFAULT_ENVIRONMENT.items():
        env.setdefault(name, value)
    torch_loaded = "torch" in sys.modules
    if torch_loaded:
        import torch

        # Threads started later (the batcher's forward workers) take this value on first use.
        torch.set_num_threads(plan.threads)
    names = (*THREAD_COUNT_VARIABLES, *DEFAULT_ENVIRONMENT)
    return ThreadPlan(
        threads=plan.threads,
        source=plan.source,
        workers=plan.workers,
        limits=limits,
        environment={name: env[name] for name in names},
        torch_already_loaded=torch_loaded,
    )


def log_thread_plan(plan: ThreadPlan) -> None:
    logger.info(
        "cpu threads",
        extra={
            "fields": {
                "cpu_workers": plan.workers,
                "torch_threads": plan.threads,
                "source": plan.source,
                "affinity_cpus": plan.limits.affinity,
                "cgroup_cpu_limit": plan.limits.quota,
                **plan.environment,
            }
        },
    )
    if plan.torch_already_loaded:
        logger.info(
            "torch was imported before the thread setup: the thread count is applied, but "
            "OMP_WAIT_POLICY takes effect only in a fresh process"
        )
