"""Dynamic batching: correctness under concurrency, bounded queue, bounded waits."""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import pytest
import requests

from batcher import Batcher, BatchLimits, QueueFullError
from conftest import SAME_ENGINE_MIN_COSINE, TEST_API_KEY, assert_same_vectors, running_service, start_live_server
from embeddings import plan_forward_passes
from main import create_app

QUERIES = [f"how do I cook recipe number {n} with {'rice' if n % 2 else 'beans'}" for n in range(24)]
DOCUMENT = "A long document about the history of bridges and how they are built. " * 60


def test_plan_forward_passes_respects_both_limits_and_groups_by_length():
    lengths = [5, 300, 7, 6, 120, 8, 9, 10, 11, 600]
    passes = plan_forward_passes(lengths, max_tokens=512, max_windows=3)
    assert sorted(index for group in passes for index in group) == list(range(len(lengths)))
    for group in passes:
        longest = max(lengths[index] for index in group)
        assert len(group) <= 3
        assert len(group) * longest <= 512 or len(group) == 1
    assert [lengths[index] for index in passes[0]] == [5, 6, 7]
    assert [600] in [[lengths[index] for index in group] for group in passes]


@pytest.fixture(scope="module")
def batching_service(test_settings):
    with running_service(replace(test_settings, batch_wait_ms=20)) as service:
        yield service


def requests_per_batch(service) -> list[int]:
    """Record how many requests each of the service's model batches served from now on."""
    seen: list[int] = []
    service.observe_batches(lambda stats: seen.append(stats.jobs))
    return seen


def test_concurrent_requests_are_batched_and_equal_unbatched_results(batching_service, text_embedder):
    inputs = [[query] for query in QUERIES] + [[DOCUMENT, "short"], ["x y z", DOCUMENT, QUERIES[0]]]
    barrier = threading.Barrier(len(inputs))

    def embed(texts):
        barrier.wait()
        return batching_service.embed_texts(texts)

    batches = requests_per_batch(batching_service)
    with ThreadPoolExecutor(len(inputs)) as pool:
        results = list(pool.map(embed, inputs))
    for texts, result in zip(inputs, results):
        assert len(result.vectors) == len(texts)
        for text, vector in zip(texts, result.vectors):
            assert_same_vectors(vector, text_embedder.embed([text])[0], SAME_ENGINE_MIN_COSINE)
    assert max(batches) > 1, batches


def test_batching_off_runs_one_request_per_batch(test_settings, text_embedder):
    with running_service(replace(test_settings, batch_wait_ms=0)) as service:
        batches = requests_per_batch(service)
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda text: service.embed_texts([text]), QUERIES[:8]))
        for text, result in zip(QUERIES, results):
            assert_same_vectors(result.vectors[0], text_embedder.embed([text])[0], SAME_ENGINE_MIN_COSINE)
        assert set(batches) == {1} and len(batches) == 8


class GatedEncoder:
    """Encodes for real but only when let through: a model made slow on purpose."""

    def __init__(self, text_embedder):
        self.text_embedder = text_embedder
        self.gate = threading.Event()
        self.entered = threading.Event()

    def __call__(self, windows):
        self.entered.set()
        assert self.gate.wait(30)
        return self.text_embedder.encode_chunks(windows)


def windows_of(text_embedder, text):
    return text_embedder.tokenize([text])[0].chunks


def test_a_full_queue_refuses_quickly_and_loses_nothing_accepted(text_embedder):
    encoder = GatedEncoder(text_embedder)
    batcher = Batcher(encoder, text_embedder.tokens_per_chunk, BatchLimits(4096, 0.005, queue_max=3))
    batcher.start()
    with ThreadPoolExecutor(4) as pool:
        in_model = pool.submit(batcher.encode, windows_of(text_embedder, QUERIES[0]))
        assert encoder.entered.wait(10)
        queued = [pool.submit(batcher.encode, windows_of(text_embedder, text)) for text in QUERIES[1:4]]
        deadline = time.monotonic() + 10
        while batcher.queue_depth < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        started = time.monotonic()
        with pytest.raises(QueueFullError):
            batcher.encode(windows_of(text_embedder, QUERIES[4]))
        assert time.monotonic() - started < 0.5
        encoder.gate.set()
        for text, future in zip(QUERIES[:4], [in_model] + queued):
            assert_same_vectors(future.result(30)[0], text_embedder.embed([text])[0], SAME_ENGINE_MIN_COSINE)
    batcher.stop()


def test_a_lone_request_does_not_wait_for_company(text_embedder):
    max_wait = 2.0
    batcher = Batcher(text_embedder.encode_chunks, text_embedder.tokens_per_chunk, BatchLimits(4096, max_wait, 32))
    batcher.start()
    try:
        windows = windows_of(text_embedder, "alone")
        batcher.encode(windows)
        started = time.monotonic()
        batcher.encode(windows)
        assert time.monotonic() - started < max_wait / 4
    finally:
        batcher.stop()


def test_after_concurrent_traffic_a_request_waits_at_most_the_wait_bound(text_embedder):
    max_wait = 0.3
    batcher = Batcher(text_embedder.encode_chunks, text_embedder.tokens_per_chunk, BatchLimits(4096, max_wait, 32))
    batcher.start()
    try:
        windows = windows_of(text_embedder, "company")
        barrier = threading.Barrier(6)

        def together(_):
            barrier.wait()
            return batcher.encode(windows)

        with ThreadPoolExecutor(6) as pool:
            list(pool.map(together, range(6)))
        started = time.monotonic()
        batcher.encode(windows)
        assert time.monotonic() - started < max_wait + 1.0
    finally:
        batcher.stop()


def test_a_failing_batch_fails_its_requests_and_the_thread_serves_on(text_embedder):
    failures = iter([RuntimeError("injected model fault")])

    def sometimes_failing(windows):
        failure = next(failures, None)
        if failure is not None:
            raise failure
        return text_embedder.encode_chunks(windows)

    batcher = Batcher(sometimes_failing, text_embedder.tokens_per_chunk, BatchLimits(4096, 0.005, 32))
    batcher.start()
    try:
        with pytest.raises(RuntimeError, match="injected"):
            batcher.encode(windows_of(text_embedder, "first"))
        vector = batcher.encode(windows_of(text_embedder, "second"))[0]
        assert_same_vectors(vector, text_embedder.embed(["second"])[0], SAME_ENGINE_MIN_COSINE)
    finally:
        batcher.stop()


def test_stop_finishes_every_accepted_request(text_embedder):
    encoder = GatedEncoder(text_embedder)
    batcher = Batcher(encoder, text_embedder.tokens_per_chunk, BatchLimits(4096, 0.005, 32))
    batcher.start()
    with ThreadPoolExecutor(5) as pool:
        futures = [pool.submit(batcher.encode, windows_of(text_embedder, text)) for text in QUERIES[:5]]
        assert encoder.entered.wait(10)
        stopper = threading.Thread(target=batcher.stop)
        stopper.start()
        encoder.gate.set()
        stopper.join(30)
        for text, future in zip(QUERIES, futures):
            assert_same_vectors(future.result(30)[0], text_embedder.embed([text])[0], SAME_ENGINE_MIN_COSINE)
    with pytest.raises(RuntimeError, match="stopping"):
        batcher.encode(windows_of(text_embedder, "too late"))


def test_http_overload_gets_429_with_retry_after_and_accepted_requests_complete(test_settings, text_embedder):
    with running_service(replace(test_settings, queue_max=2)) as service:
        check_http_overload(start_live_server(create_app(test_settings, service)), text_embedder)


def check_http_overload(live, text_embedder):
    try:
        texts = [DOCUMENT + str(n) for n in range(24)]

        def call(text):
            return text, requests.post(live.url + "/embeddings", json={"text": text},
                                       headers={"X-API-Key": TEST_API_KEY}, timeout=120)

        with ThreadPoolExecutor(len(texts)) as pool:
            answers = list(pool.map(call, texts))
        statuses = [response.status_code for _, response in answers]
        assert set(statuses) <= {200, 429} and 429 in statuses and 200 in statuses
        for text, response in answers:
            if response.status_code == 429:
                assert response.headers["Retry-After"] == "1"
                assert "busy" in response.json()["error"]
            else:
                vector = response.json()["embeddings"][0]
                assert_same_vectors(vector, text_embedder.embed([text])[0], SAME_ENGINE_MIN_COSINE)
    finally:
        live.stop()


def test_a_client_that_disconnects_does_not_break_the_batch(server, text_embedder):
    def impatient():
        try:
            requests.post(server.url + "/embeddings/batch", json={"texts": [DOCUMENT] * 40},
                          headers={"X-API-Key": TEST_API_KEY}, timeout=0.05)
        except requests.exceptions.Timeout:
            pass

    def patient(text):
        return requests.post(server.url + "/embeddings", json={"text": text},
                             headers={"X-API-Key": TEST_API_KEY}, timeout=120)

    with ThreadPoolExecutor(9) as pool:
        gone = pool.submit(impatient)
        answers = list(pool.map(patient, QUERIES[:8]))
        gone.result()
    for text, response in zip(QUERIES, answers):
        assert response.status_code == 200
        assert_same_vectors(response.json()["embeddings"][0], text_embedder.embed([text])[0], SAME_ENGINE_MIN_COSINE)
