#!/usr/bin/env bash
# Runs the whole test suite in a local virtual environment (.venv), installing what it needs.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
# torch==2.13.0 is pinned in pyproject.toml. On the project's CI machines pip finds a local
# CPU-only wheel of it; on an ordinary Linux x86_64 machine the same pin pulls PyPI's CUDA build
# (about 2.5 GB of nvidia-* wheels) unless the CPU build is installed into .venv first (README).
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
# Lint, format and types first: seconds each, and they name the line to fix.
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
# pytest's exit code passes through; 5 (no tests collected) fails CI on purpose, since the
# suite always has tests and collecting none means something is broken.
exec .venv/bin/python -m pytest "$@"
