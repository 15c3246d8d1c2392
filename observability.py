"""What the service tells operators: Prometheus metrics and one JSON log line per request.

Metrics use prometheus_client. Under gunicorn with several workers each worker
writes its values to files in PROMETHEUS_MULTIPROC_DIR (set by gunicorn.conf.py)
and /metrics adds them up; in a single process the app keeps its own registry.
"""
from __future__ import annotations

import json
import logging
import os
import re
import time
import uuid
from typing import TYPE_CHECKING

from flask import Flask, Response, g, request
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import multiprocess

if TYPE_CHECKING:
    from batcher import BatchStats
    from service import LoadReport

request_logger = logging.getLogger("embedder.requests")

# A client's request id is echoed only when it is short and plain, so logs stay parseable.
CLIENT_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


def configure_logging() -> None:
    """Plain log lines for the service; bare JSON lines, one per request, for the request log."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not request_logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        request_logger.addHandler(handler)
        request_logger.setLevel(logging.INFO)
        request_logger.propagate = False


def multiprocess_mode() -> bool:
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


class Metrics:
    """The service's metrics, registered on one registry (none in multiprocess mode: files hold them)."""

    def __init__(self) -> None:
        self.registry = None if multiprocess_mode() else CollectorRegistry()
        registry = self.registry
        self.requests = Counter("embedder_requests_total", "HTTP requests by route and status",
                                ["route", "status"], registry=registry)
        self.latency = Histogram("embedder_request_seconds", "HTTP request latency by route",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=registry)
        self.tokens = Counter("embedder_tokens_total", "Tokens processed by the model", registry=registry)
        self.images = Counter("embedder_images_total", "Images embedded", registry=registry)
        self.batch_requests = Histogram("embedder_batch_requests", "Requests served by one model batch",
                                        buckets=(1, 2, 4, 8, 16, 32, 64), registry=registry)
        self.batch_windows = Histogram("embedder_batch_windows", "Windows encoded in one model batch",
                                       buckets=(1, 4, 8, 16, 32, 64, 128, 256), registry=registry)
        self.queue_depth = Gauge("embedder_queue_depth", "Requests waiting for the model",
                                 multiprocess_mode="livesum", registry=registry)
        self.rejected = Counter("embedder_rejected_total",
                                "Requests refused with 429: the model's queue or the bodies in flight were full",
                                registry=registry)
        self.model_load_seconds = Gauge("embedder_model_load_seconds", "Seconds the model took to load and warm up",
                                        multiprocess_mode="max", registry=registry)
        self.engine = Gauge("embedder_engine_info", "1 for the inference engine and precision serving the model",
                            ["engine", "precision"], multiprocess_mode="max", registry=registry)

    def record_batch(self, stats: BatchStats) -> None:
        self.batch_requests.observe(stats.jobs)
        self.batch_windows.observe(stats.windows)
        self.queue_depth.set(stats.still_queued)

    def record_load(self, report: LoadReport) -> None:
        """Set when the model has loaded (service.LoadReport), not when /metrics is scraped."""
        self.model_load_seconds.set(report.load_seconds)
        self.engine.labels(report.engine, report.precision).set(1)

    def exposition(self) -> bytes:
        if self.registry is not None:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry)


def request_id() -> str:
    return getattr(g, "request_id", "")


def _start_request() -> None:
    g.started = time.perf_counter()
    offered = request.headers.get("X-Request-ID", "")
    g.request_id = offered if CLIENT_REQUEST_ID.match(offered) else uuid.uuid4().hex


def _finish_request(metrics: Metrics, response: Response) -> Response:
    duration = time.perf_counter() - g.get("started", time.perf_counter())
    route = request.url_rule.rule if request.url_rule is not None else "unmatched"
    metrics.requests.labels(route, str(response.status_code)).inc()
    metrics.latency.labels(route).observe(duration)
    tokens, images = g.get("tokens", 0), g.get("images", 0)
    metrics.tokens.inc(tokens)
    metrics.images.inc(images)
    if response.status_code == 429:
        metrics.rejected.inc()
    response.headers["X-Request-ID"] = request_id()
    request_logger.info(json.dumps({
        "method": request.method, "route": route, "path": request.path, "status": response.status_code,
        "duration_ms": round(duration * 1000, 2), "tokens": tokens, "images": images,
        "request_id": request_id(),
    }))
    return response


def install(app: Flask, metrics: Metrics) -> None:
    """Time and log every request, and count it in the metrics."""
    app.before_request(_start_request)
    app.after_request(lambda response: _finish_request(metrics, response))


def count_work(tokens: int = 0, images: int = 0) -> None:
    """Record what the model processed for this request (logged and counted when it ends)."""
    g.tokens = g.get("tokens", 0) + tokens
    g.images = g.get("images", 0) + images


def metrics_response(metrics: Metrics) -> Response:
    return Response(metrics.exposition(), content_type=CONTENT_TYPE_LATEST)
