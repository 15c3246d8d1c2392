"""Routes of Hugging Face text-embeddings-inference (TEI): POST /embed, POST / and GET /info.

Tools built for TEI (huggingface_hub's InferenceClient.feature_extraction, and LangChain, LlamaIndex,
Haystack and Chroma through it or directly) work with this service unchanged: the same request fields
and answers as TEI's router (router/src/http/server.rs and types.rs), and TEI's error envelope
`{"error": "...", "error_type": "..."}` with the statuses TEI's code gives each error type. The limits
and validators are the other APIs' (http_common.py). Where this service differs by design:

- `truncate` false (the default) with a text longer than the model's window: TEI answers 422, this
  service splits the text into windows and averages them, as on its other routes;
- `normalize` false gives the model's own output; for a model that ends with a Normalize module that
  is a unit vector still (TEI leaves that module out);
- `prompt_name` with token ids is refused (the ids are read as they are);
- at most MAX_TEXTS_PER_BATCH inputs per request (TEI's max_client_batch_size).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flask import Blueprint, Response, jsonify

from embeddings import TRUNCATE_LEFT, TRUNCATE_RIGHT
from errors import ApiError
from http_common import (embed_texts, embed_token_ids, embedding_service, error_answer, is_token_id, json_type,
                         read_json_object, require_api_key, settings, validate_prompt_name, validate_text,
                         validate_token_ids)
from model_locator import served_model_id

tei_api = Blueprint("tei", __name__)
tei_api.before_request(require_api_key)

SERVICE_VERSION = "1.0.0"
TRUNCATION_DIRECTIONS = {"right": TRUNCATE_RIGHT, "Right": TRUNCATE_RIGHT, "left": TRUNCATE_LEFT,
                         "Left": TRUNCATE_LEFT}
# TEI's names of the precision a model computes in, and of its pooling.
MODEL_DTYPES = {"f32": "float32", "bf16": "bfloat16", "f16": "float16"}
POOLINGS = {"lasttoken": "last_token", "cls": "cls", "mean": "mean"}
EMPTY_INPUT = "empty_input"
UNREADABLE_BODY = "unreadable_body"


# --- errors -------------------------------------------------------------------

def tei_error(error: ApiError) -> tuple[int, str]:
    """The status and error_type TEI's server.rs gives an error of this kind.

    Empty inputs are 400 Empty; every other fault of the request (a field, a limit, a prompt) is 422
    Validation, as since TEI 1.9; a busy queue 429 Overloaded; a model that cannot serve 503 Unhealthy;
    a model that failed on the request 424 Backend. The key, the route, the method and the body's size
    keep their own statuses.
    """
    if error.code == EMPTY_INPUT:
        return 400, "Empty"
    if error.code == UNREADABLE_BODY:
        return 400, "Validation"
    if error.status in (400, 413) and error.code != "request_too_large":
        return 422, "Validation"
    if error.status == 429:
        return 429, "Overloaded"
    if error.status == 503:
        return 503, "Unhealthy"
    if error.status >= 500:
        return 424, "Backend"
    return error.status, "Validation"


def tei_envelope(error: ApiError, message: str) -> dict[str, Any]:
    return {"error": message, "error_type": tei_error(error)[1]}


@tei_api.errorhandler(Exception)
def answer_tei_error(error: Exception) -> Response:
    response = error_answer(error, tei_envelope)
    if isinstance(error, ApiError):
        response.status_code = tei_error(error)[0]
    return response


# --- the request ----------------------------------------------------------------

@dataclass(frozen=True)
class TeiRequest:
    """`inputs` by their index (texts, and token id lists), and the options TEI reads."""
    texts: dict[int, str] = field(default_factory=dict)
    token_ids: dict[int, list[int]] = field(default_factory=dict)
    single: bool = False  # one string or one list of token ids: errors name it "inputs"
    normalize: bool = True
    truncation: str | None = None
    prompt_name: str | None = None
    dimensions: int | None = None

    def place(self, index: int) -> str:
        return "inputs" if self.single else f"inputs[{index}]"


def read_embed_request() -> TeiRequest:
    # TEI answers a body that is no JSON 400, and JSON of the wrong shape 422.
    try:
        body = read_json_object(not_an_object_status=422)
    except ApiError as error:
        if error.status != 400:
            raise
        raise ApiError(400, error.message, code=UNREADABLE_BODY) from None
    if "inputs" not in body:
        raise ApiError(422, "Missing field 'inputs' in the JSON body")
    texts, token_ids, single = validate_inputs(body["inputs"])
    truncate = validate_flag(body, "truncate", default=False, nullable=True)
    direction = validate_direction(body.get("truncation_direction", "Right"))
    request = TeiRequest(texts, token_ids, single, normalize=validate_flag(body, "normalize", default=True),
                         truncation=direction if truncate else None,
                         prompt_name=validate_prompt_name(body.get("prompt_name")),
                         dimensions=validate_dimensions(body.get("dimensions")))
    if request.prompt_name is not None and request.token_ids:
        raise ApiError(422, f"prompt_name {request.prompt_name!r} cannot apply to token ids, which the model reads "
                            f"as they are: send texts with prompt_name, or the token ids without it")
    return request


def validate_inputs(value: Any) -> tuple[dict[int, str], dict[int, list[int]], bool]:
    """TEI's `inputs`: a string, a list of token ids (one input), or a list of strings and token id lists."""
    if isinstance(value, str):
        return {0: validate_one_text(value, "inputs")}, {}, True
    if not isinstance(value, list):
        raise ApiError(422, f"inputs must be a string, a list of strings or a list of token ids, "
                            f"got {json_type(value)}")
    if not value:
        raise empty_inputs("inputs")
    if all(is_token_id(item) for item in value):
        return {}, {0: validate_ids(value, "inputs")}, True
    limit = settings().max_texts_per_batch
    if len(value) > limit:
        raise ApiError(422, f"batch size {len(value)} > maximum allowed batch size {limit} (MAX_TEXTS_PER_BATCH)")
    texts, token_ids = {}, {}
    for index, item in enumerate(value):
        where = f"inputs[{index}]"
        if isinstance(item, str):
            texts[index] = validate_one_text(item, where)
        elif isinstance(item, list):
            token_ids[index] = validate_ids(item, where)
        else:
            raise ApiError(422, f"{where} must be a string or a list of token ids, got {json_type(item)}")
    return texts, token_ids, False


def validate_one_text(value: str, where: str) -> str:
    if not value.strip():
        raise empty_inputs(where)
    return validate_text(value, where)


def validate_ids(value: list[Any], where: str) -> list[int]:
    if not value:
        raise empty_inputs(where)
    return validate_token_ids(value, where)


def empty_inputs(where: str) -> ApiError:
    return ApiError(400, f"Input validation error: `inputs` cannot be empty ({where} holds no text or tokens)",
                    code=EMPTY_INPUT)


def validate_flag(body: dict[str, Any], name: str, default: bool, nullable: bool = False) -> bool:
    value = body.get(name, default)
    if value is None and nullable:
        return default
    if not isinstance(value, bool):
        raise ApiError(422, f"{name} must be true or false, got {json_type(value)}")
    return value


def validate_direction(value: Any) -> str:
    if not isinstance(value, str) or value not in TRUNCATION_DIRECTIONS:
        raise ApiError(422, f"truncation_direction must be 'Right' or 'Left', got {value!r}")
    return TRUNCATION_DIRECTIONS[value]


def validate_dimensions(value: Any) -> int | None:
    if value is None:
        return None
    if not is_token_id(value) or value < 0:
        raise ApiError(422, f"dimensions must be a whole number, got {value!r}")
    if value == 0:
        raise ApiError(422, "Input validation error: `dimensions` should be positive")
    model_dimension = embedding_service().dimension()
    if value > model_dimension:
        raise ApiError(422, f"Input validation error: `dimensions` should be smaller than the maximum embedding "
                            f"dimension: the model makes vectors of {model_dimension} components")
    return value


# --- embedding ------------------------------------------------------------------

def embed_request(request: TeiRequest) -> list[np.ndarray]:
    """One vector per input, in input order, shortened to `dimensions` and normalised as asked."""
    vectors: dict[int, np.ndarray] = {}
    if request.texts:
        result = embed_texts(list(request.texts.values()), [request.place(index) for index in request.texts],
                             request.prompt_name, request.truncation)
        vectors.update(zip(request.texts, result.vectors))
    if request.token_ids:
        result = embed_token_ids(list(request.token_ids.values()),
                                 [request.place(index) for index in request.token_ids], request.truncation)
        vectors.update(zip(request.token_ids, result.vectors))
    # A model that normalises its own output already gives unit vectors: dividing again would only move
    # their last bits away from what the other routes answer.
    renormalize = request.normalize and (request.dimensions is not None or not embedding_service().normalizes())
    return [shaped(vectors[index], request.dimensions, renormalize) for index in sorted(vectors)]


def shaped(vector: np.ndarray, dimensions: int | None, normalize: bool) -> np.ndarray:
    """TEI's order: keep the first `dimensions` components, then L2-normalise if asked."""
    kept = np.asarray(vector[:dimensions] if dimensions else vector, dtype=np.float32)
    return kept / max(float(np.linalg.norm(kept)), 1e-12) if normalize else kept


# --- routes -------------------------------------------------------------------

@tei_api.post("/embed")
def embed():
    return jsonify(embed_request(read_embed_request()))


@tei_api.post("/")
def feature_extraction():
    """What huggingface_hub's InferenceClient posts to, given the service's URL: TEI answers it like /embed."""
    return embed()


@tei_api.get("/info")
def info():
    service, app_settings = embedding_service(), settings()
    model_id = served_model_id(app_settings.embedding_model)
    return jsonify({
        "model_id": model_id,
        "model_sha": None,
        "model_dtype": MODEL_DTYPES.get(service.precision(), service.precision()),
        "served_model_name": model_id,
        "model_type": {"embedding": {"pooling": POOLINGS.get(service.pooling(), service.pooling())}},
        "max_concurrent_requests": app_settings.workers * app_settings.threads,
        "max_input_length": service.max_sequence_length(),
        "max_batch_tokens": app_settings.batch_max_tokens,
        "max_batch_requests": None,
        "max_client_batch_size": app_settings.max_texts_per_batch,
        "auto_truncate": False,
        "tokenization_workers": app_settings.workers * app_settings.threads,
        "version": SERVICE_VERSION,
        "sha": None,
        "docker_label": None,
    })
