"""What the tests share, written once: the key and the calls they make, images made in memory, vectors compared,
servers on loopback (threaded werkzeug and gunicorn), services on a model already loaded, a model call held at
a gate, a fresh Python process to measure in, and a stand-in for the embedding service for tests of the HTTP
layer alone.

Test modules import from here, never from conftest.py (which holds the fixtures: the models baked, exported
and loaded once per session, and the servers on them) and never from one another.
"""
from __future__ import annotations

import base64
import hashlib
import http.client
import io
import json
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import openai
import psutil
import requests
from PIL import Image
from werkzeug.serving import make_server

from config import Settings
from embeddings import Prompts
from errors import ApiError
from main import ServiceFactory, create_app
from model_loading import LoadedModels, load_models
from self_check import MAX_NORM_RATIO_ERROR, TEXT_MIN_COSINE, cosine_rows
from service import EmbeddingResult, EmbeddingService, ServiceHooks

HERE = Path(__file__).resolve().parent
TEST_API_KEY = "test-key"
AUTH = {"X-API-Key": TEST_API_KEY}
# The bundled model, by the name the service answers with.
MODEL = "all-MiniLM-L6-v2"
# Seconds to wait for something that comes unless the code is broken (an answer, an event, a thread):
# only turns a hang into a failure, never a bound the test asserts.
PATIENCE = 120
MODEL_LOAD_TIMEOUT = 120
# The same engine on the same input, batched or not: only the order of float sums may differ.
SAME_ENGINE_MIN_COSINE = 0.99999
# Environment for a fresh Python process of the tests: never the model hub, no tokenizer threads.
OFFLINE = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


# --- vectors --------------------------------------------------------------------------

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


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


# --- images -----------------------------------------------------------------------------

def encoded(image: Image.Image, image_format: str = "PNG", **options) -> bytes:
    """The image saved as a file of that format, in memory."""
    buffer = io.BytesIO()
    image.save(buffer, image_format, **options)
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height but whose data holds almost nothing: a decompression bomb."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + chunk(b"IEND", b""))


# --- calls and answers ---------------------------------------------------------------------

def post(live, path: str, json: Any = None, *, headers: dict[str, str] | None = None, timeout: float = PATIENCE,
         **kwargs) -> requests.Response:
    """POST to a server with the test key (and any other headers); `kwargs` as requests takes them."""
    return requests.post(live.url + path, json=json, headers={**AUTH, **(headers or {})}, timeout=timeout, **kwargs)


def post_v1(live, body: Any = None, *, data: bytes | None = None,
            headers: dict[str, str] = AUTH) -> requests.Response:
    """POST /v1/embeddings with exactly these headers (the test key unless told otherwise)."""
    return requests.post(live.url + "/v1/embeddings", json=body, data=data, headers=headers, timeout=PATIENCE)


def openai_client(live) -> openai.OpenAI:
    """The official OpenAI client pointed at a server, with the test key and no retries."""
    return openai.OpenAI(base_url=live.url + "/v1", api_key=TEST_API_KEY, max_retries=0)


def json_of(response) -> Any:
    """The JSON body of an answer from requests or from Flask's test client."""
    return response.get_json() if hasattr(response, "get_json") else response.json()


def error_of(response, status: int) -> str:
    """The message of an error in the service's own envelope, {"error": "..."}, once its status is checked."""
    assert response.status_code == status, (response.status_code, response.text)
    return json_of(response)["error"]


def assert_envelope(response, status: int, param: str | None = None, code: str | None = None,
                    says: str = "") -> dict:
    """An error in OpenAI's envelope, with its status, type, param and code, whose message holds `says`."""
    assert response.status_code == status, response.text
    error = json_of(response)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == ("server_error" if status in (429, 500, 503) else "invalid_request_error")
    assert error["param"] == param
    assert error["code"] == code
    assert says.lower() in error["message"].lower()
    return error


class LogWatch(logging.Handler):
    """What a logger emits while this watches it, each record as `read` makes it, and a way to wait for one."""

    def __init__(self, read: Callable[[logging.LogRecord], Any] = lambda record: record) -> None:
        super().__init__()
        self.read = read
        self.records: list = []
        self._added = threading.Condition()

    def emit(self, record: logging.LogRecord) -> None:
        with self._added:
            self.records.append(self.read(record))
            self._added.notify_all()

    def wait_for(self, wanted: Callable[[Any], bool], timeout: float = PATIENCE) -> Any:
        """The first record that is wanted, once it has been logged."""
        def found() -> Any:
            return next((record for record in self.records if wanted(record)), None)

        with self._added:
            assert self._added.wait_for(found, timeout), f"not in the log: {self.records}"
            return found()


@contextmanager
def watching_log(name: str, read: Callable[[logging.LogRecord], Any] = lambda record: record,
                 level: int = logging.INFO) -> Iterator[LogWatch]:
    """A LogWatch on the logger `name` while the block runs, the logger passing on records of `level` and above
    (an app sets the request log's level only when it is the first to log there)."""
    watch, logger = LogWatch(read), logging.getLogger(name)
    level_before = logger.level
    logger.setLevel(level)
    logger.addHandler(watch)
    try:
        yield watch
    finally:
        logger.removeHandler(watch)
        logger.setLevel(level_before)


# --- servers on loopback --------------------------------------------------------------------

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


@contextmanager
def serving(settings: Settings, service: EmbeddingService) -> Iterator[LiveServer]:
    """A live server of an app on this very service, for as long as the block runs (the service is the caller's)."""
    live = start_live_server(create_app(settings, existing(service)))
    try:
        yield live
    finally:
        live.stop()


def wait_for_loading(service: EmbeddingService, timeout: float = MODEL_LOAD_TIMEOUT) -> tuple[bool, dict]:
    """The service's readiness once its loading has ended, ready or failed (or the timeout has passed)."""
    deadline = time.monotonic() + timeout
    while True:
        ready, body = service.readiness()
        if ready or body["status"] == "error" or time.monotonic() > deadline:
            return ready, body
        time.sleep(0.01)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_request(url: str, path: str, body: bytes, headers: dict[str, str]) -> socket.socket:
    """Send a POST's head with `Expect: 100-continue` and return once the server answers 100 Continue.

    gunicorn sends it from the worker thread that has taken the request, so the request is then in
    flight in that worker, not waiting to be accepted: the server says so, no time is guessed. The
    body (`body` gives its length) is the caller's to send, on the connection returned.
    """
    host, port = url.removeprefix("http://").split(":")
    connection = socket.create_connection((host, int(port)), timeout=PATIENCE)
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


# --- services on a model already loaded ----------------------------------------------------------

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


def bake_and_export(settings: Settings) -> None:
    """What `make run` and the image build do for the configured model: bake it, then export it."""
    import download_models
    download_models.prepare_models(settings, allow_download=False)


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


# --- a model call held at a gate -------------------------------------------------------------

class GatedEncoder:
    """Encodes for real, but only once let through: until then a model call that never returns.

    `entered` is set when a call arrives; `calls` records the windows of every call.
    """

    def __init__(self, text_embedder):
        self.text_embedder = text_embedder
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.calls: list[list] = []

    def __call__(self, windows):
        self.calls.append(list(windows))
        self.entered.set()
        self.gate.wait()
        return self.text_embedder.encode_windows(windows)


def windows_of(text_embedder, text: str) -> list[list[int]]:
    return text_embedder.tokenize([text])[0].windows


def tokens_of(text_embedder, text: str) -> int:
    """The tokens the model's queue counts for a text: its windows with their special tokens."""
    return sum(text_embedder.tokens_per_window(window) for window in windows_of(text_embedder, text))


# --- gunicorn, as the service runs in production ----------------------------------------------

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


def start_gunicorn(log_dir: Path, models_dir: Path | None, *arguments: str, cwd: Path = HERE,
                   **env_changes: str) -> GunicornServer:
    """gunicorn with the project's gunicorn.conf.py on a free loopback port, serving models_dir's exports (with
    None, MODELS_DIR is left unset, as by a user who starts gunicorn by hand in `cwd`).

    Output goes to a file. `arguments` are more gunicorn command-line flags, such as ("-w", "1").
    """
    port = free_port()
    env = {**os.environ, "PORT": str(port), "PYTHONPATH": str(HERE), **env_changes}
    env.pop("MODELS_DIR", None)
    if models_dir is not None:
        env["MODELS_DIR"] = str(models_dir)
    log_path = log_dir / f"gunicorn-{port}.log"
    command = [sys.executable, "-m", "gunicorn", "-c", str(HERE / "gunicorn.conf.py"), "--bind",
               f"127.0.0.1:{port}", *arguments, "main:create_app()"]
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
    return GunicornServer(f"http://127.0.0.1:{port}", process, log_path)


# --- a fresh Python process ------------------------------------------------------------------

def run_python(script: str, *arguments: str, timeout: float = 300) -> Any:
    """Run a script in a fresh interpreter in the project's folder; the JSON its last line of output holds.

    A fresh process measures what only its own work costs (its peak memory), and imports only what it imports.
    """
    run = subprocess.run([sys.executable, "-c", script, *arguments], cwd=HERE, env={**os.environ, **OFFLINE},
                         capture_output=True, text=True, timeout=timeout)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout.strip().splitlines()[-1])


# --- the app without a model ------------------------------------------------------------------

class ReachedTheModel(AssertionError):
    """A request reached the model that the web layer should have refused before it."""


class StubService:
    """EmbeddingService's public interface without a model, for tests of the web layer alone: how requests
    are read, validated and refused, and how errors are worded and wrapped in each API's envelope.

    Ready at once, as the bundled model is (384 components, a 30522-token vocabulary, 256-token windows); it
    embeds images too when `images` is true, and knows one prompt, 'query'. Its vectors are deterministic but
    mean nothing: it holds no token limit, so limits counted in tokens are tested on the real model. Every
    call that would reach the model is recorded in `model_calls`; with `refuse_model_calls` such a call also
    fails loudly, for requests that must be refused before it. `fail_with` is raised by every model call, to
    inject a failure.
    """

    DIMENSION = 384
    VOCABULARY_SIZE = 30522
    MAX_SEQUENCE_LENGTH = 256
    PROMPTS = Prompts({"query": "query: "})

    def __init__(self, settings: Settings, hooks: ServiceHooks = ServiceHooks(), *, images: bool = False,
                 refuse_model_calls: bool = False, fail_with: Exception | None = None) -> None:
        self.settings = settings
        self.images = images
        self.refuse_model_calls = refuse_model_calls
        self.fail_with = fail_with
        self.model_calls: list[tuple[str, list]] = []
        self.loaded_at = int(time.time())

    def start_loading(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def ensure_room(self) -> None:
        pass

    def liveness(self) -> tuple[bool, dict]:
        return True, {"status": "ok"}

    def readiness(self) -> tuple[bool, dict]:
        return True, {"status": "ready", "model": self.settings.embedding_model, "supports_images": self.images,
                      "engine": "stub", "precision": self.precision()}

    def supports_images(self) -> bool:
        return self.images

    def vocabulary_size(self) -> int:
        return self.VOCABULARY_SIZE

    def dimension(self) -> int:
        return self.DIMENSION

    def max_sequence_length(self) -> int:
        return self.MAX_SEQUENCE_LENGTH

    def prompts(self) -> Prompts:
        return self.PROMPTS

    def precision(self) -> str:
        return "f32"

    def normalizes(self) -> bool:
        return True

    def pooling(self) -> str:
        return "mean"

    def embed_texts(self, texts: Sequence[str], prompt_name: str | None = None,
                    truncation: str | None = None) -> EmbeddingResult:
        prompt = self.PROMPTS.text_of(prompt_name)  # an unknown prompt is refused as the real service does
        self._model_call("embed_texts", texts)
        return EmbeddingResult([self._vector((prompt + text).encode()) for text in texts],
                               sum(len(text.split()) + 2 for text in texts))

    def embed_token_ids(self, token_id_lists: Sequence[Sequence[int]],
                        truncation: str | None = None) -> EmbeddingResult:
        self._model_call("embed_token_ids", token_id_lists)
        return EmbeddingResult([self._vector(repr(list(ids)).encode()) for ids in token_id_lists],
                               sum(len(ids) + 2 for ids in token_id_lists))

    def embed_images(self, encoded_images: Sequence[bytes]) -> list[np.ndarray]:
        if not self.images:  # as the real service: the routes ask supports_images() first
            raise ApiError(400, "The model embeds text only, so it cannot embed images")
        self._model_call("embed_images", encoded_images)
        return [self._vector(data) for data in encoded_images]

    def _model_call(self, name: str, items: Sequence) -> None:
        self.model_calls.append((name, list(items)))
        if self.fail_with is not None:
            raise self.fail_with
        if self.refuse_model_calls:
            raise ReachedTheModel(f"{name} was called with {len(items)} items: the request should have been "
                                  f"refused before it reached the model")

    def _vector(self, data: bytes) -> np.ndarray:
        seed = int.from_bytes(hashlib.sha256(data).digest()[:8], "little")
        vector = np.random.default_rng(seed).standard_normal(self.DIMENSION).astype(np.float32)
        return vector / np.linalg.norm(vector)


# Settings for an app without a model: nothing is loaded, so no models folder is needed.
STUB_SETTINGS = Settings(api_keys=(TEST_API_KEY,))


@dataclass
class AppWithoutModel:
    """An app on a StubService, called through Flask's test client: no model, no socket."""
    client: Any
    service: StubService

    @property
    def app(self):
        return self.client.application

    def post(self, path: str, json: Any = None, *, headers: dict[str, str] = AUTH, **kwargs):
        """POST with exactly these headers (the test key unless told otherwise); `kwargs` as the test client
        takes them (data, content_type). A model call that should not have been made fails here, loudly."""
        response = self.client.post(path, json=json, headers=headers, **kwargs)
        if self.service.refuse_model_calls:
            assert not self.service.model_calls, f"POST {path} reached the model: {self.service.model_calls}"
        return response

    def get(self, path: str, *, headers: dict[str, str] = AUTH):
        return self.client.get(path, headers=headers)


def app_without_model(*, images: bool = False, refuse_model_calls: bool | None = None,
                      fail_with: Exception | None = None, **setting_changes) -> AppWithoutModel:
    """The real app, its routes, validators and error handlers, on a StubService; settings changed as given.

    No request may reach the model (see StubService) unless told otherwise, or unless `fail_with` is to be
    raised there."""
    if refuse_model_calls is None:
        refuse_model_calls = fail_with is None
    settings = replace(STUB_SETTINGS, **setting_changes)
    service = StubService(settings, images=images, refuse_model_calls=refuse_model_calls, fail_with=fail_with)
    app = create_app(settings, lambda _settings, _hooks: service)
    return AppWithoutModel(app.test_client(), service)
