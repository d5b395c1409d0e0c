"""The `--accelerator` values and the build-time accelerator check.

A TensorRT engine only runs on the GPU model (SM version) it was built on, so `build` must run
on the serving accelerator and checks it does; `serve` checks the reverse before loading
(reranker_runtime.engines.gpu, which also detects the GPU).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from reranker_runtime.engine_build.errors import GpuMismatchError
from reranker_runtime.engines.gpu import describe, sm_of
from reranker_runtime.engines.manifest import GpuInfo


@dataclass(frozen=True)
class AcceleratorSpec:
    name: str  # the name CUDA reports, e.g. "NVIDIA L4"
    compute_capability: str  # "8.9"
    pattern: str  # regex matched against the reported name (word-bounded: L4 is not L40S)

    @property
    def sm(self) -> str:
        return sm_of(self.compute_capability)


# --accelerator value -> the GPU it means. Matches the operator's AcceleratorType values.
ACCELERATORS: dict[str, AcceleratorSpec] = {
    "L4": AcceleratorSpec("NVIDIA L4", "8.9", r"\bL4\b"),
    "A10G": AcceleratorSpec("NVIDIA A10G", "8.6", r"\bA10G\b"),
    "A100": AcceleratorSpec("NVIDIA A100", "8.0", r"\bA100\b"),
    "H100": AcceleratorSpec("NVIDIA H100", "9.0", r"\bH100\b"),
    "H200": AcceleratorSpec("NVIDIA H200", "9.0", r"\bH200\b"),
    "T4": AcceleratorSpec("Tesla T4", "7.5", r"\bT4\b"),
}
GPU_ACCELERATORS = tuple(ACCELERATORS)
# GPUs TensorRT-LLM's release builds have kernels for (sm_80 and newer: its wheels are built for
# 80/86/89/90/100/120 only). Other GPUs (T4, sm_75) serve with the PyTorch engine in float16.
TRTLLM_ACCELERATORS = tuple(
    a for a, spec in ACCELERATORS.items() if float(spec.compute_capability) >= 8.0
)
ALL_ACCELERATORS = (*GPU_ACCELERATORS, "CPU")


def matches(accelerator: str, gpu: GpuInfo) -> bool:
    spec = ACCELERATORS[accelerator.upper()]
    return (
        bool(re.search(spec.pattern, gpu.name))
        and gpu.compute_capability == spec.compute_capability
    )


def check_accelerator(accelerator: str, gpu: GpuInfo | None) -> GpuInfo:
    """Refuse to build for `accelerator` on a different (or no) GPU; returns the GPU on success."""
    spec = ACCELERATORS[accelerator.upper()]
    if gpu is None:
        raise GpuMismatchError(
            f"--accelerator {accelerator} needs an {spec.name} ({spec.sm}), but no CUDA GPU is "
            "visible to this container (no torch.cuda device, no nvidia-smi). The build Job must "
            "run on the serving accelerator's node with an nvidia.com/gpu limit."
        )
    if not matches(accelerator, gpu):
        raise GpuMismatchError(
            f"--accelerator {accelerator} expects an {spec.name} ({spec.sm}), but this node has "
            f"{describe(gpu)}. TensorRT engines only run on the GPU model they were built on: "
            "schedule the build Job on the serving accelerator's node pool (or fix "
            "spec.accelerator.type / the operator's accelerator placement map)."
        )
    return gpu
