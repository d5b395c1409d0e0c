"""GPU detection parsing, the build-time accelerator check and the serve-time engine check."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engines.helpers import A10G, L4, inputs
from reranker_runtime.config import ServeSettings
from reranker_runtime.engine_build import gpu
from reranker_runtime.engine_build.errors import GpuMismatchError
from reranker_runtime.engines.engine_dir import load_engine_from_dir
from reranker_runtime.engines.gpu import parse_nvidia_smi
from reranker_runtime.engines.manifest import (
    BuildShapes,
    GpuInfo,
    Manifest,
    ModelInfo,
    write_manifest,
)
from reranker_runtime.errors import ModelLoadError


def test_parse_nvidia_smi() -> None:
    assert parse_nvidia_smi("NVIDIA L4, 8.9\n") == GpuInfo("NVIDIA L4", "8.9")
    assert parse_nvidia_smi("NVIDIA H100 80GB HBM3, 9.0\nNVIDIA H100 80GB HBM3, 9.0\n") == GpuInfo(
        "NVIDIA H100 80GB HBM3", "9.0"
    )
    assert parse_nvidia_smi("") is None
    assert parse_nvidia_smi("Failed to initialize NVML") is None


@pytest.mark.parametrize(
    ("accel", "name", "cc", "ok"),
    [
        ("L4", "NVIDIA L4", "8.9", True),
        ("L4", "NVIDIA L40S", "8.9", False),  # same SM, different GPU
        ("A10G", "NVIDIA A10G", "8.6", True),
        ("A100", "NVIDIA A100-SXM4-80GB", "8.0", True),
        ("A100", "NVIDIA A10G", "8.6", False),
        ("H100", "NVIDIA H100 80GB HBM3", "9.0", True),
        ("H200", "NVIDIA H200", "9.0", True),
        ("H200", "NVIDIA GH200 480GB", "9.0", False),
        ("T4", "Tesla T4", "7.5", True),
    ],
)
def test_accelerator_matching(accel: str, name: str, cc: str, ok: bool) -> None:
    assert gpu.matches(accel, GpuInfo(name, cc)) is ok


def test_mismatch_refusal_names_both() -> None:
    with pytest.raises(GpuMismatchError) as ei:
        gpu.check_accelerator("L4", A10G)
    msg = ei.value.message
    assert (
        "--accelerator L4 expects an NVIDIA L4 (sm_89), but this node has NVIDIA A10G (sm_86)"
        in msg
    )
    assert ei.value.exit_code == 14
    assert gpu.check_accelerator("l4", L4) == L4


def test_no_gpu_refusal() -> None:
    with pytest.raises(GpuMismatchError, match=r"no CUDA GPU is visible"):
        gpu.check_accelerator("H100", None)


def _trt_dir(tmp_path: Path) -> Path:
    d = tmp_path / "eng"
    (d / "checkpoint").mkdir(parents=True)
    for f in ("config.json", "tokenizer.json"):
        (d / "checkpoint" / f).write_text("{}")
    (d / "engine").mkdir()
    (d / "engine" / "config.json").write_text(json.dumps({"build_config": {}}))
    write_manifest(
        d,
        Manifest(
            engine="tensorrt-llm",
            inputs=inputs("org/m", accelerator="L4"),
            resolved_revision=None,
            model=ModelInfo("XLMRobertaForSequenceClassification", "xlm-roberta", 1, 512),
            build=BuildShapes("float16", 32, 512),
            gpu=L4,
            versions={},
        ),
    )
    return d


def test_serving_refuses_a_trt_engine_on_another_gpu(tmp_path: Path) -> None:
    d = _trt_dir(tmp_path)
    with pytest.raises(ModelLoadError) as ei:
        load_engine_from_dir(str(d), ServeSettings(), gpu_detector=lambda: A10G)
    msg = str(ei.value)
    assert "built for NVIDIA L4 (sm_89), but this pod runs on NVIDIA A10G (sm_86)" in msg
    with pytest.raises(ModelLoadError, match=r"no CUDA GPU is visible"):
        load_engine_from_dir(str(d), ServeSettings(), gpu_detector=lambda: None)


def test_serving_sets_offline_and_reports_bad_dirs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(ModelLoadError, match=r"manifest\.json is missing"):
        load_engine_from_dir(str(tmp_path), ServeSettings())
    import os

    assert os.environ["HF_HUB_OFFLINE"] == "1"


def test_serving_refuses_an_engine_from_another_tensorrt_llm(tmp_path: Path) -> None:
    from reranker_runtime.engines.engine_dir import check_serving_versions
    from reranker_runtime.engines.manifest import read_manifest

    d = _trt_dir(tmp_path)
    m = read_manifest(d)
    m = Manifest(**{**m.__dict__, "versions": {"tensorrt_llm": "1.2.1", "tensorrt": "10.13.0"}})
    check_serving_versions(m, {"tensorrt_llm": "1.2.1", "tensorrt": "10.13.0"}, d)
    check_serving_versions(m, {}, d)  # unknown here: left to deserialization
    with pytest.raises(
        ModelLoadError,
        match=r"built with tensorrt_llm 1\.2\.1, but this image has tensorrt_llm 1\.3\.0",
    ):
        check_serving_versions(m, {"tensorrt_llm": "1.3.0"}, d)
