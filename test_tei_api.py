"""text-embeddings-inference's API, called by the clients built for TEI, on a real server on loopback.

huggingface_hub's InferenceClient (which LangChain's HuggingFaceEndpointEmbeddings and Haystack use) and
LlamaIndex's TextEmbeddingsInference must work unchanged and get the vectors the OpenAI route gives.
"""
from __future__ import annotations

import huggingface_hub.constants
import numpy as np
import pytest
import requests
from huggingface_hub import InferenceClient
from huggingface_hub.errors import HfHubHTTPError
from llama_index.embeddings.text_embeddings_inference import TextEmbeddingsInference

from batcher import QueueFullError
from main import create_app
from testkit import MODEL, TEST_API_KEY, NeverLoads, start_live_server

BEARER = {"Authorization": f"Bearer {TEST_API_KEY}"}
TEXTS = ["The cat sleeps on the sofa.", "Interest rates went up again.", "Zürich ist schön im Frühling."]
LONG_TEXT = " ".join(f"Sentence number {n} talks about rivers, mountains and the sea." for n in range(60))


@pytest.fixture(autouse=True)
def clients_online(monkeypatch):
    """The tests keep the model hub offline (HF_HUB_OFFLINE), which huggingface_hub applies to every URL it is
    given; a client's machine talking to this service is not offline."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)


def openai_vectors(server, items) -> np.ndarray:
    """What the OpenAI-compatible route answers for these texts or token id lists."""
    answer = requests.post(server.url + "/v1/embeddings", json={"model": MODEL, "input": items}, headers=BEARER,
                           timeout=60)
    assert answer.status_code == 200, answer.text
    return np.array([item["embedding"] for item in answer.json()["data"]], dtype=np.float32)


def post_embed(server, body, path="/embed", headers=BEARER) -> requests.Response:
    return requests.post(server.url + path, json=body, headers=headers, timeout=60)


def ids_of(text_embedder, text: str) -> list[int]:
    return text_embedder.tokenizer.token_ids([text])[0]


# --- the clients ------------------------------------------------------------------

def test_inference_client_feature_extraction_equals_the_openai_route(server):
    # Given the service's URL, InferenceClient posts to it: POST /.
    client = InferenceClient(base_url=server.url, api_key=TEST_API_KEY)
    one = client.feature_extraction("hello world")
    assert one.shape == (1, 384) and one.dtype == np.float32
    np.testing.assert_array_equal(one, openai_vectors(server, ["hello world"]))
    many = client.feature_extraction(TEXTS)
    np.testing.assert_array_equal(many, openai_vectors(server, TEXTS))


def test_inference_client_on_the_embed_route_with_its_options(server):
    # TEI's own quick tour points the client at /embed.
    client = InferenceClient(model=server.url + "/embed", api_key=TEST_API_KEY)
    full = openai_vectors(server, TEXTS)
    shortened = client.feature_extraction(TEXTS, dimensions=64, normalize=True, truncate=True,
                                          truncation_direction="right", prompt_name="query")
    expected = full[:, :64] / np.linalg.norm(full[:, :64], axis=1, keepdims=True)
    np.testing.assert_allclose(shortened, expected, atol=1e-6)
    assert np.linalg.norm(shortened, axis=1) == pytest.approx(np.ones(len(TEXTS)), abs=1e-6)


def test_inference_client_raises_with_the_message_of_a_refused_request(server):
    client = InferenceClient(base_url=server.url, api_key=TEST_API_KEY)
    with pytest.raises(HfHubHTTPError) as refused:
        client.feature_extraction("hello", prompt_name="no-such-prompt")
    assert refused.value.response.status_code == 422
    assert "'no-such-prompt' is not a prompt of this model" in str(refused.value)
    wrong_key = InferenceClient(base_url=server.url, api_key="wrong")
    with pytest.raises(HfHubHTTPError) as unauthorised:
        wrong_key.feature_extraction("hello")
    assert unauthorised.value.response.status_code == 401


def test_llama_index_text_embeddings_inference_equals_the_openai_route(server):
    # It posts {"inputs": [...], "truncate": true} to /embed, ten texts at a time.
    embedder = TextEmbeddingsInference(model_name=MODEL, base_url=server.url, auth_token=TEST_API_KEY, timeout=60)
    texts = [f"{text} ({number})" for number in range(4) for text in TEXTS]
    np.testing.assert_array_equal(np.array(embedder.get_text_embedding_batch(texts), dtype=np.float32),
                                  openai_vectors(server, texts))
    np.testing.assert_array_equal(np.array(embedder.get_query_embedding(TEXTS[0]), dtype=np.float32),
                                  openai_vectors(server, TEXTS[:1])[0])


# --- the request's fields ------------------------------------------------------------

def test_a_long_text_is_split_into_windows_unless_truncated(server, text_embedder):
    ids = ids_of(text_embedder, LONG_TEXT)
    room = text_embedder.window_size
    assert len(ids) > 2 * room
    averaged = np.array(post_embed(server, {"inputs": LONG_TEXT}).json(), dtype=np.float32)
    np.testing.assert_array_equal(averaged, openai_vectors(server, [LONG_TEXT]))
    first = np.array(post_embed(server, {"inputs": LONG_TEXT, "truncate": True}).json(), dtype=np.float32)
    np.testing.assert_array_equal(first, openai_vectors(server, [ids[:room]]))
    last = post_embed(server, {"inputs": [LONG_TEXT], "truncate": True, "truncation_direction": "Left"})
    np.testing.assert_array_equal(np.array(last.json(), dtype=np.float32), openai_vectors(server, [ids[-room:]]))


def test_inputs_take_every_shape_tei_reads(server, text_embedder):
    ids = ids_of(text_embedder, TEXTS[0])
    as_ids = post_embed(server, {"inputs": ids}).json()  # a list of ids is one input
    as_list = post_embed(server, {"inputs": [TEXTS[1], ids, TEXTS[2]]}).json()  # texts and ids mixed
    assert len(as_ids) == 1 and len(as_list) == 3
    np.testing.assert_array_equal(np.array(as_ids, dtype=np.float32), openai_vectors(server, [TEXTS[0]]))
    expected = openai_vectors(server, [TEXTS[1], TEXTS[0], TEXTS[2]])
    np.testing.assert_array_equal(np.array(as_list, dtype=np.float32), expected)


def test_normalize_false_gives_the_models_own_output(server):
    raw = np.array(post_embed(server, {"inputs": TEXTS, "normalize": False, "dimensions": 10}).json())
    full = openai_vectors(server, TEXTS)
    np.testing.assert_array_equal(raw.astype(np.float32), full[:, :10])  # cut, not normalised again
    assert (np.linalg.norm(raw, axis=1) < 0.99).all()


def test_info_describes_the_model_and_the_limits(server, test_settings):
    answer = requests.get(server.url + "/info", headers=BEARER, timeout=10)
    assert answer.status_code == 200
    info = answer.json()
    assert (info["model_id"], info["served_model_name"]) == (MODEL, MODEL)
    assert info["model_type"] == {"embedding": {"pooling": "mean"}}
    assert info["model_dtype"] in ("float32", "bfloat16")
    assert (info["max_input_length"], info["max_client_batch_size"]) == (256, test_settings.max_texts_per_batch)
    assert (info["max_batch_tokens"], info["auto_truncate"]) == (test_settings.batch_max_tokens, False)
    assert info["model_sha"] is None and isinstance(info["version"], str)
    assert requests.get(server.url + "/info", timeout=10).status_code == 401


# --- errors, in TEI's envelope with its statuses --------------------------------------

@pytest.mark.parametrize("body, status, error_type, says", [
    ({"inputs": ""}, 400, "Empty", "`inputs` cannot be empty"),
    ({"inputs": []}, 400, "Empty", "`inputs` cannot be empty"),
    ({"inputs": ["ok", "  "]}, 400, "Empty", "inputs[1] holds no text"),
    ({"inputs": ["a"] * 101}, 422, "Validation", "batch size 101 > maximum allowed batch size 100"),
    ({"inputs": 7}, 422, "Validation", "got a number"),
    ({"inputs": ["ok", 7]}, 422, "Validation", "inputs[1] must be a string or a list of token ids"),
    ({"inputs": [5, 30522]}, 422, "Validation", "inputs[1] is 30522, which is not a token id"),
    ({"text": "wrong field"}, 422, "Validation", "Missing field 'inputs'"),
    ({"inputs": "x", "normalize": None}, 422, "Validation", "normalize must be true or false"),
    ({"inputs": "x", "truncation_direction": "LEFT"}, 422, "Validation", "'Right' or 'Left'"),
    ({"inputs": "x", "truncation_direction": {}}, 422, "Validation", "'Right' or 'Left'"),
    ({"inputs": "x", "dimensions": 0}, 422, "Validation", "`dimensions` should be positive"),
    ({"inputs": "x", "dimensions": 385}, 422, "Validation", "vectors of 384 components"),
    ({"inputs": "x", "prompt_name": "nope"}, 422, "Validation", "its prompts are 'document', 'query'"),
    ({"inputs": [101, 102], "prompt_name": "query"}, 422, "Validation", "cannot apply to token ids"),
    ({"inputs": "x" * 300_000}, 422, "Validation", "the limit is 262144 (MAX_TEXT_LENGTH)"),
])
def test_refused_requests_get_tei_statuses_and_error_types(server, body, status, error_type, says):
    for path in ("/embed", "/"):
        answer = post_embed(server, body, path)
        assert answer.status_code == status, answer.text
        assert answer.json()["error_type"] == error_type and says in answer.json()["error"], answer.text


def test_a_text_over_the_token_limit_is_422_naming_the_limit(server_with):
    live = server_with(max_tokens_per_text=20, max_tokens_per_request=400)
    answer = post_embed(live, {"inputs": ["short", LONG_TEXT]})
    assert answer.status_code == 422 and answer.json()["error_type"] == "Validation"
    assert answer.json()["error"].startswith("inputs[1] has ") and "(MAX_TOKENS_PER_TEXT)" in answer.json()["error"]
    # Truncated to one window it is read, and counted, as that window.
    assert post_embed(live, {"inputs": [LONG_TEXT], "truncate": True}).status_code == 422
    assert post_embed(server_with(max_tokens_per_text=300), {"inputs": LONG_TEXT, "truncate": True}).status_code == 200


def test_a_body_that_is_no_json_is_400_and_one_without_a_key_401(server):
    unreadable = requests.post(server.url + "/embed", data=b"{not json", timeout=10,
                               headers={**BEARER, "Content-Type": "application/json"})
    assert unreadable.status_code == 400 and "not valid JSON" in unreadable.json()["error"]
    assert post_embed(server, {"inputs": "x"}, headers={}).status_code == 401


def test_a_busy_or_loading_service_is_429_overloaded_or_503_unhealthy(server, test_settings, monkeypatch):
    def refuse(windows):
        raise QueueFullError("30000 tokens of work from 12 requests already wait for the model", retry_after=7)

    monkeypatch.setattr(server.service._batcher, "encode", refuse)  # inject the overload
    busy = post_embed(server, {"inputs": "x"})
    assert (busy.status_code, busy.json()["error_type"], busy.headers["Retry-After"]) == (429, "Overloaded", "7")
    live = start_live_server(create_app(test_settings, NeverLoads), wait_ready=False)
    try:
        loading = post_embed(live, {"inputs": "x"})
        assert (loading.status_code, loading.json()["error_type"]) == (503, "Unhealthy")
        assert "still loading" in loading.json()["error"] and loading.headers["Retry-After"] == "5"
    finally:
        live.stop()
