"""Soak test: mixed traffic against a gunicorn server on loopback for a fixed number of minutes.

`python soak_embeddings.py --minutes 5` starts the service itself (on the model `make run`
bakes and exports into ./models), sends short queries, batches, long texts and bad requests
from several clients, samples the resident memory of the server's processes, and prints
errors and memory over time. It exits non-zero when a request got an unexpected status or
memory grew by more than 5% after the warm-up.

`--url URL --pid PID` soaks a server started otherwise instead, for example one started by
`../shared/tools/run-in-memory-limit 512 -- make run`, so that only the service is inside the limit.
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import psutil

from benchmark_embeddings import HERE, ServerRun, connect, request, short_queries, start_server

ALLOWED_GROWTH = 0.05


def mixed_traffic(long_text: str) -> list[tuple[str, dict, int]]:
    """(path, body, expected status) in the proportions the soak sends them."""
    queries = short_queries(40)
    return ([("/embeddings", {"text": query}, 200) for query in queries]
            + [("/embeddings/batch", {"texts": queries[start:start + 16]}, 200) for start in (0, 16)]
            + [("/embeddings", {"text": long_text}, 200)] * 2
            + [("/embeddings", {"text": ""}, 400), ("/embeddings/batch", {"texts": "not a list"}, 400),
               ("/embeddings/batch", {"texts": ["x"] * 101}, 400)])


def start_own_server() -> ServerRun:
    """The service with its defaults, on the model baked and exported as `make run` does."""
    from config import load_settings
    from download_models import prepare_models
    models_dir = os.environ.get("MODELS_DIR", str(HERE / "models"))
    prepare_models(load_settings({**os.environ, "MODELS_DIR": models_dir}), allow_download=False)
    return start_server({"MODELS_DIR": models_dir})


def tree_rss_mb(pid: int) -> float:
    root = psutil.Process(pid)
    return sum(process.memory_info().rss for process in [root] + root.children(recursive=True)) / 2 ** 20


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=5.0, help="how long to run (default 5)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients (default 8)")
    parser.add_argument("--warm-up", type=float, default=120.0, help="seconds before the memory baseline (default 120)")
    parser.add_argument("--sample", type=float, default=15.0, help="seconds between memory samples (default 15)")
    parser.add_argument("--url", help="soak a running server (key: $BENCHMARK_API_KEY) instead of starting one")
    parser.add_argument("--pid", type=int, help="with --url: the server's main process, for its memory")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    server = ServerRun(args.url, None, None) if args.url else start_own_server()
    server_pid = args.pid if args.url else server.process.pid
    statuses: Counter = Counter()
    unexpected: Counter = Counter()
    lock = threading.Lock()
    started = time.monotonic()
    deadline = started + args.minutes * 60
    traffic = mixed_traffic(" ".join(["a long text about rivers and their bridges"] * 150))

    def client(number: int) -> None:
        connection = connect(server.url)
        for path, body, expected in itertools.islice(itertools.cycle(traffic), number * 7, None):
            if time.monotonic() >= deadline:
                break
            try:
                status, _ = request(server.url, "POST", path, body, connection)
            except OSError as error:
                status = type(error).__name__
                connection.close()
                connection = connect(server.url)
            with lock:
                statuses[status] += 1
                if status != expected:
                    unexpected[(path, status)] += 1
        connection.close()

    samples = []
    try:
        with ThreadPoolExecutor(args.clients) as pool:
            for number in range(args.clients):
                pool.submit(client, number)
            while time.monotonic() < deadline:
                time.sleep(min(args.sample, max(0.0, deadline - time.monotonic())))
                with lock:
                    done = sum(statuses.values())
                samples.append((time.monotonic() - started, tree_rss_mb(server_pid) if server_pid else 0.0, done))
                print(f"{samples[-1][0]:7.0f} s  RSS {samples[-1][1]:7.1f} MB  requests {done}", flush=True)
    finally:
        server.stop()

    after_warm_up = [sample for sample in samples if sample[0] >= args.warm_up] or samples
    baseline, final = after_warm_up[0][1], samples[-1][1]
    growth = (final - baseline) / baseline if baseline else 0.0
    print(f"\nstatuses: {dict(statuses)}")
    print(f"unexpected: {dict(unexpected) or 'none'}")
    print(f"memory after warm-up {baseline:.1f} MB, at the end {final:.1f} MB, growth {100 * growth:+.2f}% "
          f"(allowed {100 * ALLOWED_GROWTH:.0f}%)")
    return 0 if not unexpected and growth <= ALLOWED_GROWTH else 1


if __name__ == "__main__":
    sys.exit(main())
