"""The engine key: a hash of everything a prepared engine depends on, and nothing else.

Two Rerankers (or two generations of one) with the same key can serve the same engine directory
(`/engines/<key>`); a change of key means a new build. Replicas, resources and runtime limits
are deliberately left out: they change how the engine is served, not the engine.
"""

from __future__ import annotations

import hashlib
import json

from reranker_operator.spec import RerankerSpec

# Bump when the meaning of the inputs changes (e.g. a new build flag with a default).
ENGINE_KEY_VERSION = 1


def engine_inputs(spec: RerankerSpec, runtime_image: str) -> dict[str, object]:
    """The canonical engine inputs: what `reranker-runtime build` receives as flags, and the GPU
    slice it builds on when one is set."""
    inputs: dict[str, object] = {
        "version": ENGINE_KEY_VERSION,
        "checkpoint_repo": spec.checkpoint.repo,
        "revision": spec.checkpoint.revision,
        "source": spec.checkpoint.source,
        "quantization": spec.build.quantization,
        "max_num_tokens": spec.build.max_num_tokens,
        "max_seq_len": spec.build.max_seq_len,
        "accelerator": spec.accelerator.type,
        "runtime_image": runtime_image,
    }
    # A GPU slice (accelerator.resourceName) builds an engine of its own: the runtime serves an
    # engine only on a GPU of the very name it was built on, and a MIG slice's name is not the
    # whole GPU's. Added only when set, so the keys of every other Reranker stay as they were.
    if spec.accelerator.resource_name is not None:
        inputs["resource_name"] = spec.accelerator.resource_name
    return inputs


def engine_key(spec: RerankerSpec, runtime_image: str) -> str:
    """sha256 hex (64 chars) of the canonical JSON of `engine_inputs`."""
    canonical = json.dumps(
        engine_inputs(spec, runtime_image), sort_keys=True, separators=(",", ":")
    )
    return hashlib.sha256(canonical.encode()).hexdigest()
