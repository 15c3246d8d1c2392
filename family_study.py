"""Measure how the production export path serves each model family of tiny_models.py (and tiny_clip.py).

`python family_study.py [family ...]` prints one JSON line per family: the tiny
model built, baked and exported as the build does (download_models.prepare_models),
its export loaded at f32 and at the default precision with its self-check, and the
served vectors compared with the sentence-transformers model's own `encode()` on
the same folder: texts of one window, a mixed batch of short texts and a long one
in one forward pass (padding far past 64 tokens), and the same mix sent by
concurrent clients through the service's batcher. An export that fails its
self-check is also opened without it, to see what it would serve.
`--attention sdpa` traces with another attention implementation than the exporter's.

Other measurements:
  --timing                      build, bake and export every family, timed (wall and CPU seconds)
  --long-window                 one window of 2,048 / 4,096 / 8,000 tokens on a 6-layer, 384-wide ModernBERT
                                (f32), each in a fresh process: seconds and peak memory; and a 3,000-token
                                window against encode()
  --attention-speed MODEL       MODEL traced with sdpa and with eager: graph ops and serving speed in turns
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
import traceback
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402

from config import Settings  # noqa: E402
from download_models import prepare_models  # noqa: E402
from embeddings import LONGEST_WINDOW  # noqa: E402
from manifest import LONG_PROBE, PROBE_TEXTS, Manifest, vectors_of  # noqa: E402
from model_loading import LoadedModels, open_export  # noqa: E402
from model_locator import exported_model_dir  # noqa: E402
from self_check import cosine_rows, self_check  # noqa: E402

SHORT_TEXTS = [text for name, text in PROBE_TEXTS.items() if name != "long"]
LONG_TOKENS = 300  # one window on every family (the smallest window is MPNet's 384), padding far past 64
MIXED_SHORT = 4  # short texts beside the long one: 5 x 300 padded tokens fit one pass of BATCH_MAX_TOKENS
CONCURRENT_CLIENTS = 8


def long_text(tokenizer, tokens: int, source: str = LONG_PROBE) -> str:
    """The start of `source`, cut to at most `tokens` content tokens of this tokenizer."""
    words = source.split()
    low, high = 1, len(words)
    while low < high:  # the most words whose tokens stay within `tokens`
        middle = (low + high + 1) // 2
        if len(tokenizer(" ".join(words[:middle]), add_special_tokens=False)["input_ids"]) <= tokens:
            low = middle
        else:
            high = middle - 1
    return " ".join(words[:low])


def min_cosine(actual, expected) -> float:
    return float(cosine_rows(np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64)).min())


def max_pairwise_cosine(vectors: np.ndarray) -> float:
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    cosines = unit @ unit.T
    np.fill_diagonal(cosines, -1)
    return float(cosines.max())


class RecordingEncoder:
    """An engine whose forward passes are recorded: the most padding any row of any pass got."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.most_padding = 0

    def encode_text(self, input_ids, attention_mask):
        self.most_padding = max(self.most_padding, int((attention_mask.shape[1] - attention_mask.sum(1)).max()))
        return self.engine.encode_text(input_ids, attention_mask)


def served_at(folder: Path, manifest: Manifest, precision: str, settings: Settings) -> tuple[LoadedModels, str]:
    models = open_export(folder, manifest, precision, settings)
    result = self_check(models.text, models.images, manifest, folder)
    summary = ("pass" if result.passed else "FAIL") + f" {models.precision} min {result.text_min_cosine:.6f}"
    if not result.passed:
        summary += f" ({len(result.failures)} failures: {result.failures[0]})"
    return models, summary


def concurrent_vectors(models: LoadedModels, settings: Settings, texts: list[str]) -> tuple[list, int]:
    """Each text sent by its own client thread at once through the service's batcher: vectors, largest batch."""
    from service import EmbeddingService

    service = EmbeddingService(replace(settings, batch_wait_ms=50), lambda _: models)
    batches = []
    service.observe_batches(batches.append)
    service.start_loading()
    assert service.wait_until_loaded(60)
    vectors: list = [None] * len(texts)
    start = threading.Barrier(len(texts))

    def client(index: int) -> None:
        start.wait()
        vectors[index] = service.embed_texts([texts[index]]).vectors[0]

    threads = [threading.Thread(target=client, args=(index,)) for index in range(len(texts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    service.stop()
    return vectors, max(getattr(stats, "windows", 0) for stats in batches) if batches else 0


def study(name: str, write, root: Path, precisions: tuple[str, ...]) -> dict:
    from sentence_transformers import SentenceTransformer

    row: dict = {"family": name}
    folder = root / name
    started, cpu = time.perf_counter(), time.process_time()
    write(folder)
    row["build_s"] = [round(time.perf_counter() - started, 2), round(time.process_time() - cpu, 2)]
    reference = SentenceTransformer(str(folder), device="cpu")
    row["st_max_seq_length"] = reference.max_seq_length
    row["attn_implementation"] = getattr(reference[0].model.config, "_attn_implementation", None) \
        if hasattr(reference[0], "model") else None
    settings = Settings(embedding_model=str(folder), models_dir=str(root / "models"), engine_threads=2)
    started, cpu = time.perf_counter(), time.process_time()
    try:
        prepare_models(settings, allow_download=False)
        row["export"] = "ok"
    except Exception as error:
        row["export"] = f"FAIL {type(error).__name__}: {str(error)[:300]}"
    # Wall and CPU seconds: the machine is shared, so the CPU time is the steadier figure.
    row["bake_export_s"] = [round(time.perf_counter() - started, 2), round(time.process_time() - cpu, 2)]
    exported = exported_model_dir(settings.models_dir, str(folder), "openvino")
    if not (exported / "manifest.json").is_file():
        # The build removes an export that fails its check: make one to see what it would serve.
        from model_export import export_model
        exported.mkdir(parents=True)
        try:
            export_model(settings, root / "models" / Path(exported.name.removesuffix(".openvino")), exported)
        except Exception as error:
            row["raw_export"] = f"FAIL {type(error).__name__}: {str(error)[:300]}"
            return row
    manifest = Manifest.read(exported)
    row["probe_max_pairwise_cosine"] = round(max_pairwise_cosine(vectors_of(manifest.probe_texts)), 4)
    row["pooling"] = manifest.pooling
    tokenizer = reference.tokenizer
    # Texts of one window each, so that encode() (which truncates) and the service (which chunks) agree.
    window = min(reference.max_seq_length, LONGEST_WINDOW)
    frame = len(tokenizer("probe")["input_ids"]) - len(tokenizer("probe", add_special_tokens=False)["input_ids"])
    short_texts = [text for text in SHORT_TEXTS
                   if len(tokenizer(text, add_special_tokens=False)["input_ids"]) + frame <= window]
    row["short_texts"] = len(short_texts)
    long = long_text(tokenizer, min(LONG_TOKENS, window - frame))
    mixed = short_texts[:MIXED_SHORT] + [long]
    expected_short = reference.encode(short_texts)
    expected_mixed = reference.encode(mixed)
    alone = np.stack([reference.encode([text])[0] for text in mixed])
    row["encode_batched_vs_alone"] = min_cosine(expected_mixed, alone)
    for precision in precisions:
        models, summary = served_at(exported, manifest, precision, settings)
        row[f"self_check_{precision}"] = summary
        recorder = RecordingEncoder(models.text.encoder)
        models.text.encoder = recorder
        served_short = np.asarray(models.text.embed(short_texts))
        served_mixed = np.asarray(models.text.embed(mixed))
        row[f"{precision}_short_min_cos"] = min_cosine(served_short, expected_short)
        row[f"{precision}_mixed_min_cos"] = min_cosine(served_mixed, expected_mixed)
        row[f"{precision}_most_padding"] = recorder.most_padding
        row[f"{precision}_nan"] = bool(np.isnan(served_short).any() or np.isnan(served_mixed).any())
        norm_ratio = np.linalg.norm(served_short, axis=1) / np.linalg.norm(expected_short, axis=1)
        row[f"{precision}_norm_ratio_error"] = float(np.abs(norm_ratio - 1).max())
        if precision == "f32":
            texts = short_texts[:CONCURRENT_CLIENTS - 2] + [long, long[: len(long) // 2]]
            vectors, largest = concurrent_vectors(models, settings, texts)
            expected = np.stack([reference.encode([text])[0] for text in texts])
            row["concurrent_min_cos"] = min_cosine(np.asarray(vectors), expected)
            row["concurrent_largest_batch"] = largest
            row["concurrent_most_padding"] = recorder.most_padding
            for prompt_name, prompt in reference.prompts.items():
                if prompt:
                    prompted = reference.encode(short_texts, prompt_name=prompt_name)
                    row[f"cos_vs_encode_prompt_{prompt_name}"] = min_cosine(served_short, prompted)
    row["service_window"] = models.text.max_seq_length
    row["frame"] = [models.text.prefix_ids, models.text.suffix_ids, models.text.tokenizer.pad_id]
    row["takes_token_types"] = getattr(models.text.encoder.engine, "_takes_token_types", None)
    row["padding_side"] = tokenizer.padding_side
    return row


def trace_with(attention: str) -> None:
    """Make the exporter trace every model with this attention implementation instead of its own choice."""
    import model_export

    model_export.TRACED_ATTENTION = attention


# --- one long window -------------------------------------------------------------------------------------

LONG_MODEL = dict(layers=6, hidden=384, heads=12, vocabulary_size=50368)  # ModernBERT's real vocabulary size
LONG_WINDOWS = (2048, 4096, 8000)
LONG_CHECK_TOKENS = 3000


def memory_mb(field: str = "VmRSS") -> float:
    """This process's resident memory now (VmRSS), or its peak (VmHWM), which unlike getrusage's
    ru_maxrss starts afresh at exec rather than carrying over the parent's peak."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def forward_once(export: Path, tokens: int, threads: int) -> dict:
    """One forward pass of a window of `tokens` tokens on the export, in this (fresh) process: time and memory.

    Only what a serving process loads is imported (OpenVINO, numpy, the tokenizer), no torch.
    """
    from openvino_engine import OpenVINOEngine
    from text_tokenizer import TextTokenizer

    manifest = Manifest.read(export)
    row = {"tokens": tokens, "threads": threads, "rss_imported_mb": round(memory_mb())}
    engine = OpenVINOEngine(export / manifest.text_model, None, "f32", threads)
    row["rss_compiled_mb"] = round(memory_mb())
    row["peak_rss_compiled_mb"] = round(memory_mb("VmHWM"))
    tokenizer = TextTokenizer.from_file(export / manifest.tokenizer["file"], manifest.tokenizer["pad_id"])
    content = tokenizer.token_ids([" ".join([LONG_PROBE] * (tokens // 100 + 1))])[0]
    content = content[:tokens - len(tokenizer.prefix_ids) - len(tokenizer.suffix_ids)]
    input_ids = np.asarray([tokenizer.prefix_ids + content + tokenizer.suffix_ids], dtype=np.int64)
    attention_mask = np.ones_like(input_ids)
    seconds = []
    for _ in range(2):
        started = time.perf_counter()
        vector = engine.encode_text(input_ids, attention_mask)
        seconds.append(round(time.perf_counter() - started, 2))
    row["seconds_first_second"] = seconds
    row["finite"] = bool(np.isfinite(vector).all())
    row["rss_after_mb"] = round(memory_mb())
    row["peak_rss_mb"] = round(memory_mb("VmHWM"))
    return row


def long_window_study(root: Path, windows: tuple[int, ...], threads: tuple[int, ...]) -> None:
    """Build and export the 6-layer, 384-wide ModernBERT, then time one long window in fresh processes."""
    import subprocess
    import sys

    import tiny_models

    folder = tiny_models.write_modernbert(root / "modernbert-6x384", **LONG_MODEL)
    from model_export import TRACED_ATTENTION, export_model

    # Exported without the build's self-check, which sdpa fails: one window without padding is still right.
    export = root / "export"
    export.mkdir()
    started = time.perf_counter()
    export_model(Settings(embedding_model=str(folder), models_dir=str(root)), folder, export)
    print(json.dumps({"attention": TRACED_ATTENTION, "export_s": round(time.perf_counter() - started, 1)}),
          flush=True)
    print(json.dumps(one_pass_against_encode(folder, export, LONG_CHECK_TOKENS)), flush=True)
    for tokens in windows:
        for count in threads:
            child = subprocess.run([sys.executable, __file__, "--forward", str(export), str(tokens), str(count)],
                                   capture_output=True, text=True)
            lines = [line for line in child.stdout.splitlines() if line.startswith("{")]
            print(lines[-1] if lines else json.dumps({"tokens": tokens, "threads": count,
                                                      "error": child.stderr[-800:]}), flush=True)


def one_pass_against_encode(folder: Path, export: Path, tokens: int) -> dict:
    """A text of `tokens` tokens in one window (the 512 cap lifted here only) against encode() at f32."""
    import embeddings
    from embeddings import TextEmbedder, TextModelShape
    from openvino_engine import OpenVINOEngine
    from sentence_transformers import SentenceTransformer
    from text_tokenizer import TextTokenizer

    reference = SentenceTransformer(str(folder), device="cpu")
    text = long_text(reference.tokenizer, tokens, (LONG_PROBE + " ") * 8)
    manifest = Manifest.read(export)
    embeddings.LONGEST_WINDOW = reference.max_seq_length  # the measurement's own hack, never the service's
    embedder = TextEmbedder(TextTokenizer.from_file(export / manifest.tokenizer["file"], manifest.tokenizer["pad_id"]),
                            OpenVINOEngine(export / manifest.text_model, None, "f32", 2),
                            TextModelShape(manifest.dimension, reference.max_seq_length, manifest.normalize),
                            max_batch_size=32, max_batch_tokens=2048)
    windows = embedder.tokenize([text])[0].chunks
    served = np.asarray(embedder.embed([text]))
    expected = reference.encode([text])
    return {"check_tokens": len(windows[0]), "windows": len(windows), "cos_vs_encode_f32": min_cosine(served, expected),
            "finite": bool(np.isfinite(served).all())}


# --- eager against sdpa, traced, for a model both trace correctly --------------------------------------

SPEED_SHAPES = ((32, 128), (8, 256), (1, 16))  # windows x tokens


def attention_speed_study(root: Path, model_name: str, rounds: int) -> None:
    """The same model exported twice, tracing sdpa and eager: graph ops, then forward passes taken in turns."""
    from collections import Counter

    import model_export
    import openvino as ov
    from model_locator import locate_model
    from openvino_engine import OpenVINOEngine

    source = Path(locate_model(model_name, root, allow_download=False).path)
    engines = {}
    for attention in ("sdpa", "eager"):
        trace_with(attention)
        target = root / attention
        target.mkdir(parents=True)
        model_export.export_model(Settings(embedding_model=str(source), models_dir=str(root)), source, target)
        graph = ov.Core().read_model(str(target / model_export.TEXT_MODEL_FILE))
        kinds = Counter(op.get_type_name() for op in graph.get_ops())
        print(json.dumps({"attention": attention, "ops": {kind: kinds[kind] for kind in
                          ("ScaledDotProductAttention", "Softmax", "MatMul", "Select")}}), flush=True)
        engines[attention] = OpenVINOEngine(target / model_export.TEXT_MODEL_FILE, None, "f32", 2)
    rng = np.random.default_rng(0)
    for windows, tokens in SPEED_SHAPES:
        input_ids = rng.integers(1000, 20000, (windows, tokens)).astype(np.int64)
        attention_mask = np.ones_like(input_ids)
        attention_mask[1::2, tokens // 2:] = 0  # half the rows padded to half their length
        times: dict[str, list[float]] = {name: [] for name in engines}
        outputs = {}
        for _ in range(rounds):
            for name, engine in engines.items():  # in turns, so that load from other work hits both alike
                started = time.perf_counter()
                outputs[name] = engine.encode_text(input_ids, attention_mask)
                times[name].append(time.perf_counter() - started)
        medians = {name: float(np.median(values[1:])) for name, values in times.items()}
        print(json.dumps({"shape": [windows, tokens], "median_s": medians,
                          "eager_over_sdpa": round(medians["eager"] / medians["sdpa"], 3),
                          "cos_eager_vs_sdpa": min_cosine(outputs["eager"], outputs["sdpa"])}), flush=True)


# --- what building and exporting every family costs ------------------------------------------------------

def timing_study(root: Path, names: list[str], writers: dict) -> None:
    """Build, bake and export each family as a test session would, one after the other in one process."""
    total_wall, total_cpu = time.perf_counter(), time.process_time()
    for name in names:
        folder = root / name
        started, cpu = time.perf_counter(), time.process_time()
        writers[name](folder)
        built = (round(time.perf_counter() - started, 2), round(time.process_time() - cpu, 2))
        started, cpu = time.perf_counter(), time.process_time()
        prepare_models(Settings(embedding_model=str(folder), models_dir=str(root / "models")), allow_download=False)
        exported = (round(time.perf_counter() - started, 2), round(time.process_time() - cpu, 2))
        print(json.dumps({"family": name, "build_wall_cpu_s": built, "bake_export_wall_cpu_s": exported}),
              flush=True)
    print(json.dumps({"all_wall_cpu_s": (round(time.perf_counter() - total_wall, 1),
                                         round(time.process_time() - total_cpu, 1))}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("families", nargs="*", help="families to study (default: all, and CLIP)")
    parser.add_argument("--precisions", default="f32,auto")
    parser.add_argument("--attention", help="trace with this attention implementation (eager, sdpa, ...) "
                                            "instead of the export's own choice")
    parser.add_argument("--long-window", action="store_true",
                        help="time one long window on a 6-layer, 384-wide ModernBERT instead of the family table")
    parser.add_argument("--windows", default=",".join(map(str, LONG_WINDOWS)))
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--forward", nargs=3, metavar=("EXPORT", "TOKENS", "THREADS"), help=argparse.SUPPRESS)
    parser.add_argument("--attention-speed", metavar="MODEL",
                        help="compare serving speed of MODEL traced with sdpa and with eager")
    parser.add_argument("--timing", action="store_true", help="only build, bake and export, timed")
    parser.add_argument("--torch-threads", type=int, help="torch's thread count (default: every core)")
    arguments = parser.parse_args()
    if arguments.torch_threads:
        import torch
        torch.set_num_threads(arguments.torch_threads)
    if arguments.attention_speed:
        attention_speed_study(Path(tempfile.mkdtemp(prefix="attention-speed-")), arguments.attention_speed, 15)
        return
    if arguments.forward:
        export, tokens, threads = arguments.forward
        print(json.dumps(forward_once(Path(export), int(tokens), int(threads))))
        return
    if arguments.attention:
        trace_with(arguments.attention)
    if arguments.long_window:
        long_window_study(Path(tempfile.mkdtemp(prefix="long-window-")),
                          tuple(int(value) for value in arguments.windows.split(",")),
                          tuple(int(value) for value in arguments.threads.split(",")))
        return
    import tiny_models
    from tiny_clip import write_tiny_clip

    writers = {**tiny_models.FAMILIES, "clip": write_tiny_clip}
    names = arguments.families or list(writers)
    root = Path(tempfile.mkdtemp(prefix="family-study-"))
    if arguments.timing:
        timing_study(root, names, writers)
        return
    for name in names:
        try:
            row = study(name, writers[name], root, tuple(arguments.precisions.split(",")))
        except Exception:
            row = {"family": name, "error": traceback.format_exc()[-1500:]}
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
