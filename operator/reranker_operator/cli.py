"""`reranker-operator`: run | render | convert. Thin dispatch; each subcommand lives in its module."""

from __future__ import annotations

import argparse
import sys

from reranker_operator import __version__


def build_parser() -> argparse.ArgumentParser:
    from reranker_operator.convert import add_convert_parser
    from reranker_operator.render import add_render_parser
    from reranker_operator.runner import add_run_parser

    parser = argparse.ArgumentParser(
        prog="reranker-operator",
        description="Kubernetes operator for Reranker resources (reranker.dev/v1alpha1).",
    )
    parser.add_argument("--version", action="version", version=f"reranker-operator {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{run,render,convert}")
    add_run_parser(sub)
    add_render_parser(sub)
    add_convert_parser(sub)
    # Options match by their whole name only: with prefix matching, an abbreviated flag in a
    # pod's args would stop working, or change meaning, the day a flag sharing its prefix is added.
    for subcommand in sub.choices.values():
        subcommand.allow_abbrev = False
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        parser = build_parser()
    except ModuleNotFoundError as exc:
        # The command is installed with any extra; kopf and kubernetes come with `operator`.
        print(
            f"reranker-operator: the Python package {exc.name!r} is missing; install the "
            "operator extra: pip install 'reranker-stack[operator]'",
            file=sys.stderr,
        )
        return 2
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
