"""The HTTP API over a real server on loopback, called with a real HTTP client."""
from __future__ import annotations

import logging
import threading
from pathlib import Path

import numpy as np
import pytest
import requests

from config import Settings
from conftest import (SAME_ENGINE_MIN_COSINE, TEST_API_KEY, assert_same_vectors, existing, expected_precision,
                      running_service, start_live_server, wait_for_loading)
from main import create_app
from model_loading import load_models
from model_locator import without_local_paths
from service import EmbeddingService, ServiceHooks

AUTH = {"X-API-Key": TEST_API_KEY}
LONG_TEXT = "Rivers carry water from the mountains to the sea. " * 150


def post(server, path, json=None, data=None, headers=None):
    return requests.post(server.url + path, json=json, data=data, headers={**AUTH, **(headers or {})}, timeout=60)


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


@pytest.mark.parametrize("headers", [{}, {"X-API-Key": "wrong"}, {"X-API-Key": ""}, {"X-API-Key": TEST_API_KEY + "x"}])
def test_missing_or_wrong_key_is_401(server, headers):
    response = requests.post(server.url + "/embeddings", json={"text": "hi"}, headers=headers, timeout=5)
    assert response.status_code == 401
    assert "API key" in response.json()["error"]
    assert TEST_API_KEY not in response.text


def test_any_of_several_keys_is_accepted(server_with):
    live = server_with(api_keys=("new-key", "old-key"))
    for key in ("new-key", "old-key"):
        response = requests.post(live.url + "/embeddings", json={"text": "hi"}, headers={"X-API-Key": key}, timeout=30)
        assert response.status_code == 200
    response = requests.post(live.url + "/embeddings", json={"text": "hi"}, headers=AUTH, timeout=5)
    assert response.status_code == 401


@pytest.mark.parametrize("path, body, status, message", [
    ("/embeddings", b"", 400, "empty"),
    ("/embeddings", b'{"text": ', 400, "not valid JSON"),
    ("/embeddings", b'["text"]', 400, "must be a JSON object, got an array"),
    ("/embeddings", b'"just a string"', 400, "must be a JSON object, got a string"),
    ("/embeddings", b"\xff\xfe{}", 400, "not valid UTF-8"),
    ("/embeddings", b"[" * 100000 + b"]" * 100000, 400, "JSON"),
    ("/embeddings", b'{"txt": "typo"}', 400, "Missing field 'text'"),
    ("/embeddings", b'{"text": 42}', 400, "text must be a string, got a number"),
    ("/embeddings", b'{"text": null}', 400, "text must be a string, got null"),
    ("/embeddings", b'{"text": ["a"]}', 400, "text must be a string, got an array"),
    ("/embeddings", b'{"text": ""}', 400, "text is empty"),
    ("/embeddings", b'{"text": " \\n\\t "}', 400, "text is empty"),
    ("/embeddings", b'{"text": "bad \\ud800 surrogate"}', 400, "surrogate"),
    ("/embeddings/batch", b'{"text": "a"}', 400, "Missing field 'texts'"),
    ("/embeddings/batch", b'{"texts": "a"}', 400, "texts must be an array of strings, got a string"),
    ("/embeddings/batch", b'{"texts": []}', 400, "texts is empty"),
    ("/embeddings/batch", b'{"texts": ["ok", 3]}', 400, "texts[1] must be a string"),
    ("/embeddings/batch", b'{"texts": ["ok", ""]}', 400, "texts[1] is empty"),
])
def test_bad_requests_get_a_400_that_says_what_is_wrong(server, path, body, status, message):
    response = post(server, path, data=body, headers={"Content-Type": "application/json"})
    assert response.status_code == status
    assert message in response.json()["error"]


def test_more_texts_than_the_batch_limit_is_400(server):
    response = post(server, "/embeddings/batch", json={"texts": ["a"] * 101})
    assert response.status_code == 400
    assert "101 texts; the limit is 100 (MAX_TEXTS_PER_BATCH)" in response.json()["error"]
    assert post(server, "/embeddings/batch", json={"texts": ["a"] * 100}).status_code == 200


def test_a_text_over_the_length_limit_is_413(server_with):
    live = server_with(max_text_length=50)
    response = post(live, "/embeddings", json={"text": "x" * 51})
    assert response.status_code == 413
    assert "limit is 50 (MAX_TEXT_LENGTH)" in response.json()["error"]
    response = post(live, "/embeddings/batch", json={"texts": ["fine", "y" * 51]})
    assert response.status_code == 413 and "texts[1]" in response.json()["error"]
    assert post(live, "/embeddings", json={"text": "x" * 50}).status_code == 200


def test_a_body_over_the_size_limit_is_413(server_with):
    live = server_with(max_request_size=1000)
    response = post(live, "/embeddings", json={"text": "z" * 2000})
    assert response.status_code == 413
    assert "limit of 1000 bytes (MAX_REQUEST_SIZE)" in response.json()["error"]


def test_unknown_routes_and_methods_answer_json(server):
    response = requests.get(server.url + "/nothing-here", timeout=5)
    assert response.status_code == 404 and "No route /nothing-here" in response.json()["error"]
    response = requests.get(server.url + "/embeddings", headers=AUTH, timeout=5)
    assert response.status_code == 405 and "GET is not allowed" in response.json()["error"]
    assert "POST" in response.headers["Allow"]


def test_routes_answer_503_while_the_model_loads_and_200_after(test_settings):
    release = threading.Event()

    def slow_loader(settings):
        release.wait(30)
        return load_models(settings)

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
def test_a_model_folder_that_cannot_load_is_reported_without_its_path(tmp_path, caplog, folder_exists):
    # An empty folder fails in the real loader; a missing one is not found. A space must not cut the path short.
    folder = tmp_path / ("our models" if folder_exists else "gone") / "my-clip"
    if folder_exists:
        folder.mkdir(parents=True)
    settings = Settings(api_keys=(TEST_API_KEY,), embedding_model=str(folder), models_dir=str(tmp_path / "baked"))
    with caplog.at_level(logging.ERROR, logger="service"):
        live = start_live_server(create_app(settings), wait_ready=False)
        assert not wait_for_loading(live.service)[0]
    try:
        ready = requests.get(live.url + "/health/ready", timeout=5)
        body = ready.json()
        assert ready.status_code == 503 and body["status"] == "error" and body["model"] == "my-clip"
        assert "my-clip" in body["reason"]
        response = post(live, "/embeddings", json={"text": "anything"})
        assert response.status_code == 503 and "failed to load" in response.json()["error"]
        for text in (ready.text, response.text):
            assert str(tmp_path) not in text and "our models" not in text and "gone" not in text, text
        # The operator's log keeps the whole reason, paths included.
        assert any(str(folder) in record.getMessage() for record in caplog.records)
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


def test_a_failing_on_ready_hook_is_logged_and_the_model_serves(test_settings, loaded_models, caplog):
    hooks = ServiceHooks(on_ready=lambda report: 1 / 0)  # a metrics backend that fails
    with caplog.at_level(logging.ERROR, logger="service"), \
            running_service(test_settings, lambda _: loaded_models, hooks) as service:
        assert service.readiness()[0] and "The on-ready hook failed" in caplog.text
        assert len(service.embed_texts(["still serving"]).vectors) == 1


def test_default_key_logs_a_warning(loaded_service, caplog):
    with caplog.at_level(logging.WARNING, logger="main"):
        create_app(Settings(), existing(loaded_service))
    assert any("abc123" in record.getMessage() for record in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="main"):
        create_app(Settings(api_keys=("secret",)), existing(loaded_service))
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
