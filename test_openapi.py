"""GET /openapi.json describes exactly the app's routes, and real answers validate against it."""
from __future__ import annotations

import base64
import re

import pytest
import requests
from openapi_core import OpenAPI
from openapi_core.contrib.requests import RequestsOpenAPIRequest, RequestsOpenAPIResponse
from openapi_core.validation.response.exceptions import InvalidData

from config import Settings
from main import create_app
from testkit import AUTH, MODEL, TEST_API_KEY, NeverLoads, app_without_model, start_live_server

BEARER = {"Authorization": f"Bearer {TEST_API_KEY}"}
IGNORED_METHODS = {"HEAD", "OPTIONS"}
PIXEL_PNG = ("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4z8AAAAMBAQDJ/pLvAAAAAElFTkSuQmCC")


@pytest.fixture(scope="module")
def document(server) -> dict:
    answer = requests.get(server.url + "/openapi.json", timeout=10)
    assert answer.status_code == 200
    return answer.json()


@pytest.fixture(scope="module")
def openapi(document) -> OpenAPI:
    # from_dict checks the document itself against the OpenAPI 3.1 specification first.
    return OpenAPI.from_dict(document)


def operations_of_app(app) -> set[tuple[str, str]]:
    operations = set()
    for rule in app.url_map.iter_rules():
        path = re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule.rule)
        operations |= {(path, method) for method in rule.methods - IGNORED_METHODS}
    return operations


def operations_of_document(document: dict) -> set[tuple[str, str]]:
    return {(path, method.upper()) for path, item in document["paths"].items()
            for method in item if method in ("get", "post", "put", "patch", "delete")}


def test_document_is_openapi_3_1_with_both_security_schemes(document, openapi):
    assert document["openapi"].startswith("3.1")
    schemes = document["components"]["securitySchemes"]
    assert schemes["ApiKeyAuth"] == {"type": "apiKey", "in": "header", "name": "X-API-Key"}
    assert schemes["BearerAuth"]["type"] == "http" and schemes["BearerAuth"]["scheme"] == "bearer"


def test_every_route_is_documented_and_every_documented_route_exists(document):
    in_app, in_document = operations_of_app(app_without_model().app), operations_of_document(document)
    assert in_app - in_document == set(), "routes missing from openapi_document.py"
    assert in_document - in_app == set(), "documented routes the app does not have"


def test_protected_routes_say_so_and_public_ones_do_not(document):
    public = {"/health", "/health/ready", "/openapi.json", "/docs", "/docs/{asset}"}
    for path, item in document["paths"].items():
        for described in item.values():
            if isinstance(described, dict) and "responses" in described:
                assert (described["security"] == []) == (path in public), path
                assert (path in public) or "401" in described["responses"], path


def check(openapi: OpenAPI, answer: requests.Response, request_is_valid: bool) -> None:
    """The answer must match the document; so must the request when it was a valid one."""
    request = RequestsOpenAPIRequest(answer.request)
    if request_is_valid:
        openapi.validate_request(request)
    openapi.validate_response(request, RequestsOpenAPIResponse(answer))


def call(url: str, method: str, path: str, **kwargs) -> requests.Response:
    return requests.request(method, url + path, timeout=60, **kwargs)


VALID_CALLS = [
    ("GET", "/health", {}, 200),
    ("GET", "/health/ready", {}, 200),
    ("GET", "/openapi.json", {}, 200),
    ("GET", "/docs", {}, 200),
    ("GET", "/docs/swagger-ui-bundle.js", {}, 200),
    ("POST", "/embeddings", {"json": {"text": "hello"}, "headers": AUTH}, 200),
    ("POST", "/embeddings/batch", {"json": {"texts": ["hello", "world"]}, "headers": BEARER}, 200),
    ("POST", "/v1/embeddings", {"json": {"model": MODEL, "input": ["hi", "there"]}, "headers": BEARER}, 200),
    ("POST", "/v1/embeddings", {"json": {"model": MODEL, "input": [[101, 7592], [2088]], "dimensions": 8,
                                         "encoding_format": "base64", "user": "u1"}, "headers": AUTH}, 200),
    ("GET", "/v1/models", {"headers": AUTH}, 200),
    ("GET", "/metrics", {"headers": BEARER}, 200),
]

INVALID_CALLS = [
    ("GET", "/docs/no-such-file.js", {}, 404),
    ("POST", "/embeddings", {"json": {"text": "hello"}}, 401),
    ("POST", "/embeddings", {"json": {"text": ""}, "headers": AUTH}, 400),
    ("POST", "/embeddings", {"json": {"text": "word " * 9000}, "headers": AUTH}, 413),
    ("POST", "/embeddings/batch", {"json": {"texts": []}, "headers": AUTH}, 400),
    ("POST", "/v1/embeddings", {"json": {"model": MODEL, "input": []}, "headers": AUTH}, 400),
    ("POST", "/v1/embeddings", {"json": {"model": "gpt-4", "input": "hi"}, "headers": AUTH}, 404),
    ("POST", "/v1/embeddings", {"json": {"model": MODEL, "input": "hi"}}, 401),
    ("POST", "/v1/embeddings", {"json": {"model": MODEL, "input": "word " * 9000}, "headers": AUTH}, 413),
    ("GET", "/v1/models", {}, 401),
    ("GET", "/metrics", {}, 401),
]


@pytest.mark.parametrize("method, path, kwargs, status", VALID_CALLS)
def test_valid_calls_and_their_answers_match_the_document(server, openapi, method, path, kwargs, status):
    answer = call(server.url, method, path, **kwargs)
    assert answer.status_code == status, answer.text
    check(openapi, answer, request_is_valid=True)


@pytest.mark.parametrize("method, path, kwargs, status", INVALID_CALLS)
def test_error_answers_match_the_document(server, openapi, method, path, kwargs, status):
    answer = call(server.url, method, path, **kwargs)
    assert answer.status_code == status, answer.text
    check(openapi, answer, request_is_valid=False)


IMAGE_CALLS = [
    ("/embeddings/image", {"json": {"image": PIXEL_PNG}}),
    ("/embeddings/image", {"json": {"image": "data:image/png;base64," + PIXEL_PNG}}),
    ("/embeddings/image", {"files": {"image": ("pixel.png", base64.b64decode(PIXEL_PNG), "image/png")}}),
    ("/embeddings/image/batch", {"json": {"images": [PIXEL_PNG, PIXEL_PNG]}}),
]


@pytest.mark.parametrize("path, kwargs", IMAGE_CALLS)
def test_image_calls_and_their_answers_match_the_document(tiny_clip_server, server, openapi, path, kwargs):
    answer = call(tiny_clip_server.url, "POST", path, headers=AUTH, **kwargs)
    assert answer.status_code == 200, answer.text
    check(openapi, answer, request_is_valid=True)
    text_only = call(server.url, "POST", path, headers=AUTH, **kwargs)
    assert text_only.status_code == 501, text_only.text  # Not Implemented on a text-only model, as upstream
    check(openapi, text_only, request_is_valid=True)


def test_image_errors_match_the_document(tiny_clip_server, openapi):
    for body in [{"image": "not base64 @@"}, {"image": 7}]:
        answer = call(tiny_clip_server.url, "POST", "/embeddings/image", json=body, headers=AUTH)
        assert answer.status_code == 400, answer.text
        check(openapi, answer, request_is_valid=False)


def test_model_not_ready_answers_match_the_document(openapi):
    live = start_live_server(create_app(Settings(api_keys=(TEST_API_KEY,)), NeverLoads), wait_ready=False)
    try:
        for method, path, kwargs in [("GET", "/health/ready", {}),
                                     ("POST", "/embeddings", {"json": {"text": "hi"}, "headers": AUTH}),
                                     ("POST", "/v1/embeddings", {"json": {"model": MODEL, "input": "hi"},
                                                                 "headers": AUTH}),
                                     ("GET", "/v1/models", {"headers": AUTH})]:
            answer = call(live.url, method, path, **kwargs)
            assert answer.status_code == 503, answer.text
            check(openapi, answer, request_is_valid=True)
    finally:
        live.stop()


def test_the_document_catches_a_wrong_answer(server, openapi):
    """The validation has teeth: an answer of the wrong shape is rejected, for what is wrong with it."""
    answer = call(server.url, "POST", "/embeddings", json={"text": "hello"}, headers=AUTH)
    answer._content = b'{"embeddings": "not a list"}'  # the body the client reads, replaced by a wrong one
    with pytest.raises(InvalidData) as rejected:
        check(openapi, answer, request_is_valid=True)
    [failure] = rejected.value.__cause__.schema_errors
    assert (list(failure.path), failure.validator) == (["embeddings"], "type")
    assert failure.message == "'not a list' is not of type 'array'"
