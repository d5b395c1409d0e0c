"""The host NVIDIA driver this image's CUDA needs, checked at start with a message that names both.

A CUDA 13.x user-space (TensorRT-LLM >= 1.1 images) needs a host driver of branch 580 or newer; a
CUDA 12.x one runs on any driver >= 525.60.13 through CUDA's minor-version compatibility (NVIDIA's
NGC containers document R535, R545, R550, R560, R565 and R570 for data-center GPUs). GKE and EKS
GPU node pools commonly run R535-R570, so a CUDA 13 image fails there with an opaque
"CUDA driver version is insufficient" unless this check says what to do.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

from reranker_runtime.errors import ModelLoadError

# CUDA major version -> the oldest driver that runs it (CUDA's minor-version compatibility table).
DRIVER_FLOOR: dict[int, tuple[int, ...]] = {
    11: (450, 80, 2),
    12: (525, 60, 13),
    13: (580, 0, 0),
}


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text))


def host_driver_version() -> str | None:
    """The kernel driver's version: /proc/driver/nvidia/version, else nvidia-smi; None if none."""
    try:
        text = Path("/proc/driver/nvidia/version").read_text()
        match = re.search(r"Kernel Module(?: for [\w-]+)?\s+([\d.]+)", text)
        if match:
            return match.group(1)
    except OSError:
        pass
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=15,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = out.stdout.strip().splitlines()
    return lines[0].strip() if out.returncode == 0 and lines else None


def image_cuda_version() -> str | None:
    """The CUDA user-space of this image: $CUDA_VERSION (set by NVIDIA's images), else the CUDA
    PyTorch was built with."""
    env = os.environ.get("CUDA_VERSION")
    if env:
        return env
    try:
        import torch
    except ImportError:
        return None
    return torch.version.cuda


def driver_problem(driver: str | None, cuda: str | None) -> str | None:
    """Why `driver` cannot run CUDA `cuda`, or None when it can (or either is unknown)."""
    if not driver or not cuda:
        return None
    cuda_major = _version_tuple(cuda)[:1]
    floor = DRIVER_FLOOR.get(cuda_major[0]) if cuda_major else None
    if floor is None or _version_tuple(driver) >= floor:
        return None
    needed = ".".join(str(p) for p in floor).removesuffix(".0.0")
    return (
        f"the host's NVIDIA driver {driver} is too old for CUDA {cuda} in this image, which needs "
        f"driver >= {needed}. Upgrade the node's driver (GKE: a node image with driver {floor[0]} "
        f"or newer; EKS: a newer GPU AMI), or use a runtime image built on a CUDA 12.x TensorRT-LLM "
        "release (images/runtime.Dockerfile, TRTLLM_IMAGE), which runs on drivers >= 525.60.13 (R535+)"
    )


def ensure_driver_supported(driver: str | None = None, cuda: str | None = None) -> None:
    """Raise ModelLoadError naming the driver found and the one needed when they do not match."""
    problem = driver_problem(driver or host_driver_version(), cuda or image_cuda_version())
    if problem:
        raise ModelLoadError(problem)
