"""Dynamic batching: correct under concurrency, a queue bounded by its work, a deadline for every
request, and a model thread that cannot fail unnoticed.

Tests synchronise with events (a model call held at a gate, a batch observed), never with sleeps,
and assert no wall-clock bound. PATIENCE only turns a hang of broken code into a failure.
"""
from __future__ import annotations

import json
import logging
import math
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import replace
from typing import Iterator

import pytest
import requests

from batcher import (ASSUMED_TOKENS_PER_SECOND, Batcher, BatchLimits, ModelUnavailableError, QueueFullError,
                     RequestTimeoutError, Throughput)
from embeddings import plan_forward_passes
from main import SMALL_BODY_BYTES
from service import ServiceHooks
from testkit import (AUTH, MODEL, PATIENCE, SAME_ENGINE_MIN_COSINE, TEST_API_KEY, GatedEncoder, assert_same_vectors,
                     post, post_v1, running_service, service_around_model, serving, tokens_of, windows_of)

QUERIES = [f"how do I cook recipe number {n} with {'rice' if n % 2 else 'beans'}" for n in range(24)]
DOCUMENT = "A long document about the history of bridges and how they are built. " * 60
LIMITS = BatchLimits(max_tokens=4096, batching=True, queue_max_tokens=32768, request_timeout=PATIENCE)


class ModelThreadKilled(BaseException):
    """Ends a thread past any `except Exception`, as SystemExit would."""


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


def recording_batches(batches: list[int]) -> ServiceHooks:
    """Hooks that record how many requests each of the service's model batches served."""
    return ServiceHooks(on_batch=lambda stats: batches.append(stats.jobs))


def test_concurrent_requests_are_batched_and_equal_unbatched_results(test_settings, loaded_models, text_embedder):
    inputs = [[query] for query in QUERIES] + [[DOCUMENT, "short"], ["x y z", DOCUMENT, QUERIES[0]]]
    barrier = threading.Barrier(len(inputs))

    batches: list[int] = []
    with running_service(test_settings, lambda _: loaded_models,
                         recording_batches(batches)) as service:
        def embed(texts):
            barrier.wait()
            return service.embed_texts(texts)

        with ThreadPoolExecutor(len(inputs)) as pool:
            results = list(pool.map(embed, inputs))
    for texts, result in zip(inputs, results):
        assert len(result.vectors) == len(texts)
        for text, vector in zip(texts, result.vectors):
            assert_same_vectors(vector, text_embedder.embed([text])[0], SAME_ENGINE_MIN_COSINE)
    assert max(batches) > 1, batches


def test_batching_off_runs_one_request_per_batch(test_settings, loaded_models, text_embedder):
    batches: list[int] = []
    with running_service(replace(test_settings, batching=False), lambda _: loaded_models,
                         recording_batches(batches)) as service:
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda text: service.embed_texts([text]), QUERIES[:8]))
        for text, result in zip(QUERIES, results):
            assert_same_vectors(result.vectors[0], text_embedder.embed([text])[0], SAME_ENGINE_MIN_COSINE)
        assert set(batches) == {1} and len(batches) == 8


# --- the batcher itself -------------------------------------------------------

def new_batcher(encode, text_embedder, on_batch=None, clock=time.monotonic, **limit_changes) -> Batcher:
    return Batcher(encode, text_embedder.tokens_per_window, replace(LIMITS, **limit_changes), on_batch, clock)


@contextmanager
def running(batcher: Batcher, gate: threading.Event | None = None) -> Iterator[Batcher]:
    """The batcher started; on the way out its model calls are let through, then it stops."""
    batcher.start()
    try:
        yield batcher
    finally:
        if gate is not None:
            gate.set()
        batcher.stop()


def assert_vector_of(text_embedder, text, vector):
    assert_same_vectors(vector, text_embedder.embed([text])[0], SAME_ENGINE_MIN_COSINE)


def test_a_full_queue_refuses_at_once_and_loses_nothing_accepted(text_embedder):
    encoder = GatedEncoder(text_embedder)
    texts = QUERIES[:5]
    bound = sum(tokens_of(text_embedder, text) for text in texts[1:4])
    batcher = new_batcher(encoder, text_embedder, queue_max_tokens=bound)
    with ThreadPoolExecutor(1) as pool, running(batcher, encoder.gate):
        in_model = pool.submit(batcher.encode, windows_of(text_embedder, texts[0]))
        assert encoder.entered.wait(PATIENCE)
        queued = [batcher.submit(windows_of(text_embedder, text)) for text in texts[1:4]]
        # Refused while the model is still held: the refusal does not wait for the model.
        with pytest.raises(QueueFullError) as refusal:
            batcher.submit(windows_of(text_embedder, texts[4]))
        with pytest.raises(QueueFullError):
            batcher.ensure_room()
        assert refusal.value.retry_after == max(1, math.ceil(bound / ASSUMED_TOKENS_PER_SECOND))
        encoder.gate.set()
        results = [in_model.result(PATIENCE)] + [batcher.wait_for(job) for job in queued]
    for text, vectors in zip(texts, results):
        assert_vector_of(text_embedder, text, vectors[0])


def test_a_job_larger_than_the_queue_bound_is_admitted_when_nothing_waits(text_embedder):
    encoder = GatedEncoder(text_embedder)
    batcher = new_batcher(encoder, text_embedder, queue_max_tokens=100)
    with ThreadPoolExecutor(1) as pool, running(batcher, encoder.gate):
        pool.submit(batcher.encode, windows_of(text_embedder, "first"))
        assert encoder.entered.wait(PATIENCE)
        large = batcher.submit(windows_of(text_embedder, DOCUMENT))
        with pytest.raises(QueueFullError):
            batcher.submit(windows_of(text_embedder, "small"))
        encoder.gate.set()
        vectors = batcher.wait_for(large)
    expected = text_embedder.encode_windows(windows_of(text_embedder, DOCUMENT))
    assert_same_vectors(vectors, expected, SAME_ENGINE_MIN_COSINE)


def test_retry_after_is_the_time_the_queued_work_takes_at_the_measured_throughput():
    throughput = Throughput(assumed_tokens_per_second=1000)
    assert (throughput.seconds_for(0), throughput.seconds_for(2500)) == (1, 3)
    for _ in range(100):
        throughput.record(tokens=4000, seconds=1.0)
    assert throughput.tokens_per_second == pytest.approx(4000, rel=1e-3)  # the assumed rate has faded out
    assert throughput.seconds_for(10_000) == 3


def queued_behind_a_held_request(batcher: Batcher, encoder: GatedEncoder, windows, count: int) -> list:
    """The vectors of `count` requests that queue while a first one is held in the model, and of that first one."""
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(batcher.encode, windows)
        assert encoder.entered.wait(PATIENCE)
        behind = [batcher.submit(windows) for _ in range(count)]
        encoder.gate.set()
        return [first.result(PATIENCE)] + [batcher.wait_for(job) for job in behind]


def test_a_free_model_thread_takes_what_waits_and_never_waits_for_company(text_embedder):
    encoder = GatedEncoder(text_embedder)
    windows = windows_of(text_embedder, "company")
    per_request = sum(text_embedder.tokens_per_window(window) for window in windows)
    batches: list[int] = []
    batcher = new_batcher(encoder, text_embedder, lambda stats: batches.append(stats.jobs),
                          max_tokens=3 * per_request)
    with running(batcher, encoder.gate):
        # While the model works on a first request, four more queue: the next batch takes what fits the budget.
        for vectors in queued_behind_a_held_request(batcher, encoder, windows, 4):
            assert_vector_of(text_embedder, "company", vectors[0])
        # A lone request after concurrent traffic is taken at once, alone: nothing waits for company.
        assert_vector_of(text_embedder, "company", batcher.encode(windows)[0])
    assert batches == [1, 3, 1, 1]


def test_batching_off_takes_one_request_at_a_time(text_embedder):
    encoder = GatedEncoder(text_embedder)
    batches: list[int] = []
    batcher = new_batcher(encoder, text_embedder, lambda stats: batches.append(stats.jobs), batching=False)
    with running(batcher, encoder.gate):
        queued_behind_a_held_request(batcher, encoder, windows_of(text_embedder, "alone"), 3)
    assert batches == [1, 1, 1, 1]


def test_a_large_job_runs_in_model_calls_of_at_most_the_batch_budget(text_embedder):
    encoder = GatedEncoder(text_embedder)
    encoder.gate.set()
    windows = windows_of(text_embedder, DOCUMENT * 2)
    batcher = new_batcher(encoder, text_embedder, max_tokens=600)
    with running(batcher):
        vectors = batcher.encode(windows)
    assert len(encoder.calls) > 1
    assert all(sum(text_embedder.tokens_per_window(window) for window in call) <= 600 for call in encoder.calls)
    assert_same_vectors(vectors, text_embedder.encode_windows(windows), SAME_ENGINE_MIN_COSINE)


def test_a_failing_batch_fails_its_requests_and_the_thread_serves_on(text_embedder):
    failures = iter([RuntimeError("injected model fault")])

    def sometimes_failing(windows):
        failure = next(failures, None)
        if failure is not None:
            raise failure
        return text_embedder.encode_windows(windows)

    batcher = new_batcher(sometimes_failing, text_embedder)
    with running(batcher):
        with pytest.raises(RuntimeError, match="injected"):
            batcher.encode(windows_of(text_embedder, "first"))
        assert_vector_of(text_embedder, "second", batcher.encode(windows_of(text_embedder, "second"))[0])


def broken_observer(stats):
    raise RuntimeError("metrics backend down")


def test_a_raising_batch_observer_is_logged_and_every_job_gets_its_vectors(text_embedder, caplog):
    batcher = new_batcher(text_embedder.encode_windows, text_embedder, broken_observer)
    with caplog.at_level(logging.ERROR, logger="batcher"), running(batcher):
        for text in QUERIES[:3]:
            assert_vector_of(text_embedder, text, batcher.encode(windows_of(text_embedder, text))[0])
        assert batcher.fault() is None
    assert "batch observer failed" in caplog.text and "metrics backend down" in caplog.text


def test_an_observer_that_ends_the_model_thread_fails_its_batch_with_the_reason(text_embedder):
    def killing_observer(stats):
        raise ModelThreadKilled("observer")

    batcher = new_batcher(text_embedder.encode_windows, text_embedder, killing_observer)
    with running(batcher):
        with pytest.raises(ModelUnavailableError, match="ModelThreadKilled: observer"):
            batcher.encode(windows_of(text_embedder, "its batch is done, the answer never handed out"))
        assert "ModelThreadKilled: observer" in batcher.fault()


def test_past_its_deadline_a_request_fails_clearly_and_its_queued_job_is_never_encoded(text_embedder):
    encoder = GatedEncoder(text_embedder)
    batcher = new_batcher(encoder, text_embedder, request_timeout=0.2, queue_max_tokens=64)
    held, left = windows_of(text_embedder, "held in the model"), windows_of(text_embedder, "left in the queue")
    with ThreadPoolExecutor(1) as pool, running(batcher, encoder.gate):
        in_model = pool.submit(batcher.encode, held)
        assert encoder.entered.wait(PATIENCE)
        queued = batcher.submit(left)
        with pytest.raises(RequestTimeoutError) as timeout:
            batcher.wait_for(queued)
        assert timeout.value.timeout == 0.2 and timeout.value.retry_after >= 1
        with pytest.raises(RequestTimeoutError):
            in_model.result(PATIENCE)
        # Nothing of theirs is left behind: a job the size of the whole bound is admitted only to an empty queue.
        whole_bound = batcher.submit([[1000] * 62])
        with pytest.raises(QueueFullError):
            batcher.ensure_room()
    # stop() has let the held call finish and run everything still queued: the dropped job was not.
    assert encoder.calls == [held, whole_bound.windows]


def test_a_large_job_stops_between_model_calls_once_its_request_gave_up(text_embedder):
    encoder = GatedEncoder(text_embedder)
    batcher = new_batcher(encoder, text_embedder, request_timeout=0.2, max_tokens=600)
    with running(batcher, encoder.gate):
        with pytest.raises(RequestTimeoutError):
            batcher.encode(windows_of(text_embedder, DOCUMENT))
    assert len(encoder.calls) == 1


def test_if_the_model_thread_dies_every_waiting_job_fails_with_the_reason(text_embedder, caplog):
    gate, entered = threading.Event(), threading.Event()

    def dying_model(windows):
        entered.set()
        gate.wait()
        raise ModelThreadKilled("injected")

    batcher = new_batcher(dying_model, text_embedder)
    with ThreadPoolExecutor(1) as pool, running(batcher, gate):
        in_model = pool.submit(batcher.encode, windows_of(text_embedder, "in the model"))
        assert entered.wait(PATIENCE)
        queued = batcher.submit(windows_of(text_embedder, "queued"))
        with caplog.at_level(logging.CRITICAL, logger="batcher"):
            gate.set()
            # Failed at once with the reason, not left to wait for the deadline.
            with pytest.raises(ModelUnavailableError, match="ModelThreadKilled: injected"):
                batcher.wait_for(queued)
        with pytest.raises(ModelUnavailableError, match="ModelThreadKilled: injected"):
            in_model.result(PATIENCE)
        assert "ModelThreadKilled: injected" in batcher.fault()
        for refused in (batcher.ensure_room, lambda: batcher.submit(windows_of(text_embedder, "later"))):
            with pytest.raises(ModelUnavailableError, match="ModelThreadKilled"):
                refused()
    assert "model thread ended on ModelThreadKilled" in caplog.text


def test_a_model_call_far_beyond_the_deadline_is_reported_stuck_once_in_the_log(text_embedder, caplog):
    now = [0.0]
    encoder = GatedEncoder(text_embedder)
    batcher = new_batcher(encoder, text_embedder, clock=lambda: now[0], request_timeout=10)
    with ThreadPoolExecutor(1) as pool, running(batcher, encoder.gate), caplog.at_level(logging.ERROR, "batcher"):
        in_model = pool.submit(batcher.encode, windows_of(text_embedder, "slow"))
        assert encoder.entered.wait(PATIENCE)
        now[0] = batcher.limits.stuck_after  # slow, but not yet stuck
        assert batcher.fault() is None
        now[0] += 1
        assert "stuck" in batcher.fault() and "stuck" in batcher.fault()
        encoder.gate.set()
        in_model.result(PATIENCE)
        assert batcher.fault() is None
    assert [record.levelname for record in caplog.records if "stuck" in record.getMessage()] == ["ERROR"]


def test_stop_finishes_every_accepted_request(text_embedder):
    encoder = GatedEncoder(text_embedder)
    batcher = new_batcher(encoder, text_embedder)
    batcher.start()
    # Every job is in the queue (submit returns once it is) before stop is called: no race with the stop.
    jobs = [batcher.submit(windows_of(text_embedder, text)) for text in QUERIES[:5]]
    assert encoder.entered.wait(PATIENCE)
    stopper = threading.Thread(target=batcher.stop)
    stopper.start()
    encoder.gate.set()
    stopper.join(PATIENCE)
    for text, job in zip(QUERIES, jobs):
        assert_vector_of(text_embedder, text, batcher.wait_for(job)[0])
    with pytest.raises(ModelUnavailableError, match="stopping"):
        batcher.encode(windows_of(text_embedder, "too late"))


# --- over HTTP ------------------------------------------------------------------

def post_text(live, text):
    return post(live, "/embeddings", {"text": text})


def test_a_burst_of_64_one_text_requests_all_get_200(server, text_embedder):
    texts = [f"query {n}: where can I buy {'rice' if n % 2 else 'beans'} near station {n}" for n in range(64)]
    barrier = threading.Barrier(len(texts))

    def call(text):
        barrier.wait(PATIENCE)
        return post_text(server, text)

    with ThreadPoolExecutor(len(texts)) as pool:
        answers = list(pool.map(call, texts))
    assert [answer.status_code for answer in answers] == [200] * len(texts)
    for expected, answer in zip(text_embedder.embed(texts), answers):
        assert_same_vectors(answer.json()["embeddings"][0], expected, SAME_ENGINE_MIN_COSINE)


FLOOD_WORDS = ["apple", "river", "stone", "cloud", "green", "house", "train", "music", "paper", "light", "water",
               "field"]


def test_a_flood_beyond_the_queue_gets_429_at_once_and_every_accepted_request_is_correct(
        test_settings, text_embedder):
    flood = [f"{DOCUMENT} {word}" for word in FLOOD_WORDS]
    tokens = {text: tokens_of(text_embedder, text) for text in flood}
    assert 3 * min(tokens.values()) > 2 * max(tokens.values())  # so exactly two of them fit in the queue
    settings = replace(test_settings, queue_max_tokens=2 * max(tokens.values()))
    encoder = GatedEncoder(text_embedder)
    with (service_around_model(settings, text_embedder, encoder) as service, serving(settings, service) as live,
          ThreadPoolExecutor(len(flood) + 1) as pool):
        try:
            first = pool.submit(post_text, live, "first, and held in the model")
            assert encoder.entered.wait(PATIENCE)
            answers = {pool.submit(post_text, live, text): text for text in flood}
            refused = []
            for future in as_completed(answers, timeout=PATIENCE):
                refused.append(future)
                if len(refused) == len(flood) - 2:
                    break
            # All of them answered while the model is still held: refused at once, not after waiting.
            queued_tokens = sum(tokens[text] for future, text in answers.items() if future not in refused)
            for future in refused:
                response = future.result()
                assert response.status_code == 429 and "busy" in response.json()["error"]
                assert response.headers["Retry-After"] == str(math.ceil(queued_tokens / ASSUMED_TOKENS_PER_SECOND))
        finally:
            encoder.gate.set()
        assert first.result().status_code == 200
        accepted = [(text, future.result()) for future, text in answers.items() if future not in refused]
    assert len(accepted) == 2
    for text, response in accepted:
        assert response.status_code == 200
        assert_vector_of(text_embedder, text, response.json()["embeddings"][0])


def test_a_raising_batch_observer_costs_no_request_its_answer(test_settings, text_embedder, caplog):
    with service_around_model(test_settings, text_embedder, text_embedder.encode_windows,
                              ServiceHooks(on_batch=broken_observer)) as service:
        with serving(test_settings, service) as live, caplog.at_level(logging.ERROR, logger="batcher"):
            for text in QUERIES[:3]:
                response = post_text(live, text)
                assert response.status_code == 200
                assert_vector_of(text_embedder, text, response.json()["embeddings"][0])
            health = requests.get(live.url + "/health", timeout=PATIENCE)
    assert (health.status_code, health.json()) == (200, {"status": "ok"})
    assert "batch observer failed" in caplog.text


def test_a_model_call_that_never_returns_gets_503_at_the_deadline_and_health_says_stuck(
        test_settings, text_embedder, caplog, monkeypatch):
    settings = replace(test_settings, request_timeout_seconds=0.5)
    encoder = GatedEncoder(text_embedder)
    now = [0.0]
    with (service_around_model(settings, text_embedder, encoder) as service, serving(settings, service) as live,
          ThreadPoolExecutor(1) as pool):
        # Time, moved on by the test: the one fault injected into the service's insides, which take no clock.
        monkeypatch.setattr(service._batcher, "_clock", lambda: now[0])
        try:
            held = pool.submit(post_text, live, "held in the model")
            assert encoder.entered.wait(PATIENCE)
            queued = post_v1(live, {"model": MODEL, "input": "left in the queue"})
            for response in (held.result(), queued):
                assert response.status_code == 503 and int(response.headers["Retry-After"]) >= 1
                assert "did not answer within 0.5 s (REQUEST_TIMEOUT_SECONDS)" in response.text
            assert queued.json()["error"]["code"] == "timeout"
            assert requests.get(live.url + "/health", timeout=PATIENCE).status_code == 200  # slow is not stuck
            now[0] = 3600  # an hour in one model call
            with caplog.at_level(logging.ERROR, logger="batcher"):
                health = requests.get(live.url + "/health", timeout=PATIENCE)
            ready = requests.get(live.url + "/health/ready", timeout=PATIENCE)
            for answer in (health, ready):
                assert answer.status_code == 503
                assert answer.json()["status"] == "error" and "stuck" in answer.json()["reason"]
            assert "stuck" in caplog.text
        finally:
            encoder.gate.set()
        service.stop()
        assert requests.get(live.url + "/health", timeout=PATIENCE).status_code == 200
    assert encoder.calls == [windows_of(text_embedder, "held in the model")]


def test_a_dead_model_thread_makes_health_and_readiness_503_and_requests_fail_at_once(
        test_settings, text_embedder, caplog):
    def killing_model(windows):
        raise ModelThreadKilled("injected: the model thread is gone")

    with (service_around_model(test_settings, text_embedder, killing_model) as service,
          serving(test_settings, service) as live):
        with caplog.at_level(logging.CRITICAL, logger="batcher"):
            last = post_text(live, "the last request it takes")
        later = post_v1(live, {"model": MODEL, "input": "after it has gone"})
        health = requests.get(live.url + "/health", timeout=PATIENCE)
        ready = requests.get(live.url + "/health/ready", timeout=PATIENCE)
    # Answered with the reason, not left to wait for the deadline (that would say REQUEST_TIMEOUT_SECONDS).
    assert last.status_code == 503 and "ModelThreadKilled: injected" in last.json()["error"]
    assert later.status_code == 503 and later.json()["error"]["code"] == "model_unavailable"
    assert "Retry-After" in later.headers
    for answer in (health, ready):
        assert answer.status_code == 503
        assert answer.json()["status"] == "error" and "ModelThreadKilled: injected" in answer.json()["reason"]
    assert "model thread ended on ModelThreadKilled" in caplog.text


def send_headers_only(live, path: str, content_length: int, marker: str = "MAX_REQUEST_BYTES_IN_FLIGHT") -> str:
    """A POST that declares a body and sends none; the answer (read until `marker`), which only comes if the
    body is not awaited."""
    host, port = live.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=PATIENCE) as connection:
        connection.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nX-API-Key: {TEST_API_KEY}\r\n"
                           f"Content-Type: application/json\r\nContent-Length: {content_length}\r\n\r\n".encode())
        received = b""
        while marker.encode() not in received:
            chunk = connection.recv(4096)
            if not chunk:
                break
            received += chunk
    return received.decode(errors="replace")


def test_bodies_beyond_the_bytes_in_flight_get_429_before_they_are_read(test_settings, text_embedder):
    limit = 2 * SMALL_BODY_BYTES
    settings = replace(test_settings, max_request_size=limit, max_request_bytes_in_flight=limit)
    body = json.dumps({"text": "held while the model is busy"}).ljust(SMALL_BODY_BYTES + 1000)  # trailing space
    encoder = GatedEncoder(text_embedder)
    with (service_around_model(settings, text_embedder, encoder) as service, serving(settings, service) as live,
          ThreadPoolExecutor(2) as pool):
        try:
            held = pool.submit(requests.post, live.url + "/embeddings", data=body, headers=AUTH, timeout=120)
            assert encoder.entered.wait(PATIENCE)  # its 40,000 bytes are in flight
            answer = send_headers_only(live, "/v1/embeddings", content_length=len(body))
            assert answer.startswith("HTTP/1.1 429") and "Retry-After: 1\r\n" in answer, answer
            assert "MAX_REQUEST_BYTES_IN_FLIGHT" in answer
            # A small body is not turned away by a large one: it only queues behind the held model call.
            small = pool.submit(requests.post, live.url + "/embeddings", json={"text": "small"}, headers=AUTH,
                                timeout=120)
        finally:
            encoder.gate.set()
        assert held.result().status_code == 200 and small.result().status_code == 200
        again = requests.post(live.url + "/embeddings", data=body, headers=AUTH, timeout=120)
    assert again.status_code == 200  # the held request gave its bytes back when it ended
    assert_vector_of(text_embedder, "held while the model is busy", again.json()["embeddings"][0])


def test_a_full_queue_refuses_a_request_before_its_body_is_read(test_settings, text_embedder):
    settings = replace(test_settings, queue_max_tokens=50, max_tokens_per_request=50, max_tokens_per_text=50)
    encoder = GatedEncoder(text_embedder)
    with (service_around_model(settings, text_embedder, encoder) as service, serving(settings, service) as live,
          ThreadPoolExecutor(1) as pool):
        try:
            in_model = pool.submit(post_text, live, "first, and held in the model")
            assert encoder.entered.wait(PATIENCE)
            # Queued by the time submit returns (a request sent over HTTP gives no such moment); alone, it is
            # larger than the bound, so the queue is full.
            filler = service._batcher.submit(windows_of(text_embedder, DOCUMENT))
            answer = send_headers_only(live, "/embeddings", content_length=10_000, marker="tokens of work")
            assert answer.startswith("HTTP/1.1 429") and "Retry-After:" in answer, answer
        finally:
            encoder.gate.set()
        assert in_model.result().status_code == 200
        assert len(service._batcher.wait_for(filler)) == len(windows_of(text_embedder, DOCUMENT))


def test_a_client_that_gives_up_does_not_break_the_batch(test_settings, text_embedder, request_log):
    """A client times out and closes its connection while its texts are in the model: the server still finishes
    its request (answering no one), and the requests queued behind it get their own vectors."""
    batches: list[int] = []
    encoder = GatedEncoder(text_embedder)
    with (service_around_model(test_settings, text_embedder, encoder, recording_batches(batches)) as service,
          serving(test_settings, service) as live, ThreadPoolExecutor(9) as pool):
        try:
            impatient = pool.submit(post, live, "/embeddings/batch", {"texts": [DOCUMENT]},
                                    headers={"X-Request-ID": "gave-up"}, timeout=1)
            assert encoder.entered.wait(PATIENCE)  # its texts are in the model, which is held
            # requests closes its connection when it gives up: the disconnect happens while the model works.
            with pytest.raises(requests.exceptions.ReadTimeout):
                impatient.result(PATIENCE)
            answers = [pool.submit(post_text, live, text) for text in QUERIES[:8]]
        finally:
            encoder.gate.set()
        answers = [answer.result(PATIENCE) for answer in answers]
        abandoned = request_log.wait_for(lambda line: line["request_id"] == "gave-up")
    # The server answered the request its client had left, after the client had gone.
    assert (abandoned["route"], abandoned["status"]) == ("/embeddings/batch", 200)
    assert encoder.calls[0] == windows_of(text_embedder, DOCUMENT)
    assert sum(batches) == 1 + len(answers)  # every request, the abandoned one too, was served by the model
    for text, response in zip(QUERIES, answers):
        assert response.status_code == 200
        assert_vector_of(text_embedder, text, response.json()["embeddings"][0])
