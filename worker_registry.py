"""Which gunicorn workers have their model loaded, so readiness speaks for the whole server.

gunicorn hands each connection to any worker. Until every worker has loaded its model, a
request may reach one that is still loading; so /health/ready answers 200 only when all
of them are ready. Each ready worker leaves a file named after its pid in a folder that
gunicorn.conf.py creates (WORKER_STATE_DIR); gunicorn's child_exit hook removes the file
of a worker that ends. The master writes how many workers it keeps there (its nworkers_changed
hook), as gunicorn counts them after -w, GUNICORN_CMD_ARGS, the config file and TTIN/TTOU.
Without that folder (one process, as in tests) only this process counts.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

STATE_DIR_VARIABLE = "WORKER_STATE_DIR"
# Not a pid, so ready_workers() never counts it.
WORKER_COUNT_FILE = "workers"


@dataclass(frozen=True)
class WorkerCounts:
    ready: int  # workers with a loaded model
    running: int  # workers gunicorn keeps running

    @property
    def all_ready(self) -> bool:
        return self.ready >= self.running


def _state_dir() -> Path | None:
    folder = os.environ.get(STATE_DIR_VARIABLE)
    return Path(folder) if folder else None


def mark_ready(pid: int | None = None) -> None:
    folder = _state_dir()
    if folder is not None:
        (folder / str(pid or os.getpid())).touch()


def forget(pid: int) -> None:
    folder = _state_dir()
    if folder is not None:
        (folder / str(pid)).unlink(missing_ok=True)


def ready_workers() -> int | None:
    """Workers with a loaded model, or None when this process is not under gunicorn's registry."""
    folder = _state_dir()
    if folder is None:
        return None
    return sum(1 for entry in folder.iterdir() if entry.name.isdigit() and _alive(int(entry.name)))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def publish_worker_count(count: int) -> None:
    """Record how many workers gunicorn keeps, for every worker's readiness to compare with."""
    folder = _state_dir()
    if folder is not None:
        # Write then rename, so a reader never sees a half-written number.
        staged = folder / f".{WORKER_COUNT_FILE}.{os.getpid()}"
        staged.write_text(str(count))
        staged.replace(folder / WORKER_COUNT_FILE)


def worker_counts() -> WorkerCounts | None:
    """Ready and running workers, or None when this process is not under gunicorn's registry."""
    folder = _state_dir()
    if folder is None:
        return None
    try:
        running = int((folder / WORKER_COUNT_FILE).read_text())
    except FileNotFoundError:
        # The master publishes the count before it starts any worker; without it, this worker speaks for itself.
        return None
    return WorkerCounts(ready_workers(), running)
