"""`reranker-runtime build` end to end on CPU, the atomic/idempotent output, crash recovery, exit
codes and termination messages, and the GPU path's orchestration with the TensorRT-LLM step faked."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from engines.helpers import (
    A10G,
    L4,
    REPO_ROOT,
    ServeProcess,
    inputs,
    mutate_checkpoint,
    run_build_cli,
)
from reranker_runtime.config import ServeSettings
from reranker_runtime.engine_build import atomic, command, trtllm
from reranker_runtime.engine_build.errors import (
    CheckpointInvalidError,
    GpuMismatchError,
    OutputConflictError,
)
from reranker_runtime.engines.manifest import ManifestError, read_manifest

PAIRS = [
    ("what is the capital of france", "paris is the capital city of france"),
    ("gpu inference", "bananas and apples are fruit"),
    ("deep learning", "a fast model for search and rank of passage text"),
    ("kubernetes cluster", "the server sends a response to the client request"),
]


def _cli_args(repo: Path | str, out: Path, **over: str) -> list[str]:
    args = {
        "--checkpoint-repo": str(repo),
        "--revision": "main",
        "--source": "HF",
        "--quantization": "no_quant",
        "--max-num-tokens": "1024",
        "--accelerator": "CPU",
        "--output": str(out),
    }
    args.update(over)
    return [x for kv in args.items() for x in kv]


def _temps(out: Path) -> list[Path]:
    return (
        [p for p in out.parent.iterdir() if p.name.startswith(atomic.temp_prefix(out))]
        if out.parent.exists()
        else []
    )


def _scores(engine, pairs) -> np.ndarray:
    from reranker_runtime.engines.base import EncodedPair

    encs = [engine.tokenizer(q, d) for q, d in pairs]
    return engine.score([EncodedPair(e["input_ids"], e.get("token_type_ids")) for e in encs])


# ------------------------------------------------------------------------------ CPU end to end


@pytest.mark.parametrize("fixture", ["xlmr_reranker", "bert_reranker"])
def test_cpu_build_then_load_scores_equal_reference(
    fixture: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    from reranker_runtime.engines.engine_dir import load_engine_from_dir
    from tiny_models import reference_logits

    model_dir: Path = request.getfixturevalue(fixture)
    out = tmp_path / "engines" / "key"
    term = tmp_path / "termination-log"
    r = run_build_cli(_cli_args(model_dir, out), env_extra={"RERANKER_TERMINATION_LOG": str(term)})
    assert r.returncode == 0, r.stderr
    assert "fetching" in r.stderr and "engine directory ready" in r.stderr  # progress logs
    m = read_manifest(out)
    assert m.engine == "pytorch" and m.gpu is None and m.build.dtype == "float32"
    assert m.inputs == inputs(model_dir).normalized()
    assert sorted(p.name for p in (out / "checkpoint").iterdir()) == sorted(
        ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    )
    assert oct((out / "checkpoint" / "model.safetensors").stat().st_mode & 0o777) == "0o644"
    assert "built: pytorch engine" in term.read_text()
    assert not _temps(out)

    engine = load_engine_from_dir(str(out), ServeSettings(device="cpu"))
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    np.testing.assert_allclose(
        _scores(engine, PAIRS), reference_logits(model_dir, PAIRS), atol=1e-5
    )


def test_cpu_engine_honours_max_seq_len_and_reports_the_checkpoint(
    xlmr_reranker: Path, tmp_path: Path
) -> None:
    """--max-seq-len caps inputs below the model's maximum, so a long-context model fits a smaller
    token budget; /info reports the checkpoint the engine came from, not the cache path."""
    from reranker_runtime.engines.engine_dir import load_engine_from_dir
    from reranker_runtime.service import RerankService

    out = tmp_path / "key"
    args = _cli_args(xlmr_reranker, out, **{"--max-num-tokens": "64", "--max-seq-len": "64"})
    r = run_build_cli(args)
    assert r.returncode == 0, r.stderr

    engine = load_engine_from_dir(str(out), ServeSettings(device="cpu"))
    assert engine.info.max_input_length == 64  # the tiny model itself accepts 128
    assert engine.info.model_id == str(xlmr_reranker) and engine.info.revision == "main"
    # The batcher's start-up check accepts a 64-token budget for this engine.
    RerankService(engine, ServeSettings(device="cpu", max_batch_tokens=64)).batcher.check_limits()


def test_rerun_is_a_fast_noop_and_other_inputs_are_refused(
    xlmr_reranker: Path, tmp_path: Path
) -> None:
    out = tmp_path / "key"
    assert run_build_cli(_cli_args(xlmr_reranker, out)).returncode == 0
    before = (out / "manifest.json").read_text()

    term = tmp_path / "term"
    r = run_build_cli(
        _cli_args(xlmr_reranker, out), env_extra={"RERANKER_TERMINATION_LOG": str(term)}
    )
    assert r.returncode == 0, r.stderr
    assert "nothing to do" in r.stderr and "already complete (no-op)" in term.read_text()
    assert (out / "manifest.json").read_text() == before  # untouched

    r = run_build_cli(
        _cli_args(xlmr_reranker, out, **{"--max-num-tokens": "2048"}),
        env_extra={"RERANKER_TERMINATION_LOG": str(term)},
    )
    assert r.returncode == 16
    msg = term.read_text()
    assert "OutputConflict, exit code 16" in msg
    assert "max_num_tokens: existing 1024, requested 2048" in msg
    assert (out / "manifest.json").read_text() == before


def test_foreign_directory_is_never_overwritten(xlmr_reranker: Path, tmp_path: Path) -> None:
    out = tmp_path / "key"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(OutputConflictError, match=r"not empty and has no manifest\.json"):
        command.run_build(inputs(xlmr_reranker), out)
    assert (out / "precious.txt").read_text() == "keep me"
    # an empty directory (e.g. pre-created mount point) is fine
    empty = tmp_path / "empty"
    empty.mkdir()
    assert command.run_build(inputs(xlmr_reranker), empty).status == "built"


def test_killed_build_leaves_no_complete_looking_output_and_rerun_completes(
    xlmr_reranker: Path, tmp_path: Path
) -> None:
    out = tmp_path / "engines" / "key"
    script = f"""
import os, signal, sys
from reranker_runtime.engine_build import checkpoint
_orig = checkpoint.copy_checkpoint
def _crash(src, dst):
    _orig(src, dst)                       # part of the temp directory is written ...
    os.kill(os.getpid(), signal.SIGKILL)  # ... then the pod is killed
checkpoint.copy_checkpoint = _crash
from reranker_runtime.engine_build.__main__ import main
sys.exit(main({_cli_args(xlmr_reranker, out)!r}))
"""
    r = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=REPO_ROOT
    )
    assert r.returncode == -9, r.stderr
    assert not out.exists()  # nothing that looks complete, or even present
    leftovers = _temps(out)
    assert len(leftovers) == 1 and (leftovers[0] / "checkpoint" / "config.json").exists()
    assert not (leftovers[0] / "manifest.json").exists()
    with pytest.raises(ManifestError, match="does not exist"):
        read_manifest(out)

    r = run_build_cli(_cli_args(xlmr_reranker, out))
    assert r.returncode == 0, r.stderr
    assert "left by an interrupted build" in r.stderr
    assert read_manifest(out).engine == "pytorch"
    assert not _temps(out)


def test_failure_mid_build_cleans_its_temp_dir(
    monkeypatch: pytest.MonkeyPatch, xlmr_reranker: Path, tmp_path: Path
) -> None:
    from reranker_runtime.engine_build import checkpoint

    orig = checkpoint.copy_checkpoint

    def boom(src, dst):
        orig(src, dst)
        raise RuntimeError("disk full")

    monkeypatch.setattr(checkpoint, "copy_checkpoint", boom)
    out = tmp_path / "key"
    with pytest.raises(RuntimeError, match=r"disk full"):
        command.run_build(inputs(xlmr_reranker), out)
    assert not out.exists() and not _temps(out)


# ------------------------------------------------------------- exit codes, termination messages


@pytest.mark.parametrize(
    ("fixture", "over", "code", "needles"),
    [
        (
            "xlmr_reranker",
            {"--quantization": "fp8", "--accelerator": "L4"},
            13,
            [
                "QuantizationUnsupported, exit code 13",
                "TensorRT-LLM has no FP8 path for BERT-family encoders",
            ],
        ),
        ("xlmr_reranker", {"--quantization": "fp4", "--accelerator": "H200"}, 13, ["no FP4 path"]),
        (
            "xlmr_reranker",
            {"--quantization": "fp8"},
            10,
            ["InvalidBuildArguments, exit code 10", "GPU-only"],
        ),
        ("xlmr_classifier", {}, 12, ["CheckpointUnsupported, exit code 12", "has 3 labels"]),
        ("xlmr_reranker", {"--max-seq-len": "0"}, 10, ["--max-seq-len must be >= 1"]),
    ],
)
def test_failures_exit_codes_and_termination_message(
    fixture: str,
    over: dict,
    code: int,
    needles: list[str],
    request: pytest.FixtureRequest,
    tmp_path: Path,
) -> None:
    model_dir = request.getfixturevalue(fixture)
    term = tmp_path / "termination-log"
    out = tmp_path / "key"
    r = run_build_cli(
        _cli_args(model_dir, out, **over), env_extra={"RERANKER_TERMINATION_LOG": str(term)}
    )
    assert r.returncode == code, r.stderr
    msg = term.read_text()
    assert msg.startswith("reranker-runtime build failed (")
    assert "\n" not in msg.rstrip("\n")  # one paragraph
    for n in needles:
        assert n in msg and n in r.stderr
    assert not out.exists() and not _temps(out)


def test_missing_checkpoint_is_a_fetch_error(tmp_path: Path) -> None:
    term = tmp_path / "t"
    r = run_build_cli(
        _cli_args(tmp_path / "nope", tmp_path / "o", **{"--source": "LOCAL"}),
        env_extra={"RERANKER_TERMINATION_LOG": str(term)},
    )
    assert r.returncode == 11
    assert (
        "CheckpointFetchFailed" in term.read_text()
        and "not an existing directory" in term.read_text()
    )


def test_pvc_checkpoint_is_read_from_the_mounted_claim(xlmr_reranker: Path, tmp_path: Path) -> None:
    # What the operator's init container runs for checkpoint.source PVC, the claim mounted
    # read-only at --checkpoint-mount.
    mount = tmp_path / "claim"
    mount.mkdir()
    shutil.copytree(xlmr_reranker, mount / "tiny")
    os.chmod(mount / "tiny", 0o555)  # read-only, as the operator mounts it
    out = tmp_path / "key"
    over = {"--source": "PVC", "--checkpoint-mount": str(mount)}
    r = run_build_cli(_cli_args("pvc://models/tiny", out, **over))
    assert r.returncode == 0, r.stderr
    manifest = read_manifest(out)
    assert (
        manifest.inputs.source == "PVC" and manifest.inputs.checkpoint_repo == "pvc://models/tiny"
    )
    term = tmp_path / "t"
    r = run_build_cli(
        _cli_args("pvc://models/tinny", tmp_path / "o", **over),
        env_extra={"RERANKER_TERMINATION_LOG": str(term)},
    )
    assert r.returncode == 11, r.stderr
    assert "no directory 'tinny' on the claim 'models'; its root holds tiny/" in term.read_text()


def test_termination_log_default_path_is_optional(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("RERANKER_TERMINATION_LOG", raising=False)
    monkeypatch.setattr(
        command, "DEFAULT_TERMINATION_LOG", str(tmp_path / "absent" / "termination-log")
    )
    command.write_termination_message("x")  # no file, no error
    target = tmp_path / "termination-log"
    target.write_text("")
    monkeypatch.setattr(command, "DEFAULT_TERMINATION_LOG", str(target))
    command.write_termination_message("line one\nline two " + "y" * 10000)
    text = target.read_text()
    assert text.startswith("line one line two") and len(text.encode()) <= 4001


@pytest.mark.skipif(os.path.exists("/dev/nvidia0"), reason="this machine has a GPU")
def test_gpu_accelerator_without_gpu_exits_14(
    xlmr_reranker: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    term = tmp_path / "t"
    r = run_build_cli(
        _cli_args(xlmr_reranker, tmp_path / "o", **{"--accelerator": "L4"}),
        env_extra={
            "RERANKER_TERMINATION_LOG": str(term),
            "PATH": "/usr/bin:/bin",
            "CUDA_VISIBLE_DEVICES": "",
        },
    )
    assert r.returncode == 14, r.stderr
    assert "AcceleratorMismatch" in term.read_text() and "NVIDIA L4 (sm_89)" in term.read_text()


# ------------------------------------------------------ GPU orchestration (TensorRT-LLM faked)


def _fake_build_engine(calls: list):
    def fake(
        checkpoint_dir: Path, engine_dir: Path, spec, profile, scratch: Path
    ) -> dict[str, str]:
        calls.append((checkpoint_dir, spec, profile))
        assert (checkpoint_dir / "config.json").is_file()
        engine_dir.mkdir(parents=True)
        (engine_dir / "rank0.engine").write_bytes(b"plan")
        (engine_dir / "config.json").write_text(
            json.dumps({"build_config": {"max_batch_size": profile.max_batch_size}})
        )
        return {"tensorrt_llm": "0.0-fake"}

    return fake


def test_gpu_build_orchestration(
    monkeypatch: pytest.MonkeyPatch, xlmr_reranker: Path, tmp_path: Path
) -> None:
    # TensorRT-LLM's BERT needs intermediate_size == 4 * hidden_size; only the config is read here.
    ckpt = mutate_checkpoint(xlmr_reranker, tmp_path / "ckpt", config={"intermediate_size": 128})
    calls: list = []
    monkeypatch.setattr(trtllm, "build_engine", _fake_build_engine(calls))
    out = tmp_path / "key"
    res = command.run_build(
        inputs(ckpt, accelerator="L4", max_num_tokens=16384), out, gpu_detector=lambda: L4
    )
    assert res.status == "built"
    m = read_manifest(out)
    assert m.engine == "tensorrt-llm" and m.gpu == L4
    assert (m.build.dtype, m.build.max_batch_size, m.build.max_input_len) == (
        "float16",
        256,
        128,
    )  # 16384 // 64: pairs of 64+ tokens fill the budget in one pass
    assert m.versions["tensorrt_llm"] == "0.0-fake"
    assert (out / "engine" / "rank0.engine").is_file() and (
        out / "checkpoint" / "tokenizer.json"
    ).is_file()
    assert not (out / ".scratch").exists()
    assert len(calls) == 1 and calls[0][1].position_offset == 2
    # idempotent: no second build, and no GPU needed to notice
    assert (
        command.run_build(
            inputs(ckpt, accelerator="L4", max_num_tokens=16384), out, gpu_detector=lambda: None
        ).status
        == "unchanged"
    )
    assert len(calls) == 1


def test_t4_gets_a_pytorch_engine_directory(
    monkeypatch: pytest.MonkeyPatch, xlmr_reranker: Path, tmp_path: Path
) -> None:
    """TensorRT-LLM's release builds have no sm_75 kernels: on a T4 the checkpoint is cached for
    the PyTorch engine (float16 on the GPU) instead of a TensorRT-LLM build that would fail."""
    from reranker_runtime.engines.engine_dir import load_engine_from_dir
    from reranker_runtime.engines.manifest import GpuInfo

    t4 = GpuInfo(name="Tesla T4", compute_capability="7.5")
    monkeypatch.setattr(
        trtllm, "build_engine", lambda *a, **k: pytest.fail("TensorRT-LLM build on a T4")
    )
    out = tmp_path / "key"
    # The tiny model's 2x MLP is fine here: TensorRT-LLM's constraints do not apply.
    res = command.run_build(inputs(xlmr_reranker, accelerator="T4"), out, gpu_detector=lambda: t4)
    assert res.status == "built"
    m = read_manifest(out)
    assert (m.engine, m.gpu, m.build.dtype) == ("pytorch", t4, "float16")
    assert not (out / "engine").exists()
    engine = load_engine_from_dir(
        str(out), ServeSettings(device="cpu")
    )  # the PyTorch engine (CPU here)
    assert engine.info.name == "pytorch"


def test_gpu_build_refuses_other_gpu_before_downloading(
    monkeypatch: pytest.MonkeyPatch, xlmr_reranker: Path, tmp_path: Path
) -> None:
    from reranker_runtime.engine_build import checkpoint

    monkeypatch.setattr(
        checkpoint, "fetch_checkpoint", lambda *a, **k: pytest.fail("fetched before the GPU check")
    )
    with pytest.raises(
        GpuMismatchError,
        match=r"expects an NVIDIA L4 \(sm_89\), but this node has NVIDIA A10G \(sm_86\)",
    ):
        command.run_build(
            inputs(xlmr_reranker, accelerator="L4"), tmp_path / "key", gpu_detector=lambda: A10G
        )


def test_gpu_build_refuses_models_trtllm_cannot_represent(
    monkeypatch: pytest.MonkeyPatch, xlmr_reranker: Path, tmp_path: Path
) -> None:
    monkeypatch.setattr(trtllm, "build_engine", _fake_build_engine([]))
    with pytest.raises(CheckpointInvalidError, match=r"4x MLP"):  # the tiny model's MLP is 2x
        command.run_build(
            inputs(xlmr_reranker, accelerator="L4"), tmp_path / "key", gpu_detector=lambda: L4
        )
    assert not (tmp_path / "key").exists()


def test_trtllm_missing_is_a_clear_build_error(xlmr_reranker: Path, tmp_path: Path) -> None:
    pytest.importorskip("torch")
    try:
        import tensorrt_llm  # noqa: F401

        pytest.skip("tensorrt_llm is installed here")
    except ImportError:
        pass
    from reranker_runtime.engine_build.errors import EngineBuildError

    ckpt = mutate_checkpoint(xlmr_reranker, tmp_path / "ckpt", config={"intermediate_size": 128})
    with pytest.raises(EngineBuildError, match=r"tensorrt_llm is not importable in this image"):
        command.run_build(inputs(ckpt, accelerator="L4"), tmp_path / "key", gpu_detector=lambda: L4)
    assert not (tmp_path / "key").exists() and not _temps(tmp_path / "key")


# --------------------------------------------------------------- serve --engine-dir over HTTP


def test_serve_engine_dir_over_http(xlmr_reranker: Path, tmp_path: Path) -> None:
    from tiny_models import reference_logits

    out = tmp_path / "key"
    assert run_build_cli(_cli_args(xlmr_reranker, out)).returncode == 0
    env = {
        "RERANKER_ENGINE_DIR": str(out),
        "RERANKER_DEVICE": "cpu",
        "RERANKER_MAX_BATCH_TOKENS": "1024",
    }
    query, texts = PAIRS[0][0], [d for _, d in PAIRS]
    with ServeProcess(env) as server:
        got = server.rerank_raw(query, texts)
    ref = reference_logits(xlmr_reranker, [(query, t) for t in texts])
    np.testing.assert_allclose(got, [x[0] for x in ref], atol=1e-5)
