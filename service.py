"""The model behind the routes: loaded in the background, then asked for vectors.

The web layer asks this object whether the model is ready and hands it
validated inputs; it never touches the model itself.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

import worker_registry
from batcher import Batcher, BatchLimits, BatchStats
from config import Settings
from embeddings import TextEmbedder, TokenizedText, all_chunks
from image_embeddings import ImageEmbedder
from model_loading import LoadedModels, load_models

logger = logging.getLogger(__name__)

# Image requests decoding at once: each may hold one full-size decoded image in memory.
IMAGE_DECODE_SLOTS = 2
# The work one image counts for in the model's queue, in text tokens. A CLIP ViT-B/32 image
# costs its model about as much as 35 tokens of its text tower, ViT-B/16 about 140 and
# ViT-L/14 about 330 (arithmetic from the models' shapes, not measured); decoding comes on top.
IMAGE_WORK_TOKENS = 256


class ModelNotReadyError(RuntimeError):
    """The model is still loading, or failed to load."""


class ImagesNotSupportedError(RuntimeError):
    """The loaded model embeds text only."""


@dataclass(frozen=True)
class LoadReport:
    """What loading produced, for metrics: which engine and precision serve, and how long it took."""
    engine: str
    precision: str
    load_seconds: float


@dataclass(frozen=True)
class EmbeddingResult:
    vectors: list[np.ndarray]  # one per input, in input order
    token_count: int  # tokens the model processed, special tokens included


class EmbeddingService:
    def __init__(self, settings: Settings,
                 load: Callable[[Settings], LoadedModels] = load_models) -> None:
        self.settings = settings
        self._load_models = load
        self._ready = threading.Event()
        self._error: str | None = None
        self._models: LoadedModels | None = None
        self._batcher: Batcher | None = None
        self._batch_observers: list[Callable[[BatchStats], None]] = []
        self._load_observers: list[Callable[[LoadReport], None]] = []
        self._observers_lock = threading.Lock()
        self._loader: threading.Thread | None = None
        self.load_seconds: float | None = None
        self.loaded_at: int | None = None  # Unix time the model became ready
        self._image_slots = threading.BoundedSemaphore(IMAGE_DECODE_SLOTS)

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
        self._batcher = Batcher(self._encode_windows, models.text.tokens_per_chunk, BatchLimits(
            max_tokens=self.settings.batch_max_tokens,
            max_wait=self.settings.batch_wait_ms / 1000,
            queue_max_tokens=self.settings.queue_max_tokens,
            request_timeout=self.settings.request_timeout_seconds,
        ), on_batch=self._record_batch)
        self._batcher.start()
        self.load_seconds = time.monotonic() - started
        self.loaded_at = int(time.time())
        with self._observers_lock:
            self._ready.set()
            load_observers = list(self._load_observers)
        worker_registry.mark_ready()
        for observer in load_observers:
            self._tell(observer)
        logger.info("Model %s ready in %.2f s on %s %s with %d engine threads (dimension %d, max %d tokens "
                    "per window)", self.settings.embedding_model, self.load_seconds, self.engine, self.precision,
                    self.settings.engine_threads, models.text.dimension, models.text.max_seq_length)

    @property
    def engine(self) -> str | None:
        """The engine serving the model, once it has loaded."""
        return self._models.engine if self._models else None

    @property
    def precision(self) -> str | None:
        return self._models.precision if self._models else None

    @property
    def self_check(self) -> str | None:
        """What the start-up self-check found (exported models only)."""
        return self._models.self_check if self._models else None

    @property
    def _images(self) -> ImageEmbedder | None:
        return self._models.images if self._models else None  # None for a text-only model

    def wait_until_loaded(self, timeout: float) -> bool:
        """Wait for loading to end, ready or failed; True when ready."""
        if self._loader is not None:
            self._loader.join(timeout)
        return self._ready.is_set()

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
            return True, {"status": "ready", "model": self.settings.embedding_model,
                          "supports_images": self._images is not None,
                          "engine": self.engine, "precision": self.precision}
        if self._error is not None:
            return False, {"status": "error", "model": self.settings.embedding_model, "reason": self._error}
        return False, {"status": "loading"}

    def _model_fault(self) -> str | None:
        return self._batcher.fault() if self._batcher is not None else None

    def _ready_text_embedder(self) -> TextEmbedder:
        if not self._ready.is_set():
            raise ModelNotReadyError(self._error or "loading")
        return self._models.text

    def embed_texts(self, texts: Sequence[str]) -> EmbeddingResult:
        """One vector per text, in input order."""
        return self.embed_tokenized(self.tokenize(texts))

    def tokenize(self, texts: Sequence[str]) -> list[TokenizedText]:
        """Each text's token ids in the model's windows: tokenized once, to be counted and then embedded."""
        return self._ready_text_embedder().tokenize(texts)

    def tokenized_from_ids(self, token_id_lists: Sequence[Sequence[int]]) -> list[TokenizedText]:
        """Texts given as lists of the model's own token ids, in windows like tokenized text."""
        return self._ready_text_embedder().tokenized_from_ids(token_id_lists)

    def embed_tokenized(self, texts: Sequence[TokenizedText]) -> EmbeddingResult:
        """One vector per tokenized text (see tokenize), in input order.

        Raises QueueFullError when the queue cannot take the texts' windows, RequestTimeoutError past the deadline.
        """
        text_embedder = self._ready_text_embedder()
        window_vectors = self._batcher.encode(all_chunks(texts))
        vectors = text_embedder.combine_all(texts, window_vectors)
        return EmbeddingResult(vectors, sum(text_embedder.tokens_processed(text) for text in texts))

    def ensure_room(self) -> None:
        """QueueFullError at once when the model's queue is full, for a request that has not yet read its body,
        tokenized or decoded anything; nothing while the model loads."""
        if self._ready.is_set():
            self._batcher.ensure_room()

    def require_image_support(self) -> ImageEmbedder:
        """The image embedder; ModelNotReadyError while loading, ImagesNotSupportedError for a text-only model."""
        self._ready_text_embedder()
        if self._images is None:
            # The HTTP layer words the answer (http_common.text_only_model_error).
            raise ImagesNotSupportedError("the model embeds text only")
        return self._images

    def embed_images(self, encoded_images: Sequence[bytes]) -> list[np.ndarray]:
        """One vector per image file's bytes, in input order.

        Raises image_embeddings.ImageInputError, with its index, for the first image that cannot be used;
        no image is embedded then. Images are decoded in the request's thread, then embedded on the
        model thread, counted as IMAGE_WORK_TOKENS each in its queue.
        """
        image_embedder = self.require_image_support()
        self._batcher.ensure_room()
        with self._image_slots:
            prepared = image_embedder.prepare_encoded(encoded_images)
        return self._batcher.run_alone(lambda: image_embedder.embed_prepared(prepared),
                                       len(prepared) * IMAGE_WORK_TOKENS)

    def vocabulary_size(self) -> int:
        return self._ready_text_embedder().vocabulary_size

    def dimension(self) -> int:
        """Components in every vector the model makes."""
        return self._ready_text_embedder().dimension

    def max_sequence_length(self) -> int:
        """Tokens in one model window, special tokens included; longer texts are chunked."""
        return self._ready_text_embedder().max_seq_length

    def supports_images(self) -> bool:
        """True when the loaded model also embeds images (a CLIP model)."""
        self._ready_text_embedder()
        return self._images is not None

    def stop(self) -> None:
        """Finish every accepted request, then stop the model thread."""
        if self._batcher is not None:
            self._batcher.stop()

    def observe_load(self, observer: Callable[[LoadReport], None]) -> None:
        """Call observer once the model is loaded (at once if it already is), for metrics."""
        with self._observers_lock:
            loaded = self._ready.is_set()
            if not loaded:
                self._load_observers.append(observer)
        if loaded:
            self._tell(observer)

    def _tell(self, observer: Callable[[LoadReport], None]) -> None:
        """An observer (metrics) that fails is logged; the model serves all the same."""
        try:
            observer(self._load_report())
        except Exception:
            logger.exception("A load observer failed")

    def _load_report(self) -> LoadReport:
        return LoadReport(self.engine, self.precision, self.load_seconds)

    def observe_batches(self, observer: Callable[[BatchStats], None]) -> None:
        """Call observer after every model batch (for metrics)."""
        self._batch_observers.append(observer)

    def _record_batch(self, stats: BatchStats) -> None:
        for observer in self._batch_observers:
            observer(stats)

    def _encode_windows(self, windows: list[list[int]]) -> np.ndarray:
        # Only the model thread calls this, so forward passes never compete for the cores.
        return self._models.text.encode_chunks(windows)
