"""Text embeddings: tokenize once, chunk long texts, encode in batches, average.

A text longer than the model's maximum sequence length is split into
consecutive windows of token ids. Each window is one model input; the window
vectors are averaged, weighted by how many tokens each window holds, and
L2-normalised again when the model normalises its own output. The ids used for
chunking are the ids fed to the model: every text is tokenized exactly once.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.base.modules import Normalize
from transformers import AutoTokenizer

from config import Settings
from model_locator import locate_model

logger = logging.getLogger(__name__)

# Position embeddings of BERT-style models end at 512; no window is longer.
LONGEST_WINDOW = 512


@dataclass(frozen=True)
class TokenizedText:
    """One text as the windows of content token ids the model will see."""
    chunks: list[list[int]]

    @property
    def token_count(self) -> int:
        return sum(len(chunk) for chunk in self.chunks)


class TextEmbedder:
    """Turns texts into vectors with a sentence-transformers model."""

    def __init__(self, model: SentenceTransformer, tokenizer: Any, max_batch_size: int,
                 max_batch_tokens: int) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.max_seq_length = min(model.max_seq_length or LONGEST_WINDOW, LONGEST_WINDOW, position_limit(model))
        self.prefix_ids, self.suffix_ids = special_token_frame(tokenizer)
        self.window_size = self.max_seq_length - len(self.prefix_ids) - len(self.suffix_ids)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.uses_token_type_ids = "token_type_ids" in tokenizer.model_input_names
        self.normalizes = any(isinstance(module, Normalize) for module in model)
        self.dimension = model.get_embedding_dimension()

    def tokenize(self, texts: Sequence[str]) -> list[TokenizedText]:
        """Tokenize every text once and split its ids into model-sized windows."""
        token_ids = self.tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]
        return [TokenizedText(chunk_token_ids(ids, self.window_size)) for ids in token_ids]

    def tokenized_from_ids(self, token_id_lists: Sequence[Sequence[int]]) -> list[TokenizedText]:
        """Texts given as the model's own token ids, split into windows like tokenized text."""
        return [TokenizedText(chunk_token_ids(list(ids), self.window_size)) for ids in token_id_lists]

    @property
    def vocabulary_size(self) -> int:
        return len(self.tokenizer)

    def tokens_processed(self, text: TokenizedText) -> int:
        """Tokens the model processes for a text, special tokens of every window included."""
        return sum(self.tokens_per_chunk(chunk) for chunk in text.chunks)

    def encode_chunks(self, chunks: Sequence[Sequence[int]]) -> np.ndarray:
        """One vector per window, in input order.

        Windows are grouped by length into forward passes of at most max_batch_size
        windows and max_batch_tokens padded tokens, so each pass pads as little as possible.
        """
        vectors = np.empty((len(chunks), self.dimension), dtype=np.float32)
        lengths = [self.tokens_per_chunk(chunk) for chunk in chunks]
        for group in plan_forward_passes(lengths, self.max_batch_tokens, self.max_batch_size):
            vectors[group] = self._forward([chunks[index] for index in group])
        return vectors

    def tokens_per_chunk(self, chunk: Sequence[int]) -> int:
        """Tokens the model reads for one window, special tokens included."""
        return len(chunk) + len(self.prefix_ids) + len(self.suffix_ids)

    def _forward(self, chunks: Sequence[Sequence[int]]) -> np.ndarray:
        sequences = [self.prefix_ids + list(chunk) + self.suffix_ids for chunk in chunks]
        longest = max(len(sequence) for sequence in sequences)
        input_ids = torch.full((len(sequences), longest), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(sequences), longest), dtype=torch.long)
        for row, sequence in enumerate(sequences):
            input_ids[row, :len(sequence)] = torch.tensor(sequence, dtype=torch.long)
            attention_mask[row, :len(sequence)] = 1
        features = {"input_ids": input_ids, "attention_mask": attention_mask, "modality": "text"}
        if self.uses_token_type_ids:
            features["token_type_ids"] = torch.zeros_like(input_ids)
        with torch.inference_mode():
            output = self.model(features)
        return output["sentence_embedding"].float().numpy()

    def combine(self, text: TokenizedText, chunk_vectors: np.ndarray) -> np.ndarray:
        """Average a text's window vectors, weighted by their token counts."""
        if len(text.chunks) == 1:
            return chunk_vectors[0]
        weights = np.array([max(len(chunk), 1) for chunk in text.chunks], dtype=np.float32)
        vector = (chunk_vectors * weights[:, None]).sum(axis=0) / weights.sum()
        if self.normalizes:
            vector = vector / max(float(np.linalg.norm(vector)), 1e-12)
        return vector.astype(np.float32)

    def embed_tokenized(self, texts: Sequence[TokenizedText]) -> list[np.ndarray]:
        """Encode the windows of all texts together, then give each text its own vector."""
        return self.combine_all(texts, self.encode_chunks(all_chunks(texts)))

    def combine_all(self, texts: Sequence[TokenizedText], chunk_vectors: np.ndarray) -> list[np.ndarray]:
        """Split the vectors of all_chunks(texts) back per text and combine each text's windows."""
        vectors, start = [], 0
        for text in texts:
            end = start + len(text.chunks)
            vectors.append(self.combine(text, chunk_vectors[start:end]))
            start = end
        return vectors

    def embed(self, texts: Sequence[str]) -> list[np.ndarray]:
        """One vector per text, in input order."""
        return self.embed_tokenized(self.tokenize(texts))


def position_limit(model: SentenceTransformer) -> int:
    """The most positions the model's text encoder has embeddings for (77 for CLIP, 512 for BERT)."""
    config = model.transformers_model.config
    text_config = getattr(config, "text_config", None) or config
    return getattr(text_config, "max_position_embeddings", None) or LONGEST_WINDOW


def all_chunks(texts: Sequence[TokenizedText]) -> list[list[int]]:
    """Every window of every text, text after text."""
    return [chunk for text in texts for chunk in text.chunks]


def plan_forward_passes(lengths: Sequence[int], max_tokens: int, max_windows: int) -> list[list[int]]:
    """Group window indices by length so each pass pads little and stays within the limits.

    A pass holds at most max_windows windows and at most max_tokens padded tokens
    (windows x longest window); a window longer than the budget gets a pass of its own.
    """
    passes: list[list[int]] = []
    current: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        # Sorted ascending, so the newest window is the longest of the pass.
        padded = (len(current) + 1) * lengths[index]
        if current and (len(current) == max_windows or padded > max_tokens):
            passes.append(current)
            current = []
        current.append(index)
    if current:
        passes.append(current)
    return passes


def chunk_token_ids(token_ids: Sequence[int], window_size: int) -> list[list[int]]:
    """Split token ids into consecutive windows of at most window_size ids (at least one window)."""
    if window_size <= 0:
        raise ValueError("window_size must be positive")
    if not token_ids:
        return [[]]
    return [list(token_ids[start:start + window_size]) for start in range(0, len(token_ids), window_size)]


def special_token_frame(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The special token ids the tokenizer puts before and after a single text.

    Found by tokenizing a probe text, since transformers 5 tokenizers no longer
    expose a method that adds special tokens to ids.
    """
    encoded = tokenizer("probe", add_special_tokens=True, return_special_tokens_mask=True)
    ids, special = encoded["input_ids"], encoded["special_tokens_mask"]
    first_content = special.index(0)
    last_content = len(special) - 1 - special[::-1].index(0)
    return list(ids[:first_content]), list(ids[last_content + 1:])


def load_model(settings: Settings) -> SentenceTransformer:
    """Load the configured model on the CPU from the first place it is found."""
    location = locate_model(settings.embedding_model, settings.models_dir, settings.allow_model_download)
    logger.info("Loading model %s from %s (%s)", location.name, location.path, location.source)
    return SentenceTransformer(location.path, device="cpu", local_files_only=location.is_local)


def load_tokenizer(settings: Settings, model: SentenceTransformer) -> Any:
    """The model's own tokenizer, or TOKENIZER_MODEL's when it is set."""
    if not settings.tokenizer_model:
        return model.tokenizer
    location = locate_model(settings.tokenizer_model, settings.models_dir, settings.allow_model_download)
    logger.info("Loading tokenizer %s from %s (%s)", location.name, location.path, location.source)
    tokenizer = AutoTokenizer.from_pretrained(location.path, local_files_only=location.is_local)
    model_vocabulary = getattr(model.transformers_model.config, "vocab_size", None)
    if model_vocabulary is not None and len(tokenizer) > model_vocabulary:
        raise ValueError(
            f"TOKENIZER_MODEL {settings.tokenizer_model!r} has {len(tokenizer)} tokens but model "
            f"{settings.embedding_model!r} knows only {model_vocabulary}: they do not belong together"
        )
    return tokenizer


def load_text_embedder(settings: Settings, model: SentenceTransformer) -> TextEmbedder:
    return TextEmbedder(model, load_tokenizer(settings, model), settings.max_batch_size, settings.batch_max_tokens)
