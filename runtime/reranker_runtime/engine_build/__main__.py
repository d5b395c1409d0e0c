"""`python -m reranker_runtime.engine_build ...`: the build subcommand alone (same flags as
`reranker-runtime build`), usable where the console script is not on PATH."""

from __future__ import annotations

import argparse
import sys

from reranker_runtime.engine_build.command import add_build_parser


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reranker_runtime.engine_build")
    sub = parser.add_subparsers(dest="command", required=True)
    add_build_parser(sub)
    args = parser.parse_args(["build", *(sys.argv[1:] if argv is None else argv)])
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
