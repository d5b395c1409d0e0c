"""`reranker-runtime`: serve | build | bench | gpu-check. Thin dispatch; each subcommand lives in its module."""

from __future__ import annotations

import argparse
import sys

from reranker_runtime import __version__


def build_parser() -> argparse.ArgumentParser:
    # Subcommand modules import heavy libraries (torch, transformers) lazily, inside their
    # handlers, so `--help` stays fast.
    from reranker_runtime.bench.command import add_bench_parser
    from reranker_runtime.engine_build.command import add_build_parser
    from reranker_runtime.gpucheck.command import add_gpu_check_parser
    from reranker_runtime.server import add_serve_parser

    parser = argparse.ArgumentParser(
        prog="reranker-runtime",
        description="BEI/TEI-compatible cross-encoder reranker server and engine builder.",
    )
    parser.add_argument("--version", action="version", version=f"reranker-runtime {__version__}")
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="{serve,build,bench,gpu-check}"
    )
    add_serve_parser(sub)
    add_build_parser(sub)
    add_bench_parser(sub)
    add_gpu_check_parser(sub)
    # Options match by their whole name only: with prefix matching, an abbreviated flag in a
    # pod's args would stop working, or change meaning, the day a flag sharing its prefix is added.
    for subcommand in sub.choices.values():
        subcommand.allow_abbrev = False
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
