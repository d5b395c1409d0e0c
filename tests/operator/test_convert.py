"""`reranker-operator convert`: a BEI/Truss config.yaml -> a Reranker that the CRD accepts."""

from __future__ import annotations

import argparse
import copy
import functools
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from reranker_operator.builders import engine_key_for
from reranker_operator.config import OperatorConfig
from reranker_operator.convert import (
    ConvertError,
    add_convert_parser,
    convert_config,
    sanitize_name,
)
from reranker_operator.spec import DEFAULT_MEMORY, parse_spec

ROOT = Path(__file__).resolve().parents[2]
SEED = Path(__file__).with_name("data") / "seed-config.yaml"


@functools.lru_cache(maxsize=1)
def _validator() -> jsonschema.Validator:
    def strip(node: Any) -> Any:  # plain JSON Schema: drop x-kubernetes-* extensions
        if isinstance(node, dict):
            return {k: strip(v) for k, v in node.items() if not k.startswith("x-kubernetes-")}
        return [strip(v) for v in node] if isinstance(node, list) else node

    crd = yaml.safe_load((ROOT / "crds" / "rerankers.reranker.dev.yaml").read_text())
    return jsonschema.Draft202012Validator(
        strip(crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"])
    )


def assert_valid_reranker(obj: dict[str, Any]) -> None:
    errors = [f"{'.'.join(map(str, e.path))}: {e.message}" for e in _validator().iter_errors(obj)]
    assert errors == []
    parse_spec(obj)  # the CRD's CEL rules, mirrored


def seed() -> dict[str, Any]:
    return yaml.safe_load(SEED.read_text())


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser()
    add_convert_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["convert", *argv])
    rc = args.func(args)
    out, err = capsys.readouterr()
    return rc, out, err


def test_seed_config_converts_to_a_valid_reranker() -> None:
    manifest, notes = convert_config(seed())
    assert_valid_reranker(manifest)
    assert manifest["apiVersion"] == "reranker.dev/v1alpha1" and manifest["kind"] == "Reranker"
    assert manifest["metadata"]["name"] == "bei-baai-bge-reranker-large-truss-example"
    spec = manifest["spec"]
    assert spec["checkpoint"] == {
        "repo": "BAAI/bge-reranker-large",
        "revision": "main",
        "source": "HF",
    }
    assert spec["build"] == {
        "quantization": "no_quant",
        "maxNumTokens": 16384,
    }  # sentinel 1000001 -> omitted
    assert spec["accelerator"] == {"type": "L4"}
    assert spec["resources"] == {"cpu": "1", "memory": "15Gi"}
    assert any("1000001" in n and "maximum" in n for n in notes)


def test_seed_conversion_is_the_l4_example() -> None:
    converted = parse_spec(convert_config(seed())[0])
    example = parse_spec(
        yaml.safe_load((ROOT / "examples" / "bge-reranker-large-l4.yaml").read_text())
    )
    config = OperatorConfig()
    assert engine_key_for(converted, config) == engine_key_for(example, config)
    assert converted.accelerator == example.accelerator
    assert converted.desired_replicas == example.desired_replicas == 1
    # The seed's 15Gi is kept (with a warning); the example uses the default, which fits an L4 node.
    assert converted.resources.memory == "15Gi" and example.resources.memory == DEFAULT_MEMORY
    assert converted.resources.cpu == example.resources.cpu


def test_seed_memory_is_kept_with_a_warning_that_it_cannot_fit_an_l4_node() -> None:
    _, notes = convert_config(seed())
    [warning] = [n for n in notes if n.startswith("WARNING")]
    assert "15Gi" in warning and "g2-standard-4" in warning and "Pending" in warning


@pytest.mark.parametrize(
    "accelerator,memory,warns",
    [("L4", "12Gi", False), ("L4", "14Gi", True), ("L4", "16G", True), ("H100", "64Gi", False),
     ("T4", "15Gi", True), ("A10G", "14Gi", False)],
)  # fmt: skip
def test_memory_fit_warning_per_accelerator(accelerator: str, memory: str, warns: bool) -> None:
    config = seed()
    config["resources"] = {"accelerator": accelerator, "memory": memory, "use_gpu": True}
    _, notes = convert_config(config)
    assert any(n.startswith("WARNING") for n in notes) == warns


def test_no_memory_in_the_truss_config_takes_the_default_that_fits() -> None:
    config = seed()
    config["resources"] = {"accelerator": "L4", "use_gpu": True}
    manifest, notes = convert_config(config)
    assert "resources" not in manifest["spec"]
    assert not any(n.startswith("WARNING") for n in notes)


def test_cli_prints_notes_as_comments_and_yaml(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run_cli([str(SEED), "--name", "bge", "--namespace", "search"], capsys)
    assert rc == 0 and err.startswith("WARNING: resources.memory 15Gi")
    assert out.startswith("# note: ")
    manifest = yaml.safe_load(out)
    assert manifest["metadata"]["name"] == "bge" and manifest["metadata"]["namespace"] == "search"
    assert_valid_reranker(manifest)


def test_cli_error_exit_code(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "config.yaml"
    bad.write_text("model_name: x\nresources: {accelerator: L4}\n")
    rc, out, err = run_cli([str(bad)], capsys)
    assert rc == 2 and out == "" and "checkpoint_repository" in err
    rc, _, err = run_cli([str(tmp_path / "missing.yaml")], capsys)
    assert rc == 2 and "error:" in err


def with_changes(**changes: Any) -> dict[str, Any]:
    config = seed()
    build = config["trt_llm"]["build"]
    for key, value in changes.items():
        if key in ("accelerator", "use_gpu"):
            config["resources"][key] = value
        elif value is None:
            build.pop(key, None)
        else:
            build[key] = value
    return config


@pytest.mark.parametrize(
    "changes,expected_build",
    [
        ({"quantization_type": None}, {"quantization": "no_quant"}),
        ({"quantization_type": "no_quant"}, {"quantization": "no_quant"}),
        ({"quantization_type": "FP8"}, {"quantization": "fp8"}),
        ({"quantization_type": "fp8_kv"}, {"quantization": "fp8"}),
        ({"max_num_tokens": 1000}, {"maxNumTokens": 1024}),
        ({"max_seq_len": 512}, {"maxSeqLen": 512}),
        ({"max_num_tokens": 4096, "max_seq_len": 8192}, {"maxNumTokens": 4096, "maxSeqLen": 4096}),
        ({"max_seq_len": None}, {"maxNumTokens": 16384}),
    ],
)
def test_build_mapping(changes: dict[str, Any], expected_build: dict[str, Any]) -> None:
    manifest, _ = convert_config(with_changes(**changes))
    assert expected_build.items() <= manifest["spec"]["build"].items()
    assert_valid_reranker(manifest)


@pytest.mark.parametrize(
    "accelerator,use_gpu,expected",
    [
        ("H100:2", True, {"type": "H100"}),  # one GPU per pod (a note says replicas: 2)
        ("H100:1", True, {"type": "H100"}),
        ("H100_40GB", True, {"type": "H100"}),
        ("a10g", True, {"type": "A10G"}),
        (None, False, {"type": "CPU"}),
        ("L4", False, {"type": "CPU"}),
    ],
)
def test_accelerator_mapping(
    accelerator: str | None, use_gpu: bool, expected: dict[str, Any]
) -> None:
    manifest, _ = convert_config(with_changes(accelerator=accelerator, use_gpu=use_gpu))
    assert manifest["spec"]["accelerator"] == expected
    assert_valid_reranker(manifest)


@pytest.mark.parametrize(
    "changes,match",
    [
        ({"accelerator": "V100"}, "no Reranker accelerator type"),
        ({"accelerator": "L4:two"}, "count"),
        ({"quantization_type": "int8"}, "not supported"),
        ({"quantization_type": "fp8", "accelerator": "T4"}, "fp8 needs an Ada or Hopper GPU"),
        ({"quantization_type": "fp4"}, "Blackwell"),
    ],
)
def test_impossible_configs_are_refused(changes: dict[str, Any], match: str) -> None:
    with pytest.raises(ConvertError, match=match):
        convert_config(with_changes(**changes))


def test_secrets_and_environment_variables() -> None:
    config = seed()
    config["secrets"] = {"hf_access_token": None}
    config["environment_variables"] = {"TRANSFORMERS_VERBOSITY": "error", "RERANKER_PORT": "9"}
    manifest, notes = convert_config(config)
    assert (
        manifest["spec"]["checkpoint"]["secretName"]
        == "bei-baai-bge-reranker-large-truss-example-checkpoint"
    )
    assert manifest["spec"]["runtime"]["env"] == [
        {"name": "TRANSFORMERS_VERBOSITY", "value": "error"}
    ]
    assert any("HF_TOKEN" in n for n in notes)
    assert_valid_reranker(manifest)


@pytest.mark.parametrize(
    "raw,expected",
    [
        ("BEI-baai-bge-reranker-large-truss-example", "bei-baai-bge-reranker-large-truss-example"),
        ("My Model_v2!", "my-model-v2"),
        ("123-model", "model"),
        ("x" * 80, "x" * 63),
        ("a" * 62 + "-b", "a" * 62),
    ],
)
def test_sanitize_name(raw: str, expected: str) -> None:
    assert sanitize_name(raw) == expected


def test_name_falls_back_to_the_repo() -> None:
    config = copy.deepcopy(seed())
    del config["model_name"]
    manifest, _ = convert_config(config)
    assert manifest["metadata"]["name"] == "bge-reranker-large"
    with pytest.raises(ConvertError, match="--name"):
        convert_config(seed(), name="___")
