# The CPU runtime image: ghcr.io/reranker-dev/reranker-runtime-cpu:<version> (`serve` and `build`
# for Rerankers with accelerator.type CPU). Build from the repository root:
#   docker build -f images/runtime-cpu.Dockerfile -t ghcr.io/reranker-dev/reranker-runtime-cpu:0.1.0 .
# The context is trimmed by images/runtime-cpu.Dockerfile.dockerignore (BuildKit).
#
# Why a second image: the GPU image (images/runtime.Dockerfile) starts from NVIDIA's TensorRT-LLM
# image, tens of GB of CUDA, TensorRT and a CUDA torch that a CPU pod never uses. This one is slim
# Python, PyTorch's CPU build and the runtime (about 1-1.5 GB), and runs the packed PyTorch engine,
# what `--engine auto` picks on CPU anyway. The operator runs it for accelerator.type CPU
# (operator config runtimeImageCPU, chart value runtimeImageCPU).
ARG PYTHON_IMAGE=python:3.12-slim-bookworm
FROM ${PYTHON_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

COPY pyproject.toml README.md /src/
COPY operator/ /src/operator/
COPY runtime/ /src/runtime/

# PyTorch first, from PyTorch's CPU index and at the version pyproject.toml pins (read from it,
# so the two cannot drift): from PyPI the same pin is the CUDA build on x86_64, 2.5 GB of
# nvidia-* wheels. Then the package with its `runtime` extra, which finds the pin satisfied and
# keeps the CPU build; the check after it fails the build if anything swapped it for CUDA.
RUN torch_pin="$(grep -oE '"torch==[^"]+"' /src/pyproject.toml | tr -d '"')" \
 && test -n "$torch_pin" \
 && pip install --index-url https://download.pytorch.org/whl/cpu "$torch_pin" \
 && pip install "/src[runtime]" \
 && python -c "import torch, sys; sys.exit('not the CPU build of torch: CUDA ' + str(torch.version.cuda)) if torch.version.cuda else None" \
 && reranker-runtime serve --help > /dev/null \
 && python -c "import opentelemetry.sdk.trace, opentelemetry.exporter.otlp.proto.grpc.trace_exporter, reranker_runtime.grpc_api.server" \
 && rm -rf /src \
 && groupadd --gid 10001 reranker \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin reranker

# jemalloc serves every allocation, as in the GPU image (see there, and allocator.py): glibc's
# malloc keeps the memory of freed activations of every shape it has seen. To go back to it,
# set LD_PRELOAD to an empty value in the pod (Reranker spec.runtime.env).
RUN apt-get update \
 && apt-get install -y --no-install-recommends libjemalloc2 \
 && rm -rf /var/lib/apt/lists/* \
 && ln -s "$(dpkg -L libjemalloc2 | grep '/libjemalloc\.so\.2$')" /usr/local/lib/libjemalloc.so.2 \
 && test -e /usr/local/lib/libjemalloc.so.2
ENV LD_PRELOAD=/usr/local/lib/libjemalloc.so.2

# Read-only root filesystem in the pods: everything writable lives under /tmp (an emptyDir).
# The build Job overrides HF_HOME to the engine-cache volume.
ENV HOME=/tmp \
    HF_HOME=/tmp/hf-home \
    RERANKER_LOG_FORMAT=json

# Numeric user, so the kubelet can verify runAsNonRoot.
USER 10001:10001
WORKDIR /tmp
EXPOSE 8080 50051
ENTRYPOINT ["reranker-runtime"]
CMD ["serve"]
