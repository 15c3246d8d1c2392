"""One set of limits for both APIs, counted in tokens; each API answers in its own error envelope.

Real servers on loopback: the service's own routes are called with requests, the OpenAI-compatible
routes with the official openai client. Token counts in the expected messages come from the model's
own tokenizer.
"""
from __future__ import annotations

import itertools
import threading
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import requests
from PIL import Image

from batcher import Batcher, BatchLimits
from config import load_settings
from testkit import (AUTH, MODEL, PATIENCE, SAME_ENGINE_MIN_COSINE, GatedEncoder, assert_same_vectors, b64, encoded,
                     error_of, openai_client, post, windows_of)

SENTENCES = [
    "The river carries water from the mountains down to the sea, and towns grow along its banks.",
    "In spring the snow melts, the current quickens, and farmers watch their fields for floods.",
    "Engineers built levees and locks so that barges could travel safely in every season.",
    "Historians say the first bridge here was made of timber and lasted almost forty years.",
    "Today cyclists follow the old towpath, and herons fish in the quiet water below the weir.",
    "A museum by the harbour tells how the trade in salt and grain made the city rich.",
]
RED_SQUARE = "data:image/png;base64," + b64(encoded(Image.new("RGB", (24, 24), "red")))
# A token id of the bundled model's vocabulary ("world").
WORLD = 2088


def english_document(tokenizer, tokens: int) -> str:
    """Plain English prose of at least `tokens` tokens (each sentence is counted on its own)."""
    sentences, count = [], 0
    for sentence in itertools.cycle(SENTENCES):
        if count >= tokens:
            break
        sentences.append(sentence)
        count += len(tokenizer.token_ids([sentence])[0])
    return " ".join(sentences)


def token_count(tokenizer, text: str) -> int:
    return len(tokenizer.token_ids([text])[0])


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai_client(server)


# --- limits in tokens --------------------------------------------------------------

def test_a_5000_token_document_is_embedded_on_both_apis(server, client, text_embedder):
    document = english_document(text_embedder.tokenizer, 5000)
    tokens = token_count(text_embedder.tokenizer, document)
    assert 5000 <= tokens < 5100 and len(document) > 20_000  # past the old limit of 20,000 characters
    expected = text_embedder.embed([document])[0]
    own = post(server, "/embeddings", {"text": document})
    assert own.status_code == 200, own.text
    assert_same_vectors(own.json()["embeddings"][0], expected, SAME_ENGINE_MIN_COSINE)
    answer = client.embeddings.create(model=MODEL, input=document, encoding_format="float")
    assert_same_vectors(answer.data[0].embedding, expected, SAME_ENGINE_MIN_COSINE)
    assert answer.usage.prompt_tokens == text_embedder.tokens_processed(text_embedder.tokenize([document])[0])


def test_a_text_over_the_token_limit_gets_413_with_its_tokens_and_the_limit(server, client, text_embedder):
    document = english_document(text_embedder.tokenizer, 9000)
    tokens = token_count(text_embedder.tokenizer, document)
    limit_words = f"has {tokens} tokens; the limit is 8192 (MAX_TOKENS_PER_TEXT)"
    assert error_of(post(server, "/embeddings", {"text": document}), 413) == f"text {limit_words}"
    assert error_of(post(server, "/embeddings/batch", {"texts": ["short", document]}), 413) == f"texts[1] {limit_words}"
    with pytest.raises(openai.APIStatusError) as refused:
        client.embeddings.create(model=MODEL, input=["short", document, "short again"])
    assert refused.value.status_code == 413
    assert refused.value.body == {"message": f"input[1] {limit_words}", "type": "invalid_request_error",
                                  "param": "input", "code": None}


def test_token_ids_are_held_to_the_token_limit_not_a_character_limit(server, server_with, client):
    with pytest.raises(openai.APIStatusError) as refused:
        client.embeddings.create(model=MODEL, input=[WORLD] * 8193)
    assert refused.value.status_code == 413
    assert refused.value.body["message"] == "input has 8193 tokens; the limit is 8192 (MAX_TOKENS_PER_TEXT)"
    with pytest.raises(openai.APIStatusError) as refused_in_list:
        client.embeddings.create(model=MODEL, input=[[WORLD] * 3, [WORLD] * 8193])
    assert refused_in_list.value.body["message"].startswith("input[1] has 8193 tokens")
    # The character guard is for text: 300 token ids pass a 100-character guard.
    guarded = openai_client(server_with(max_text_length=100))
    assert len(guarded.embeddings.create(model=MODEL, input=[WORLD] * 300).data) == 1


def test_a_request_over_the_token_total_gets_413_naming_the_setting(server, client, text_embedder):
    document = english_document(text_embedder.tokenizer, 7000)
    tokens = token_count(text_embedder.tokenizer, document)
    assert 4 * tokens <= 32768 < 5 * tokens
    message = error_of(post(server, "/embeddings/batch", {"texts": [document] * 5}), 413)
    assert message == (f"The texts up to texts[4] have {5 * tokens} tokens; the limit per request is 32768 "
                       f"(MAX_TOKENS_PER_REQUEST): send them in several requests")
    with pytest.raises(openai.APIStatusError) as refused:
        client.embeddings.create(model=MODEL, input=[document] * 5)
    assert refused.value.status_code == 413 and refused.value.param == "input"
    assert refused.value.body["message"].startswith(f"The texts up to input[4] have {5 * tokens} tokens")


def test_many_texts_of_few_tokens_are_refused_before_any_is_tokenized(server, text_embedder, monkeypatch):
    # Each within MAX_TEXT_LENGTH and of one token ([UNK]): only the request's characters can bound them.
    texts = ["x" * 200_000] * 6
    tokenized = []
    real_tokenize = text_embedder.tokenize
    monkeypatch.setattr(text_embedder, "tokenize",
                        lambda batch, *options: tokenized.append(batch) or real_tokenize(batch, *options))
    message = error_of(post(server, "/embeddings/batch", {"texts": texts}), 413)
    assert message == ("The texts hold 1200000 characters in all; the limit per request is 1048576 (32 characters "
                       "per token of MAX_TOKENS_PER_REQUEST): send them in several requests")
    assert tokenized == []
    assert post(server, "/embeddings/batch", {"texts": texts[:5]}).status_code == 200


def test_a_request_within_the_token_total_is_served_on_an_idle_server(server, text_embedder):
    document = english_document(text_embedder.tokenizer, 8000)
    tokens = token_count(text_embedder.tokenizer, document)
    assert 4 * tokens <= 32768 and tokens <= 8192  # within both limits, close to the total
    answer = post(server, "/embeddings/batch", {"texts": [document] * 4})
    assert answer.status_code == 200, answer.text  # no 429: the defaults fit the model's queue
    expected = text_embedder.embed([document])[0]
    for wrapped in answer.json()["embeddings"]:
        assert_same_vectors(wrapped[0], expected, SAME_ENGINE_MIN_COSINE)


def test_a_largest_request_joins_a_queue_that_already_holds_other_work(text_embedder):
    """With the default settings a request at MAX_TOKENS_PER_REQUEST is not refused for a short query's sake."""
    defaults = load_settings({})
    limits = BatchLimits(max_tokens=defaults.batch_max_tokens, batching=defaults.batching,
                         queue_max_tokens=defaults.queue_max_tokens, request_timeout=PATIENCE)
    encoder = GatedEncoder(text_embedder)
    batcher = Batcher(encoder, text_embedder.tokens_per_window, limits)
    largest = text_embedder.tokenized_from_ids([[WORLD] * defaults.max_tokens_per_request])[0].windows
    batcher.start()
    with ThreadPoolExecutor(1) as pool:
        try:
            in_model = pool.submit(batcher.encode, windows_of(text_embedder, "held in the model"))
            assert encoder.entered.wait(PATIENCE)
            queued = [batcher.submit(windows_of(text_embedder, "a short query waits")), batcher.submit(largest)]
        finally:
            encoder.gate.set()
        in_model.result(PATIENCE)
        results = [batcher.wait_for(job) for job in queued]
    batcher.stop()
    assert [len(vectors) for vectors in results] == [1, len(largest)]


def test_each_text_is_tokenized_once(server, client, text_embedder, monkeypatch):
    too_long = english_document(text_embedder.tokenizer, 9000)
    seen: list[str] = []
    tokenize = text_embedder.tokenizer.token_ids
    lock = threading.Lock()

    def counting(texts):
        with lock:
            seen.extend(texts)
        return tokenize(texts)

    monkeypatch.setattr(text_embedder.tokenizer, "token_ids", counting)
    texts = ["first of three", "second of three", "third of three"]
    assert post(server, "/embeddings/batch", {"texts": texts}).status_code == 200
    client.embeddings.create(model=MODEL, input=["one for the client", "two for the client"])
    assert sorted(seen) == sorted(texts + ["one for the client", "two for the client"])
    # Counting stops at the first text past a limit: what follows it is never tokenized.
    seen.clear()
    answer = post(server, "/embeddings/batch", {"texts": ["before", too_long, "after"]})
    assert answer.status_code == 413 and seen == ["before", too_long]


# --- one set of limits and validators for both APIs ------------------------------

def test_v1_takes_no_more_images_than_the_image_batch_route(clip_server_with, tiny_clip_settings):
    live = clip_server_with(max_images_per_batch=2)
    model = tiny_clip_settings.embedding_model
    message = error_of(post(live, "/embeddings/image/batch", {"images": [RED_SQUARE] * 3}), 400)
    assert message == "images has 3 images; the limit is 2 (MAX_IMAGES_PER_BATCH)"
    with pytest.raises(openai.BadRequestError) as refused:
        openai_client(live).embeddings.create(model=model, input=[RED_SQUARE, "a red square", RED_SQUARE, RED_SQUARE])
    assert refused.value.body["message"] == "input has 3 images; the limit is 2 (MAX_IMAGES_PER_BATCH)"
    assert refused.value.param == "input"
    served = openai_client(live).embeddings.create(model=model, input=[RED_SQUARE, "a red square", RED_SQUARE])
    assert len(served.data) == 3


def test_v1_names_a_long_text_by_its_place_among_images(tiny_clip_server, tiny_clip_settings, tiny_clip_models):
    tokenizer = tiny_clip_models.text.tokenizer
    document = english_document(tokenizer, 9000)
    with pytest.raises(openai.APIStatusError) as refused:
        openai_client(tiny_clip_server).embeddings.create(
            model=tiny_clip_settings.embedding_model, input=[RED_SQUARE, "a red square", RED_SQUARE, document])
    assert refused.value.status_code == 413
    tokens = token_count(tokenizer, document)
    assert refused.value.body["message"] == f"input[3] has {tokens} tokens; the limit is 8192 (MAX_TOKENS_PER_TEXT)"


def test_a_text_only_model_answers_images_with_501_and_400_on_v1(server_with, tmp_path):
    # Served from a folder: the message names the model as /v1/models does, never the folder's path.
    folder = tmp_path / "models on this machine" / "my-text-model"
    folder.mkdir(parents=True)
    live = server_with(embedding_model=str(folder))
    answers = [post(live, "/embeddings/image", {"image": RED_SQUARE}),
               post(live, "/embeddings/image/batch", {"images": [RED_SQUARE]}),
               requests.post(live.url + "/embeddings/image", files={"image": ("red.png", b"not read")},
                             headers=AUTH, timeout=30)]
    for answer in answers:
        message = error_of(answer, 501)
        assert message.startswith("The model 'my-text-model' embeds text only"), message
        assert "set EMBEDDING_MODEL to a multimodal CLIP model" in message
    with pytest.raises(openai.BadRequestError) as refused:
        openai_client(live).embeddings.create(model="my-text-model", input=["a red square", RED_SQUARE])
    message = refused.value.body["message"]
    assert message.startswith("input[1] is an image, but the model 'my-text-model' embeds text only"), message
    assert "set EMBEDDING_MODEL to a multimodal CLIP model" in message
    for text in [answer.text for answer in answers] + [refused.value.response.text]:
        assert str(tmp_path) not in text and "models on this machine" not in text
