"""`reranker-runtime gpu-check`: the CPU self-test writes both reports end to end; without a GPU
the real command stops at once; the peak table and FLOP count are right."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from reranker_runtime.gpucheck import checks, command
from reranker_runtime.gpucheck.report import ran_as

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("name", "dtype", "tflops"),
    [
        ("NVIDIA L4", "float16", 121.0),
        ("NVIDIA L40S", "bfloat16", 362.0),
        ("NVIDIA A10G", "float16", 70.0),
        ("NVIDIA A10", "float16", 125.0),
        ("NVIDIA A100-SXM4-80GB", "bfloat16", 312.0),
        ("NVIDIA H100 80GB HBM3", "bfloat16", 989.0),
        ("NVIDIA H100 PCIe", "float16", 756.0),
        ("NVIDIA H200", "bfloat16", 989.0),
        # H200 NVL: 1,671 TFLOPS with sparsity (not the SXM's 1,979), matched before the SXM row.
        ("NVIDIA H200 NVL", "bfloat16", 835.0),
        ("NVIDIA H200 NVL", "float16", 835.0),
        ("NVIDIA H100 NVL", "bfloat16", 835.0),
        # GH200's Hopper GPU (its datasheet: 990 dense), named as CUDA names it.
        ("NVIDIA GH200 480GB", "bfloat16", 990.0),
        ("NVIDIA GH200 144G HBM3e", "float16", 990.0),
        # No datasheet figure confirmed: no peak rather than the H100's.
        ("NVIDIA H800", "bfloat16", None),
        ("NVIDIA H800 PCIe", "float16", None),
        ("Tesla T4", "float16", 65.0),
        ("Tesla T4", "bfloat16", None),
        ("Some Future GPU", "float16", None),
    ],
)
def test_known_peak(name: str, dtype: str, tflops: float | None) -> None:
    assert checks.known_peak(name, dtype) == tflops


def test_flops_of_bge_reranker_large_at_256_tokens() -> None:
    config = SimpleNamespace(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24)
    assert checks.flops_per_pair(config, 256) == pytest.approx(161e9, rel=0.01)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU exit")
def test_without_a_gpu_the_script_stops_at_once(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHON=sys.executable, PATH=os.environ.get("PATH", ""))
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "runtime"), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        ["bash", str(REPO / "scripts" / "gpu-check.sh"), str(tmp_path / "report")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "no CUDA GPU is visible to PyTorch" in proc.stderr
    assert "--device cpu --quick" in proc.stderr
    assert not (tmp_path / "report").exists()  # nothing was run


def _script_env(tmp_path: Path, *, bf16: bool, vendor: str = "") -> dict[str, str]:
    cpuinfo = tmp_path / "cpuinfo"
    flags = "fpu sse avx2" + (" avx512_bf16" if bf16 else "")
    vendor_line = f"vendor_id\t: {vendor}\n" if vendor else ""
    cpuinfo.write_text(f"{vendor_line}model name\t: Test CPU\nflags\t\t: {flags}\n")
    (tmp_path / "no-wheels").mkdir()
    env = dict(os.environ, PYTHON=sys.executable, CPUINFO=str(cpuinfo))
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["WHEELS"] = str(tmp_path / "no-wheels")
    return env


def test_the_cpu_bf16_check_needs_native_bf16(tmp_path: Path) -> None:
    proc = subprocess.run(
        ["bash", str(REPO / "scripts" / "cpu-bf16-check.sh"), str(tmp_path / "report")],
        env=_script_env(tmp_path, bf16=False),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    assert "no avx512_bf16 or amx_bf16 flag" in proc.stderr
    assert not (tmp_path / "report").exists()


def _device_check(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(REPO / "scripts" / "device-check.sh")],
        env={**env, "OUT": str(tmp_path / "out"), "WORK": str(tmp_path / "work")},
        capture_output=True,
        text=True,
        timeout=120,
    )


def _returned_files(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU run")
def test_device_check_records_the_machine_and_reports_each_step(tmp_path: Path) -> None:
    """Without a GPU: the machine lines, gpu-check's exit 2 as the script's, every log packed
    into one archive, and the CPU step skipped on a host CPU that is not Intel's. What lands
    in $OUT fits what the device tool returns (8 files at most)."""
    proc = _device_check(tmp_path, **_script_env(tmp_path, bf16=False, vendor="AuthenticAMD"))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    out = tmp_path / "out"
    machine = (out / "machine.txt").read_text()
    assert "AuthenticAMD" in machine and "Test CPU" in machine
    assert "no native bf16 flags" in machine and f"torch {torch.__version__}" in machine
    assert "== gpu-check: exit 2" in proc.stdout
    assert "== cpu-check: skipped (not an Intel host CPU" in proc.stdout
    assert _returned_files(out) == ["logs.tar.gz", "machine.txt"]
    with tarfile.open(out / "logs.tar.gz") as logs:
        gpu_log = logs.extractfile("logs/gpu-check.log")
        assert gpu_log is not None and b"no CUDA GPU is visible" in gpu_log.read()


STUB_CPU_CHECK = """\
out="$1"; mkdir -p "$out/model-small"
echo "# CPU check with RUNS=$RUNS ROUNDS=$ROUNDS REQUESTS=$REQUESTS" > "$out/summary.md"
echo "CUDA_VISIBLE_DEVICES=[${CUDA_VISIBLE_DEVICES-unset}]" >> "$out/summary.md"
for run in $RUNS; do echo "$run result" > "$out/$run.txt"; echo '{}' > "$out/$run.json"; done
echo weights > "$out/model-small/model.safetensors"
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU run")
def test_device_check_runs_the_cpu_check_on_an_intel_host(tmp_path: Path) -> None:
    """On an Intel host the short cpu-check runs (here a stub standing in for the script): its
    settings reach it, with the GPUs hidden (on a GPU host the server's default device would be
    CUDA, the CrossEncoder baseline's the CPU), its summary and reports come back, its models
    and a previous run's leftovers do not, and $OUT stays within what the device tool returns."""
    stub = tmp_path / "cpu-check-stub.sh"
    stub.write_text(STUB_CPU_CHECK)
    stale = tmp_path / "work" / "logs" / "stale-from-an-earlier-run.log"
    stale.parent.mkdir(parents=True)
    stale.write_text("old")
    env = _script_env(tmp_path, bf16=True, vendor="GenuineIntel")
    env["CUDA_VISIBLE_DEVICES"] = "0"  # as on a GPU host that names its GPU
    proc = _device_check(tmp_path, **env, CPU_CHECK_SCRIPT=str(stub))
    assert "== cpu-check (at most 230s)" in proc.stdout, proc.stdout
    assert "== cpu-check: exit 0" in proc.stdout
    out = tmp_path / "out"
    assert (out / "cpu-check.md").read_text().strip().splitlines() == [
        "# CPU check with RUNS=fp32-quiet bf16-quiet ROUNDS=2 REQUESTS=16",
        "CUDA_VISIBLE_DEVICES=[]",
    ]
    returned = _returned_files(out)
    assert returned == ["cpu-check.md", "logs.tar.gz", "machine.txt"]
    with tarfile.open(out / "logs.tar.gz") as logs:
        names = set(logs.getnames())
    assert {
        f"logs/{run}.{ext}" for run in ("fp32-quiet", "bf16-quiet") for ext in ("txt", "json")
    } <= names
    assert "logs/cpu-check.log" in names and "logs/gpu-check.log" in names
    assert not any("stale" in n or "safetensors" in n for n in names)


# Stands in for python3 in cpu-check.sh: logs each call and answers the few that print. As the
# real ones do, the bench and the warm-up's health probe wait for their server (to have logged
# its call: the script kills it right after them).
STUB_PYTHON = """\
#!/usr/bin/env bash
printf '%s CUDA_VISIBLE_DEVICES=[%s]\\n' "$*" "${CUDA_VISIBLE_DEVICES-unset}" >> "$CALLS"
wait_for_servers() {
    for _ in $(seq 200); do
        if [ "$(grep -c 'cli serve ' "$CALLS")" -ge "$1" ]; then return; fi
        sleep 0.05
    done
}
case "$*" in
    *socket*) echo 40000 ;;
    *"cli bench "*) wait_for_servers "$(grep -c 'cli bench ' "$CALLS")" ;;
    */health*) wait_for_servers "$(( $(grep -c 'cli bench ' "$CALLS") + 1 ))" ;;
esac
exit 0
"""


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="cpu-check pins to two CPUs")
def test_cpu_check_serves_on_the_cpu(tmp_path: Path) -> None:
    """Every server cpu-check.sh starts runs on the CPU, whatever GPU the host has: the
    CrossEncoder baseline it is compared with always does (--device auto would pick CUDA)."""
    python = tmp_path / "python"
    python.write_text(STUB_PYTHON)
    python.chmod(0o755)
    calls = tmp_path / "calls.log"
    cpus = ",".join(map(str, sorted(os.sched_getaffinity(0))[:2]))
    env = {
        **_script_env(tmp_path, bf16=True),
        "PYTHON": str(python),
        "CALLS": str(calls),
        "CPUS": cpus,
        "RUNS": "fp32-quiet fp32-neighbour bf16-quiet bf16-neighbour warmup",
        "ROUNDS": "1",
        "REQUESTS": "1",
    }
    proc = subprocess.run(
        ["bash", str(REPO / "scripts" / "cpu-check.sh"), str(tmp_path / "report")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    serves = [c for c in calls.read_text().splitlines() if "reranker_runtime.cli serve " in c]
    assert len(serves) == 5, calls.read_text()  # the four runs and the warm-up
    for call in serves:
        args = call.split()
        assert args[args.index("--device") + 1] == "cpu", call
    benches = [c for c in calls.read_text().splitlines() if "reranker_runtime.cli bench " in c]
    assert len(benches) == 4


def test_cpu_check_refuses_an_unknown_run(tmp_path: Path) -> None:
    proc = subprocess.run(
        ["bash", str(REPO / "scripts" / "cpu-check.sh"), str(tmp_path / "report")],
        env={**_script_env(tmp_path, bf16=False), "RUNS": "fp32-quiet fp64-quiet"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "unknown run 'fp64-quiet'" in proc.stderr
    assert not (tmp_path / "report").exists()


def test_cpu_self_test_writes_both_reports(
    tmp_path: Path,
    xlmr_reranker: Path,
    bert_reranker: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The session's tiny checkpoints stand in for the ones the check builds (same builder kind),
    # so CI pays no tokenizer training here.
    made = {"xlmr": xlmr_reranker, "roberta": xlmr_reranker, "bert": bert_reranker}
    monkeypatch.setattr(command.GpuCheck, "_model", lambda self, arch, shape: made[arch])
    parser = argparse.ArgumentParser()
    command.add_gpu_check_parser(parser.add_subparsers())
    args = parser.parse_args(
        [
            "gpu-check",
            "--device",
            "cpu",
            "--quick",
            "--out",
            str(tmp_path / "report"),
            "--tokens",
            "64",
            "--max-batch-tokens",
            "512",
            "--concurrency",
            "4",
            "--server-seconds",
            "0.3",
        ]
    )
    assert args.func(args) == 0

    report = json.loads((tmp_path / "report" / "gpu-check.json").read_text())
    assert report["mode"] == "cpu-self-test" and report["peak"] == {}
    assert "not GPU figures" in report["note"]
    rows = report["correctness"]
    assert {(r["model"], r["engine"]) for r in rows} == {
        (f"{arch}-tiny", engine)
        for arch in ("xlmr", "roberta", "bert")
        for engine in ("padded", "packed")
    }
    assert all(r["ok"] and r["max_abs_score_delta"] <= 1e-5 for r in rows)
    throughput = report["throughput"]["rows"]
    assert {(r["engine"], r["tokens_per_pair"]) for r in throughput} == {
        (e, t) for e in ("padded", "packed") for t in ("64", "mixed")
    }
    assert all(
        r["pairs_per_s"] > 0 and r["pct_datasheet_peak"] is None
        for r in throughput
        if r["tokens_per_pair"] == "64"
    )
    # Each row says what ran: the packed engine's attention backend, no CUDA graph on CPU.
    packed = [r for r in throughput if r["engine"] == "packed"]
    assert all(r["attention"] == "grouped" and r["graphs_captured"] == 0 for r in packed)
    # TFLOP/s: one model-FLOP count for both engines (what the packed engine skips in its last
    # layer is not subtracted), said in both reports.
    assert report["throughput"]["flop_convention"] == checks.FLOP_CONVENTION
    assert "model FLOPs" in checks.FLOP_CONVENTION
    from transformers import AutoConfig

    model_flops = checks.flops_per_pair(AutoConfig.from_pretrained(str(xlmr_reranker)), 64)
    for row in throughput:
        if row["tokens_per_pair"] == "64":
            assert row["tflops"] == pytest.approx(row["pairs_per_s"] * model_flops / 1e12)
    server = report["server"]
    assert server["ok"] > 0 and server["errors"] == {}
    assert server["engine_only_pairs_per_s"] > 0 and server["lone_16_pair_ms"] > 0
    assert "partial" not in server  # the final section replaced the one saved after the load

    markdown = (tmp_path / "report" / "gpu-check.md").read_text()
    for heading in (
        "## Environment",
        "## Correctness",
        "## Engine throughput",
        "## Server end to end",
    ):
        assert heading in markdown
    assert "Dense peak" not in markdown  # no GPU figure is claimed
    assert f"TFLOP/s counts {checks.FLOP_CONVENTION}" in markdown


@pytest.mark.parametrize(
    ("stats", "shown"),
    [
        ({"attention": "varlen", "graphs_enabled": True, "graphs_captured": 12}, "varlen, 12 CUDA graphs"),
        ({"attention": "varlen", "graphs_enabled": True, "graphs_captured": 0},
         "varlen, EAGER: no CUDA graph captured"),
        ({"attention": "varlen", "graphs_enabled": False, "graphs_captured": 0,
          "graph_capture_error": "RuntimeError: CUDA out of memory"},
         "varlen, EAGER: graph capture failed (RuntimeError: CUDA out of memory)"),
        ({"attention": "varlen", "graphs_enabled": False, "graphs_captured": 0}, "varlen"),
        ({"attention": None}, ""),
    ],
)  # fmt: skip
def test_a_graphed_row_that_ran_eager_says_so(stats: dict[str, Any], shown: str) -> None:
    assert ran_as(stats) == shown


def test_a_failed_correctness_check_exits_1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fake_run(self: command.GpuCheck, checkpoint: object) -> dict:
        return {
            "mode": "cpu-self-test",
            "environment": {"torch": torch.__version__},
            "correctness": [
                {"model": "m", "engine": "packed", "dtype": "float32", "ok": False, "error": "boom"}
            ],
            "throughput": {},
            "server": None,
        }

    monkeypatch.setattr(command.GpuCheck, "run", fake_run)
    args = argparse.Namespace(device="cpu", out=str(tmp_path / "r"), quick=True, args=None)
    for name in ("shape", "tokens", "rounds", "seconds", "concurrency", "server_seconds", "dtypes"):
        setattr(args, name, None)
    args.time_limit, args.max_batch_tokens, args.torch_compile, args.skip_server = (
        10.0,
        512,
        False,
        True,
    )
    assert command.run_gpu_check(args) == 1
    assert "error: boom" in (tmp_path / "r" / "gpu-check.md").read_text()


def test_a_run_cut_short_still_leaves_its_reports(
    tmp_path: Path,
    xlmr_reranker: Path,
    bert_reranker: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A time limit (the device tool's, device-check.sh's) may kill the run mid-way: the sections
    done so far are on disk, marked incomplete."""
    made = {"xlmr": xlmr_reranker, "roberta": xlmr_reranker, "bert": bert_reranker}
    monkeypatch.setattr(command.GpuCheck, "_model", lambda self, arch, shape: made[arch])

    def killed(self: command.GpuCheck, peak: dict) -> dict:
        raise KeyboardInterrupt  # what the run sees of `timeout`'s signal, at the worst moment

    monkeypatch.setattr(command.GpuCheck, "throughput", killed)
    parser = argparse.ArgumentParser()
    command.add_gpu_check_parser(parser.add_subparsers())
    out = tmp_path / "report"
    args = parser.parse_args(["gpu-check", "--device", "cpu", "--quick", "--out", str(out)])
    with pytest.raises(KeyboardInterrupt):
        args.func(args)
    report = json.loads((out / "gpu-check.json").read_text())
    assert report["complete"] is False
    assert len(report["correctness"]) == 6 and "throughput" not in report
    markdown = (out / "gpu-check.md").read_text()
    assert "**Incomplete**" in markdown and "## Correctness" in markdown
    assert not list(out.glob("*.partial"))  # written whole, then renamed


class _Killed(BaseException):
    """What the run sees of a kill (not an Exception: nothing on the way catches it)."""


@pytest.mark.parametrize("stop", [_Killed, RuntimeError])
def test_the_server_load_figures_outlive_a_stop_after_the_load(
    tmp_path: Path,
    xlmr_reranker: Path,
    bert_reranker: Path,
    monkeypatch: pytest.MonkeyPatch,
    stop: type[BaseException],
) -> None:
    """The server's load figures are written as soon as they exist: a kill during the lone
    requests, the server's shutdown or the engine timing that follow keeps them, and so does an
    error there (the section then holds both)."""
    from reranker_runtime.bench import workload

    made = {"xlmr": xlmr_reranker, "roberta": xlmr_reranker, "bert": bert_reranker}
    monkeypatch.setattr(command.GpuCheck, "_model", lambda self, arch, shape: made[arch])
    make_request = workload.make_request

    def stopped_at_the_second_lone_request(seed: int, i: int, **kwargs: Any) -> Any:
        if i == 10**6 + 1:  # server_end_to_end's lone requests are 10**6 + 0..4
            raise stop("stopped after the load")
        return make_request(seed, i, **kwargs)

    monkeypatch.setattr(workload, "make_request", stopped_at_the_second_lone_request)
    parser = argparse.ArgumentParser()
    command.add_gpu_check_parser(parser.add_subparsers())
    out = tmp_path / "report"
    args = parser.parse_args(
        ["gpu-check", "--device", "cpu", "--quick", "--out", str(out), "--server-seconds", "0.3"]
    )
    if stop is _Killed:
        with pytest.raises(_Killed):
            args.func(args)
    else:
        assert args.func(args) == 0
    report = json.loads((out / "gpu-check.json").read_text())
    assert report["complete"] is (stop is not _Killed)
    server = report["server"]
    assert server["partial"] is True and server["ok"] > 0 and server["pairs_per_s"] > 0
    assert server["engine"] == "packed" and server["server_over_engine"] > 0
    assert "lone_16_pair_ms" not in server
    markdown = (out / "gpu-check.md").read_text()
    assert "## Server end to end" in markdown and " pairs/s, p50 " in markdown
    assert "lone 16-pair request: not measured" in markdown
    if stop is RuntimeError:
        assert server["error"] == "RuntimeError: stopped after the load"
        assert "error: RuntimeError: stopped after the load" in markdown


class _Offset:
    """An engine whose logits are off by a constant: a real bug a tolerance must catch."""

    def __init__(self, engine: object, offset: float) -> None:
        self.engine, self.offset = engine, offset

    def score(self, batch: object) -> object:
        return self.engine.score(batch) + self.offset  # type: ignore[attr-defined]


def test_half_precision_is_judged_against_transformers_at_that_dtype(
    xlmr_reranker: Path,
) -> None:
    """bfloat16 on CPU stands in for the GPU's half precision: the padded and packed engines
    pass against the baseline of transformers itself in bfloat16, pair by pair, while an engine
    that is wrong by a fraction of a logit fails."""
    from transformers import AutoTokenizer

    from reranker_runtime.engines.packed_engine import PackedEngine
    from reranker_runtime.engines.torch_engine import TorchEngine

    model = str(xlmr_reranker)
    tokenizer = AutoTokenizer.from_pretrained(model)
    per_query = 8
    batch = checks.encode(tokenizer, checks.workload_pairs(4, per_query, seed=7), 128)
    ref = checks.reference_logits(model, batch, "cpu")
    baseline = checks.compare(
        checks.reference_logits(model, batch, "cpu", "bfloat16"), ref, per_query
    )
    padded = TorchEngine.load(model, device="cpu", dtype="bfloat16")
    engines = {
        "padded": padded,
        "packed": PackedEngine.from_torch_engine(padded),
        "wrong": _Offset(padded, 0.5),
    }
    rows = {
        name: checks.correctness_row(
            "xlmr-tiny",
            name,
            "bfloat16",
            engine,
            batch,
            ref,
            per_query,
            cpu=True,
            baseline=baseline,
        )
        for name, engine in engines.items()
    }
    assert rows["padded"]["ok"] and rows["packed"]["ok"], rows
    assert not rows["wrong"]["ok"], rows["wrong"]
    assert rows["packed"]["allowed_score_delta"] >= checks.SCORE_TOL["bfloat16"]
    assert rows["packed"]["baseline_max_abs_score_delta"] == baseline["max_abs_score_delta"]


def test_bad_device_is_a_usage_error(tmp_path: Path) -> None:
    args = argparse.Namespace(device="tpu", out=str(tmp_path))
    assert command.run_gpu_check(args) == 2


@pytest.mark.parametrize(
    ("alive", "message"),
    [(False, "stopped before it was ready"), (True, "not ready within 1 s")],
)
def test_a_server_that_never_gets_ready_fails_within_the_time_left(
    monkeypatch: pytest.MonkeyPatch, alive: bool, message: str
) -> None:
    """The end-to-end step waits for /health only while the server's thread lives and the
    check's time allows: a warm-up that failed is reported, not waited on until the step's
    outer timeout kills the whole check."""
    server = SimpleNamespace(should_exit=False)

    def serving() -> None:  # like uvicorn's run(): until told to exit, answering nothing
        while alive and not server.should_exit:
            time.sleep(0.01)

    thread = threading.Thread(target=serving, daemon=True)
    thread.start()
    monkeypatch.setattr(checks, "serve_in_thread", lambda *a: (server, thread))
    engine = SimpleNamespace(tokenizer=None, info=SimpleNamespace(max_input_length=8))
    with pytest.raises(RuntimeError, match=message):
        checks.server_end_to_end(
            engine,  # type: ignore[arg-type]
            None,
            concurrency=1,
            duration_s=0.1,
            words=5,
            seed=0,
            ready_within_s=1,
        )
    assert server.should_exit  # the server thread is told to stop either way
    thread.join(5)
    assert not thread.is_alive()
