"""Text embeddings: tokenize once, split long texts into windows, encode in batches, average.

A text longer than the model's maximum sequence length is split into
consecutive windows of token ids. Each window is one model input; the window
vectors are averaged, weighted by how many tokens each window holds, and
L2-normalised again when the model normalises its own output. The ids split into
windows are the ids fed to the model: every text is tokenized exactly once.

The forward passes run on an inference engine (openvino_engine.py, or
torch_engine.py as the fallback); this module only builds their inputs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np

from text_tokenizer import TextTokenizer

# Position embeddings of BERT-style models end at 512; no window is longer.
LONGEST_WINDOW = 512


class TextEncoder(Protocol):
    """An engine's text tower: one vector per row of padded token ids."""

    def encode_text(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True)
class TextModelShape:
    """What the text pipeline needs to know of a model besides its tokenizer."""
    dimension: int
    max_seq_length: int  # tokens in one window, special tokens included
    normalizes: bool  # the model ends with a Normalize module


@dataclass(frozen=True)
class TokenizedText:
    """One text as the windows of content token ids the model will see."""
    windows: list[list[int]]

    @property
    def token_count(self) -> int:
        return sum(len(window) for window in self.windows)


class TextEmbedder:
    """Turns texts into vectors with a tokenizer and an engine's text tower."""

    def __init__(self, tokenizer: TextTokenizer, encoder: TextEncoder, shape: TextModelShape,
                 max_batch_size: int, max_batch_tokens: int) -> None:
        self.tokenizer = tokenizer
        self.encoder = encoder
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.max_seq_length = min(shape.max_seq_length, LONGEST_WINDOW)
        self.dimension = shape.dimension
        self.normalizes = shape.normalizes
        self.prefix_ids, self.suffix_ids = tokenizer.prefix_ids, tokenizer.suffix_ids
        self.window_size = self.max_seq_length - len(self.prefix_ids) - len(self.suffix_ids)

    def tokenize(self, texts: Sequence[str]) -> list[TokenizedText]:
        """Tokenize every text once and split its ids into model-sized windows."""
        return [TokenizedText(split_into_windows(ids, self.window_size)) for ids in self.tokenizer.token_ids(texts)]

    def tokenized_from_ids(self, token_id_lists: Sequence[Sequence[int]]) -> list[TokenizedText]:
        """Texts given as the model's own token ids, split into windows like tokenized text."""
        return [TokenizedText(split_into_windows(list(ids), self.window_size)) for ids in token_id_lists]

    @property
    def vocabulary_size(self) -> int:
        return self.tokenizer.vocabulary_size

    def tokens_processed(self, text: TokenizedText) -> int:
        """Tokens the model processes for a text, special tokens of every window included."""
        return sum(self.tokens_per_window(window) for window in text.windows)

    def encode_windows(self, windows: Sequence[Sequence[int]]) -> np.ndarray:
        """One vector per window, in input order.

        Windows are grouped by length into forward passes of at most max_batch_size
        windows and max_batch_tokens padded tokens, so each pass pads as little as possible.
        """
        vectors = np.empty((len(windows), self.dimension), dtype=np.float32)
        lengths = [self.tokens_per_window(window) for window in windows]
        for group in plan_forward_passes(lengths, self.max_batch_tokens, self.max_batch_size):
            vectors[group] = self._forward([windows[index] for index in group])
        return vectors

    def tokens_per_window(self, window: Sequence[int]) -> int:
        """Tokens the model reads for one window, special tokens included."""
        return len(window) + len(self.prefix_ids) + len(self.suffix_ids)

    def _forward(self, windows: Sequence[Sequence[int]]) -> np.ndarray:
        input_ids, attention_mask = self.model_inputs(windows)
        return np.asarray(self.encoder.encode_text(input_ids, attention_mask), dtype=np.float32)

    def model_inputs(self, windows: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
        """Windows framed by the special tokens and padded to the longest: input ids and attention mask."""
        sequences = [self.prefix_ids + list(window) + self.suffix_ids for window in windows]
        longest = max(len(sequence) for sequence in sequences)
        input_ids = np.full((len(sequences), longest), self.tokenizer.pad_id, dtype=np.int64)
        attention_mask = np.zeros((len(sequences), longest), dtype=np.int64)
        for row, sequence in enumerate(sequences):
            input_ids[row, :len(sequence)] = sequence
            attention_mask[row, :len(sequence)] = 1
        return input_ids, attention_mask

    def combine(self, text: TokenizedText, window_vectors: np.ndarray) -> np.ndarray:
        """Average a text's window vectors, weighted by their token counts."""
        if len(text.windows) == 1:
            return window_vectors[0]
        weights = np.array([max(len(window), 1) for window in text.windows], dtype=np.float32)
        vector = (window_vectors * weights[:, None]).sum(axis=0) / weights.sum()
        if self.normalizes:
            vector = vector / max(float(np.linalg.norm(vector)), 1e-12)
        return vector.astype(np.float32)

    def combine_all(self, texts: Sequence[TokenizedText], window_vectors: np.ndarray) -> list[np.ndarray]:
        """Split the vectors of all_windows(texts) back per text and combine each text's windows."""
        vectors, start = [], 0
        for text in texts:
            end = start + len(text.windows)
            vectors.append(self.combine(text, window_vectors[start:end]))
            start = end
        return vectors

    def embed(self, texts: Sequence[str]) -> list[np.ndarray]:
        """One vector per text, in input order."""
        tokenized = self.tokenize(texts)
        return self.combine_all(tokenized, self.encode_windows(all_windows(tokenized)))


def all_windows(texts: Sequence[TokenizedText]) -> list[list[int]]:
    """Every window of every text, text after text."""
    return [window for text in texts for window in text.windows]


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


def split_into_windows(token_ids: Sequence[int], window_size: int) -> list[list[int]]:
    """Split token ids into consecutive windows of at most window_size ids (at least one window)."""
    if window_size <= 0:
        raise ValueError("window_size must be positive")
    if not token_ids:
        return [[]]
    return [list(token_ids[start:start + window_size]) for start in range(0, len(token_ids), window_size)]
