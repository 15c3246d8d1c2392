"""The embedding logic on the real all-MiniLM-L6-v2 model, on the default engine and on the torch fallback."""
from __future__ import annotations

import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from config import Settings
from embeddings import TextEmbedder, TextModelShape, all_windows, split_into_windows
from manifest import PROBE_TEXTS
from model_loading import load_models
from model_locator import ModelNotFoundError, baked_model_dir, locate_model
from testkit import SAME_ENGINE_MIN_COSINE, assert_same_vectors, cosine, run_python
from torch_engine import load_sentence_transformer, load_transformers_tokenizer, text_tokenizer_of

LONG_TEXT = " ".join(f"Sentence number {n} talks about rivers, mountains and the sea." for n in range(120))
# More than the probe set: scripts, accents, emoji with modifiers, control characters, odd spacing.
TOKENIZER_TEXTS = list(PROBE_TEXTS.values()) + [
    "Ünïcödé façade naïve coöperate", "Ελληνικά κείμενα", "한국어 문장입니다", "עברית מימין לשמאל",
    "ไทยภาษา", "👩‍👩‍👧‍👦 family, 👍🏽 thumbs", "tabs\tand\nnewlines  double  spaces", "NUL\x00in text",
    "URL https://example.com/a?b=c&d=e", "CamelCaseWordsAndSNAKE_case", "", "   ", "x" * 600,
]


@pytest.fixture(scope="session")
def torch_models(test_settings):
    """The bundled model on the torch fallback engine (ENGINE=torch), loaded as the service loads it."""
    return load_models(replace(test_settings, engine="torch", workers=2, engine_threads=1))


@pytest.fixture(params=["openvino", "torch"], scope="module")
def embedder(request, loaded_models, torch_models) -> TextEmbedder:
    """The text embedder of each engine: the exported model on OpenVINO, and the torch fallback."""
    models = loaded_models if request.param == "openvino" else torch_models
    assert models.engine == request.param
    return models.text


def test_similar_sentences_score_higher_than_unrelated(embedder):
    cat, kitten, finance = embedder.embed([
        "A cat is sleeping on the sofa.",
        "A kitten naps on the couch.",
        "The central bank raised interest rates again.",
    ])
    assert cosine(cat, kitten) > 0.5
    assert cosine(cat, kitten) > cosine(cat, finance) + 0.3


def test_short_texts_match_sentence_transformers_encode(embedder, reference_model):
    texts = ["hello world", "Embeddings turn text into vectors.", "ünïcödé and emoji 🚀"]
    assert_same_vectors(embedder.embed(texts), reference_model.encode(texts, convert_to_numpy=True))


def test_vectors_are_unit_length_with_model_dimension(embedder):
    vector = embedder.embed(["a short text"])[0]
    assert vector.shape == (384,) and vector.dtype == np.float32
    assert embedder.dimension == 384
    assert np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-3)


def test_batch_output_equals_single_output_in_order(embedder):
    texts = ["first text", LONG_TEXT, "third, a little longer than the first", "fourth"]
    together = embedder.embed(texts)
    for text, vector in zip(texts, together):
        alone = embedder.embed([text])[0]
        assert_same_vectors(vector, alone, SAME_ENGINE_MIN_COSINE)
        if embedder.encoder.precision == "f32":  # bf16's rounding depends on what else is in the pass
            np.testing.assert_allclose(vector, alone, atol=1e-5)


def test_the_fast_tokenizer_gives_transformers_ids(embedder, reference_model):
    """The serving tokenizer (the `tokenizers` library on tokenizer.json) against transformers' own."""
    ours = embedder.tokenizer.token_ids(TOKENIZER_TEXTS)
    theirs = reference_model.tokenizer(TOKENIZER_TEXTS, add_special_tokens=False, verbose=False)["input_ids"]
    assert ours == theirs
    assert embedder.vocabulary_size == len(reference_model.tokenizer)
    assert embedder.tokenizer.pad_id == reference_model.tokenizer.pad_token_id


def test_the_torch_engine_runs_on_its_share_of_the_cores(torch_models):
    # Two workers of one thread on 2 cores: more would fight over the cores. The count is per thread in
    # torch (OpenMP), so it is read in a fresh thread that runs a forward pass, as the model thread does.
    engine, seen = torch_models.text.encoder, []

    def forward_pass() -> None:
        engine.encode_text(np.array([[101, 7592, 102]]), np.ones((1, 3), dtype=np.int64))
        seen.append(torch.get_num_threads())

    thread = threading.Thread(target=forward_pass)
    thread.start()
    thread.join()
    assert seen == [1]


def test_split_into_windows_makes_consecutive_windows():
    ids = list(range(10))
    assert split_into_windows(ids, 4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert split_into_windows(ids, 10) == [ids]
    assert split_into_windows([], 4) == [[]]
    with pytest.raises(ValueError):
        split_into_windows(ids, 0)


def test_window_leaves_room_for_special_tokens(embedder):
    assert embedder.max_seq_length == 256
    assert embedder.prefix_ids == [101] and embedder.suffix_ids == [102]
    assert embedder.window_size == 254


def test_long_text_is_split_into_windows_of_its_own_tokens(embedder, reference_model):
    tokenized = embedder.tokenize([LONG_TEXT])[0]
    all_ids = reference_model.tokenizer(LONG_TEXT, add_special_tokens=False, verbose=False)["input_ids"]
    assert len(all_ids) > 1000
    assert [token for window in tokenized.windows for token in window] == all_ids
    assert all(len(window) == 254 for window in tokenized.windows[:-1])
    assert 0 < len(tokenized.windows[-1]) <= 254
    assert embedder.tokens_processed(tokenized) == len(all_ids) + 2 * len(tokenized.windows)


def encode_window_by_hand(model, window: list[int]) -> np.ndarray:
    """Mean-pool BERT's last hidden state over one window and normalise, without our code path."""
    input_ids = torch.tensor([[101] + window + [102]])
    with torch.inference_mode():
        hidden = model.transformers_model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids))
    vector = hidden.last_hidden_state[0].mean(dim=0).numpy()
    return vector / np.linalg.norm(vector)


def test_long_text_vector_is_token_weighted_average_of_window_vectors(embedder, reference_model):
    vector = embedder.embed([LONG_TEXT])[0]
    assert vector.shape == (384,)
    windows = embedder.tokenize([LONG_TEXT])[0].windows
    assert len(windows) >= 4
    by_hand = [encode_window_by_hand(reference_model, window) for window in windows]
    weights = np.array([len(window) for window in windows], dtype=np.float64)
    expected = (np.stack(by_hand) * weights[:, None]).sum(axis=0) / weights.sum()
    expected /= np.linalg.norm(expected)
    assert_same_vectors(vector, expected)
    # The weighting matters: the last window is shorter, so a plain mean differs.
    plain_mean = np.mean(by_hand, axis=0)
    assert not np.allclose(vector, plain_mean / np.linalg.norm(plain_mean), atol=1e-5)


class CountingEncoder:
    """An engine that counts the windows of each forward pass it is given, and runs it on the real engine."""

    def __init__(self, real) -> None:
        self.real = real
        self.calls: list[int] = []

    def encode_text(self, input_ids, attention_mask):
        self.calls.append(len(input_ids))
        return self.real.encode_text(input_ids, attention_mask)

    def __getattr__(self, name: str):
        return getattr(self.real, name)


def test_windows_are_encoded_in_calls_of_at_most_max_batch_size(embedder):
    # An embedder of its own, on the real engine: the shared one may still be serving another test's server.
    shape = TextModelShape(embedder.dimension, embedder.max_seq_length, embedder.normalizes)
    engine = CountingEncoder(embedder.encoder)
    embedder = TextEmbedder(embedder.tokenizer, engine, shape, max_batch_size=8, max_batch_tokens=4096)
    embedder.embed([LONG_TEXT, LONG_TEXT, "short"])
    windows = 2 * len(embedder.tokenize([LONG_TEXT])[0].windows) + 1
    assert sum(engine.calls) == windows
    assert max(engine.calls) <= embedder.max_batch_size
    assert len(engine.calls) == -(-windows // embedder.max_batch_size)


def test_token_ids_input_equals_text_input(embedder):
    ids = embedder.tokenizer.token_ids(["token ids in, vector out"])[0]
    tokenized = embedder.tokenized_from_ids([ids])
    from_ids = embedder.combine_all(tokenized, embedder.encode_windows(all_windows(tokenized)))[0]
    assert_same_vectors(from_ids, embedder.embed(["token ids in, vector out"])[0], SAME_ENGINE_MIN_COSINE)


def test_tokenizer_model_setting_loads_that_tokenizer(reference_model):
    settings = Settings(tokenizer_model="sentence-transformers/all-MiniLM-L6-v2")
    tokenizer = load_transformers_tokenizer(settings, reference_model)
    assert tokenizer is not reference_model.tokenizer
    assert text_tokenizer_of(tokenizer).token_ids(["hello"]) == [[7592]]


SERVE_ONE_REQUEST = """
import json, sys
from config import Settings
from main import create_app
from testkit import wait_for_loading
app = create_app(Settings(api_keys=("k",), models_dir=sys.argv[1]))
assert wait_for_loading(app.extensions["embedding_service"])[0]
response = app.test_client().post("/embeddings", json={"text": "hi"}, headers={"X-API-Key": "k"})
assert response.status_code == 200, response.get_data(as_text=True)
app.extensions["embedding_service"].stop()
print(json.dumps(sorted(name for name in sys.modules
                        if name.split(".")[0] in ("torch", "sentence_transformers", "transformers"))))
"""


def test_serving_imports_no_torch(test_settings):
    """A process that serves the default engine never imports torch, sentence-transformers or transformers."""
    assert run_python(SERVE_ONE_REQUEST, test_settings.models_dir) == []


# --- model resolution -------------------------------------------------------

def test_locate_model_prefers_a_local_folder(tmp_path):
    location = locate_model(str(tmp_path), tmp_path / "models", allow_download=False)
    assert (location.source, location.path) == ("local folder", str(tmp_path.resolve()))


def test_locate_model_finds_a_baked_folder_before_the_package(tmp_path):
    baked = baked_model_dir(tmp_path, "all-MiniLM-L6-v2")
    assert baked == tmp_path / "sentence-transformers__all-MiniLM-L6-v2"
    baked.mkdir(parents=True)
    (baked / "modules.json").write_text("[]")
    location = locate_model("all-MiniLM-L6-v2", tmp_path, allow_download=False)
    assert (location.source, location.path) == ("baked folder", str(baked))


@pytest.mark.parametrize("name", ["all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"])
def test_locate_model_finds_the_installed_package(tmp_path, name):
    location = locate_model(name, tmp_path, allow_download=False)
    assert location.source == "installed package"
    assert (Path(location.path) / "model.safetensors").is_file()


def test_locate_model_uses_the_hub_only_when_allowed(tmp_path):
    location = locate_model("all-mpnet-base-v2", tmp_path, allow_download=True)
    assert (location.source, location.path, location.is_local) == (
        "model hub", "sentence-transformers/all-mpnet-base-v2", False)
    with pytest.raises(ModelNotFoundError) as error:
        locate_model("all-mpnet-base-v2", tmp_path, allow_download=False)
    message = str(error.value)
    assert "all-mpnet-base-v2" in message and str(tmp_path) in message and "ALLOW_MODEL_DOWNLOAD" in message


def test_load_model_fails_with_one_clear_message(tmp_path):
    with pytest.raises(ModelNotFoundError, match="not found"):
        load_sentence_transformer(Settings(embedding_model="no-such-model", models_dir=str(tmp_path)))
