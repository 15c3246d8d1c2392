"""Shared test fixtures: the real bundled model and real HTTP servers on loopback."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import requests
from werkzeug.serving import make_server

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from benchmark_embeddings import free_port  # noqa: E402
from config import Settings  # noqa: E402
from main import create_app  # noqa: E402
from service import EmbeddingService  # noqa: E402

TEST_API_KEY = "test-key"
MODEL_LOAD_TIMEOUT = 120


@dataclass
class LiveServer:
    """A real threaded HTTP server on 127.0.0.1 serving one app."""
    url: str
    _server: object
    _thread: threading.Thread

    def stop(self) -> None:
        self._server.shutdown()
        self._thread.join(10)


def start_live_server(app) -> LiveServer:
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return LiveServer(f"http://127.0.0.1:{server.server_port}", server, thread)


@pytest.fixture(scope="session")
def test_settings() -> Settings:
    return Settings(api_keys=(TEST_API_KEY,))


@contextmanager
def running_service(settings: Settings, load_embedder: Callable[[Settings], Any] | None = None
                    ) -> Iterator[EmbeddingService]:
    """A service with its model loaded; stopped afterwards."""
    service = EmbeddingService(settings, load_embedder=load_embedder)
    service.start_loading()
    assert service.wait_until_loaded(MODEL_LOAD_TIMEOUT), service.readiness()
    try:
        yield service
    finally:
        # Drain the model thread: torch aborts the interpreter if it exits mid forward pass.
        service.stop()


class EmbedderAround:
    """A loaded text embedder whose model calls (encode_chunks) go through `encode_chunks` instead.

    Everything else, the warm-up at loading included, is the real embedder's: a way to inject a
    fault (a model call that fails, hangs or is slow) around the real model without loading it again.
    """

    def __init__(self, real, encode_chunks: Callable) -> None:
        self._real = real
        self.encode_chunks = encode_chunks

    def __getattr__(self, name: str):
        return getattr(self._real, name)


@contextmanager
def service_around_model(settings: Settings, text_embedder, encode_chunks: Callable) -> Iterator[EmbeddingService]:
    """A running service on the already loaded model, its model calls going through encode_chunks."""
    with running_service(settings, lambda _: EmbedderAround(text_embedder, encode_chunks)) as service:
        yield service


@pytest.fixture(scope="session")
def loaded_service(test_settings) -> EmbeddingService:
    with running_service(test_settings) as service:
        yield service


@pytest.fixture(scope="session")
def text_embedder(loaded_service):
    return loaded_service._ready_text_embedder()


@pytest.fixture(scope="session")
def server(test_settings, loaded_service):
    live = start_live_server(create_app(test_settings, loaded_service))
    yield live
    live.stop()


@pytest.fixture(scope="session")
def tiny_clip_settings(tmp_path_factory) -> Settings:
    """Settings that serve the tiny random CLIP (tiny_clip.py), built once per test session."""
    from tiny_clip import write_tiny_clip
    folder = write_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))
    return Settings(api_keys=(TEST_API_KEY,), embedding_model=str(folder))


@pytest.fixture(scope="session")
def tiny_clip_service(tiny_clip_settings) -> EmbeddingService:
    with running_service(tiny_clip_settings) as service:
        yield service


@pytest.fixture(scope="session")
def tiny_clip_server(tiny_clip_settings, tiny_clip_service):
    """A real server on loopback with text and image routes live (the tiny CLIP)."""
    live = start_live_server(create_app(tiny_clip_settings, tiny_clip_service))
    live.model = tiny_clip_service._ready_text_embedder().model
    yield live
    live.stop()


@pytest.fixture
def server_with(test_settings, loaded_service):
    """Start a server on the loaded model with some settings changed."""
    started = []

    def start(**changes) -> LiveServer:
        live = start_live_server(create_app(replace(test_settings, **changes), loaded_service))
        started.append(live)
        return live

    yield start
    for live in started:
        live.stop()


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

    def wait_until_ready(self, timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.output()
            try:
                if requests.get(self.url + "/health/ready", timeout=2).status_code == 200:
                    return
            except (requests.ConnectionError, requests.Timeout):
                pass  # not listening yet, or too busy loading to answer in time
            time.sleep(0.1)
        raise AssertionError(f"not ready within {timeout} s:\n{self.output()}")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        return self.process.returncode


def start_gunicorn(log_dir: Path, **env_changes: str) -> GunicornServer:
    """gunicorn with the project's gunicorn.conf.py on a free loopback port; output goes to a file."""
    port = free_port()
    env = {**os.environ, "PORT": str(port), **env_changes}
    log_path = log_dir / f"gunicorn-{port}.log"
    command = [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "--bind", f"127.0.0.1:{port}",
               "main:create_app()"]
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=HERE, env=env, stdout=log, stderr=subprocess.STDOUT)
    return GunicornServer(f"http://127.0.0.1:{port}", process, log_path)
