"""Metrics and the JSON request log over a real server; request ids on the app without a model."""
from __future__ import annotations

import json
import re
import uuid

import requests

from testkit import AUTH, TEST_API_KEY, app_without_model


def metric_value(text: str, line_start: str) -> float:
    for line in text.splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def assert_generated(request_id: str) -> None:
    """A request id the service made: a random UUID (version 4) in 32 lower-case hex digits."""
    assert re.fullmatch(r"[0-9a-f]{32}", request_id), request_id
    assert uuid.UUID(hex=request_id).version == 4, request_id


def test_request_id_is_echoed_or_generated():
    client = app_without_model().client
    given = client.get("/health", headers={"X-Request-ID": "abc-123"})
    assert given.headers["X-Request-ID"] == "abc-123"
    generated = [client.get("/health").headers["X-Request-ID"] for _ in range(2)]
    for request_id in generated:
        assert_generated(request_id)
    assert generated[0] != generated[1]
    # One that would break the log's lines is not echoed: the request gets an id of the service's own.
    assert_generated(client.get("/health", headers={"X-Request-ID": "a b\"{}" * 50}).headers["X-Request-ID"])


def test_one_json_log_line_per_request_with_tokens(server, request_log, text_embedder):
    response = requests.post(server.url + "/embeddings", json={"text": "count my tokens"},
                             headers={**AUTH, "X-Request-ID": "log-me"}, timeout=30)
    assert response.status_code == 200
    line = request_log.wait_for(lambda record: record["request_id"] == "log-me")
    tokens = text_embedder.tokens_processed(text_embedder.tokenize(["count my tokens"])[0])
    assert line["method"] == "POST" and line["route"] == "/embeddings" and line["status"] == 200
    assert line["tokens"] == tokens and line["duration_ms"] > 0
    assert TEST_API_KEY not in json.dumps(request_log.records)


def test_metrics_need_the_key_and_count_requests_tokens_and_batches(server):
    assert requests.get(server.url + "/metrics", timeout=5).status_code == 401
    before = requests.get(server.url + "/metrics", headers=AUTH, timeout=5).text
    requests.post(server.url + "/embeddings/batch", json={"texts": ["one", "two words"]}, headers=AUTH, timeout=30)
    requests.post(server.url + "/embeddings", json={"text": ""}, headers=AUTH, timeout=30)
    after = requests.get(server.url + "/metrics", headers=AUTH, timeout=5)
    assert after.status_code == 200 and after.headers["Content-Type"].startswith("text/plain")
    text = after.text
    ok = 'embedder_requests_total{route="/embeddings/batch",status="200"}'
    bad = 'embedder_requests_total{route="/embeddings",status="400"}'
    assert metric_value(text, ok) == metric_value(before, ok) + 1
    assert metric_value(text, bad) == metric_value(before, bad) + 1
    assert metric_value(text, "embedder_tokens_total") >= metric_value(before, "embedder_tokens_total") + 7
    assert metric_value(text, "embedder_batch_requests_count") > 0
    assert "embedder_request_seconds_bucket" in text and "embedder_queue_depth" in text
    assert metric_value(text, "embedder_model_load_seconds") > 0
    assert TEST_API_KEY not in text


def test_metrics_can_be_opened_to_scrapers(server_with):
    live = server_with(metrics_public=True)
    response = requests.get(live.url + "/metrics", timeout=5)
    assert response.status_code == 200 and "embedder_requests_total" in response.text


def test_public_routes_reveal_no_key(server):
    for path in ("/health", "/health/ready", "/openapi.json", "/docs"):
        response = requests.get(server.url + path, timeout=10)
        assert response.status_code == 200, path
        assert TEST_API_KEY not in response.text, path
    assert requests.get(server.url + "/metrics", timeout=10).status_code == 401
