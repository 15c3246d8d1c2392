"""OpenAI-compatible routes: POST /v1/embeddings and GET /v1/models.

They let the official OpenAI client, and frameworks built on it, use this
service by changing only the base URL and the key. Requests are read and
validated with http_common.py, as the service's own routes are; errors use
OpenAI's envelope, answered by this blueprint's own error handler.
"""
from __future__ import annotations

import base64
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import numpy as np
from flask import Blueprint, Response, jsonify

from errors import ApiError
from http_common import (check_image_count, check_text_count, embed_images, embed_texts, embed_token_ids, is_token_id,
                         embedding_service, error_answer, json_type, read_json_object, require_api_key,
                         require_field, require_image_support, settings, validate_image_string,
                         validate_prompt_name, validate_text, validate_token_ids)
from model_locator import hub_id, served_model_id

# Routes under this prefix speak the OpenAI API, errors included.
OPENAI_PREFIX = "/v1"

ENCODING_FORMATS = ("float", "base64")
IMAGE_DATA_URI_PREFIX = "data:image/"
OWNED_BY = "vector-embedder"

openai_api = Blueprint("openai", __name__)
openai_api.before_request(require_api_key)


def openai_envelope(error: ApiError, message: str) -> dict[str, Any]:
    """OpenAI's error envelope; clients built on the OpenAI SDK read `message` from it."""
    # 429 is the server being busy, not the request being wrong.
    kind = "server_error" if error.status >= 500 or error.status == 429 else "invalid_request_error"
    return {"error": {"message": message, "type": kind, "param": error.param, "code": error.code}}


@openai_api.errorhandler(Exception)
def answer_openai_error(error: Exception) -> Response:
    return error_answer(error, openai_envelope)


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
    """Name the request field at fault in the errors it causes (not in the service being busy or down)."""
    try:
        yield
    except ApiError as error:
        if error.status < 500 and error.status != 429:
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


@dataclass(frozen=True)
class Input:
    """`input`'s items by their index in it: texts or token id lists, and images (CLIP models)."""
    texts: dict[int, str] = field(default_factory=dict)
    token_ids: dict[int, list[int]] = field(default_factory=dict)
    images: dict[int, bytes] = field(default_factory=dict)
    single: bool = False  # one string or one list of token ids: errors name it "input"

    def place(self, index: int) -> str:
        return item_place(index, self.single)

    def places(self, indexes: Iterable[int]) -> list[str]:
        return [self.place(index) for index in indexes]


def validate_input(value: Any) -> Input:
    """`input` in one of OpenAI's four shapes, within the limits of the service's own routes."""
    if isinstance(value, str):
        return validate_strings([value], single=True)
    if not isinstance(value, list):
        raise ApiError(400, "input must be a string, an array of strings, an array of token ids or an array of "
                            f"arrays of token ids, got {json_type(value)}")
    if not value:
        raise ApiError(400, "input is an empty array: send at least one text or token")
    if all(is_token_id(item) for item in value):
        return Input(token_ids={0: validate_token_ids(value, "input")}, single=True)
    if all(isinstance(item, list) for item in value):
        check_text_count(len(value), "input")
        return Input(token_ids={index: validate_token_ids(item, f"input[{index}]") for index, item in enumerate(value)})
    if all(isinstance(item, str) for item in value):
        return validate_strings(value, single=False)
    raise ApiError(400, "input mixes kinds of items: send all strings, all token ids or all arrays of token ids")


def item_place(index: int, single: bool) -> str:
    return "input" if single else f"input[{index}]"


def validate_strings(items: list[str], single: bool) -> Input:
    """Texts and, with a CLIP model, image data URIs: at most MAX_TEXTS_PER_BATCH and MAX_IMAGES_PER_BATCH."""
    image_indexes = [index for index, item in enumerate(items) if is_image_data_uri(item)]
    if image_indexes:
        require_image_support(item_place(image_indexes[0], single))
    check_text_count(len(items) - len(image_indexes), "input")
    check_image_count(len(image_indexes), "input")
    images = {index: validate_image_string(items[index], item_place(index, single)) for index in image_indexes}
    texts = {index: validate_text(item, item_place(index, single)) for index, item in enumerate(items)
             if index not in images}
    return Input(texts=texts, images=images, single=single)


def is_image_data_uri(item: Any) -> bool:
    return isinstance(item, str) and item[:len(IMAGE_DATA_URI_PREFIX)].lower() == IMAGE_DATA_URI_PREFIX


# --- embedding --------------------------------------------------------------

def validate_prompt_for(items: Input, prompt_name: str | None) -> str | None:
    """A prompt names how texts are read; token ids are read as they are, so a prompt with them is refused."""
    if prompt_name is not None and items.token_ids:
        known = ", ".join(repr(name) for name in sorted(embedding_service().prompts().texts)) or "none"
        raise ApiError(400, f"prompt_name {prompt_name!r} cannot apply to token ids, which the model reads as they "
                            f"are: send texts with prompt_name, or the token ids without it (this model's prompts: "
                            f"{known})", param="prompt_name")
    return prompt_name


def embed_input(items: Input, prompt_name: str | None = None) -> tuple[list[np.ndarray], int]:
    """One vector per item in input order, and the tokens processed (images count none: usage is about text).

    Texts go first: they are held to their limits before anything of the request reaches the model.
    """
    vectors: dict[int, np.ndarray] = {}
    token_count = 0
    if items.texts or items.token_ids:
        result = (embed_token_ids(list(items.token_ids.values()), items.places(items.token_ids)) if items.token_ids
                  else embed_texts(list(items.texts.values()), items.places(items.texts), prompt_name))
        vectors.update(zip([*items.texts, *items.token_ids], result.vectors))
        token_count = result.token_count
    if items.images:
        vectors.update(zip(items.images, embed_images(list(items.images.values()), items.places(items.images))))
    return [vectors[index] for index in sorted(vectors)], token_count


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
    prompt_name = validate_prompt_for(items, validate_prompt_name(body.get("prompt_name")))
    with blame("input"):
        vectors, token_count = embed_input(items, prompt_name)
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
        "prompts": service.prompts().texts,
        "default_prompt_name": service.prompts().default_name,
    }
    return jsonify(object="list", data=[model])
