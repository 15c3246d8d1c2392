"""Dynamic batching: many requests' windows, one model thread, few forward passes.

Request threads put jobs (the token-id windows of one request) in a bounded
queue and wait. One model thread takes what is waiting, up to a token budget,
encodes all their windows in one call (which groups them by length into
forward passes) and hands each job exactly its own vectors back, in order.

A lone request never waits for company: the thread waits up to `max_wait`
for more jobs only while traffic is concurrent (the previous batch held more
than one job). With `max_wait` 0 batching is off: one job per batch.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

logger = logging.getLogger(__name__)

Window = Sequence[int]


class QueueFullError(RuntimeError):
    """The queue holds as many jobs as it may; the client should retry later."""


@dataclass(frozen=True)
class BatchLimits:
    max_tokens: int  # tokens gathered into one batch (a lone job may exceed it)
    max_wait: float  # seconds to wait for company under concurrent traffic; 0 turns batching off
    queue_max: int  # jobs waiting at most


@dataclass
class _Job:
    windows: list[Window]
    tokens: int
    done: threading.Event = field(default_factory=threading.Event)
    vectors: np.ndarray | None = None
    error: BaseException | None = None


@dataclass(frozen=True)
class BatchStats:
    jobs: int
    windows: int
    still_queued: int  # jobs left waiting when this batch was taken


class Batcher:
    def __init__(self, encode_windows: Callable[[list[Window]], np.ndarray],
                 tokens_per_window: Callable[[Window], int], limits: BatchLimits,
                 on_batch: Callable[[BatchStats], None] | None = None) -> None:
        self._encode_windows = encode_windows
        self._tokens_per_window = tokens_per_window
        self.limits = limits
        self._on_batch = on_batch
        self._queue: deque[_Job] = deque()
        self._condition = threading.Condition()
        self._last_batch_jobs = 0
        self._still_queued = 0
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="model-batcher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    def encode(self, windows: Sequence[Window]) -> np.ndarray:
        """The vectors of these windows, in order; blocks until the model thread has run them."""
        job = _Job(list(windows), sum(self._tokens_per_window(window) for window in windows))
        with self._condition:
            if self._stopping:
                raise RuntimeError("the batcher is stopping")
            if len(self._queue) >= self.limits.queue_max:
                raise QueueFullError(f"{len(self._queue)} requests are already waiting for the model")
            self._queue.append(job)
            self._condition.notify()
        job.done.wait()
        if job.error is not None:
            raise job.error
        return job.vectors

    def stop(self, timeout: float = 30) -> None:
        """Finish every accepted job, then end the model thread."""
        with self._condition:
            self._stopping = True
            self._condition.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            jobs = self._take_jobs()
            if not jobs:
                return
            self._run_batch(jobs)

    def _take_jobs(self) -> list[_Job]:
        limits = self.limits
        with self._condition:
            while not self._queue and not self._stopping:
                self._condition.wait()
            if not self._queue:
                return []
            if limits.max_wait > 0 and self._last_batch_jobs > 1:
                deadline = time.monotonic() + limits.max_wait
                while self._queued_tokens() < limits.max_tokens and not self._stopping:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._condition.wait(remaining)
            jobs = [self._queue.popleft()]
            if limits.max_wait > 0:
                tokens = jobs[0].tokens
                while self._queue and tokens + self._queue[0].tokens <= limits.max_tokens:
                    tokens += self._queue[0].tokens
                    jobs.append(self._queue.popleft())
            self._last_batch_jobs = len(jobs)
            self._still_queued = len(self._queue)
            return jobs

    def _queued_tokens(self) -> int:
        return sum(job.tokens for job in self._queue)

    def _run_batch(self, jobs: list[_Job]) -> None:
        windows = [window for job in jobs for window in job.windows]
        try:
            vectors = self._encode_windows(windows)
        except Exception as error:  # the jobs' threads re-raise it; the model thread lives on
            logger.exception("A batch of %d requests failed", len(jobs))
            for job in jobs:
                job.error = error
                job.done.set()
            return
        if self._on_batch is not None:
            self._on_batch(BatchStats(len(jobs), len(windows), self._still_queued))
        start = 0
        for job in jobs:
            job.vectors = vectors[start:start + len(job.windows)]
            start += len(job.windows)
            job.done.set()
