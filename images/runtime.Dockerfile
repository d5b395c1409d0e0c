# The reranker runtime image: ghcr.io/reranker-dev/reranker-runtime:<version> (`serve` and `build`).
# Build from the repository root (the operator's default runtime image is ...:0.1.0):
#   docker build -f images/runtime.Dockerfile -t ghcr.io/reranker-dev/reranker-runtime:0.1.0 .
# The context is trimmed by images/runtime.Dockerfile.dockerignore (BuildKit).
#
# Base: NVIDIA's TensorRT-LLM release image (CUDA, TensorRT, tensorrt_llm and the torch they were
# built with). An engine is tied to the TensorRT(-LLM) version that built it, and the build Job and
# the serving pods both run this image, so bumping the tag means rebuilding engines (the operator
# keys its cache by the runtime image).
#
# 1.0.0 is the newest TensorRT-LLM release on CUDA 12 (12.9.1, TensorRT 10.11; NVIDIA's Triton
# compatibility matrix). CUDA 12.x runs on host drivers >= 525.60.13 through minor-version
# compatibility, i.e. on the R535-R570 drivers GKE and EKS GPU node pools ship by default.
# Releases 1.1+ are CUDA 13 and need driver >= 580 on every node: `serve` and `build` refuse a
# too-old driver at start, naming both versions (engines/cuda_driver.py). docs/engines.md.
ARG TRTLLM_IMAGE=nvcr.io/nvidia/tensorrt-llm/release:1.0.0
FROM ${TRTLLM_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

COPY pyproject.toml README.md /src/
COPY operator/ /src/operator/
COPY runtime/ /src/runtime/

# The `runtime` extra pins the CPU CI's torch; the image's CUDA torch must stay. So: the package
# without dependencies, then the extra's other requirements, constrained to the versions the image
# already has (pip fails the build rather than replace torch, TensorRT or TensorRT-LLM's pins).
# gRPC's health and reflection packages need protobuf >= 5.26.1: a base image with an older one
# fails this step (rather than have pip replace TensorRT-LLM's protobuf).
# Object-store sources need boto3 / google-cloud-storage / azure-storage-blob (or their CLIs):
# add them here if you use S3, GCS or AZURE checkpoints.
RUN (pip list --format=freeze \
      | grep -iE '^(torch|tensorrt|tensorrt[-_]llm|numpy|transformers|tokenizers|safetensors|huggingface[-_]hub|pydantic|fastapi|uvicorn|protobuf|grpcio)==' \
      || true) > /tmp/image-pins.txt \
 && grep -qi '^torch==' /tmp/image-pins.txt \
 && pip install --no-deps /src \
 && pip install -c /tmp/image-pins.txt \
      "transformers>=4.45" "tokenizers>=0.19" "safetensors>=0.4" "huggingface_hub>=0.23" \
      "fastapi>=0.110" "uvicorn>=0.29" "h11>=0.14" "pydantic>=2.6" "prometheus-client>=0.20" \
      "httpx>=0.27" "numpy>=1.26" "pyyaml>=6" "fastapi-offline==1.7.7" \
      "opentelemetry-api>=1.25" "opentelemetry-sdk>=1.25" "opentelemetry-exporter-otlp-proto-grpc>=1.25" \
      "grpcio>=1.63" "protobuf>=5.26.1" "grpcio-health-checking>=1.63" "grpcio-reflection>=1.63" \
 && reranker-runtime build --help > /dev/null \
 && python -c "import opentelemetry.sdk.trace, opentelemetry.exporter.otlp.proto.grpc.trace_exporter, reranker_runtime.grpc_api.server" \
 && rm -rf /src /tmp/image-pins.txt \
 && groupadd --gid 10001 reranker \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin reranker

# jemalloc serves every allocation: glibc's malloc keeps the memory of freed activations of
# every shape it has seen, so a pod's memory kept growing (0.5 to 1 GB in 5 minutes of varied
# requests on a small model); jemalloc returns it by itself at the same throughput
# (runtime/reranker_runtime/allocator.py, docs/benchmarks.md). `serve` logs the allocator it
# finds. It applies to `reranker-runtime build` too (the engine build Job and init container);
# only serving was measured. To go back to glibc's malloc (which `serve` then trims every 5 s),
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
