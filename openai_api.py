"""OpenAI-compatible routes: POST /v1/embeddings and GET /v1/models.

They let the official OpenAI client, and frameworks built on it, use this
service by changing only the base URL and the key. Requests are read and
validated with http_common.py, as the service's own routes are; errors use
OpenAI's envelope (main.py picks it for every path under /v1).
"""
from __future__ import annotations

import base64
from contextlib import contextmanager
from typing import Any, Iterator

import numpy as np
from flask import Blueprint, jsonify

from http_common import (ApiError, embedding_service, image_errors, json_type, read_json_object, require_api_key,
                         require_field, settings, validate_image_string, validate_text)
from image_embeddings import ImageInputError
from model_locator import hub_id, served_model_id
from observability import count_work

# Routes under this prefix speak the OpenAI API, errors included.
OPENAI_PREFIX = "/v1"

openai_api = Blueprint("openai", __name__)
openai_api.before_request(require_api_key)

ENCODING_FORMATS = ("float", "base64")
IMAGE_DATA_URI_PREFIX = "data:image/"
OWNED_BY = "vector-embedder"


# --- the served model's names ---------------------------------------------

def model_aliases(name: str) -> set[str]:
    """Names a request may use for the served model, in lower case.

    The configured name, its id in responses, its hub id
    (sentence-transformers/<name> for a short name) and that id's last part.
    """
    served = served_model_id(name)
    names = {name, served, hub_id(served), hub_id(served).rsplit("/", 1)[-1]}
    return {alias.lower() for alias in names}


def validate_model(value: Any) -> str:
    name = settings().embedding_model
    if not isinstance(value, str):
        raise ApiError(400, f"model must be a string, got {json_type(value)}", param="model")
    if value.strip().lower() not in model_aliases(name):
        raise ApiError(404, f"The model {value!r} does not exist here: this service serves "
                            f"{served_model_id(name)!r} (see GET /v1/models)", param="model", code="model_not_found")
    return served_model_id(name)


# --- request fields ---------------------------------------------------------

@contextmanager
def blame(param: str) -> Iterator[None]:
    """Name the request field at fault in errors raised by the shared validators."""
    try:
        yield
    except ApiError as error:
        error.param = error.param or param
        raise


def validate_encoding_format(value: Any) -> str:
    if value not in ENCODING_FORMATS:
        raise ApiError(400, f"encoding_format must be 'float' or 'base64', got {value!r}", param="encoding_format")
    return value


def validate_dimensions(value: Any) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ApiError(400, f"dimensions must be a whole number of at least 1, got {value!r}", param="dimensions")
    model_dimension = embedding_service().dimension()
    if value > model_dimension:
        raise ApiError(400, f"dimensions is {value} but the model makes vectors of {model_dimension} components; "
                            f"ask for {model_dimension} or fewer", param="dimensions")
    return value


def is_token_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def validate_input(value: Any) -> list[str] | list[list[int]]:
    """`input` as a list of texts or a list of token id lists, per OpenAI's four accepted shapes."""
    if isinstance(value, str):
        return [validate_text_or_image(value, "input")]
    if not isinstance(value, list):
        raise ApiError(400, "input must be a string, an array of strings, an array of token ids or an array of "
                            f"arrays of token ids, got {json_type(value)}")
    if not value:
        raise ApiError(400, "input is an empty array: send at least one text or token")
    if all(is_token_id(item) for item in value):
        return [validate_token_ids(value, "input")]
    limit = settings().max_texts_per_batch
    if len(value) > limit:
        raise ApiError(400, f"input has {len(value)} items; the limit is {limit} (MAX_TEXTS_PER_BATCH)")
    if all(isinstance(item, list) for item in value):
        return [validate_token_ids(item, f"input[{index}]") for index, item in enumerate(value)]
    if all(isinstance(item, str) for item in value):
        return [validate_text_or_image(item, f"input[{index}]") for index, item in enumerate(value)]
    raise ApiError(400, "input mixes kinds of items: send all strings, all token ids or all arrays of token ids")


def validate_text_or_image(value: str, where: str) -> str:
    # Image data URIs are far longer than texts may be; split_images checks them against the image limits.
    return value if is_image_data_uri(value) else validate_text(value, where)


def validate_token_ids(value: list[Any], where: str) -> list[int]:
    if not value:
        raise ApiError(400, f"{where} is an empty array of token ids: send at least one token")
    limit = settings().max_text_length
    if len(value) > limit:
        raise ApiError(413, f"{where} has {len(value)} tokens; the limit is {limit} (MAX_TEXT_LENGTH)")
    vocabulary_size = embedding_service().vocabulary_size()
    for index, token in enumerate(value):
        if not is_token_id(token) or not 0 <= token < vocabulary_size:
            raise ApiError(400, f"{where}[{index}] is {token!r}, which is not a token id of this model's "
                                f"tokenizer (whole numbers from 0 to {vocabulary_size - 1})")
    return value


# --- images (CLIP models) ---------------------------------------------------

def is_image_data_uri(item: Any) -> bool:
    return isinstance(item, str) and item[:len(IMAGE_DATA_URI_PREFIX)].lower() == IMAGE_DATA_URI_PREFIX


def split_images(items: list[str]) -> dict[int, bytes]:
    """The image items of a text input, by index; a 400 when the model takes no images."""
    image_indexes = [index for index, item in enumerate(items) if is_image_data_uri(item)]
    if image_indexes and not embedding_service().supports_images():
        raise ApiError(400, f"input[{image_indexes[0]}] is an image, but the model "
                            f"{served_model_id(settings().embedding_model)!r} embeds text only")
    return {index: validate_image_string(items[index], f"input[{index}]") for index in image_indexes}


def embed_image_items(images: dict[int, bytes]) -> list[np.ndarray]:
    """One vector per image item; an unusable image is a 400/413 naming its place in input."""
    positions = list(images)
    with image_errors("input", in_batch=True):
        try:
            return embedding_service().embed_images(list(images.values()))
        except ImageInputError as error:
            # The service numbers the images alone; the client needs the item's place among all inputs.
            error.index = positions[error.index] if error.index is not None else None
            raise


# --- embedding --------------------------------------------------------------

def embed_input(items: list[str] | list[list[int]]) -> tuple[list[np.ndarray], int]:
    """One vector per item in input order, and the tokens processed."""
    service = embedding_service()
    if items and isinstance(items[0], list):
        result = service.embed_token_ids(items)
        count_work(tokens=result.token_count)
        return result.vectors, result.token_count
    images = split_images(items)
    text_indexes = [index for index in range(len(items)) if index not in images]
    vectors: list[np.ndarray | None] = [None] * len(items)
    token_count = 0
    if text_indexes:
        result = service.embed_texts([items[index] for index in text_indexes])
        token_count += result.token_count
        count_work(tokens=result.token_count)
        for index, vector in zip(text_indexes, result.vectors):
            vectors[index] = vector
    if images:
        # Images count no tokens: usage is about text.
        for index, vector in zip(images, embed_image_items(images)):
            vectors[index] = vector
        count_work(images=len(images))
    return vectors, token_count


def shorten(vector: np.ndarray, dimensions: int | None) -> np.ndarray:
    """The first `dimensions` components, L2-normalised again (OpenAI's `dimensions` semantics)."""
    if dimensions is None or dimensions == len(vector):
        return vector
    kept = np.asarray(vector[:dimensions], dtype=np.float32)
    return kept / max(float(np.linalg.norm(kept)), 1e-12)


def encode_vector(vector: np.ndarray, encoding_format: str) -> np.ndarray | str:
    if encoding_format == "base64":
        # Little-endian float32 bytes, as the OpenAI clients decode them.
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return np.asarray(vector, dtype=np.float32)


# --- routes -----------------------------------------------------------------

@openai_api.post("/embeddings")
def create_embeddings():
    body = read_json_object()
    with blame("model"):
        model = validate_model(require_field(body, "model"))
    with blame("input"):
        items = validate_input(require_field(body, "input"))
    encoding_format = validate_encoding_format(body.get("encoding_format", "float"))
    dimensions = validate_dimensions(body.get("dimensions"))
    with blame("input"):
        vectors, token_count = embed_input(items)
    data = [{"object": "embedding", "index": index,
             "embedding": encode_vector(shorten(vector, dimensions), encoding_format)}
            for index, vector in enumerate(vectors)]
    return jsonify(object="list", data=data, model=model,
                   usage={"prompt_tokens": token_count, "total_tokens": token_count})


@openai_api.get("/models")
def list_models():
    service = embedding_service()
    model = {
        "id": served_model_id(settings().embedding_model),
        "object": "model",
        "created": service.loaded_at,
        "owned_by": OWNED_BY,
        "dimension": service.dimension(),
        "max_sequence_length": service.max_sequence_length(),
    }
    return jsonify(object="list", data=[model])
