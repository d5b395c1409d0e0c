"""A hub id that cannot be fetched: `serve` fails in seconds, prints each line once and says what
to do next (a local directory, HF_HUB_OFFLINE with a filled cache, the network). No test here
reaches a network: the hub is a port that refuses or a name that cannot resolve (`.invalid`)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from reranker_runtime import hub

WAIT_S = 120.0  # a hung process fails the test (the old retries took 25 s and more)

EXE = Path(sys.executable).with_name("reranker-runtime")


@pytest.fixture
def refusing_endpoint() -> Iterator[str]:
    """A local port that is bound but not listening: every connection is refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{s.getsockname()[1]}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def online_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The test environment without the suite's offline switches, with a home of its own."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE", "HF_TOKEN")
    }
    env.update(HF_HOME=str(tmp_path / "hf-home"), HF_HUB_DISABLE_TELEMETRY="1", **extra)
    return env


def serve(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [str(EXE), "serve", "--host", "127.0.0.1", "--port", str(free_port())]
    cmd += ["--prometheus-port", "0", "--device", "cpu", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=WAIT_S)


def json_records(stderr: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]


@pytest.mark.parametrize("where", ["refused", "unresolvable"])
def test_unreachable_hub_fails_fast_once_with_what_to_do(
    where: str, refusing_endpoint: str, tmp_path: Path
) -> None:
    endpoint = refusing_endpoint if where == "refused" else "http://hub.invalid"
    cache = tmp_path / "cache"
    env = online_env(tmp_path, HF_ENDPOINT=endpoint, HF_HUB_CACHE=str(cache))
    proc = serve(env, "--model", "some-org/no-such-model", "--log-format", "json")

    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    records = json_records(proc.stderr)
    loading = [r for r in records if r["message"] == "loading model"]
    failed = [r for r in records if r["message"].startswith("model load failed")]
    assert len(loading) == 1 and len(failed) == 1, proc.stderr
    # Nothing retried (the retries are what took 25 s and more: no timing assertion needed),
    # so no retry chatter; at most once if a library line comes through.
    assert proc.stderr.count("thrown while requesting") <= 1, proc.stderr
    assert proc.stderr.count("Retrying in") == 0, proc.stderr

    message = failed[0]["message"]
    assert f"the Hugging Face hub at {endpoint} cannot be reached" in message
    assert f"not in the hub cache at {cache}" in message
    assert "--model /path/to/dir" in message and "local checkpoint directory" in message
    assert "HF_HUB_OFFLINE=1" in message and "HTTPS_PROXY" in message
    assert ".." not in message and "\n" not in message
    # The advice is printed once: the log line has it, the last line points at it.
    assert proc.stderr.count("local checkpoint directory") == 1, proc.stderr
    assert proc.stderr.rstrip().splitlines()[-1] == (
        "reranker-runtime serve: error: model failed to load (the reason is logged above)"
    )


def test_offline_hub_id_not_in_the_cache_names_the_cache(tmp_path: Path) -> None:
    cache = tmp_path / "empty-cache"
    env = online_env(tmp_path, HF_HUB_OFFLINE="1", HF_ENDPOINT="http://hub.invalid")
    proc = serve(
        env, "--model", "some-org/no-such-model", "--hf-cache", str(cache), "--log-format", "text"
    )
    assert proc.returncode == 1, proc.stderr

    # Text logs: the error is one line (transformers' message had a newline in it).
    errors = [line for line in proc.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1, proc.stderr
    line = errors[0]
    assert line.endswith("the tokenizer files)"), proc.stderr
    assert (
        f"HF_HUB_OFFLINE is set and 'some-org/no-such-model' is not in the hub cache at {cache}"
        in line
    )
    assert f"hf download some-org/no-such-model --cache-dir {cache}" in line
    assert "--model /path/to/dir" in line
    assert "set HF_HUB_OFFLINE=1" not in line  # it is set already
    assert ".." not in line
    assert proc.stderr.count("not in the hub cache") == 1, proc.stderr
    assert "thrown while requesting" not in proc.stderr


def test_unreachable_hub_serves_a_model_from_the_cache(
    xlmr_reranker: Path, refusing_endpoint: str, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--tiny-org--tiny-reranker"
    shutil.copytree(xlmr_reranker, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    env = online_env(tmp_path, HF_ENDPOINT=refusing_endpoint, HF_HUB_CACHE=str(cache))
    script = (
        "from reranker_runtime.logging import setup_logging\n"
        "setup_logging('text', 'info')\n"
        "from reranker_runtime.engines.torch_engine import TorchEngine\n"
        "engine = TorchEngine.load('tiny-org/tiny-reranker', device='cpu', dtype='float32')\n"
        "print(engine.info.model_id, engine.info.num_labels)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=WAIT_S
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["tiny-org/tiny-reranker", "1"]
    assert proc.stderr.count("cannot be reached") == 1, proc.stderr
    assert f"loading 'tiny-org/tiny-reranker' from the hub cache at {cache}" in proc.stderr
    assert "thrown while requesting" not in proc.stderr


# ---------------------------------------------------------------------------------- units


@pytest.mark.parametrize(
    ("exc", "failed"),
    [
        (socket.gaierror(-2, "Name or service not known"), True),
        (ConnectionRefusedError(111, "Connection refused"), True),
        (httpx.ConnectError("[Errno -2] Name or service not known"), True),
        (httpx.ConnectTimeout("timed out"), False),
        (httpx.ReadTimeout("timed out"), False),
        (TimeoutError("timed out"), False),
        (ValueError("404 Not Found"), False),
    ],
)
def test_connection_failed(exc: BaseException, failed: bool) -> None:
    assert hub.connection_failed(exc) is failed


def test_connection_failed_looks_at_the_cause() -> None:
    try:
        try:
            raise socket.gaierror(-2, "Name or service not known")
        except OSError as inner:
            raise RuntimeError("request failed") from inner
    except RuntimeError as outer:
        assert hub.connection_failed(outer)


def test_one_line_flattens_and_drops_the_full_stop() -> None:
    text = "We couldn't connect.\nCheck your internet connection at 'https://x/y'."
    assert hub.one_line(ValueError(text)) == (
        "We couldn't connect. Check your internet connection at 'https://x/y'"
    )


def test_hub_ids_and_paths(tmp_path: Path) -> None:
    assert hub.looks_like_hub_id("BAAI/bge-reranker-large")
    assert hub.looks_like_hub_id("bert-base-uncased")
    assert not hub.looks_like_hub_id(str(tmp_path))
    assert not hub.looks_like_hub_id("./model")
    assert not hub.looks_like_hub_id("a/b/c")


def test_a_local_directory_gets_local_advice_not_the_hubs(tmp_path: Path) -> None:
    """`serve --model /empty/dir`: what is missing there, not "check the model id and HF_TOKEN"."""
    error = ValueError("Unrecognized model in x. Should have a `model_type` key in its config.json")
    message = hub.config_error(str(tmp_path), None, error, offline=False, unreachable=None)
    assert "has no config.json" in message and "save_pretrained" in message
    assert "HF_TOKEN" not in message
    (tmp_path / "config.json").write_text("{}")
    message = hub.config_error(str(tmp_path), None, error, offline=False, unreachable=None)
    assert str(tmp_path / "config.json") in message and "HF_TOKEN" not in message
    assert "HF_TOKEN" in hub.config_error("org/name", None, error, offline=False, unreachable=None)
