#!/usr/bin/env bash
# Runs the whole test suite in a local virtual environment (.venv), installing what it needs.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
# torch==2.13.0 is pinned in pyproject.toml (a CPU wheel; no CUDA packages are pulled).
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
# pytest's exit code passes through; 5 (no tests collected) fails CI on purpose, since the
# suite always has tests and collecting none means something is broken.
exec .venv/bin/python -m pytest "$@"
