"""Export a sentence-transformers model for the serving engine, at build or set-up time.

The exporter is OpenVINO's own `convert_model`, given the whole
sentence-transformers pipeline as one torch module: the transformer and the
model's own Pooling, Dense and Normalize modules (or CLIP's projection) are
traced, not reimplemented, so pooling and normalisation stay exactly the
model's. optimum-intel (what sentence-transformers' backend="openvino" uses)
exports only the transformer and would leave pooling to code of ours, and it
pulls in a much larger dependency tree for no gain here.

The transformer is traced with eager attention, whatever it was loaded
with: transformers' sdpa path hands the attention a boolean mask, which
OpenVINO turns into -inf, so a query row that may attend to no key comes out
NaN. In ModernBERT's local-attention layers every padding position farther
than half the window (64 tokens) from the text is such a row, and the NaN
spreads to the text's vector. Eager attention adds the lowest float instead,
and OpenVINO fuses it into the same ScaledDotProductAttention op (measured on
all-MiniLM-L6-v2: the same ops, speed within the 6% noise of the measurement).
Its float masks cost memory only in windows of thousands of tokens (one
8,000-token window of a 6-layer ModernBERT: 1.42 GB against sdpa's 1.05 GB).
The reference vectors are computed with the attention the model was loaded
with, so the self-check compares the traced graph with what
sentence-transformers itself gives.

The weights are saved in f32 (OpenVINO would otherwise halve them to f16);
the precision used for serving is picked when the model is compiled. The
manifest next to the model files records reference vectors of the probe set
computed by the torch model through the same tokenizing and windows, for the
start-up self-check (self_check.py).
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager
from dataclasses import replace
from importlib.metadata import version
from pathlib import Path
from typing import Iterator

import numpy as np
import openvino as ov
import torch
from sentence_transformers import SentenceTransformer
from transformers import PreTrainedModel

import torch_engine
from config import Settings
from manifest import (PROBE_IMAGE_FOLDER, PROBE_TEXTS, PROMPTED_PROBES, Manifest, ProbeImage, ProbeText, fingerprint,
                      probe_images, read_source_record, source_files, write_source_record)
from model_loading import EXPORT_ENGINE, load_torch_models

TEXT_MODEL_FILE = "text.xml"
IMAGE_MODEL_FILE = "image.xml"
TOKENIZER_FILE = "tokenizer.json"
# Example inputs for tracing: two rows, the second padded, so the traced graph keeps the
# attention mask's path (a mask of only ones may be dropped by the attention code).
EXAMPLE_TEXTS = ("an example sentence for tracing the model", "short")
EXAMPLE_IMAGES = 2
# The attention implementation traced (see the module's docstring for why not sdpa).
TRACED_ATTENTION = "eager"


class ExportError(RuntimeError):
    """The model could not be exported; the message says which and why."""


class _TextTower(torch.nn.Module):
    """The sentence-transformers pipeline for texts, with plain tensors in and the sentence embedding out."""

    def __init__(self, model, takes_token_types: bool) -> None:
        super().__init__()
        self.model = model
        self.takes_token_types = takes_token_types

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None):
        features = {"input_ids": input_ids, "attention_mask": attention_mask, "modality": "text"}
        if self.takes_token_types:
            features["token_type_ids"] = token_type_ids
        return self.model(features)["sentence_embedding"]


class _ImageTower(torch.nn.Module):
    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor):
        return self.model({"pixel_values": pixel_values, "modality": "image"})["sentence_embedding"]


def export_model(settings: Settings, source: Path, target: Path) -> Manifest:
    """Export the sentence-transformers model in folder `source` into folder `target` (which must exist)."""
    source_settings = replace(settings, embedding_model=str(source), engine="torch")
    model = torch_engine.load_sentence_transformer(source_settings)
    reference = load_torch_models(source_settings, model)
    transformers_tokenizer = torch_engine.load_transformers_tokenizer(source_settings, model)
    takes_token_types = "token_type_ids" in transformers_tokenizer.model_input_names
    try:
        with _traced_attention(model):
            _convert(_TextTower(model, takes_token_types), _example_text_inputs(reference, takes_token_types),
                     target / TEXT_MODEL_FILE)
            if reference.images is not None:
                size = reference.images.preprocessing
                example = torch.randn(EXAMPLE_IMAGES, 3, size.crop_height, size.crop_width)
                _convert(_ImageTower(model), (example,), target / IMAGE_MODEL_FILE)
    except Exception as error:  # the converter raises many kinds; each means the same to the build
        raise ExportError(f"OpenVINO cannot convert model {settings.embedding_model!r}: "
                          f"{type(error).__name__}: {error}") from error
    reference.text.tokenizer.save(target / TOKENIZER_FILE)
    baked_files = _baked_files(source)
    manifest = Manifest(
        source_model=settings.embedding_model,
        source_fingerprint=fingerprint(baked_files),
        source_files=baked_files,
        engine=EXPORT_ENGINE,
        weights_precision="f32",
        dimension=reference.text.dimension,
        max_seq_length=reference.text.max_seq_length,
        pooling=reference.text.pooling,
        normalize=reference.text.normalizes,
        modules=[type(module).__name__ for module in model],
        tokenizer={"file": TOKENIZER_FILE, "pad_id": reference.text.tokenizer.pad_id,
                   "source": settings.tokenizer_model},
        prompts=dict(reference.text.prompts.texts),
        default_prompt_name=reference.text.prompts.default_name,
        text_model=TEXT_MODEL_FILE,
        image_model=IMAGE_MODEL_FILE if reference.images is not None else None,
        image_preprocessing=reference.images.preprocessing.to_dict() if reference.images is not None else None,
        exported_with={name: version(name) for name in
                       ("torch", "sentence-transformers", "transformers", "openvino", "tokenizers")},
        probe_texts=_probe_texts(model, reference, transformers_tokenizer),
        probe_images=_probe_images(model, target) if reference.images is not None else [],
    )
    manifest.record_files(target)
    manifest.write(target)
    return manifest


def _example_text_inputs(reference, takes_token_types: bool) -> tuple[torch.Tensor, ...]:
    text = reference.text
    input_ids, attention_mask = (torch.from_numpy(array) for array in
                                 text.model_inputs(text.tokenizer.token_ids(list(EXAMPLE_TEXTS))))
    if takes_token_types:
        return input_ids, attention_mask, torch.zeros_like(input_ids)
    return input_ids, attention_mask


@contextmanager
def _traced_attention(model: SentenceTransformer) -> Iterator[None]:
    """The model's transformers attend with TRACED_ATTENTION while traced, and as loaded again afterwards."""
    transformers = [module for module in model.modules() if isinstance(module, PreTrainedModel)]
    loaded = [transformer.config._attn_implementation for transformer in transformers]
    for transformer in transformers:
        transformer.set_attn_implementation(TRACED_ATTENTION)
    try:
        yield
    finally:
        for transformer, attention in zip(transformers, loaded):
            transformer.set_attn_implementation(attention)


def _convert(tower: torch.nn.Module, example: tuple[torch.Tensor, ...], path: Path) -> None:
    tower.eval()
    # Tracing warns wherever the model's code branches on a tensor's value; whether the traced graph
    # generalises is what the self-check proves, on probes of other lengths and batch sizes.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        converted = ov.convert_model(tower, example_input=example)
    # The batch varies, and a text's length; an image's channels and size do not.
    for port, tensor in zip(converted.inputs, example):
        varying = 2 if tensor.dim() == 2 else 1
        port.get_node().set_partial_shape(ov.PartialShape([-1] * varying + list(tensor.shape[varying:])))
    converted.validate_nodes_and_infer_types()
    ov.save_model(converted, str(path), compress_to_fp16=False)


def _baked_files(folder: Path) -> dict[str, str]:
    """What the baked folder was made from; recorded now for a folder baked before such records were kept."""
    files = read_source_record(folder)
    if files is None:
        files = source_files(folder)
        write_source_record(folder, files)
    return files


def _probe_texts(model: SentenceTransformer, reference, transformers_tokenizer) -> list[ProbeText]:
    """Every probe text as the model reads it by default, then a few after each of its prompts."""
    probes = _probe_group(model, reference, transformers_tokenizer, dict(PROBE_TEXTS), None)
    for prompt_name, prompt in sorted(reference.text.prompts.texts.items()):
        if prompt:  # an empty prompt reads texts as they are: the probes above
            named = {f"{name} after prompt {prompt_name!r}": PROBE_TEXTS[name] for name in PROMPTED_PROBES}
            probes += _probe_group(model, reference, transformers_tokenizer, named, prompt_name)
    return probes


def _probe_group(model: SentenceTransformer, reference, transformers_tokenizer, texts: dict[str, str],
                 prompt_name: str | None) -> list[ProbeText]:
    """Probes with their reference vectors: the model's own encode() for the texts that fit in one window, so
    the check compares with the model itself; for a longer text (encode() would cut it), the torch model
    through the service's windows and average."""
    tokenized = reference.text.tokenize(list(texts.values()), prompt_name)
    one_window = [text for text, windows in zip(texts.values(), tokenized) if len(windows.windows) == 1]
    encoded = dict(zip(one_window, model.encode(one_window, prompt_name=prompt_name, convert_to_numpy=True,
                                                show_progress_bar=False)))
    probes = []
    for name, text in texts.items():
        vector = encoded[text] if text in encoded else reference.text.embed([text], prompt_name)[0]
        token_ids = list(transformers_tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
        probes.append(ProbeText(name, text, token_ids, np.asarray(vector, dtype=np.float32).tolist(), prompt_name))
    return probes


def _probe_images(model: SentenceTransformer, target: Path) -> list[ProbeImage]:
    """The probe images saved as PNG, with vectors from the model's own preprocessing (transformers')."""
    folder = target / PROBE_IMAGE_FOLDER
    folder.mkdir()
    images = probe_images()
    vectors = model.encode(list(images.values()), convert_to_numpy=True, show_progress_bar=False)
    probes = []
    for (name, image), vector in zip(images.items(), vectors):
        file = f"{PROBE_IMAGE_FOLDER}/{name}.png"
        image.save(target / file)
        probes.append(ProbeImage(name, file, np.asarray(vector, dtype=np.float32).tolist()))
    return probes
