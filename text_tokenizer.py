"""The model's fast tokenizer, read from its tokenizer.json with the `tokenizers` library.

transformers' fast tokenizers are this same Rust tokenizer underneath, so the
serving processes get the model's exact token ids without importing
transformers or torch. Truncation and padding are switched off: the service
splits long texts into windows itself and pads each forward pass to its own longest window.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from tokenizers import Tokenizer

FRAME_PROBE = "probe"


class TextTokenizer:
    def __init__(self, backend: Tokenizer, pad_id: int | None) -> None:
        # A copy: the backend may belong to a transformers tokenizer that sets its own truncation.
        self._backend = Tokenizer.from_str(backend.to_str())
        self._backend.no_truncation()
        self._backend.no_padding()
        self.pad_id = pad_id if pad_id is not None else 0
        self.prefix_ids, self.suffix_ids = self._special_token_frame()

    @classmethod
    def from_file(cls, path: str | Path, pad_id: int | None) -> TextTokenizer:
        return cls(Tokenizer.from_file(str(path)), pad_id)

    @property
    def vocabulary_size(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)

    def token_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """The content token ids of each text, without the special tokens that frame a window."""
        encodings = self._backend.encode_batch(list(texts), add_special_tokens=False)
        return [encoding.ids for encoding in encodings]

    def prompted_token_ids(self, prompt: str, texts: Sequence[str]) -> list[tuple[list[int], list[int]]]:
        """Each text read after a prompt, as the model's own encode() reads it: prompt and text tokenized as one
        string, then split into the prompt's ids and the text's.

        Tokenizing them apart could differ at the seam (SentencePiece reads the prompt's trailing space as a
        token of its own). A token that spans the seam (a prompt that ends inside a word) is the text's.
        """
        encodings = self._backend.encode_batch([prompt + text for text in texts], add_special_tokens=False)
        split = []
        for encoding in encodings:
            in_prompt = next((index for index, (_, end) in enumerate(encoding.offsets) if end > len(prompt)),
                             len(encoding.ids))
            split.append((encoding.ids[:in_prompt], encoding.ids[in_prompt:]))
        return split

    def save(self, path: str | Path) -> None:
        self._backend.save(str(path))

    def _special_token_frame(self) -> tuple[list[int], list[int]]:
        """The special token ids the tokenizer puts before and after a single text."""
        encoding = self._backend.encode(FRAME_PROBE, add_special_tokens=True)
        ids, special = encoding.ids, encoding.special_tokens_mask
        first_content = special.index(0)
        last_content = len(special) - 1 - special[::-1].index(0)
        return list(ids[:first_content]), list(ids[last_content + 1:])
