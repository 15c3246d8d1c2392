"""Metrics, request ids and the JSON request log, over a real server."""
from __future__ import annotations

import json
import logging

import pytest
import requests

from conftest import TEST_API_KEY

AUTH = {"X-API-Key": TEST_API_KEY}


@pytest.fixture
def request_log():
    records = []

    class Collect(logging.Handler):
        def emit(self, record):
            records.append(json.loads(record.getMessage()))

    handler = Collect()
    logger = logging.getLogger("embedder.requests")
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


def metric_value(text: str, line_start: str) -> float:
    for line in text.splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_request_id_is_echoed_or_generated(server):
    given = requests.get(server.url + "/health", headers={"X-Request-ID": "abc-123"}, timeout=5)
    assert given.headers["X-Request-ID"] == "abc-123"
    generated = requests.get(server.url + "/health", timeout=5).headers["X-Request-ID"]
    assert len(generated) == 32 and int(generated, 16) >= 0
    hostile = requests.get(server.url + "/health", headers={"X-Request-ID": "a b\"{}" * 50}, timeout=5)
    assert hostile.headers["X-Request-ID"] != "a b\"{}" * 50


def test_one_json_log_line_per_request_with_tokens(server, request_log, text_embedder):
    response = requests.post(server.url + "/embeddings", json={"text": "count my tokens"},
                             headers={**AUTH, "X-Request-ID": "log-me"}, timeout=30)
    assert response.status_code == 200
    line = next(record for record in request_log if record["request_id"] == "log-me")
    tokens = text_embedder.tokens_processed(text_embedder.tokenize(["count my tokens"])[0])
    assert line["method"] == "POST" and line["route"] == "/embeddings" and line["status"] == 200
    assert line["tokens"] == tokens and line["duration_ms"] > 0
    assert TEST_API_KEY not in json.dumps(request_log)


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
