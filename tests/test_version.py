"""pyproject.toml's version is the one source: the packages read it from the installed
distribution, and every place that must repeat it (image tags, the chart) agrees with it, so a
version bump cannot leave one behind."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

import reranker_operator
import reranker_runtime
from reranker_operator.config import DEFAULT_RUNTIME_IMAGE, DEFAULT_RUNTIME_IMAGE_CPU

REPO_ROOT = Path(__file__).resolve().parents[1]
CHART = REPO_ROOT / "charts" / "reranker-operator"
# Our images, wherever a tag is written out: docs, Dockerfile comments, chart, operator.
IMAGE_TAG = re.compile(
    r"ghcr\.io/reranker-dev/reranker-(?:runtime|runtime-cpu|operator):([0-9A-Za-z.+-]+)"
)


@pytest.fixture(scope="module")
def version() -> str:
    # A regex, not tomllib: the project supports Python 3.10, which has no tomllib.
    pyproject = (REPO_ROOT / "pyproject.toml").read_text()
    project = pyproject.split("[project]", 1)[1].split("\n[", 1)[0]
    match = re.search(r'^version = "([^"]+)"$', project, re.MULTILINE)
    assert match, "pyproject.toml has no [project] version"
    return match.group(1)


def test_packages_report_the_pyproject_version(version: str) -> None:
    hint = "the installed metadata is stale: reinstall the package (pip install -e .)"
    assert reranker_runtime.__version__ == version, hint
    assert reranker_operator.__version__ == version, hint


def test_operator_default_runtime_image(version: str) -> None:
    assert f"ghcr.io/reranker-dev/reranker-runtime:{version}" == DEFAULT_RUNTIME_IMAGE
    assert f"ghcr.io/reranker-dev/reranker-runtime-cpu:{version}" == DEFAULT_RUNTIME_IMAGE_CPU


def test_chart(version: str) -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert chart["version"] == version
    assert chart["appVersion"] == version
    assert values["image"]["tag"] == version
    assert values["runtimeImage"] == f"ghcr.io/reranker-dev/reranker-runtime:{version}"
    assert values["runtimeImageCPU"] == f"ghcr.io/reranker-dev/reranker-runtime-cpu:{version}"


def test_every_written_image_tag(version: str) -> None:
    files = [
        REPO_ROOT / "README.md",
        *sorted((REPO_ROOT / "docs").glob("*.md")),
        *sorted((REPO_ROOT / "images").glob("*.Dockerfile")),
        *sorted(CHART.rglob("*.yaml")),
        *sorted((REPO_ROOT / "operator").rglob("*.py")),
    ]
    found = {
        f"{path.relative_to(REPO_ROOT)}: {match.group(0)}": match.group(1)
        for path in files
        for match in IMAGE_TAG.finditer(path.read_text(encoding="utf-8"))
    }
    assert found  # the pattern still matches how tags are written
    assert {where: tag for where, tag in found.items() if tag != version} == {}
