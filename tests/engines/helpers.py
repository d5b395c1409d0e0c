"""Shared helpers for tests/engines: a fake GPU, a copy-and-mutate checkpoint, CLI runners."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from reranker_runtime.engines.manifest import BuildInputs, GpuInfo

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


def mutate_checkpoint(
    src: Path, dst: Path, *, config: dict | None = None, remove: tuple[str, ...] = ()
) -> Path:
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


def run_build_cli(
    args: list[str], *, env_extra: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.update({"RERANKER_LOG_FORMAT": "text", "HF_HUB_OFFLINE": "1"})
    env.update(env_extra or {})
    return subprocess.run(
        build_cli_cmd() + args,
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        cwd=REPO_ROOT,
    )


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServeProcess:
    """`reranker-runtime serve` as a subprocess, configured through RERANKER_* variables."""

    def __init__(self, env_extra: dict[str, str], timeout: float = 180) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        env = dict(
            os.environ,
            RERANKER_PORT=str(self.port),
            RERANKER_HOST="127.0.0.1",
            RERANKER_LOG_FORMAT="text",
            HF_HUB_OFFLINE="1",
        )
        env.update(env_extra)
        self.timeout = timeout
        self.proc = subprocess.Popen(
            [*build_cli_cmd()[:-1], "serve"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=REPO_ROOT,
        )

    def __enter__(self) -> ServeProcess:
        import time

        import httpx

        deadline = time.monotonic() + self.timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"serve exited {self.proc.returncode}: {self.proc.stdout.read()}"
                )
            try:
                if httpx.get(f"{self.base}/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.__exit__()
                raise AssertionError("serve did not become healthy in time")
            time.sleep(0.5)

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()

    def rerank_raw(self, query: str, texts: list[str]) -> list[float]:
        import httpx

        r = httpx.post(
            f"{self.base}/rerank",
            json={"query": query, "texts": texts, "raw_scores": True},
            timeout=60,
        )
        assert r.status_code == 200, r.text
        got = {item["index"]: item["score"] for item in r.json()}
        return [got[i] for i in range(len(texts))]
