"""manifest.json (format_version 1): round trip, and every validation error names the field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engines.helpers import L4, inputs
from reranker_runtime.engines.manifest import (
    FORMAT_VERSION,
    BuildShapes,
    Manifest,
    ManifestError,
    ModelInfo,
    read_manifest,
    write_manifest,
)


def _manifest(engine: str = "pytorch", **over) -> Manifest:
    base = dict(
        engine=engine,
        inputs=inputs("org/model", accelerator="L4" if engine == "tensorrt-llm" else "CPU"),
        resolved_revision="a" * 40,
        model=ModelInfo("XLMRobertaForSequenceClassification", "xlm-roberta", 1, 512),
        build=BuildShapes(
            "float16" if engine == "tensorrt-llm" else "float32",
            32 if engine == "tensorrt-llm" else None,
            512,
        ),
        gpu=L4 if engine == "tensorrt-llm" else None,
        versions={"reranker-runtime": "0.1.0"},
    )
    base.update(over)
    return Manifest(**base)


def _dir_with_files(tmp_path: Path, engine: str = "pytorch") -> Path:
    d = tmp_path / "eng"
    (d / "checkpoint").mkdir(parents=True)
    (d / "checkpoint" / "config.json").write_text("{}")
    (d / "checkpoint" / "tokenizer.json").write_text("{}")
    if engine == "tensorrt-llm":
        (d / "engine").mkdir()
    return d


@pytest.mark.parametrize("engine", ["pytorch", "tensorrt-llm"])
def test_round_trip(tmp_path: Path, engine: str) -> None:
    d = _dir_with_files(tmp_path, engine)
    m = _manifest(engine)
    write_manifest(d, m)
    data = json.loads((d / "manifest.json").read_text())
    assert data["format_version"] == FORMAT_VERSION == 1
    assert set(data) >= {
        "format_version",
        "engine",
        "inputs",
        "resolved_revision",
        "model",
        "build",
        "gpu",
        "versions",
        "created_at",
    }
    assert set(data["inputs"]) == {
        "checkpoint_repo",
        "revision",
        "source",
        "quantization",
        "max_num_tokens",
        "max_seq_len",
        "accelerator",
    }
    back = read_manifest(d)
    assert back == m
    assert not list(d.glob(".manifest.json.tmp"))


def test_gpu_recorded_for_trt(tmp_path: Path) -> None:
    d = _dir_with_files(tmp_path, "tensorrt-llm")
    write_manifest(d, _manifest("tensorrt-llm"))
    data = json.loads((d / "manifest.json").read_text())
    assert data["gpu"] == {"name": "NVIDIA L4", "compute_capability": "8.9"}
    assert data["paths"]["engine"] == "engine"


def _write_raw(d: Path, data: object) -> None:
    (d / "manifest.json").write_text(json.dumps(data))


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda d: d.update(format_version=2), "format_version 2 is not supported"),
        (lambda d: d.pop("format_version"), "format_version None is not supported"),
        (lambda d: d.update(engine="onnx"), "engine 'onnx' is unknown"),
        (lambda d: d["inputs"].pop("accelerator"), "inputs.accelerator is missing"),
        (lambda d: d["inputs"].update(max_num_tokens="many"), "inputs.max_num_tokens must be int"),
        (lambda d: d["inputs"].update(max_num_tokens=True), "inputs.max_num_tokens must be int"),
        (lambda d: d["model"].update(num_labels=0), "num_labels"),
        (lambda d: d.update(model=[]), "model must be an object"),
        (lambda d: d["build"].pop("max_input_len"), "build.max_input_len is missing"),
        (lambda d: d.pop("created_at"), "created_at is missing"),
    ],
)
def test_invalid_manifests_name_the_problem(tmp_path: Path, mutate, needle: str) -> None:
    d = _dir_with_files(tmp_path)
    data = _manifest().to_dict()
    mutate(data)
    _write_raw(d, data)
    with pytest.raises(ManifestError, match=needle.replace("(", r"\(")):
        read_manifest(d)


def test_trt_manifest_needs_gpu(tmp_path: Path) -> None:
    d = _dir_with_files(tmp_path, "tensorrt-llm")
    data = _manifest("tensorrt-llm").to_dict()
    data["gpu"] = None
    _write_raw(d, data)
    with pytest.raises(ManifestError, match=r"must record the gpu"):
        read_manifest(d)


def test_missing_directory_manifest_and_json(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match=r"does not exist"):
        read_manifest(tmp_path / "nope")
    d = _dir_with_files(tmp_path)
    with pytest.raises(ManifestError, match=r"manifest\.json is missing|is missing"):
        read_manifest(d)
    (d / "manifest.json").write_text("{not json")
    with pytest.raises(ManifestError, match=r"not readable JSON"):
        read_manifest(d)


def test_files_named_by_the_manifest_must_exist(tmp_path: Path) -> None:
    d = _dir_with_files(tmp_path)
    write_manifest(d, _manifest())
    (d / "checkpoint" / "tokenizer.json").unlink()
    with pytest.raises(
        ManifestError, match=r"tokenizer file checkpoint/tokenizer\.json, which is missing"
    ):
        read_manifest(d)
    assert read_manifest(d, check_files=False).engine == "pytorch"


def test_inputs_normalized_and_differences() -> None:
    a = inputs("org/m", accelerator="l4", source="hf", quantization="NO_QUANT")
    b = inputs("org/m", accelerator="L4")
    assert a.normalized() == b.normalized()
    assert a.differences(b) == {}
    c = inputs("org/m", accelerator="L4", max_num_tokens=2048, revision="v2")
    assert c.differences(b) == {"max_num_tokens": (2048, 1024), "revision": ("v2", "main")}
