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

from dataclasses import dataclass, field, replace
from typing import Protocol, Sequence

import numpy as np

from errors import ApiError
from text_tokenizer import TextTokenizer


class TextEncoder(Protocol):
    """An engine's text tower: one vector per row of padded token ids."""

    def encode_text(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray: ...


# Truncation keeps a text's first window's worth of tokens (right: the end is cut) or its last (left).
TRUNCATE_RIGHT, TRUNCATE_LEFT = "right", "left"


class UnknownPromptError(ApiError):
    """A request named a prompt the model does not have."""

    def __init__(self, name: str, known: list[str]) -> None:
        names = ", ".join(repr(known_name) for known_name in known)
        super().__init__(400, f"prompt_name {name!r} is not a prompt of this model: "
                              + (f"its prompts are {names}" if known else "it has no prompts"),
                         code="unknown_prompt", param="prompt_name")


@dataclass(frozen=True)
class Prompts:
    """The model's prompts, as sentence-transformers keeps them (`prompts`, `default_prompt_name`).

    A text is read after its prompt, as the model's encode() reads it: the named prompt, or the default
    one when a request names none.
    """
    texts: dict[str, str] = field(default_factory=dict)
    default_name: str | None = None

    def text_of(self, name: str | None) -> str:
        """The prompt a request's texts are read after ('' for none); UnknownPromptError for a name not known."""
        if name is None:
            return self.texts.get(self.default_name, "") if self.default_name else ""
        if name not in self.texts:
            raise UnknownPromptError(name, sorted(self.texts))
        return self.texts[name]


@dataclass(frozen=True)
class TextModelShape:
    """What the text pipeline needs to know of a model besides its tokenizer."""
    dimension: int
    max_seq_length: int  # tokens in one window, special tokens included
    normalizes: bool  # the model ends with a Normalize module
    prompts: Prompts = Prompts()
    pooling: str = "mean"  # how the model pools token vectors (its Pooling module's mode, or its architecture's)


@dataclass(frozen=True)
class TokenizedText:
    """One text as the windows of token ids the model will see, special tokens aside.

    With a prompt, every window starts with the prompt's ids (`prompt_length` of them), so a long text is
    read with the same instruction throughout.
    """
    windows: list[list[int]]
    prompt_length: int = 0

    @property
    def token_count(self) -> int:
        """Tokens of every window, the prompt's included: what the token limits count."""
        return sum(len(window) for window in self.windows)

    @property
    def prompt_tokens(self) -> int:
        """The prompt's share of token_count."""
        return self.prompt_length * len(self.windows)

    def text_tokens(self, window: int) -> int:
        """The text's own tokens in one window: its weight in the text's average."""
        return len(self.windows[window]) - self.prompt_length


class TextEmbedder:
    """Turns texts into vectors with a tokenizer and an engine's text tower."""

    def __init__(self, tokenizer: TextTokenizer, encoder: TextEncoder, shape: TextModelShape,
                 max_batch_size: int, max_batch_tokens: int) -> None:
        self.tokenizer = tokenizer
        self.encoder = encoder
        self.shape = shape
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.max_seq_length = shape.max_seq_length
        self.dimension = shape.dimension
        self.normalizes = shape.normalizes
        self.prompts = shape.prompts
        self.pooling = shape.pooling
        self.prefix_ids, self.suffix_ids = tokenizer.prefix_ids, tokenizer.suffix_ids
        self.window_size = self.max_seq_length - len(self.prefix_ids) - len(self.suffix_ids)

    def with_window_cap(self, max_window_tokens: int) -> TextEmbedder:
        """This embedder with windows of at most max_window_tokens tokens (special tokens included)."""
        if max_window_tokens >= self.max_seq_length:
            return self
        shape = replace(self.shape, max_seq_length=max_window_tokens)
        return TextEmbedder(self.tokenizer, self.encoder, shape, self.max_batch_size, self.max_batch_tokens)

    def tokenize(self, texts: Sequence[str], prompt_name: str | None = None,
                 truncation: str | None = None) -> list[TokenizedText]:
        """Tokenize every text once, after its prompt, and split its ids into model-sized windows.

        With `truncation` a text longer than one window is cut to one instead: "right" keeps its first tokens,
        "left" its last (the prompt stays either way). UnknownPromptError when the model has no such prompt.
        """
        prompt = self.prompts.text_of(prompt_name)
        if not prompt:
            return [self._windows([], ids, truncation) for ids in self.tokenizer.token_ids(texts)]
        return [self._windows(prompt_ids, ids, truncation)
                for prompt_ids, ids in self.tokenizer.prompted_token_ids(prompt, texts)]

    def tokenized_from_ids(self, token_id_lists: Sequence[Sequence[int]],
                           truncation: str | None = None) -> list[TokenizedText]:
        """Texts given as the model's own token ids, split into windows (or truncated) like tokenized text."""
        return [self._windows([], list(ids), truncation) for ids in token_id_lists]

    def _windows(self, prompt_ids: list[int], ids: list[int], truncation: str | None) -> TokenizedText:
        room = self.window_size - len(prompt_ids)
        if room <= 0:
            raise ApiError(400, f"The prompt has {len(prompt_ids)} tokens, which leave no room for text in the "
                                f"model's window of {self.window_size}: name another prompt_name",
                           param="prompt_name")
        if truncation is not None and len(ids) > room:
            ids = ids[:room] if truncation == TRUNCATE_RIGHT else ids[-room:]
        return TokenizedText([prompt_ids + window for window in split_into_windows(ids, room)], len(prompt_ids))

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
        weights = np.array([max(text.text_tokens(index), 1) for index in range(len(text.windows))],
                           dtype=np.float32)
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

    def embed(self, texts: Sequence[str], prompt_name: str | None = None) -> list[np.ndarray]:
        """One vector per text, in input order, each read after the prompt (see tokenize)."""
        tokenized = self.tokenize(texts, prompt_name)
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
