"""Fetch a checkpoint at a pinned revision, validate it, and copy what serving needs.

Sources (`--source`):

- HF          `huggingface_hub.snapshot_download(repo, revision, token=$HF_TOKEN)`; the resolved
              commit sha is recorded. A `--checkpoint-repo` that is an existing local directory is
              used as is (that is how tests and air-gapped clusters point at a checkpoint).
- LOCAL       a local directory (must exist).
- PVC         `pvc://<claim>/<path>`: the directory <path> of a PersistentVolumeClaim, which the pod
              mounts read-only at `--checkpoint-mount` (default /checkpoint). The operator mounts
              the claim; the build only reads the directory (air-gapped clusters, models loaded
              once by hand or by a Job).
- S3          `s3://bucket/prefix`  - boto3 if installed, else the `aws` CLI.
- GCS         `gs://bucket/prefix`  - google-cloud-storage if installed, else `gcloud storage`/`gsutil`.
- AZURE       `az://container/prefix` or `https://<account>.blob.core.windows.net/<container>/<prefix>`
              - azure-storage-blob if installed, else the `az` CLI.
- REMOTE_URL  an http(s) URL of a .tar.gz, downloaded with urllib and extracted safely. `--revision`
              may be `sha256:<hex>` of the archive, which is then verified; the archive digest is
              recorded as the resolved revision either way.

Object stores and volumes have no revisions: for S3/GCS/AZURE/PVC `--revision` must be `main`
(or empty); put versions in the path. Credentials come from the environment (the Job's `envFrom` secret): HF_TOKEN;
AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY/AWS_SESSION_TOKEN/AWS_REGION; GOOGLE_APPLICATION_CREDENTIALS;
AZURE_STORAGE_CONNECTION_STRING or AZURE_STORAGE_ACCOUNT + AZURE_STORAGE_KEY/AZURE_STORAGE_SAS_TOKEN.
The image ships none of the cloud SDKs/CLIs by default; a missing one is a clear error naming the
package or CLI to add.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import tarfile
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reranker_runtime.engine_build.errors import (
    BuildArgumentError,
    CheckpointFetchError,
    CheckpointInvalidError,
)
from reranker_runtime.hub import looks_like_path
from reranker_runtime.model_family import ModelFamily, UnsupportedModelError

log = logging.getLogger(__name__)

SOURCES = ("HF", "LOCAL", "PVC", "S3", "GCS", "AZURE", "REMOTE_URL")
# Where the build container mounts a PVC source's claim (read-only; the server never does).
DEFAULT_PVC_MOUNT = Path("/checkpoint")
# pvc://<claim>[/<path>]: the claim is a DNS-1123 subdomain, as Kubernetes names PVCs.
_PVC_URL = re.compile(
    r"pvc://(?P<claim>[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*)"
    r"(?P<path>(/[^/]+)*)/?"
)

# What serving needs from a checkpoint; everything else (pytorch_model.bin, onnx/, flax, tf) is
# neither downloaded nor copied.
HF_ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model"]
_COPY_SUFFIXES = (".json", ".safetensors", ".txt", ".model")

_NO_REVISION = (None, "", "main")


@dataclass(frozen=True)
class FetchedCheckpoint:
    path: Path
    resolved_revision: str | None


@dataclass(frozen=True)
class ModelSpec:
    """What the build needs to know about a validated checkpoint: its model family (shared with
    the engines, reranker_runtime.model_family) plus the shapes TensorRT-LLM constrains."""

    family: ModelFamily
    max_input_length: int  # usable tokens per sequence (positions and tokenizer limit)
    hidden_size: int
    intermediate_size: int
    position_embedding_type: str
    id2label: dict[int, str] = field(default_factory=dict)

    @property
    def architecture(self) -> str:
        return self.family.architecture

    @property
    def model_type(self) -> str:
        return self.family.model_type

    @property
    def num_labels(self) -> int:
        return self.family.num_labels

    @property
    def is_roberta(self) -> bool:
        return self.family.is_roberta

    @property
    def position_offset(self) -> int:
        return self.family.position_offset

    @property
    def trtllm_class(self) -> str:
        return self.family.trtllm_class


# --------------------------------------------------------------------------------------- fetch


def resolve_source(repo: str, source: str) -> str:
    """The effective source: an existing local directory is LOCAL whatever --source says for HF."""
    src = source.upper()
    if src not in SOURCES:
        raise BuildArgumentError(f"--source {source!r} is not one of {', '.join(SOURCES)}")
    if src in ("HF", "LOCAL") and Path(repo).expanduser().is_dir():
        return "LOCAL"
    if src == "LOCAL":
        raise CheckpointFetchError(f"--source LOCAL: {repo} is not an existing directory")
    if src == "HF" and looks_like_path(repo):
        raise CheckpointFetchError(
            f"--checkpoint-repo {repo!r} does not exist (a local path; hub ids look like "
            "'org/name')"
        )
    if src == "PVC":
        parse_pvc_url(repo)  # a malformed URL is refused before anything else happens
    return src


def fetch_checkpoint(
    repo: str,
    revision: str | None,
    source: str,
    scratch: Path,
    *,
    env: dict[str, str] | None = None,
    pvc_mount: Path = DEFAULT_PVC_MOUNT,
) -> FetchedCheckpoint:
    """Bring the checkpoint to a local directory (under `scratch` unless it is already local)."""
    env = dict(os.environ if env is None else env)
    src = resolve_source(repo, source)
    if src == "LOCAL":
        path = Path(repo).expanduser().resolve()
        log.info("using local checkpoint %s", path)
        return FetchedCheckpoint(path, _local_revision(path))
    if src == "HF":
        return _fetch_hf(repo, revision, env)
    if src == "REMOTE_URL":
        return _fetch_remote_url(repo, revision, scratch)
    if revision not in _NO_REVISION:
        raise BuildArgumentError(
            f"--revision {revision!r} cannot be applied to a {src} source (object stores and "
            "volumes have no revisions): put the version in the path and use --revision main"
        )
    if src == "PVC":
        return FetchedCheckpoint(pvc_checkpoint_dir(repo, pvc_mount), None)
    dest = scratch / "download"
    dest.mkdir(parents=True, exist_ok=True)
    if src == "S3":
        _fetch_s3(repo, dest, env)
    elif src == "GCS":
        _fetch_gcs(repo, dest, env)
    else:
        _fetch_azure(repo, dest, env)
    return FetchedCheckpoint(_single_root(dest), None)


def parse_pvc_url(url: str) -> tuple[str, str]:
    """`pvc://<claim>/<path>` -> (claim, path), path relative ('' for the claim's root)."""
    m = _PVC_URL.fullmatch(url)
    segments = m.group("path").strip("/").split("/") if m else []
    if m is None or len(m.group("claim")) > 253 or {".", ".."} & set(segments):
        raise BuildArgumentError(
            f"a PVC checkpoint must look like pvc://<claim name>/<path in the claim>, without "
            f"'.' or '..' in the path, got {url!r}"
        )
    return m.group("claim"), "/".join(s for s in segments if s)


def pvc_checkpoint_dir(url: str, mount: Path) -> Path:
    """The checkpoint directory of a PVC source, inside the claim mounted at `mount`."""
    claim, sub = parse_pvc_url(url)
    if not mount.is_dir():
        raise CheckpointFetchError(
            f"{url}: the claim {claim!r} is not mounted at {mount} (--checkpoint-mount); the "
            "operator mounts it for a Reranker with checkpoint.source PVC"
        )
    path = mount / sub
    if path.is_dir():
        _check_inside_claim(path, mount, url)
        log.info("using checkpoint %s from the claim %s, mounted at %s", sub or "/", claim, mount)
        return path
    # Name what is there, from the deepest directory that exists: a typo is then obvious.
    parent = path.parent
    while not parent.is_dir():
        parent = parent.parent
    entries = sorted(p.name + ("/" if p.is_dir() else "") for p in parent.iterdir())
    shown = ", ".join(entries[:20]) + (
        f" and {len(entries) - 20} more" if len(entries) > 20 else ""
    )
    where = parent.relative_to(mount).as_posix()
    raise CheckpointFetchError(
        f"{url}: there is no directory {sub!r} on the claim {claim!r}; its "
        f"{'root' if where == '.' else where + '/'} holds {shown or 'nothing'}"
    )


def _check_inside_claim(path: Path, mount: Path, url: str) -> None:
    """Links on the claim may point within it (an HF cache's snapshots -> blobs), never out of
    it: the build would copy whatever they name (another volume, /proc/self/environ with the
    build's credentials) into the engine directory. Files the build does not copy (a README
    link) do not matter."""
    root = mount.resolve()
    copied = [p for p in path.iterdir() if p.name.endswith(_COPY_SUFFIXES)]
    for candidate in [path, *copied]:
        target = candidate.resolve()
        if target != root and root not in target.parents:
            raise CheckpointFetchError(
                f"{url}: {candidate.relative_to(mount).as_posix()} is a link out of the claim "
                f"(to {target}); a checkpoint on a PVC must stay on it"
            )


def _local_revision(path: Path) -> str | None:
    # A directory inside the HF cache (…/snapshots/<commit>) carries its commit in its name.
    return path.name if re.fullmatch(r"[0-9a-f]{40}", path.name) else None


def _fetch_hf(repo: str, revision: str | None, env: dict[str, str]) -> FetchedCheckpoint:
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.utils import HfHubHTTPError
    except ImportError as e:  # pragma: no cover - huggingface_hub is a runtime dependency
        raise CheckpointFetchError("huggingface_hub is not installed in this image") from e
    try:  # error classes moved between huggingface_hub versions
        from huggingface_hub.errors import (
            GatedRepoError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
    except ImportError:  # pragma: no cover
        from huggingface_hub.utils import (
            GatedRepoError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

    token = env.get("HF_TOKEN") or env.get("HUGGING_FACE_HUB_TOKEN") or None
    rev = revision or "main"
    log.info(
        "downloading %s@%s from the Hugging Face Hub (token: %s)",
        repo,
        rev,
        "set" if token else "none",
    )
    try:
        path = snapshot_download(
            repo_id=repo, revision=rev, token=token, allow_patterns=HF_ALLOW_PATTERNS
        )
    except GatedRepoError as e:
        raise CheckpointFetchError(
            f"{repo} is gated: accept its terms on huggingface.co with the account whose token is in "
            f"HF_TOKEN (token {'set' if token else 'not set'}): {_first_line(e)}"
        ) from e
    except RevisionNotFoundError as e:
        raise CheckpointFetchError(
            f"revision {rev!r} does not exist in {repo}: {_first_line(e)}"
        ) from e
    except RepositoryNotFoundError as e:
        raise CheckpointFetchError(
            f"{repo} was not found on the Hugging Face Hub, or it is private and HF_TOKEN "
            f"({'set' if token else 'not set'}) cannot read it: {_first_line(e)}"
        ) from e
    except LocalEntryNotFoundError as e:
        from reranker_runtime.hub import cache_dir

        raise CheckpointFetchError(
            f"cannot download {repo}@{rev}: the hub is unreachable (or HF_HUB_OFFLINE is set) and it "
            f"is not in the hub cache at {cache_dir()} (HF_HUB_CACHE or $HF_HOME/hub): "
            f"{_first_line(e).rstrip('.')}. "
            "Without the hub, pass a local checkpoint directory (--checkpoint-repo /path/to/dir)"
        ) from e
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise CheckpointFetchError(
            f"cannot download {repo}@{rev} from the Hugging Face Hub: {_first_line(e)}"
        ) from e
    p = Path(path)
    resolved = _local_revision(p)
    if resolved is None:
        try:
            from huggingface_hub import HfApi

            resolved = HfApi(token=token).model_info(repo, revision=rev).sha
        except Exception:  # the commit is informative, not required
            resolved = None
    log.info("downloaded %s@%s (commit %s) to %s", repo, rev, resolved, p)
    return FetchedCheckpoint(p, resolved)


def _fetch_remote_url(url: str, revision: str | None, scratch: Path) -> FetchedCheckpoint:
    expected: str | None = None
    if revision not in _NO_REVISION:
        m = re.fullmatch(r"sha256:([0-9a-fA-F]{64})", revision or "")
        if not m:
            raise BuildArgumentError(
                f"--revision {revision!r} cannot pin a REMOTE_URL source: use main, or sha256:<64 hex> "
                "of the archive to have it verified"
            )
        expected = m.group(1).lower()
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme not in ("http", "https"):
        raise BuildArgumentError(
            f"REMOTE_URL must be an http(s) URL of a .tar.gz archive, got {url!r}"
        )
    if parsed.scheme == "http" and expected is None:
        raise BuildArgumentError(
            "a REMOTE_URL archive over plain http can be altered on its way: serve it over "
            "https, or pin it with --revision sha256:<64 hex> of the archive"
        )
    scratch.mkdir(parents=True, exist_ok=True)
    archive = scratch / "checkpoint.tar.gz"
    safe_url = urllib.parse.urlunparse(
        parsed._replace(query="", fragment="")
    )  # no signed query in logs
    log.info("downloading %s", safe_url)
    digest = hashlib.sha256()
    try:
        req = urllib.request.Request(url, headers={"User-Agent": "reranker-runtime-build"})
        # Unpinned, an https download may not be redirected to plain http.
        opener = urllib.request.build_opener(_NoDowngrade(allowed=expected is not None))
        with opener.open(req, timeout=60) as resp, open(archive, "wb") as out:
            while chunk := resp.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
    except Exception as e:  # urllib raises URLError/HTTPError/OSError/timeouts
        raise CheckpointFetchError(f"cannot download {safe_url}: {e}") from e
    sha = digest.hexdigest()
    if expected is not None and sha != expected:
        raise CheckpointFetchError(
            f"{safe_url} has sha256 {sha}, but --revision pins sha256:{expected}"
        )
    dest = scratch / "extracted"
    safe_extract_tar(archive, dest)
    archive.unlink(missing_ok=True)
    return FetchedCheckpoint(_single_root(dest), f"sha256:{sha}")


class _NoDowngrade(urllib.request.HTTPRedirectHandler):
    """Redirects followed as urllib does, except from https to plain http (unless `allowed`:
    a pinned archive is verified whatever carried it)."""

    def __init__(self, *, allowed: bool) -> None:
        super().__init__()
        self.allowed = allowed

    def redirect_request(
        self, req: Any, fp: Any, code: int, msg: str, headers: Any, newurl: str
    ) -> Any:
        # req.type is the scheme urllib connects with, lower-cased (HTTPS://... too).
        if (
            not self.allowed
            and req.type == "https"
            and urllib.parse.urlparse(newurl).scheme == "http"
        ):
            raise CheckpointFetchError(
                "the https download was redirected to plain http, where it can be altered on "
                "its way; pin the archive with --revision sha256:<64 hex>, or fix the redirect"
            )
        return super().redirect_request(req, fp, code, msg, headers, newurl)


# A checkpoint archive expands little (weights do not compress); a gzip bomb expands ~1000x.
MAX_EXPANSION = 50
# A checkpoint is a few dozen files; an archive of millions of empty ones would exhaust the
# build's memory (their headers) or the volume's inodes.
MAX_MEMBERS = 10_000


def safe_extract_tar(archive: Path, dest: Path) -> None:
    """Extract a (gzipped) tar, refusing absolute paths, `..`, links and special files, and an
    archive that would expand more than MAX_EXPANSION times or past the free disk space."""
    dest.mkdir(parents=True, exist_ok=True)
    root = dest.resolve()
    try:
        with tarfile.open(archive, "r:*") as tar:
            members: list[tarfile.TarInfo] = []
            total = 0  # each entry costs a 512-byte header at least, empty ones included
            for member in tar:  # checked header by header: a bomb stops at its first one
                members.append(member)
                if len(members) > MAX_MEMBERS:
                    raise CheckpointFetchError(
                        f"{archive.name} holds more than {MAX_MEMBERS:,} entries; a checkpoint "
                        "is a few dozen files"
                    )
                total += member.size + 512
                _check_expansion(archive, dest, total)
            for m in members:
                target = (root / m.name).resolve()
                if m.name.startswith(("/", "\\")) or (
                    target != root and root not in target.parents
                ):
                    raise CheckpointFetchError(
                        f"{archive.name}: unsafe path {m.name!r} in the archive (outside the target)"
                    )
                if not (m.isfile() or m.isdir()):
                    raise CheckpointFetchError(
                        f"{archive.name}: {m.name!r} is a link or special file; a checkpoint archive may hold only files and directories"
                    )
            if hasattr(tarfile, "data_filter"):
                tar.extractall(dest, members=members, filter="data")
            else:  # pragma: no cover - Python < 3.11.4; members were checked above
                tar.extractall(dest, members=members)
    except tarfile.TarError as e:
        raise CheckpointFetchError(f"{archive.name} is not a readable .tar.gz archive: {e}") from e


def _check_expansion(archive: Path, dest: Path, total: int) -> None:
    packed = archive.stat().st_size
    if total > MAX_EXPANSION * max(packed, 1 << 20):
        raise CheckpointFetchError(
            f"{archive.name} would expand from {packed:,} to {total:,} bytes, more than "
            f"{MAX_EXPANSION}x: a checkpoint's weights do not compress that much; refusing it "
            "as a decompression bomb"
        )
    free = shutil.disk_usage(dest).free
    if total > free:
        raise CheckpointFetchError(
            f"{archive.name} holds {total:,} bytes but {dest} has {free:,} free; give the build "
            "more room (the operator's engineCache.size)"
        )


def _single_root(dest: Path) -> Path:
    """The directory holding config.json: dest itself, or its only subdirectory."""
    if (dest / "config.json").is_file():
        return dest
    entries = [p for p in dest.iterdir() if not p.name.startswith(".")]
    if len(entries) == 1 and entries[0].is_dir():
        return _single_root(entries[0])
    return dest


def _split_bucket_url(url: str, schemes: tuple[str, ...], what: str) -> tuple[str, str]:
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme not in schemes or not parsed.netloc:
        raise BuildArgumentError(
            f"{what} checkpoint must look like {schemes[0]}://bucket/prefix, got {url!r}"
        )
    return parsed.netloc, parsed.path.lstrip("/")


def _run_cli(cmd: list[str], what: str, env: dict[str, str]) -> None:
    log.info("running %s", " ".join(cmd[:3]))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    except OSError as e:
        raise CheckpointFetchError(f"cannot run {cmd[0]} to fetch from {what}: {e}") from e
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip()[-800:]
        raise CheckpointFetchError(
            f"{' '.join(cmd[:3])} failed (exit {proc.returncode}) fetching from {what}: {tail}"
        )


def _fetch_s3(url: str, dest: Path, env: dict[str, str]) -> None:
    bucket, prefix = _split_bucket_url(url, ("s3",), "an S3")
    try:
        import boto3
    except ImportError:
        boto3 = None
    if boto3 is not None:
        log.info("downloading s3://%s/%s with boto3", bucket, prefix)
        try:
            s3 = boto3.client("s3")
            pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
            n = 0
            for page in pages:
                for obj in page.get("Contents", []):
                    rel = obj["Key"][len(prefix) :].lstrip("/")
                    if not rel or obj["Key"].endswith("/") or not rel.endswith(_COPY_SUFFIXES):
                        continue
                    target = _safe_join(dest, rel)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    s3.download_file(bucket, obj["Key"], str(target))
                    n += 1
        except Exception as e:  # botocore raises many kinds
            raise CheckpointFetchError(
                f"cannot download {url} with boto3 (AWS_* credentials from the secret): {e}"
            ) from e
        if n == 0:
            raise CheckpointFetchError(
                f"{url} holds no checkpoint files (nothing under that prefix)"
            )
        return
    aws = shutil.which("aws")
    if aws is None:
        raise CheckpointFetchError(
            "--source S3 needs boto3 (pip install boto3) or the AWS CLI (`aws`) in the runtime image; "
            "neither is installed"
        )
    _run_cli([aws, "s3", "sync", url, str(dest), "--only-show-errors"], url, env)


def _fetch_gcs(url: str, dest: Path, env: dict[str, str]) -> None:
    bucket_name, prefix = _split_bucket_url(url, ("gs",), "a GCS")
    try:
        from google.cloud import storage
    except ImportError:
        storage = None
    if storage is not None:
        log.info("downloading gs://%s/%s with google-cloud-storage", bucket_name, prefix)
        try:
            client = storage.Client()
            n = 0
            for blob in client.list_blobs(bucket_name, prefix=prefix):
                rel = blob.name[len(prefix) :].lstrip("/")
                if not rel or blob.name.endswith("/") or not rel.endswith(_COPY_SUFFIXES):
                    continue
                target = _safe_join(dest, rel)
                target.parent.mkdir(parents=True, exist_ok=True)
                blob.download_to_filename(str(target))
                n += 1
        except Exception as e:
            raise CheckpointFetchError(
                f"cannot download {url} with google-cloud-storage (GOOGLE_APPLICATION_CREDENTIALS or workload identity): {e}"
            ) from e
        if n == 0:
            raise CheckpointFetchError(
                f"{url} holds no checkpoint files (nothing under that prefix)"
            )
        return
    gcloud, gsutil = shutil.which("gcloud"), shutil.which("gsutil")
    if gcloud:
        _run_cli([gcloud, "storage", "rsync", "--recursive", url, str(dest)], url, env)
    elif gsutil:
        _run_cli([gsutil, "-m", "rsync", "-r", url, str(dest)], url, env)
    else:
        raise CheckpointFetchError(
            "--source GCS needs google-cloud-storage (pip install google-cloud-storage) or the "
            "gcloud/gsutil CLI in the runtime image; none is installed"
        )


def _azure_location(url: str, env: dict[str, str]) -> tuple[str | None, str, str]:
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme == "az" and parsed.netloc:
        return None, parsed.netloc, parsed.path.lstrip("/")
    if parsed.scheme == "https" and parsed.netloc.endswith(".blob.core.windows.net"):
        container, _, prefix = parsed.path.lstrip("/").partition("/")
        if container:
            return f"https://{parsed.netloc}", container, prefix
    raise BuildArgumentError(
        "an AZURE checkpoint must look like az://container/prefix or "
        f"https://<account>.blob.core.windows.net/<container>/<prefix>, got {url!r}"
    )


def _fetch_azure(url: str, dest: Path, env: dict[str, str]) -> None:
    account_url, container, prefix = _azure_location(url, env)
    conn = env.get("AZURE_STORAGE_CONNECTION_STRING")
    account = env.get("AZURE_STORAGE_ACCOUNT")
    if account_url is None and account:
        account_url = f"https://{account}.blob.core.windows.net"
    try:
        from azure.storage.blob import ContainerClient
    except ImportError:
        ContainerClient = None
    if ContainerClient is not None:
        log.info("downloading %s/%s with azure-storage-blob", container, prefix)
        try:
            if conn:
                client = ContainerClient.from_connection_string(conn, container_name=container)
            elif account_url:
                cred = env.get("AZURE_STORAGE_SAS_TOKEN") or env.get("AZURE_STORAGE_KEY")
                client = ContainerClient(
                    account_url=account_url, container_name=container, credential=cred
                )
            else:
                raise CheckpointFetchError(
                    "AZURE source: set AZURE_STORAGE_CONNECTION_STRING, or AZURE_STORAGE_ACCOUNT (+ "
                    "AZURE_STORAGE_KEY or AZURE_STORAGE_SAS_TOKEN), or use an https://<account>.blob.core.windows.net URL"
                )
            n = 0
            for blob in client.list_blobs(name_starts_with=prefix):
                rel = blob.name[len(prefix) :].lstrip("/")
                if not rel or not rel.endswith(_COPY_SUFFIXES):
                    continue
                target = _safe_join(dest, rel)
                target.parent.mkdir(parents=True, exist_ok=True)
                with open(target, "wb") as f:
                    client.download_blob(blob.name).readinto(f)
                n += 1
        except CheckpointFetchError:
            raise
        except Exception as e:
            raise CheckpointFetchError(f"cannot download {url} with azure-storage-blob: {e}") from e
        if n == 0:
            raise CheckpointFetchError(
                f"{url} holds no checkpoint files (nothing under that prefix)"
            )
        return
    az = shutil.which("az")
    if az is None:
        raise CheckpointFetchError(
            "--source AZURE needs azure-storage-blob (pip install azure-storage-blob) or the Azure "
            "CLI (`az`) in the runtime image; neither is installed"
        )
    cmd = [
        az,
        "storage",
        "blob",
        "download-batch",
        "--source",
        container,
        "--destination",
        str(dest),
    ]
    if prefix:
        cmd += ["--pattern", f"{prefix.rstrip('/')}/*"]
    if account_url and not conn:
        cmd += ["--account-name", urllib.parse.urlparse(account_url).netloc.split(".")[0]]
    _run_cli(cmd, url, env)


def _safe_join(root: Path, rel: str) -> Path:
    target = (root / rel).resolve()
    if root.resolve() not in target.parents:
        raise CheckpointFetchError(
            f"refusing object key {rel!r}: it escapes the download directory"
        )
    return target


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# ------------------------------------------------------------------------------------ validate


def load_config(path: Path) -> dict[str, Any]:
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise CheckpointInvalidError(
            f"{path} has no config.json: it is not a Hugging Face checkpoint directory"
        )
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointInvalidError(f"{cfg_path} is not readable JSON: {e}") from e
    if not isinstance(cfg, dict):
        raise CheckpointInvalidError(f"{cfg_path} is not a JSON object")
    return cfg


def validate_checkpoint(path: Path, *, allow_classifier: bool = False) -> ModelSpec:
    """Check the checkpoint is something we can serve; every refusal names what is wrong."""
    cfg = load_config(path)
    try:
        family = ModelFamily.from_config(cfg)
    except UnsupportedModelError as e:
        raise CheckpointInvalidError(f"{path}: {e}") from e
    arch = family.architecture
    if family.num_labels != 1 and not allow_classifier:
        labels = cfg.get("id2label") or {}
        names = (
            ", ".join(str(v) for v in list(labels.values())[:8]) if isinstance(labels, dict) else ""
        )
        raise CheckpointInvalidError(
            f"{arch} has {family.num_labels} labels{f' ({names})' if names else ''}, but a "
            "reranker has exactly one (num_labels == 1, a relevance logit). This looks like a "
            "text classifier: pass --allow-classifier to build it anyway (served on /predict; "
            "/rerank refuses it)."
        )

    weights = sorted(p.name for p in path.glob("*.safetensors"))
    if not weights:
        others = sorted(
            p.name
            for p in path.iterdir()
            if p.suffix in (".bin", ".pt", ".h5", ".msgpack", ".ckpt")
        )
        found = f" (found {', '.join(others)})" if others else ""
        raise CheckpointInvalidError(
            f"{path} has no *.safetensors weights{found}: only safetensors checkpoints are accepted "
            "(pickle-based .bin files can execute code on load); convert with "
            "`model.save_pretrained(dir, safe_serialization=True)`"
        )
    if not (path / "tokenizer.json").is_file():
        raise CheckpointInvalidError(
            f"{path} has no fast tokenizer (tokenizer.json): the runtime tokenizes with a "
            "`tokenizers` fast tokenizer; save one with "
            "`AutoTokenizer.from_pretrained(..., use_fast=True).save_pretrained(dir)`"
        )
    try:
        max_len = family.max_input_length(_tokenizer_max_length(path))
    except UnsupportedModelError as e:
        raise CheckpointInvalidError(f"{path}: {e}") from e

    id2label_raw = cfg.get("id2label")
    id2label: dict[int, str] = {}
    for k, v in (id2label_raw if isinstance(id2label_raw, dict) else {}).items():
        try:
            id2label[int(k)] = str(v)
        except (TypeError, ValueError):
            continue
    return ModelSpec(
        family=family,
        max_input_length=max_len,
        hidden_size=int(cfg.get("hidden_size", 0) or 0),
        intermediate_size=int(cfg.get("intermediate_size", 0) or 0),
        position_embedding_type=str(cfg.get("position_embedding_type", "absolute")),
        id2label=id2label,
    )


def _tokenizer_max_length(path: Path) -> object:
    """tokenizer_config.json's model_max_length as written (ModelFamily.max_input_length ignores
    what is not a real limit, like transformers' 1e30 sentinel), or None."""
    try:
        tc = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return tc.get("model_max_length") if isinstance(tc, dict) else None


# ---------------------------------------------------------------------------------------- copy


def copy_checkpoint(src: Path, dst: Path) -> list[str]:
    """Copy config, safetensors weights and tokenizer files (following the HF cache's symlinks)."""
    dst.mkdir(parents=True, exist_ok=True)
    copied: list[str] = []
    for p in sorted(src.iterdir()):
        if p.is_file() and p.name.endswith(_COPY_SUFFIXES) and not p.name.startswith("."):
            shutil.copy2(p, dst / p.name)  # copy2 follows symlinks: blobs, not links, land here
            copied.append(p.name)
    return copied
