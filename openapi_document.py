"""The OpenAPI 3.1 description of every route, served at GET /openapi.json.

Kept as Python so the parts every route shares (errors, security) are written
once. test_openapi.py checks that it names exactly the app's routes and that
real responses validate against it.
"""
from __future__ import annotations

import copy
from typing import Any

VECTOR = {"type": "array", "items": {"type": "number"}, "description": "One embedding vector."}
PROMPT_NAME = {"type": ["string", "null"],
               "description": "The name of one of the model's prompts (GET /v1/models lists them): each text is "
                              "read after that prompt, in every window, as sentence-transformers' "
                              "encode(prompt_name=...) reads it. Unset: the model's default prompt, if it has one. "
                              "A name the model does not have is 400."}
PROTECTED = [{"ApiKeyAuth": []}, {"BearerAuth": []}]
PUBLIC: list[dict[str, list]] = []


def ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def json_content(schema: dict[str, Any], example: Any = None) -> dict[str, Any]:
    media: dict[str, Any] = {"schema": schema}
    if example is not None:
        media["example"] = example
    return {"application/json": media}


def response(description: str, schema: dict[str, Any], headers: dict[str, Any] | None = None) -> dict[str, Any]:
    answer = {"description": description, "content": json_content(schema)}
    if headers:
        answer["headers"] = headers
    return answer


def errors(error_schema: str, *statuses: int) -> dict[str, Any]:
    """The documented error responses of a route, all in one error schema."""
    meanings = {
        400: "The request is malformed or a field is invalid (a prompt_name the model does not have), it has "
             "more texts or images than allowed (MAX_TEXTS_PER_BATCH, MAX_IMAGES_PER_BATCH), or it sends an "
             "image to a model that embeds text only; the message says which and why.",
        401: "Missing or invalid API key.",
        404: "Unknown model (code model_not_found).",
        413: "The body, a text, the request's texts together or an image is over its limit: MAX_REQUEST_SIZE "
             "bytes; MAX_TOKENS_PER_TEXT tokens of one text (MAX_TEXT_LENGTH characters, checked before "
             "tokenizing); MAX_TOKENS_PER_REQUEST tokens of all texts (32 characters per token, checked "
             "before tokenizing); MAX_IMAGE_SIZE bytes, MAX_IMAGE_PIXELS pixels or MAX_IMAGE_DECODE_BYTES of "
             "decoding memory of an image.",
        429: "The service is behind: the model's queue holds QUEUE_MAX_TOKENS tokens of work, or the worker "
             "handles MAX_REQUEST_BYTES_IN_FLIGHT bytes of bodies; retry after Retry-After seconds.",
        501: "The served model embeds text only, so the image routes cannot serve (set EMBEDDING_MODEL to a CLIP "
             "model).",
        503: "The model is still loading or failed to load, did not answer within REQUEST_TIMEOUT_SECONDS, "
             "or its thread has ended (see GET /health).",
    }
    answers: dict[str, Any] = {}
    for status in statuses:
        headers = {"Retry-After": {"description": "Seconds to wait before retrying.",
                                   "schema": {"type": "integer"}}} if status in (429, 503) else None
        answers[str(status)] = response(meanings[status], ref(error_schema), headers)
    answers["default"] = response("Any other error (unknown route 404, wrong method 405, internal 500, or 500 "
                                  "non_finite_vectors when the model made a vector that is not a finite number).",
                                  ref(error_schema))
    return answers


def tei_errors(*statuses: int) -> dict[str, Any]:
    """The error responses of the text-embeddings-inference routes, with the statuses its server gives them."""
    meanings = {
        400: "Empty inputs (error_type Empty), or a body that is not JSON.",
        401: "Missing or invalid API key.",
        413: "The body is larger than MAX_REQUEST_SIZE bytes.",
        422: "A field is invalid or over a limit (error_type Validation): the message says which.",
        429: "The service is behind (error_type Overloaded); retry after Retry-After seconds.",
        424: "The model failed on the request (error_type Backend).",
        503: "The model is loading, failed to load or cannot serve (error_type Unhealthy).",
    }
    answers = {str(status): response(meanings[status], ref("TEIError")) for status in statuses or sorted(meanings)}
    answers["default"] = response("Any other error (unknown route 404, wrong method 405).", ref("TEIError"))
    return answers


def operation(tag: str, operation_id: str, summary: str, responses: dict[str, Any],
              security: list, request_body: dict[str, Any] | None = None,
              description: str | None = None) -> dict[str, Any]:
    described = {"tags": [tag], "operationId": operation_id, "summary": summary,
                 "security": security, "responses": responses}
    if description:
        described["description"] = description
    if request_body:
        described["requestBody"] = request_body
    return described


def json_body(schema_name: str, example: Any) -> dict[str, Any]:
    return {"required": True, "content": json_content(ref(schema_name), example)}


SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object", "required": ["error"],
        "properties": {"error": {"type": "string", "description": "What was wrong, in words a person can act on."}},
    },
    "OpenAIError": {
        "type": "object", "required": ["error"],
        "properties": {"error": {
            "type": "object", "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string", "enum": ["invalid_request_error", "server_error"]},
                "param": {"type": ["string", "null"], "description": "The request field at fault."},
                "code": {"type": ["string", "null"], "examples": [
                    "model_not_found", "invalid_api_key", "request_too_large", "model_loading",
                    "model_load_failed", "server_busy", "not_found", "method_not_allowed", "internal_error",
                    "unknown_prompt", "non_finite_vectors"]},
            },
        }},
    },
    "TEIError": {
        "type": "object", "required": ["error", "error_type"],
        "properties": {
            "error": {"type": "string", "description": "What was wrong, in words a person can act on."},
            "error_type": {"type": "string",
                           "enum": ["Empty", "Validation", "Tokenizer", "Overloaded", "Backend", "Unhealthy"],
                           "description": "text-embeddings-inference's error type: Empty 400, Validation 422, "
                                          "Overloaded 429, Backend 424, Unhealthy 503."},
        },
    },
    "EmbedRequest": {
        "type": "object", "required": ["inputs"],
        "properties": {
            "inputs": {
                "description": "A text, a list of token ids (one input), or a list of texts and token id lists: "
                               "at most MAX_TEXTS_PER_BATCH inputs, each at most MAX_TOKENS_PER_TEXT tokens, "
                               "all at most MAX_TOKENS_PER_REQUEST.",
                "oneOf": [
                    {"type": "string", "minLength": 1},
                    {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0}},
                    {"type": "array", "minItems": 1, "items": {"oneOf": [
                        {"type": "string", "minLength": 1},
                        {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0}}]}},
                ],
            },
            "normalize": {"type": "boolean", "default": True,
                          "description": "L2-normalise each vector (after dimensions)."},
            "truncate": {"type": ["boolean", "null"], "default": False,
                         "description": "true: a text longer than the model's window keeps one window's worth of "
                                        "tokens. false: it is split into windows and averaged (TEI answers 422)."},
            "truncation_direction": {"type": "string", "enum": ["Right", "Left", "right", "left"],
                                     "default": "Right",
                                     "description": "Right keeps the first tokens, Left the last."},
            "prompt_name": PROMPT_NAME,
            "dimensions": {"type": ["integer", "null"], "minimum": 1,
                           "description": "Keep the first N components (then normalise if normalize)."},
        },
    },
    "EmbedResponse": {"type": "array", "items": VECTOR, "description": "One vector per input, in input order."},
    "Info": {
        "type": "object",
        "required": ["model_id", "model_dtype", "model_type", "max_concurrent_requests", "max_input_length",
                     "max_batch_tokens", "max_client_batch_size", "auto_truncate", "tokenization_workers",
                     "version"],
        "properties": {
            "model_id": {"type": "string"}, "model_sha": {"type": ["string", "null"]},
            "model_dtype": {"type": "string", "description": "float32 or bfloat16: what the engine computes in."},
            "served_model_name": {"type": "string"},
            "model_type": {"type": "object", "description": "{\"embedding\": {\"pooling\": \"mean\"}}"},
            "max_concurrent_requests": {"type": "integer"},
            "max_input_length": {"type": "integer", "description": "Tokens per window."},
            "max_batch_tokens": {"type": "integer"}, "max_batch_requests": {"type": ["integer", "null"]},
            "max_client_batch_size": {"type": "integer", "description": "MAX_TEXTS_PER_BATCH."},
            "auto_truncate": {"type": "boolean"}, "tokenization_workers": {"type": "integer"},
            "version": {"type": "string"}, "sha": {"type": ["string", "null"]},
            "docker_label": {"type": ["string", "null"]},
        },
    },
    "Liveness": {
        "type": "object", "required": ["status"],
        "properties": {
            "status": {"type": "string", "enum": ["ok", "error"]},
            "reason": {"type": "string", "description": "Why the model thread cannot serve (status error)."},
        },
    },
    "Readiness": {
        "type": "object", "required": ["status"],
        "properties": {
            "status": {"type": "string", "enum": ["ready", "loading", "error"]},
            "model": {"type": "string", "description": "The model's id as GET /v1/models gives it (no folder)."},
            "supports_images": {"type": "boolean"},
            "engine": {"type": "string", "enum": ["openvino", "torch"],
                       "description": "The inference engine serving the model (status ready)."},
            "precision": {"type": "string", "description": "The precision the engine computes in: bf16 where "
                                                           "the CPU has it and the self-check passed, else f32."},
            "reason": {"type": "string", "description": "Why loading failed, or why the model thread cannot serve "
                                                        "(status error); absolute paths are shown as <path>, the "
                                                        "log has them."},
            "workers_ready": {"type": "integer", "description": "Workers with their model loaded (status loading, "
                                                                "when some but not all are ready)."},
            "workers": {"type": "integer", "description": "Workers the server runs."},
            "prompts": {"type": "array", "items": {"type": "string"},
                        "description": "The names of the model's prompts (status ready)."},
            "default_prompt_name": {"type": ["string", "null"],
                                    "description": "The prompt texts are read after when a request names none."},
            "non_finite_requests": {"type": "integer", "description": "Requests refused because the model made "
                                                                      "a vector that is not finite (when any)."},
        },
    },
    "TextRequest": {
        "type": "object", "required": ["text"],
        "properties": {"text": {"type": "string", "minLength": 1,
                                "description": "At most MAX_TOKENS_PER_TEXT tokens (8192 by default); longer "
                                               "than the model's window is split into windows and averaged."},
                       "prompt_name": PROMPT_NAME},
    },
    "TextBatchRequest": {
        "type": "object", "required": ["texts"],
        "properties": {"texts": {"type": "array", "minItems": 1, "items": {"type": "string", "minLength": 1},
                                 "description": "At most MAX_TEXTS_PER_BATCH texts of at most MAX_TOKENS_PER_TEXT "
                                                "tokens each, and MAX_TOKENS_PER_REQUEST tokens in all."},
                       "prompt_name": PROMPT_NAME},
    },
    "ImageRequest": {
        "type": "object", "required": ["image"],
        "properties": {"image": {"type": "string",
                                 "description": "Base64 image bytes or a data URI (data:image/png;base64,...)."}},
    },
    "ImageUpload": {
        "type": "object", "required": ["image"],
        # OpenAPI 3.1 describes a file part by its media type alone: its value is bytes, not a string.
        "properties": {"image": {"contentMediaType": "application/octet-stream",
                                 "description": "The image file (JPEG, PNG, WebP, GIF, BMP or TIFF)."}},
    },
    "ImageBatchRequest": {
        "type": "object", "required": ["images"],
        "properties": {"images": {"type": "array", "minItems": 1, "items": {"type": "string"},
                                  "description": "At most MAX_IMAGES_PER_BATCH base64 images or data URIs."}},
    },
    "Embeddings": {
        "type": "object", "required": ["embeddings"],
        "properties": {"embeddings": {"type": "array", "items": VECTOR, "minItems": 1, "maxItems": 1,
                                      "description": "The one vector, wrapped in a list."}},
    },
    "BatchEmbeddings": {
        "type": "object", "required": ["embeddings"],
        "properties": {"embeddings": {"type": "array", "items": {"type": "array", "items": VECTOR},
                                      "description": "One [vector] per input, in input order."}},
    },
    "CreateEmbeddingRequest": {
        "type": "object", "required": ["input", "model"],
        "properties": {
            "input": {
                "description": "Texts or token ids of the served model's tokenizer. With a CLIP model a string "
                               "item that is an image data URI (data:image/...;base64,...) is embedded as an "
                               "image. The limits of the other routes: at most MAX_TEXTS_PER_BATCH texts (or "
                               "token id lists) and MAX_IMAGES_PER_BATCH images, each text at most "
                               "MAX_TOKENS_PER_TEXT tokens, all texts at most MAX_TOKENS_PER_REQUEST.",
                "oneOf": [
                    {"type": "string", "minLength": 1},
                    {"type": "array", "minItems": 1, "items": {"type": "string", "minLength": 1}},
                    {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0}},
                    {"type": "array", "minItems": 1,
                     "items": {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0}}},
                ],
            },
            "model": {"type": "string", "description": "The served model's id (GET /v1/models), its hub id "
                                                       "sentence-transformers/<name>, or its short name."},
            "encoding_format": {"type": "string", "enum": ["float", "base64"], "default": "float",
                                "description": "base64: little-endian float32 bytes."},
            "dimensions": {"type": "integer", "minimum": 1,
                           "description": "Keep the first N components and L2-normalise again."},
            "user": {"type": "string", "description": "Accepted and ignored."},
            "prompt_name": {**PROMPT_NAME, "description": PROMPT_NAME["description"] + " Not with token ids, "
                            "which the model reads as they are (400). The OpenAI client sends it in extra_body."},
        },
    },
    "CreateEmbeddingResponse": {
        "type": "object", "required": ["object", "data", "model", "usage"],
        "properties": {
            "object": {"const": "list"},
            "data": {"type": "array", "items": {
                "type": "object", "required": ["object", "index", "embedding"],
                "properties": {
                    "object": {"const": "embedding"},
                    "index": {"type": "integer", "minimum": 0},
                    "embedding": {"oneOf": [VECTOR, {"type": "string", "contentEncoding": "base64"}]},
                },
            }},
            "model": {"type": "string"},
            "usage": {
                "type": "object", "required": ["prompt_tokens", "total_tokens"],
                "properties": {"prompt_tokens": {"type": "integer", "minimum": 0},
                               "total_tokens": {"type": "integer", "minimum": 0}},
            },
        },
    },
    "ModelList": {
        "type": "object", "required": ["object", "data"],
        "properties": {
            "object": {"const": "list"},
            "data": {"type": "array", "items": {
                "type": "object",
                "required": ["id", "object", "created", "owned_by", "dimension", "max_sequence_length"],
                "properties": {
                    "id": {"type": "string"},
                    "object": {"const": "model"},
                    "created": {"type": "integer", "description": "Unix time this service loaded the model."},
                    "owned_by": {"type": "string"},
                    "dimension": {"type": "integer", "minimum": 1},
                    "max_sequence_length": {"type": "integer", "minimum": 1,
                                            "description": "Tokens per window (the model's own, at most "
                                                           "MAX_WINDOW_TOKENS); longer inputs are split into "
                                                           "windows."},
                    "prompts": {"type": "object", "additionalProperties": {"type": "string"},
                                "description": "The model's prompts by name (sentence-transformers' prompts)."},
                    "default_prompt_name": {"type": ["string", "null"],
                                            "description": "The prompt applied when a request names none."},
                },
            }},
        },
    },
}

TEXT_EXAMPLE = "A cat sleeps on the sofa."

PATHS: dict[str, Any] = {
    "/health": {"get": operation(
        "health", "liveness", "The process is up and its model thread serves (no auth)",
        {"200": response("Alive.", ref("Liveness")),
         "503": response("The model thread has ended or is stuck: restart the service.", ref("Liveness"))},
        PUBLIC)},
    "/health/ready": {"get": operation(
        "health", "readiness", "The model is loaded and embeddings can be made (no auth)",
        {"200": response("Ready.", ref("Readiness")),
         "503": response("Loading, failed to load, or the model thread has ended or is stuck.",
                         ref("Readiness"))}, PUBLIC)},
    "/embeddings": {"post": operation(
        "embeddings", "embed_text", "Embed one text",
        {"200": response("The text's vector.", ref("Embeddings")), **errors("Error", 400, 401, 413, 429, 503)},
        PROTECTED, json_body("TextRequest", {"text": TEXT_EXAMPLE}))},
    "/embeddings/batch": {"post": operation(
        "embeddings", "embed_text_batch", "Embed several texts",
        {"200": response("One [vector] per text, in input order.", ref("BatchEmbeddings")),
         **errors("Error", 400, 401, 413, 429, 503)},
        PROTECTED, json_body("TextBatchRequest", {"texts": [TEXT_EXAMPLE, "The bank raised interest rates."]}))},
    "/embeddings/image": {"post": operation(
        "images", "embed_image", "Embed one image (CLIP models only)",
        {"200": response("The image's vector.", ref("Embeddings")),
         **errors("Error", 400, 401, 413, 429, 501, 503)},
        PROTECTED,
        {"required": True, "content": {
            "application/json": {"schema": ref("ImageRequest")},
            "multipart/form-data": {"schema": ref("ImageUpload")},
        }},
        "JPEG, PNG, WebP, GIF (first frame), BMP or TIFF, as base64, a data URI, or a multipart file field "
        "named image.")},
    "/embeddings/image/batch": {"post": operation(
        "images", "embed_image_batch", "Embed several images (CLIP models only)",
        {"200": response("One [vector] per image, in input order.", ref("BatchEmbeddings")),
         **errors("Error", 400, 401, 413, 429, 501, 503)},
        PROTECTED, {"required": True, "content": json_content(ref("ImageBatchRequest"))})},
    "/v1/embeddings": {"post": operation(
        "openai", "create_embeddings", "OpenAI-compatible embeddings",
        {"200": response("The vectors, in input order, with the tokens processed.", ref("CreateEmbeddingResponse")),
         **errors("OpenAIError", 400, 401, 404, 413, 429, 503)},
        PROTECTED, json_body("CreateEmbeddingRequest", {"input": TEXT_EXAMPLE, "model": "all-MiniLM-L6-v2"}),
        "Works with the official OpenAI clients: point base_url at <service>/v1.")},
    "/v1/models": {"get": operation(
        "openai", "list_models", "The served model, OpenAI-style",
        {"200": response("The one model this service serves.", ref("ModelList")),
         **errors("OpenAIError", 401, 503)}, PROTECTED)},
    "/embed": {"post": operation(
        "tei", "tei_embed", "text-embeddings-inference's embed",
        {"200": response("One vector per input, in input order.", ref("EmbedResponse")), **tei_errors()},
        PROTECTED, json_body("EmbedRequest", {"inputs": [TEXT_EXAMPLE, "The bank raised interest rates."]}),
        "Works with huggingface_hub's InferenceClient and the frameworks built for text-embeddings-inference.")},
    "/": {"post": operation(
        "tei", "tei_feature_extraction", "text-embeddings-inference's embed, where InferenceClient posts",
        {"200": response("One vector per input, in input order.", ref("EmbedResponse")), **tei_errors()},
        PROTECTED, json_body("EmbedRequest", {"inputs": TEXT_EXAMPLE}),
        "InferenceClient(base_url=<service>).feature_extraction(...) posts here; answered as POST /embed.")},
    "/info": {"get": operation(
        "tei", "tei_info", "The served model, as text-embeddings-inference describes it",
        {"200": response("The model and the limits.", ref("Info")), **tei_errors(401, 503)}, PROTECTED)},
    "/metrics": {"get": operation(
        "health", "metrics", "Prometheus metrics (key needed unless METRICS_PUBLIC=true)",
        {"200": {"description": "Prometheus text exposition format.",
                 "content": {"text/plain": {"schema": {"type": "string"}}}},
         **errors("Error", 401)}, PROTECTED)},
    "/openapi.json": {"get": operation(
        "docs", "openapi_document", "This document (no auth)",
        {"200": response("OpenAPI 3.1 document.", {"type": "object"})}, PUBLIC)},
    "/docs": {"get": operation(
        "docs", "swagger_ui", "Interactive documentation (Swagger UI, no auth, works offline)",
        {"200": {"description": "HTML page.", "content": {"text/html": {"schema": {"type": "string"}}}}}, PUBLIC)},
    "/docs/{asset}": {"get": {
        **operation("docs", "swagger_ui_asset", "Swagger UI's scripts and styles (no auth)",
                    {"200": {"description": "The file.", "content": {"*/*": {"schema": {}}}},
                     "404": {"description": "No such file.", "content": json_content(ref("Error"))}}, PUBLIC),
        "parameters": [{"name": "asset", "in": "path", "required": True, "schema": {"type": "string"}}],
    }},
}


def openapi_document() -> dict[str, Any]:
    """A fresh copy of the document, so a caller may change it freely."""
    return copy.deepcopy({
        "openapi": "3.1.0",
        "info": {
            "title": "Vector embedder",
            "version": "1.0.0",
            "description": "Text (and, with a CLIP model, image) embeddings over HTTP. Protected routes take "
                           "the API key as the `X-API-Key` header or as `Authorization: Bearer <key>`.",
        },
        "tags": [
            {"name": "embeddings", "description": "Text embeddings"},
            {"name": "images", "description": "Image embeddings (CLIP models; 501 with a text-only model)"},
            {"name": "openai", "description": "OpenAI-compatible API"},
            {"name": "tei", "description": "text-embeddings-inference-compatible API"},
            {"name": "health", "description": "Liveness, readiness and metrics"},
            {"name": "docs", "description": "This documentation"},
        ],
        "paths": PATHS,
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {
                "ApiKeyAuth": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
                "BearerAuth": {"type": "http", "scheme": "bearer",
                               "description": "The same API key, as the OpenAI clients send it."},
            },
        },
    })
