"""Shared test fixtures: the real bundled model and real HTTP servers on loopback.

The bundled model (and the tiny CLIP of tiny_clip.py) are baked and exported into a
temporary MODELS_DIR once per test session by download_models.py's own functions, as
`make run` and the image build do; the services under test then serve those exports on
the default engine. `torch_service` serves the same model on the torch fallback engine,
and `reference_model` is the sentence-transformers model itself, for reference vectors.
"""
from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import psutil
import pytest
import requests
from werkzeug.serving import make_server

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from benchmark_embeddings import free_port  # noqa: E402
from config import Settings  # noqa: E402
from main import ServiceFactory, create_app  # noqa: E402
from model_loading import LoadedModels, load_models  # noqa: E402
from self_check import MAX_NORM_RATIO_ERROR, TEXT_MIN_COSINE, cosine_rows  # noqa: E402
from service import EmbeddingService, ServiceHooks  # noqa: E402

TEST_API_KEY = "test-key"
MODEL_LOAD_TIMEOUT = 120
# Seconds a test waits for a server's answer on a raw connection: only turns a hang into a failure.
ANSWER_TIMEOUT = 120
# The same engine on the same input, batched or not: only the order of float sums may differ.
SAME_ENGINE_MIN_COSINE = 0.99999


def expected_precision() -> str:
    """The precision the default engine serves in on this CPU: bf16 where it has bf16 instructions."""
    flags = set(open("/proc/cpuinfo").read().split())
    return "bf16" if flags & {"avx512_bf16", "amx_bf16"} else "f32"


def assert_same_vectors(actual, expected, min_cosine: float = TEXT_MIN_COSINE) -> None:
    """Vectors that point the same way row by row: an engine's against torch's (the self-check's bound)."""
    actual = np.atleast_2d(np.asarray(actual, dtype=np.float64))
    expected = np.atleast_2d(np.asarray(expected, dtype=np.float64))
    assert actual.shape == expected.shape
    cosines = cosine_rows(actual, expected)
    assert cosines.min() >= min_cosine, f"cosines {cosines} below {min_cosine}"
    # Cosine cannot see a wrong length (a vector not normalised, or scaled): lengths must agree too.
    np.testing.assert_allclose(np.linalg.norm(actual, axis=1), np.linalg.norm(expected, axis=1),
                               rtol=MAX_NORM_RATIO_ERROR)


@dataclass
class LiveServer:
    """A real threaded HTTP server on 127.0.0.1 serving one app."""
    url: str
    app: object
    _server: object
    _thread: threading.Thread

    @property
    def service(self) -> EmbeddingService:
        return self.app.extensions["embedding_service"]

    def stop(self) -> None:
        self._server.shutdown()
        self._thread.join(10)


def start_live_server(app, wait_ready: bool = True) -> LiveServer:
    """The app served on a free loopback port; once its model is ready, unless told not to wait."""
    if wait_ready:
        ready, body = wait_for_loading(app.extensions["embedding_service"])
        assert ready, body
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return LiveServer(f"http://127.0.0.1:{server.server_port}", app, server, thread)


def wait_for_loading(service: EmbeddingService, timeout: float = MODEL_LOAD_TIMEOUT) -> tuple[bool, dict]:
    """The service's readiness once its loading has ended, ready or failed (or the timeout has passed)."""
    deadline = time.monotonic() + timeout
    while True:
        ready, body = service.readiness()
        if ready or body["status"] == "error" or time.monotonic() > deadline:
            return ready, body
        time.sleep(0.01)


def sharing(models: LoadedModels) -> ServiceFactory:
    """Services that serve models already loaded, with the app's hooks: no second load."""
    return lambda settings, hooks: EmbeddingService(settings, hooks, load=lambda _: models)


def existing(service: EmbeddingService) -> ServiceFactory:
    """The app serves this very service (which then does not call the app's hooks)."""
    return lambda settings, hooks: service


class NeverLoads(EmbeddingService):
    """A service whose model is still loading, for ever."""

    def start_loading(self) -> None:
        pass


def start_request(url: str, path: str, body: bytes, headers: dict[str, str]) -> socket.socket:
    """Send a POST's head with `Expect: 100-continue` and return once the server answers 100 Continue.

    gunicorn sends it from the worker thread that has taken the request, so the request is then in
    flight in that worker, not waiting to be accepted: the server says so, no time is guessed. The
    body (`body` gives its length) is the caller's to send, on the connection returned.
    """
    host, port = url.removeprefix("http://").split(":")
    connection = socket.create_connection((host, int(port)), timeout=ANSWER_TIMEOUT)
    head = [f"POST {path} HTTP/1.1", f"Host: {host}", f"Content-Length: {len(body)}", "Expect: 100-continue",
            *(f"{name}: {value}" for name, value in headers.items())]
    connection.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
    interim = b""
    while not interim.endswith(b"\r\n\r\n"):  # byte by byte: nothing after the interim answer is read
        byte = connection.recv(1)
        assert byte, f"the server closed the connection instead of answering 100 Continue: {interim!r}"
        interim += byte
    assert interim.startswith(b"HTTP/1.1 100 "), interim
    return connection


def read_answer(connection: socket.socket) -> tuple[int, bytes]:
    """The status and body of the answer on a raw connection; returns when the server has answered."""
    answer = http.client.HTTPResponse(connection)
    answer.begin()
    return answer.status, answer.read()


def bake_and_export(settings: Settings) -> None:
    """What `make run` and the image build do for the configured model: bake it, then export it."""
    import download_models
    download_models.prepare_models(settings, allow_download=False)


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    """A MODELS_DIR holding the bundled model, baked and exported."""
    folder = tmp_path_factory.mktemp("models")
    bake_and_export(Settings(models_dir=str(folder)))
    return folder


@pytest.fixture(scope="session")
def test_settings(models_dir) -> Settings:
    return Settings(api_keys=(TEST_API_KEY,), models_dir=str(models_dir))


@pytest.fixture(scope="session")
def reference_model():
    """The bundled sentence-transformers model on torch: what every engine's vectors are checked against."""
    from model_locator import locate_model
    from sentence_transformers import SentenceTransformer
    location = locate_model("all-MiniLM-L6-v2", "/nonexistent", allow_download=False)
    return SentenceTransformer(location.path, device="cpu")


@contextmanager
def running_service(settings: Settings, load: Callable[[Settings], LoadedModels] = load_models,
                    hooks: ServiceHooks = ServiceHooks()) -> Iterator[EmbeddingService]:
    """A service with its model loaded; stopped afterwards."""
    service = EmbeddingService(settings, hooks, load)
    service.start_loading()
    ready, body = wait_for_loading(service)
    assert ready, body
    try:
        yield service
    finally:
        # Drain the model thread: torch aborts the interpreter if it exits mid forward pass.
        service.stop()


class EmbedderAround:
    """A loaded text embedder whose model calls (encode_windows) go through `encode_windows` instead.

    Everything else, the warm-up at loading included, is the real embedder's: a way to inject a
    fault (a model call that fails, hangs or is slow) around the real model without loading it again.
    """

    def __init__(self, real, encode_windows: Callable) -> None:
        self._real = real
        self.encode_windows = encode_windows

    def __getattr__(self, name: str):
        return getattr(self._real, name)


@contextmanager
def service_around_model(settings: Settings, text_embedder, encode_windows: Callable,
                         hooks: ServiceHooks = ServiceHooks()) -> Iterator[EmbeddingService]:
    """A running service on the already loaded model, its model calls going through encode_windows."""
    def load(_: Settings) -> LoadedModels:
        engine = text_embedder.encoder
        return LoadedModels(EmbedderAround(text_embedder, encode_windows), None, engine.name, engine.precision)

    with running_service(settings, load, hooks) as service:
        yield service


@pytest.fixture(scope="session")
def loaded_models(test_settings) -> LoadedModels:
    """The bundled model, exported, self-checked and compiled once per test session."""
    return load_models(test_settings)


@pytest.fixture(scope="session")
def loaded_service(test_settings, loaded_models) -> EmbeddingService:
    with running_service(test_settings, lambda _: loaded_models) as service:
        yield service


@pytest.fixture(scope="session")
def text_embedder(loaded_models):
    return loaded_models.text


@pytest.fixture(scope="session")
def torch_service(test_settings) -> EmbeddingService:
    """The bundled model on the torch fallback engine (ENGINE=torch)."""
    # The torch engine's own defaults on 2 cores: two workers of one thread each.
    with running_service(replace(test_settings, engine="torch", workers=2, engine_threads=1)) as service:
        yield service


@pytest.fixture(scope="session")
def server(test_settings, loaded_models):
    live = start_live_server(create_app(test_settings, sharing(loaded_models)))
    yield live
    live.stop()
    live.service.stop()


@pytest.fixture(scope="session")
def tiny_clip_settings(tmp_path_factory, models_dir) -> Settings:
    """Settings that serve the tiny random CLIP (tiny_clip.py), built, baked and exported once per test session."""
    from tiny_clip import write_tiny_clip
    folder = write_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))
    settings = Settings(api_keys=(TEST_API_KEY,), embedding_model=str(folder), models_dir=str(models_dir))
    bake_and_export(settings)
    return settings


@pytest.fixture(scope="session")
def tiny_clip_model(tiny_clip_settings):
    """The tiny CLIP as a sentence-transformers model on torch, for reference vectors."""
    from sentence_transformers import SentenceTransformer
    return SentenceTransformer(tiny_clip_settings.embedding_model, device="cpu")


@pytest.fixture(scope="session")
def tiny_clip_models(tiny_clip_settings) -> LoadedModels:
    return load_models(tiny_clip_settings)


@pytest.fixture(scope="session")
def tiny_clip_service(tiny_clip_settings, tiny_clip_models) -> EmbeddingService:
    with running_service(tiny_clip_settings, lambda _: tiny_clip_models) as service:
        yield service


@pytest.fixture(scope="session")
def tiny_clip_server(tiny_clip_settings, tiny_clip_models):
    """A real server on loopback with text and image routes live (the tiny CLIP)."""
    live = start_live_server(create_app(tiny_clip_settings, sharing(tiny_clip_models)))
    yield live
    live.stop()
    live.service.stop()


@contextmanager
def servers_on(settings: Settings, models: LoadedModels) -> Iterator[Callable[..., LiveServer]]:
    """A function that starts a server on loaded models with some settings changed; all are stopped after."""
    started = []

    def start(**changes) -> LiveServer:
        live = start_live_server(create_app(replace(settings, **changes), sharing(models)))
        started.append(live)
        return live

    try:
        yield start
    finally:
        for live in started:
            live.stop()
            live.service.stop()


@pytest.fixture
def server_with(test_settings, loaded_models):
    """Start a server on the loaded model with some settings changed."""
    with servers_on(test_settings, loaded_models) as start:
        yield start


@pytest.fixture
def clip_server_with(tiny_clip_settings, tiny_clip_models):
    """Start a server on the tiny CLIP with some settings changed."""
    with servers_on(tiny_clip_settings, tiny_clip_models) as start:
        yield start


# --- gunicorn, as the service runs in production ------------------------------------

HERE = Path(__file__).resolve().parent
START_TIMEOUT = 90


@dataclass
class GunicornServer:
    url: str
    process: subprocess.Popen
    log_path: Path

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def worker_pids(self) -> list[int]:
        return [child.pid for child in psutil.Process(self.process.pid).children()]

    def wait_until_ready(self, timeout: float = START_TIMEOUT) -> None:
        self.wait_for_readiness(lambda answer: answer.status_code == 200, "ready", timeout)

    def wait_for_readiness(self, wanted: Callable[[requests.Response], bool], what: str,
                           timeout: float = START_TIMEOUT) -> None:
        """Poll /health/ready until one answer is the one wanted, for at most `timeout` seconds.

        A server that never gives it is stopped, so that a failed test leaves no gunicorn behind.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.output()
            try:
                if wanted(requests.get(self.url + "/health/ready", timeout=2)):
                    return
            except (requests.ConnectionError, requests.Timeout):
                pass  # not listening yet, or too busy loading to answer in time
            time.sleep(0.1)
        self.stop()
        raise AssertionError(f"not {what} within {timeout} s:\n{self.output()}")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        return self.process.returncode


def start_gunicorn(log_dir: Path, models_dir: Path, *arguments: str, **env_changes: str) -> GunicornServer:
    """gunicorn with the project's gunicorn.conf.py on a free loopback port, serving models_dir's exports.

    Output goes to a file. `arguments` are more gunicorn command-line flags, such as ("-w", "1").
    """
    port = free_port()
    env = {**os.environ, "PORT": str(port), "MODELS_DIR": str(models_dir), **env_changes}
    log_path = log_dir / f"gunicorn-{port}.log"
    command = [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "--bind", f"127.0.0.1:{port}",
               *arguments, "main:create_app()"]
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=HERE, env=env, stdout=log, stderr=subprocess.STDOUT)
    return GunicornServer(f"http://127.0.0.1:{port}", process, log_path)
