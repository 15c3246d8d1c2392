"""Which gunicorn workers have their model loaded, so readiness speaks for the whole server.

gunicorn hands each connection to any worker. Until every worker has loaded its model, a
request may reach one that is still loading; so /health/ready answers 200 only when all
of them are ready. Each ready worker leaves a file named after its pid in a folder that
gunicorn.conf.py creates (WORKER_STATE_DIR); gunicorn's child_exit hook removes the file
of a worker that ends. Without that folder (one process, as in tests) only this process counts.
"""
from __future__ import annotations

import os
from pathlib import Path

STATE_DIR_VARIABLE = "WORKER_STATE_DIR"


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
