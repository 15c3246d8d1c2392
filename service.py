"""The model behind the routes: loaded in the background, then asked for vectors.

The web layer asks this object whether the model is ready and hands it the validated texts, token ids
or image files of one request; it never touches the model itself. One call serves a request's texts:
it tokenizes them, holds them to the token limits, queues their windows for the model thread, waits,
and returns their vectors. Errors say which item of the request they are about by its index; each API
names the item in its own words.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from batcher import Batcher, BatchLimits, BatchStats
from config import Settings
from embeddings import Prompts, TextEmbedder, TokenizedText, all_windows
from errors import LOADING_RETRY_AFTER, ApiError, ItemError
from model_loading import LoadedModels, load_models

logger = logging.getLogger(__name__)

# Image requests decoding at once: each may hold one full-size decoded image in memory.
IMAGE_DECODE_SLOTS = 2
# The work one image counts for in the model's queue, in text tokens. A CLIP ViT-B/32 image
# costs its model about as much as 35 tokens of its text tower, ViT-B/16 about 140 and
# ViT-L/14 about 330 (arithmetic from the models' shapes, not measured); decoding comes on top.
IMAGE_WORK_TOKENS = 256
# The character guard of a request's texts: characters allowed per token of MAX_TOKENS_PER_REQUEST.
CHARACTERS_PER_TOKEN_GUARD = 32


class ModelLoadingError(ApiError):
    """The model is still loading."""

    def __init__(self) -> None:
        super().__init__(503, "The model is still loading; retry when GET /health/ready answers 200",
                         code="model_loading", retry_after=LOADING_RETRY_AFTER)


class ModelLoadFailedError(ApiError):
    """The model failed to load: nothing can be served until the instance is fixed and restarted."""

    shows_local_reason = True

    def __init__(self, reason: str) -> None:
        super().__init__(503, f"The model failed to load, so no embeddings can be made: {reason}",
                         code="model_load_failed")


@dataclass(frozen=True)
class LoadReport:
    """What loading produced, for metrics: which engine and precision serve, and how long it took."""
    engine: str
    precision: str
    load_seconds: float


def _ignore(_: object) -> None:
    pass


@dataclass(frozen=True)
class ServiceHooks:
    """What the app wants told: once, when the model is ready; after every model batch."""
    on_ready: Callable[[LoadReport], None] = _ignore
    on_batch: Callable[[BatchStats], None] = _ignore


@dataclass(frozen=True)
class EmbeddingResult:
    vectors: list[np.ndarray]  # one per input, in input order
    token_count: int  # tokens the model processed, special tokens included


class NonFiniteVectorsError(ApiError):
    """The model made a vector that is not a finite number (NaN or infinity): nothing of the request is answered."""

    def __init__(self) -> None:
        super().__init__(500, "The model made vectors that are not finite numbers for this request, so none are "
                              "returned; this has been logged for the operator (GET /health/ready counts it)",
                         code="non_finite_vectors")


class RequestTokens:
    """One request's tokens, counted text by text against MAX_TOKENS_PER_TEXT and MAX_TOKENS_PER_REQUEST."""

    def __init__(self, settings: Settings, prompt_name: str | None = None) -> None:
        self.per_text = settings.max_tokens_per_text
        self.per_request = settings.max_tokens_per_request
        self.prompt_name = prompt_name
        self.total = 0
        self.prompt_total = 0

    def add(self, tokens: int, index: int, prompt_tokens: int = 0) -> None:
        """Count the tokens of the text at `index`, `prompt_tokens` of them its prompt's: an ItemError (413) with
        the count, the prompt's share and the limit past a limit."""
        if tokens > self.per_text:
            raise ItemError(413, f"has {tokens} tokens{self._share(prompt_tokens)}; the limit is {self.per_text} "
                                 f"(MAX_TOKENS_PER_TEXT)", index)
        self.total += tokens
        self.prompt_total += prompt_tokens
        if self.total > self.per_request:
            raise ItemError(413, f"have {self.total} tokens{self._share(self.prompt_total)}; the limit per request "
                                 f"is {self.per_request} (MAX_TOKENS_PER_REQUEST): send them in several requests",
                            index, lead="The texts up to ")

    def _share(self, prompt_tokens: int) -> str:
        return f" with the prompt {self.prompt_name!r} ({prompt_tokens} of them)" if prompt_tokens else ""


def check_request_characters(texts: Sequence[str], max_tokens_per_request: int) -> None:
    """All texts of a request held to CHARACTERS_PER_TOKEN_GUARD characters per token of the request's limit.

    Checked before any text is tokenized: a hundred texts that each pass MAX_TEXT_LENGTH but hold few
    tokens (long unsplittable strings) would otherwise cost seconds of tokenizing.
    """
    characters, limit = sum(map(len, texts)), CHARACTERS_PER_TOKEN_GUARD * max_tokens_per_request
    if characters > limit:
        raise ApiError(413, f"The texts hold {characters} characters in all; the limit per request is {limit} "
                            f"({CHARACTERS_PER_TOKEN_GUARD} characters per token of MAX_TOKENS_PER_REQUEST): "
                            f"send them in several requests")


class EmbeddingService:
    def __init__(self, settings: Settings, hooks: ServiceHooks = ServiceHooks(),
                 load: Callable[[Settings], LoadedModels] = load_models) -> None:
        self.settings = settings
        self._hooks = hooks
        self._load_models = load
        self._ready = threading.Event()
        self._error: str | None = None
        self._models: LoadedModels | None = None
        self._batcher: Batcher | None = None
        self._loader: threading.Thread | None = None
        self.loaded_at: int | None = None  # Unix time the model became ready
        self._image_slots = threading.BoundedSemaphore(IMAGE_DECODE_SLOTS)
        self._faults_lock = threading.Lock()
        self.non_finite_requests = 0  # requests refused because the model made a vector that is not finite

    # --- loading ------------------------------------------------------------------

    def start_loading(self) -> None:
        """Load the model in a background thread so the health route answers meanwhile."""
        if self._loader is None:
            self._loader = threading.Thread(target=self._load, name="model-loader", daemon=True)
            self._loader.start()

    def _load(self) -> None:
        started = time.monotonic()
        try:
            models = self._load_models(self.settings)
        except Exception as error:  # any failure must surface in readiness, not crash the worker
            self._error = f"{type(error).__name__}: {error}"
            logger.error("Model %s failed to load: %s", self.settings.embedding_model, self._error)
            return
        self._models = models
        self._batcher = Batcher(models.text.encode_windows, models.text.tokens_per_window, BatchLimits(
            max_tokens=self.settings.batch_max_tokens,
            batching=self.settings.batching,
            queue_max_tokens=self.settings.queue_max_tokens,
            request_timeout=self.settings.request_timeout_seconds,
        ), on_batch=self._hooks.on_batch)
        self._batcher.start()
        load_seconds = time.monotonic() - started
        self.loaded_at = int(time.time())
        try:  # before readiness turns 200, so that /metrics already describes the model then
            self._hooks.on_ready(LoadReport(models.engine, models.precision, load_seconds))
        except Exception:  # metrics must never keep the model from serving
            logger.exception("The on-ready hook failed; the model serves all the same")
        self._ready.set()
        logger.info("Model %s ready in %.2f s on %s %s with %d engine threads (dimension %d, max %d tokens "
                    "per window)", self.settings.embedding_model, load_seconds, models.engine, models.precision,
                    self.settings.engine_threads, models.text.dimension, models.text.max_seq_length)

    # --- health -------------------------------------------------------------------

    def liveness(self) -> tuple[bool, dict]:
        """Alive unless the model thread has ended or is stuck: then only a restart helps."""
        fault = self._model_fault()
        if fault is not None:
            return False, {"status": "error", "reason": fault}
        return True, {"status": "ok"}

    def readiness(self) -> tuple[bool, dict]:
        fault = self._model_fault()
        if fault is not None:
            return False, {"status": "error", "model": self.settings.embedding_model, "reason": fault}
        if self._ready.is_set():
            body = {"status": "ready", "model": self.settings.embedding_model,
                    "supports_images": self._models.images is not None,
                    "engine": self._models.engine, "precision": self._models.precision,
                    "prompts": sorted(self._models.text.prompts.texts),
                    "default_prompt_name": self._models.text.prompts.default_name}
            if self.non_finite_requests:
                body["non_finite_requests"] = self.non_finite_requests
            return True, body
        if self._error is not None:
            return False, {"status": "error", "model": self.settings.embedding_model, "reason": self._error}
        return False, {"status": "loading"}

    def _model_fault(self) -> str | None:
        return self._batcher.fault() if self._batcher is not None else None

    def _ready_models(self) -> LoadedModels:
        if not self._ready.is_set():
            raise ModelLoadFailedError(self._error) if self._error is not None else ModelLoadingError()
        return self._models

    def ensure_room(self) -> None:
        """QueueFullError at once when the model's queue is full, for a request that has not yet read its body,
        tokenized or decoded anything; nothing while the model loads."""
        if self._ready.is_set():
            self._batcher.ensure_room()

    # --- texts --------------------------------------------------------------------

    def embed_texts(self, texts: Sequence[str], prompt_name: str | None = None,
                    truncation: str | None = None) -> EmbeddingResult:
        """One vector per text, in input order, each text read after its prompt (the named one, or the model's
        default), tokenized once and held to the limits before any window is queued. A text longer than a
        window is split into windows and averaged, or with `truncation` cut to one (embeddings.TextEmbedder).

        Raises UnknownPromptError (400) for a prompt the model does not have; ApiError (413) when all texts
        together hold too many characters, before any is tokenized; ItemError (413), with the text's index,
        at the first text past a token limit (the prompt's tokens count): tokenizing stops there, so a refused
        request costs about as much as the largest accepted one.
        """
        text = self._ready_models().text
        text.prompts.text_of(prompt_name)  # an unknown prompt is refused before any work
        check_request_characters(texts, self.settings.max_tokens_per_request)
        counted = RequestTokens(self.settings, prompt_name or text.prompts.default_name)
        tokenized = []
        for index, one_text in enumerate(texts):
            [one] = text.tokenize([one_text], prompt_name, truncation)
            counted.add(one.token_count, index, one.prompt_tokens)
            tokenized.append(one)
        return self._encode_and_combine(text, tokenized)

    def embed_token_ids(self, token_id_lists: Sequence[Sequence[int]],
                        truncation: str | None = None) -> EmbeddingResult:
        """One vector per list of the model's own token ids, held to the token limits as texts are.

        The ids are what the model reads: no prompt is added to them.
        """
        text = self._ready_models().text
        tokenized = text.tokenized_from_ids(token_id_lists, truncation)
        counted = RequestTokens(self.settings)
        for index, one in enumerate(tokenized):
            counted.add(one.token_count, index)
        return self._encode_and_combine(text, tokenized)

    def _encode_and_combine(self, text: TextEmbedder, tokenized: list[TokenizedText]) -> EmbeddingResult:
        """Raises QueueFullError when the queue cannot take the windows, RequestTimeoutError past the deadline,
        NonFiniteVectorsError when the model made a vector that is not finite."""
        window_vectors = self._finite(self._batcher.encode(all_windows(tokenized)), f"{len(tokenized)} texts")
        return EmbeddingResult(text.combine_all(tokenized, window_vectors),
                               sum(text.tokens_processed(one) for one in tokenized))

    def _finite(self, vectors: np.ndarray, what: str) -> np.ndarray:
        """The vectors, or NonFiniteVectorsError (logged and counted) if any is NaN or infinite: a model that
        misreads an input (a traced attention that mishandles padding) must never hand out such a vector."""
        if np.isfinite(vectors).all():
            return vectors
        with self._faults_lock:
            self.non_finite_requests += 1
        logger.error("Model %s made vectors that are not finite for a request of %s; the request gets 500 "
                     "(%d such requests so far)", self.settings.embedding_model, what, self.non_finite_requests)
        raise NonFiniteVectorsError()

    # --- images -------------------------------------------------------------------

    def supports_images(self) -> bool:
        """True when the loaded model also embeds images (a CLIP model)."""
        return self._ready_models().images is not None

    def embed_images(self, encoded_images: Sequence[bytes]) -> list[np.ndarray]:
        """One vector per image file's bytes, in input order.

        Raises image_embeddings.ImageInputError, with its index, for the first image that cannot be used;
        no image is embedded then. Images are decoded in the request's thread, then embedded on the
        model thread, counted as IMAGE_WORK_TOKENS each in its queue.
        """
        images = self._ready_models().images
        if images is None:  # the routes ask supports_images() first and answer in their own words
            raise ApiError(400, "The model embeds text only, so it cannot embed images")
        self._batcher.ensure_room()
        with self._image_slots:
            prepared = images.prepare_encoded(encoded_images)
        vectors = self._batcher.run_alone(lambda: images.embed_prepared(prepared), len(prepared) * IMAGE_WORK_TOKENS)
        return list(self._finite(np.asarray(vectors), f"{len(prepared)} images"))

    # --- the model's facts ----------------------------------------------------------

    def prompts(self) -> Prompts:
        """The model's prompts by name, and the one applied when a request names none."""
        return self._ready_models().text.prompts

    def precision(self) -> str:
        """The precision the engine computes in (bf16, f32)."""
        return self._ready_models().precision

    def normalizes(self) -> bool:
        """True when the model ends with a Normalize module: its vectors have unit length."""
        return self._ready_models().text.normalizes

    def pooling(self) -> str:
        """How the model pools token vectors into one (mean, cls, lasttoken, ...)."""
        return self._ready_models().text.pooling

    def vocabulary_size(self) -> int:
        return self._ready_models().text.vocabulary_size

    def dimension(self) -> int:
        """Components in every vector the model makes."""
        return self._ready_models().text.dimension

    def max_sequence_length(self) -> int:
        """Tokens in one model window, special tokens included; longer texts are split into windows."""
        return self._ready_models().text.max_seq_length

    def stop(self) -> None:
        """Finish every accepted request, then stop the model thread."""
        if self._batcher is not None:
            self._batcher.stop()
