"""The service's settings, read from the environment by config.load_settings: documented defaults, values read,
and a bad value refused before anything starts, with the variable named."""
from __future__ import annotations

import logging
import re

import pytest

import config
from config import SettingsError, load_settings


# --- defaults ------------------------------------------------------------------------

def test_settings_defaults_are_the_documented_ones():
    settings = load_settings({})
    assert settings.api_keys == ("abc123",) and settings.uses_default_api_key
    assert (settings.port, settings.max_batch_size, settings.max_texts_per_batch) == (5001, 32, 100)
    assert (settings.max_images_per_batch, settings.max_image_size) == (20, 10485760)
    assert settings.embedding_model == "all-MiniLM-L6-v2" and settings.tokenizer_model is None
    assert settings.allow_model_download is False
    assert (settings.engine, settings.engine_precision) == ("auto", "auto")


def test_token_limits_have_their_documented_defaults():
    settings = load_settings({})
    assert (settings.max_tokens_per_text, settings.max_tokens_per_request) == (8192, 32768)
    assert (settings.max_text_length, settings.queue_max_tokens) == (262_144, 65_536)


def test_queue_deadline_and_body_settings_have_their_documented_defaults():
    settings = load_settings({})
    assert settings.queue_max_tokens == 65536 and settings.request_timeout_seconds == 60
    assert settings.max_request_bytes_in_flight == settings.max_request_size == 32 * 1024 * 1024


def test_image_pixels_have_their_documented_default():
    assert load_settings({}).max_image_pixels == 50_000_000


def test_one_worker_on_every_core_unless_torch_serves(monkeypatch):
    monkeypatch.setattr(config, "available_cpus", lambda: 4)
    exported = load_settings({})
    assert (exported.workers, exported.engine_threads) == (1, 4)
    torch_settings = load_settings({"ENGINE": "torch"})
    assert (torch_settings.workers, torch_settings.engine_threads) == (2, 2)
    assert load_settings({"WORKERS": "2"}).engine_threads == 2
    # TORCH_NUM_THREADS is the older name of the thread count; ENGINE_THREADS wins over it.
    assert load_settings({"TORCH_NUM_THREADS": "3"}).engine_threads == 3
    assert load_settings({"TORCH_NUM_THREADS": "3", "ENGINE_THREADS": "1"}).engine_threads == 1
    assert load_settings({"ENGINE": "TORCH", "ENGINE_PRECISION": "F32"}).engine_precision == "f32"


# --- values read ---------------------------------------------------------------------

def test_settings_are_read_from_the_environment():
    settings = load_settings({"VECTOR_EMBEDDER_API_KEY": "new, old", "PORT": "8080", "MAX_BATCH_SIZE": "16",
                              "EMBEDDING_MODEL": "clip-ViT-B-32", "TOKENIZER_MODEL": "",
                              "ALLOW_MODEL_DOWNLOAD": "true", "MAX_IMAGE_PIXELS": "1000",
                              "REQUEST_TIMEOUT_SECONDS": "2.5"})
    assert settings.api_keys == ("new", "old") and not settings.uses_default_api_key
    assert (settings.port, settings.max_batch_size) == (8080, 16)
    assert settings.embedding_model == "clip-ViT-B-32" and settings.tokenizer_model is None
    assert settings.allow_model_download is True
    assert settings.max_image_pixels == 1000
    assert settings.request_timeout_seconds == 2.5


def test_smaller_token_limits_fit_together():
    settings = load_settings({"MAX_TOKENS_PER_TEXT": "500", "MAX_TOKENS_PER_REQUEST": "1000",
                              "QUEUE_MAX_TOKENS": "1000"})
    assert (settings.max_tokens_per_text, settings.max_tokens_per_request, settings.queue_max_tokens) == (
        500, 1000, 1000)


# --- bad values ------------------------------------------------------------------------

@pytest.mark.parametrize("name, value", [
    ("PORT", "http"), ("PORT", "70000"), ("VECTOR_EMBEDDER_API_KEY", " , "), ("ALLOW_MODEL_DOWNLOAD", "maybe"),
    ("ENGINE", "onnxruntime"), ("ENGINE_PRECISION", "int4"), ("ENGINE_THREADS", "0"),
    ("MAX_BATCH_SIZE", "0"), ("MAX_TEXTS_PER_BATCH", "-5"), ("MAX_TEXTS_PER_BATCH", "lots"),
    ("MAX_TEXT_LENGTH", "ten"), ("MAX_IMAGE_SIZE", "1.5"), ("MAX_IMAGE_PIXELS", "lots"),
    ("MAX_TOKENS_PER_TEXT", "0"), ("MAX_TOKENS_PER_REQUEST", "many"), ("QUEUE_MAX_TOKENS", "0"),
    ("BATCHING", "sometimes"), ("MAX_WINDOW_TOKENS", "8"), ("REQUEST_TIMEOUT_SECONDS", "soon"),
    ("REQUEST_TIMEOUT_SECONDS", "0"),
    ("REQUEST_TIMEOUT_SECONDS", "inf"), ("MAX_REQUEST_BYTES_IN_FLIGHT", "-1"),
])
def test_a_bad_setting_names_the_variable(name, value):
    with pytest.raises(SettingsError) as refused:
        load_settings({name: value})
    # The message starts with the variable, so the operator knows which line of the environment to fix.
    assert str(refused.value).startswith(f"{name} "), str(refused.value)


@pytest.mark.parametrize("environ, words", [
    ({"MAX_TOKENS_PER_TEXT": "40000"}, "MAX_TOKENS_PER_TEXT must be at most MAX_TOKENS_PER_REQUEST (32768)"),
    ({"QUEUE_MAX_TOKENS": "10000"}, "MAX_TOKENS_PER_REQUEST must be at most QUEUE_MAX_TOKENS (10000)"),
    ({"MAX_REQUEST_SIZE": "2000", "MAX_REQUEST_BYTES_IN_FLIGHT": "1000"},
     "MAX_REQUEST_BYTES_IN_FLIGHT must be at least MAX_REQUEST_SIZE (2000)"),
])
def test_limits_that_could_never_be_met_stop_start_up(environ, words):
    with pytest.raises(SettingsError, match=re.escape(words)):
        load_settings(environ)


def test_the_retired_queue_max_is_named_in_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="config"):
        load_settings({"QUEUE_MAX": "4"})
    assert "QUEUE_MAX is no longer read" in caplog.text and "QUEUE_MAX_TOKENS" in caplog.text


def test_the_retired_batch_wait_is_named_in_a_warning_that_says_how_to_turn_batching_off(caplog):
    with caplog.at_level(logging.WARNING, logger="config"):
        settings = load_settings({"BATCH_WAIT_MS": "0"})
    assert "BATCH_WAIT_MS is no longer read" in caplog.text and "BATCHING=off" in caplog.text
    assert settings.batching is True
    assert load_settings({"BATCHING": "off"}).batching is False and load_settings({"BATCHING": "ON"}).batching


def test_the_window_is_capped_at_4096_tokens_unless_set():
    assert load_settings({}).max_window_tokens == 4096
    assert load_settings({"MAX_WINDOW_TOKENS": "8192"}).max_window_tokens == 8192


@pytest.mark.skipif(config.Path("/models").is_dir(), reason="this machine has the image's /models folder")
def test_a_checkout_without_models_dir_or_the_images_folder_looks_in_its_own(tmp_path, monkeypatch, caplog):
    # As `make run` leaves it: gunicorn started by hand in the checkout then finds what make run exported.
    monkeypatch.chdir(tmp_path)
    with caplog.at_level(logging.INFO, logger="config"):
        assert load_settings({}).models_dir == str(tmp_path / "models")
    assert f"MODELS_DIR is unset and /models does not exist: looking for models in {tmp_path / 'models'}" in caplog.text
    assert load_settings({"MODELS_DIR": "/srv/models"}).models_dir == "/srv/models"
