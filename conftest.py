"""Shared test fixtures: the real bundled model and real HTTP servers on loopback.

Fixtures only: the helpers the tests share are in testkit.py, which test modules import.

The bundled model (and the tiny CLIP of tiny_clip.py) are baked and exported into a
temporary MODELS_DIR once per test session by download_models.py's own functions, as
`make run` and the image build do; the services under test then serve those exports on
the default engine. `torch_service` serves the same model on the torch fallback engine,
and `reference_model` is the sentence-transformers model itself, for reference vectors.
"""
from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Iterator

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from config import Settings  # noqa: E402
from model_loading import LoadedModels, load_models  # noqa: E402
from service import EmbeddingService  # noqa: E402
from testkit import (PATIENCE, TEST_API_KEY, LiveServer, LogWatch, bake_and_export, running_service,  # noqa: E402
                     servers_on, watching_log)


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    """A MODELS_DIR holding the bundled model, baked and exported."""
    folder = tmp_path_factory.mktemp("models")
    bake_and_export(Settings(models_dir=str(folder)))
    return folder


# The deadline of a request for the model, in the services under test. The tests share a machine with other
# work, where a model call can take many times as long as it does in production: only the tests of the
# deadline itself set a short one.
TEST_REQUEST_TIMEOUT = PATIENCE


@pytest.fixture(scope="session")
def test_settings(models_dir) -> Settings:
    return Settings(api_keys=(TEST_API_KEY,), models_dir=str(models_dir), request_timeout_seconds=TEST_REQUEST_TIMEOUT)


@pytest.fixture(scope="session")
def reference_model():
    """The bundled sentence-transformers model on torch: what every engine's vectors are checked against."""
    from model_locator import locate_model
    from sentence_transformers import SentenceTransformer
    location = locate_model("all-MiniLM-L6-v2", "/nonexistent", allow_download=False)
    return SentenceTransformer(location.path, device="cpu")


@pytest.fixture(scope="session")
def loaded_models(test_settings) -> LoadedModels:
    """The bundled model, exported, self-checked and compiled once per test session."""
    return load_models(test_settings)


def serving_models(settings: Settings, models: LoadedModels) -> Iterator[EmbeddingService]:
    """A running service on models already loaded, for a fixture to yield; stopped afterwards."""
    with running_service(settings, lambda _: models) as service:
        yield service


@pytest.fixture(scope="session")
def loaded_service(test_settings, loaded_models) -> Iterator[EmbeddingService]:
    yield from serving_models(test_settings, loaded_models)


@pytest.fixture(scope="session")
def text_embedder(loaded_models):
    return loaded_models.text


@pytest.fixture(scope="session")
def torch_service(test_settings) -> EmbeddingService:
    """The bundled model on the torch fallback engine (ENGINE=torch)."""
    # The torch engine's own defaults on 2 cores: two workers of one thread each.
    with running_service(replace(test_settings, engine="torch", workers=2, engine_threads=1)) as service:
        yield service


@pytest.fixture(scope="session")
def server(test_settings, loaded_models) -> Iterator[LiveServer]:
    """A real server on loopback serving the bundled model."""
    with servers_on(test_settings, loaded_models) as start:
        yield start()


@pytest.fixture(scope="session")
def tiny_clip_settings(tmp_path_factory, models_dir) -> Settings:
    """Settings that serve the tiny random CLIP (tiny_clip.py), built, baked and exported once per test session."""
    from tiny_clip import write_tiny_clip
    folder = write_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))
    settings = Settings(api_keys=(TEST_API_KEY,), embedding_model=str(folder), models_dir=str(models_dir),
                        request_timeout_seconds=TEST_REQUEST_TIMEOUT)
    bake_and_export(settings)
    return settings


@pytest.fixture(scope="session")
def tiny_clip_model(tiny_clip_settings):
    """The tiny CLIP as a sentence-transformers model on torch, for reference vectors."""
    from sentence_transformers import SentenceTransformer
    return SentenceTransformer(tiny_clip_settings.embedding_model, device="cpu")


@pytest.fixture(scope="session")
def tiny_clip_models(tiny_clip_settings) -> LoadedModels:
    return load_models(tiny_clip_settings)


@pytest.fixture(scope="session")
def tiny_clip_service(tiny_clip_settings, tiny_clip_models) -> Iterator[EmbeddingService]:
    yield from serving_models(tiny_clip_settings, tiny_clip_models)


@pytest.fixture(scope="session")
def tiny_clip_server(tiny_clip_settings, tiny_clip_models) -> Iterator[LiveServer]:
    """A real server on loopback with text and image routes live (the tiny CLIP)."""
    with servers_on(tiny_clip_settings, tiny_clip_models) as start:
        yield start()


@pytest.fixture
def server_with(test_settings, loaded_models):
    """Start a server on the loaded model with some settings changed."""
    with servers_on(test_settings, loaded_models) as start:
        yield start


@pytest.fixture
def clip_server_with(tiny_clip_settings, tiny_clip_models):
    """Start a server on the tiny CLIP with some settings changed."""
    with servers_on(tiny_clip_settings, tiny_clip_models) as start:
        yield start


@pytest.fixture
def request_log() -> Iterator[LogWatch]:
    """The JSON request log of every app while the test runs: one record (a dict) per request answered."""
    with watching_log("embedder.requests", read=lambda record: json.loads(record.getMessage())) as log:
        yield log
