#!/usr/bin/env bash
# Download, here (where PyPI is reachable), the wheels the lent GPU machine lacks for the runtime,
# into .whl/ (git-ignored). That machine has PyTorch, transformers, tokenizers,
# sentence-transformers, httpx, h11, numpy, prometheus-client and pyyaml, but no FastAPI, uvicorn
# or pydantic, and no network (/work/.library/device/KINDS.md lists its packages). Its Python
# is 3.12. scripts/device-check.sh installs these before anything else.
#
#   scripts/device-wheels.sh            # then pass carry=[".whl"] to the device run
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
mkdir -p .whl
"${PYTHON:-python3}" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl \
    fastapi==0.165.0 starlette==1.10.0 uvicorn==0.54.0 pydantic==2.14.4 pydantic-core==2.50.5 \
    typing-inspection==0.4.5 annotated-types==0.8.0 annotated-doc==0.0.7 opentelemetry-api==1.45.2 \
    fastapi-offline==1.7.7 \
    typing-extensions==4.16.0  # pydantic 2.14 needs >= 4.16; the machine's version is unknown
ls -1 .whl
