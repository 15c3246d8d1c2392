"""PyTorch and sentence-transformers: the export's reference and the fallback engine (ENGINE=torch).

The serving processes never import this module unless ENGINE=torch: torch and
sentence-transformers take seconds and hundreds of megabytes to import. At
build time it loads the model that model_export.py exports and computes the
reference vectors the export is checked against.
"""
from __future__ import annotations

import logging

import numpy as np
import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.base.modules import Normalize
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from config import Settings
from embeddings import Prompts, TextModelShape
from image_embeddings import ImagePreprocessing
from model_locator import locate_model
from text_tokenizer import TextTokenizer

logger = logging.getLogger(__name__)

NAME = "torch"


class TorchEngine:
    """The sentence-transformers model itself, run by torch in fp32."""

    name = NAME
    precision = "f32"

    def __init__(self, model: SentenceTransformer, threads: int) -> None:
        self.model = model
        self.threads = threads
        self._takes_token_types = "token_type_ids" in model.tokenizer.model_input_names

    def encode_text(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        features = {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(attention_mask),
                    "modality": "text"}
        if self._takes_token_types:
            features["token_type_ids"] = torch.zeros_like(features["input_ids"])
        return self._sentence_embeddings(features)

    def encode_images(self, pixel_values: np.ndarray) -> np.ndarray:
        return self._sentence_embeddings({"pixel_values": torch.from_numpy(pixel_values), "modality": "image"})

    def _sentence_embeddings(self, features: dict) -> np.ndarray:
        # torch's thread count is kept per calling thread (OpenMP), so it is set in the thread that
        # runs the forward passes, not in the one that loaded the model.
        if torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)
        with torch.inference_mode():
            return self.model(features)["sentence_embedding"].float().numpy()


def load_sentence_transformer(settings: Settings) -> SentenceTransformer:
    """Load the configured model on the CPU from the first place it is found."""
    location = locate_model(settings.embedding_model, settings.models_dir, settings.allow_model_download)
    logger.info("Loading model %s from %s (%s)", location.name, location.path, location.source)
    model = SentenceTransformer(location.path, device="cpu", local_files_only=location.is_local)
    return model.eval()


def load_transformers_tokenizer(settings: Settings, model: SentenceTransformer) -> PreTrainedTokenizerBase:
    """The model's own transformers tokenizer, or TOKENIZER_MODEL's when it is set."""
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


def text_tokenizer_of(transformers_tokenizer: PreTrainedTokenizerBase) -> TextTokenizer:
    """The fast (Rust) tokenizer inside a transformers tokenizer, as the serving path uses it."""
    backend = getattr(transformers_tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"{type(transformers_tokenizer).__name__} has no fast tokenizer (tokenizer.json), "
                         f"which the service needs")
    return TextTokenizer(backend, transformers_tokenizer.pad_token_id)


def text_shape_of(model: SentenceTransformer) -> TextModelShape:
    """The model's own window (its max_seq_length, within the positions it has), pooling facts and prompts."""
    if any(getattr(module, "include_prompt", True) is False for module in model):
        raise ValueError("the model's Pooling leaves the prompt's tokens out of the average (include_prompt false), "
                         "which the service does not do: its vectors would differ from the model's own")
    positions = position_limit(model)
    max_seq_length = min(model.max_seq_length or positions, positions)
    normalizes = any(isinstance(module, Normalize) for module in model)
    prompts = Prompts({name: text or "" for name, text in model.prompts.items()}, model.default_prompt_name)
    return TextModelShape(model.get_embedding_dimension(), max_seq_length, normalizes, prompts, pooling_of(model))


def pooling_of(model: SentenceTransformer) -> str:
    """How the model turns token vectors into one: its Pooling module's mode, or what its architecture does."""
    for module in model:
        config = module.get_config_dict() if hasattr(module, "get_config_dict") else {}
        if "pooling_mode" in config:
            return str(config["pooling_mode"])
    return "clip_projection" if supports_images(model) else "model_output"


def position_limit(model: SentenceTransformer) -> int:
    """The most tokens the model's text encoder has positions for (77 for CLIP, 512 for BERT and RoBERTa).

    RoBERTa-like models (XLM-R, MPNet) number positions after their padding id, so two of their
    max_position_embeddings (514) are never a token's.
    """
    config = model.transformers_model.config
    text_config = getattr(config, "text_config", None) or config
    positions = getattr(text_config, "max_position_embeddings", None)
    if positions is None:
        raise ValueError(f"{type(config).__name__} does not say how many positions the model has "
                         f"(max_position_embeddings); serve it with a max_seq_length in its sentence_bert_config.json")
    padding_offset = getattr(getattr(model.transformers_model, "embeddings", None), "padding_idx", None)
    return positions - (padding_offset + 1 if padding_offset is not None else 0)


def supports_images(model: SentenceTransformer) -> bool:
    """Whether the loaded model embeds images, read from its modules rather than its name."""
    return "image" in model.modalities


def image_preprocessing_of(model: SentenceTransformer) -> ImagePreprocessing:
    """The model's image processor settings, for the Pillow and numpy reproduction of its steps."""
    processor = model[0].processor
    image_processor = getattr(processor, "image_processor", processor)
    shortest_edge = _size_field(image_processor.size, "shortest_edge")
    crop_height = _size_field(image_processor.crop_size, "height")
    crop_width = _size_field(image_processor.crop_size, "width")
    if not (image_processor.do_resize and image_processor.do_center_crop and shortest_edge and crop_height
            and crop_width):
        raise ValueError(f"{type(image_processor).__name__} does not resize the shortest edge and crop the "
                         f"centre as CLIP's does; serve this model with ENGINE=torch")
    normalizes = image_processor.do_normalize
    return ImagePreprocessing(
        shortest_edge=int(shortest_edge), crop_height=int(crop_height), crop_width=int(crop_width),
        mean=tuple(float(value) for value in image_processor.image_mean) if normalizes else (0.0, 0.0, 0.0),
        std=tuple(float(value) for value in image_processor.image_std) if normalizes else (1.0, 1.0, 1.0),
        rescale_factor=float(image_processor.rescale_factor) if image_processor.do_rescale else 1.0,
        resample=int(image_processor.resample),
    )


def _size_field(size, name: str) -> int | None:
    """A field of an image processor's size, stored as a dict or as a SizeDict depending on the version."""
    return size.get(name) if isinstance(size, dict) else getattr(size, name, None)
