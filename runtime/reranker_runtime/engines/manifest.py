"""`<engine dir>/manifest.json` (format_version 1): what `build` wrote and `serve --engine-dir` reads.

Layout and fields follow docs/architecture.md ("Engine directory"):

    {
      "format_version": 1,
      "engine": "pytorch" | "tensorrt-llm",
      "inputs": {checkpoint_repo, revision, source, quantization, max_num_tokens, max_seq_len,
                 accelerator},                    # the build flags: equal inputs -> no-op rerun
      "resolved_revision": "<HF commit sha>" | "sha256:<archive digest>" | null,
      "model": {architecture, model_type, num_labels, max_input_length},
      "build": {dtype, max_batch_size, max_input_len},
      "gpu": {name, compute_capability} | null,
      "versions": {"reranker-stack": ..., "transformers": ..., "tensorrt_llm": ..., ...},
      "created_at": "2025-01-01T00:00:00Z",
      "paths": {checkpoint, config, tokenizer, engine}   # relative to the directory
    }

`manifest.json` is written last, atomically (temp file + rename), so its presence means the
directory is complete. Readers validate every field and name the first one that is wrong.

Why here: the format has one writer, `reranker-runtime build` (reranker_runtime.engine_build),
and one reader, the serve-time loader (reranker_runtime.engines.engine_dir). Dependencies point
from the build package to the engines, never back (serving must not import the build), so the
shared format lives on the engines' side, where both can import it.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
CHECKPOINT_SUBDIR = "checkpoint"
ENGINE_SUBDIR = "engine"
ENGINE_KINDS = ("pytorch", "tensorrt-llm")


class ManifestError(Exception):
    """manifest.json is missing, unreadable, or not a valid format_version 1 manifest."""


@dataclass(frozen=True)
class BuildInputs:
    """The `build` flags. Two builds with equal inputs produce interchangeable directories."""

    checkpoint_repo: str
    revision: str | None
    source: str
    quantization: str
    max_num_tokens: int
    max_seq_len: int | None
    accelerator: str

    def normalized(self) -> BuildInputs:
        return BuildInputs(
            checkpoint_repo=self.checkpoint_repo,
            revision=self.revision or None,
            source=self.source.upper(),
            quantization=self.quantization.lower(),
            max_num_tokens=int(self.max_num_tokens),
            max_seq_len=None if self.max_seq_len is None else int(self.max_seq_len),
            accelerator=self.accelerator.upper(),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self.normalized())

    def differences(self, other: BuildInputs) -> dict[str, tuple[Any, Any]]:
        """Fields whose values differ: name -> (self's, other's)."""
        a, b = self.to_dict(), other.to_dict()
        return {k: (a[k], b[k]) for k in a if a[k] != b[k]}

    @classmethod
    def from_dict(cls, data: Any) -> BuildInputs:
        d = _require_mapping(data, "inputs")
        return cls(
            checkpoint_repo=_require(d, "checkpoint_repo", str, "inputs"),
            revision=_require(d, "revision", (str, type(None)), "inputs"),
            source=_require(d, "source", str, "inputs"),
            quantization=_require(d, "quantization", str, "inputs"),
            max_num_tokens=_require(d, "max_num_tokens", int, "inputs"),
            max_seq_len=_require(d, "max_seq_len", (int, type(None)), "inputs"),
            accelerator=_require(d, "accelerator", str, "inputs"),
        ).normalized()


@dataclass(frozen=True)
class ModelInfo:
    architecture: str
    model_type: str
    num_labels: int
    max_input_length: int

    @classmethod
    def from_dict(cls, data: Any) -> ModelInfo:
        d = _require_mapping(data, "model")
        info = cls(
            architecture=_require(d, "architecture", str, "model"),
            model_type=_require(d, "model_type", str, "model"),
            num_labels=_require(d, "num_labels", int, "model"),
            max_input_length=_require(d, "max_input_length", int, "model"),
        )
        if info.num_labels < 1 or info.max_input_length < 1:
            raise ManifestError(
                "manifest.json: model.num_labels and model.max_input_length must be >= 1"
            )
        return info


@dataclass(frozen=True)
class BuildShapes:
    dtype: str
    max_batch_size: int | None  # None: no engine-imposed limit (PyTorch)
    max_input_len: int

    @classmethod
    def from_dict(cls, data: Any) -> BuildShapes:
        d = _require_mapping(data, "build")
        shapes = cls(
            dtype=_require(d, "dtype", str, "build"),
            max_batch_size=_require(d, "max_batch_size", (int, type(None)), "build"),
            max_input_len=_require(d, "max_input_len", int, "build"),
        )
        if shapes.max_input_len < 1 or (
            shapes.max_batch_size is not None and shapes.max_batch_size < 1
        ):
            raise ManifestError(
                "manifest.json: build.max_input_len and build.max_batch_size must be >= 1"
            )
        return shapes


@dataclass(frozen=True)
class GpuInfo:
    name: str  # e.g. "NVIDIA L4" (torch.cuda.get_device_name / nvidia-smi)
    compute_capability: str  # e.g. "8.9"

    @classmethod
    def from_dict(cls, data: Any) -> GpuInfo | None:
        if data is None:
            return None
        d = _require_mapping(data, "gpu")
        return cls(
            name=_require(d, "name", str, "gpu"),
            compute_capability=_require(d, "compute_capability", str, "gpu"),
        )


@dataclass(frozen=True)
class Manifest:
    engine: str
    inputs: BuildInputs
    resolved_revision: str | None
    model: ModelInfo
    build: BuildShapes
    gpu: GpuInfo | None
    versions: dict[str, str]
    created_at: str = field(default_factory=lambda: utc_now())
    format_version: int = FORMAT_VERSION
    paths: dict[str, str | None] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.paths:
            object.__setattr__(self, "paths", default_paths(self.engine))

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "engine": self.engine,
            "inputs": self.inputs.to_dict(),
            "resolved_revision": self.resolved_revision,
            "model": asdict(self.model),
            "build": asdict(self.build),
            "gpu": None if self.gpu is None else asdict(self.gpu),
            "versions": dict(self.versions),
            "created_at": self.created_at,
            "paths": dict(self.paths),
        }

    @classmethod
    def from_dict(cls, data: Any) -> Manifest:
        d = _require_mapping(data, "manifest")
        version = d.get("format_version")
        if version != FORMAT_VERSION:
            raise ManifestError(
                f"manifest.json: format_version {version!r} is not supported (this runtime reads "
                f"format_version {FORMAT_VERSION}); rebuild the engine directory with this runtime's "
                "`reranker-runtime build`"
            )
        engine = _require(d, "engine", str, "manifest")
        if engine not in ENGINE_KINDS:
            raise ManifestError(
                f"manifest.json: engine {engine!r} is unknown (expected one of {', '.join(ENGINE_KINDS)})"
            )
        gpu = GpuInfo.from_dict(d.get("gpu"))
        if engine == "tensorrt-llm" and gpu is None:
            raise ManifestError(
                "manifest.json: a tensorrt-llm engine must record the gpu it was built on"
            )
        versions = _require_mapping(d.get("versions", {}), "versions")
        paths = d.get("paths") or default_paths(engine)
        return cls(
            engine=engine,
            inputs=BuildInputs.from_dict(d.get("inputs")),
            resolved_revision=_require(d, "resolved_revision", (str, type(None)), "manifest"),
            model=ModelInfo.from_dict(d.get("model")),
            build=BuildShapes.from_dict(d.get("build")),
            gpu=gpu,
            versions={str(k): str(v) for k, v in versions.items()},
            created_at=_require(d, "created_at", str, "manifest"),
            format_version=version,
            paths=_require_mapping(paths, "paths"),
        )


def default_paths(engine: str) -> dict[str, str | None]:
    return {
        "checkpoint": CHECKPOINT_SUBDIR,
        "config": f"{CHECKPOINT_SUBDIR}/config.json",
        "tokenizer": f"{CHECKPOINT_SUBDIR}/tokenizer.json",
        "engine": ENGINE_SUBDIR if engine == "tensorrt-llm" else None,
    }


def utc_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def manifest_path(directory: str | os.PathLike[str]) -> Path:
    return Path(directory) / MANIFEST_NAME


def write_manifest(directory: str | os.PathLike[str], manifest: Manifest) -> Path:
    """Write manifest.json atomically: a temp file in the same directory, fsync, rename."""
    path = manifest_path(directory)
    tmp = path.with_name(f".{MANIFEST_NAME}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest.to_dict(), f, indent=2, sort_keys=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def read_manifest(directory: str | os.PathLike[str], *, check_files: bool = True) -> Manifest:
    """Read and validate `<directory>/manifest.json`; with check_files, also that the files it
    names exist (a manifest next to a missing checkpoint is not a usable directory)."""
    directory = Path(directory)
    path = manifest_path(directory)
    if not directory.is_dir():
        raise ManifestError(f"engine directory {directory} does not exist")
    if not path.is_file():
        raise ManifestError(
            f"{path} is missing: {directory} is not a complete engine directory (manifest.json is "
            "written last by `reranker-runtime build`; an interrupted build leaves none)"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ManifestError(f"{path} is not readable JSON: {e}") from e
    manifest = Manifest.from_dict(data)
    if check_files:
        for key in ("config", "tokenizer", "engine"):
            rel = manifest.paths.get(key)
            if rel is None:
                if key == "engine" and manifest.engine == "tensorrt-llm":
                    raise ManifestError(
                        "manifest.json: paths.engine is required for a tensorrt-llm engine"
                    )
                continue
            if not (directory / rel).exists():
                raise ManifestError(
                    f"{directory}: manifest.json names {key} file {rel}, which is missing"
                )
    return manifest


def _require_mapping(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ManifestError(f"manifest.json: {where} must be an object, got {type(value).__name__}")
    return value


def _require(d: dict[str, Any], key: str, types: type | tuple[type, ...], where: str) -> Any:
    if key not in d:
        raise ManifestError(f"manifest.json: {where}.{key} is missing")
    value = d[key]
    # bool is an int subclass; a true/false where a number belongs is a wrong manifest.
    if isinstance(value, bool) or not isinstance(value, types):
        names = (
            types.__name__
            if isinstance(types, type)
            else " or ".join("null" if t is type(None) else t.__name__ for t in types)
        )
        raise ManifestError(f"manifest.json: {where}.{key} must be {names}, got {value!r}")
    return value
