"""Shared helpers for tests/engines: a fake GPU, a copy-and-mutate checkpoint, CLI runners."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from reranker_runtime.build.manifest import BuildInputs, GpuInfo

REPO_ROOT = Path(__file__).resolve().parents[2]
L4 = GpuInfo(name="NVIDIA L4", compute_capability="8.9")
A10G = GpuInfo(name="NVIDIA A10G", compute_capability="8.6")


def inputs(repo: str | Path, **over) -> BuildInputs:
    base = dict(
        checkpoint_repo=str(repo),
        revision="main",
        source="HF",
        quantization="no_quant",
        max_num_tokens=1024,
        max_seq_len=None,
        accelerator="CPU",
    )
    base.update(over)
    return BuildInputs(**base)


def mutate_checkpoint(src: Path, dst: Path, *, config: dict | None = None, remove: tuple[str, ...] = ()) -> Path:
    shutil.copytree(src, dst)
    if config:
        cfg = json.loads((dst / "config.json").read_text())
        for k, v in config.items():
            if v is None:
                cfg.pop(k, None)
            else:
                cfg[k] = v
        (dst / "config.json").write_text(json.dumps(cfg))
    for pattern in remove:
        for p in dst.glob(pattern):
            p.unlink()
    return dst


def build_cli_cmd() -> list[str]:
    """`reranker-runtime build` (the console script when installed, else the module)."""
    exe = Path(sys.executable).parent / "reranker-runtime"
    if exe.exists():
        return [str(exe), "build"]
    return [sys.executable, "-m", "reranker_runtime.cli", "build"]


def run_build_cli(args: list[str], *, env_extra: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.update({"RERANKER_LOG_FORMAT": "text", "HF_HUB_OFFLINE": "1"})
    env.update(env_extra or {})
    return subprocess.run(build_cli_cmd() + args, capture_output=True, text=True, env=env, timeout=timeout, cwd=REPO_ROOT)
