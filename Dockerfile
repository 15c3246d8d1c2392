# syntax=docker/dockerfile:1
# The vector embedder as a container: CPU-only torch, the models baked in at
# build time, gunicorn serving on $PORT as an unprivileged user, no network use
# at run time.
#
#   docker build -t vector-embedder .
#   docker build --build-arg EMBEDDING_MODEL=clip-ViT-L-14 --build-arg TOKENIZER_MODEL= -t vector-embedder:clip .
#   docker run -p 5001:5001 -e VECTOR_EMBEDDER_API_KEY=change-me vector-embedder

# The base image is an argument so a build without registry access can use a
# local stand-in with the same layout (scripts/container_check.sh).
ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS builder
# The PyTorch index with CPU-only wheels: the image never carries CUDA libraries.
# Set it empty when wheels/ holds the torch wheel.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
RUN python3 -m venv /opt/venv
WORKDIR /build
COPY wheels/ wheels/
COPY requirements.txt .
# torch first and on its own, from the local wheels or the CPU index, so that
# `torch==2.13.0` in requirements.txt is already satisfied by the CPU build.
RUN set -eu; \
    if [ -z "$TORCH_INDEX_URL" ] && ! ls wheels/torch-2.13.0*.whl >/dev/null 2>&1; then \
        echo "TORCH_INDEX_URL is empty and wheels/ holds no torch 2.13.0 wheel" >&2; exit 1; \
    fi; \
    PIP_EXTRA_INDEX_URL="$TORCH_INDEX_URL" pip install --find-links wheels torch==2.13.0; \
    python -c "import torch, sys; sys.exit('torch is a CUDA build' if torch.version.cuda else 0)"; \
    pip install --find-links wheels -r requirements.txt

FROM builder AS models
# Upstream's documented default model; any sentence-transformers model name,
# hub id or folder works, e.g. all-MiniLM-L6-v2, all-mpnet-base-v2,
# paraphrase-multilingual-MiniLM-L12-v2, or clip-ViT-L-14 with TOKENIZER_MODEL empty.
# hadolint reads TOKEN in these names as a secret (DL3064); they are model names.
# hadolint ignore=DL3064
ARG EMBEDDING_MODEL=multi-qa-MiniLM-L6-cos-v1
# hadolint ignore=DL3064
ARG TOKENIZER_MODEL=sentence-transformers/multi-qa-MiniLM-L6-cos-v1
# hadolint ignore=DL3064
ENV MODELS_DIR=/models \
    EMBEDDING_MODEL=${EMBEDDING_MODEL} \
    TOKENIZER_MODEL=${TOKENIZER_MODEL}
WORKDIR /build
COPY config.py model_locator.py embeddings.py download_models.py ./
RUN python download_models.py

FROM ${PYTHON_IMAGE} AS runtime
# hadolint ignore=DL3064
ARG EMBEDDING_MODEL=multi-qa-MiniLM-L6-cos-v1
# hadolint ignore=DL3064
ARG TOKENIZER_MODEL=sentence-transformers/multi-qa-MiniLM-L6-cos-v1
# hadolint ignore=DL3064
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    MODELS_DIR=/models \
    EMBEDDING_MODEL=${EMBEDDING_MODEL} \
    TOKENIZER_MODEL=${TOKENIZER_MODEL} \
    PORT=5001
COPY --from=builder /opt/venv /opt/venv
COPY --from=models /models /models
WORKDIR /app
COPY *.py ./
# What the image carries, printed at the end of the build.
RUN du -sh /opt/venv /models /app && find /models -mindepth 1 -maxdepth 1 -printf 'baked model: %f\n'
# Any numeric user works: nothing in the image needs a home or a writable file.
USER 10001:10001
EXPOSE 5001
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(f\"http://127.0.0.1:{os.environ.get('PORT', '5001')}/health/ready\", timeout=4)"]
CMD ["gunicorn", "-c", "gunicorn.conf.py", "main:create_app()"]
