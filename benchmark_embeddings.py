"""Measure the service on the hardware it runs on: `python benchmark_embeddings.py`.

1. The CPU's flags that decide the engine's speed (avx2, avx512_vnni, avx512_bf16, amx), printed
   beside every figure with the precision the engine serves in.
2. In-process, the upstream table: texts of 200, 500 and 1000 tokens on one thread and on every
   core, torch fp32 (the fallback engine) against the exported model on OpenVINO.
3. Fidelity: the probe set against torch fp32, and on a generated corpus of 1,000 texts whether
   each query's nearest neighbour is the one torch finds.
4. Over HTTP, against gunicorn servers this script starts on loopback, one per engine with each
   engine's defaults (`--compare engines`, the default), or OpenVINO with batching on and off
   (`--compare batching`), or against `--url`: a lone short query (taking turns), short queries at
   1, 4 and 16 clients, 1000-token texts at 1 and 4, 32-text batches at 2; requests/s, tokens/s,
   p50/p95/p99 latency, errors; start-up to ready; peak memory of all serving processes.
5. The targets from the README, as ratios measured in this one run.

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
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

HERE = Path(__file__).resolve().parent
# The key of the servers this script starts, and the one it sends to --url.
API_KEY = os.environ.get("BENCHMARK_API_KEY", "benchmark-key")
IN_PROCESS_LENGTHS = (200, 500, 1000)
LONE_QUERY_ROUNDS = 100
CPU_FLAGS = ("avx2", "avx512_vnni", "avx512_bf16", "amx_bf16")
FIDELITY_CORPUS = 1000
FIDELITY_QUERIES = 1000
# Real text for the precision comparison: Debian's `fortunes` package (apt-get install fortunes).
FORTUNE_FOLDER = Path("/usr/share/games/fortunes")
FORTUNE_PASSAGE_TOKENS = 100
TOP_K = 10
# The workload of the precision table: one document's worth of full windows, as the issue measured.
PRECISION_WINDOWS, PRECISION_WINDOW_TOKENS = 4, 256
# The servers each comparison starts: name -> environment. "torch" is today's torch build with its
# defaults (two workers of one thread on 2 cores); "openvino" the default build.
COMPARISONS = {
    "engines": {"torch": {"ENGINE": "torch"}, "openvino": {}},
    "batching": {"batching on": {}, "batching off": {"BATCHING": "off"}},
}
PAUSE_BETWEEN_TURNS = 0.02
WORDS = ("river mountain city history science music garden ocean language market engine forest "
         "bridge library window village energy planet network kitchen theory festival harbor").split()


# --- texts of a known token count ---------------------------------------------

def text_of_tokens(tokenizer, tokens: int, seed: int) -> str:
    """A text of `tokens` content tokens, or a few more: random words, as many as those tokens take."""
    words = list(np.random.default_rng(seed).choice(WORDS, size=tokens))
    while len(tokenizer.token_ids([" ".join(words)])[0]) > tokens:
        words.pop()
    return " ".join(words)


TOPICS = {
    "cooking": "recipe oven garlic pasta sauce bread flour butter onion soup salad spice pan dough".split(),
    "travel": "airport train ticket hotel passport luggage beach museum island flight visa map harbor".split(),
    "finance": "invoice interest loan budget tax account refund payment mortgage pension stock bank".split(),
    "health": "doctor fever vaccine sleep diet muscle injury clinic therapy allergy blood heart".split(),
    "computing": "router password laptop printer server backup browser keyboard update database cable".split(),
    "nature": "river forest mountain storm garden glacier desert wolf eagle meadow volcano ocean".split(),
    "music": "guitar concert piano melody drummer album choir festival violin lyrics orchestra song".split(),
    "sport": "football marathon coach tennis swimmer stadium referee bicycle trophy season goal team".split(),
}
TEMPLATES = (
    "How do I {verb} the {a} {b} before the {c}?",
    "The {a} and the {b} were {adjective} after the {c}.",
    "I need advice about a {adjective} {a}: the {b} keeps failing near the {c}.",
    "Notes on {a}, {b} and {c}, written on a {adjective} day.",
    "Why is my {a} so {adjective} when the {b} is next to the {c}?",
    "A short guide to {verb} a {a} with a {b}.",
)
VERBS = "fix clean choose compare replace book cancel plan measure protect share find".split()
ADJECTIVES = "slow expensive broken quiet crowded cold late noisy fragile bright strange tiny".split()


def generated_texts(count: int, seed: int) -> list[str]:
    """Texts of one to three sentences on eight topics, for the nearest-neighbour fidelity check."""
    rng = np.random.default_rng(seed)
    texts = []
    for _ in range(count):
        words = TOPICS[rng.choice(list(TOPICS))]
        sentences = [rng.choice(TEMPLATES).format(verb=rng.choice(VERBS), adjective=rng.choice(ADJECTIVES),
                                                  a=rng.choice(words), b=rng.choice(words), c=rng.choice(words))
                     for _ in range(rng.integers(1, 4))]
        texts.append(" ".join(sentences))
    return texts


def short_queries(count: int) -> list[str]:
    subjects = ["password", "invoice", "delivery", "account", "refund", "warranty", "printer", "router"]
    return [f"how do I fix the {subjects[n % len(subjects)]} problem on device number {n} today please"
            for n in range(count)]


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


# --- machine ------------------------------------------------------------------

def cpu_flags() -> dict[str, bool]:
    """Whether the CPU has each instruction set the engines' speed depends on."""
    try:
        words = set(open("/proc/cpuinfo").read().split())
    except OSError:
        words = set()
    return {flag: flag in words for flag in CPU_FLAGS}


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict:
    from importlib.metadata import version

    from config import available_cpus
    return {"cpu": cpu_name(), "cpus": available_cpus(), "flags": cpu_flags(), "python": platform.python_version(),
            **{name: version(name) for name in ("openvino", "torch", "transformers", "sentence-transformers")}}


def flags_text(flags: dict[str, bool]) -> str:
    return " ".join(f"{flag}{'+' if present else '-'}" for flag, present in flags.items())


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


def in_process_table(embedder, runs: int) -> list[dict]:
    """The upstream table: one text of 200, 500 and 1000 tokens per call."""
    rows = []
    for tokens in IN_PROCESS_LENGTHS:
        text = text_of_tokens(embedder.tokenizer, tokens, seed=tokens)
        tokenized = embedder.tokenize([text])[0]
        processed = embedder.tokens_processed(tokenized)
        timings = time_runs(lambda: embedder.embed([text]), runs)
        rows.append({"tokens": processed, "windows": len(tokenized.windows),
                     "median_ms": 1000 * float(np.median(timings)), "p95_ms": 1000 * percentile(timings, 95),
                     "tokens_per_s": processed / float(np.median(timings))})
    return rows


def in_process(settings, runs: int, rounds: int) -> dict:
    """Each engine on one thread and on every core, each in a fresh process of its own, `rounds` times
    taking turns; each row is the median of its rounds.

    A process of its own, because one engine's idle threads (torch's spinning OpenMP threads,
    OpenVINO's pinned ones) slow the other down when both live in one process.
    """
    from multiprocessing import get_context

    from config import available_cpus
    tables: dict[str, list[dict]] = {}
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn"), max_tasks_per_child=1) as pool:
        for _ in range(rounds):
            for threads in sorted({1, available_cpus()}):
                for engine in ("torch", "openvino"):
                    name = f"{engine}, {threads} thread{'s' if threads > 1 else ''}"
                    tables.setdefault(name, []).append(
                        pool.submit(engine_table, settings, engine, threads, runs).result())
    return {name: median_table(runs_of_one) for name, runs_of_one in tables.items()}


def median_table(tables: list[dict]) -> dict:
    """One engine's table with each row's figures the median over the rounds."""
    table = dict(tables[0])
    table["rows"] = []
    for rows in zip(*(one["rows"] for one in tables)):
        row = dict(rows[0])
        for key in ("median_ms", "p95_ms", "tokens_per_s"):
            row[key] = float(np.median([one[key] for one in rows]))
        row["tokens_per_s_rounds"] = [round(one["tokens_per_s"]) for one in rows]
        table["rows"].append(row)
    return table


def engine_table(settings, engine: str, threads: int, runs: int) -> dict:
    """The upstream table on one engine and thread count (run in a process of its own)."""
    from model_loading import load_models
    models = load_models(replace(settings, engine="torch" if engine == "torch" else "auto", engine_threads=threads))
    return {"engine": engine, "threads": threads, "precision": models.precision,
            "rows": in_process_table(models.text, runs)}


def fidelity(settings) -> dict:
    """The engine's vectors against torch fp32: the probe set, and nearest neighbours on a generated corpus."""
    from manifest import MANIFEST_FILE, Manifest
    from model_loading import EXPORT_ENGINE, load_exported_models, load_torch_models
    from model_locator import locate_export
    from self_check import cosine_rows, self_check
    torch_models = load_torch_models(replace(settings, engine="torch"))
    engine_models = load_exported_models(settings)
    folder = locate_export(settings.embedding_model, settings.models_dir, EXPORT_ENGINE, MANIFEST_FILE)
    probes = self_check(engine_models.text, engine_models.images, Manifest.read(folder), folder)
    corpus, queries = generated_texts(FIDELITY_CORPUS, seed=1), generated_texts(FIDELITY_QUERIES, seed=2)

    def vectors(models) -> tuple[np.ndarray, np.ndarray]:
        return unit_rows(np.stack(models.text.embed(corpus))), unit_rows(np.stack(models.text.embed(queries)))

    torch_corpus, torch_queries = vectors(torch_models)
    torch_neighbours = np.argmax(torch_queries @ torch_corpus.T, axis=1)
    result = {"precision": engine_models.precision, "probe_min_cosine": probes.text_min_cosine,
              "corpus": FIDELITY_CORPUS, "queries": FIDELITY_QUERIES, "agreement_by_precision": {}}
    f32_models = load_exported_models(replace(settings, engine_precision="f32"))
    for models in ([engine_models, f32_models] if engine_models.precision != "f32" else [engine_models]):
        engine_corpus, engine_queries = vectors(models)
        neighbours = np.argmax(engine_queries @ engine_corpus.T, axis=1)
        result["agreement_by_precision"][models.precision] = float(np.mean(neighbours == torch_neighbours))
        if models is engine_models:
            cosines = cosine_rows(engine_corpus, torch_corpus)
            result.update(corpus_min_cosine=float(cosines.min()), corpus_median_cosine=float(np.median(cosines)),
                          nearest_neighbour_agreement=result["agreement_by_precision"][models.precision])
    return result


# --- precisions: f32, the CPU's fastest, int8 ------------------------------------------------

def fortune_corpus(tokenizer, count: int = FIDELITY_CORPUS, seed: int = 0) -> tuple[list[str], list[str]] | None:
    """Debian's fortunes: `count` passages of consecutive fortunes of one file (FORTUNE_PASSAGE_TOKENS tokens
    or more each), searched by `count` other single fortunes; None when the package is not installed."""
    files = sorted(path for path in FORTUNE_FOLDER.glob("*") if path.is_file() and not path.is_symlink()
                   and path.suffix not in (".dat", ".u8")) if FORTUNE_FOLDER.is_dir() else []
    if not files:
        return None
    entries = [[" ".join(entry.split()) for entry in path.read_text(errors="replace").split("\n%\n")
                if len(entry.split()) >= 4] for path in files]
    rng = np.random.default_rng(seed)
    flat = [(file, index) for file, texts in enumerate(entries) for index in range(len(texts))]
    query_keys = {flat[i] for i in rng.choice(len(flat), count, replace=False)}
    passages = []
    for file, texts in enumerate(entries):
        kept = [text for index, text in enumerate(texts) if (file, index) not in query_keys]
        current, tokens = [], 0
        for text, ids in zip(kept, tokenizer.token_ids(kept)):
            current.append(text)
            tokens += len(ids)
            if tokens >= FORTUNE_PASSAGE_TOKENS:
                passages.append(" ".join(current))
                current, tokens = [], 0
    chosen = sorted(rng.choice(len(passages), count, replace=False))
    return [passages[i] for i in chosen], [entries[file][index] for file, index in sorted(query_keys)]


def retrieval_agreement(reference: tuple[np.ndarray, np.ndarray], candidate: tuple[np.ndarray, np.ndarray]) -> dict:
    """How far a precision's vectors and rankings stay from f32's on one corpus (documents, queries)."""
    from self_check import cosine_rows
    (ref_documents, ref_queries), (documents, queries) = reference, candidate
    cosines = np.concatenate([cosine_rows(documents, ref_documents), cosine_rows(queries, ref_queries)])
    ref_top = np.argsort(-(ref_queries @ ref_documents.T), axis=1)[:, :TOP_K]
    top = np.argsort(-(queries @ documents.T), axis=1)[:, :TOP_K]
    return {"min_cosine": float(cosines.min()), "median_cosine": float(np.median(cosines)),
            "nearest_neighbour_agreement": float(np.mean(ref_top[:, 0] == top[:, 0])),
            "top10_overlap": float(np.mean([len(set(a) & set(b)) / TOP_K for a, b in zip(ref_top, top)]))}


def precision_speed(settings, precision: str, threads: int, runs: int) -> float:
    """Tokens per second of PRECISION_WINDOWS full windows at one precision (run in a process of its own)."""
    from model_loading import load_exported_models
    text = load_exported_models(replace(settings, engine_precision=precision, engine_threads=threads)).text
    windows = [[text.tokenizer.token_ids(["river"])[0][0]] * (PRECISION_WINDOW_TOKENS - 2)] * PRECISION_WINDOWS
    timings = time_runs(lambda: text.encode_windows(windows), runs)
    return PRECISION_WINDOWS * PRECISION_WINDOW_TOKENS / float(np.median(timings))


def precisions(settings, runs: int, rounds: int) -> dict:
    """f32, the CPU's fastest precision and int8 against each other: fidelity against f32 on the generated
    corpus and on Debian's fortunes, and tokens/s at one thread and on every core, in rounds taking turns."""
    from multiprocessing import get_context

    from config import available_cpus
    from model_loading import load_exported_models
    models = {precision: load_exported_models(replace(settings, engine_precision=precision))
              for precision in ("f32", "auto", "int8")}
    names = {precision: loaded.precision for precision, loaded in models.items()}
    corpora = {"generated": (generated_texts(FIDELITY_CORPUS, seed=1), generated_texts(FIDELITY_QUERIES, seed=2)),
               "fortunes": fortune_corpus(models["f32"].text.tokenizer)}
    fidelity_rows: dict[str, dict] = {}
    for corpus, texts in corpora.items():
        if texts is None:
            fidelity_rows[corpus] = {"missing": f"apt-get install fortunes (nothing in {FORTUNE_FOLDER})"}
            continue
        encoded = {precision: tuple(unit_rows(np.stack(loaded.text.embed(part))) for part in texts)
                   for precision, loaded in models.items() if precision == "f32" or names[precision] != "f32"}
        fidelity_rows[corpus] = {names[precision]: retrieval_agreement(encoded["f32"], vectors)
                                 for precision, vectors in encoded.items() if precision != "f32"}
    speeds: dict[str, dict[int, list[float]]] = {}
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn"), max_tasks_per_child=1) as pool:
        for _ in range(rounds):
            for threads in sorted({1, available_cpus()}):
                for precision in dict.fromkeys(["f32", "auto", "int8"]):
                    if precision == "auto" and names["auto"] == "f32":
                        continue
                    speed = pool.submit(precision_speed, settings, precision, threads, runs).result()
                    speeds.setdefault(names[precision], {}).setdefault(threads, []).append(speed)
    return {"fidelity_against_f32": fidelity_rows,
            "tokens_per_s": {name: {threads: float(np.median(values)) for threads, values in by_threads.items()}
                             for name, by_threads in speeds.items()}}


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


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
    readiness: dict = field(default_factory=dict)  # what /health/ready said: engine and precision
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


def start_server(env_changes: dict[str, str], timeout: float = 120, tree: Path = HERE) -> ServerRun:
    """gunicorn serving the checkout in `tree` (this one, or another release to compare with) on loopback."""
    port = free_port()
    env = {**os.environ, "PORT": str(port), "VECTOR_EMBEDDER_API_KEY": API_KEY, **env_changes}
    command = [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "--bind", f"127.0.0.1:{port}",
               "main:create_app()"]
    started = time.monotonic()
    process = subprocess.Popen(command, cwd=tree, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server = ServerRun(f"http://127.0.0.1:{port}", process, None)
    threading.Thread(target=server.watch_memory, daemon=True).start()
    while time.monotonic() - started < timeout:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode} before it was ready")
        try:
            status, body = request(server.url, "GET", "/health/ready", None)
            if status == 200:
                server.ready_seconds = time.monotonic() - started
                server.readiness = json.loads(body)
                return server
        except OSError:
            pass
        time.sleep(0.02)
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


def batch_totals(url: str) -> dict[str, float]:
    """The service's own count of model batches and of the requests and windows they served (GET /metrics)."""
    status, body = request(url, "GET", "/metrics", None)
    wanted = ("embedder_batch_requests_count", "embedder_batch_requests_sum", "embedder_batch_windows_sum")
    totals = dict.fromkeys(wanted, 0.0)
    for line in body.decode().splitlines() if status == 200 else []:
        name, _, value = line.partition(" ")
        if name in totals:
            totals[name] = float(value)
    return totals


def per_batch(before: dict[str, float], after: dict[str, float]) -> dict[str, float | None]:
    """Mean requests and windows per model batch between two batch_totals (a batch of short queries is one
    forward pass)."""
    batches = after["embedder_batch_requests_count"] - before["embedder_batch_requests_count"]
    if batches <= 0:
        return {"batches": 0, "requests_per_batch": None, "windows_per_batch": None}
    return {"batches": int(batches),
            "requests_per_batch": (after["embedder_batch_requests_sum"] - before["embedder_batch_requests_sum"])
            / batches,
            "windows_per_batch": (after["embedder_batch_windows_sum"] - before["embedder_batch_windows_sum"])
            / batches}


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

    totals = batch_totals(url)
    started = time.monotonic()
    with ThreadPoolExecutor(scenario.clients) as pool:
        list(pool.map(client, range(scenario.clients)))
    wall = time.monotonic() - started
    return {**per_batch(totals, batch_totals(url)), "scenario": scenario.name, "clients": scenario.clients,
            "requests": len(latencies),
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
        Scenario("batch of 32 short", "/embeddings/batch", batches, 32 * query_tokens, 2)]


def lone_query(servers: dict[str, ServerRun], rounds: int) -> dict:
    """One short query at a time to each server, taking turns, so the machine's drift hits all alike."""
    query = short_queries(1)[0]
    timings: dict[str, list[float]] = {mode: [] for mode in servers}
    connections = {mode: connect(server.url) for mode, server in servers.items()}
    for _ in range(rounds):
        for mode, server in servers.items():
            # A pause before each turn lets the previous one's idle engine threads go to sleep.
            time.sleep(PAUSE_BETWEEN_TURNS)
            started = time.perf_counter()
            status, _ = request(server.url, "POST", "/embeddings", {"text": query}, connections[mode])
            if status == 200:
                timings[mode].append(time.perf_counter() - started)
    for connection in connections.values():
        connection.close()
    return {mode: 1000 * float(np.median(values)) for mode, values in timings.items()}


def http_runs(embedder, url: str | None, compare: str, duration: float, max_requests: int, extra_env: dict,
              rounds: int, before: Path | None = None) -> dict:
    """Every scenario against each server in turn, `rounds` times, so the servers compared meet the same
    conditions; each figure is the median of its rounds (the machine's drift moves single runs by 25%).

    With `before` (another checkout, of an earlier release), its server is compared with this one's, each
    with its own defaults and its own export of the model."""
    trees = {mode: HERE for mode in COMPARISONS[compare]}
    modes = COMPARISONS[compare]
    if before is not None:
        trees, modes = {"before": before, "now": HERE}, {"before": {"MODELS_DIR": str(before / "models")}, "now": {}}
        subprocess.run([sys.executable, "download_models.py", "--no-download"], cwd=before, check=True,
                       env={**os.environ, **extra_env, **modes["before"]}, stdout=subprocess.DEVNULL)
    if url:
        modes = {"external": None}
    servers: dict[str, ServerRun] = {}
    try:
        for mode, env in modes.items():
            servers[mode] = (ServerRun(url, None, None) if url else
                             start_server({**extra_env, **env}, tree=trees[mode]))
        lone = lone_query(servers, LONE_QUERY_ROUNDS)
        rows: dict[str, list[dict]] = {mode: [] for mode in servers}
        for scenario in scenarios(embedder):
            runs: dict[str, list[dict]] = {mode: [] for mode in servers}
            for _ in range(rounds):
                for mode, server in servers.items():
                    runs[mode].append(run_load(server.url, scenario, duration, max_requests))
            for mode in servers:
                rows[mode].append(median_row(runs[mode]))
    finally:
        for server in servers.values():
            server.stop()
    return {"lone_query_p50_ms": lone,
            "modes": {mode: {"ready_seconds": server.ready_seconds, "peak_pss_mb": server.peak_pss_mb or None,
                             "peak_rss_mb": server.peak_rss_mb or None, "rows": rows[mode],
                             "readiness": server.readiness}
                      for mode, server in servers.items()}}


def median_row(runs: list[dict]) -> dict:
    """The median of each figure over the rounds of one scenario; errors are added up."""
    row = dict(runs[0])
    for key in ("requests_per_s", "tokens_per_s", "p50_ms", "p95_ms", "p99_ms"):
        row[key] = float(np.median([run[key] for run in runs]))
    row["requests"], row["errors"], row["rounds"] = (sum(run["requests"] for run in runs),
                                                     sum(run["errors"] for run in runs), len(runs))
    row["requests_per_s_rounds"] = [round(run["requests_per_s"], 1) for run in runs]
    for key in ("requests_per_batch", "windows_per_batch"):
        values = [run[key] for run in runs if run.get(key) is not None]
        row[key] = float(np.median(values)) if values else None
    return row


# --- targets -------------------------------------------------------------------

def find(rows: list[dict], name: str, clients: int) -> dict:
    return next(row for row in rows if row["scenario"] == name and row["clients"] == clients)


def targets(report: dict) -> list[dict]:
    checks = []

    def check(name: str, measured: float | None, target: float, higher_is_better: bool = True) -> None:
        if measured is None:
            checks.append({"target": name, "measured": None, "bound": target, "met": None})
            return
        passed = measured >= target if higher_is_better else measured <= target
        checks.append({"target": name, "measured": round(measured, 6), "bound": target, "met": bool(passed)})

    modes = report["http"]["modes"]
    if set(modes) == {"before", "now"}:
        checks_before_and_now(modes, check)
    if "in_process" not in report:
        return checks
    local, flags = report["in_process"], report["machine"]["flags"]
    torch_rows, engine_rows = local["torch, 1 thread"]["rows"], local["openvino, 1 thread"]["rows"]
    for torch_row, engine_row in zip(torch_rows, engine_rows):
        check(f"in-process, 1 thread, {engine_row['tokens']} tokens: openvino / torch tokens/s",
              engine_row["tokens_per_s"] / torch_row["tokens_per_s"], 2.0)
    has_bf16 = flags["avx512_bf16"] or flags["amx_bf16"]
    check("in-process, 1 thread, 1000 tokens: openvino tokens/s (CPU with bf16 only)",
          engine_rows[-1]["tokens_per_s"] if has_bf16 else None, 7000.0)
    fidelity = report["fidelity"]
    check("probe set: min cosine against torch fp32", fidelity["probe_min_cosine"], 0.9999)
    checks_int8(report["precisions"], check)
    check(f"{fidelity['corpus']} generated texts: nearest neighbour equals torch's (share of "
          f"{fidelity['queries']} queries)", fidelity["nearest_neighbour_agreement"], 0.995)
    if set(modes) != {"torch", "openvino"}:
        return checks
    torch_http, engine_http = modes["torch"], modes["openvino"]
    lone = report["http"]["lone_query_p50_ms"]
    check("HTTP lone short query p50: openvino / torch", lone["openvino"] / lone["torch"], 0.5, higher_is_better=False)

    def ratio(name: str, clients: int, key: str) -> float:
        return find(engine_http["rows"], name, clients)[key] / find(torch_http["rows"], name, clients)[key]

    check("HTTP 16 short-query clients: openvino / torch req/s", ratio("short query", 16, "requests_per_s"), 2.0)
    check("HTTP 1000-token texts, 1 client: openvino / torch tokens/s", ratio("1000-token text", 1, "tokens_per_s"),
          2.5)
    check("HTTP 32-text batches, 2 clients: openvino / torch req/s", ratio("batch of 32 short", 2, "requests_per_s"),
          2.0)
    check("peak RSS MB of all openvino serving processes", engine_http["peak_rss_mb"], 400.0, higher_is_better=False)
    check("ready (from process start): openvino / torch", engine_http["ready_seconds"] / torch_http["ready_seconds"],
          0.3, higher_is_better=False)
    return checks


def checks_int8(precisions: dict, check) -> None:
    """int8 weights (issue 16): as fast as asked against f32 and bf16, and keeping retrieval, on every corpus."""
    speed = precisions["tokens_per_s"]
    if "int8" not in speed:
        return
    for baseline, bound in (("f32", 2.5), ("bf16", 1.4)):
        ratio = speed["int8"][1] / speed[baseline][1] if baseline in speed else None
        check(f"in-process, 1 thread, {PRECISION_WINDOWS}x{PRECISION_WINDOW_TOKENS} tokens: int8 / {baseline} "
              f"tokens/s{'' if ratio is not None else ' (CPU without bf16)'}", ratio, bound)
    for corpus, rows in precisions["fidelity_against_f32"].items():
        if "int8" in rows:
            check(f"{corpus}: int8 min cosine against f32", rows["int8"]["min_cosine"], 0.995)
            check(f"{corpus}: int8 nearest neighbour equals f32's", rows["int8"]["nearest_neighbour_agreement"], 0.97)
            check(f"{corpus}: int8 top-10 overlap with f32's", rows["int8"]["top10_overlap"], 0.97)


def checks_before_and_now(modes: dict, check) -> None:
    """Continuous batching (issue 16) against the release before it: short queries at 1, 4 and 16 clients."""
    def ratio(clients: int) -> float:
        return (find(modes["now"]["rows"], "short query", clients)["requests_per_s"]
                / find(modes["before"]["rows"], "short query", clients)["requests_per_s"])

    check("HTTP 4 short-query clients: now / before req/s", ratio(4), 1.5)
    check("HTTP 16 short-query clients: now / before req/s", ratio(16), 1.05)
    # "Not slower": within the run-to-run noise of one client's figure (about 5% here).
    check("HTTP 1 short-query client: now / before req/s", ratio(1), 0.95)


# --- output --------------------------------------------------------------------

def print_in_process(report: dict) -> None:
    print("\nIn-process, one text per call (median of the runs, then of the rounds)")
    print(f"{'engine':<22} {'precision':>9} {'tokens':>7} {'windows':>7} {'tokens/s':>9} {'median ms':>9} {'p95 ms':>7}"
          f"  tokens/s of each round")
    for name, result in report["in_process"].items():
        for row in result["rows"]:
            print(f"{name:<22} {result['precision']:>9} {row['tokens']:>7} {row['windows']:>7} "
                  f"{row['tokens_per_s']:>9.0f} {row['median_ms']:>9.1f} {row['p95_ms']:>7.1f}  "
                  f"{row.get('tokens_per_s_rounds', '')}")
    fidelity = report["fidelity"]
    print(f"\nFidelity ({fidelity['precision']} against torch fp32): probe set min cosine "
          f"{fidelity['probe_min_cosine']:.6f}; {fidelity['corpus']} generated texts min cosine "
          f"{fidelity['corpus_min_cosine']:.6f}, median {fidelity['corpus_median_cosine']:.6f}; nearest neighbour "
          f"of {fidelity['queries']} queries equal to torch's: "
          + ", ".join(f"{100 * share:.1f}% at {precision}"
                      for precision, share in fidelity["agreement_by_precision"].items()))


def print_precisions(report: dict) -> None:
    result = report["precisions"]
    print(f"\nPrecisions against f32, in-process ({PRECISION_WINDOWS} windows of {PRECISION_WINDOW_TOKENS} tokens)")
    for corpus, rows in result["fidelity_against_f32"].items():
        if "missing" in rows:
            print(f"  {corpus}: skipped, {rows['missing']}")
        for name, row in rows.items() if "missing" not in rows else []:
            print(f"  {corpus:<9} {name:<5} min cosine {row['min_cosine']:.5f}, median {row['median_cosine']:.6f}, "
                  f"nearest neighbour equal {100 * row['nearest_neighbour_agreement']:.1f}%, top-10 overlap "
                  f"{100 * row['top10_overlap']:.1f}%")
    for name, by_threads in result["tokens_per_s"].items():
        speeds = [f"{speed:.0f} on {threads} thread{'s' if threads > 1 else ''}"
                  for threads, speed in sorted(by_threads.items())]
        print(f"  {name:<5} tokens/s: " + ", ".join(speeds))


def print_report(report: dict) -> None:
    info = report["machine"]
    print(f"Machine: {info['cpu']}, {info['cpus']} CPUs; flags: {flags_text(info['flags'])}")
    print(f"Versions: python {info['python']}, openvino {info['openvino']}, torch {info['torch']}, "
          f"transformers {info['transformers']}, sentence-transformers {info['sentence-transformers']}; "
          f"model {report['model']}")
    if "in_process" in report:
        print_in_process(report)
        print_precisions(report)
    lone = report["http"]["lone_query_p50_ms"]
    print("\nOne short query alone over HTTP, p50 over " + str(LONE_QUERY_ROUNDS) + " rounds taking turns: "
          + ", ".join(f"{mode} {ms:.1f} ms" for mode, ms in lone.items()))
    for mode, result in report["http"]["modes"].items():
        ready = f"{result['ready_seconds']:.2f} s" if result["ready_seconds"] else "n/a"
        memory = (f"RSS {result['peak_rss_mb']:.0f} MB, PSS {result['peak_pss_mb']:.0f} MB"
                  if result["peak_pss_mb"] else "n/a")
        serving = result.get("readiness") or {}
        print(f"\nHTTP, {mode}: {serving.get('engine', '?')} {serving.get('precision', '?')} "
              f"(ready in {ready} from process start; peak memory of all serving processes {memory})")
        print(f"{'scenario':<18} {'clients':>7} {'req/s':>7} {'tokens/s':>9} {'p50 ms':>7} {'p95 ms':>7} "
              f"{'p99 ms':>7} {'errors':>6} {'req/batch':>9} {'win/batch':>9}  req/s of each round")
        for row in result["rows"]:
            print(f"{row['scenario']:<18} {row['clients']:>7} {row['requests_per_s']:>7.1f} "
                  f"{row['tokens_per_s']:>9.0f} {row['p50_ms']:>7.1f} {row['p95_ms']:>7.1f} {row['p99_ms']:>7.1f} "
                  f"{row['errors']:>6} {number(row.get('requests_per_batch')):>9} "
                  f"{number(row.get('windows_per_batch')):>9}  {row.get('requests_per_s_rounds', '')}")
    print(f"\nTargets (ratios from this run; CPU flags: {flags_text(info['flags'])})")
    for check in report["targets"]:
        verdict = {True: "MET ", False: "MISS", None: "n/a "}[check["met"]]
        print(f"  {verdict} {check['target']}: {check['measured']} (bound {check['bound']})")


def number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


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
    machine = report['machine']
    figure.suptitle(f"{report['model']} on {machine['cpu']} ({machine['cpus']} CPUs; {flags_text(machine['flags'])})")
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="benchmark a running server instead of starting one (key: $BENCHMARK_API_KEY)")
    parser.add_argument("--compare", choices=sorted(COMPARISONS), default="engines",
                        help="the servers to start and compare (default: engines, torch against openvino)")
    parser.add_argument("--duration", type=float, default=4.0, help="seconds per HTTP scenario and round (default 4)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="times each HTTP scenario runs on each server, taking turns; medians are reported")
    parser.add_argument("--max-requests", type=int, default=5000, help="requests per HTTP scenario at most")
    parser.add_argument("--runs", type=int, default=10, help="timed in-process runs per text and round (default 10)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON after the table")
    parser.add_argument("--plot", metavar="PNG", help="draw throughput and latency against concurrency")
    parser.add_argument("--server-env", action="append", default=[], metavar="NAME=VALUE",
                        help="extra environment for the servers this script starts (repeatable)")
    parser.add_argument("--before", metavar="DIR", type=Path,
                        help="compare over HTTP with the service in another checkout, of an earlier release "
                             "(git worktree add DIR <commit>), each with its own defaults")
    parser.add_argument("--http-only", action="store_true", help="skip the in-process and fidelity measurements")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from config import load_settings
    from download_models import prepare_models
    extra_env = dict(item.split("=", 1) for item in args.server_env)
    # The servers and the in-process runs use the same baked and exported model as `make run`.
    extra_env.setdefault("MODELS_DIR", os.environ.get("MODELS_DIR", str(HERE / "models")))
    settings = load_settings({**os.environ, **extra_env})
    prepare_models(replace(settings, engine="auto"), allow_download=False)

    report = {"model": settings.embedding_model, "machine": machine_info(),
              "settings": {key: value for key, value in asdict(settings).items() if key != "api_keys"}}
    if not args.http_only:
        prepare_models(replace(settings, engine="auto", engine_precision="int8"), allow_download=False)
        report["in_process"] = in_process(settings, args.runs, args.rounds)
        report["fidelity"] = fidelity(settings)
        report["precisions"] = precisions(settings, args.runs, args.rounds)
    from model_loading import load_exported_models
    embedder = load_exported_models(settings).text
    report["http"] = http_runs(embedder, args.url, args.compare, args.duration, args.max_requests, extra_env,
                               args.rounds, args.before)
    report["targets"] = targets(report)
    print_report(report)
    if args.json:
        print(json.dumps(report, indent=2))
    if args.plot:
        plot(report, args.plot)
        print(f"\nplot written to {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
