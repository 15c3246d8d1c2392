"""gunicorn settings for the service: `gunicorn -c gunicorn.conf.py 'main:create_app()'`.

Settings come from the same validated environment as the app, so a bad value
stops start-up here with a message that names the variable.
"""
import ctypes
import os
import sys
import tempfile

from config import SettingsError, load_settings

try:
    _settings = load_settings()
except SettingsError as error:
    sys.exit(f"Configuration error: {error}")

if not _settings.allow_model_download:
    # The service must never reach for the network at run time.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Workers write their metrics to files here so /metrics adds up every worker's values.
if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="embedder-metrics-")
# Workers mark themselves ready here, so /health/ready waits for all of them (worker_registry.py).
os.environ["WORKER_STATE_DIR"] = tempfile.mkdtemp(prefix="embedder-workers-")

# glibc gives each of the many request threads a malloc arena of its own, and freed memory stays
# scattered over them. Two arenas took the peak resident memory under mixed load from 411 to 389 MB
# (measured; the same as MALLOC_ARENA_MAX=2). Set in the master, before the workers are forked.
# glibc reads MALLOC_ARENA_MAX itself when it is set; it is left alone then.
M_ARENA_MAX = -8
MALLOC_ARENAS = 2
_process_symbols = ctypes.CDLL(None)  # the C library the interpreter is linked against
if "MALLOC_ARENA_MAX" not in os.environ and hasattr(_process_symbols, "mallopt"):
    _process_symbols.mallopt(M_ARENA_MAX, MALLOC_ARENAS)

bind = f"0.0.0.0:{_settings.port}"
worker_class = "gthread"
workers = _settings.workers
threads = _settings.threads
# gthread workers heartbeat from their main thread, so a long request does not trip this.
timeout = 120
graceful_timeout = 30
# The app logs one JSON line per request itself (observability.py).
accesslog = None
# The control socket (gunicorn 27) is not used: several instances on one machine
# (tests, benchmarks) would contend for its single default path, and a container's
# numeric user has no writable home to put it in.
control_socket_disable = True


def worker_exit(server, worker):
    """Let the model thread finish what it accepted before the worker process ends."""
    app = getattr(worker, "wsgi", None)
    service = getattr(app, "extensions", {}).get("embedding_service") if app is not None else None
    if service is not None:
        service.stop()


def nworkers_changed(server, new_value, old_value):
    """Publish the number of workers gunicorn keeps, so readiness waits for exactly those.

    gunicorn calls this when it sets the number: at start (after -w, GUNICORN_CMD_ARGS and this
    file are merged, so `workers` above may not be the truth), on TTIN/TTOU and on reload.
    """
    import worker_registry
    worker_registry.publish_worker_count(new_value)
    # Workers forked from now on share the cores among this many (ENGINE_THREADS' default).
    os.environ["WORKERS"] = str(new_value)


def child_exit(server, worker):
    from prometheus_client import multiprocess

    import worker_registry
    multiprocess.mark_process_dead(worker.pid)
    worker_registry.forget(worker.pid)
