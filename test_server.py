"""The service as it is run in production: gunicorn with gunicorn.conf.py, on loopback."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests

HERE = Path(__file__).resolve().parent
START_TIMEOUT = 90


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def gunicorn_command() -> list[str]:
    return [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "--bind", "127.0.0.1:{port}",
            "main:create_app()"]


def start_gunicorn(port: int, **env_changes: str) -> subprocess.Popen:
    env = {**os.environ, "PORT": str(port), **env_changes}
    command = [part.format(port=port) for part in gunicorn_command()]
    return subprocess.Popen(command, cwd=HERE, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_until_ready(url: str, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stdout.read()
        try:
            if requests.get(url + "/health/ready", timeout=2).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"not ready within {START_TIMEOUT} s")


@pytest.fixture(scope="module")
def gunicorn_server():
    port = free_port()
    process = start_gunicorn(port, VECTOR_EMBEDDER_API_KEY="gunicorn-key")
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(url, process)
        yield url
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()


def test_gunicorn_serves_real_embeddings(gunicorn_server, text_embedder):
    ready = requests.get(gunicorn_server + "/health/ready", timeout=5).json()
    assert ready == {"status": "ready", "model": "all-MiniLM-L6-v2", "supports_images": False}
    response = requests.post(gunicorn_server + "/embeddings/batch", json={"texts": ["one", "two"]},
                             headers={"X-API-Key": "gunicorn-key"}, timeout=30)
    assert response.status_code == 200
    vectors = [wrapped[0] for wrapped in response.json()["embeddings"]]
    np.testing.assert_allclose(vectors, text_embedder.model.encode(["one", "two"]), atol=1e-5)


def test_gunicorn_rejects_the_default_key_when_another_is_set(gunicorn_server):
    response = requests.post(gunicorn_server + "/embeddings", json={"text": "x"},
                             headers={"X-API-Key": "abc123"}, timeout=10)
    assert response.status_code == 401


@pytest.mark.parametrize("name, value", [("MAX_BATCH_SIZE", "0"), ("MAX_TEXTS_PER_BATCH", "lots")])
def test_a_bad_setting_stops_start_up_naming_the_variable(name, value):
    process = start_gunicorn(free_port(), **{name: value})
    output, _ = process.communicate(timeout=60)
    assert process.returncode != 0
    assert name in output
