"""`reranker-runtime build`: fetch + validate a checkpoint, build the engine, publish it atomically.

The operator's engine-preparation Job runs exactly this (docs/architecture.md, "Operator ->
runtime contract"); exit codes and the termination message are documented in
engine_build/errors.py and docs/engines.md.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from reranker_runtime.engine_build.errors import BuildArgumentError, BuildError
from reranker_runtime.engines.manifest import BuildInputs, GpuInfo, Manifest

log = logging.getLogger(__name__)

DEFAULT_TERMINATION_LOG = "/dev/termination-log"
TERMINATION_LOG_ENV = "RERANKER_TERMINATION_LOG"
_TERMINATION_MAX_BYTES = 4000  # Kubernetes keeps at most 4096 bytes of the message


@dataclass(frozen=True)
class BuildResult:
    status: str  # "built" | "unchanged"
    output: Path
    manifest: Manifest


def add_build_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from reranker_runtime.engine_build.checkpoint import DEFAULT_PVC_MOUNT, SOURCES
    from reranker_runtime.engine_build.gpu import ALL_ACCELERATORS
    from reranker_runtime.engine_build.trtllm import QUANTIZATIONS

    p = subparsers.add_parser(
        "build",
        help="prepare an engine directory (checkpoint cache, or a TensorRT-LLM engine)",
        description=(
            "Fetch a BERT-family *ForSequenceClassification checkpoint at a pinned revision, validate "
            "it, and write an engine directory: for a GPU accelerator a float16 TensorRT-LLM engine "
            "(packed input, BERT attention plugin, context FMHA); for CPU the cached checkpoint. "
            "The directory is published atomically (manifest.json last); rerunning with the same "
            "inputs on a complete directory is a no-op. Credentials come from the environment "
            "(HF_TOKEN, AWS_*, GOOGLE_APPLICATION_CREDENTIALS, AZURE_STORAGE_*)."
        ),
    )
    p.add_argument(
        "--checkpoint-repo",
        required=True,
        help="HF repo id, local directory, pvc://, s3://, gs://, az:// or https:// URL",
    )
    p.add_argument(
        "--revision",
        default="main",
        help="HF branch/tag/commit (recorded as the resolved commit); main for object stores; sha256:<hex> pins a REMOTE_URL archive (default %(default)s)",
    )
    p.add_argument(
        "--source",
        default="HF",
        type=str.upper,
        choices=SOURCES,
        help="where the checkpoint lives (default %(default)s; an existing local path is used as is)",
    )
    p.add_argument(
        "--quantization",
        default="no_quant",
        type=str.lower,
        choices=QUANTIZATIONS,
        help="no_quant = float16 engine (default %(default)s; fp8/fp4 are refused for BERT-family models)",
    )
    p.add_argument(
        "--max-num-tokens",
        type=int,
        default=16384,
        help="token budget of one forward pass; sets the engine's batch profile (default %(default)s)",
    )
    p.add_argument(
        "--max-seq-len",
        type=int,
        default=None,
        help="most tokens per sequence (default: the model's maximum)",
    )
    p.add_argument(
        "--accelerator",
        required=True,
        type=str.upper,
        choices=ALL_ACCELERATORS,
        help="the GPU this engine will serve on (must be the one building it), or CPU",
    )
    p.add_argument(
        "--checkpoint-mount",
        default=str(DEFAULT_PVC_MOUNT),
        help="where the pod mounts the claim of a pvc:// checkpoint (default %(default)s)",
    )
    p.add_argument("--output", required=True, help="engine directory to create")
    p.add_argument(
        "--allow-classifier",
        action="store_true",
        help="accept a checkpoint with several labels (served on /predict only)",
    )
    p.set_defaults(func=run_build_command)
    return p


# ------------------------------------------------------------------------------------- logging


def setup_logging() -> None:
    """JSON lines by default (RERANKER_LOG_FORMAT=text for a terminal), like `serve`."""
    from reranker_runtime.logging import LOG_FORMATS, LOG_LEVELS
    from reranker_runtime.logging import setup_logging as _setup

    fmt = os.environ.get("RERANKER_LOG_FORMAT", "json").lower()
    level = os.environ.get("RERANKER_LOG_LEVEL", "info").lower()
    _setup(fmt if fmt in LOG_FORMATS else "json", level if level in LOG_LEVELS else "info")


@contextlib.contextmanager
def progress(step: str, every_s: float = 30.0) -> Iterator[None]:
    """Log the start and end of a long step, and a heartbeat while it runs."""
    start = time.monotonic()
    done = threading.Event()

    def beat() -> None:
        while not done.wait(every_s):
            log.info("still %s (%.0f s)", step, time.monotonic() - start)

    log.info("%s ...", step)
    t = threading.Thread(target=beat, name="build-progress", daemon=True)
    t.start()
    try:
        yield
    finally:
        done.set()
    log.info("%s: done in %.1f s", step, time.monotonic() - start)


# --------------------------------------------------------------------------- termination log


def write_termination_message(text: str, env: Mapping[str, str] | None = None) -> None:
    """Write the one-paragraph message Kubernetes shows as the container's termination message."""
    explicit = (os.environ if env is None else env).get(TERMINATION_LOG_ENV)
    path = Path(explicit or DEFAULT_TERMINATION_LOG)
    if not explicit and not (path.exists() and os.access(path, os.W_OK)):
        return
    data = " ".join(text.split()).encode("utf-8")[:_TERMINATION_MAX_BYTES].decode("utf-8", "ignore")
    try:
        path.write_text(data + "\n", encoding="utf-8")
    except OSError as e:
        log.warning("cannot write the termination message to %s: %s", path, e)


def failure_message(reason: str, code: int, message: str) -> str:
    return f"reranker-runtime build failed ({reason}, exit code {code}): {message}"


# ----------------------------------------------------------------------------------- the build


def _versions(extra: dict[str, str] | None = None) -> dict[str, str]:
    from reranker_runtime import __version__

    out = {"reranker-runtime": __version__}
    for dist in ("transformers", "tokenizers", "torch"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[dist] = metadata.version(dist)
    out.update(extra or {})
    return out


def check_driver() -> None:
    """Refuse (exit 14) a node whose NVIDIA driver is too old for this image's CUDA, naming both."""
    from reranker_runtime.engine_build.errors import GpuMismatchError
    from reranker_runtime.engines import cuda_driver

    problem = cuda_driver.driver_problem(
        cuda_driver.host_driver_version(), cuda_driver.image_cuda_version()
    )
    if problem:
        raise GpuMismatchError(problem)


def run_build(
    inputs: BuildInputs,
    output: str | Path,
    *,
    allow_classifier: bool = False,
    gpu_detector: Callable[[], GpuInfo | None] | None = None,
    env: dict[str, str] | None = None,
    pvc_mount: Path | None = None,
) -> BuildResult:
    """Do the build; raises BuildError subclasses with user-facing messages."""
    from reranker_runtime.engine_build import atomic
    from reranker_runtime.engine_build.checkpoint import (
        DEFAULT_PVC_MOUNT,
        copy_checkpoint,
        fetch_checkpoint,
        resolve_source,
        validate_checkpoint,
    )
    from reranker_runtime.engine_build.gpu import TRTLLM_ACCELERATORS, check_accelerator
    from reranker_runtime.engine_build.trtllm import (
        build_engine,
        check_quantization,
        check_trtllm_compatible,
        derive_profile,
    )
    from reranker_runtime.engines.gpu import detect_gpu
    from reranker_runtime.engines.manifest import (
        CHECKPOINT_SUBDIR,
        ENGINE_SUBDIR,
        BuildShapes,
        ModelInfo,
        write_manifest,
    )

    inputs = inputs.normalized()
    out = Path(output).expanduser().absolute()
    if inputs.max_num_tokens < 1:
        raise BuildArgumentError(f"--max-num-tokens must be >= 1, got {inputs.max_num_tokens}")
    if inputs.max_seq_len is not None and inputs.max_seq_len < 1:
        raise BuildArgumentError(f"--max-seq-len must be >= 1, got {inputs.max_seq_len}")
    # Refusals that need no download come first (fp8/fp4, CPU + quantization).
    dtype = check_quantization(inputs.quantization, inputs.accelerator)
    resolve_source(inputs.checkpoint_repo, inputs.source)
    is_gpu = inputs.accelerator != "CPU"
    # A TensorRT-LLM engine where TensorRT-LLM has kernels; elsewhere (CPU, T4) the checkpoint is
    # cached for the PyTorch engine (float16 on a GPU, float32 on CPU).
    use_trtllm = inputs.accelerator in TRTLLM_ACCELERATORS

    existing = atomic.existing_complete(out, inputs)
    if existing is not None:
        log.info("%s is already complete with the same inputs; nothing to do", out)
        return BuildResult("unchanged", out, existing)

    gpu = check_accelerator(inputs.accelerator, (gpu_detector or detect_gpu)()) if is_gpu else None
    if gpu is not None:
        log.info("building on %s (compute capability %s)", gpu.name, gpu.compute_capability)
    if use_trtllm:
        check_driver()

    with atomic.output_lock(out):
        atomic.clean_stale_temps(out)
        existing = atomic.existing_complete(
            out, inputs
        )  # another builder may have finished meanwhile
        if existing is not None:
            log.info("%s was completed by another build with the same inputs; nothing to do", out)
            return BuildResult("unchanged", out, existing)
        tmp = atomic.make_temp_dir(out)
        try:
            scratch = tmp / ".scratch"
            with progress(
                f"fetching {inputs.checkpoint_repo}@{inputs.revision or 'main'} ({inputs.source})"
            ):
                fetched = fetch_checkpoint(
                    inputs.checkpoint_repo,
                    inputs.revision,
                    inputs.source,
                    scratch,
                    env=env,
                    pvc_mount=pvc_mount or DEFAULT_PVC_MOUNT,
                )
            spec = validate_checkpoint(fetched.path, allow_classifier=allow_classifier)
            log.info(
                "checkpoint: %s (model_type %s, %d label(s), max %d tokens)",
                spec.architecture,
                spec.model_type,
                spec.num_labels,
                spec.max_input_length,
            )
            if use_trtllm:
                check_trtllm_compatible(spec)
            profile = derive_profile(
                inputs.max_num_tokens, spec.max_input_length, inputs.max_seq_len
            )
            with progress("copying tokenizer, config and weights"):
                copied = copy_checkpoint(fetched.path, tmp / CHECKPOINT_SUBDIR)
            log.info("cached %d checkpoint files: %s", len(copied), ", ".join(copied))
            extra_versions: dict[str, str] = {}
            if use_trtllm:
                with progress(
                    f"converting and building the TensorRT-LLM engine (B={profile.max_batch_size}, L={profile.max_input_len})"
                ):
                    extra_versions = build_engine(
                        tmp / CHECKPOINT_SUBDIR, tmp / ENGINE_SUBDIR, spec, profile, scratch
                    )
                shapes = BuildShapes(
                    dtype=dtype,
                    max_batch_size=profile.max_batch_size,
                    max_input_len=profile.max_input_len,
                )
            else:
                shapes = BuildShapes(
                    dtype=dtype, max_batch_size=None, max_input_len=profile.max_input_len
                )
            shutil.rmtree(scratch, ignore_errors=True)
            manifest = Manifest(
                engine="tensorrt-llm" if use_trtllm else "pytorch",
                inputs=inputs,
                resolved_revision=fetched.resolved_revision,
                model=ModelInfo(
                    architecture=spec.architecture,
                    model_type=spec.model_type,
                    num_labels=spec.num_labels,
                    max_input_length=spec.max_input_length,
                ),
                build=shapes,
                gpu=gpu,
                versions=_versions(extra_versions),
            )
            write_manifest(tmp, manifest)  # last: its presence means complete
            atomic.finalize(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    log.info("engine directory ready: %s (%s engine)", out, manifest.engine)
    return BuildResult("built", out, manifest)


def run_build_command(args: argparse.Namespace) -> int:
    setup_logging()
    try:
        inputs = BuildInputs(
            checkpoint_repo=args.checkpoint_repo,
            revision=args.revision,
            source=args.source,
            quantization=args.quantization,
            max_num_tokens=args.max_num_tokens,
            max_seq_len=args.max_seq_len,
            accelerator=args.accelerator,
        )
        result = run_build(
            inputs,
            args.output,
            allow_classifier=args.allow_classifier,
            pvc_mount=Path(args.checkpoint_mount),
        )
    except BuildError as e:
        msg = failure_message(e.reason, e.exit_code, e.message)
        log.error(msg)
        print(msg, file=sys.stderr, flush=True)
        write_termination_message(msg)
        return e.exit_code
    except Exception as e:  # a bug: still tell the operator what happened
        log.exception("build failed unexpectedly")
        msg = failure_message("InternalError", 1, f"{type(e).__name__}: {e}")
        print(msg, file=sys.stderr, flush=True)
        write_termination_message(msg)
        return 1
    write_termination_message(
        f"engine directory {result.output} {'built' if result.status == 'built' else 'already complete (no-op)'}: "
        f"{result.manifest.engine} engine for {inputs.checkpoint_repo}"
    )
    return 0
