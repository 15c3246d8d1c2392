"""Faults and overload against gunicorn itself: killed workers, SIGTERM, more work than the queue holds.

A fault is injected only once the server has said the request is in a worker (its 100 Continue,
see testkit.start_request); no test sleeps to let something happen or asserts a time.
"""
from __future__ import annotations

import itertools
import json
import os
import signal
import threading
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest
import requests

from testkit import SAME_ENGINE_MIN_COSINE, assert_same_vectors, read_answer, start_gunicorn, start_request

KEY = "reliability-key"
AUTH = {"X-API-Key": KEY}
JSON_AUTH = {**AUTH, "Content-Type": "application/json"}
DOCUMENT = "Reliability means answering correctly or saying clearly why not. " * 70  # about 700 tokens
# Two such documents wait per worker, besides the one in the model; a third is refused.
# The request limits fit inside such a queue (config.py refuses start-up otherwise).
OVERLOAD_LIMITS = {"QUEUE_MAX_TOKENS": "1500", "MAX_TOKENS_PER_REQUEST": "1500", "MAX_TOKENS_PER_TEXT": "1500"}


@pytest.fixture
def gunicorn_server(tmp_path, models_dir):
    server = start_gunicorn(tmp_path, models_dir, VECTOR_EMBEDDER_API_KEY=KEY, THREADS="32")
    server.wait_until_ready()
    yield server
    server.stop()


@pytest.fixture
def overloadable_server(tmp_path, models_dir):
    server = start_gunicorn(tmp_path, models_dir, VECTOR_EMBEDDER_API_KEY=KEY, THREADS="32", **OVERLOAD_LIMITS)
    server.wait_until_ready()
    yield server
    server.stop()


def tree_rss_mb(server) -> float:
    root = psutil.Process(server.process.pid)
    return sum(process.memory_info().rss for process in [root] + root.children(recursive=True)) / 2 ** 20


def test_a_killed_worker_is_replaced_and_readiness_follows(tmp_path, models_dir, text_embedder):
    # One worker, so that readiness can only come from the worker that replaces it.
    gunicorn_server = start_gunicorn(tmp_path, models_dir, VECTOR_EMBEDDER_API_KEY=KEY, WORKERS="1")
    gunicorn_server.wait_until_ready()
    try:
        check_worker_replacement(gunicorn_server, text_embedder)
    finally:
        gunicorn_server.stop()


def check_worker_replacement(gunicorn_server, text_embedder):
    [old_worker] = gunicorn_server.worker_pids()
    body = json.dumps({"texts": [DOCUMENT] * 40}).encode()
    with start_request(gunicorn_server.url, "/embeddings/batch", body, JSON_AUTH) as connection:
        connection.sendall(body)  # to the worker thread that has the request: it is in flight when the worker dies
        os.kill(old_worker, signal.SIGKILL)
        with pytest.raises(ConnectionError):  # closed or reset, with no answer
            read_answer(connection)
    seen = []

    def ready(answer) -> bool:
        seen.append(answer.json()["status"])
        return answer.status_code == 200

    gunicorn_server.wait_for_readiness(ready, "ready again with a new worker")
    assert "loading" in seen, seen
    [new_worker] = gunicorn_server.worker_pids()
    assert new_worker != old_worker
    response = requests.post(gunicorn_server.url + "/embeddings", json={"text": "back again"}, headers=AUTH, timeout=30)
    assert_same_vectors(response.json()["embeddings"][0], text_embedder.embed(["back again"])[0],
                        SAME_ENGINE_MIN_COSINE)


def test_sigterm_lets_requests_in_flight_finish_correctly(gunicorn_server, text_embedder):
    texts = [DOCUMENT + str(n) for n in range(12)]
    bodies = [json.dumps({"texts": texts[start:start + 4]}).encode() for start in (0, 4, 8)]
    # Each request is in a worker thread (it has answered 100 Continue) when SIGTERM comes; the bodies come after.
    connections = [start_request(gunicorn_server.url, "/embeddings/batch", body, JSON_AUTH) for body in bodies]
    gunicorn_server.process.send_signal(signal.SIGTERM)
    answers = []
    for connection, body in zip(connections, bodies):
        with connection:
            connection.sendall(body)
            answers.append(read_answer(connection))
    assert gunicorn_server.process.wait(60) == 0
    for start, (status, answer) in zip((0, 4, 8), answers):
        assert status == 200, answer
        expected = text_embedder.embed(texts[start:start + 4])
        assert_same_vectors([wrapped[0] for wrapped in json.loads(answer)["embeddings"]], expected,
                            SAME_ENGINE_MIN_COSINE)


def test_overload_gets_429s_at_once_and_every_accepted_request_is_correct(overloadable_server, text_embedder):
    gunicorn_server = overloadable_server
    texts = [DOCUMENT + str(n) for n in range(30)]
    baseline_mb = tree_rss_mb(gunicorn_server)
    peak_mb = [baseline_mb]
    stop = threading.Event()

    def watch_memory():
        while not stop.wait(0.1):
            peak_mb.append(tree_rss_mb(gunicorn_server))

    answered = itertools.count()

    def call(text):
        response = requests.post(gunicorn_server.url + "/embeddings", json={"text": text}, headers=AUTH, timeout=120)
        return text, response, next(answered)

    watcher = threading.Thread(target=watch_memory)
    watcher.start()
    try:
        with ThreadPoolExecutor(len(texts)) as pool:
            answers = list(pool.map(call, texts))
    finally:
        stop.set()
        watcher.join()
    refused = [(response, order) for _, response, order in answers if response.status_code == 429]
    accepted = [(text, response) for text, response, _ in answers if response.status_code == 200]
    assert len(refused) + len(accepted) == len(texts)
    assert refused and accepted
    last_accepted = max(order for _, response, order in answers if response.status_code == 200)
    for response, order in refused:
        # Refused at once: answered before the accepted work was done, with the time that work takes.
        assert order < last_accepted and int(response.headers["Retry-After"]) >= 1
        assert "tokens of work" in response.json()["error"]
    for text, response in accepted:
        assert_same_vectors(response.json()["embeddings"][0], text_embedder.embed([text])[0],
                            SAME_ENGINE_MIN_COSINE)
    assert max(peak_mb) - baseline_mb < 300, (baseline_mb, max(peak_mb))
    metrics = requests.get(gunicorn_server.url + "/metrics", headers=AUTH, timeout=10).text
    assert f"embedder_rejected_total {float(len(refused))}" in metrics
