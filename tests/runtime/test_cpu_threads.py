"""Choices the server makes from the machine: torch threads (affinity, cgroup CPU limit, flags,
OMP_NUM_THREADS), the OpenMP/tokenizer environment, `--max-batch-tokens auto` per device and
engine (and /info reporting the number), and the warm-up plan with its progress log lines."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

from reranker_runtime import cpu_threads
from reranker_runtime.batch_budget import (
    CPU_MAX_BATCH_TOKENS,
    GPU_MAX_BATCH_TOKENS,
    auto_max_batch_tokens,
    parse_max_batch_tokens,
    resolve_max_batch_tokens,
)
from reranker_runtime.config import AUTO
from reranker_runtime.cpu_threads import (
    CpuLimits,
    choose_threads,
    configure_cpu_threads,
    parse_cfs_quota,
    parse_cpu_max,
    parse_cpu_workers,
    parse_torch_threads,
    plan_cpu_threads,
    read_cgroup_quota,
)
from reranker_runtime.engines.base import warmup_passes
from reranker_runtime.engines.torch_engine import TorchEngine
from runtime.api_support import serving, settings_for
from runtime.test_server_process import free_port, status_of, wait_for

# ---------------------------------------------------------------------------------------------
# CPUs available to the process


@pytest.mark.parametrize(
    ("text", "cpus"),
    [
        ("max 100000", None),
        ("200000 100000", 2.0),
        ("150000 100000\n", 1.5),
        ("50000 100000", 0.5),
        ("", None),
        ("garbage", None),
        ("0 100000", None),
    ],
)
def test_parse_cgroup_v2_cpu_max(text: str, cpus: float | None) -> None:
    assert parse_cpu_max(text) == cpus


@pytest.mark.parametrize(
    ("quota", "period", "cpus"),
    [
        ("-1", "100000", None),
        ("300000", "100000\n", 3.0),
        ("50000", "100000", 0.5),
        ("x", "1", None),
    ],
)
def test_parse_cgroup_v1_cfs_quota(quota: str, period: str, cpus: float | None) -> None:
    assert parse_cfs_quota(quota, period) == cpus


@pytest.mark.parametrize(
    ("affinity", "quota", "usable"),
    [
        (2, None, 2),  # a VM with 2 cores, no limit
        (64, 2.0, 2),  # a pod with limits.cpu: 2 on a 64-core node
        (64, 2.5, 2),  # a fractional limit rounds down: 3 threads would be throttled
        (64, 0.5, 1),  # below one CPU: still one thread
        (4, 8.0, 4),  # taskset/cpuset narrower than the quota
        (0, None, 1),
    ],
)
def test_usable_cpus_from_affinity_and_quota(
    affinity: int, quota: float | None, usable: int
) -> None:
    assert CpuLimits(affinity=affinity, quota=quota).usable == usable


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cgroup_v2_takes_the_tightest_limit_up_the_hierarchy(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    _write(tmp_path / "self", "0::/kubepods/pod1/ctr\n")
    _write(root / "kubepods/pod1/ctr/cpu.max", "max 100000\n")
    _write(root / "kubepods/pod1/cpu.max", "150000 100000\n")
    _write(root / "kubepods/cpu.max", "800000 100000\n")
    assert read_cgroup_quota(root, tmp_path / "self") == 1.5


def test_cgroup_v2_in_a_container_namespace_reads_the_root(tmp_path: Path) -> None:
    # The host's path is not visible inside the container: the mount root is the container's.
    root = tmp_path / "cgroup"
    _write(tmp_path / "self", "0::/system.slice/docker-abc.scope\n")
    _write(root / "cpu.max", "200000 100000\n")
    assert read_cgroup_quota(root, tmp_path / "self") == 2.0


def test_cgroup_v1_cpu_controller(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    _write(tmp_path / "self", "4:memory:/x\n3:cpu,cpuacct:/kubepods/pod2\n0::/\n")
    _write(root / "cpu,cpuacct/kubepods/pod2/cpu.cfs_quota_us", "300000\n")
    _write(root / "cpu,cpuacct/kubepods/pod2/cpu.cfs_period_us", "100000\n")
    _write(root / "cpu,cpuacct/cpu.cfs_quota_us", "-1\n")
    _write(root / "cpu,cpuacct/cpu.cfs_period_us", "100000\n")
    assert read_cgroup_quota(root, tmp_path / "self") == 3.0


def test_no_cgroup_limit(tmp_path: Path) -> None:
    _write(tmp_path / "self", "0::/\n")
    _write(tmp_path / "cgroup/cpu.max", "max 100000\n")
    assert read_cgroup_quota(tmp_path / "cgroup", tmp_path / "self") is None
    assert read_cgroup_quota(tmp_path / "cgroup", tmp_path / "missing") is None


# ---------------------------------------------------------------------------------------------
# Thread choice and the environment


def test_thread_choice_precedence() -> None:
    limits = CpuLimits(affinity=8, quota=2.0)
    assert choose_threads(AUTO, limits) == (2, "auto")
    assert choose_threads(AUTO, limits, "3") == (3, "OMP_NUM_THREADS")
    assert choose_threads(AUTO, limits, "4,2") == (4, "OMP_NUM_THREADS")  # nested levels
    assert choose_threads(AUTO, limits, "lots") == (2, "auto")  # unusable value: ignored
    assert choose_threads(AUTO, limits, "0") == (2, "auto")
    assert choose_threads(5, limits, "3") == (5, "--torch-threads")


@pytest.mark.parametrize(
    ("affinity", "quota", "threads", "workers", "env", "plan"),
    [
        (2, None, AUTO, AUTO, None, (2, 1, "auto")),  # 2 CPUs: two single-threaded passes
        (1, None, AUTO, AUTO, None, (1, 1, "auto")),
        (8, 3.0, AUTO, AUTO, None, (2, 1, "auto")),  # a 3-CPU limit: 2 passes x 1 thread
        (16, None, AUTO, AUTO, None, (2, 8, "auto")),
        (2, None, 2, AUTO, None, (1, 2, "--torch-threads")),  # the user's threads fill the CPUs
        (8, None, 2, AUTO, None, (2, 2, "--torch-threads")),
        (2, None, AUTO, AUTO, "2", (1, 2, "OMP_NUM_THREADS")),
        (8, None, AUTO, 4, None, (4, 2, "auto")),  # explicit workers share the CPUs
        (2, None, AUTO, 1, None, (1, 2, "auto")),  # one pass on every CPU (the old default)
    ],
)
def test_cpu_forward_workers_and_threads(
    affinity: int,
    quota: float | None,
    threads: int | str,
    workers: int | str,
    env: str | None,
    plan: tuple[int, int, str],
) -> None:
    environ = {"OMP_NUM_THREADS": env} if env else {}
    limits = CpuLimits(affinity=affinity, quota=quota)
    got = plan_cpu_threads(threads, workers, limits=limits, environ=environ)  # type: ignore[arg-type]
    assert (got.workers, got.threads, got.source) == plan
    assert parse_cpu_workers("auto") == AUTO and parse_cpu_workers("3") == 3
    with pytest.raises(ValueError, match="auto"):
        parse_cpu_workers("0")


def test_cpu_engines_run_as_many_passes_as_workers(xlmr_reranker: Path) -> None:
    from reranker_runtime.config import ServeSettings
    from reranker_runtime.engines.factory import create_engine

    for engine_name in ("packed", "torch"):
        settings = ServeSettings(
            model=str(xlmr_reranker), device="cpu", engine=engine_name, cpu_workers=3
        )
        engine = create_engine(settings)
        assert engine.reentrant_on_cpu and engine.max_concurrent_scores == 3


@pytest.mark.parametrize("text", ["0", "-2", "two", ""])
def test_torch_threads_flag_refuses_bad_values(text: str) -> None:
    with pytest.raises(ValueError, match="auto"):
        parse_torch_threads(text)
    assert parse_torch_threads(" AUTO ") == AUTO and parse_torch_threads("3") == 3


@pytest.fixture
def torch_threads_restored() -> Iterator[None]:
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_configure_sets_thread_variables_and_keeps_overrides(torch_threads_restored: None) -> None:
    env = {"OMP_WAIT_POLICY": "ACTIVE"}  # the user's choice wins
    plan = configure_cpu_threads(AUTO, limits=CpuLimits(affinity=4, quota=1.0), environ=env)
    assert plan.threads == 1 and plan.source == "auto"
    assert env == {
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "OMP_WAIT_POLICY": "ACTIVE",
        "TOKENIZERS_PARALLELISM": "false",
    }
    assert plan.environment == env
    # torch is already imported in this process: the count is applied directly.
    assert plan.torch_already_loaded and torch.get_num_threads() == 1


def test_configure_flag_overrides_omp_num_threads(torch_threads_restored: None) -> None:
    env = {"OMP_NUM_THREADS": "8"}
    plan = configure_cpu_threads(2, limits=CpuLimits(affinity=4), environ=env)
    assert (plan.threads, plan.source) == (2, "--torch-threads")
    assert env["OMP_NUM_THREADS"] == "2" and env["OMP_WAIT_POLICY"] == "PASSIVE"


# ---------------------------------------------------------------------------------------------
# --max-batch-tokens auto


def test_max_batch_tokens_parsing() -> None:
    assert parse_max_batch_tokens("auto") == AUTO
    assert parse_max_batch_tokens("Auto") == AUTO
    assert parse_max_batch_tokens("4096") == 4096
    for bad in ("0", "-1", "many", "2k"):
        with pytest.raises(ValueError, match="auto"):
            parse_max_batch_tokens(bad)


@pytest.mark.parametrize(
    ("device", "max_len", "engine_cap", "budget"),
    [
        ("cpu", 512, None, CPU_MAX_BATCH_TOKENS),
        ("cpu", 8192, None, 8192),  # one input must fit one batch
        ("cuda", 512, None, GPU_MAX_BATCH_TOKENS),
        ("cuda:1", 512, None, GPU_MAX_BATCH_TOKENS),
        ("cuda:0", 512, 8192, 8192),  # a TensorRT profile's own cap, without a warning
    ],
)
def test_auto_budget_per_device_and_engine(
    device: str, max_len: int, engine_cap: int | None, budget: int
) -> None:
    assert auto_max_batch_tokens(device, max_len, engine_cap) == budget


def test_explicit_budget_is_kept(xlmr_engine: TorchEngine) -> None:
    assert resolve_max_batch_tokens(700, xlmr_engine.info) == 700
    assert resolve_max_batch_tokens(AUTO, xlmr_engine.info) == CPU_MAX_BATCH_TOKENS


async def test_info_reports_the_auto_budget_and_threads(
    xlmr_reranker: Path, xlmr_engine: TorchEngine
) -> None:
    async with serving(settings_for(xlmr_reranker, max_batch_tokens=AUTO), xlmr_engine) as client:
        info = (await client.get("/info")).json()
    assert info["max_batch_tokens"] == CPU_MAX_BATCH_TOKENS
    assert info["torch_threads"] == xlmr_engine.info.extra["torch_threads"]


# ---------------------------------------------------------------------------------------------
# Warm-up


@pytest.mark.parametrize(
    ("device", "budget", "max_len", "max_batch", "passes"),
    [
        ("cuda", 16384, 512, None, [(32, 512), (1, 8)]),  # GPU: the full budget (OOM at start)
        ("cuda:0", 16384, 512, 8, [(8, 512), (1, 8)]),  # at most the engine's batch size
        ("cpu", 2048, 512, None, [(1, 512), (1, 8)]),  # CPU: one sequence, whatever the budget
        ("cpu", 16384, 512, None, [(1, 512), (1, 8)]),
        ("cpu", 8192, 8192, None, [(1, 512), (1, 8)]),  # a long-context model: bounded too
        ("cpu", 2048, 4, None, [(1, 4), (1, 4)]),
    ],
)
def test_warmup_plan(
    device: str, budget: int, max_len: int, max_batch: int | None, passes: list[tuple[int, int]]
) -> None:
    assert warmup_passes(device, budget, max_len, max_batch) == passes


def test_warmup_logs_each_pass(xlmr_engine: TorchEngine, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="reranker_runtime.engines.base"):
        xlmr_engine.warmup(1024)
    messages = [r.getMessage() for r in caplog.records]
    assert messages[0] == "warming up: 1 x 128 tokens, 1 x 8 tokens"
    assert messages[1].startswith("warm-up pass 1/2: 1 x 128 tokens in ")
    assert messages[2].startswith("warm-up pass 2/2: 1 x 8 tokens in ")
    fields = caplog.records[1].__dict__["fields"]
    assert (fields["sequences"], fields["tokens_each"]) == (1, 128) and fields["seconds"] >= 0


# ---------------------------------------------------------------------------------------------
# The real `serve` process: thread setup before torch starts, auto budget, warm-up lines


def test_serve_process_sets_threads_and_reports_auto_budget(
    xlmr_reranker: Path, tmp_path: Path
) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RERANKER_", "OMP_"))}
    env.update(
        RERANKER_MODEL=str(xlmr_reranker),
        RERANKER_HOST="127.0.0.1",
        RERANKER_PORT=str(port),
        RERANKER_DEVICE="cpu",
        RERANKER_TORCH_THREADS="1",
        RERANKER_LOG_FORMAT="text",
    )
    log = tmp_path / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "reranker_runtime.cli", "serve"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            wait_for("/health 200", lambda: status_of(client, "/health") == 200, proc)
            info = client.get("/info").json()
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    text = log.read_text()
    # One thread per pass: as many passes at once as CPUs, at most 2, sharing the auto budget.
    workers = min(2, len(os.sched_getaffinity(0)))
    assert info["cpu_workers"] == workers
    assert info["max_batch_tokens"] == CPU_MAX_BATCH_TOKENS // workers
    assert info["torch_threads"] == 1
    assert f"cpu threads cpu_workers={workers} torch_threads=1 source=--torch-threads" in text
    assert "OMP_WAIT_POLICY=PASSIVE" in text and "TOKENIZERS_PARALLELISM=false" in text
    assert "warming up: 1 x 128 tokens, 1 x 8 tokens" in text
    assert "warm-up pass 1/2: 1 x 128 tokens in " in text
    assert "warm-up pass 2/2: 1 x 8 tokens in " in text


def test_gpu_serving_gives_every_cpu_to_one_pool(
    monkeypatch: pytest.MonkeyPatch, torch_threads_restored: None
) -> None:
    """`serve` splits the CPUs among forward workers before it knows the device; on a GPU there
    are none, so the engine factory gives the host-side pool every CPU back."""
    from reranker_runtime.config import ServeSettings
    from reranker_runtime.engines import factory, torch_engine

    loaded = object()
    # As `serve` leaves the process on 2 CPUs: the plan applied, OMP_NUM_THREADS per pass.
    plan = cpu_threads.plan_cpu_threads(limits=CpuLimits(affinity=2), environ={})
    assert (plan.workers, plan.threads, plan.single_pass_threads) == (2, 1, 2)
    monkeypatch.setattr(cpu_threads, "_applied", plan)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setattr(torch_engine, "resolve_device", lambda _device: "cuda:0")
    monkeypatch.setattr(factory, "_create_engine", lambda _settings, _device: loaded)
    torch.set_num_threads(1)
    assert factory.create_engine(ServeSettings(model="m")) is loaded
    assert torch.get_num_threads() == 2
    # A process `serve` did not set up (an embedding application) keeps its own thread count.
    monkeypatch.setattr(cpu_threads, "_applied", None)
    torch.set_num_threads(1)
    assert factory.create_engine(ServeSettings(model="m")) is loaded
    assert torch.get_num_threads() == 1
