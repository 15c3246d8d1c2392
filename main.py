"""HTTP layer: the service's own routes, the errors of every route, and the app.

Each route reads the request, validates it (with http_common.py, which the
OpenAI-compatible routes of openai_api.py share), asks the embedding service for
vectors and shapes the response. Every error is JSON `{"error": "..."}`,
except under /v1, where it is OpenAI's envelope
`{"error": {"message", "type", "param", "code"}}`.
"""
from __future__ import annotations

import logging
from typing import Any

import orjson
from flask import Blueprint, Flask, Response, current_app, g, jsonify, request
from flask.json.provider import DefaultJSONProvider
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

import observability
import worker_registry
from api_docs import docs
from batcher import ModelUnavailableError, QueueFullError, RequestTimeoutError
from budget import Budget
from config import Settings, load_settings
from http_common import (ApiError, embed_images, embed_tokenized, embedding_service, is_multipart, places,
                         read_json_object, read_uploaded_image, require_api_key, require_field,
                         require_image_support, settings, text_only_model_error, tokenize_within_limits,
                         validate_image_list, validate_image_string, validate_text, validate_text_list)
from model_locator import served_model_id, without_local_paths
from observability import Metrics
from openai_api import OPENAI_PREFIX, openai_api
from service import EmbeddingService, ImagesNotSupportedError, ModelNotReadyError

logger = logging.getLogger(__name__)

health = Blueprint("health", __name__)
api = Blueprint("api", __name__)

# Seconds a client should wait before retrying while the model loads (or another instance
# replaces one whose model thread has failed), or when this worker is reading too many bodies.
LOADING_RETRY_AFTER = 5
BODIES_IN_FLIGHT_RETRY_AFTER = 1
# Bodies this small are not counted against MAX_REQUEST_BYTES_IN_FLIGHT: a large body must not turn
# away queries (a 100-text batch of full MiniLM windows is about 130 KB), and THREADS bounds them
# (64 x 256 KiB, about 50 MB while being parsed).
SMALL_BODY_BYTES = 256 * 1024

api.before_request(require_api_key)


# --- admission --------------------------------------------------------------

def admit_request_body() -> None:
    """Refuse a request at once, its body unread, when the model's queue is full or this worker already
    handles MAX_REQUEST_BYTES_IN_FLIGHT bytes of bodies; the bytes are held until the request ends."""
    size = declared_body_size()
    if size == 0 or size > settings().max_request_size:
        return  # nothing to hold, or Flask refuses it with 413 before reading it
    embedding_service().ensure_room()  # before the body is read, parsed, tokenized or decoded
    if size <= SMALL_BODY_BYTES:
        return
    bodies = current_app.extensions["bodies_in_flight"]
    if not bodies.try_take(size):
        raise ApiError(429, f"The service is busy: this worker is already handling {bodies.taken} bytes of "
                            f"request bodies (MAX_REQUEST_BYTES_IN_FLIGHT is {bodies.limit}); retry in a moment",
                       {"Retry-After": str(BODIES_IN_FLIGHT_RETRY_AFTER)}, code="server_busy")
    g.body_bytes = size


def declared_body_size() -> int:
    """The body's Content-Length; a chunked body, of unknown length, may be as large as allowed."""
    if request.content_length is not None:
        return request.content_length
    chunked = "chunked" in request.headers.get("Transfer-Encoding", "").lower()
    return settings().max_request_size if chunked else 0


def release_request_body(_error: BaseException | None) -> None:
    size = g.pop("body_bytes", 0)
    if size:
        current_app.extensions["bodies_in_flight"].give_back(size)


# --- routes ---------------------------------------------------------------

@health.get("/health")
def liveness():
    # 503 only when the model thread has ended or is stuck: a restart is what helps then.
    alive, body = embedding_service().liveness()
    return jsonify(readiness_for_anyone(body)), 200 if alive else 503


@health.get("/health/ready")
def readiness():
    ready, body = embedding_service().readiness()
    workers = worker_registry.worker_counts()
    if ready and workers is not None and not workers.all_ready:
        # This worker is ready but another still loads: a request sent to it would get 503.
        ready, body = False, {"status": "loading", "workers_ready": workers.ready, "workers": workers.running}
    return jsonify(readiness_for_anyone(body)), 200 if ready else 503


def readiness_for_anyone(body: dict[str, Any]) -> dict[str, Any]:
    """A health body without this machine's folders: the routes need no key, and the log has them."""
    name = settings().embedding_model
    shown = dict(body)
    if "model" in shown:
        shown["model"] = served_model_id(name)
    if "reason" in shown:
        shown["reason"] = without_local_paths(shown["reason"], name)
    return shown


@health.get("/metrics")
def metrics():
    # Behind the API key unless the operator opens it for a scraper without credentials.
    if not settings().metrics_public:
        require_api_key()
    return observability.metrics_response(current_app.extensions["metrics"])


@api.post("/embeddings")
def embed_text():
    text = validate_text(require_field(read_json_object(), "text"), "text")
    tokenized = tokenize_within_limits([text], ["text"])
    result = embed_tokenized(tokenized)
    return jsonify(embeddings=[result.vectors[0]])


@api.post("/embeddings/batch")
def embed_text_batch():
    texts = validate_text_list(require_field(read_json_object(), "texts"), "texts")
    tokenized = tokenize_within_limits(texts, places("texts", len(texts)))
    result = embed_tokenized(tokenized)
    return jsonify(embeddings=[[vector] for vector in result.vectors])


@api.post("/embeddings/image")
def embed_image():
    require_image_support()
    if is_multipart():
        image = read_uploaded_image("image")
    else:
        image = validate_image_string(require_field(read_json_object(), "image"), "image")
    vectors = embed_images([image], ["image"])
    return jsonify(embeddings=[vectors[0]])


@api.post("/embeddings/image/batch")
def embed_image_batch():
    require_image_support()
    if is_multipart():
        raise ApiError(400, "The batch route takes JSON {\"images\": [\"<base64>\", ...]}; upload single files "
                            "with multipart to /embeddings/image")
    images = validate_image_list(require_field(read_json_object(), "images"), "images")
    vectors = embed_images(images, places("images", len(images)))
    return jsonify(embeddings=[[vector] for vector in vectors])


# --- errors ---------------------------------------------------------------

def is_openai_route() -> bool:
    return request.path == OPENAI_PREFIX or request.path.startswith(OPENAI_PREFIX + "/")


def openai_error(status: int, message: str, param: str | None, code: str | None) -> dict[str, Any]:
    """OpenAI's error envelope; clients built on the OpenAI SDK read `message` from it."""
    # 429 is the server being busy, not the request being wrong.
    kind = "server_error" if status >= 500 or status == 429 else "invalid_request_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(status: int, message: str, headers: dict[str, str] | None = None,
                   param: str | None = None, code: str | None = None) -> Response:
    response = jsonify(openai_error(status, message, param, code) if is_openai_route() else {"error": message})
    response.status_code = status
    response.headers.update(headers or {})
    return response


def handle_api_error(error: ApiError) -> Response:
    return error_response(error.status, error.message, error.headers, error.param, error.code)


def handle_not_ready(error: ModelNotReadyError) -> Response:
    state = str(error)
    if state == "loading":
        return error_response(503, "The model is still loading; retry when GET /health/ready answers 200",
                              {"Retry-After": str(LOADING_RETRY_AFTER)}, code="model_loading")
    reason = without_local_paths(state, settings().embedding_model)
    return error_response(503, f"The model failed to load, so no embeddings can be made: {reason}",
                          code="model_load_failed")


def handle_queue_full(error: QueueFullError) -> Response:
    return error_response(429, f"The service is busy ({error}); retry in {error.retry_after} s",
                          {"Retry-After": str(error.retry_after)}, code="server_busy")


def handle_request_timeout(error: RequestTimeoutError) -> Response:
    return error_response(503, f"The model did not answer within {error.timeout:g} s (REQUEST_TIMEOUT_SECONDS): "
                               f"the service is behind; retry in {error.retry_after} s",
                          {"Retry-After": str(error.retry_after)}, code="timeout")


def handle_model_unavailable(error: ModelUnavailableError) -> Response:
    reason = without_local_paths(str(error), settings().embedding_model)
    return error_response(503, f"The model cannot serve requests now ({reason}); retry in {LOADING_RETRY_AFTER} s, "
                               f"when this instance has been restarted or another one answers",
                          {"Retry-After": str(LOADING_RETRY_AFTER)}, code="model_unavailable")


def handle_images_not_supported(error: ImagesNotSupportedError) -> Response:
    # The routes check first and name the image; this answers the same should one not.
    return handle_api_error(text_only_model_error())


def handle_too_large(error: RequestEntityTooLarge) -> Response:
    limit = settings().max_request_size
    return error_response(413, f"Request body is larger than the limit of {limit} bytes (MAX_REQUEST_SIZE)",
                          code="request_too_large")


def handle_http_error(error: HTTPException) -> Response:
    messages = {
        404: f"No route {request.path}: see GET /docs or the README for the routes this service has",
        405: f"Method {request.method} is not allowed on {request.path}",
    }
    headers = {"Allow": ", ".join(error.valid_methods)} if getattr(error, "valid_methods", None) else {}
    codes = {404: "not_found", 405: "method_not_allowed"}
    return error_response(error.code or 500, messages.get(error.code, error.description), headers,
                          code=codes.get(error.code))


def handle_unexpected_error(error: Exception) -> Response:
    logger.exception("Unexpected error on %s %s", request.method, request.path)
    return error_response(500, "Internal error while handling the request; it has been logged",
                          code="internal_error")


# --- application ----------------------------------------------------------

class VectorJSONProvider(DefaultJSONProvider):
    """JSON answers through orjson, which writes numpy vectors directly.

    Each float32 becomes its shortest decimal that reads back as the same float32, so
    vectors stay exact while the answer is about half the size and ~25x faster to write
    than with Python's json and float64 reprs (measured: 6 us against 164 us for 384 floats).
    """

    def dumps(self, obj: Any, **kwargs: Any) -> str:
        return orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY).decode("utf-8")


def create_app(app_settings: Settings | None = None, service: EmbeddingService | None = None) -> Flask:
    """Build the app; the model starts loading in the background unless a service is passed in."""
    app_settings = app_settings or load_settings()
    observability.configure_logging()
    if app_settings.uses_default_api_key:
        logger.warning("VECTOR_EMBEDDER_API_KEY is not set: the service accepts the documented default "
                       "key 'abc123'. Set your own key before exposing the service.")
    # No static folder: every route is one of ours and documented in /openapi.json.
    app = Flask(__name__, static_folder=None)
    app.json = VectorJSONProvider(app)
    app.config["SETTINGS"] = app_settings
    app.config["MAX_CONTENT_LENGTH"] = app_settings.max_request_size
    if service is None:
        service = EmbeddingService(app_settings)
        service.start_loading()
    app.extensions["embedding_service"] = service
    app_metrics = Metrics()
    app.extensions["metrics"] = app_metrics
    observability.install(app, app_metrics)
    app.extensions["bodies_in_flight"] = Budget(app_settings.max_request_bytes_in_flight)
    app.before_request(admit_request_body)
    app.teardown_request(release_request_body)
    observability.watch_model(service, app_metrics)
    app.register_blueprint(health)
    app.register_blueprint(api)
    app.register_blueprint(openai_api, url_prefix=OPENAI_PREFIX)
    app.register_blueprint(docs)
    app.register_error_handler(ApiError, handle_api_error)
    app.register_error_handler(ModelNotReadyError, handle_not_ready)
    app.register_error_handler(QueueFullError, handle_queue_full)
    app.register_error_handler(RequestTimeoutError, handle_request_timeout)
    app.register_error_handler(ModelUnavailableError, handle_model_unavailable)
    app.register_error_handler(ImagesNotSupportedError, handle_images_not_supported)
    app.register_error_handler(RequestEntityTooLarge, handle_too_large)
    app.register_error_handler(HTTPException, handle_http_error)
    app.register_error_handler(Exception, handle_unexpected_error)
    return app
