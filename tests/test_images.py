"""The images (images/*.Dockerfile), read statically: no Docker engine runs here, so these check
what a build would take and what the chart and the operator assume of the images."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
import yaml

from reranker_runtime.allocator import allocator_from_maps

REPO = Path(__file__).resolve().parents[1]
IMAGES = REPO / "images"
RUNTIME_IMAGES = ["runtime.Dockerfile", "runtime-cpu.Dockerfile"]
ALL_IMAGES = ["operator.Dockerfile", *RUNTIME_IMAGES]


def instructions(dockerfile: str) -> list[str]:
    """The Dockerfile's instructions, continuation lines joined."""
    text = (IMAGES / dockerfile).read_text()
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    return [i.strip() for i in re.sub(r"\\\n", " ", "\n".join(lines)).splitlines() if i.strip()]


def test_every_image_is_checked_here() -> None:
    assert sorted(p.name for p in IMAGES.glob("*.Dockerfile")) == sorted(ALL_IMAGES)


@pytest.mark.parametrize("dockerfile", ALL_IMAGES)
def test_the_build_context_has_what_the_dockerfile_copies(dockerfile: str) -> None:
    ignore = (IMAGES / f"{dockerfile}.dockerignore").read_text().splitlines()
    included = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    copied = set()
    for line in instructions(dockerfile):
        if line.startswith("COPY "):
            copied.update(src.rstrip("/") for src in line.split()[1:-1] if not src.startswith("--"))
    assert copied == included
    for src in copied:
        assert (REPO / src).exists(), src


@pytest.mark.parametrize("dockerfile", RUNTIME_IMAGES)
def test_runtime_pods_run_as_the_runtime_images_user(dockerfile: str) -> None:
    # runAsNonRoot needs a numeric user the kubelet can check: the image must set one, and it
    # must be the user the chart's runtime pods run as (their engine volume is written by it).
    values = yaml.safe_load((REPO / "charts" / "reranker-operator" / "values.yaml").read_text())
    users = [
        int(i.split()[1].split(":")[0]) for i in instructions(dockerfile) if i.startswith("USER ")
    ]
    assert users, f"{dockerfile} sets no numeric USER (runAsNonRoot needs one)"
    assert users[-1] == values["runtimePodSecurityContext"]["runAsUser"]


@pytest.mark.parametrize("dockerfile", RUNTIME_IMAGES)
def test_runtime_images_serve_by_default_like_each_other(dockerfile: str) -> None:
    # The operator runs either image with the same args, env and mounts.
    steps = instructions(dockerfile)
    assert 'ENTRYPOINT ["reranker-runtime"]' in steps and 'CMD ["serve"]' in steps
    assert "EXPOSE 8080 50051" in steps
    assert "WORKDIR /tmp" in steps
    env = " ".join(i for i in steps if i.startswith("ENV "))
    for setting in ("HOME=/tmp", "HF_HOME=/tmp/hf-home", "RERANKER_LOG_FORMAT=json"):
        assert setting in env, setting


@pytest.mark.parametrize("dockerfile", RUNTIME_IMAGES)
def test_runtime_images_preload_the_jemalloc_they_install(dockerfile: str) -> None:
    text = (IMAGES / dockerfile).read_text()
    (preload,) = re.findall(r"^ENV LD_PRELOAD=(\S+)$", text, re.M)
    assert re.search(rf"ln -s .*libjemalloc2.* {re.escape(preload)} ", text)
    assert "apt-get install -y --no-install-recommends libjemalloc2" in text
    maps_line = f"7f1c2a000000-7f1c2a0b0000 r-xp 00000000 08:01 1234   {preload}\n"
    assert allocator_from_maps(maps_line) == "jemalloc"  # `serve` says so


def test_the_cpu_image_installs_the_pinned_torch_from_pytorchs_cpu_index() -> None:
    (run,) = [i for i in instructions("runtime-cpu.Dockerfile") if "download.pytorch.org" in i]
    # The shell step reads the pin from pyproject.toml with this pattern: exactly one match, the
    # runtime extra's, so the image's torch is the one CI tests.
    pattern = re.search(r"grep -oE '([^']+)' /src/pyproject.toml", run)
    assert pattern
    pins = re.findall(pattern.group(1), (REPO / "pyproject.toml").read_text())
    assert pins == ['"torch==2.13.0"']
    assert "--index-url https://download.pytorch.org/whl/cpu" in run
    assert '"/src[runtime]"' in run and "tensorrt" not in run.lower()
    # Installing the package must not swap the CPU build for PyPI's CUDA one: the build checks.
    assert run.index("whl/cpu") < run.index('"/src[runtime]"') < run.index("torch.version.cuda")
    froms = [i.split()[1] for i in instructions("runtime-cpu.Dockerfile") if i.startswith("FROM ")]
    assert froms == ["${PYTHON_IMAGE}"]
    assert "ARG PYTHON_IMAGE=python:3.12-slim-bookworm" in instructions("runtime-cpu.Dockerfile")


def test_the_gpu_image_installs_every_runtime_requirement_but_torch() -> None:
    # The GPU image installs the package with --no-deps and names the runtime extra's other
    # requirements itself (to keep the base image's torch): one added to pyproject.toml and not
    # here would be missing from the image alone, where no test runs.
    def name(requirement: str) -> str:
        match = re.match(r"[A-Za-z0-9._-]+", requirement.strip().strip('"'))
        assert match, requirement
        return match.group(0).lower().replace("_", "-")

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = {
        name(r) for r in project["optional-dependencies"]["runtime"] + project["dependencies"]
    }
    (run,) = [i for i in instructions("runtime.Dockerfile") if "image-pins.txt" in i and "-c" in i]
    installed = {name(r) for r in re.findall(r'"([A-Za-z0-9._-]+[<>=!~][^"]*)"', run)}
    assert wanted - {"torch"} <= installed, sorted(wanted - {"torch"} - installed)
