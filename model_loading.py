"""Load the configured model on the configured engine, proven by the self-check before it serves.

ENGINE=auto serves the model exported at build time (model_export.py) on
OpenVINO: its manifest is read, its files checked, and the probe set encoded
and compared with the torch model's vectors. When the fastest precision fails
that check, full f32 precision is tried; when that fails too, loading fails
with the reason and nothing is served. ENGINE=torch serves the
sentence-transformers model itself (torch_engine.py), imported only then.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from PIL import Image

from config import Settings
from embeddings import Prompts, TextEmbedder, TextModelShape
from image_embeddings import ImageEmbedder, ImagePreprocessing
from manifest import MANIFEST_FILE, Manifest
from model_locator import hub_id, locate_export
from self_check import TEXT_BOUNDS, self_check
from text_tokenizer import TextTokenizer

logger = logging.getLogger(__name__)

EXPORT_ENGINE = "openvino"
WARM_UP_TEXT = "warm-up"
# f32 against bf16 on the same CPU, all-MiniLM-L6-v2, 1 and 2 threads (README, "Inference engine").
F32_SLOWDOWN = "2.8-3.7x"


class SelfCheckError(RuntimeError):
    """The engine does not reproduce the reference vectors at any precision; nothing may be served."""


@dataclass(frozen=True)
class LoadedModels:
    text: TextEmbedder
    images: ImageEmbedder | None  # None for a text-only model
    engine: str
    precision: str
    self_check: str | None = None  # what the start-up check found (exported models only)


def load_models(settings: Settings) -> LoadedModels:
    """The configured model, ready to serve: its first forward passes (slower than the rest) already run, its
    windows held to MAX_WINDOW_TOKENS."""
    if settings.engine == "torch":
        models = warmed_up(load_torch_models(settings))
    else:
        models = load_exported_models(settings)  # the self-check has run texts (and images) through it
    return replace(models, text=models.text.with_window_cap(settings.max_window_tokens))


def warmed_up(models: LoadedModels) -> LoadedModels:
    models.text.embed([WARM_UP_TEXT])
    if models.images is not None:
        models.images.embed([Image.new("RGB", (32, 32), "gray")])
    return models


def load_torch_models(settings: Settings, model: Any = None) -> LoadedModels:
    """The sentence-transformers model on torch; `model` when already loaded (the exporter's reference)."""
    import torch_engine

    model = model if model is not None else torch_engine.load_sentence_transformer(settings)
    engine = torch_engine.TorchEngine(model, settings.engine_threads)
    tokenizer = torch_engine.text_tokenizer_of(torch_engine.load_transformers_tokenizer(settings, model))
    text = TextEmbedder(tokenizer, engine, torch_engine.text_shape_of(model), settings.max_batch_size,
                        settings.batch_max_tokens)
    images = None
    if torch_engine.supports_images(model):
        images = ImageEmbedder(engine, torch_engine.image_preprocessing_of(model), settings.max_batch_size,
                               settings.max_image_pixels, settings.max_image_decode_bytes)
    return LoadedModels(text, images, engine.name, engine.precision)


def load_exported_models(settings: Settings) -> LoadedModels:
    folder = locate_export(settings.embedding_model, settings.models_dir, EXPORT_ENGINE, MANIFEST_FILE)
    manifest = Manifest.read(folder)
    manifest.check_files(folder)
    _check_tokenizer_setting(settings, manifest)
    if settings.engine_precision == "int8" and manifest.int8_text_model is None:
        raise SelfCheckError(f"ENGINE_PRECISION is int8 but the export of {manifest.source_model!r} has no int8 "
                             f"model: make one with `ENGINE_PRECISION=int8 make run` (or `ENGINE_PRECISION=int8 "
                             f"python download_models.py`), or build the image with --build-arg ENGINE_PRECISION=int8")
    rejected = []
    for precision in precisions_to_try(settings.engine_precision):
        models = open_export(folder, manifest, precision, settings)
        started = time.monotonic()
        result = self_check(models.text, models.images, manifest, folder,
                            TEXT_BOUNDS.get(models.precision, TEXT_BOUNDS["f32"]))
        if result.passed:
            logger.info("Self-check passed on %s %s in %.2f s: %s", models.engine, models.precision,
                        time.monotonic() - started, result.summary)
            if rejected:
                logger.warning("Serving %s: a faster precision failed the self-check (%s). f32 is %s slower than "
                               "bf16 on CPUs with bf16; ENGINE_PRECISION=f32 skips the faster ones at start-up",
                               models.precision, " / ".join(rejected), F32_SLOWDOWN)
            return LoadedModels(models.text, models.images, models.engine, models.precision, result.summary)
        logger.warning("Self-check failed on %s %s: %s", models.engine, models.precision, result.summary)
        rejected.append(f"{models.precision}: {'; '.join(result.failures[:3])}")
        if models.precision == "f32":
            break
    raise SelfCheckError(
        f"the {EXPORT_ENGINE} export of {manifest.source_model!r} does not reproduce the model's own vectors "
        f"({' / '.join(rejected)}); export it again, or serve it with ENGINE=torch")


def precisions_to_try(setting: str) -> list[str]:
    """The precisions to compile and check, in order: the one asked for, then the next ones down to f32."""
    return {"f32": ["f32"], "int8": ["int8", "auto", "f32"]}.get(setting, ["auto", "f32"])


def open_export(folder: Path, manifest: Manifest, precision: str, settings: Settings) -> LoadedModels:
    """The exported model compiled at one precision, not yet checked."""
    from openvino_engine import OpenVINOEngine

    image_model = folder / manifest.image_model if manifest.image_model else None
    text_model = folder / (manifest.int8_text_model if precision == "int8" else manifest.text_model)
    engine = OpenVINOEngine(text_model, image_model, precision, settings.engine_threads)
    tokenizer = TextTokenizer.from_file(folder / manifest.tokenizer["file"], manifest.tokenizer["pad_id"])
    shape = TextModelShape(manifest.dimension, manifest.max_seq_length, manifest.normalize,
                           Prompts(manifest.prompts, manifest.default_prompt_name), manifest.pooling)
    text = TextEmbedder(tokenizer, engine, shape, settings.max_batch_size, settings.batch_max_tokens)
    images = None
    if image_model is not None:
        images = ImageEmbedder(engine, ImagePreprocessing.from_dict(manifest.image_preprocessing),
                               settings.max_batch_size, settings.max_image_pixels, settings.max_image_decode_bytes)
    return LoadedModels(text, images, engine.name, engine.precision)


def _check_tokenizer_setting(settings: Settings, manifest: Manifest) -> None:
    """TOKENIZER_MODEL at run time must be the tokenizer the model was exported with."""
    wanted, exported = settings.tokenizer_model, manifest.tokenizer.get("source")
    if wanted and (exported is None or hub_id(wanted).lower() != hub_id(exported).lower()):
        raise SelfCheckError(f"TOKENIZER_MODEL is {wanted!r} but the model was exported with "
                             f"{exported or 'its own tokenizer'}: export it again with this TOKENIZER_MODEL")
