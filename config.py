"""Service settings: every environment variable is read here, once, and validated.

The rest of the service receives a `Settings` object and never reads the
environment itself, so tests can build an app with any settings they like.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Mapping

logger = logging.getLogger(__name__)

DEFAULT_API_KEY = "abc123"
DEFAULT_EMBEDDING_MODEL = "all-MiniLM-L6-v2"


class SettingsError(ValueError):
    """A setting in the environment has a value the service cannot run with."""


@dataclass(frozen=True)
class Settings:
    api_keys: tuple[str, ...] = (DEFAULT_API_KEY,)
    port: int = 5001
    # Chunks (model inputs of at most max_seq_length tokens) per forward pass.
    max_batch_size: int = 8
    max_texts_per_batch: int = 100
    max_images_per_batch: int = 20
    max_image_size: int = 10 * 1024 * 1024
    # Pixels in one decoded image, checked from the file header before decoding: a small
    # file can declare a huge picture (a decompression bomb). 50 MP covers phone cameras.
    max_image_pixels: int = 50_000_000
    # Characters in one text; bounds the time one text can take.
    max_text_length: int = 20_000
    # Bytes in one request body; Flask rejects larger bodies before reading them.
    max_request_size: int = 32 * 1024 * 1024
    embedding_model: str = DEFAULT_EMBEDDING_MODEL
    tokenizer_model: str | None = None
    models_dir: str = "/models"
    allow_model_download: bool = False

    @property
    def uses_default_api_key(self) -> bool:
        return DEFAULT_API_KEY in self.api_keys


def _positive_int(environ: Mapping[str, str], name: str, default: int) -> int:
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name} must be a whole number, got {raw!r}") from None
    if value <= 0:
        raise SettingsError(f"{name} must be greater than zero, got {value}")
    return value


def _flag(environ: Mapping[str, str], name: str) -> bool:
    raw = environ.get(name, "").strip().lower()
    if raw in ("", "0", "false", "no", "off"):
        return False
    if raw in ("1", "true", "yes", "on"):
        return True
    raise SettingsError(f"{name} must be true or false, got {raw!r}")


def _api_keys(environ: Mapping[str, str]) -> tuple[str, ...]:
    raw = environ.get("VECTOR_EMBEDDER_API_KEY")
    if raw is None:
        return (DEFAULT_API_KEY,)
    # Several comma-separated keys let operators rotate keys without downtime.
    keys = tuple(key.strip() for key in raw.split(",") if key.strip())
    if not keys:
        raise SettingsError("VECTOR_EMBEDDER_API_KEY is set but holds no key")
    return keys


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Read and validate the service's settings from the environment."""
    environ = os.environ if environ is None else environ
    defaults = Settings()
    port = _positive_int(environ, "PORT", defaults.port)
    if port > 65535:
        raise SettingsError(f"PORT must be at most 65535, got {port}")
    return Settings(
        api_keys=_api_keys(environ),
        port=port,
        max_batch_size=_positive_int(environ, "MAX_BATCH_SIZE", defaults.max_batch_size),
        max_texts_per_batch=_positive_int(environ, "MAX_TEXTS_PER_BATCH", defaults.max_texts_per_batch),
        max_images_per_batch=_positive_int(environ, "MAX_IMAGES_PER_BATCH", defaults.max_images_per_batch),
        max_image_size=_positive_int(environ, "MAX_IMAGE_SIZE", defaults.max_image_size),
        max_image_pixels=_positive_int(environ, "MAX_IMAGE_PIXELS", defaults.max_image_pixels),
        max_text_length=_positive_int(environ, "MAX_TEXT_LENGTH", defaults.max_text_length),
        max_request_size=_positive_int(environ, "MAX_REQUEST_SIZE", defaults.max_request_size),
        embedding_model=environ.get("EMBEDDING_MODEL", "").strip() or defaults.embedding_model,
        tokenizer_model=environ.get("TOKENIZER_MODEL", "").strip() or None,
        models_dir=environ.get("MODELS_DIR", "").strip() or defaults.models_dir,
        allow_model_download=_flag(environ, "ALLOW_MODEL_DOWNLOAD"),
    )
