"""`reranker-operator render -f reranker.yaml`: print the child manifests the operator would create.

For review and GitOps: the output is what the handlers apply for a fresh Reranker (Deployment
and Service; the cache PVC and the engine Job in Shared mode; a PDB / HPA / monitor where the
spec or config calls for them), minus owner references (a Reranker that does not exist yet has
no uid).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

from reranker_operator.builders import build_children
from reranker_operator.config import ConfigError, load_config
from reranker_operator.spec import API_GROUP, KIND, InvalidSpec, parse_spec


class RenderError(ValueError):
    pass


class _PlainDumper(yaml.SafeDumper):
    """Writes every object in full: builders share dicts (a Job's labels and its pod's), and YAML
    anchors/aliases (`&id001`, `*id001`) would make the output hard to review and diff."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def load_documents(path: str) -> list[dict[str, Any]]:
    """YAML documents of `path` (`-` for stdin), empty ones skipped."""
    text = sys.stdin.read() if path == "-" else Path(path).read_text()
    return [doc for doc in yaml.safe_load_all(text) if doc]


def render_reranker(
    obj: dict[str, Any], config: Any, namespace: str | None = None
) -> list[dict[str, Any]]:
    """The children of one Reranker object. Raises RenderError for anything but a valid Reranker."""
    if (
        not isinstance(obj, dict)
        or obj.get("kind") != KIND
        or not str(obj.get("apiVersion", "")).startswith(f"{API_GROUP}/")
    ):
        raise RenderError(f"not a {KIND} ({API_GROUP}) object: kind={obj.get('kind')!r}")
    meta = obj.get("metadata") or {}
    name = meta.get("name")
    if not name:
        raise RenderError("metadata.name is required")
    try:
        spec = parse_spec(obj)
    except InvalidSpec as exc:
        raise RenderError(f"{KIND} {name}: {exc}") from None
    ns = meta.get("namespace") or namespace or "default"
    return build_children(name, ns, spec, config)


def render_documents(docs: list[dict[str, Any]], config: Any, namespace: str | None = None) -> str:
    children: list[dict[str, Any]] = []
    for doc in docs:
        children.extend(render_reranker(doc, config, namespace))
    return yaml.dump_all(children, Dumper=_PlainDumper, sort_keys=False, default_flow_style=False)


def _run(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
        docs = load_documents(args.filename)
        if not docs:
            raise RenderError(f"{args.filename}: no YAML documents")
        out = render_documents(docs, config, args.namespace)
    except (RenderError, ConfigError, OSError, yaml.YAMLError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(out)
    return 0


def add_render_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "render",
        help="print the manifests the operator would create for a Reranker",
        description="Print the child manifests (Deployment, Service; PVC and engine Job in Shared "
        "mode; PDB/HPA/monitor) of each Reranker in a file as multi-document YAML.",
    )
    parser.add_argument(
        "-f", "--filename", required=True, help="Reranker manifest (YAML; '-' for stdin)"
    )
    parser.add_argument(
        "--config",
        default=None,
        help="operator config file (default: $RERANKER_OPERATOR_CONFIG, else built-in)",
    )
    parser.add_argument(
        "-n",
        "--namespace",
        default=None,
        help="namespace when the manifest sets none (default: default)",
    )
    parser.set_defaults(func=_run)
    return parser
