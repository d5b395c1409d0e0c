"""Atomic engine directories: build next to --output, write manifest.json last, rename into place.

    <parent>/.<name>.lock          flock held for the whole build (one builder per output)
    <parent>/.<name>.tmp-<pid>-<r> the directory being built; renamed to <parent>/<name> when done

A killed build leaves only a `.tmp-` directory, never a `<name>` without manifest.json; the next
build (holding the lock, so no other builder is alive) deletes such leftovers first. A complete
`<name>` with the same inputs is a no-op; with different inputs it is refused, never overwritten.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

from reranker_runtime.engine_build.errors import OutputConflictError
from reranker_runtime.engines.manifest import (
    MANIFEST_NAME,
    BuildInputs,
    Manifest,
    ManifestError,
    read_manifest,
)

log = logging.getLogger(__name__)


def temp_prefix(output: Path) -> str:
    return f".{output.name}.tmp-"


def lock_path(output: Path) -> Path:
    return output.parent / f".{output.name}.lock"


def existing_complete(output: Path, inputs: BuildInputs) -> Manifest | None:
    """The manifest of a complete output built from the same inputs; None when there is nothing
    there (or an empty directory). Anything else at `output` is an OutputConflictError."""
    if not output.exists():
        return None
    if not output.is_dir():
        raise OutputConflictError(f"--output {output} exists and is not a directory")
    if (output / MANIFEST_NAME).exists():
        try:
            manifest = read_manifest(output)
        except ManifestError as e:
            raise OutputConflictError(
                f"--output {output} holds an unusable manifest ({e}); delete the directory to rebuild it"
            ) from e
        diff = manifest.inputs.differences(inputs)
        if diff:
            detail = "; ".join(
                f"{k}: existing {a!r}, requested {b!r}" for k, (a, b) in diff.items()
            )
            raise OutputConflictError(
                f"--output {output} already holds a complete engine built from different inputs ({detail}). "
                "An engine directory is keyed by its inputs: build into another --output, or delete this one."
            )
        return manifest
    if any(output.iterdir()):
        raise OutputConflictError(
            f"--output {output} exists, is not empty and has no manifest.json: it was not written by "
            "`reranker-runtime build` (which renames complete directories into place); refusing to overwrite it"
        )
    return None


@contextlib.contextmanager
def output_lock(output: Path) -> Iterator[None]:
    """Exclusive flock on `<parent>/.<name>.lock`; waits (with a log line) while another build runs."""
    import fcntl

    output.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path(output), os.O_CREAT | os.O_RDWR, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("another build of %s is running; waiting for it to finish", output)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def clean_stale_temps(output: Path) -> list[Path]:
    """Delete `.tmp-` directories of builds that died (call with the lock held)."""
    removed: list[Path] = []
    if not output.parent.is_dir():
        return removed
    for p in output.parent.iterdir():
        if p.name.startswith(temp_prefix(output)):
            log.info("removing %s, left by an interrupted build", p)
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def make_temp_dir(output: Path) -> Path:
    tmp = output.parent / f"{temp_prefix(output)}{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir(parents=True)
    return tmp


def make_readable(root: Path) -> None:
    """Directories 0755, files 0644: serving pods mount the cache read-only, maybe as another uid
    (copy2 keeps the HF cache's 0600 blobs otherwise)."""
    for dirpath, _dirnames, filenames in os.walk(root):
        os.chmod(dirpath, 0o755)
        for name in filenames:
            p = os.path.join(dirpath, name)
            if not os.path.islink(p):
                os.chmod(p, 0o644)


def finalize(tmp: Path, output: Path) -> None:
    """Rename the finished temp directory (manifest.json already in it) to `output`."""
    if not (tmp / MANIFEST_NAME).is_file():
        raise RuntimeError(f"refusing to publish {tmp}: it has no {MANIFEST_NAME}")
    make_readable(tmp)
    if output.exists():
        output.rmdir()  # only ever an empty directory here (existing_complete checked it)
    os.rename(tmp, output)
    _fsync_dir(output.parent)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
