"""Faults and overload against gunicorn itself: killed workers, SIGTERM, more work than the queue holds."""
from __future__ import annotations

import os
import itertools
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest
import requests

from conftest import SAME_ENGINE_MIN_COSINE, assert_same_vectors, start_gunicorn

KEY = "reliability-key"
AUTH = {"X-API-Key": KEY}
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
    in_flight = ThreadPoolExecutor(1)
    request = in_flight.submit(requests.post, gunicorn_server.url + "/embeddings/batch",
                               json={"texts": [DOCUMENT] * 40}, headers=AUTH, timeout=60)
    time.sleep(0.5)  # the batch is being encoded when the worker dies
    os.kill(old_worker, signal.SIGKILL)
    with pytest.raises(requests.ConnectionError):
        request.result()
    in_flight.shutdown()
    seen, deadline = [], time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            response = requests.get(gunicorn_server.url + "/health/ready", timeout=5)
        except requests.ConnectionError:
            continue
        seen.append(response.json()["status"])
        if response.status_code == 200:
            break
        time.sleep(0.05)
    assert seen[-1] == "ready" and "loading" in seen, seen
    [new_worker] = gunicorn_server.worker_pids()
    assert new_worker != old_worker
    response = requests.post(gunicorn_server.url + "/embeddings", json={"text": "back again"}, headers=AUTH, timeout=30)
    assert_same_vectors(response.json()["embeddings"][0], text_embedder.embed(["back again"])[0],
                        SAME_ENGINE_MIN_COSINE)


def test_sigterm_lets_requests_in_flight_finish_correctly(gunicorn_server, text_embedder):
    texts = [DOCUMENT + str(n) for n in range(12)]

    def call(text_batch):
        return requests.post(gunicorn_server.url + "/embeddings/batch", json={"texts": text_batch},
                             headers=AUTH, timeout=120)

    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(call, texts[start:start + 4]) for start in (0, 4, 8)]
        time.sleep(0.5)
        gunicorn_server.process.send_signal(signal.SIGTERM)
        answers = [future.result() for future in futures]
    assert gunicorn_server.process.wait(60) == 0
    for start, response in zip((0, 4, 8), answers):
        assert response.status_code == 200
        expected = text_embedder.embed(texts[start:start + 4])
        assert_same_vectors([wrapped[0] for wrapped in response.json()["embeddings"]], expected,
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
