"""The service's own HTTP API: over a real server on loopback, called with a real HTTP client, and, for how
requests are read, validated and refused, against the app on a stand-in service (no model, no socket)."""
from __future__ import annotations

import inspect
import json
import logging
import threading
from pathlib import Path

import numpy as np
import pytest
import requests

from config import Settings
from main import create_app
from model_locator import without_local_paths
from service import EmbeddingService, ServiceHooks
from testkit import (AUTH, SAME_ENGINE_MIN_COSINE, STUB_SETTINGS, TEST_API_KEY, StubService, app_without_model,
                     assert_same_vectors, error_of, expected_precision, post, running_service, start_live_server,
                     wait_for_loading, watching_log)

LONG_TEXT = "Rivers carry water from the mountains to the sea. " * 150
JSON = {"Content-Type": "application/json"}


def test_health_answers_without_auth(server):
    response = requests.get(server.url + "/health", timeout=5)
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_ready_reports_the_model(server):
    response = requests.get(server.url + "/health/ready", timeout=5)
    assert response.status_code == 200
    assert response.json() == {"status": "ready", "model": "all-MiniLM-L6-v2", "supports_images": False,
                               "engine": "openvino", "precision": expected_precision(),
                               "prompts": ["document", "query"], "default_prompt_name": None}


def test_embeddings_returns_one_wrapped_vector(server, reference_model):
    response = post(server, "/embeddings", json={"text": "hello world"})
    assert response.status_code == 200
    body = response.json()
    assert list(body) == ["embeddings"]
    assert len(body["embeddings"]) == 1 and len(body["embeddings"][0]) == 384
    assert_same_vectors(body["embeddings"][0], reference_model.encode(["hello world"])[0])


def test_batch_keeps_input_order_and_equals_single_requests(server):
    texts = ["the first text", LONG_TEXT, "a third one about cooking pasta", "Zürich ist schön"]
    response = post(server, "/embeddings/batch", json={"texts": texts})
    assert response.status_code == 200
    batch = response.json()["embeddings"]
    assert len(batch) == len(texts)
    for text, wrapped in zip(texts, batch):
        assert len(wrapped) == 1 and len(wrapped[0]) == 384
        single = post(server, "/embeddings", json={"text": text}).json()["embeddings"][0]
        assert_same_vectors(wrapped[0], single, SAME_ENGINE_MIN_COSINE)


def test_long_text_gives_one_unit_vector(server):
    response = post(server, "/embeddings", json={"text": LONG_TEXT})
    assert response.status_code == 200
    vectors = response.json()["embeddings"]
    assert len(vectors) == 1 and len(vectors[0]) == 384
    assert np.linalg.norm(vectors[0]) == pytest.approx(1.0, abs=1e-5)


def test_form_encoded_json_is_still_read(server):
    # curl -d sends application/x-www-form-urlencoded unless told otherwise.
    response = post(server, "/embeddings", data='{"text": "sent by curl -d"}',
                    headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert response.status_code == 200


# --- how requests are read and refused: the app on a stand-in service, no model ---------------------

def test_the_stand_in_service_offers_what_the_real_one_does():
    """The web layer may ask StubService anything it asks EmbeddingService, in the same words."""
    for name in [name for name in vars(EmbeddingService) if not name.startswith("_")]:
        real, stand_in = getattr(EmbeddingService, name), getattr(StubService, name, None)
        assert callable(stand_in), f"StubService has no {name}()"
        assert inspect.signature(stand_in).parameters.keys() == inspect.signature(real).parameters.keys(), name
    real, stand_in = EmbeddingService(STUB_SETTINGS), StubService(STUB_SETTINGS)
    assert {"settings", "loaded_at"} <= vars(real).keys() & vars(stand_in).keys()


@pytest.mark.parametrize("headers", [{}, {"X-API-Key": "wrong"}, {"X-API-Key": ""}, {"X-API-Key": TEST_API_KEY + "x"}])
def test_missing_or_wrong_key_is_401(headers):
    response = app_without_model().post("/embeddings", {"text": "hi"}, headers=headers)
    assert "API key" in error_of(response, 401)
    assert TEST_API_KEY not in response.text


def test_any_of_several_keys_is_accepted():
    app = app_without_model(api_keys=("new-key", "old-key"), refuse_model_calls=False)
    for key in ("new-key", "old-key"):
        assert app.post("/embeddings", {"text": "hi"}, headers={"X-API-Key": key}).status_code == 200
    assert app.post("/embeddings", {"text": "hi"}).status_code == 401


UNREADABLE_BODIES = [
    (b"", "Request body is empty: send a JSON object"),
    (b'{"text": ', "Request body is not valid JSON"),
    (b'["text"]', "Request body must be a JSON object, got an array"),
    (b'"just a string"', "Request body must be a JSON object, got a string"),
    (b"\xff\xfe{}", "Request body is not valid UTF-8 text"),
    (b"[" * 100000 + b"]" * 100000, "Request body is nested too deeply to be read as JSON"),
]


@pytest.mark.parametrize("path", ["/embeddings", "/embeddings/batch"])
@pytest.mark.parametrize("body, message", UNREADABLE_BODIES)
def test_unreadable_bodies_get_a_400_that_says_what_is_wrong(path, body, message):
    assert message in error_of(app_without_model().post(path, data=body, headers={**AUTH, **JSON}), 400)


@pytest.mark.parametrize("path, body, message", [
    ("/embeddings", {"txt": "typo"}, "Missing field 'text'"),
    ("/embeddings", {"text": 42}, "text must be a string, got a number"),
    ("/embeddings", {"text": None}, "text must be a string, got null"),
    ("/embeddings", {"text": ["a"]}, "text must be a string, got an array"),
    ("/embeddings", {"text": ""}, "text is empty"),
    ("/embeddings", {"text": " \n\t "}, "text is empty"),
    ("/embeddings", {"text": "bad \ud800 surrogate"}, "text holds an unpaired surrogate"),
    ("/embeddings/batch", {"text": "a"}, "Missing field 'texts'"),
    ("/embeddings/batch", {"texts": "a"}, "texts must be an array of strings, got a string"),
    ("/embeddings/batch", {"texts": []}, "texts is empty"),
    ("/embeddings/batch", {"texts": ["ok", 3]}, "texts[1] must be a string"),
    ("/embeddings/batch", {"texts": ["ok", ""]}, "texts[1] is empty"),
])
def test_invalid_fields_get_a_400_that_says_what_is_wrong(path, body, message):
    # Python's json writes a lone surrogate as the escape a client would send.
    response = app_without_model().post(path, data=json.dumps(body), headers={**AUTH, **JSON})
    assert message in error_of(response, 400)


@pytest.mark.parametrize("path, body", [("/embeddings", {"text": ""}), ("/embeddings/batch", {"texts": ["ok", 3]})])
def test_a_bad_request_to_a_real_server_is_answered_as_without_a_model(server, path, body):
    """End to end on the real model: the same answer as the app on the stand-in service gives."""
    real = post(server, path, body)
    without_model = app_without_model().post(path, body)
    assert (real.status_code, real.json()) == (without_model.status_code, without_model.get_json())
    assert real.status_code == 400


def test_more_texts_than_the_batch_limit_is_400():
    message = error_of(app_without_model().post("/embeddings/batch", {"texts": ["a"] * 101}), 400)
    assert "101 texts; the limit is 100 (MAX_TEXTS_PER_BATCH)" in message
    at_the_limit = app_without_model(refuse_model_calls=False)
    assert at_the_limit.post("/embeddings/batch", {"texts": ["a"] * 100}).status_code == 200
    assert at_the_limit.service.model_calls == [("embed_texts", ["a"] * 100)]


def test_a_text_over_the_length_limit_is_413():
    app = app_without_model(max_text_length=50)
    assert "limit is 50 (MAX_TEXT_LENGTH)" in error_of(app.post("/embeddings", {"text": "x" * 51}), 413)
    assert error_of(app.post("/embeddings/batch", {"texts": ["fine", "y" * 51]}), 413).startswith("texts[1] ")
    at_the_limit = app_without_model(max_text_length=50, refuse_model_calls=False)
    assert at_the_limit.post("/embeddings", {"text": "x" * 50}).status_code == 200


def test_a_body_over_the_size_limit_is_413():
    response = app_without_model(max_request_size=1000).post("/embeddings", {"text": "z" * 2000})
    assert "limit of 1000 bytes (MAX_REQUEST_SIZE)" in error_of(response, 413)


def test_unknown_routes_and_methods_answer_json():
    app = app_without_model()
    assert "No route /nothing-here" in error_of(app.get("/nothing-here", headers={}), 404)
    response = app.get("/embeddings")
    assert "GET is not allowed" in error_of(response, 405)
    assert "POST" in response.headers["Allow"]


# --- loading, and failing to load --------------------------------------------------------------

def test_routes_answer_503_while_the_model_loads_and_200_after(test_settings, loaded_models):
    release = threading.Event()

    def slow_loader(settings):
        release.wait(30)
        return loaded_models

    live = start_live_server(create_app(test_settings, lambda settings, hooks: EmbeddingService(
        settings, hooks, load=slow_loader)), wait_ready=False)
    try:
        assert requests.get(live.url + "/health", timeout=5).json() == {"status": "ok"}
        ready = requests.get(live.url + "/health/ready", timeout=5)
        assert (ready.status_code, ready.json()) == (503, {"status": "loading"})
        response = post(live, "/embeddings", json={"text": "too early"})
        assert response.status_code == 503 and "still loading" in response.json()["error"]
        assert response.headers["Retry-After"] == "5"
        release.set()
        assert wait_for_loading(live.service)[0]
        assert requests.get(live.url + "/health/ready", timeout=5).status_code == 200
        assert post(live, "/embeddings", json={"text": "now"}).status_code == 200
    finally:
        release.set()
        live.stop()
        live.service.stop()


def test_a_model_that_cannot_load_is_reported_not_served(tmp_path):
    settings = Settings(api_keys=(TEST_API_KEY,), embedding_model="no-such-model", models_dir=str(tmp_path))
    live = start_live_server(create_app(settings), wait_ready=False)
    try:
        assert not wait_for_loading(live.service)[0]
        ready = requests.get(live.url + "/health/ready", timeout=5)
        assert ready.status_code == 503
        body = ready.json()
        assert body["status"] == "error" and "no-such-model" in body["reason"] and "not found" in body["reason"]
        response = post(live, "/embeddings", json={"text": "anything"})
        assert response.status_code == 503 and "failed to load" in response.json()["error"]
    finally:
        live.stop()


def test_ready_names_a_model_folder_as_v1_models_does(tiny_clip_server, tiny_clip_settings):
    folder = Path(tiny_clip_settings.embedding_model)
    ready = requests.get(tiny_clip_server.url + "/health/ready", timeout=5)
    models = requests.get(tiny_clip_server.url + "/v1/models", headers=AUTH, timeout=10).json()
    assert ready.status_code == 200
    assert ready.json()["model"] == models["data"][0]["id"] == folder.name
    assert str(folder.parent) not in ready.text


@pytest.mark.parametrize("folder_exists", [True, False], ids=["broken folder", "missing folder"])
def test_a_model_folder_that_cannot_load_is_reported_without_its_path(tmp_path, folder_exists):
    # An empty folder fails in the real loader; a missing one is not found. A space must not cut the path short.
    folder = tmp_path / ("our models" if folder_exists else "gone") / "my-clip"
    if folder_exists:
        folder.mkdir(parents=True)
    settings = Settings(api_keys=(TEST_API_KEY,), embedding_model=str(folder), models_dir=str(tmp_path / "baked"))
    with watching_log("service", level=logging.ERROR) as log:
        live = start_live_server(create_app(settings), wait_ready=False)
        assert not wait_for_loading(live.service)[0]
        # The operator's log keeps the whole reason, paths included (logged once readiness has the reason).
        log.wait_for(lambda record: str(folder) in record.getMessage())
    try:
        ready = requests.get(live.url + "/health/ready", timeout=5)
        body = ready.json()
        assert ready.status_code == 503 and body["status"] == "error" and body["model"] == "my-clip"
        assert "my-clip" in body["reason"]
        response = post(live, "/embeddings", json={"text": "anything"})
        assert response.status_code == 503 and "failed to load" in response.json()["error"]
        for text in (ready.text, response.text):
            assert str(tmp_path) not in text and "our models" not in text and "gone" not in text, text
    finally:
        live.stop()


@pytest.mark.parametrize("message, shown", [
    ("no baked model in /models/sentence-transformers__x; no package", "no baked model in <path>; no package"),
    ("see https://huggingface.co/sentence-transformers/all-MiniLM-L6-v2 (1/2)",
     "see https://huggingface.co/sentence-transformers/all-MiniLM-L6-v2 (1/2)"),
    ("Unrecognized model in /srv/my models/my-clip.", "Unrecognized model in my-clip."),
    ("Can't read '/srv/my models/my-clip/config.json'", "Can't read 'my-clip/config.json'"),
])
def test_public_messages_keep_names_and_hide_absolute_paths(message, shown):
    assert without_local_paths(message, "/srv/my models/my-clip") == shown


def test_a_failing_on_ready_hook_is_logged_and_the_model_serves(test_settings, loaded_models):
    hooks = ServiceHooks(on_ready=lambda report: 1 / 0)  # a metrics backend that fails
    with watching_log("service") as log, running_service(test_settings, lambda _: loaded_models, hooks) as service:
        # The hook is called on the loading thread just before the service turns ready, which it does all the same.
        failure = log.wait_for(lambda record: "The on-ready hook failed" in record.getMessage())
        assert failure.levelno == logging.ERROR and failure.exc_info[0] is ZeroDivisionError
        assert service.readiness()[0]
        assert len(service.embed_texts(["still serving"]).vectors) == 1


def test_default_key_logs_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="main"):
        create_app(Settings(), StubService)
    assert any("abc123" in record.getMessage() for record in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="main"):
        create_app(Settings(api_keys=("secret",)), StubService)
    assert not caplog.records


def test_an_internal_error_is_json_500_and_the_server_keeps_serving(server, monkeypatch):
    def broken(texts):
        raise RuntimeError("injected failure")

    monkeypatch.setattr(server.service, "embed_texts", broken)
    response = post(server, "/embeddings", json={"text": "boom"})
    assert response.status_code == 500
    assert "Internal error" in response.json()["error"] and "injected" not in response.text
    monkeypatch.undo()
    assert post(server, "/embeddings", json={"text": "fine again"}).status_code == 200
