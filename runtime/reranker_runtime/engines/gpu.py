"""Which GPU this process sees, and whether it is the one a TensorRT engine was built on.

A TensorRT engine only runs on the GPU model (SM version) it was built on: `reranker-runtime
build` records the GPU in the manifest (and checks it is the `--accelerator`,
reranker_runtime.engine_build.gpu), `serve --engine-dir` compares it with this one before loading.
"""

from __future__ import annotations

import re
import shutil
import subprocess

from reranker_runtime.engines.manifest import GpuInfo


def sm_of(compute_capability: str) -> str:
    return "sm_" + compute_capability.replace(".", "")


def describe(gpu: GpuInfo) -> str:
    return f"{gpu.name} ({sm_of(gpu.compute_capability)})"


def detect_gpu() -> GpuInfo | None:
    """The first visible CUDA GPU (name, compute capability), or None when there is none.

    Tries torch.cuda first (already in the image), then `nvidia-smi` (compute_cap needs a
    driver >= 510)."""
    try:
        import torch

        if torch.cuda.is_available() and torch.cuda.device_count() > 0:
            major, minor = torch.cuda.get_device_capability(0)
            return GpuInfo(
                name=torch.cuda.get_device_name(0), compute_capability=f"{major}.{minor}"
            )
    except Exception:  # a broken CUDA setup falls through to nvidia-smi
        pass
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        out = subprocess.run(
            [smi, "--query-gpu=name,compute_cap", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return parse_nvidia_smi(out)


def parse_nvidia_smi(output: str) -> GpuInfo | None:
    for line in output.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) >= 2 and parts[0] and re.fullmatch(r"\d+\.\d+", parts[1]):
            return GpuInfo(name=parts[0], compute_capability=parts[1])
    return None


def same_gpu(built_on: GpuInfo, current: GpuInfo) -> bool:
    """Serving check: the GPU model and SM must both match the one the engine was built on."""
    return built_on.compute_capability == current.compute_capability and _norm(
        built_on.name
    ) == _norm(current.name)


def _norm(name: str) -> str:
    return re.sub(r"\s+", " ", name.strip()).lower()
