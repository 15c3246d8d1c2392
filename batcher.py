"""Dynamic batching: many requests' windows, one model thread, few forward passes.

Request threads put jobs (the token-id windows of one request) in a queue and
wait. One model thread takes what is waiting, up to a token budget, encodes all
their windows together (grouped by length into forward passes) and hands each
job exactly its own vectors back, in order. Other model work (an image request)
runs on the same thread as a job of its own, so the model has one user, and one
queue bound and one deadline cover all its work.

Batching is continuous, as in text-embeddings-inference: the model thread never
waits for company. Whenever it is free it takes what is waiting, up to the token
budget; while it runs a batch, the queue fills by itself, so under load batches
grow with the load and a lone request is taken at once. With batching off, each
job is a batch of its own (for comparison).

The queue is bounded by the work it holds, in tokens, and a refusal says how
long that work will take at the throughput measured. Every request waits at
most `request_timeout`; a job whose request stopped waiting before the model
took it is dropped unencoded. Nothing the model thread runs can end it
unnoticed: if it ends, every waiting job fails with the reason, and `fault()`
reports it, as it reports one model call that runs far too long.
"""
from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from budget import Budget
from errors import LOADING_RETRY_AFTER, ApiError

logger = logging.getLogger(__name__)

Window = Sequence[int]

# The rate assumed until the model thread has measured its own.
ASSUMED_TOKENS_PER_SECOND = 1000.0
# One model call holds at most max_tokens tokens or one image request: seconds of work.
# A call that has run this many request deadlines is stuck, and only a restart helps.
STUCK_AFTER_DEADLINES = 2


class QueueFullError(ApiError):
    """The queue holds as much work as it may; the client should retry after `retry_after` seconds."""

    def __init__(self, detail: str, retry_after: int) -> None:
        super().__init__(429, f"The service is busy ({detail}); retry in {retry_after} s", code="server_busy",
                         retry_after=retry_after)


class RequestTimeoutError(ApiError):
    """The model did not answer a request within its deadline."""

    def __init__(self, timeout: float, retry_after: int) -> None:
        super().__init__(503, f"The model did not answer within {timeout:g} s (REQUEST_TIMEOUT_SECONDS): the "
                              f"service is behind; retry in {retry_after} s", code="timeout", retry_after=retry_after)
        self.timeout = timeout


class ModelUnavailableError(ApiError):
    """The model thread has ended, or is stopping: no request can be served."""

    shows_local_reason = True

    def __init__(self, reason: str) -> None:
        super().__init__(503, f"The model cannot serve requests now ({reason}); retry in {LOADING_RETRY_AFTER} s, "
                              f"when this instance has been restarted or another one answers",
                         code="model_unavailable", retry_after=LOADING_RETRY_AFTER)


@dataclass(frozen=True)
class BatchLimits:
    max_tokens: int  # tokens gathered into one batch, and in one model call (a lone window may exceed it)
    batching: bool  # False: one job per batch
    queue_max_tokens: int  # tokens of work waiting at most (a lone job may exceed it)
    request_timeout: float  # seconds a request waits for its result at most

    @property
    def stuck_after(self) -> float:
        return STUCK_AFTER_DEADLINES * self.request_timeout


@dataclass(eq=False)  # jobs are found in the queue by identity
class Job:
    windows: list[Window]
    tokens: int
    task: Callable[[], Any] | None = None  # other model work, run alone instead of encoding windows
    done: threading.Event = field(default_factory=threading.Event)
    result: Any = None
    error: BaseException | None = None
    abandoned: bool = False  # its request stopped waiting


@dataclass(frozen=True)
class BatchStats:
    jobs: int
    windows: int
    still_queued: int  # jobs left waiting when this batch was taken


class Throughput:
    """Tokens per second the model thread achieved lately: sums over batches that fade, so it follows change."""

    def __init__(self, assumed_tokens_per_second: float = ASSUMED_TOKENS_PER_SECOND, memory: float = 0.9) -> None:
        self._tokens = assumed_tokens_per_second
        self._seconds = 1.0
        self._memory = memory

    @property
    def tokens_per_second(self) -> float:
        return self._tokens / self._seconds

    def record(self, tokens: int, seconds: float) -> None:
        self._tokens = self._tokens * self._memory + tokens
        self._seconds = self._seconds * self._memory + seconds

    def seconds_for(self, tokens: int) -> int:
        """Whole seconds, at least 1, that this many tokens take: a Retry-After."""
        return max(1, math.ceil(tokens / self.tokens_per_second))


class Batcher:
    def __init__(self, encode_windows: Callable[[list[Window]], np.ndarray],
                 tokens_per_window: Callable[[Window], int], limits: BatchLimits,
                 on_batch: Callable[[BatchStats], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._encode_windows = encode_windows
        self._tokens_per_window = tokens_per_window
        self.limits = limits
        self._on_batch = on_batch
        self._clock = clock  # times model calls for fault()
        self._queue: deque[Job] = deque()
        self._queued = Budget(limits.queue_max_tokens)
        self._throughput = Throughput()
        self._condition = threading.Condition()
        self._still_queued = 0
        self._stopping = False
        self._failure: str | None = None
        self._running: list[Job] = []
        self._call_started: float | None = None
        self._reported_stuck_call: float | None = None
        self._thread = threading.Thread(target=self._run, name="model-batcher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def ensure_room(self) -> None:
        """Refuse at once when the queue is full, before the request does costly work (tokenizing, decoding)."""
        with self._condition:
            self._check_serving()
            if self._queued.is_full:
                raise self._queue_full()

    def encode(self, windows: Sequence[Window]) -> np.ndarray:
        """The vectors of these windows, in order; blocks until the model thread has run them."""
        return self.wait_for(self.submit(windows))

    def run_alone(self, task: Callable[[], Any], tokens: int) -> Any:
        """task() run on the model thread in a batch of its own, counted as `tokens` of work."""
        return self.wait_for(self._enqueue(Job([], tokens, task)))

    def submit(self, windows: Sequence[Window]) -> Job:
        """Queue the windows for the model thread; QueueFullError when the queue cannot take their tokens."""
        windows = list(windows)
        return self._enqueue(Job(windows, sum(self._tokens_per_window(window) for window in windows)))

    def wait_for(self, job: Job) -> Any:
        """The job's result once the model thread has run it; RequestTimeoutError when the deadline passes first."""
        if not job.done.wait(self.limits.request_timeout):
            with self._condition:
                if not job.done.is_set():
                    raise self._abandon(job)
        if job.error is not None:
            raise job.error
        return job.result

    def fault(self) -> str | None:
        """Why the model thread cannot serve, or None while it can: it has ended, or one model call is stuck."""
        with self._condition:
            if self._failure is not None:
                return self._failure
            started = self._call_started
        if started is None or self._clock() - started <= self.limits.stuck_after:
            return None
        reason = (f"the model thread has been in one model call for {self._clock() - started:.0f} s, "
                  f"more than {self.limits.stuck_after:g} s: it is stuck")
        if self._reported_stuck_call != started:
            self._reported_stuck_call = started
            logger.error("%s; the service reports itself unhealthy so that it is restarted", reason)
        return reason

    def stop(self, timeout: float = 30) -> None:
        """Finish every accepted job, then end the model thread."""
        with self._condition:
            self._stopping = True
            self._condition.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    # --- request threads ------------------------------------------------------

    def _enqueue(self, job: Job) -> Job:
        with self._condition:
            self._check_serving()
            if not self._queued.try_take(job.tokens):
                raise self._queue_full()
            self._queue.append(job)
            self._condition.notify()
        return job

    def _check_serving(self) -> None:
        if self._failure is not None:
            raise ModelUnavailableError(self._failure)
        if self._stopping:
            raise ModelUnavailableError("the batcher is stopping")

    def _queue_full(self) -> QueueFullError:
        return QueueFullError(f"{self._queued.taken} tokens of work from {len(self._queue)} requests already "
                              f"wait for the model", self._throughput.seconds_for(self._queued.taken))

    def _abandon(self, job: Job) -> RequestTimeoutError:
        """Drop a job whose deadline passed, unencoded when the model has not taken it yet."""
        job.abandoned = True
        if job in self._queue:
            self._queue.remove(job)
            self._queued.give_back(job.tokens)
        return RequestTimeoutError(self.limits.request_timeout, self._throughput.seconds_for(self._queued.taken))

    # --- the model thread -----------------------------------------------------

    def _run(self) -> None:
        try:
            while jobs := self._take_jobs():
                self._run_batch(jobs)
        except BaseException as error:  # whatever ends the thread must not leave requests waiting
            self._fail_everything(error)

    def _fail_everything(self, error: BaseException) -> None:
        reason = f"the model thread ended on {type(error).__name__}: {error}"
        logger.critical("%s; every waiting request fails and the service reports itself unhealthy so that it is "
                        "restarted", reason, exc_info=error)
        with self._condition:
            self._failure = reason
            jobs = self._running + list(self._queue)
            self._queue.clear()
            self._call_started = None
        for job in jobs:
            if not job.done.is_set():
                job.error = ModelUnavailableError(reason)
                job.done.set()

    def _take_jobs(self) -> list[Job]:
        """What waits when the model thread is free (once anything does), up to the batch's budget: [] to stop."""
        with self._condition:
            while not self._queue and not self._stopping:
                self._condition.wait()
            if not self._queue:
                return []
            jobs = self._gather()
            self._queued.give_back(sum(job.tokens for job in jobs))
            self._still_queued = len(self._queue)
            self._running = jobs
            return jobs

    def _gather(self) -> list[Job]:
        """The first job and, with batching on, the window jobs after it that fit in the token budget."""
        jobs = [self._queue.popleft()]
        if jobs[0].task is not None or not self.limits.batching:
            return jobs
        tokens = jobs[0].tokens
        while (self._queue and self._queue[0].task is None
               and tokens + self._queue[0].tokens <= self.limits.max_tokens):
            tokens += self._queue[0].tokens
            jobs.append(self._queue.popleft())
        return jobs

    def _run_batch(self, jobs: list[Job]) -> None:
        started = time.monotonic()
        try:
            results = self._results(jobs)
        except Exception as error:  # the jobs' threads re-raise it; the model thread lives on
            logger.exception("A batch of %d requests failed", len(jobs))
            for job in jobs:
                job.error = error
                job.done.set()
            results = None
        if results is not None:
            with self._condition:
                self._throughput.record(sum(job.tokens for job in jobs), time.monotonic() - started)
            self._report(BatchStats(len(jobs), sum(len(job.windows) for job in jobs), self._still_queued))
            for job, result in zip(jobs, results):
                job.result = result
                job.done.set()
        self._running = []  # only now: should the thread end before this, its guard fails these jobs

    def _results(self, jobs: list[Job]) -> list[Any] | None:
        """Each job's result, or None when every request of the batch stopped waiting before the end."""
        if jobs[0].task is not None:
            return [self._timed(jobs[0].task)]
        vectors = self._encode_in_calls([window for job in jobs for window in job.windows], jobs)
        if vectors is None:
            return None
        results, start = [], 0
        for job in jobs:
            results.append(vectors[start:start + len(job.windows)])
            start += len(job.windows)
        return results

    def _encode_in_calls(self, windows: list[Window], jobs: list[Job]) -> np.ndarray | None:
        """Encode in calls of at most max_tokens tokens, so no call runs long (see fault()).

        A lone large job takes several calls; they stop when its request has stopped waiting.
        """
        parts = []
        for call in self._calls(windows):
            if parts and all(job.abandoned for job in jobs):
                return None
            parts.append(self._timed(lambda: self._encode_windows(call)))
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def _calls(self, windows: list[Window]) -> Iterator[list[Window]]:
        call: list[Window] = []
        tokens = 0
        for window in windows:
            size = self._tokens_per_window(window)
            if call and tokens + size > self.limits.max_tokens:
                yield call
                call, tokens = [], 0
            call.append(window)
            tokens += size
        yield call

    def _timed(self, model_call: Callable[[], Any]) -> Any:
        self._call_started = self._clock()
        try:
            return model_call()
        finally:
            self._call_started = None

    def _report(self, stats: BatchStats) -> None:
        if self._on_batch is None:
            return
        try:
            self._on_batch(stats)
        except Exception:  # metrics must never cost a request its answer
            logger.exception("The batch observer failed; the batch's requests get their results all the same")
