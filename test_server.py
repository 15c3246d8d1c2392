"""The service as it is run in production: gunicorn with gunicorn.conf.py, on loopback."""
from __future__ import annotations

import os
import signal
from pathlib import Path

import psutil
import pytest
import requests

from config import available_cpus
from testkit import assert_same_vectors, start_gunicorn


@pytest.fixture(scope="module")
def gunicorn_server(tmp_path_factory, models_dir):
    server = start_gunicorn(tmp_path_factory.mktemp("gunicorn"), models_dir, VECTOR_EMBEDDER_API_KEY="gunicorn-key")
    try:
        server.wait_until_ready()
        yield server
    finally:
        server.stop()


def embed_one_and_two(server, key: str) -> list[list[float]]:
    response = requests.post(server.url + "/embeddings/batch", json={"texts": ["one", "two"]},
                             headers={"X-API-Key": key}, timeout=30)
    assert response.status_code == 200
    return [wrapped[0] for wrapped in response.json()["embeddings"]]


def libraries_mapped(pid: int) -> set[str]:
    """The shared libraries a process has loaded, by file name (read from /proc/<pid>/maps)."""
    lines = Path(f"/proc/{pid}/maps").read_text().splitlines()
    return {Path(line.split()[-1]).name for line in lines if line.split()[-1].startswith("/")}


def test_gunicorn_serves_real_embeddings_on_one_worker_without_torch(gunicorn_server, reference_model):
    ready = requests.get(gunicorn_server.url + "/health/ready", timeout=5).json()
    assert (ready["status"], ready["model"], ready["engine"]) == ("ready", "all-MiniLM-L6-v2", "openvino")
    assert_same_vectors(embed_one_and_two(gunicorn_server, "gunicorn-key"), reference_model.encode(["one", "two"]))
    workers = psutil.Process(gunicorn_server.process.pid).children()
    assert len(workers) == 1  # the default: one process whose engine uses every core
    for process in [psutil.Process(gunicorn_server.process.pid), *workers]:
        libraries = libraries_mapped(process.pid)
        assert any("openvino" in name for name in libraries) or process.pid == gunicorn_server.process.pid
        assert not [name for name in libraries if "torch" in name], process.pid


def test_gunicorn_serves_the_torch_engine_when_asked(tmp_path, models_dir, reference_model):
    server = start_gunicorn(tmp_path, models_dir, VECTOR_EMBEDDER_API_KEY="k", ENGINE="torch", WORKERS="1")
    try:
        server.wait_until_ready()
        ready = requests.get(server.url + "/health/ready", timeout=5).json()
        assert (ready["engine"], ready["precision"]) == ("torch", "f32")
        assert_same_vectors(embed_one_and_two(server, "k"), reference_model.encode(["one", "two"]), 0.99999)
    finally:
        server.stop()


@pytest.mark.skipif(Path("/models").is_dir(), reason="this machine has the image's /models folder")
def test_gunicorn_started_by_hand_after_make_run_finds_its_models(tmp_path, models_dir, reference_model):
    # `make run` bakes and exports into ./models; a user then starts gunicorn in the checkout without MODELS_DIR.
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    (checkout / "models").symlink_to(models_dir)
    server = start_gunicorn(tmp_path, None, cwd=checkout, VECTOR_EMBEDDER_API_KEY="k")
    try:
        server.wait_until_ready()
        assert_same_vectors(embed_one_and_two(server, "k"), reference_model.encode(["one", "two"]))
    finally:
        server.stop()
    assert f"/models does not exist: looking for models in {checkout / 'models'}" in server.output()


def test_gunicorn_rejects_the_default_key_when_another_is_set(gunicorn_server):
    response = requests.post(gunicorn_server.url + "/embeddings", json={"text": "x"},
                             headers={"X-API-Key": "abc123"}, timeout=10)
    assert response.status_code == 401


def test_gunicorn_metrics_add_up_and_requests_are_logged_as_json(gunicorn_server):
    headers = {"X-API-Key": "gunicorn-key", "X-Request-ID": "from-the-test"}
    requests.post(gunicorn_server.url + "/embeddings", json={"text": "metric me"}, headers=headers, timeout=30)
    text = requests.get(gunicorn_server.url + "/metrics", headers=headers, timeout=10).text
    assert 'embedder_requests_total{route="/embeddings",status="200"}' in text
    precision = requests.get(gunicorn_server.url + "/health/ready", timeout=5).json()["precision"]
    assert f'embedder_engine_info{{engine="openvino",precision="{precision}"}} 1.0' in text
    # Set when the model loaded, before any scrape.
    load_seconds = [line for line in text.splitlines() if line.startswith("embedder_model_load_seconds ")]
    assert load_seconds and float(load_seconds[0].split()[1]) > 0
    assert "gunicorn-key" not in text
    log_lines = [line for line in gunicorn_server.output().splitlines() if "from-the-test" in line]
    assert log_lines and all("gunicorn-key" not in line for line in log_lines)
    assert '"route": "/embeddings"' in log_lines[0]


def test_a_bad_setting_stops_start_up_naming_the_variable(tmp_path, models_dir):
    # gunicorn.conf.py reads the settings as the app does: test_config.py checks that each bad value is named.
    server = start_gunicorn(tmp_path, models_dir, BATCHING="sometimes")
    assert server.process.wait(60) != 0
    assert "Configuration error: BATCHING must be on or off, got 'sometimes'" in server.output()


def assert_every_worker_serves(server) -> None:
    # Fresh connections land on any worker: none may still be loading.
    statuses = [requests.post(server.url + "/embeddings", json={"text": f"probe {n}"},
                              headers={"X-API-Key": "k", "Connection": "close"}, timeout=30).status_code
                for n in range(30)]
    assert set(statuses) == {200}, statuses


@pytest.mark.parametrize("arguments, workers", [((), 2), (("-w", "1"), 1)], ids=["WORKERS=2", "-w 1 over WORKERS=2"])
def test_ready_means_every_worker_has_its_model(tmp_path, models_dir, arguments, workers):
    # With -w 1, readiness must not wait for the second worker WORKERS asks for: gunicorn never starts it.
    server = start_gunicorn(tmp_path, models_dir, *arguments, VECTOR_EMBEDDER_API_KEY="k", WORKERS="2")
    try:
        server.wait_until_ready()
        assert len(server.worker_pids()) == workers
        assert_every_worker_serves(server)
        # The workers gunicorn really runs share the cores, whatever WORKERS says.
        assert f"with {max(1, available_cpus() // workers)} engine threads" in server.output()
    finally:
        server.stop()


def test_ready_follows_gunicorn_cmd_args_and_a_worker_added_with_ttin(tmp_path, models_dir):
    # The torch engine, whose workers take seconds to load: the test must see the added one still loading.
    server = start_gunicorn(tmp_path, models_dir, VECTOR_EMBEDDER_API_KEY="k", WORKERS="2", ENGINE="torch",
                            GUNICORN_CMD_ARGS="--workers 1")
    try:
        server.wait_until_ready()
        assert len(server.worker_pids()) == 1
        os.kill(server.process.pid, signal.SIGTTIN)
        # The ready worker now waits for the one gunicorn added while that one loads its model.
        waiting = {"status": "loading", "workers_ready": 1, "workers": 2}
        server.wait_for_readiness(lambda answer: answer.status_code == 503 and answer.json() == waiting,
                                  f"answering {waiting}")
        server.wait_until_ready()
        assert len(server.worker_pids()) == 2
        assert_every_worker_serves(server)
    finally:
        server.stop()


def test_worker_registry_counts_live_ready_workers(tmp_path, monkeypatch):
    import worker_registry
    monkeypatch.setenv("WORKER_STATE_DIR", str(tmp_path))
    assert worker_registry.ready_workers() == 0
    assert worker_registry.worker_counts() is None  # gunicorn has not said how many it runs
    worker_registry.publish_worker_count(2)
    worker_registry.mark_ready()
    worker_registry.mark_ready(pid=2 ** 22 + 7)  # no such process: a worker that died
    assert worker_registry.ready_workers() == 1
    assert worker_registry.worker_counts() == worker_registry.WorkerCounts(ready=1, running=2)
    assert not worker_registry.worker_counts().all_ready
    worker_registry.publish_worker_count(1)  # TTOU
    assert worker_registry.worker_counts().all_ready
    worker_registry.forget(os.getpid())
    assert worker_registry.ready_workers() == 0
    monkeypatch.delenv("WORKER_STATE_DIR")
    assert worker_registry.ready_workers() is None
    assert worker_registry.worker_counts() is None
