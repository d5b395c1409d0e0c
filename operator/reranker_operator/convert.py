"""`reranker-operator convert config.yaml`: a BEI/Truss config.yaml -> a Reranker manifest.

Mapping (everything else in the Truss file is about Truss packaging and is dropped):

  model_name                                  -> metadata.name (DNS-1035-sanitised; or --name)
  trt_llm.build.checkpoint_repository         -> spec.checkpoint {repo, revision, source}
  trt_llm.build.quantization_type             -> spec.build.quantization (absent -> no_quant)
  trt_llm.build.max_num_tokens                -> spec.build.maxNumTokens (rounded up to x64)
  trt_llm.build.max_seq_len                   -> spec.build.maxSeqLen; BEI's 1000001 sentinel
                                                 ("the model's maximum") -> omitted, which means
                                                 the same here
  resources.accelerator ("L4", "H100:2", ...) -> spec.accelerator {type, count}; no GPU -> CPU
  resources.cpu / resources.memory            -> spec.resources (kept as written; a note warns
                                                 when the memory cannot fit the accelerator's
                                                 smallest common node)
  secrets (e.g. hf_access_token)              -> spec.checkpoint.secretName (<name>-checkpoint)
  environment_variables                       -> spec.runtime.env

Notes on what was changed are written as comments at the top of the output.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

import yaml

from reranker_operator.spec import (
    API_GROUP,
    API_VERSION,
    DEFAULT_MEMORY,
    KIND,
    RESERVED_ENV,
    InvalidSpec,
    parse_spec,
)

# BEI's max_seq_len value meaning "as long as the model allows".
BEI_MODEL_MAX_SENTINEL = 1000001
_QUANTIZATION = {
    "no_quant": "no_quant",
    "fp8": "fp8",
    "fp8_kv": "fp8",  # KV-cache quantisation means nothing for an encoder: plain fp8
    "fp4": "fp4",
    "fp4_kv": "fp4",
    "fp4_mlp_only": "fp4",
}
# Truss accelerator names -> Reranker accelerator types (MIG slices map to their GPU model).
_ACCELERATORS = {
    "L4": "L4",
    "A10G": "A10G",
    "A100": "A100",
    "A100_40GB": "A100",
    "H100": "H100",
    "H100_40GB": "H100",
    "H200": "H200",
    "T4": "T4",
}
_ENCODER_BASE_MODELS = {"encoder", "encoder_bert"}
# Allocatable memory (GiB, approximate, before daemonsets) of the smallest common node with each
# accelerator, and its name: a pod requesting more never schedules there.
SMALLEST_NODES: dict[str, tuple[float, str]] = {
    "L4": (13.0, "GKE g2-standard-4 (~13 GiB allocatable; EKS g6.xlarge ~14.5 GiB)"),
    "A10G": (14.5, "EKS g5.xlarge (~14.5 GiB allocatable)"),
    "T4": (12.0, "GKE n1-standard-4 + T4 (~12 GiB allocatable; EKS g4dn.xlarge ~14.5 GiB)"),
    "A100": (78.0, "GKE a2-highgpu-1g (~78 GiB allocatable)"),
    "H100": (200.0, "a single-H100 node (GKE a3-highgpu-1g, EKS p5.4xlarge; ~200 GiB)"),
    "H200": (1900.0, "an 8-GPU H200 node (GKE a3-ultragpu-8g, EKS p5en.48xlarge)"),
}
_BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_DECIMAL = {"k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18, "m": 1e-3, "": 1}


def quantity_bytes(quantity: str) -> float | None:
    """A Kubernetes memory quantity in bytes (`15Gi`, `16G`, `1e9`), or None if unparsable."""
    match = re.fullmatch(r"([0-9.]+(?:[eE][0-9]+)?)([KMGTPE]i|[kMGTPEm]?)", quantity.strip())
    if match is None:
        return None
    number, suffix = match.groups()
    try:
        return float(number) * (_BINARY.get(suffix) or _DECIMAL[suffix])
    except ValueError:
        return None


def _memory_fit_note(accelerator: str, memory: str) -> str | None:
    """A warning when `memory` (request = limit) cannot fit the accelerator's smallest node."""
    smallest = SMALLEST_NODES.get(accelerator)
    requested = quantity_bytes(memory)
    if smallest is None or requested is None or requested <= smallest[0] * 2**30:
        return None
    return (
        f"WARNING: resources.memory {memory} (kept from the Truss config) is more than "
        f"{smallest[1]} can give a pod: pods will stay Pending (Unschedulable) on such nodes. "
        f"Lower it (the Reranker default, {DEFAULT_MEMORY}, holds models up to ~1B parameters) "
        "or use larger nodes"
    )


class ConvertError(ValueError):
    pass


def sanitize_name(raw: str) -> str:
    """A DNS-1035 label (lowercase, [a-z0-9-], starting with a letter, <= 63 chars)."""
    name = re.sub(r"[^a-z0-9-]+", "-", raw.lower())
    name = re.sub(r"-{2,}", "-", name)
    name = re.sub(r"^[^a-z]+", "", name)  # must start with a letter
    return name[:63].rstrip("-")


def _accelerator(resources: dict[str, Any], notes: list[str]) -> dict[str, Any]:
    raw = resources.get("accelerator")
    if not raw or resources.get("use_gpu") is False:
        notes.append("no GPU accelerator in resources: accelerator.type CPU")
        return {"type": "CPU"}
    kind, _, count = str(raw).partition(":")
    accel = _ACCELERATORS.get(kind.strip().upper())
    if accel is None:
        raise ConvertError(
            f"resources.accelerator {raw!r} has no Reranker accelerator type (supported: {', '.join(sorted(_ACCELERATORS))})"
        )
    if kind.strip().upper() != accel:
        notes.append(
            f"resources.accelerator {kind} (a MIG slice) mapped to accelerator.type {accel}"
        )
    out: dict[str, Any] = {"type": accel}
    if count:
        try:
            gpus = int(count)
        except ValueError:
            raise ConvertError(f"resources.accelerator {raw!r}: count is not an integer") from None
        if gpus != 1:
            notes.append(
                f"resources.accelerator {raw}: {gpus} GPUs per pod mapped to 1 (an engine runs on "
                f"one GPU); for the same capacity, set replicas: {gpus}"
            )
    return out


def _build(build: dict[str, Any], notes: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    quant = str(build.get("quantization_type") or "no_quant").lower()
    if quant not in _QUANTIZATION:
        raise ConvertError(
            f"trt_llm.build.quantization_type {quant!r} is not supported (no_quant, fp8, fp4)"
        )
    if _QUANTIZATION[quant] != quant:
        notes.append(f"quantization_type {quant} mapped to {_QUANTIZATION[quant]}")
    out["quantization"] = _QUANTIZATION[quant]
    max_tokens = build.get("max_num_tokens")
    if max_tokens is not None:
        max_tokens = int(max_tokens)
        rounded = -(-max_tokens // 64) * 64
        if rounded != max_tokens:
            notes.append(f"max_num_tokens {max_tokens} rounded up to a multiple of 64: {rounded}")
        out["maxNumTokens"] = rounded
    seq = build.get("max_seq_len")
    if seq is not None:
        seq = int(seq)
        budget = out.get("maxNumTokens", 16384)
        if seq >= BEI_MODEL_MAX_SENTINEL:
            notes.append(
                f"max_seq_len {seq} is BEI's 'model maximum' sentinel: maxSeqLen omitted, which means the "
                "model's own maximum (e.g. 512 for XLM-RoBERTa)"
            )
        elif seq > budget:
            notes.append(f"max_seq_len {seq} exceeds maxNumTokens {budget}: capped to {budget}")
            out["maxSeqLen"] = budget
        else:
            out["maxSeqLen"] = seq
    return out


def convert_config(
    config: dict[str, Any], name: str | None = None, namespace: str | None = None
) -> tuple[dict[str, Any], list[str]]:
    """Convert a parsed Truss config.yaml; returns (Reranker manifest, notes). Raises ConvertError."""
    if not isinstance(config, dict):
        raise ConvertError("config.yaml must be a YAML mapping")
    notes: list[str] = []
    trt = config.get("trt_llm") or {}
    build = trt.get("build") or {}
    ckpt = build.get("checkpoint_repository") or {}
    if not ckpt.get("repo"):
        raise ConvertError(
            "trt_llm.build.checkpoint_repository.repo is required (not a BEI config?)"
        )
    base = build.get("base_model")
    if base and str(base) not in _ENCODER_BASE_MODELS:
        notes.append(
            f"base_model {base!r} is not an encoder: a Reranker serves cross-encoders only"
        )

    model_name = config.get("model_name") or str(ckpt["repo"]).rsplit("/", 1)[-1]
    meta_name = sanitize_name(name or str(model_name))
    if not meta_name:
        raise ConvertError(f"cannot derive a Kubernetes name from {model_name!r}; pass --name")
    if meta_name != (name or model_name):
        notes.append(f"name {name or model_name!r} sanitised to {meta_name!r}")

    checkpoint: dict[str, Any] = {"repo": str(ckpt["repo"])}
    if ckpt.get("revision"):
        checkpoint["revision"] = str(ckpt["revision"])
    if ckpt.get("source"):
        checkpoint["source"] = str(ckpt["source"]).upper()
    if config.get("secrets"):
        checkpoint["secretName"] = f"{meta_name}-checkpoint"
        notes.append(
            f"secrets {sorted(config['secrets'])} -> checkpoint.secretName {meta_name}-checkpoint: create that "
            "Secret with the token as an environment variable (e.g. HF_TOKEN)"
        )

    resources_in = config.get("resources") or {}
    spec: dict[str, Any] = {
        "checkpoint": checkpoint,
        "build": _build(build, notes),
        "accelerator": _accelerator(resources_in, notes),
    }
    resources = {
        k: str(resources_in[k]) for k in ("cpu", "memory") if resources_in.get(k) is not None
    }
    if resources:
        spec["resources"] = resources
    fit = _memory_fit_note(spec["accelerator"]["type"], resources.get("memory", DEFAULT_MEMORY))
    if fit:
        notes.append(fit)
    env_in = config.get("environment_variables") or {}
    env = [
        {"name": str(k), "value": str(v)} for k, v in env_in.items() if str(k) not in RESERVED_ENV
    ]
    if len(env) != len(env_in):
        notes.append("environment_variables the operator sets itself were dropped")
    if env:
        spec["runtime"] = {"env": env}

    metadata: dict[str, Any] = {"name": meta_name}
    if namespace:
        metadata["namespace"] = namespace
    metadata["annotations"] = {f"{API_GROUP}/converted-from": f"truss:{model_name}"}
    manifest = {
        "apiVersion": f"{API_GROUP}/{API_VERSION}",
        "kind": KIND,
        "metadata": metadata,
        "spec": spec,
    }
    try:
        parse_spec(manifest)
    except InvalidSpec as exc:
        raise ConvertError(f"the converted Reranker would be refused: {exc}") from None
    return manifest, notes


def to_yaml(manifest: dict[str, Any], notes: list[str]) -> str:
    header = "".join(f"# note: {n}\n" for n in notes)
    return header + yaml.safe_dump(manifest, sort_keys=False, default_flow_style=False)


def _run(args: argparse.Namespace) -> int:
    try:
        text = sys.stdin.read() if args.config_yaml == "-" else Path(args.config_yaml).read_text()
        manifest, notes = convert_config(
            yaml.safe_load(text), name=args.name, namespace=args.namespace
        )
    except (ConvertError, OSError, yaml.YAMLError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for note in notes:
        if note.startswith("WARNING"):
            print(note, file=sys.stderr)
    sys.stdout.write(to_yaml(manifest, notes))
    return 0


def add_convert_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "convert",
        help="turn a BEI/Truss config.yaml into a Reranker manifest",
        description="Convert a Baseten BEI/Truss config.yaml into a Reranker (reranker.dev/v1alpha1).",
    )
    parser.add_argument("config_yaml", help="the Truss config.yaml ('-' for stdin)")
    parser.add_argument(
        "--name", default=None, help="metadata.name (default: model_name, sanitised)"
    )
    parser.add_argument(
        "-n", "--namespace", default=None, help="metadata.namespace (default: none)"
    )
    parser.set_defaults(func=_run)
    return parser
