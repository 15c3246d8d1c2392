"""Service settings: every environment variable is read here, once, and validated.

The rest of the service receives a `Settings` object and never reads the
environment itself, so tests can build an app with any settings they like.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, TypeVar

logger = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_API_KEY = "abc123"
DEFAULT_EMBEDDING_MODEL = "all-MiniLM-L6-v2"
# "auto" serves the model exported at build time on OpenVINO; "torch" serves the
# sentence-transformers model itself, for models that cannot be exported.
ENGINES = ("auto", "torch")
# "auto" takes the fastest precision the CPU supports that passes the start-up self-check; "int8" the
# model with int8 weights made at build time (quantize.py), falling back to "auto" when it fails its check.
ENGINE_PRECISIONS = ("auto", "f32", "int8")


# Where `make run` bakes and exports models in a checkout (the Makefile's MODELS_DIR).
LOCAL_MODELS_DIR = "models"
# A window holds a model's special tokens and some text: fewer tokens than this make no sense.
MIN_WINDOW_TOKENS = 16


class SettingsError(ValueError):
    """A setting in the environment has a value the service cannot run with."""


@dataclass(frozen=True)
class Settings:
    api_keys: tuple[str, ...] = (DEFAULT_API_KEY,)
    port: int = 5001
    # Windows (of at most max_seq_length tokens) per forward pass. Upstream used 8;
    # with requests batched together, 32 served 16 concurrent clients about 25% faster.
    max_batch_size: int = 32
    max_texts_per_batch: int = 100
    max_images_per_batch: int = 20
    max_image_size: int = 10 * 1024 * 1024
    # Pixels in one decoded image, checked from the file header before decoding: a small
    # file can declare a huge picture (a decompression bomb). 50 MP covers phone cameras.
    max_image_pixels: int = 50_000_000
    # Memory one image may take to decode, estimated from its header: a 48-megapixel PNG (about
    # 230 MB) fits, a WebP of more than about 15 megapixels (17 bytes a pixel) does not. Two
    # images decode at once, so a CLIP worker needs twice this beside its model.
    max_image_decode_bytes: int = 256 * 1024 * 1024
    # Tokens in one text, as the model's tokenizer counts them (special tokens not included):
    # the OpenAI API's per-input limit, which clients already respect.
    max_tokens_per_text: int = 8192
    # Tokens of all texts in one request: 100 texts of one full MiniLM window (254) each, or four
    # texts at the per-text limit. 1.9 to 3.5 s of model time for MiniLM on OpenVINO with 2 cores
    # (measured on a busy shared machine: 9,300 to 17,300 tokens/s), about 14 s for torch on one
    # core (2,400 tokens/s): well inside REQUEST_TIMEOUT_SECONDS.
    max_tokens_per_request: int = 32768
    # Characters in one text, checked before tokenizing so that no text costs much to tokenize
    # (262,144 characters took 0.1-0.7 s). 32 characters per token of MAX_TOKENS_PER_TEXT: English
    # runs 4 to 5, so only a text that is mostly white space or unsplittable words reaches it.
    max_text_length: int = 262_144
    # Tokens in one model window, special tokens included: a model reads up to its own max_seq_length at once
    # (256 for all-MiniLM-L6-v2, 512 for BERT, 8,192 for ModernBERT), capped here; longer texts are split
    # into windows and averaged.
    max_window_tokens: int = 4096
    # Bytes in one request body; Flask rejects larger bodies before reading them.
    max_request_size: int = 32 * 1024 * 1024
    # Bytes of request bodies one worker handles at once (read, decoded, waiting for the model);
    # past it a request gets 429 before its body is read. Reading, parsing and base64-decoding
    # hold about three times a body's size (measured: 89 MiB for a 30 MiB body of three images),
    # so 32 MiB (one largest body) costs about 100 MB at most: room beside a small model in a
    # 512 MiB container. At least MAX_REQUEST_SIZE.
    max_request_bytes_in_flight: int = 32 * 1024 * 1024
    embedding_model: str = DEFAULT_EMBEDDING_MODEL
    tokenizer_model: str | None = None
    models_dir: str = "/models"
    allow_model_download: bool = False
    engine: str = "auto"
    engine_precision: str = "auto"
    # Serving: gunicorn processes, request threads per process, engine threads per forward pass.
    # OpenVINO releases the GIL while it infers, so one process with every core serves best and
    # holds one copy of the model. torch does not (its idle threads spin and one GIL serialises the
    # HTTP work): on 2 cores two workers of one torch thread served 16 clients about 30% faster.
    workers: int = field(default_factory=lambda: default_workers(available_cpus()))
    threads: int = 64
    engine_threads: int = field(default_factory=lambda: default_engine_threads(available_cpus()))
    # Continuous batching: whenever the model thread is free it takes the requests waiting, up to this
    # many tokens (and padded tokens per forward pass). 2048 padded tokens (8 full windows of MiniLM) ran as
    # fast per token on OpenVINO as 4096 and held about 30 MB less of the engine's activation buffers
    # (measured). BATCHING=off runs one request per batch, for comparison.
    batch_max_tokens: int = 2048
    batching: bool = True
    # Tokens of work waiting for the model before new requests get 429 (an image counts as
    # service.IMAGE_WORK_TOKENS). Twice MAX_TOKENS_PER_REQUEST, so a largest request is refused only
    # when about a largest request's work already waits, not for one short query's sake. A full queue
    # clears in 4 to 7 s on OpenVINO with 2 cores, about 27 s for torch on one core: inside the deadline.
    # 64 short queries take about 1,000.
    queue_max_tokens: int = 65536
    # Seconds a request waits for the model before it gets 503. Cloud Run ends a request at
    # 120 s (deploy/cloudrun/service.yaml); 60 s answers well before that, with a clear error.
    request_timeout_seconds: float = 60
    # /metrics answers without the API key when true.
    metrics_public: bool = False

    @property
    def uses_default_api_key(self) -> bool:
        return DEFAULT_API_KEY in self.api_keys


def _parsed(environ: Mapping[str, str], name: str, parse: Callable[[str], T], described: str) -> T | None:
    """The variable's value parsed, None when it is unset or empty; a SettingsError naming it when it is not valid."""
    raw = environ.get(name, "").strip()
    if not raw:
        return None
    try:
        return parse(raw)
    except ValueError:
        raise SettingsError(f"{name} must be {described}, got {raw!r}") from None


def _whole_number(environ: Mapping[str, str], name: str, default: int, minimum: int) -> int:
    value = _parsed(environ, name, int, "a whole number")
    if value is None:
        return default
    if value < minimum:
        bound = "greater than zero" if minimum == 1 else f"at least {minimum}"
        raise SettingsError(f"{name} must be {bound}, got {value}")
    return value


def _positive_number(environ: Mapping[str, str], name: str, default: float) -> float:
    value = _parsed(environ, name, float, "a number of seconds")
    if value is None:
        return default
    if not 0 < value < math.inf:
        raise SettingsError(f"{name} must be greater than zero and finite, got {value}")
    return value


def _positive_int(environ: Mapping[str, str], name: str, default: int) -> int:
    return _whole_number(environ, name, default, minimum=1)


def default_workers(cpus: int, engine: str = "auto") -> int:
    return min(cpus, 2) if engine == "torch" else 1


def default_engine_threads(cpus: int, workers: int | None = None, engine: str = "auto") -> int:
    """Engine threads per worker so that all workers together use every CPU."""
    return max(1, cpus // (workers or default_workers(cpus, engine)))


def available_cpus() -> int:
    """CPUs this process may use, honouring a cgroup CPU quota (containers, Cloud Run)."""
    cpus = len(os.sched_getaffinity(0))
    try:
        quota, period = open("/sys/fs/cgroup/cpu.max").read().split()
        if quota != "max":
            cpus = min(cpus, max(1, int(quota) // int(period)))
    except (OSError, ValueError):
        pass
    return cpus


def default_models_dir(image_models_dir: str) -> str:
    """The image's folder of baked models; in a checkout without it, ./models, where `make run` puts them."""
    if Path(image_models_dir).is_dir():
        return image_models_dir
    local = Path.cwd() / LOCAL_MODELS_DIR
    logger.info("MODELS_DIR is unset and %s does not exist: looking for models in %s, where `make run` puts them",
                image_models_dir, local)
    return str(local)


def _flag(environ: Mapping[str, str], name: str) -> bool:
    raw = environ.get(name, "").strip().lower()
    if raw in ("", "0", "false", "no", "off"):
        return False
    if raw in ("1", "true", "yes", "on"):
        return True
    raise SettingsError(f"{name} must be true or false, got {raw!r}")


def _on_or_off(environ: Mapping[str, str], name: str, default: bool) -> bool:
    raw = environ.get(name, "").strip().lower()
    if not raw:
        return default
    if raw not in ("on", "off"):
        raise SettingsError(f"{name} must be on or off, got {raw!r}")
    return raw == "on"


def _choice(environ: Mapping[str, str], name: str, choices: tuple[str, ...], default: str) -> str:
    raw = environ.get(name, "").strip().lower() or default
    if raw not in choices:
        raise SettingsError(f"{name} must be one of {', '.join(choices)}, got {raw!r}")
    return raw


def _engine_threads(environ: Mapping[str, str], cpus: int, workers: int, engine: str) -> int:
    # TORCH_NUM_THREADS is the name earlier releases used; ENGINE_THREADS wins when both are set.
    default = default_engine_threads(cpus, workers, engine)
    if environ.get("ENGINE_THREADS", "").strip():
        return _positive_int(environ, "ENGINE_THREADS", default)
    return _positive_int(environ, "TORCH_NUM_THREADS", default)


def _api_keys(environ: Mapping[str, str]) -> tuple[str, ...]:
    raw = environ.get("VECTOR_EMBEDDER_API_KEY")
    if raw is None:
        return (DEFAULT_API_KEY,)
    # Several comma-separated keys let operators rotate keys without downtime.
    keys = tuple(key.strip() for key in raw.split(",") if key.strip())
    if not keys:
        raise SettingsError("VECTOR_EMBEDDER_API_KEY is set but holds no key")
    return keys


@dataclass(frozen=True)
class TokenLimits:
    max_tokens_per_text: int
    max_tokens_per_request: int
    queue_max_tokens: int


def _token_limits(environ: Mapping[str, str], defaults: Settings) -> TokenLimits:
    """The token limits, each of which must hold at least one of the one before."""
    limits = TokenLimits(_positive_int(environ, "MAX_TOKENS_PER_TEXT", defaults.max_tokens_per_text),
                         _positive_int(environ, "MAX_TOKENS_PER_REQUEST", defaults.max_tokens_per_request),
                         _positive_int(environ, "QUEUE_MAX_TOKENS", defaults.queue_max_tokens))
    if limits.max_tokens_per_text > limits.max_tokens_per_request:
        raise SettingsError(f"MAX_TOKENS_PER_TEXT must be at most MAX_TOKENS_PER_REQUEST "
                            f"({limits.max_tokens_per_request}), got {limits.max_tokens_per_text}: a text within "
                            f"its own limit could not be sent")
    if limits.max_tokens_per_request > limits.queue_max_tokens:
        raise SettingsError(f"MAX_TOKENS_PER_REQUEST must be at most QUEUE_MAX_TOKENS ({limits.queue_max_tokens}), "
                            f"got {limits.max_tokens_per_request}: a request within the limits would get 429 "
                            f"whenever any other work waits for the model")
    return limits


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Read and validate the service's settings from the environment."""
    environ = os.environ if environ is None else environ
    defaults = Settings()
    cpus = available_cpus()
    port = _positive_int(environ, "PORT", defaults.port)
    engine = _choice(environ, "ENGINE", ENGINES, defaults.engine)
    workers = _positive_int(environ, "WORKERS", default_workers(cpus, engine))
    if port > 65535:
        raise SettingsError(f"PORT must be at most 65535, got {port}")
    max_request_size = _positive_int(environ, "MAX_REQUEST_SIZE", defaults.max_request_size)
    bytes_in_flight = _positive_int(environ, "MAX_REQUEST_BYTES_IN_FLIGHT", defaults.max_request_bytes_in_flight)
    if bytes_in_flight < max_request_size:
        raise SettingsError(f"MAX_REQUEST_BYTES_IN_FLIGHT must be at least MAX_REQUEST_SIZE ({max_request_size}), "
                            f"got {bytes_in_flight}: a body of the largest allowed size could never be read")
    token_limits = _token_limits(environ, defaults)
    if environ.get("QUEUE_MAX", "").strip():
        logger.warning("QUEUE_MAX is no longer read: the model's queue is bounded by the work it holds, "
                       "QUEUE_MAX_TOKENS (see the README)")
    if environ.get("BATCH_WAIT_MS", "").strip():
        logger.warning("BATCH_WAIT_MS is no longer read: the model thread never waits for company, it takes what "
                       "is waiting whenever it is free; BATCHING=off turns batching off (see the README)")
    return Settings(
        api_keys=_api_keys(environ),
        port=port,
        max_batch_size=_positive_int(environ, "MAX_BATCH_SIZE", defaults.max_batch_size),
        max_texts_per_batch=_positive_int(environ, "MAX_TEXTS_PER_BATCH", defaults.max_texts_per_batch),
        max_images_per_batch=_positive_int(environ, "MAX_IMAGES_PER_BATCH", defaults.max_images_per_batch),
        max_image_size=_positive_int(environ, "MAX_IMAGE_SIZE", defaults.max_image_size),
        max_image_pixels=_positive_int(environ, "MAX_IMAGE_PIXELS", defaults.max_image_pixels),
        max_image_decode_bytes=_positive_int(environ, "MAX_IMAGE_DECODE_BYTES", defaults.max_image_decode_bytes),
        max_text_length=_positive_int(environ, "MAX_TEXT_LENGTH", defaults.max_text_length),
        max_window_tokens=_whole_number(environ, "MAX_WINDOW_TOKENS", defaults.max_window_tokens,
                                        minimum=MIN_WINDOW_TOKENS),
        max_tokens_per_text=token_limits.max_tokens_per_text,
        max_tokens_per_request=token_limits.max_tokens_per_request,
        max_request_size=max_request_size,
        max_request_bytes_in_flight=bytes_in_flight,
        embedding_model=environ.get("EMBEDDING_MODEL", "").strip() or defaults.embedding_model,
        tokenizer_model=environ.get("TOKENIZER_MODEL", "").strip() or None,
        models_dir=environ.get("MODELS_DIR", "").strip() or default_models_dir(defaults.models_dir),
        allow_model_download=_flag(environ, "ALLOW_MODEL_DOWNLOAD"),
        engine=engine,
        engine_precision=_choice(environ, "ENGINE_PRECISION", ENGINE_PRECISIONS, defaults.engine_precision),
        workers=workers,
        threads=_positive_int(environ, "THREADS", defaults.threads),
        engine_threads=_engine_threads(environ, cpus, workers, engine),
        batch_max_tokens=_positive_int(environ, "BATCH_MAX_TOKENS", defaults.batch_max_tokens),
        batching=_on_or_off(environ, "BATCHING", defaults.batching),
        queue_max_tokens=token_limits.queue_max_tokens,
        request_timeout_seconds=_positive_number(environ, "REQUEST_TIMEOUT_SECONDS", defaults.request_timeout_seconds),
        metrics_public=_flag(environ, "METRICS_PUBLIC"),
    )
