"""HTTP layer: the service's own routes, the app and its error answers.

Each route reads the request, validates it (with http_common.py, which the
OpenAI-compatible routes of openai_api.py share), asks the embedding service for
vectors and shapes the response. Every error is an errors.ApiError (or becomes one)
answered as JSON `{"error": "..."}`; the /v1 blueprint answers its own in OpenAI's
envelope `{"error": {"message", "type", "param", "code"}}`.
"""
from __future__ import annotations

import logging
from typing import Any, Callable

import orjson
from flask import Blueprint, Flask, Response, current_app, g, jsonify, request
from flask.json.provider import DefaultJSONProvider

import observability
import worker_registry
from api_docs import docs
from budget import Budget
from config import Settings, load_settings
from errors import ApiError
from http_common import (embed_images, embed_texts, embedding_service, error_answer, is_multipart, places,
                         read_json_object, read_uploaded_image, require_api_key, require_field,
                         require_image_support, settings, validate_image_list, validate_image_string,
                         validate_prompt_name, validate_text, validate_text_list)
from model_locator import served_model_id, without_local_paths
from observability import Metrics
from openai_api import OPENAI_PREFIX, openai_api, openai_envelope
from tei_api import tei_api
from service import EmbeddingService, LoadReport, ServiceHooks

logger = logging.getLogger(__name__)

health = Blueprint("health", __name__)
api = Blueprint("api", __name__)

# Seconds a client should wait before retrying when this worker is reading too many bodies.
BODIES_IN_FLIGHT_RETRY_AFTER = 1
# Bodies this small are not counted against MAX_REQUEST_BYTES_IN_FLIGHT: a large body must not turn
# away queries (a 100-text batch of full MiniLM windows is about 130 KB), and THREADS bounds them
# (64 x 256 KiB, about 50 MB while being parsed).
SMALL_BODY_BYTES = 256 * 1024
# The image routes on a model that embeds text only: Not Implemented, as the upstream README documents.
TEXT_ONLY_MODEL_STATUS = 501

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
                       code="server_busy", retry_after=BODIES_IN_FLIGHT_RETRY_AFTER)
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
    body = read_json_object()
    text = validate_text(require_field(body, "text"), "text")
    result = embed_texts([text], ["text"], validate_prompt_name(body.get("prompt_name")))
    return jsonify(embeddings=[result.vectors[0]])


@api.post("/embeddings/batch")
def embed_text_batch():
    body = read_json_object()
    texts = validate_text_list(require_field(body, "texts"), "texts")
    result = embed_texts(texts, places("texts", len(texts)), validate_prompt_name(body.get("prompt_name")))
    return jsonify(embeddings=[[vector] for vector in result.vectors])


@api.post("/embeddings/image")
def embed_image():
    require_image_support(status=TEXT_ONLY_MODEL_STATUS)
    if is_multipart():
        image = read_uploaded_image("image")
    else:
        image = validate_image_string(require_field(read_json_object(), "image"), "image")
    vectors = embed_images([image], ["image"])
    return jsonify(embeddings=[vectors[0]])


@api.post("/embeddings/image/batch")
def embed_image_batch():
    require_image_support(status=TEXT_ONLY_MODEL_STATUS)
    if is_multipart():
        raise ApiError(400, "The batch route takes JSON {\"images\": [\"<base64>\", ...]}; upload single files "
                            "with multipart to /embeddings/image")
    images = validate_image_list(require_field(read_json_object(), "images"), "images")
    vectors = embed_images(images, places("images", len(images)))
    return jsonify(embeddings=[[vector] for vector in vectors])


# --- errors ---------------------------------------------------------------

def answer_error(error: Exception) -> Response:
    """The service's own envelope, {"error": "..."}; OpenAI's for a /v1 path that matched no route (a 404 or
    405 comes before any blueprint is chosen, so the /v1 blueprint's own handler cannot answer it)."""
    if request.path == OPENAI_PREFIX or request.path.startswith(OPENAI_PREFIX + "/"):
        return error_answer(error, openai_envelope)
    return error_answer(error, own_envelope)


def own_envelope(_: ApiError, message: str) -> dict[str, Any]:
    return {"error": message}


# --- application ----------------------------------------------------------

class VectorJSONProvider(DefaultJSONProvider):
    """JSON answers through orjson, which writes numpy vectors directly.

    Each float32 becomes its shortest decimal that reads back as the same float32, so
    vectors stay exact while the answer is about half the size and ~25x faster to write
    than with Python's json and float64 reprs (measured: 6 us against 164 us for 384 floats).
    """

    def dumps(self, obj: Any, **kwargs: Any) -> str:
        return orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY).decode("utf-8")


ServiceFactory = Callable[[Settings, ServiceHooks], EmbeddingService]


def create_app(app_settings: Settings | None = None, make_service: ServiceFactory = EmbeddingService) -> Flask:
    """Build the app and start loading its model in the background.

    `make_service` builds the embedding service from the settings and the hooks the app wants called
    (tests pass one that reuses a model already loaded, or a stand-in).
    """
    observability.configure_logging()  # first: reading the settings may log where models are looked for
    app_settings = app_settings or load_settings()
    if app_settings.uses_default_api_key:
        logger.warning("VECTOR_EMBEDDER_API_KEY is not set: the service accepts the documented default "
                       "key 'abc123'. Set your own key before exposing the service.")
    # No static folder: every route is one of ours and documented in /openapi.json.
    app = Flask(__name__, static_folder=None)
    app.json = VectorJSONProvider(app)
    app.config["SETTINGS"] = app_settings
    app.config["MAX_CONTENT_LENGTH"] = app_settings.max_request_size
    app_metrics = Metrics()
    app.extensions["metrics"] = app_metrics
    service = make_service(app_settings, ServiceHooks(on_ready=lambda report: model_ready(app_metrics, report),
                                                      on_batch=app_metrics.record_batch))
    app.extensions["embedding_service"] = service
    service.start_loading()
    observability.install(app, app_metrics)
    app.extensions["bodies_in_flight"] = Budget(app_settings.max_request_bytes_in_flight)
    app.before_request(admit_request_body)
    app.teardown_request(release_request_body)
    app.register_blueprint(health)
    app.register_blueprint(api)
    app.register_blueprint(openai_api, url_prefix=OPENAI_PREFIX)
    app.register_blueprint(tei_api)
    app.register_blueprint(docs)
    app.register_error_handler(Exception, answer_error)
    return app


def model_ready(metrics: Metrics, report: LoadReport) -> None:
    """This worker counts as ready for the whole server's readiness; its load is recorded in the metrics."""
    worker_registry.mark_ready()
    metrics.record_load(report)
