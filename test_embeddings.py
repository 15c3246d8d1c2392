"""The embedding logic on the real all-MiniLM-L6-v2 model."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from config import Settings, SettingsError, load_settings
from embeddings import TextEmbedder, chunk_token_ids, load_model, load_tokenizer
from model_locator import ModelNotFoundError, baked_model_dir, locate_model

LONG_TEXT = " ".join(f"Sentence number {n} talks about rivers, mountains and the sea." for n in range(120))


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_similar_sentences_score_higher_than_unrelated(text_embedder):
    cat, kitten, finance = text_embedder.embed([
        "A cat is sleeping on the sofa.",
        "A kitten naps on the couch.",
        "The central bank raised interest rates again.",
    ])
    assert cosine(cat, kitten) > 0.5
    assert cosine(cat, kitten) > cosine(cat, finance) + 0.3


def test_short_texts_match_sentence_transformers_encode(text_embedder):
    texts = ["hello world", "Embeddings turn text into vectors.", "ünïcödé and emoji 🚀"]
    ours = np.stack(text_embedder.embed(texts))
    reference = text_embedder.model.encode(texts, convert_to_numpy=True)
    np.testing.assert_allclose(ours, reference, atol=1e-5)


def test_vectors_are_unit_length_with_model_dimension(text_embedder):
    vector = text_embedder.embed(["a short text"])[0]
    assert vector.shape == (384,)
    assert text_embedder.dimension == 384
    assert np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-5)


def test_batch_output_equals_single_output_in_order(text_embedder):
    texts = ["first text", LONG_TEXT, "third, a little longer than the first", "fourth"]
    together = text_embedder.embed(texts)
    for text, vector in zip(texts, together):
        np.testing.assert_allclose(vector, text_embedder.embed([text])[0], atol=1e-5)


def test_chunk_token_ids_makes_consecutive_windows():
    ids = list(range(10))
    assert chunk_token_ids(ids, 4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert chunk_token_ids(ids, 10) == [ids]
    assert chunk_token_ids([], 4) == [[]]
    with pytest.raises(ValueError):
        chunk_token_ids(ids, 0)


def test_window_leaves_room_for_special_tokens(text_embedder):
    assert text_embedder.max_seq_length == 256
    assert text_embedder.prefix_ids == [101] and text_embedder.suffix_ids == [102]
    assert text_embedder.window_size == 254


def test_long_text_is_split_into_windows_of_its_own_tokens(text_embedder):
    tokenized = text_embedder.tokenize([LONG_TEXT])[0]
    all_ids = text_embedder.tokenizer(LONG_TEXT, add_special_tokens=False)["input_ids"]
    assert len(all_ids) > 1000
    assert [token for chunk in tokenized.chunks for token in chunk] == all_ids
    assert all(len(chunk) == 254 for chunk in tokenized.chunks[:-1])
    assert 0 < len(tokenized.chunks[-1]) <= 254
    assert text_embedder.tokens_processed(tokenized) == len(all_ids) + 2 * len(tokenized.chunks)


def encode_window_by_hand(model, window: list[int]) -> np.ndarray:
    """Mean-pool BERT's last hidden state over one window and normalise, without our code path."""
    input_ids = torch.tensor([[101] + window + [102]])
    with torch.inference_mode():
        hidden = model.transformers_model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids))
    vector = hidden.last_hidden_state[0].mean(dim=0).numpy()
    return vector / np.linalg.norm(vector)


def test_long_text_vector_is_token_weighted_average_of_window_vectors(text_embedder):
    vector = text_embedder.embed([LONG_TEXT])[0]
    assert vector.shape == (384,)
    windows = text_embedder.tokenize([LONG_TEXT])[0].chunks
    assert len(windows) >= 4
    by_hand = [encode_window_by_hand(text_embedder.model, window) for window in windows]
    weights = np.array([len(window) for window in windows], dtype=np.float64)
    expected = (np.stack(by_hand) * weights[:, None]).sum(axis=0) / weights.sum()
    expected /= np.linalg.norm(expected)
    np.testing.assert_allclose(vector, expected, atol=1e-5)
    # The weighting matters: the last window is shorter, so a plain mean differs.
    plain_mean = np.mean(by_hand, axis=0)
    assert not np.allclose(vector, plain_mean / np.linalg.norm(plain_mean), atol=1e-5)


def test_chunks_are_encoded_in_calls_of_at_most_max_batch_size(text_embedder, monkeypatch):
    # An embedder of its own: the shared one may still be serving another test's server.
    text_embedder = TextEmbedder(text_embedder.model, text_embedder.tokenizer, max_batch_size=8, max_batch_tokens=4096)
    calls = []
    original = text_embedder._forward

    def counting_forward(chunks):
        calls.append(len(chunks))
        return original(chunks)

    monkeypatch.setattr(text_embedder, "_forward", counting_forward)
    text_embedder.embed([LONG_TEXT, LONG_TEXT, "short"])
    windows = 2 * len(text_embedder.tokenize([LONG_TEXT])[0].chunks) + 1
    assert sum(calls) == windows
    assert max(calls) <= text_embedder.max_batch_size
    assert len(calls) == -(-windows // text_embedder.max_batch_size)


def test_token_ids_input_equals_text_input(text_embedder):
    ids = text_embedder.tokenizer("token ids in, vector out", add_special_tokens=False)["input_ids"]
    from_ids = text_embedder.embed_tokenized(text_embedder.tokenized_from_ids([ids]))[0]
    np.testing.assert_allclose(from_ids, text_embedder.embed(["token ids in, vector out"])[0], atol=1e-6)


def test_tokenizer_model_setting_loads_that_tokenizer(text_embedder):
    settings = Settings(tokenizer_model="sentence-transformers/all-MiniLM-L6-v2")
    tokenizer = load_tokenizer(settings, text_embedder.model)
    assert tokenizer is not text_embedder.model.tokenizer
    assert tokenizer("hello")["input_ids"] == text_embedder.tokenizer("hello")["input_ids"]


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
        load_model(Settings(embedding_model="no-such-model", models_dir=str(tmp_path)))


# --- settings ---------------------------------------------------------------

def test_settings_defaults_are_the_documented_ones():
    settings = load_settings({})
    assert settings.api_keys == ("abc123",) and settings.uses_default_api_key
    assert (settings.port, settings.max_batch_size, settings.max_texts_per_batch) == (5001, 32, 100)
    assert (settings.max_images_per_batch, settings.max_image_size) == (20, 10485760)
    assert settings.embedding_model == "all-MiniLM-L6-v2" and settings.tokenizer_model is None
    assert settings.allow_model_download is False


def test_settings_are_read_from_the_environment():
    settings = load_settings({"VECTOR_EMBEDDER_API_KEY": "new, old", "PORT": "8080", "MAX_BATCH_SIZE": "16",
                              "EMBEDDING_MODEL": "clip-ViT-B-32", "TOKENIZER_MODEL": "",
                              "ALLOW_MODEL_DOWNLOAD": "true"})
    assert settings.api_keys == ("new", "old") and not settings.uses_default_api_key
    assert (settings.port, settings.max_batch_size) == (8080, 16)
    assert settings.embedding_model == "clip-ViT-B-32" and settings.tokenizer_model is None
    assert settings.allow_model_download is True


@pytest.mark.parametrize("name, value", [
    ("MAX_BATCH_SIZE", "0"), ("MAX_TEXTS_PER_BATCH", "-5"), ("PORT", "http"), ("MAX_IMAGE_SIZE", "1.5"),
    ("PORT", "70000"), ("MAX_TEXT_LENGTH", "ten"), ("ALLOW_MODEL_DOWNLOAD", "maybe"),
    ("VECTOR_EMBEDDER_API_KEY", " , "),
])
def test_bad_settings_name_the_variable(name, value):
    with pytest.raises(SettingsError, match=name):
        load_settings({name: value})
