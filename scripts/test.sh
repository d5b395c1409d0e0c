#!/usr/bin/env bash
# Runs the whole test suite in a local virtual environment (.venv), installing what it needs.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
# torch==2.13.0 is pinned in pyproject.toml (a CPU wheel; no CUDA packages are pulled).
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
set +e
.venv/bin/python -m pytest "$@"
rc=$?
set -e
# Exit code 5 means pytest collected no tests: treat it as a failure of the suite's setup.
exit $rc
