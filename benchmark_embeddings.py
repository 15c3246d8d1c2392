"""Measure the service on the hardware it runs on: `python benchmark_embeddings.py`.

1. In-process: texts of 200, 500 and 1000 tokens (tokens/s, median and p95 latency, chunks).
2. The ceiling: a measured fp32 matrix-multiply rate on the same threads, turned into the
   tokens/s this model could reach at most, from the FLOPs per token of its own shape.
3. Over HTTP, against gunicorn servers this script starts on loopback (batching on, then
   off) or against `--url`: short queries at 1, 4 and 16 clients, 1000-token texts at 1 and 4,
   batch requests of 32 texts; requests/s, tokens/s, p50/p95/p99 latency and errors.
4. The targets from the README, as ratios measured in this one run.

Every loop is bounded in count and time. `--json` prints the results as JSON too;
`--plot out.png` draws throughput and latency against concurrency.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

HERE = Path(__file__).resolve().parent
# The key of the servers this script starts, and the one it sends to --url.
API_KEY = os.environ.get("BENCHMARK_API_KEY", "benchmark-key")
SHORT_QUERY_TOKENS = 15
IN_PROCESS_LENGTHS = (200, 500, 1000)
# 200-token texts per call for the in-process throughput compared with the ceiling.
TEXTS_PER_CALL = 8
LONE_QUERY_ROUNDS = 100
PAUSE_BETWEEN_TURNS = 0.02
WORDS = ("river mountain city history science music garden ocean language market engine forest "
         "bridge library window village energy planet network kitchen theory festival harbor").split()


# --- texts of a known token count ---------------------------------------------

def text_of_tokens(tokenizer, tokens: int, seed: int) -> str:
    """A text of about `tokens` content tokens (decoded from exactly that many ids)."""
    rng = np.random.default_rng(seed)
    words = " ".join(rng.choice(WORDS, size=tokens * 2))
    ids = tokenizer(words, add_special_tokens=False, verbose=False)["input_ids"][:tokens]
    return tokenizer.decode(ids)


def short_queries(count: int) -> list[str]:
    subjects = ["password", "invoice", "delivery", "account", "refund", "warranty", "printer", "router"]
    return [f"how do I fix the {subjects[n % len(subjects)]} problem on device number {n} today please"
            for n in range(count)]


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


# --- machine ------------------------------------------------------------------

def machine_info(torch_threads: int, settings) -> dict:
    import sentence_transformers
    import torch
    import transformers
    cpu = platform.processor() or "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch_threads,
            "server": f"{settings.workers} worker(s) x {settings.torch_num_threads} torch thread(s), "
                      f"{settings.threads} request threads, MAX_BATCH_SIZE {settings.max_batch_size}, "
                      f"BATCH_WAIT_MS {settings.batch_wait_ms}, BATCH_MAX_TOKENS {settings.batch_max_tokens}",
            "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "sentence_transformers": sentence_transformers.__version__}


# --- in-process ---------------------------------------------------------------

def time_runs(function, runs: int, warmups: int = 2) -> list[float]:
    for _ in range(warmups):
        function()
    timings = []
    for _ in range(runs):
        started = time.perf_counter()
        function()
        timings.append(time.perf_counter() - started)
    return timings


def in_process(embedder, runs: int) -> dict:
    rows = []
    for tokens in IN_PROCESS_LENGTHS:
        text = text_of_tokens(embedder.tokenizer, tokens, seed=tokens)
        tokenized = embedder.tokenize([text])[0]
        processed = embedder.tokens_processed(tokenized)
        timings = time_runs(lambda: embedder.embed([text]), runs)
        rows.append({"tokens": processed, "chunks": len(tokenized.chunks),
                     "median_ms": 1000 * float(np.median(timings)), "p95_ms": 1000 * percentile(timings, 95),
                     "tokens_per_s": processed / float(np.median(timings))})
    texts_200 = [text_of_tokens(embedder.tokenizer, 200, seed=n) for n in range(TEXTS_PER_CALL)]
    tokens_200 = sum(embedder.tokens_processed(text) for text in embedder.tokenize(texts_200))
    batched_200 = time_runs(lambda: embedder.embed(texts_200), runs)
    queries = short_queries(32)
    thirty_two = time_runs(lambda: embedder.embed(queries), runs)
    return {"texts": rows, "tokens_per_s_200_batched": tokens_200 / float(np.median(batched_200)),
            "short_queries_32_per_call_per_s": 32 / float(np.median(thirty_two))}


def ceiling(embedder, torch_threads: int, sequence_length: int = 200) -> dict:
    """The most tokens/s the model's matrix multiplies allow at the measured fp32 rate."""
    import torch
    torch.set_num_threads(torch_threads)
    size = 1024
    a, b = torch.randn(size, size), torch.randn(size, size)
    timings = time_runs(lambda: torch.mm(a, b), runs=20, warmups=3)
    flops_per_s = 2 * size ** 3 / float(np.median(timings))
    config = embedder.model.transformers_model.config
    hidden, layers = config.hidden_size, config.num_hidden_layers
    intermediate = getattr(config, "intermediate_size", 4 * hidden)
    # Per token and layer: Q, K, V and output projections, the feed-forward pair, and
    # attention scores plus the weighted sum over the sequence (2 FLOPs per multiply-add).
    flops_per_token = layers * (2 * 4 * hidden * hidden + 2 * 2 * hidden * intermediate
                                + 2 * 2 * sequence_length * hidden)
    return {"matmul_gflops": flops_per_s / 1e9, "flops_per_token": flops_per_token,
            "ceiling_tokens_per_s": flops_per_s / flops_per_token}


# --- a server on loopback ------------------------------------------------------

def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class ServerRun:
    url: str
    process: subprocess.Popen | None
    ready_seconds: float | None
    # Proportional set size: shared pages (libraries) count once across the processes, as the
    # machine and a container's memory limit count them; the RSS sum would count them per process.
    peak_pss_mb: float = 0.0
    peak_rss_mb: float = 0.0
    _stop: threading.Event = field(default_factory=threading.Event)

    def watch_memory(self) -> None:
        import psutil
        root = psutil.Process(self.process.pid)
        while not self._stop.wait(0.1):
            try:
                memory = [process.memory_full_info() for process in [root] + root.children(recursive=True)]
            except psutil.Error:
                continue
            self.peak_pss_mb = max(self.peak_pss_mb, sum(info.pss for info in memory) / 2 ** 20)
            self.peak_rss_mb = max(self.peak_rss_mb, sum(info.rss for info in memory) / 2 ** 20)

    def stop(self) -> None:
        self._stop.set()
        if self.process is not None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()


def start_server(env_changes: dict[str, str], timeout: float = 120) -> ServerRun:
    port = free_port()
    env = {**os.environ, "PORT": str(port), "VECTOR_EMBEDDER_API_KEY": API_KEY, **env_changes}
    command = [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "--bind", f"127.0.0.1:{port}",
               "main:create_app()"]
    started = time.monotonic()
    process = subprocess.Popen(command, cwd=HERE, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server = ServerRun(f"http://127.0.0.1:{port}", process, None)
    threading.Thread(target=server.watch_memory, daemon=True).start()
    while time.monotonic() - started < timeout:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode} before it was ready")
        try:
            status, _ = request(server.url, "GET", "/health/ready", None)
            if status == 200:
                server.ready_seconds = time.monotonic() - started
                return server
        except OSError:
            pass
        time.sleep(0.05)
    server.stop()
    raise RuntimeError(f"server not ready within {timeout} s")


def connect(url: str) -> http.client.HTTPConnection:
    """A keep-alive connection to the server at url."""
    parts = urlsplit(url)
    return http.client.HTTPConnection(parts.hostname, parts.port, timeout=120)


def request(url: str, method: str, path: str, body: dict | None,
            connection: http.client.HTTPConnection | None = None) -> tuple[int, bytes]:
    own = connection is None
    connection = connection or connect(url)
    payload = json.dumps(body).encode() if body is not None else None
    headers = {"X-API-Key": API_KEY, "Content-Type": "application/json"}
    try:
        connection.request(method, path, body=payload, headers=headers)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        if own:
            connection.close()


# --- load ----------------------------------------------------------------------

@dataclass(frozen=True)
class Scenario:
    name: str
    path: str
    bodies: list[dict]
    tokens_per_request: float
    clients: int


def run_load(url: str, scenario: Scenario, duration: float, max_requests: int) -> dict:
    """`clients` threads send requests back to back until the time or the count runs out."""
    latencies: list[float] = []
    errors: list[int] = []
    lock = threading.Lock()
    deadline = time.monotonic() + duration
    sent = iter(range(max_requests))

    def client(number: int) -> None:
        connection = connect(url)
        turn = number
        while time.monotonic() < deadline:
            with lock:
                if next(sent, None) is None:
                    break
            body = scenario.bodies[turn % len(scenario.bodies)]
            turn += scenario.clients
            started = time.perf_counter()
            try:
                status, _ = request(url, "POST", scenario.path, body, connection)
            except OSError:
                status = 0
                connection.close()
                connection = connect(url)
            elapsed = time.perf_counter() - started
            with lock:
                (latencies if status == 200 else errors).append(elapsed if status == 200 else status)
        connection.close()

    started = time.monotonic()
    with ThreadPoolExecutor(scenario.clients) as pool:
        list(pool.map(client, range(scenario.clients)))
    wall = time.monotonic() - started
    return {"scenario": scenario.name, "clients": scenario.clients, "requests": len(latencies),
            "errors": len(errors), "requests_per_s": len(latencies) / wall,
            "tokens_per_s": len(latencies) * scenario.tokens_per_request / wall,
            "p50_ms": 1000 * percentile(latencies, 50), "p95_ms": 1000 * percentile(latencies, 95),
            "p99_ms": 1000 * percentile(latencies, 99)}


def scenarios(embedder) -> list[Scenario]:
    queries = short_queries(64)
    query_tokens = float(np.mean([embedder.tokens_processed(t) for t in embedder.tokenize(queries)]))
    documents = [text_of_tokens(embedder.tokenizer, 1000, seed=n) for n in range(8)]
    document_tokens = float(np.mean([embedder.tokens_processed(t) for t in embedder.tokenize(documents)]))
    short = [{"text": query} for query in queries]
    long = [{"text": document} for document in documents]
    batches = [{"texts": queries[start:start + 32]} for start in (0, 32)]
    return [Scenario("short query", "/embeddings", short, query_tokens, clients) for clients in (1, 4, 16)] + [
        Scenario("1000-token text", "/embeddings", long, document_tokens, clients) for clients in (1, 4)] + [
        Scenario("batch of 32 short", "/embeddings/batch", batches, 32 * query_tokens, 4)]


def lone_query(embedder, servers: dict[str, ServerRun], rounds: int) -> dict:
    """One short query at a time, in-process and over HTTP to each server, taking turns.

    Taking turns in the same rounds keeps the machine's drift out of the comparison.
    """
    query = short_queries(1)[0]
    timings: dict[str, list[float]] = {"in-process": [], **{mode: [] for mode in servers}}
    connections = {mode: connect(server.url) for mode, server in servers.items()}
    for _ in range(rounds):
        # A pause before each turn lets the previous one's idle torch threads stop spinning.
        time.sleep(PAUSE_BETWEEN_TURNS)
        started = time.perf_counter()
        embedder.embed([query])
        timings["in-process"].append(time.perf_counter() - started)
        for mode, server in servers.items():
            time.sleep(PAUSE_BETWEEN_TURNS)
            started = time.perf_counter()
            status, _ = request(server.url, "POST", "/embeddings", {"text": query}, connections[mode])
            if status == 200:
                timings[mode].append(time.perf_counter() - started)
    for connection in connections.values():
        connection.close()
    return {mode: 1000 * float(np.median(values)) for mode, values in timings.items()}


def http_runs(embedder, url: str | None, duration: float, max_requests: int, extra_env: dict) -> dict:
    """Every scenario against each server in turn, so batching on and off meet the same conditions."""
    modes = {"external": None} if url else {"batching on": {}, "batching off": {"BATCH_WAIT_MS": "0"}}
    servers: dict[str, ServerRun] = {}
    try:
        for mode, env in modes.items():
            servers[mode] = ServerRun(url, None, None) if url else start_server({**extra_env, **env})
        lone = lone_query(embedder, servers, LONE_QUERY_ROUNDS)
        rows: dict[str, list[dict]] = {mode: [] for mode in servers}
        for scenario in scenarios(embedder):
            for mode, server in servers.items():
                rows[mode].append(run_load(server.url, scenario, duration, max_requests))
    finally:
        for server in servers.values():
            server.stop()
    return {"lone_query_p50_ms": lone,
            "modes": {mode: {"ready_seconds": server.ready_seconds, "peak_pss_mb": server.peak_pss_mb or None,
                             "peak_rss_mb": server.peak_rss_mb or None, "rows": rows[mode]}
                      for mode, server in servers.items()}}


# --- targets -------------------------------------------------------------------

def find(rows: list[dict], name: str, clients: int) -> dict:
    return next(row for row in rows if row["scenario"] == name and row["clients"] == clients)


def targets(local: dict, top: dict, http: dict) -> list[dict]:
    checks = []

    def check(name: str, measured: float, target: float, higher_is_better: bool = True) -> None:
        passed = measured >= target if higher_is_better else measured <= target
        checks.append({"target": name, "measured": round(measured, 3), "bound": target, "met": bool(passed)})

    check(f"in-process 200-token tokens/s ({TEXTS_PER_CALL} texts per call) / ceiling",
          local["tokens_per_s_200_batched"] / top["ceiling_tokens_per_s"], 0.70)
    if "batching on" not in http["modes"]:
        return checks
    on, off = http["modes"]["batching on"], http["modes"]["batching off"]
    on16, off16 = find(on["rows"], "short query", 16), find(off["rows"], "short query", 16)
    check("16 clients short: batching on / off req/s", on16["requests_per_s"] / off16["requests_per_s"], 3.0)
    check("16 clients short: req/s / in-process 32-per-call rate",
          on16["requests_per_s"] / local["short_queries_32_per_call_per_s"], 0.65)
    check("16 clients short: p50 on / p50 off", on16["p50_ms"] / off16["p50_ms"], 1.0, higher_is_better=False)
    lone = http["lone_query_p50_ms"]
    check("one short query alone: HTTP p50 / in-process p50 (taking turns)",
          lone["batching on"] / lone["in-process"], 1.15, higher_is_better=False)
    check("4 clients 1000-token: tokens/s / in-process",
          find(on["rows"], "1000-token text", 4)["tokens_per_s"] / local["texts"][2]["tokens_per_s"], 1.0)
    check("ready seconds (batching on server)", on["ready_seconds"], 8.0, higher_is_better=False)
    check("peak memory (PSS) MB of all serving processes", max(on["peak_pss_mb"], off["peak_pss_mb"]), 1024.0,
          higher_is_better=False)
    return checks


# --- output --------------------------------------------------------------------

def print_report(report: dict) -> None:
    info = report["machine"]
    print(f"Machine: {info['cpu']}, {info['cores']} cores; in-process torch threads {info['torch_threads']}; "
          f"server {info['server']}")
    print(f"Versions: "
          f"python {info['python']}, torch {info['torch']}, transformers {info['transformers']}, "
          f"sentence-transformers {info['sentence_transformers']}; model {report['model']}")
    print("\nIn-process (one text per call)")
    print(f"{'tokens':>7} {'chunks':>6} {'tokens/s':>9} {'median ms':>9} {'p95 ms':>7}")
    for row in report["in_process"]["texts"]:
        print(f"{row['tokens']:>7} {row['chunks']:>6} {row['tokens_per_s']:>9.0f} "
              f"{row['median_ms']:>9.1f} {row['p95_ms']:>7.1f}")
    local, top = report["in_process"], report["ceiling"]
    print(f"200-token texts, {TEXTS_PER_CALL} per call: {local['tokens_per_s_200_batched']:.0f} tokens/s; "
          f"32 short queries per call: {local['short_queries_32_per_call_per_s']:.0f} queries/s")
    print(f"\nCeiling: fp32 matmul {top['matmul_gflops']:.1f} GFLOP/s, {top['flops_per_token'] / 1e6:.1f} MFLOP/token"
          f" -> {top['ceiling_tokens_per_s']:.0f} tokens/s; measured/ceiling for 200-token texts: "
          f"{local['texts'][0]['tokens_per_s'] / top['ceiling_tokens_per_s']:.2f} one per call, "
          f"{local['tokens_per_s_200_batched'] / top['ceiling_tokens_per_s']:.2f} {TEXTS_PER_CALL} per call")
    lone = report["http"]["lone_query_p50_ms"]
    print("\nOne short query alone, p50 over " + str(LONE_QUERY_ROUNDS) + " rounds taking turns: "
          + ", ".join(f"{mode} {ms:.1f} ms" for mode, ms in lone.items()))
    for mode, result in report["http"]["modes"].items():
        ready = f"{result['ready_seconds']:.1f} s" if result["ready_seconds"] else "n/a"
        memory = (f"{result['peak_pss_mb']:.0f} MB (RSS summed per process {result['peak_rss_mb']:.0f} MB)"
                  if result["peak_pss_mb"] else "n/a")
        print(f"\nHTTP, {mode} (ready in {ready}, peak memory {memory})")
        print(f"{'scenario':<18} {'clients':>7} {'req/s':>7} {'tokens/s':>9} {'p50 ms':>7} {'p95 ms':>7} "
              f"{'p99 ms':>7} {'errors':>6}")
        for row in result["rows"]:
            print(f"{row['scenario']:<18} {row['clients']:>7} {row['requests_per_s']:>7.1f} "
                  f"{row['tokens_per_s']:>9.0f} {row['p50_ms']:>7.1f} {row['p95_ms']:>7.1f} {row['p99_ms']:>7.1f} "
                  f"{row['errors']:>6}")
    print("\nTargets (ratios from this run)")
    for check in report["targets"]:
        print(f"  {'MET ' if check['met'] else 'MISS'} {check['target']}: {check['measured']} (bound {check['bound']})")


def plot(report: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, (throughput, latency) = plt.subplots(1, 2, figsize=(11, 4))
    for mode, result in report["http"]["modes"].items():
        rows = [row for row in result["rows"] if row["scenario"] == "short query"]
        clients = [row["clients"] for row in rows]
        throughput.plot(clients, [row["requests_per_s"] for row in rows], marker="o", label=mode)
        latency.plot(clients, [row["p50_ms"] for row in rows], marker="o", label=f"{mode} p50")
        latency.plot(clients, [row["p95_ms"] for row in rows], marker="x", linestyle="--", label=f"{mode} p95")
    throughput.set(title="Short queries: throughput", xlabel="concurrent clients", ylabel="requests/s")
    latency.set(title="Short queries: latency", xlabel="concurrent clients", ylabel="ms")
    for axes in (throughput, latency):
        axes.set_xscale("log", base=2)
        axes.legend()
        axes.grid(True, alpha=0.3)
    figure.suptitle(f"{report['model']} on {report['machine']['cpu']} ({report['machine']['cores']} cores)")
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="benchmark a running server instead of starting one (key: $BENCHMARK_API_KEY)")
    parser.add_argument("--duration", type=float, default=6.0, help="seconds per HTTP scenario (default 6)")
    parser.add_argument("--max-requests", type=int, default=5000, help="requests per HTTP scenario at most")
    parser.add_argument("--runs", type=int, default=10, help="timed in-process runs per text (default 10)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON after the table")
    parser.add_argument("--plot", metavar="PNG", help="draw throughput and latency against concurrency")
    parser.add_argument("--server-env", action="append", default=[], metavar="NAME=VALUE",
                        help="extra environment for the servers this script starts (repeatable)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import torch

    from config import available_cpus, load_settings
    from embeddings import load_model, load_text_embedder
    extra_env = dict(item.split("=", 1) for item in args.server_env)
    settings = load_settings({**os.environ, **extra_env})
    # In-process figures use every core: the bar the server is held to.
    in_process_threads = available_cpus()
    torch.set_num_threads(in_process_threads)
    embedder = load_text_embedder(settings, load_model(settings))

    report = {"model": settings.embedding_model, "machine": machine_info(in_process_threads, settings),
              "settings": {key: value for key, value in asdict(settings).items() if key != "api_keys"}}
    report["in_process"] = in_process(embedder, args.runs)
    report["ceiling"] = ceiling(embedder, in_process_threads)
    report["http"] = http_runs(embedder, args.url, args.duration, args.max_requests, extra_env)
    report["targets"] = targets(report["in_process"], report["ceiling"], report["http"])
    print_report(report)
    if args.json:
        print(json.dumps(report, indent=2))
    if args.plot:
        plot(report, args.plot)
        print(f"\nplot written to {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
