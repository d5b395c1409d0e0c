"""`reranker-operator render`: the child manifests of the examples, all valid Kubernetes objects."""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from reranker_operator.builders import ANNOTATION_ENGINE_KEY, job_name
from reranker_operator.cli import main as cli_main
from reranker_operator.config import DEFAULT_RUNTIME_IMAGE_CPU, default_pod_security_context
from reranker_operator.render import add_render_parser

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"


def render(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, list[dict], str]:
    parser = argparse.ArgumentParser()
    add_render_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["render", *argv])
    rc = args.func(args)
    out, err = capsys.readouterr()
    return rc, [d for d in yaml.safe_load_all(out) if d], err


@pytest.mark.parametrize(
    "example,kinds",
    [
        ("bge-reranker-large-l4.yaml", ["Deployment", "Service"]),
        ("cpu-laptop.yaml", ["Deployment", "Service"]),
        ("model-on-pvc.yaml", ["Deployment", "Service", "PodDisruptionBudget"]),
        (
            "autoscaled.yaml",
            [
                "PersistentVolumeClaim",
                "Job",
                "Deployment",
                "Service",
                "PodDisruptionBudget",
                "HorizontalPodAutoscaler",
            ],
        ),
    ],
)
def test_render_examples(
    example: str, kinds: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    rc, docs, err = render(["-f", str(EXAMPLES / example)], capsys)
    assert rc == 0, err
    assert [d["kind"] for d in docs] == kinds
    for obj in docs:
        kubernetes_validate.validate(obj, "1.32.0", strict=True)
        assert "ownerReferences" not in obj["metadata"]  # no uid before the Reranker exists
    source = yaml.safe_load((EXAMPLES / example).read_text())
    ns = source["metadata"].get("namespace", "default")
    assert {d["metadata"]["namespace"] for d in docs} == {ns}
    dep = next(d for d in docs if d["kind"] == "Deployment")
    key = dep["metadata"]["annotations"][ANNOTATION_ENGINE_KEY]
    jobs = [d for d in docs if d["kind"] == "Job"]
    if jobs:  # Shared mode: a Job builds the engine into the PVC
        assert jobs[0]["metadata"]["name"] == job_name(source["metadata"]["name"], key)
        assert jobs[0]["metadata"]["annotations"][ANNOTATION_ENGINE_KEY] == key
    else:  # PerPod mode: the init container builds it
        (init,) = dep["spec"]["template"]["spec"]["initContainers"]
        assert init["args"][-1] == f"/engines/{key}"
    assert "ReadWriteMany" not in yaml.safe_dump_all(docs) or jobs


def test_an_abbreviated_flag_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["render", "--file", str(EXAMPLES / "cpu-laptop.yaml")])
    assert exit_info.value.code == 2
    assert "--file" in capsys.readouterr().err


def test_the_pvc_example_serves_what_its_loader_copies(capsys: pytest.CaptureFixture[str]) -> None:
    loader = list(yaml.safe_load_all((EXAMPLES / "pvc-loader" / "models-claim.yaml").read_text()))
    for obj in loader:
        kubernetes_validate.validate(obj, "1.32.0", strict=True)
    claim, pod = loader
    [volume] = pod["spec"]["volumes"]
    [mount] = pod["spec"]["containers"][0]["volumeMounts"]
    assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    # The path `kubectl cp` writes to (in the example's instructions) is the one the Reranker
    # reads: pvc://<claim>/<path> is <loader's mount>/<path>.
    text = (EXAMPLES / "model-on-pvc.yaml").read_text()
    reranker = yaml.safe_load(text)
    repo = reranker["spec"]["checkpoint"]["repo"]
    claim_name, path = repo.removeprefix("pvc://").split("/", 1)
    assert claim_name == claim["metadata"]["name"]
    assert f"models-loader:{mount['mountPath']}/{path}" in text
    # The runtime's user can read what the loader's user wrote.
    assert pod["spec"]["securityContext"] == default_pod_security_context()
    rc, docs, err = render(["-f", str(EXAMPLES / "model-on-pvc.yaml")], capsys)
    assert rc == 0, err
    [init] = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"][
        "initContainers"
    ]
    assert {"name": "checkpoint", "mountPath": "/checkpoint", "readOnly": True} in init[
        "volumeMounts"
    ]


def test_render_output_has_no_yaml_aliases(capsys: pytest.CaptureFixture[str]) -> None:
    # Shared label dicts must be written out in full: anchors make GitOps diffs unreadable.
    rc = cli_main(["render", "-f", str(EXAMPLES / "bge-reranker-large-l4.yaml")])
    out = capsys.readouterr().out
    assert rc == 0
    assert "&id" not in out and "*id" not in out


def test_render_cpu_example_has_no_gpu_and_the_cpu_budget(
    capsys: pytest.CaptureFixture[str],
) -> None:
    _, docs, _ = render(["-f", str(EXAMPLES / "cpu-laptop.yaml")], capsys)
    assert "nvidia.com/gpu" not in yaml.safe_dump_all(docs)
    assert "persistentVolumeClaim" not in yaml.safe_dump_all(docs)
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    env = {
        e["name"]: e.get("value")
        for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert env["RERANKER_MAX_BATCH_TOKENS"] == "auto"  # the runtime's CPU budget
    # The slim CPU image, in the serving container and the init container that prepares it.
    pod = deployment["spec"]["template"]["spec"]
    assert {c["image"] for c in pod["containers"] + pod["initContainers"]} == {
        DEFAULT_RUNTIME_IMAGE_CPU
    }


def test_render_autoscaled_leaves_replicas_to_the_hpa(capsys: pytest.CaptureFixture[str]) -> None:
    _, docs, _ = render(["-f", str(EXAMPLES / "autoscaled.yaml")], capsys)
    assert "replicas" not in next(d for d in docs if d["kind"] == "Deployment")["spec"]


def test_render_namespace_and_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "operator.yaml"
    config.write_text("runtimeImage: registry.local/runtime:7\n")
    rc, docs, _ = render(
        ["-f", str(EXAMPLES / "bge-reranker-large-l4.yaml"), "-n", "ml", "--config", str(config)],
        capsys,
    )
    assert rc == 0
    assert {d["metadata"]["namespace"] for d in docs} == {"ml"}
    pod = docs[0]["spec"]["template"]["spec"]
    assert pod["containers"][0]["image"] == pod["initContainers"][0]["image"]
    assert pod["containers"][0]["image"] == "registry.local/runtime:7"
    _, default_docs, _ = render(["-f", str(EXAMPLES / "bge-reranker-large-l4.yaml")], capsys)
    key = docs[0]["metadata"]["annotations"][ANNOTATION_ENGINE_KEY]
    assert key != default_docs[0]["metadata"]["annotations"][ANNOTATION_ENGINE_KEY]  # image


def test_render_multi_document_from_stdin(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    text = (
        (EXAMPLES / "cpu-laptop.yaml").read_text()
        + "\n---\n"
        + (EXAMPLES / "autoscaled.yaml").read_text()
    )
    monkeypatch.setattr("sys.stdin", io.StringIO(text))
    rc, docs, _ = render(["-f", "-"], capsys)
    assert rc == 0 and len(docs) == 2 + 6


@pytest.mark.parametrize(
    "bad,field",
    [
        ("fp8-on-t4.yaml", "spec.build.quantization"),
        ("replicas-and-autoscaling.yaml", "spec"),
        ("negative-max-num-tokens.yaml", "spec.build.maxNumTokens"),
    ],
)
def test_render_refuses_bad_examples(
    bad: str, field: str, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, docs, err = render(["-f", str(EXAMPLES / "bad" / bad)], capsys)
    assert rc == 2 and docs == []
    assert f"{field}:" in err


def test_render_refuses_other_kinds(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "cm.yaml"
    path.write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n")
    rc, _, err = render(["-f", str(path)], capsys)
    assert rc == 2 and "not a Reranker" in err


def test_render_through_the_cli(capsys: pytest.CaptureFixture[str]) -> None:
    from reranker_operator.cli import main

    assert main(["render", "-f", str(EXAMPLES / "bge-reranker-large-l4.yaml")]) == 0
    assert len([d for d in yaml.safe_load_all(capsys.readouterr().out) if d]) == 2


def test_without_the_operator_extra_the_command_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`pip install '.[runtime]'` installs the command too: it must not end in a traceback."""
    import sys

    monkeypatch.setitem(sys.modules, "kopf", None)  # as if not installed
    monkeypatch.delitem(sys.modules, "reranker_operator.runner", raising=False)
    assert cli_main(["render", "-f", str(EXAMPLES / "cpu-laptop.yaml")]) == 2
    err = capsys.readouterr().err
    assert "'kopf' is missing" in err and "pip install 'reranker-stack[operator]'" in err
