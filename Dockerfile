# syntax=docker/dockerfile:1
# The vector embedder as a container: the model baked and exported at build time,
# served by OpenVINO (no torch in the image), gunicorn on $PORT as an unprivileged
# user, no network use at run time.
#
#   docker build -t vector-embedder .
#   docker build --build-arg EMBEDDING_MODEL=clip-ViT-L-14 --build-arg TOKENIZER_MODEL= -t vector-embedder:clip .
#   docker build --build-arg ENGINE=torch -t vector-embedder:torch .     (a model OpenVINO cannot serve)
#   docker build --build-arg ENGINE_PRECISION=int8 -t vector-embedder:int8 .   (int8 weights, made with NNCF)
#   docker run -p 5001:5001 -e VECTOR_EMBEDDER_API_KEY=change-me vector-embedder

# The base image is an argument so a build without registry access can use a
# local stand-in with the same layout (scripts/container_check.sh).
ARG PYTHON_IMAGE=python:3.11-slim
# auto: serve the OpenVINO export (the image carries no torch); torch: serve with PyTorch.
ARG ENGINE=auto
# auto: the fastest precision that passes the self-check; f32; int8: int8 weights, quantized at build time.
ARG ENGINE_PRECISION=auto

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
COPY requirements.txt requirements-serve.txt scripts/install_packages.sh ./
RUN sh install_packages.sh all

FROM builder AS models
# Upstream's documented default model; any sentence-transformers model name,
# hub id or folder works, e.g. all-MiniLM-L6-v2, all-mpnet-base-v2,
# paraphrase-multilingual-MiniLM-L12-v2, or clip-ViT-L-14 with TOKENIZER_MODEL empty.
# hadolint reads TOKEN in these names as a secret (DL3064); they are model names.
# hadolint ignore=DL3064
ARG EMBEDDING_MODEL=multi-qa-MiniLM-L6-cos-v1
# hadolint ignore=DL3064
ARG TOKENIZER_MODEL=sentence-transformers/multi-qa-MiniLM-L6-cos-v1
ARG ENGINE
ARG ENGINE_PRECISION
# hadolint ignore=DL3064
ENV MODELS_DIR=/models \
    EMBEDDING_MODEL=${EMBEDDING_MODEL} \
    TOKENIZER_MODEL=${TOKENIZER_MODEL} \
    ENGINE=${ENGINE} \
    ENGINE_PRECISION=${ENGINE_PRECISION}
WORKDIR /build
COPY config.py errors.py model_locator.py text_tokenizer.py embeddings.py image_embeddings.py manifest.py \
     self_check.py model_loading.py openvino_engine.py torch_engine.py model_export.py quantize.py \
     download_models.py ./
# Bake the model, export it for OpenVINO and prove the export against torch (not for ENGINE=torch);
# the runtime stage gets only what its engine serves: the export, or the sentence-transformers folder.
RUN python download_models.py \
 && mkdir /serve-models \
 && if [ "$ENGINE" = torch ]; then cp -a /models/. /serve-models/; else cp -a /models/*.openvino /serve-models/; fi

# The serving virtual environment: no torch, unless the torch engine is to serve.
FROM ${PYTHON_IMAGE} AS serve-venv
ARG ENGINE
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
WORKDIR /build
COPY wheels/ wheels/
COPY requirements.txt requirements-serve.txt scripts/install_packages.sh ./
RUN python3 -m venv /opt/venv \
 && if [ "$ENGINE" = torch ]; then sh install_packages.sh all; else sh install_packages.sh serve; fi

FROM ${PYTHON_IMAGE} AS runtime
# hadolint ignore=DL3064
ARG EMBEDDING_MODEL=multi-qa-MiniLM-L6-cos-v1
# hadolint ignore=DL3064
ARG TOKENIZER_MODEL=sentence-transformers/multi-qa-MiniLM-L6-cos-v1
ARG ENGINE
ARG ENGINE_PRECISION
# hadolint ignore=DL3064
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    MODELS_DIR=/models \
    EMBEDDING_MODEL=${EMBEDDING_MODEL} \
    TOKENIZER_MODEL=${TOKENIZER_MODEL} \
    ENGINE=${ENGINE} \
    ENGINE_PRECISION=${ENGINE_PRECISION} \
    PORT=5001
COPY --from=serve-venv /opt/venv /opt/venv
COPY --from=models /serve-models /models
WORKDIR /app
# The runtime modules only: no tests, benchmark, soak, exporter or test helpers.
COPY gunicorn.conf.py main.py http_common.py openai_api.py tei_api.py api_docs.py openapi_document.py \
     observability.py service.py batcher.py budget.py errors.py config.py worker_registry.py model_locator.py \
     model_loading.py manifest.py self_check.py text_tokenizer.py embeddings.py image_embeddings.py \
     openvino_engine.py torch_engine.py ./
# What the image carries, printed at the end of the build.
RUN du -sh /opt/venv /models /app && find /models -mindepth 1 -maxdepth 1 -printf 'baked model: %f\n'
# Any numeric user works: nothing in the image needs a home or a writable file.
USER 10001:10001
EXPOSE 5001
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(f\"http://127.0.0.1:{os.environ.get('PORT', '5001')}/health/ready\", timeout=4)"]
CMD ["gunicorn", "-c", "gunicorn.conf.py", "main:create_app()"]
