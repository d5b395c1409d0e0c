# The reranker operator image: ghcr.io/reranker-dev/reranker-operator:<version>.
# Build from the repository root (the chart's image.tag and the package version must match):
#   docker build -f images/operator.Dockerfile -t ghcr.io/reranker-dev/reranker-operator:0.1.0 .
# The context is trimmed by images/operator.Dockerfile.dockerignore (BuildKit).
FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Only what the package build needs. setuptools finds packages under runtime/ and operator/;
# the runtime package's dependencies (the `runtime` extra: torch, transformers, ...) are not installed.
COPY pyproject.toml README.md /src/
COPY operator/ /src/operator/
COPY runtime/ /src/runtime/
RUN pip install "/src[operator]" \
 && rm -rf /src \
 && groupadd --gid 10001 reranker \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin reranker

# Numeric user, so the kubelet can verify runAsNonRoot.
USER 10001:10001
WORKDIR /tmp
EXPOSE 8080 8081
ENTRYPOINT ["reranker-operator"]
CMD ["run"]
