"""What both APIs use to read a request: the API key, the body, the validators and the limits.

main.py (the service's own routes) and openai_api.py (the OpenAI-compatible routes) build on this
module, and it on neither. One set of limits and one set of validators serves both; an ApiError
becomes each API's own error envelope (main.py answers it).

Texts are limited in tokens: each text is tokenized once, here, and its token count checked
before its windows are queued for the model. A cheap character bound (MAX_TEXT_LENGTH) is checked
before tokenizing, so no text costs much to tokenize.
"""
from __future__ import annotations

import hmac
import json
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import numpy as np
from flask import current_app, request

from config import Settings
from embeddings import TokenizedText
from image_embeddings import ImageInputError, ImageTooLargeError, check_byte_size, decode_base64_image
from model_locator import served_model_id
from observability import count_work
from service import EmbeddingResult, EmbeddingService


class ApiError(Exception):
    """An error answered to the client as JSON with its HTTP status.

    `param` (the request field at fault) and `code` (a machine-readable reason)
    appear only in the OpenAI error envelope.
    """

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None,
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}
        self.param = param
        self.code = code


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

def read_json_object() -> dict[str, Any]:
    """The request body as a JSON object, or a 400 that says what is wrong with it."""
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
    if not isinstance(parsed, dict):
        raise ApiError(400, f"Request body must be a JSON object, got {json_type(parsed)}")
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


def places(where: str, count: int) -> list[str]:
    """The places of a list's items in error messages: texts[0], texts[1], ..."""
    return [f"{where}[{index}]" for index in range(count)]


# --- tokens -----------------------------------------------------------------

class RequestTokens:
    """One request's tokens, counted text by text against MAX_TOKENS_PER_TEXT and MAX_TOKENS_PER_REQUEST."""

    def __init__(self) -> None:
        self.total = 0

    def add(self, tokens: int, place: str) -> None:
        """Count one text's tokens: a 413 that says how many there are and the limit when a limit is passed."""
        check_text_tokens(tokens, place)
        self.total += tokens
        limit = settings().max_tokens_per_request
        if self.total > limit:
            raise ApiError(413, f"The texts up to {place} have {self.total} tokens; the limit per request is "
                                f"{limit} (MAX_TOKENS_PER_REQUEST): send them in several requests")


def check_text_tokens(tokens: int, place: str) -> None:
    limit = settings().max_tokens_per_text
    if tokens > limit:
        raise ApiError(413, f"{place} has {tokens} tokens; the limit is {limit} (MAX_TOKENS_PER_TEXT)")


# The character guard of MAX_TEXT_LENGTH, for all texts of a request: characters per token allowed.
CHARACTERS_PER_TOKEN_GUARD = 32


def tokenize_within_limits(texts: Sequence[str], text_places: Sequence[str]) -> list[TokenizedText]:
    """Each text tokenized once, in order, to be counted against the limits and then embedded.

    Tokenizing stops at the first text past a limit, so a refused request costs about as
    much as the largest accepted one, however much text it sent. All texts together are held to
    32 characters per token of MAX_TOKENS_PER_REQUEST before any is tokenized: a hundred texts
    that each pass the per-text guard but hold few tokens (long unsplittable strings) would
    otherwise cost seconds of tokenizing.
    """
    characters, limit = sum(map(len, texts)), CHARACTERS_PER_TOKEN_GUARD * settings().max_tokens_per_request
    if characters > limit:
        raise ApiError(413, f"The texts hold {characters} characters in all; the limit per request is {limit} "
                            f"({CHARACTERS_PER_TOKEN_GUARD} characters per token of MAX_TOKENS_PER_REQUEST): "
                            f"send them in several requests")
    counted, tokenized = RequestTokens(), []
    for text, place in zip(texts, text_places):
        [one] = embedding_service().tokenize([text])
        counted.add(one.token_count, place)
        tokenized.append(one)
    return tokenized


def token_ids_within_limits(id_lists: Sequence[list[int]], text_places: Sequence[str]) -> list[TokenizedText]:
    """Texts given as token ids, held to the limits of tokenized text."""
    counted = RequestTokens()
    for ids, place in zip(id_lists, text_places):
        counted.add(len(ids), place)
    return embedding_service().tokenized_from_ids(id_lists)


def embed_tokenized(texts: Sequence[TokenizedText]) -> EmbeddingResult:
    """The texts' vectors, their tokens counted for the request log and metrics."""
    result = embedding_service().embed_tokenized(texts)
    count_work(tokens=result.token_count)
    return result


# --- images -----------------------------------------------------------------

def require_image_support(image_at: str | None = None) -> None:
    """A 400 when the served model embeds text only; `image_at` names the image's place in the request."""
    if not embedding_service().supports_images():
        raise text_only_model_error(image_at)


MULTIMODAL_MODELS = "clip-ViT-B-32, clip-ViT-B-16, clip-ViT-L-14 or a local CLIP folder"


def text_only_model_error(image_at: str | None = None) -> ApiError:
    subject = f"{image_at} is an image, but the model" if image_at else "The model"
    model = served_model_id(settings().embedding_model)
    return ApiError(400, f"{subject} {model!r} embeds text only, so it cannot embed images: set EMBEDDING_MODEL "
                         f"to a multimodal CLIP model ({MULTIMODAL_MODELS}) to embed images and texts in one "
                         f"vector space")


def check_image_count(count: int, where: str) -> None:
    check_count(count, where, "image", settings().max_images_per_batch, "MAX_IMAGES_PER_BATCH")


def validate_image_string(value: Any, where: str) -> bytes:
    """The image bytes of a base64 string or data URI."""
    if not isinstance(value, str):
        raise ApiError(400, f"{where} must be a base64 string or data URI, got {json_type(value)}")
    with image_errors(where):
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
    with image_errors(field):
        # One byte over the limit is enough to know the file is too large.
        return check_byte_size(upload.stream.read(limit + 1), limit)


@contextmanager
def image_errors(where: str) -> Iterator[None]:
    """Turn an unusable image into a 400, or a 413 when it is over a limit, naming where it was."""
    try:
        yield
    except ImageInputError as error:
        raise image_error(error, where) from None


def image_error(error: ImageInputError, where: str) -> ApiError:
    return ApiError(413 if isinstance(error, ImageTooLargeError) else 400, f"{where} {error}")


def embed_images(images: Sequence[bytes], image_places: Sequence[str]) -> list[np.ndarray]:
    """One vector per image file's bytes, each an image's place in the request, which errors name."""
    try:
        vectors = embedding_service().embed_images(images)
    except ImageInputError as error:
        # The service numbers the images it was given; the client needs the place in its own request.
        raise image_error(error, image_places[error.index or 0]) from None
    count_work(images=len(images))
    return vectors
