"""The OpenAI-compatible routes: called with the official openai client on a real server, and, for how
requests are read, validated and refused, against the app on a stand-in service (no model, no socket)."""
from __future__ import annotations

import base64
import math

import numpy as np
import openai
import pytest
import requests

from batcher import QueueFullError
from config import Settings
from main import create_app
from service import EmbeddingService
from testkit import (AUTH, MODEL, SAME_ENGINE_MIN_COSINE, TEST_API_KEY, NeverLoads, app_without_model,
                     assert_envelope, assert_same_vectors, openai_client, post, post_v1, wait_for_loading)

LONG_TEXT = " ".join(f"Sentence number {n} talks about rivers, mountains and the sea." for n in range(60))


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai_client(server)


def rest_vectors(server, texts: list[str]) -> np.ndarray:
    """The vectors the service's own /embeddings/batch route gives for these texts."""
    answer = post(server, "/embeddings/batch", {"texts": texts})
    assert answer.status_code == 200, answer.text
    return np.array([wrapped[0] for wrapped in answer.json()["embeddings"]], dtype=np.float32)


def client_vectors(response) -> np.ndarray:
    assert [item.index for item in response.data] == list(range(len(response.data)))
    return np.array([item.embedding for item in response.data], dtype=np.float32)


def token_ids(text_embedder, text: str) -> list[int]:
    return text_embedder.tokenizer.token_ids([text])[0]


def tokens_processed(text_embedder, text: str) -> int:
    """Content tokens plus [CLS] and [SEP] for every window of max_seq_length tokens."""
    content = len(token_ids(text_embedder, text))
    windows = max(1, math.ceil(content / (text_embedder.max_seq_length - 2)))
    return content + 2 * windows


# --- the official client ----------------------------------------------------

def test_string_input_equals_the_embeddings_route(server, client, text_embedder):
    # No encoding_format: the client asks for base64 and decodes it itself.
    response = client.embeddings.create(model=MODEL, input="hello world")
    np.testing.assert_array_equal(client_vectors(response), rest_vectors(server, ["hello world"]))
    assert response.model == MODEL
    assert response.usage.prompt_tokens == tokens_processed(text_embedder, "hello world") == 4
    assert response.usage.total_tokens == response.usage.prompt_tokens


def test_list_input_in_float_format_equals_the_batch_route(server, client, text_embedder):
    texts = ["The cat sleeps.", LONG_TEXT, "Interest rates went up."]
    response = client.embeddings.create(model=MODEL, input=texts, encoding_format="float")
    np.testing.assert_array_equal(client_vectors(response), rest_vectors(server, texts))
    assert tokens_processed(text_embedder, LONG_TEXT) > text_embedder.max_seq_length  # really split into windows
    assert response.usage.prompt_tokens == sum(tokens_processed(text_embedder, text) for text in texts)


def test_base64_and_float_formats_carry_the_same_vectors(server):
    body = {"model": MODEL, "input": ["one text", "another"]}
    as_float = post_v1(server, {**body, "encoding_format": "float"}).json()
    as_base64 = post_v1(server, {**body, "encoding_format": "base64"}).json()
    for float_item, base64_item in zip(as_float["data"], as_base64["data"]):
        decoded = np.frombuffer(base64.b64decode(base64_item["embedding"]), dtype="<f4")
        np.testing.assert_array_equal(decoded, np.array(float_item["embedding"], dtype=np.float32))
    assert as_float["usage"] == as_base64["usage"]


def test_token_ids_embed_like_their_text(server, client, text_embedder):
    ids = token_ids(text_embedder, "hello world")
    response = client.embeddings.create(model=MODEL, input=ids, encoding_format="float")
    np.testing.assert_array_equal(client_vectors(response), rest_vectors(server, ["hello world"]))
    assert response.usage.prompt_tokens == len(ids) + 2


def test_lists_of_token_ids_embed_like_their_texts(server, client, text_embedder):
    texts = ["first text", LONG_TEXT]
    response = client.embeddings.create(model=MODEL, input=[token_ids(text_embedder, text) for text in texts])
    assert_same_vectors(client_vectors(response), rest_vectors(server, texts), SAME_ENGINE_MIN_COSINE)
    assert response.usage.prompt_tokens == sum(tokens_processed(text_embedder, text) for text in texts)


def test_dimensions_keeps_the_first_components_renormalised(server, client):
    full = rest_vectors(server, ["a short text"])[0]
    response = client.embeddings.create(model=MODEL, input="a short text", dimensions=64)
    shortened = client_vectors(response)[0]
    assert shortened.shape == (64,)
    assert np.linalg.norm(shortened) == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_allclose(shortened, full[:64] / np.linalg.norm(full[:64]), atol=1e-6)
    all_of_them = client.embeddings.create(model=MODEL, input="a short text", dimensions=384)
    np.testing.assert_array_equal(client_vectors(all_of_them)[0], full)


@pytest.mark.parametrize("alias", ["sentence-transformers/all-MiniLM-L6-v2", "all-minilm-l6-v2", MODEL])
def test_model_aliases_are_accepted_and_answered_with_the_served_id(client, alias):
    response = client.embeddings.create(model=alias, input="hi", user="someone")
    assert response.model == MODEL


def test_models_lists_the_served_model(server, client):
    models = client.models.list()
    assert [model.id for model in models.data] == [MODEL]
    assert models.data[0].owned_by and models.data[0].created == server.service.loaded_at
    raw = requests.get(server.url + "/v1/models", headers={"Authorization": f"Bearer {TEST_API_KEY}"},
                       timeout=10).json()
    assert raw["object"] == "list"
    assert raw["data"][0]["object"] == "model"
    assert raw["data"][0]["dimension"] == 384
    assert raw["data"][0]["max_sequence_length"] == 256


def test_client_surfaces_the_error_envelope(server, client):
    wrong_key = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as unauthorised:
        wrong_key.embeddings.create(model=MODEL, input="hi")
    assert unauthorised.value.code == "invalid_api_key"
    with pytest.raises(openai.NotFoundError) as unknown:
        client.embeddings.create(model="text-embedding-3-small", input="hi")
    assert unknown.value.code == "model_not_found"
    assert "all-MiniLM-L6-v2" in unknown.value.message
    with pytest.raises(openai.BadRequestError) as invalid:
        client.embeddings.create(model=MODEL, input=["ok", ""])
    assert invalid.value.body == {"message": "input[1] is empty: send some text to embed",
                                  "type": "invalid_request_error", "param": "input", "code": None}


# --- bearer auth on every protected route: the app on a stand-in service ------------------------

@pytest.mark.parametrize("path, body", [("/embeddings", {"text": "hi"}), ("/embeddings/batch", {"texts": ["hi"]}),
                                        ("/v1/embeddings", {"model": MODEL, "input": "hi"})])
def test_bearer_token_is_accepted_alongside_x_api_key(path, body):
    app = app_without_model(refuse_model_calls=False)

    def status_with(headers):
        return app.post(path, body, headers=headers).status_code

    assert status_with({"Authorization": f"Bearer {TEST_API_KEY}"}) == 200
    assert status_with({"authorization": f"bearer {TEST_API_KEY}"}) == 200
    assert status_with({"X-API-Key": TEST_API_KEY}) == 200
    assert status_with({"Authorization": "Bearer wrong"}) == 401
    assert status_with({"Authorization": f"Basic {TEST_API_KEY}"}) == 401
    assert status_with({}) == 401


def test_other_routes_keep_their_plain_error_shape():
    answer = app_without_model().post("/embeddings", {"text": "hi"}, headers={})
    assert answer.status_code == 401
    assert isinstance(answer.get_json()["error"], str)


# --- the error envelope, case by case: the app on a stand-in service ----------------------------

INVALID_BODIES = [
    ({"model": MODEL}, "input", "missing field 'input'"),
    ({"input": "hi"}, "model", "missing field 'model'"),
    ({"input": "hi", "model": 3}, "model", "model must be a string"),
    ({"input": "", "model": MODEL}, "input", "input is empty"),
    ({"input": "   ", "model": MODEL}, "input", "input is empty"),
    ({"input": [], "model": MODEL}, "input", "empty array"),
    ({"input": ["ok", ""], "model": MODEL}, "input", "input[1] is empty"),
    ({"input": [[]], "model": MODEL}, "input", "input[0] is an empty array of token ids"),
    ({"input": [[1, 2], []], "model": MODEL}, "input", "input[1] is an empty array"),
    ({"input": {"text": "hi"}, "model": MODEL}, "input", "got an object"),
    ({"input": 7, "model": MODEL}, "input", "got a number"),
    ({"input": None, "model": MODEL}, "input", "got null"),
    ({"input": ["hi", 7], "model": MODEL}, "input", "mixes kinds"),
    ({"input": [[101], "hi"], "model": MODEL}, "input", "mixes kinds"),
    ({"input": [7, [7]], "model": MODEL}, "input", "mixes kinds"),
    ({"input": [-1], "model": MODEL}, "input", "input[0] is -1, which is not a token id"),
    ({"input": [5, 30522], "model": MODEL}, "input", "input[1] is 30522, which is not a token id"),
    ({"input": [[5, 1.5]], "model": MODEL}, "input", "input[0][1] is 1.5"),
    ({"input": [[5, True]], "model": MODEL}, "input", "input[0][1] is True"),
    ({"input": "hi", "model": MODEL, "encoding_format": "int8"}, "encoding_format", "'float' or 'base64'"),
    ({"input": "hi", "model": MODEL, "dimensions": 0}, "dimensions", "at least 1"),
    ({"input": "hi", "model": MODEL, "dimensions": "64"}, "dimensions", "at least 1"),
    ({"input": "hi", "model": MODEL, "dimensions": True}, "dimensions", "at least 1"),
    ({"input": "hi", "model": MODEL, "dimensions": 385}, "dimensions", "384 components"),
    ({"input": ["hi", "data:image/png;base64,iVBORw0KGgo="], "model": MODEL}, "input",
     "input[1] is an image, but the model 'all-MiniLM-L6-v2' embeds text only"),
    ({"input": "data:image/jpeg;base64," + "A" * 40_000, "model": MODEL}, "input",
     "input is an image, but the model 'all-MiniLM-L6-v2' embeds text only"),
]


@pytest.mark.parametrize("body, param, says", INVALID_BODIES)
def test_invalid_request_fields_are_400_naming_the_field(body, param, says):
    assert_envelope(app_without_model().post("/v1/embeddings", body), 400, param, None, says)


@pytest.mark.parametrize("body", [{"input": ["ok", ""], "model": MODEL}, {"input": [[5, 1.5]], "model": MODEL},
                                  {"input": "hi", "model": MODEL, "dimensions": 385}],
                         ids=["empty text", "not a token id", "too many dimensions"])
def test_an_invalid_request_to_a_real_server_is_answered_as_without_a_model(server, body):
    """End to end on the real model: the same answer as the app on the stand-in service gives."""
    real = post_v1(server, body)
    without_model = app_without_model().post("/v1/embeddings", body)
    assert (real.status_code, real.json()) == (without_model.status_code, without_model.get_json())
    assert real.status_code == 400


@pytest.mark.parametrize("data, says", [(b"", "body is empty"), (b"{not json", "not valid JSON"),
                                        (b"[1, 2]", "must be a JSON object, got an array"),
                                        (b"{\"input\": \"\xff\"}", "not valid UTF-8")])
def test_unreadable_bodies_are_400(data, says):
    answer = app_without_model().post("/v1/embeddings", data=data, headers={**AUTH, "Content-Type": "application/json"})
    assert_envelope(answer, 400, None, None, says)


@pytest.mark.parametrize("headers", [{}, {"X-API-Key": "wrong"}, {"Authorization": "Bearer wrong"}])
def test_unauthorised_is_401(headers):
    app = app_without_model()
    assert_envelope(app.post("/v1/embeddings", {"model": MODEL, "input": "hi"}, headers=headers), 401, None,
                    "invalid_api_key", "Authorization: Bearer")
    assert_envelope(app.get("/v1/models", headers=headers), 401, None, "invalid_api_key")


def test_unknown_model_is_404_model_not_found():
    assert_envelope(app_without_model().post("/v1/embeddings", {"model": "text-embedding-3-small", "input": "hi"}),
                    404, "model", "model_not_found", "'text-embedding-3-small' does not exist")


def test_unknown_route_and_wrong_method_under_v1():
    app = app_without_model()
    assert_envelope(app.post("/v1/completions", {}), 404, None, "not_found", "no route /v1/completions")
    assert_envelope(app.get("/v1", headers={}), 404, None, "not_found")
    wrong_method = app.get("/v1/embeddings")
    assert_envelope(wrong_method, 405, None, "method_not_allowed", "GET is not allowed")
    assert "POST" in wrong_method.headers["Allow"]


def test_queue_full_is_429_with_retry_after():
    overload = QueueFullError("30000 tokens of work from 12 requests already wait for the model", retry_after=7)
    answer = app_without_model(fail_with=overload).post("/v1/embeddings", {"model": MODEL, "input": "hi"})
    assert_envelope(answer, 429, None, "server_busy", "busy")
    assert answer.headers["Retry-After"] == "7"


def test_unexpected_failure_is_500_in_the_envelope():
    app = app_without_model(fail_with=RuntimeError("disk on fire"))
    error = assert_envelope(app.post("/v1/embeddings", {"model": MODEL, "input": "hi"}), 500, None, "internal_error",
                            "internal error")
    assert "disk on fire" not in error["message"]


def failing_to_load(settings, hooks) -> EmbeddingService:
    def fail_to_load(settings):
        raise OSError("weights file is corrupt")

    return EmbeddingService(settings, hooks, load=fail_to_load)


def test_model_that_failed_to_load_is_503():
    app = create_app(Settings(api_keys=(TEST_API_KEY,)), failing_to_load)
    assert not wait_for_loading(app.extensions["embedding_service"])[0]
    client = app.test_client()
    assert_envelope(client.post("/v1/embeddings", json={"model": MODEL, "input": "hi"}, headers=AUTH), 503, None,
                    "model_load_failed", "weights file is corrupt")
    assert_envelope(client.get("/v1/models", headers=AUTH), 503, None, "model_load_failed")


def test_model_still_loading_is_503_with_retry_after():
    client = create_app(Settings(api_keys=(TEST_API_KEY,)), NeverLoads).test_client()
    answer = client.post("/v1/embeddings", json={"model": MODEL, "input": [101, 102]}, headers=AUTH)
    assert_envelope(answer, 503, None, "model_loading", "still loading")
    assert answer.headers["Retry-After"] == "5"


# --- limits, on the real model ---------------------------------------------------------------

def test_limits_match_the_other_routes(server_with, text_embedder):
    limited = server_with(max_texts_per_batch=3, max_text_length=50, max_tokens_per_text=50, max_request_size=2000)
    assert_envelope(post_v1(limited, {"model": MODEL, "input": ["a", "b", "c", "d"]}), 400, "input",
                    None, "input has 4 texts; the limit is 3 (MAX_TEXTS_PER_BATCH)")
    assert_envelope(post_v1(limited, {"model": MODEL, "input": [[5]] * 4}), 400, "input", None,
                    "MAX_TEXTS_PER_BATCH")
    assert_envelope(post_v1(limited, {"model": MODEL, "input": "x" * 51}), 413, "input", None,
                    "input has 51 characters; the limit is 50 (MAX_TEXT_LENGTH)")
    assert_envelope(post_v1(limited, {"model": MODEL, "input": [[1000] * 51]}), 413, "input", None,
                    "input[0] has 51 tokens; the limit is 50 (MAX_TOKENS_PER_TEXT)")
    assert_envelope(post_v1(limited, {"model": MODEL, "input": [1000] * 400}), 413, None, "request_too_large",
                    "larger than the limit of 2000 bytes")
    # A single list of token ids is one input, however long (up to the token limit).
    assert post_v1(limited, {"model": MODEL, "input": [1000] * 50}).status_code == 200


def test_a_model_served_from_a_folder_is_named_by_the_folder_not_its_path(server_with, tmp_path):
    folder = tmp_path / "my-finetuned-model"
    folder.mkdir()
    live = server_with(embedding_model=str(folder))
    models = requests.get(live.url + "/v1/models", headers=AUTH, timeout=10).json()
    assert models["data"][0]["id"] == "my-finetuned-model"
    for alias in ["my-finetuned-model", str(folder), "sentence-transformers/my-finetuned-model"]:
        answer = post_v1(live, {"model": alias, "input": "hi"})
        assert answer.status_code == 200 and answer.json()["model"] == "my-finetuned-model"
    assert_envelope(post_v1(live, {"model": MODEL, "input": "hi"}), 404, "model", "model_not_found",
                    "serves 'my-finetuned-model'")
