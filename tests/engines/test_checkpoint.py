"""Checkpoint validation (each refusal names what is wrong) and fetching without a network."""

from __future__ import annotations

import email.message
import hashlib
import http.server
import io
import shutil
import sys
import tarfile
import threading
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest

from engines.helpers import mutate_checkpoint
from reranker_runtime.engine_build import checkpoint as ck
from reranker_runtime.engine_build.errors import (
    BuildArgumentError,
    CheckpointFetchError,
    CheckpointInvalidError,
)


def test_valid_rerankers(xlmr_reranker: Path, bert_reranker: Path) -> None:
    x = ck.validate_checkpoint(xlmr_reranker)
    assert (x.architecture, x.model_type, x.num_labels) == (
        "XLMRobertaForSequenceClassification",
        "xlm-roberta",
        1,
    )
    assert x.max_input_length == 128  # 130 positions - (padding_idx 1 + 1)
    assert x.position_offset == 2 and x.is_roberta
    b = ck.validate_checkpoint(bert_reranker)
    assert (b.architecture, b.model_type, b.max_input_length, b.position_offset) == (
        "BertForSequenceClassification",
        "bert",
        128,
        0,
    )


@pytest.mark.parametrize(
    ("config", "needle"),
    [
        (
            {"architectures": ["XLMRobertaForMaskedLM"]},
            "XLMRobertaForMaskedLM is not a cross-encoder: it is not a *ForSequenceClassification model",
        ),
        (
            {"architectures": ["DebertaV2ForSequenceClassification"], "model_type": "deberta-v2"},
            "DebertaV2ForSequenceClassification (model_type 'deberta-v2') is a sequence classifier, but not one of the BERT family",
        ),
        ({"architectures": []}, "names no architecture"),
        ({"model_type": "bert"}, "model_type 'bert' (expected 'xlm-roberta')"),
        ({"max_position_embeddings": 0}, "no valid max_position_embeddings"),
        ({"max_position_embeddings": 2}, "allows only 0 tokens per sequence"),
    ],
)
def test_wrong_architecture(xlmr_reranker: Path, tmp_path: Path, config: dict, needle: str) -> None:
    d = mutate_checkpoint(xlmr_reranker, tmp_path / "m", config=config)
    with pytest.raises(CheckpointInvalidError) as ei:
        ck.validate_checkpoint(d)
    assert needle in ei.value.message
    assert ei.value.exit_code == 12


def test_several_labels_refused_unless_allowed(xlmr_classifier: Path) -> None:
    with pytest.raises(CheckpointInvalidError) as ei:
        ck.validate_checkpoint(xlmr_classifier)
    msg = ei.value.message
    assert "has 3 labels (negative, neutral, positive)" in msg
    assert "a reranker has exactly one" in msg and "--allow-classifier" in msg
    assert ck.validate_checkpoint(xlmr_classifier, allow_classifier=True).num_labels == 3


def test_missing_safetensors(xlmr_reranker: Path, tmp_path: Path) -> None:
    d = mutate_checkpoint(xlmr_reranker, tmp_path / "m", remove=("*.safetensors",))
    (d / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(
        CheckpointInvalidError, match=r"has no \*\.safetensors weights \(found pytorch_model\.bin\)"
    ):
        ck.validate_checkpoint(d)


def test_missing_fast_tokenizer(xlmr_reranker: Path, tmp_path: Path) -> None:
    d = mutate_checkpoint(xlmr_reranker, tmp_path / "m", remove=("tokenizer.json",))
    with pytest.raises(CheckpointInvalidError, match=r"has no fast tokenizer \(tokenizer\.json\)"):
        ck.validate_checkpoint(d)


def test_missing_or_broken_config(xlmr_reranker: Path, tmp_path: Path) -> None:
    d = mutate_checkpoint(xlmr_reranker, tmp_path / "m", remove=("config.json",))
    with pytest.raises(CheckpointInvalidError, match=r"has no config\.json"):
        ck.validate_checkpoint(d)
    (d / "config.json").write_text("{oops")
    with pytest.raises(CheckpointInvalidError, match=r"not readable JSON"):
        ck.validate_checkpoint(d)


def test_copy_keeps_only_what_serving_needs(xlmr_reranker: Path, tmp_path: Path) -> None:
    src = mutate_checkpoint(xlmr_reranker, tmp_path / "src")
    (src / "pytorch_model.bin").write_bytes(b"x")
    (src / "onnx").mkdir()
    copied = ck.copy_checkpoint(src, tmp_path / "dst")
    assert (
        "pytorch_model.bin" not in copied and "config.json" in copied and "tokenizer.json" in copied
    )
    assert any(n.endswith(".safetensors") for n in copied)
    assert not (tmp_path / "dst" / "onnx").exists()


# ----------------------------------------------------------------------------------- sources


def test_local_sources(xlmr_reranker: Path, tmp_path: Path) -> None:
    assert ck.resolve_source(str(xlmr_reranker), "HF") == "LOCAL"  # an existing path wins
    assert ck.resolve_source(str(xlmr_reranker), "local") == "LOCAL"
    assert ck.resolve_source("org/model", "HF") == "HF"
    with pytest.raises(CheckpointFetchError, match=r"not an existing directory"):
        ck.resolve_source(str(tmp_path / "missing"), "LOCAL")
    # A mistyped local path (the default source is HF) is named as a path, not as a bad hub id.
    for path in (str(tmp_path / "missing"), "./missing", "../m", "~/m"):
        with pytest.raises(CheckpointFetchError, match=r"does not exist \(a local path; hub ids"):
            ck.resolve_source(path, "HF")
    with pytest.raises(BuildArgumentError, match=r"--source 'ftp' is not one of"):
        ck.resolve_source("x", "ftp")
    f = ck.fetch_checkpoint(str(xlmr_reranker), "main", "HF", tmp_path / "scratch")
    assert f.path == xlmr_reranker.resolve() and f.resolved_revision is None


def test_hf_records_resolved_commit(
    monkeypatch: pytest.MonkeyPatch, xlmr_reranker: Path, tmp_path: Path
) -> None:
    import huggingface_hub

    sha = "0123456789abcdef0123456789abcdef01234567"
    snap = tmp_path / "hub" / "models--org--m" / "snapshots" / sha
    snap.parent.mkdir(parents=True)
    snap.symlink_to(xlmr_reranker, target_is_directory=True)
    seen = {}

    def fake_snapshot_download(**kw):
        seen.update(kw)
        return str(snap)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    f = ck.fetch_checkpoint("org/m", "v1.0", "HF", tmp_path / "s", env={"HF_TOKEN": "hf_secret"})
    assert f.resolved_revision == sha
    assert (
        seen["repo_id"] == "org/m" and seen["revision"] == "v1.0" and seen["token"] == "hf_secret"
    )
    assert "*.safetensors" in seen["allow_patterns"] and "*.bin" not in seen["allow_patterns"]


def test_hf_errors_are_fetch_errors(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import huggingface_hub

    def offline(**kw):
        from huggingface_hub.errors import LocalEntryNotFoundError

        raise LocalEntryNotFoundError("no connection")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(
        CheckpointFetchError, match=r"cannot download org/m@main: the hub is unreachable"
    ):
        ck.fetch_checkpoint("org/m", "main", "HF", tmp_path, env={})


@pytest.mark.parametrize(
    ("source", "url", "needle"),
    [
        ("S3", "s3://bucket/models/m", "needs boto3 (pip install boto3) or the AWS CLI (`aws`)"),
        (
            "GCS",
            "gs://bucket/models/m",
            "needs google-cloud-storage (pip install google-cloud-storage) or the gcloud/gsutil CLI",
        ),
        (
            "AZURE",
            "az://container/models/m",
            "needs azure-storage-blob (pip install azure-storage-blob) or the Azure CLI (`az`)",
        ),
    ],
)
def test_object_stores_without_sdk_or_cli_say_what_is_missing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, source: str, url: str, needle: str
) -> None:
    for mod in (
        "boto3",
        "google.cloud.storage",
        "google.cloud",
        "azure.storage.blob",
        "azure.storage",
        "azure",
    ):
        monkeypatch.setitem(sys.modules, mod, None)  # import -> ImportError
    monkeypatch.setattr(ck.shutil, "which", lambda name: None)
    with pytest.raises(CheckpointFetchError) as ei:
        ck.fetch_checkpoint(url, "main", source, tmp_path, env={})
    assert needle in ei.value.message


def test_object_stores_refuse_revisions(tmp_path: Path) -> None:
    with pytest.raises(BuildArgumentError, match=r"cannot be applied to a S3 source"):
        ck.fetch_checkpoint("s3://b/p", "v2", "S3", tmp_path, env={})
    with pytest.raises(BuildArgumentError, match=r"must look like s3://bucket/prefix"):
        ck.fetch_checkpoint("https://example.com/x", "main", "S3", tmp_path, env={})


def test_pvc_source_reads_the_directory_on_the_mounted_claim(
    xlmr_reranker: Path, tmp_path: Path
) -> None:
    # The operator mounts the claim `models` at the mount; pvc://models/<path> is <mount>/<path>.
    mount = tmp_path / "checkpoint"
    shutil.copytree(xlmr_reranker, mount / "rerankers" / "tiny")
    f = ck.fetch_checkpoint(
        "pvc://models/rerankers/tiny/", "main", "PVC", tmp_path / "scratch", pvc_mount=mount
    )
    assert f.path == mount / "rerankers" / "tiny" and f.resolved_revision is None
    ck.validate_checkpoint(f.path)
    # Nothing was copied to scratch: the build reads the volume in place.
    assert not (tmp_path / "scratch").exists()


def test_pvc_source_errors_say_what_is_on_the_claim(tmp_path: Path) -> None:
    mount = tmp_path / "checkpoint"
    (mount / "rerankers" / "bge-reranker-large").mkdir(parents=True)
    (mount / "README").write_text("models")
    with pytest.raises(CheckpointFetchError) as ei:
        ck.fetch_checkpoint("pvc://models/rerankers/bge-large", "main", "PVC", tmp_path,
                            pvc_mount=mount)  # fmt: skip
    assert ei.value.message == (
        "pvc://models/rerankers/bge-large: there is no directory 'rerankers/bge-large' on the "
        "claim 'models'; its rerankers/ holds bge-reranker-large/"
    )
    with pytest.raises(CheckpointFetchError, match=r"its root holds README, rerankers/"):
        ck.fetch_checkpoint("pvc://models/other/x", "main", "PVC", tmp_path, pvc_mount=mount)
    with pytest.raises(CheckpointFetchError, match=r"the claim 'models' is not mounted at"):
        ck.fetch_checkpoint("pvc://models/x", "main", "PVC", tmp_path, pvc_mount=tmp_path / "no")
    with pytest.raises(BuildArgumentError, match=r"cannot be applied to a PVC source"):
        ck.fetch_checkpoint("pvc://models/x", "v2", "PVC", tmp_path, pvc_mount=mount)


def test_pvc_source_refuses_links_out_of_the_claim(xlmr_reranker: Path, tmp_path: Path) -> None:
    mount = tmp_path / "checkpoint"
    mount.mkdir()
    # A model directory linked from elsewhere, or one file linked out (e.g. to the environment).
    (mount / "linked").symlink_to(xlmr_reranker, target_is_directory=True)
    with pytest.raises(CheckpointFetchError, match=r"linked is a link out of the claim"):
        ck.fetch_checkpoint("pvc://models/linked", "main", "PVC", tmp_path, pvc_mount=mount)
    model = mount / "model"
    shutil.copytree(xlmr_reranker, model)
    (model / "tokenizer.json").unlink()
    (model / "tokenizer.json").symlink_to("/proc/self/environ")
    with pytest.raises(CheckpointFetchError, match=r"model/tokenizer.json is a link out of"):
        ck.fetch_checkpoint("pvc://models/model", "main", "PVC", tmp_path, pvc_mount=mount)
    # Links within the claim (an HF cache's layout) are fine, and so are links of files the build
    # does not copy.
    (model / "README.md").symlink_to("/etc/hostname")
    (model / "tokenizer.json").unlink()
    shutil.copy(xlmr_reranker / "tokenizer.json", mount / "blob")
    (model / "tokenizer.json").symlink_to("../blob")
    f = ck.fetch_checkpoint("pvc://models/model", "main", "PVC", tmp_path, pvc_mount=mount)
    ck.validate_checkpoint(f.path)


@pytest.mark.parametrize(
    "url",
    ["pvc://", "pvc://Models/x", "pvc://models/../etc", "pvc://models/./x", "s3://models/x",
     "pvc://models//x", "pvc://-models/x", "pvc:/models/x", "models/x"],
)  # fmt: skip
def test_pvc_urls_are_checked_before_anything_runs(url: str) -> None:
    with pytest.raises(BuildArgumentError, match=r"must look like pvc://<claim name>/<path"):
        ck.resolve_source(url, "PVC")


def test_pvc_url_parts() -> None:
    assert ck.parse_pvc_url("pvc://models") == ("models", "")
    assert ck.parse_pvc_url("pvc://models.team-a/bge/v2/") == ("models.team-a", "bge/v2")


def _tar_of(model_dir: Path, arcroot: str = "model") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(model_dir, arcname=arcroot)
    return buf.getvalue()


@pytest.fixture
def http_server():
    files: dict[str, bytes] = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = files.get(self.path.split("?")[0])
            if body is None:
                self.send_response(404)
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}", files
    srv.shutdown()


def test_remote_url_tarball(http_server, xlmr_reranker: Path, tmp_path: Path) -> None:
    base, files = http_server
    data = _tar_of(xlmr_reranker)
    files["/m.tar.gz"] = data
    sha = hashlib.sha256(data).hexdigest()
    # Plain http only pinned: unpinned, the archive could be altered on its way.
    with pytest.raises(BuildArgumentError, match="over plain http can be altered"):
        ck.fetch_checkpoint(f"{base}/m.tar.gz", "main", "REMOTE_URL", tmp_path / "plain")
    pin = f"sha256:{sha}"
    f = ck.fetch_checkpoint(f"{base}/m.tar.gz?sig=secret", pin, "REMOTE_URL", tmp_path / "a")
    assert f.resolved_revision == f"sha256:{sha}"
    assert (f.path / "config.json").is_file()
    assert ck.validate_checkpoint(f.path).architecture == "XLMRobertaForSequenceClassification"
    # a pinned digest is verified
    ck.fetch_checkpoint(f"{base}/m.tar.gz", f"sha256:{sha}", "REMOTE_URL", tmp_path / "b")
    with pytest.raises(
        CheckpointFetchError, match=f"has sha256 {sha}, but --revision pins sha256:{'0' * 64}"
    ):
        ck.fetch_checkpoint(f"{base}/m.tar.gz", "sha256:" + "0" * 64, "REMOTE_URL", tmp_path / "c")
    with pytest.raises(BuildArgumentError, match=r"cannot pin a REMOTE_URL source"):
        ck.fetch_checkpoint(f"{base}/m.tar.gz", "v1", "REMOTE_URL", tmp_path / "d")
    with pytest.raises(CheckpointFetchError, match=r"cannot download"):
        ck.fetch_checkpoint(f"{base}/missing.tar.gz", pin, "REMOTE_URL", tmp_path / "e")


def test_an_https_download_is_not_redirected_to_plain_http_unless_pinned() -> None:
    """Unpinned, an https archive redirected to http could be altered on its way."""
    https = urllib.request.Request("https://models.example/m.tar.gz")
    headers = email.message.Message()
    for url in ("https://models.example/m.tar.gz", "HTTPS://models.example/m.tar.gz"):
        with pytest.raises(CheckpointFetchError, match="redirected to plain http"):
            ck._NoDowngrade(allowed=False).redirect_request(
                urllib.request.Request(url), None, 302, "Found", headers, "HTTP://cdn.example/m"
            )
    for handler, new_url in (
        (ck._NoDowngrade(allowed=False), "https://cdn.example/m.tar.gz"),
        (ck._NoDowngrade(allowed=True), "http://cdn.example/m.tar.gz"),  # verified by its pin
    ):
        followed = handler.redirect_request(https, None, 302, "Found", headers, new_url)
        assert followed.full_url == new_url


def _tar_with(tmp_path: Path, name: str, size: int) -> Path:
    archive = tmp_path / "big.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo(name)
        info.size = size
        tar.addfile(info, io.BytesIO(bytes(size)))
    return archive


def test_safe_extract_refuses_a_decompression_bomb_and_a_full_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """60 MB of zeros packs into ~60 KB: 1000x, no checkpoint does that (weights do not
    compress). Nothing is written. An honest archive bigger than the free space is refused
    before it fills the volume, naming both sizes."""
    bomb = _tar_with(tmp_path, "model.safetensors", 60 << 20)
    with pytest.raises(CheckpointFetchError, match="refusing it as a decompression bomb"):
        ck.safe_extract_tar(bomb, tmp_path / "out")
    assert not any((tmp_path / "out").iterdir())
    many = tmp_path / "many.tar.gz"
    with tarfile.open(many, "w:gz") as tar:
        for i in range(ck.MAX_MEMBERS + 1):
            tar.addfile(tarfile.TarInfo(f"f{i}"))
    with pytest.raises(CheckpointFetchError, match="more than 10,000 entries"):
        ck.safe_extract_tar(many, tmp_path / "out3")
    small = _tar_with(tmp_path, "config.json", 1000)
    full = SimpleNamespace(total=10, used=10, free=0)
    monkeypatch.setattr(ck.shutil, "disk_usage", lambda _: full)
    with pytest.raises(CheckpointFetchError, match=r"holds 1,512 bytes but .* has 0 free"):
        ck.safe_extract_tar(small, tmp_path / "out2")


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink"])
def test_safe_extract_refuses_escapes(tmp_path: Path, kind: str) -> None:
    archive = tmp_path / "evil.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo(
            {"dotdot": "../evil.txt", "absolute": "/tmp/evil.txt", "symlink": "link"}[kind]
        )
        if kind == "symlink":
            info.type = tarfile.SYMTYPE
            info.linkname = "/etc/passwd"
            tar.addfile(info)
        else:
            payload = b"x"
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    with pytest.raises(CheckpointFetchError, match=r"unsafe path|link or special file"):
        ck.safe_extract_tar(archive, tmp_path / "out")
    assert not (tmp_path / "evil.txt").exists()
