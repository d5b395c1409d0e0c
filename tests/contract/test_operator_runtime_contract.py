"""The operator <-> runtime contract, end to end on CPU, with no cluster.

The operator speaks to the runtime only through container commands and environment variables.
This test takes the Deployment that the operator renders for a `CPU` Reranker pointing at a
tiny local checkpoint (engineCache.mode PerPod, the default), runs its build init container and
then its serving container as local processes (a temporary directory stands in for the pod's
engine volume at /engines, a free port for the container port, as a kubelet's port mapping
would), follows the probes the Deployment declares, and calls the resulting server's /rerank. A
flag or variable renamed on either side breaks it. In Shared mode the build Job runs the very
same container (checked below), against the cache PVC instead.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import io
import json
import math
import os
import select
import shutil
import socket
import socketserver
import ssl
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trustme

from fake_hub import COMMIT as HUB_COMMIT
from fake_hub import fake_hub
from reranker_operator.builders import CA_MOUNT
from reranker_operator.config import OperatorConfig, config_from_dict
from reranker_operator.render import render_reranker
from tiny_models import reference_logits

CACHE_MOUNT = "/engines"
TMP_MOUNT = "/tmp"
# The checkpoint is a local directory as the build sees it (in a cluster: a volume or the hub).
MODELS_MOUNT = "/models"


def _reranker(checkpoint: str, source: str = "HF", revision: str = "main") -> dict[str, Any]:
    return {
        "apiVersion": "reranker.dev/v1alpha1",
        "kind": "Reranker",
        "metadata": {"name": "contract", "namespace": "default"},
        "spec": {
            "checkpoint": {"repo": checkpoint, "source": source, "revision": revision},
            "accelerator": {"type": "CPU"},
            "replicas": 1,
            "runtime": {
                "maxConcurrentRequests": 16,
                "maxClientBatchSize": 64,
                "servedModelName": "contract-reranker",
            },
        },
    }


def _child(children: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    [obj] = [c for c in children if c["kind"] == kind]
    return obj


def _container(workload: dict[str, Any]) -> dict[str, Any]:
    [container] = workload["spec"]["template"]["spec"]["containers"]
    return container


def _mount_path(container: dict[str, Any], pod_spec: dict[str, Any], volume_kind: str) -> str:
    """Where the container mounts the pod volume of the given kind (persistentVolumeClaim, emptyDir)
    other than /tmp."""
    names = {v["name"] for v in pod_spec["volumes"] if volume_kind in v}
    [path] = [
        m["mountPath"]
        for m in container["volumeMounts"]
        if m["name"] in names and m["mountPath"] != TMP_MOUNT
    ]
    return path


class LocalPod:
    """Runs one container spec as a local process, volumes mapped onto local directories."""

    def __init__(self, container: dict[str, Any], mounts: dict[str, Path], log: Path) -> None:
        self.mounts = mounts
        env = {e["name"]: self._local(e["value"]) for e in container.get("env", []) if "value" in e}
        assert all("value" in e for e in container.get("env", [])), "secret refs need a cluster"
        # The runtime image puts `reranker-runtime` on PATH; here it is this interpreter's venv.
        path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
        self.env = {"PATH": path, "LANG": "C.UTF-8", **env}
        self.argv = [self._local(a) for a in container["command"] + container.get("args", [])]
        self.log = log

    def _local(self, value: str) -> str:
        """A container path under a mount, as its local path (one substitution, longest mount first)."""
        for mount in sorted(self.mounts, key=len, reverse=True):
            if value == mount or value.startswith(mount + "/"):
                return str(self.mounts[mount]) + value[len(mount) :]
        return value

    def run(self, timeout: float) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.argv, env=self.env, capture_output=True, text=True, timeout=timeout
        )

    def start(self, **env_overrides: str) -> subprocess.Popen[str]:
        with self.log.open("w") as out:
            return subprocess.Popen(
                self.argv,
                env={**self.env, **env_overrides},
                stdout=out,
                stderr=subprocess.STDOUT,
                text=True,
            )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_probe(proc: subprocess.Popen[str], url: str, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"runtime pod exited {proc.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    pytest.fail(f"startup probe {url} never succeeded:\n{log.read_text()}")


def test_shared_mode_job_runs_the_per_pod_build_container() -> None:
    reranker = _reranker("/models/m")
    per_pod = render_reranker(reranker, OperatorConfig())
    reranker["spec"]["engineCache"] = {"mode": "Shared"}
    shared = render_reranker(reranker, OperatorConfig())
    [init] = _child(per_pod, "Deployment")["spec"]["template"]["spec"]["initContainers"]
    job_container = _container(_child(shared, "Job"))
    for field in ("command", "args", "env", "image", "terminationMessagePolicy"):
        assert job_container[field] == init[field], field
    assert _mount_path(job_container, _child(shared, "Job")["spec"]["template"]["spec"],
                       "persistentVolumeClaim") == CACHE_MOUNT  # fmt: skip


def test_a_pvc_checkpoint_is_built_from_the_claim_the_pod_mounts(
    xlmr_reranker: Path, tmp_path: Path
) -> None:
    """checkpoint.source PVC: the init container reads the model from the claim the operator
    mounts, at the path the repo names; the engine it writes is what the server reads."""
    reranker = _reranker(f"pvc://models/rerankers/{xlmr_reranker.name}", source="PVC")
    deployment = _child(render_reranker(reranker, OperatorConfig()), "Deployment")
    pod_spec = deployment["spec"]["template"]["spec"]
    [init_container] = pod_spec["initContainers"]
    [claim_mount] = [m for m in init_container["volumeMounts"] if m.get("readOnly")]
    [claim] = [v for v in pod_spec["volumes"] if v["name"] == claim_mount["name"]]
    assert claim["persistentVolumeClaim"] == {"claimName": "models", "readOnly": True}

    # The claim's contents, as a volume holding several models would have them.
    volume = tmp_path / "claim-models"
    shutil.copytree(xlmr_reranker, volume / "rerankers" / xlmr_reranker.name)
    (volume / "rerankers" / "other-model").mkdir()
    cache, pod_tmp = tmp_path / "engine-volume", tmp_path / "pod-tmp"
    cache.mkdir()
    pod_tmp.mkdir()
    mounts = {CACHE_MOUNT: cache, TMP_MOUNT: pod_tmp, claim_mount["mountPath"]: volume}
    build = LocalPod(init_container, mounts, tmp_path / "build.log").run(timeout=300)
    assert build.returncode == 0, f"build failed:\n{build.stdout}\n{build.stderr}"
    engine_dir = cache / deployment["metadata"]["annotations"]["reranker.dev/engine-key"]
    assert (engine_dir / "manifest.json").is_file()
    assert (engine_dir / "checkpoint" / "config.json").is_file()  # what the server loads


def test_the_build_downloads_from_the_hub_mirror_the_spec_names(
    xlmr_reranker: Path, tmp_path: Path
) -> None:
    """checkpoint.endpoint with source HF: the build container fetches the model through
    huggingface_hub from that mirror (an Artifactory or Nexus remote of the hub), records the
    commit the mirror resolved, and writes an engine the server loads."""
    with fake_hub("corp/tiny-reranker", xlmr_reranker) as (endpoint, requests):
        reranker = _reranker("corp/tiny-reranker")
        reranker["spec"]["checkpoint"]["endpoint"] = endpoint
        deployment = _child(render_reranker(reranker, OperatorConfig()), "Deployment")
        [init_container] = deployment["spec"]["template"]["spec"]["initContainers"]
        cache, pod_tmp = tmp_path / "engine-volume", tmp_path / "pod-tmp"
        cache.mkdir()
        pod_tmp.mkdir()
        mounts = {CACHE_MOUNT: cache, TMP_MOUNT: pod_tmp}
        build = LocalPod(init_container, mounts, tmp_path / "build.log").run(timeout=300)
    assert build.returncode == 0, f"build failed:\n{build.stdout}\n{build.stderr}"
    assert "GET /api/models/corp/tiny-reranker/revision/main" in requests
    assert f"GET /corp/tiny-reranker/resolve/{HUB_COMMIT}/model.safetensors" in requests
    engine_dir = cache / deployment["metadata"]["annotations"]["reranker.dev/engine-key"]
    manifest = json.loads((engine_dir / "manifest.json").read_text())
    assert manifest["resolved_revision"] == HUB_COMMIT
    weights = engine_dir / "checkpoint" / "model.safetensors"
    assert weights.read_bytes() == (xlmr_reranker / "model.safetensors").read_bytes()


# ------------------------------------------------------------- behind a proxy, with a CA bundle


def _tarball(model_dir: Path) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(model_dir, arcname="model")
    return buf.getvalue()


@contextlib.contextmanager
def _running(server: socketserver.BaseServer) -> Iterator[int]:
    """Serve `server` in a thread; yields its port."""
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def _serving(body: bytes, tls: ssl.SSLContext | None = None) -> Iterator[tuple[int, list[str]]]:
    """An HTTP(S) server answering every GET with `body`; yields its port and the request
    lines it saw (a proxy is sent the absolute URL: `GET http://host/path`)."""
    seen: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(self.requestline)
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    with _running(server) as port:
        yield port, seen


@contextlib.contextmanager
def _tunnelling_proxy(to_port: int) -> Iterator[tuple[int, list[str]]]:
    """An HTTPS proxy: answers CONNECT host:port and pipes the bytes to 127.0.0.1:`to_port`
    (the host need not resolve); yields its port and the CONNECT lines it saw."""
    seen: list[str] = []

    class Tunnel(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            request = self.rfile.readline().decode().strip()
            seen.append(request)
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass  # the request's headers
            if not request.startswith("CONNECT "):
                self.wfile.write(b"HTTP/1.1 405 Method Not Allowed\r\n\r\n")
                return
            with socket.create_connection(("127.0.0.1", to_port)) as upstream:
                self.wfile.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
                self.wfile.flush()
                client, ends = self.connection, [self.connection, upstream]
                while True:
                    ready, _, _ = select.select(ends, [], [], 30)
                    if not ready:
                        return
                    for end in ready:
                        data = end.recv(65536)
                        if not data:
                            return
                        (upstream if end is client else client).sendall(data)

    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Tunnel)
    server.daemon_threads = True
    with _running(server) as port:
        yield port, seen


def _private_ca(host: str, tmp: Path) -> tuple[ssl.SSLContext, Path]:
    """A server TLS context for `host` signed by a new private CA, and a directory holding that
    CA's bundle as `ca.crt`, as the operator config's caConfigMap is mounted."""
    ca = trustme.CA()
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(host).configure_cert(tls)
    ca_dir = tmp / "ca-configmap"
    ca_dir.mkdir()
    ca.cert_pem.write_to_path(str(ca_dir / "ca.crt"))
    return tls, ca_dir


def _built_engines(cache: Path) -> list[Path]:
    """The complete engine directories on the pod's engine volume."""
    return [p for p in cache.iterdir() if (p / "manifest.json").is_file()]


def _build_pod(
    repo: str,
    config: OperatorConfig,
    tmp: Path,
    extra_mounts: dict[str, Path],
    revision: str = "main",
) -> tuple[LocalPod, Path]:
    reranker = _reranker(repo, source="REMOTE_URL", revision=revision)
    deployment = _child(render_reranker(reranker, config), "Deployment")
    [init_container] = deployment["spec"]["template"]["spec"]["initContainers"]
    cache, pod_tmp = tmp / "engine-volume", tmp / "pod-tmp"
    cache.mkdir(parents=True)
    pod_tmp.mkdir()
    mounts = {CACHE_MOUNT: cache, TMP_MOUNT: pod_tmp, **extra_mounts}
    return LocalPod(init_container, mounts, tmp / "build.log"), cache


def test_the_build_trusts_the_configured_ca_bundle(xlmr_reranker: Path, tmp_path: Path) -> None:
    """An HTTPS download signed by a private CA (a TLS-inspecting proxy's): it fails on the
    image's CAs, and succeeds once the operator config's caConfigMap is mounted."""
    tls, ca_dir = _private_ca("localhost", tmp_path)
    with _serving(_tarball(xlmr_reranker), tls) as (port, _):
        url = f"https://localhost:{port}/model.tar.gz"
        plain, _ = _build_pod(url, OperatorConfig(), tmp_path / "plain", {})
        failed = plain.run(timeout=120)
        assert failed.returncode == 11, failed.stderr
        assert "CERTIFICATE_VERIFY_FAILED" in failed.stderr

        config = config_from_dict({"proxy": {"caConfigMap": "corp-ca"}})
        pod, cache = _build_pod(url, config, tmp_path / "trusted", {CA_MOUNT: ca_dir})
        built = pod.run(timeout=300)
        assert built.returncode == 0, built.stderr
    assert _built_engines(cache)


def test_the_build_downloads_through_the_configured_proxy(
    xlmr_reranker: Path, tmp_path: Path
) -> None:
    """The model's host does not resolve: only the configured proxy can fetch it. (Plain http:
    pinned by its sha256, as a plain-http archive must be.)"""
    tarball = _tarball(xlmr_reranker)
    pin = f"sha256:{hashlib.sha256(tarball).hexdigest()}"
    with _serving(tarball) as (port, seen):
        config = config_from_dict({"proxy": {"httpProxy": f"http://127.0.0.1:{port}"}})
        url = "http://models.example.invalid/bge.tar.gz"
        pod, cache = _build_pod(url, config, tmp_path, {}, revision=pin)
        built = pod.run(timeout=300)
        assert built.returncode == 0, built.stderr
    assert seen == ["GET http://models.example.invalid/bge.tar.gz HTTP/1.1"]
    assert _built_engines(cache)


def test_the_build_tunnels_https_through_the_proxy_with_its_ca(
    xlmr_reranker: Path, tmp_path: Path
) -> None:
    """What a build behind a TLS-inspecting corporate proxy does: HTTPS through a CONNECT
    tunnel, to a host it cannot resolve itself, trusting the configured CA bundle."""
    tls, ca_dir = _private_ca("models.example.invalid", tmp_path)
    with (
        _serving(_tarball(xlmr_reranker), tls) as (origin, requests),
        _tunnelling_proxy(origin) as (proxy, tunnels),
    ):
        config = config_from_dict(
            {"proxy": {"httpsProxy": f"http://127.0.0.1:{proxy}", "caConfigMap": "corp-ca"}}
        )
        url = f"https://models.example.invalid:{origin}/bge.tar.gz"
        pod, cache = _build_pod(url, config, tmp_path / "pod", {CA_MOUNT: ca_dir})
        built = pod.run(timeout=300)
        assert built.returncode == 0, built.stderr
    [tunnel] = tunnels
    assert tunnel.startswith(f"CONNECT models.example.invalid:{origin} HTTP/1.")
    assert requests == ["GET /bge.tar.gz HTTP/1.1"]  # inside the tunnel
    assert _built_engines(cache)


def test_rendered_deployment_builds_and_serves_reference_scores(
    xlmr_reranker: Path, tmp_path: Path
) -> None:
    children = render_reranker(_reranker(f"{MODELS_MOUNT}/{xlmr_reranker.name}"), OperatorConfig())
    assert [c["kind"] for c in children] == ["Deployment", "Service"]
    deployment = _child(children, "Deployment")
    serve_pod = deployment["spec"]["template"]["spec"]
    [init_container] = serve_pod["initContainers"]
    serve_container = _container(deployment)

    # The pod's engine volume: written by the init container, read by the server.
    cache, pod_tmp = tmp_path / "engine-volume", tmp_path / "pod-tmp"
    cache.mkdir()
    pod_tmp.mkdir()
    assert _mount_path(init_container, serve_pod, "emptyDir") == CACHE_MOUNT
    assert _mount_path(serve_container, serve_pod, "emptyDir") == CACHE_MOUNT
    mounts = {CACHE_MOUNT: cache, TMP_MOUNT: pod_tmp, MODELS_MOUNT: xlmr_reranker.parent}

    # 1. The build init container.
    build = LocalPod(init_container, mounts, tmp_path / "build.log").run(timeout=300)
    assert build.returncode == 0, f"build failed:\n{build.stdout}\n{build.stderr}"
    [engine_dir] = [p for p in cache.iterdir() if not p.name.startswith(".")]
    assert (engine_dir / "manifest.json").is_file()
    assert deployment["metadata"]["annotations"]["reranker.dev/engine-key"] == engine_dir.name

    # Running it again (the pod's sandbox re-created) is a no-op on a complete engine.
    again = LocalPod(init_container, mounts, tmp_path / "build2.log").run(timeout=120)
    assert again.returncode == 0, again.stderr

    # 2. The runtime Deployment's pod, reached through its declared port and probes.
    [port] = serve_container["ports"]
    assert {e["name"]: e.get("value") for e in serve_container["env"]}["RERANKER_PORT"] == str(
        port["containerPort"]
    )
    local_port = _free_port()
    pod = LocalPod(serve_container, mounts, tmp_path / "serve.log")
    proc = pod.start(RERANKER_PORT=str(local_port), RERANKER_HOST="127.0.0.1")
    base = f"http://127.0.0.1:{local_port}"
    try:
        _wait_for_probe(proc, base + serve_container["startupProbe"]["httpGet"]["path"], pod.log)
        assert (
            httpx.get(base + serve_container["readinessProbe"]["httpGet"]["path"]).status_code
            == 200
        )
        assert (
            httpx.get(base + serve_container["livenessProbe"]["httpGet"]["path"]).status_code == 200
        )

        query = "what is the capital of france"
        texts = [
            "paris is the capital city of france",
            "deep learning model inference",
            "apple banana",
        ]
        r = httpx.post(f"{base}/rerank", json={"query": query, "texts": texts}, timeout=60)
        assert r.status_code == 200, r.text
        got = {item["index"]: item["score"] for item in r.json()}
        want = [
            1 / (1 + math.exp(-row[0]))
            for row in reference_logits(xlmr_reranker, [(query, t) for t in texts])
        ]
        for i, w in enumerate(want):
            assert got[i] == pytest.approx(w, abs=1e-5)

        # The runtime limits the operator configured arrived.
        info = httpx.get(f"{base}/info").json()
        assert info["max_concurrent_requests"] == 16
        assert info["max_client_batch_size"] == 64
        assert info["served_model_name"] == "contract-reranker"
        # `auto` on CPU (the default maxNumTokens is 16384): 2048 tokens in flight, shared by
        # the CPU forward workers the pod's CPUs allow.
        assert info["cpu_workers"] in (1, 2)
        assert info["max_batch_tokens"] == 2048 // info["cpu_workers"]
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
    assert proc.returncode == 0, pod.log.read_text()
    shutil.rmtree(cache, ignore_errors=True)
