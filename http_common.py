"""What every API uses to read a request and answer it: the API key, the body, the validators, the
service's calls with each item's place, and the answer to an error.

main.py (the service's own routes) and openai_api.py (the OpenAI-compatible routes) build on this
module, and it on neither. One set of validators serves both; the embedding service holds every text
to the token limits and names the item at fault by its index, which becomes the item's place in the
request here (texts[3], input[3]). An error becomes each API's own envelope through `error_answer`.
"""
from __future__ import annotations

import hmac
import json
import logging
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

import numpy as np
from flask import Response, current_app, jsonify, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from config import Settings
from errors import ApiError, ItemError
from image_embeddings import check_byte_size, decode_base64_image
from model_locator import served_model_id, without_local_paths
from observability import count_work
from service import EmbeddingResult, EmbeddingService

logger = logging.getLogger(__name__)


def settings() -> Settings:
    return current_app.config["SETTINGS"]


def embedding_service() -> EmbeddingService:
    return current_app.extensions["embedding_service"]


# --- authentication -------------------------------------------------------

def key_is_valid(presented: str | None, accepted: tuple[str, ...]) -> bool:
    """Constant-time comparison against every accepted key (all are checked, whatever matches)."""
    if not presented:
        return False
    presented_bytes = presented.encode("utf-8")
    matches = [hmac.compare_digest(presented_bytes, key.encode("utf-8")) for key in accepted]
    return any(matches)


def bearer_token(authorization: str | None) -> str | None:
    """The key in an `Authorization: Bearer <key>` header, as the OpenAI clients send it."""
    scheme, _, token = (authorization or "").strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


def require_api_key() -> None:
    """Every protected route takes the key as X-API-Key or as a bearer token; either one valid is enough."""
    accepted = settings().api_keys
    presented = (request.headers.get("X-API-Key"), bearer_token(request.headers.get("Authorization")))
    if not any([key_is_valid(key, accepted) for key in presented]):
        raise ApiError(401, "Missing or invalid API key: send it in the X-API-Key header "
                            "or as 'Authorization: Bearer <key>'", code="invalid_api_key")


# --- the body ---------------------------------------------------------------

def read_json_object(not_an_object_status: int = 400) -> dict[str, Any]:
    """The request body as a JSON object, or a 400 that says what is wrong with it (a body that is JSON but no
    object gets `not_an_object_status`)."""
    parsed = read_json()
    if not isinstance(parsed, dict):
        raise ApiError(not_an_object_status, f"Request body must be a JSON object, got {json_type(parsed)}")
    return parsed


def read_json() -> Any:
    """The request body parsed as JSON, or a 400 that says why it cannot be."""
    body = request.get_data(cache=False)
    if not body:
        raise ApiError(400, "Request body is empty: send a JSON object")
    try:
        # RFC 8259: JSON between systems is UTF-8; other encodings are refused, not guessed.
        parsed = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError:
        raise ApiError(400, "Request body is not valid UTF-8 text") from None
    except ValueError as error:
        raise ApiError(400, f"Request body is not valid JSON: {error}") from None
    except RecursionError:
        raise ApiError(400, "Request body is nested too deeply to be read as JSON") from None
    return parsed


def json_type(value: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
             int: "a number", float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def require_field(body: dict[str, Any], field: str) -> Any:
    if field not in body:
        raise ApiError(400, f"Missing field {field!r} in the JSON body")
    return body[field]


def is_multipart() -> bool:
    return request.mimetype == "multipart/form-data"


# --- texts ------------------------------------------------------------------

def validate_text(value: Any, where: str) -> str:
    """A non-empty string of text within the character guard (MAX_TEXT_LENGTH), checked before tokenizing."""
    if not isinstance(value, str):
        raise ApiError(400, f"{where} must be a string, got {json_type(value)}")
    if not value.strip():
        raise ApiError(400, f"{where} is empty: send some text to embed")
    limit = settings().max_text_length
    if len(value) > limit:
        raise ApiError(413, f"{where} has {len(value)} characters; the limit is {limit} (MAX_TEXT_LENGTH)")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError(400, f"{where} holds an unpaired surrogate (\\ud800-\\udfff), which is not text") from None
    return value


def check_count(count: int, where: str, noun: str, limit: int, limit_name: str) -> None:
    if count > limit:
        raise ApiError(400, f"{where} has {count} {noun}s; the limit is {limit} ({limit_name})")


def validate_list(value: Any, where: str, described: str, noun: str, limit: int, limit_name: str) -> list[Any]:
    """A non-empty JSON array of at most `limit` items, or a 400 that says which rule it broke."""
    if not isinstance(value, list):
        raise ApiError(400, f"{where} must be an array of {described}, got {json_type(value)}")
    if not value:
        raise ApiError(400, f"{where} is empty: send at least one {noun}")
    check_count(len(value), where, noun, limit, limit_name)
    return value


def check_text_count(count: int, where: str) -> None:
    check_count(count, where, "text", settings().max_texts_per_batch, "MAX_TEXTS_PER_BATCH")


def validate_text_list(value: Any, where: str) -> list[str]:
    texts = validate_list(value, where, "strings", "text", settings().max_texts_per_batch, "MAX_TEXTS_PER_BATCH")
    return [validate_text(item, f"{where}[{index}]") for index, item in enumerate(texts)]


def is_token_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def validate_token_ids(value: list[Any], where: str) -> list[int]:
    """A non-empty list of ids of the served model's own tokenizer (texts given as the model reads them)."""
    if not value:
        raise ApiError(400, f"{where} is an empty array of token ids: send at least one token")
    vocabulary_size = embedding_service().vocabulary_size()
    for index, token in enumerate(value):
        if not is_token_id(token) or not 0 <= token < vocabulary_size:
            raise ApiError(400, f"{where}[{index}] is {token!r}, which is not a token id of this model's "
                                f"tokenizer (whole numbers from 0 to {vocabulary_size - 1})")
    return value


def validate_prompt_name(value: Any) -> str | None:
    """None (the model's default prompt, if it has one) or the name of one of its prompts (checked when used)."""
    if value is None or isinstance(value, str):
        return value
    raise ApiError(400, f"prompt_name must be a string naming one of the model's prompts, got {json_type(value)}",
                   param="prompt_name")


def places(where: str, count: int) -> list[str]:
    """The places of a list's items in error messages: texts[0], texts[1], ..."""
    return [f"{where}[{index}]" for index in range(count)]


# --- images -----------------------------------------------------------------

def require_image_support(image_at: str | None = None, status: int = 400) -> None:
    """An error with `status` when the served model embeds text only; `image_at` names the image's place in the
    request. The service's own image routes answer 501 (Not Implemented), as upstream documents; /v1 400."""
    if not embedding_service().supports_images():
        raise text_only_model_error(image_at, status)


MULTIMODAL_MODELS = "clip-ViT-B-32, clip-ViT-B-16, clip-ViT-L-14 or a local CLIP folder"


def text_only_model_error(image_at: str | None = None, status: int = 400) -> ApiError:
    subject = f"{image_at} is an image, but the model" if image_at else "The model"
    model = served_model_id(settings().embedding_model)
    return ApiError(status, f"{subject} {model!r} embeds text only, so it cannot embed images: set EMBEDDING_MODEL "
                            f"to a multimodal CLIP model ({MULTIMODAL_MODELS}) to embed images and texts in one "
                            f"vector space")


def check_image_count(count: int, where: str) -> None:
    check_count(count, where, "image", settings().max_images_per_batch, "MAX_IMAGES_PER_BATCH")


def validate_image_string(value: Any, where: str) -> bytes:
    """The image bytes of a base64 string or data URI."""
    if not isinstance(value, str):
        raise ApiError(400, f"{where} must be a base64 string or data URI, got {json_type(value)}")
    with naming_items([where]):
        return decode_base64_image(value, settings().max_image_size)


def validate_image_list(value: Any, where: str) -> list[bytes]:
    images = validate_list(value, where, "base64 strings or data URIs", "image",
                           settings().max_images_per_batch, "MAX_IMAGES_PER_BATCH")
    return [validate_image_string(item, f"{where}[{index}]") for index, item in enumerate(images)]


def read_uploaded_image(field: str) -> bytes:
    """The bytes of the file uploaded in a multipart form field."""
    upload = request.files.get(field)
    if upload is None:
        if field in request.form:
            raise ApiError(400, f"Form field {field!r} is text, not a file: upload the file with "
                                f"-F {field}=@picture.jpg, or send JSON {{\"{field}\": \"<base64>\"}}")
        raise ApiError(400, f"Missing file field {field!r} in the multipart form: upload it with "
                            f"-F {field}=@picture.jpg")
    limit = settings().max_image_size
    with naming_items([field]):
        # One byte over the limit is enough to know the file is too large.
        return check_byte_size(upload.stream.read(limit + 1), limit)


# --- the service's calls ----------------------------------------------------------

@contextmanager
def naming_items(item_places: Sequence[str]) -> Iterator[None]:
    """An error about one item of the request, with the item named by its place in the request."""
    try:
        yield
    except ItemError as error:
        raise error.at(item_places[error.index or 0]) from None


def embed_texts(texts: Sequence[str], text_places: Sequence[str], prompt_name: str | None = None,
                truncation: str | None = None) -> EmbeddingResult:
    """The texts' vectors, each text read after the prompt (and cut to one window with a truncation); their
    tokens counted for the request log and metrics."""
    with naming_items(text_places):
        result = embedding_service().embed_texts(texts, prompt_name, truncation)
    count_work(tokens=result.token_count)
    return result


def embed_token_ids(token_id_lists: Sequence[list[int]], text_places: Sequence[str],
                    truncation: str | None = None) -> EmbeddingResult:
    """The vectors of texts given as the model's token ids, counted like texts."""
    with naming_items(text_places):
        result = embedding_service().embed_token_ids(token_id_lists, truncation)
    count_work(tokens=result.token_count)
    return result


def embed_images(images: Sequence[bytes], image_places: Sequence[str]) -> list[np.ndarray]:
    """One vector per image file's bytes, each an image's place in the request, which errors name."""
    with naming_items(image_places):
        vectors = embedding_service().embed_images(images)
    count_work(images=len(images))
    return vectors


# --- errors ---------------------------------------------------------------------

def error_answer(error: Exception, envelope: Callable[[ApiError, str], dict[str, Any]]) -> Response:
    """Any error raised while handling a request, answered as JSON in an API's envelope with its status."""
    answered = as_api_error(error)
    message = answered.message
    if answered.shows_local_reason:
        message = without_local_paths(message, settings().embedding_model)
    response = jsonify(envelope(answered, message))
    response.status_code = answered.status
    response.headers.update(answered.headers)
    return response


def as_api_error(error: Exception) -> ApiError:
    if isinstance(error, ApiError):
        return error
    if isinstance(error, RequestEntityTooLarge):
        return ApiError(413, f"Request body is larger than the limit of {settings().max_request_size} bytes "
                             f"(MAX_REQUEST_SIZE)", code="request_too_large")
    if isinstance(error, HTTPException):
        return http_error(error)
    logger.exception("Unexpected error on %s %s", request.method, request.path)
    return ApiError(500, "Internal error while handling the request; it has been logged", code="internal_error")


def http_error(error: HTTPException) -> ApiError:
    """Flask's own errors (no route, a method not allowed) in the service's words."""
    if error.code == 404:
        return ApiError(404, f"No route {request.path}: see GET /docs or the README for the routes this service has",
                        code="not_found")
    if error.code == 405:
        allowed = {"Allow": ", ".join(error.valid_methods)} if error.valid_methods else {}
        return ApiError(405, f"Method {request.method} is not allowed on {request.path}", code="method_not_allowed",
                        headers=allowed)
    return ApiError(error.code or 500, error.description or error.name)
