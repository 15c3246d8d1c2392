"""Any sentence-transformers model, served right: one small random-weight model per family the service claims.

Each family (tiny_models.py, and the tiny CLIP of tiny_clip.py) is built, baked and exported as `make run`
does, proven by the start-up self-check, served over HTTP, and its vectors compared with the model's own
`SentenceTransformer(folder).encode()`, not with the service's own path. The weights are drawn wide enough
that different texts get clearly different vectors, so the comparisons cannot pass by accident.
"""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from sentence_transformers import SentenceTransformer

import download_models
from config import Settings
from main import create_app
from manifest import PROBE_TEXTS, Manifest
from model_loading import LoadedModels, load_models
from model_locator import baked_model_dir, exported_model_dir
from self_check import cosine_rows
from testkit import (AUTH, TEST_API_KEY, LiveServer, bake_and_export, existing, service_around_model, sharing,
                     start_live_server)
from tiny_models import FAMILIES, write_bert_cls_normalize

# Within one window, the served vector is the model's own: to the last digits in f32, as the self-check in bf16.
F32_MIN_COSINE = 0.99999
BF16_MIN_COSINE = 0.9999
SHORT_TEXTS = [PROBE_TEXTS[name] for name in ("short", "query", "sentence", "german", "chinese", "emoji", "code")]


@dataclass
class ServedFamily:
    name: str
    settings: Settings
    models: LoadedModels
    reference: SentenceTransformer
    live: LiveServer

    @property
    def min_cosine(self) -> float:
        return F32_MIN_COSINE if self.models.precision == "f32" else BF16_MIN_COSINE

    def text_of_about(self, tokens: int) -> str:
        """Words of the long probe, as many as fit in `tokens` tokens and in one window of this model."""
        words = PROBE_TEXTS["long"].split()
        limit = min(tokens, self.models.text.window_size - 32)
        while True:
            [tokenized] = self.models.text.tokenize([" ".join(words)])
            if len(tokenized.windows) == 1 and tokenized.token_count <= limit:
                return " ".join(words)
            words = words[:len(words) * 9 // 10]


@pytest.fixture(scope="module", params=[*FAMILIES, "clip"])
def family(request, tmp_path_factory, models_dir) -> ServedFamily:
    if request.param == "clip":  # the session's tiny CLIP, built and exported the same way
        settings, models = request.getfixturevalue("tiny_clip_settings"), request.getfixturevalue("tiny_clip_models")
        folder = Path(settings.embedding_model)
    else:
        folder = FAMILIES[request.param](tmp_path_factory.mktemp(request.param) / request.param)
        settings = Settings(api_keys=(TEST_API_KEY,), embedding_model=str(folder), models_dir=str(models_dir))
        bake_and_export(settings)  # exported and proven by the self-check, as `make run` does
        models = load_models(settings)
    live = start_live_server(create_app(settings, sharing(models)))
    yield ServedFamily(request.param, settings, models, SentenceTransformer(str(folder), device="cpu"), live)
    live.stop()
    live.service.stop()


def served(family: ServedFamily, texts: list[str], prompt_name: str | None = None) -> np.ndarray:
    body = {"texts": texts} if prompt_name is None else {"texts": texts, "prompt_name": prompt_name}
    answer = requests.post(family.live.url + "/embeddings/batch", json=body, headers=AUTH, timeout=120)
    assert answer.status_code == 200, answer.text
    return np.array([wrapped[0] for wrapped in answer.json()["embeddings"]], dtype=np.float64)


def assert_like_encode(family: ServedFamily, vectors: np.ndarray, expected: np.ndarray) -> None:
    expected = np.asarray(expected, dtype=np.float64)
    assert np.isfinite(vectors).all()
    cosines = cosine_rows(vectors, expected)
    assert cosines.min() >= family.min_cosine, f"{family.name}: cosines {cosines}"
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), np.linalg.norm(expected, axis=1), rtol=1e-3)


def test_the_family_is_exported_proven_and_spreads_texts_apart(family):
    manifest = Manifest.read(exported_model_dir(family.settings.models_dir, family.settings.embedding_model,
                                                "openvino"))
    assert family.models.self_check and "min cosine" in family.models.self_check
    # The medium probe is the long one's first words: those two may well be alike.
    probes = np.array([probe.vector for probe in manifest.probe_texts
                       if probe.prompt_name is None and probe.name != "medium"])
    pairwise = cosine_rows(np.repeat(probes, len(probes), axis=0), np.tile(probes, (len(probes), 1)))
    off_diagonal = pairwise.reshape(len(probes), len(probes))[~np.eye(len(probes), dtype=bool)]
    assert off_diagonal.max() < 0.99, "random weights must not map every text to one vector"


def test_short_texts_are_served_as_the_model_encodes_them(family):
    assert_like_encode(family, served(family, SHORT_TEXTS), family.reference.encode(SHORT_TEXTS))


def test_short_and_long_texts_sent_at_once_are_each_the_models_own(family):
    # Sent concurrently, they share forward passes: short rows padded by far more than 64 tokens.
    texts = SHORT_TEXTS + [family.text_of_about(300), family.text_of_about(120)]
    barrier = threading.Barrier(len(texts))

    def one(text: str) -> np.ndarray:
        barrier.wait(60)
        return served(family, [text])[0]

    with ThreadPoolExecutor(len(texts)) as pool:
        vectors = np.array(list(pool.map(one, texts)))
    assert_like_encode(family, vectors, family.reference.encode(texts))


def test_every_prompt_is_read_as_encode_reads_it(family):
    prompts = {name: text for name, text in family.reference.prompts.items() if text}
    if not prompts:
        pytest.skip(f"{family.name} has no prompts")
    texts = SHORT_TEXTS[:4]
    for name in prompts:
        assert_like_encode(family, served(family, texts, name), family.reference.encode(texts, prompt_name=name))
    # No prompt named: the model's default, as encode() applies it.
    assert_like_encode(family, served(family, texts), family.reference.encode(texts))


def only(family: ServedFamily, name: str) -> None:
    if family.name != name:
        pytest.skip(f"checked on the {name} family")


def test_a_prompt_the_model_does_not_have_is_400_naming_its_prompts(family):
    only(family, "prompted")
    for path, body in [("/embeddings", {"text": "hi", "prompt_name": "nope"}),
                       ("/embeddings/batch", {"texts": ["hi"], "prompt_name": "nope"}),
                       ("/v1/embeddings", {"model": family.live.service.settings.embedding_model, "input": "hi",
                                           "prompt_name": "nope"})]:
        answer = requests.post(family.live.url + path, json=body, headers=AUTH, timeout=60)
        assert answer.status_code == 400, answer.text
        assert ("prompt_name 'nope' is not a prompt of this model: its prompts are 'document', 'passage', 'query'"
                in answer.text)
    with_ids = requests.post(family.live.url + "/v1/embeddings", headers=AUTH, timeout=60, json={
        "model": family.live.service.settings.embedding_model, "input": [101, 102], "prompt_name": "query"})
    assert with_ids.status_code == 400 and "cannot apply to token ids" in with_ids.json()["error"]["message"]
    assert with_ids.json()["error"]["param"] == "prompt_name"


def test_the_prompts_tokens_count_in_the_limits_and_usage(family, tmp_path):
    only(family, "prompted")
    text = family.text_of_about(40)
    plain = len(family.models.text.tokenizer.token_ids([text])[0])
    live = start_live_server(create_app(replace(family.settings, max_tokens_per_text=plain), sharing(family.models)))
    try:
        refused = requests.post(live.url + "/embeddings", json={"text": text}, headers=AUTH, timeout=60)
        # "query: " is the default prompt: two tokens ("query", ":") of the text's window are the prompt's.
        assert refused.status_code == 413, refused.text
        assert refused.json()["error"] == (f"text has {plain + 2} tokens with the prompt 'query' (2 of them); the "
                                           f"limit is {plain} (MAX_TOKENS_PER_TEXT)")
        usage = requests.post(live.url + "/v1/embeddings", headers=AUTH, timeout=60, json={
            "model": family.settings.embedding_model, "input": "hello world"}).json()["usage"]
        assert usage["prompt_tokens"] == len(family.models.text.tokenizer.token_ids(["query: hello world"])[0]) + 2
    finally:
        live.stop()
        live.service.stop()


def test_models_and_readiness_list_the_prompts(family):
    only(family, "prompted")
    models = requests.get(family.live.url + "/v1/models", headers=AUTH, timeout=10).json()["data"][0]
    assert models["prompts"] == {"query": "query: ", "passage": "passage: ", "document": ""}
    assert models["default_prompt_name"] == "query"
    ready = requests.get(family.live.url + "/health/ready", timeout=10).json()
    assert (ready["prompts"], ready["default_prompt_name"]) == (["document", "passage", "query"], "query")


def test_a_long_text_reads_the_prompt_in_every_window(family):
    only(family, "prompted")
    text = " ".join([PROBE_TEXTS["long"]] * 2)
    [tokenized] = family.models.text.tokenize([text], "passage")
    assert len(tokenized.windows) > 1 and tokenized.prompt_length == 2
    prompt_ids = family.models.text.tokenizer.token_ids(["passage:"])[0]
    assert all(window[:2] == prompt_ids for window in tokenized.windows)
    # Each window is what encode() reads for the prompt and that window's words: the average is theirs.
    served_vector = served(family, [text], "passage")[0]
    assert np.isfinite(served_vector).all() and np.linalg.norm(served_vector) == pytest.approx(1, abs=1e-5)


# --- full context -------------------------------------------------------------------

def text_of_tokens(text_embedder, tokens: int) -> str:
    """Repeated probe prose, as many words as fit in `tokens` tokens of this model's tokenizer."""
    words = PROBE_TEXTS["long"].split() * 40
    fits, too_many = 0, len(words)
    while too_many - fits > 1:  # bisect the number of words
        middle = (fits + too_many) // 2
        if len(text_embedder.tokenizer.token_ids([" ".join(words[:middle])])[0]) <= tokens:
            fits = middle
        else:
            too_many = middle
    return " ".join(words[:fits])


def test_an_8000_token_text_is_one_window_of_a_long_context_model(family):
    only(family, "modernbert")
    settings = replace(family.settings, max_window_tokens=8192)
    models = load_models(settings)
    assert (family.models.text.max_seq_length, models.text.max_seq_length) == (Settings().max_window_tokens, 8192)
    text = text_of_tokens(models.text, 8000)
    [tokenized] = models.text.tokenize([text])
    assert len(tokenized.windows) == 1 and 7990 <= tokenized.token_count <= 8000
    live = start_live_server(create_app(settings, sharing(models)))
    try:
        answer = requests.post(live.url + "/embeddings", json={"text": text}, headers=AUTH, timeout=300)
        listed = requests.get(live.url + "/v1/models", headers=AUTH, timeout=10).json()["data"][0]
    finally:
        live.stop()
        live.service.stop()
    assert answer.status_code == 200, answer.text
    # One pass over all 8,000 tokens, local and global attention layers alike: the model's own vector.
    assert cosine_rows(np.array(answer.json()["embeddings"], dtype=np.float64), family.reference.encode([text]))[0] \
        >= 0.9999
    assert listed["max_sequence_length"] == 8192
    # By default the window is capped (MAX_WINDOW_TOKENS), and the cap is what /v1/models reports.
    default = requests.get(family.live.url + "/v1/models", headers=AUTH, timeout=10).json()["data"][0]
    assert default["max_sequence_length"] == Settings().max_window_tokens < 8192


# --- exports that follow their source ---------------------------------------------------

def retrain_in_place(folder: Path, seed: int) -> None:
    """New weights of the same shapes, saved over the old ones: every file keeps its name and size."""
    model = SentenceTransformer(str(folder), device="cpu")
    sizes = {path: path.stat().st_size for path in folder.rglob("*") if path.is_file()}
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.2)
    model.save(str(folder))
    assert {path: path.stat().st_size for path in folder.rglob("*") if path.is_file()} == sizes


def test_a_model_retrained_in_place_is_exported_again_by_make_run(tmp_path, monkeypatch, capsys):
    folder = write_bert_cls_normalize(tmp_path / "my-model")
    monkeypatch.setenv("EMBEDDING_MODEL", str(folder))
    monkeypatch.setenv("MODELS_DIR", str(tmp_path / "models"))
    settings = Settings(embedding_model=str(folder), models_dir=str(tmp_path / "models"))
    texts = SHORT_TEXTS[:3]
    assert download_models.main(["--no-download"]) == 0  # what `make run` does first
    before = np.array(load_models(settings).text.embed(texts))
    retrain_in_place(folder, seed=7)
    capsys.readouterr()

    assert download_models.main(["--no-download"]) == 0

    output = capsys.readouterr().out
    assert "changed since it was baked" in output and "model.safetensors" in output and "exporting" in output
    after = np.array(load_models(settings).text.embed(texts))
    expected = SentenceTransformer(str(folder), device="cpu").encode(texts)
    assert cosine_rows(after, expected).min() >= F32_MIN_COSINE
    assert cosine_rows(before, expected).max() < 0.99  # the old export's vectors were really different
    # transformers saves weights readable by their owner only; the image's unprivileged user must read the bake.
    assert (folder / "model.safetensors").stat().st_mode & 0o004 == 0
    baked = baked_model_dir(tmp_path / "models", str(folder))
    assert all(path.stat().st_mode & 0o004 for path in baked.rglob("*") if path.is_file())


# --- no vector that is not finite leaves the service ----------------------------------------

def test_a_vector_that_is_not_finite_is_never_answered(test_settings, text_embedder):
    def nan_for_the_word_broken(windows):
        vectors = text_embedder.encode_windows(windows)
        broken = text_embedder.tokenizer.token_ids(["broken"])[0][0]
        vectors[[broken in window for window in windows]] = np.nan
        return vectors

    with service_around_model(test_settings, text_embedder, nan_for_the_word_broken) as service:
        live = start_live_server(create_app(test_settings, existing(service)))
        try:
            refused = requests.post(live.url + "/embeddings/batch", json={"texts": ["fine", "broken"]},
                                    headers=AUTH, timeout=60)
            fine = requests.post(live.url + "/embeddings", json={"text": "fine"}, headers=AUTH, timeout=60)
            ready = requests.get(live.url + "/health/ready", timeout=10)
        finally:
            live.stop()
    assert refused.status_code == 500 and "not finite numbers" in refused.json()["error"]
    assert "nan" not in refused.text.lower()
    assert fine.status_code == 200 and np.isfinite(fine.json()["embeddings"][0]).all()
    assert ready.status_code == 200 and ready.json()["non_finite_requests"] == 1
