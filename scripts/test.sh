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
# Lint and format first: seconds, and they name the line to fix.
.venv/bin/ruff check .
.venv/bin/ruff format --check .
# mypy takes about 2 minutes without its cache (a fresh checkout, as in CI), and pytest keeps only
# one of CI's two cores busy: so mypy runs beside pytest, and its report follows pytest's.
mypy_log="$(mktemp)"
.venv/bin/mypy > "$mypy_log" 2>&1 &
mypy_pid=$!
# Ctrl-C (or a TERM) stops mypy too, instead of waiting for it or leaving it behind: a
# background job of a script ignores SIGINT itself.
trap 'rm -f "$mypy_log"' EXIT
trap 'kill "$mypy_pid" 2>/dev/null || true; exit 130' INT TERM
# pytest's exit code passes through; 5 (no tests collected) fails CI on purpose, since the
# suite always has tests and collecting none means something is broken.
pytest_rc=0
.venv/bin/python -m pytest "$@" || pytest_rc=$?
mypy_rc=0
wait "$mypy_pid" || mypy_rc=$?
echo "--- mypy"
cat "$mypy_log"
if [ "$mypy_rc" -ne 0 ]; then
  echo "mypy failed (exit $mypy_rc): see its report above" >&2
  exit "$mypy_rc"
fi
exit "$pytest_rc"
