"""A table of hostile inputs, each with its expected status and message, against every route.

It runs on the tiny CLIP so text and image routes are both live; after the whole table the
same server must still answer correct embeddings.
"""
from __future__ import annotations

import io
import json
import socket

import numpy as np
import pytest
import requests
from PIL import Image

from self_check import IMAGE_MIN_COSINE
from testkit import AUTH, PATIENCE, TEST_API_KEY, assert_same_vectors, b64, encoded, png_header_only, read_answer

JSON = {"Content-Type": "application/json"}


def animated_gif() -> bytes:
    frames = [Image.new("P", (24, 24), index) for index in range(3)]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    return buffer.getvalue()


def sixteen_bit_png() -> bytes:
    pixels = (np.arange(24 * 24, dtype="<u2") * 100).reshape(24, 24)
    return encoded(Image.frombytes("I;16", (24, 24), pixels.tobytes()))


PNG = encoded(Image.new("RGB", (24, 24), "orange"))
JPEG = encoded(Image.new("RGB", (64, 64), "teal"), "JPEG")

# (name, path, raw body or JSON value, expected status, words the error must hold)
HOSTILE = [
    ("malformed JSON", "/embeddings", b'{"text": "a"', 400, "not valid JSON"),
    ("truncated JSON", "/embeddings/batch", b'{"texts": ["a", "b', 400, "not valid JSON"),
    ("JSON array, not object", "/embeddings", b'["text"]', 400, "must be a JSON object"),
    ("JSON number", "/embeddings", b"42", 400, "must be a JSON object"),
    ("deeply nested JSON", "/embeddings", b"[" * 50000 + b"]" * 50000, 400, "JSON"),
    ("deeply nested object", "/embeddings", b'{"text": ' + b'{"a": ' * 20000 + b"1" + b"}" * 20001, 400, "JSON"),
    ("non-UTF-8 bytes", "/embeddings", b'{"text": "caf\xe9"}', 400, "not valid UTF-8"),
    ("UTF-16 body", "/embeddings", '{"text": "hi"}'.encode("utf-16"), 400, "not valid UTF-8"),
    ("lone surrogate", "/embeddings", b'{"text": "a \\udc00 b"}', 400, "surrogate"),
    ("lone surrogate in batch", "/embeddings/batch", b'{"texts": ["ok", "\\ud83d"]}', 400, "texts[1]"),
    ("only whitespace", "/embeddings", {"text": " \t\n\u00a0 "}, 400, "empty"),
    ("empty batch", "/embeddings/batch", {"texts": []}, 400, "empty"),
    ("101 texts", "/embeddings/batch", {"texts": ["t"] * 101}, 400, "MAX_TEXTS_PER_BATCH"),
    ("a text of 10,000 tokens", "/embeddings", {"text": "word " * 10000}, 413, "MAX_TOKENS_PER_TEXT"),
    ("a text past the character guard", "/embeddings", {"text": "x" * 300_000}, 413, "MAX_TEXT_LENGTH"),
    ("text is a number", "/embeddings", {"text": 3.5}, 400, "must be a string"),
    ("texts is an object", "/embeddings/batch", {"texts": {"a": 1}}, 400, "array of strings"),
    ("NUL characters", "/embeddings", {"text": "nul\u0000inside\u0000"}, 200, None),
    ("only emoji", "/embeddings", {"text": "🚀🔥🦄"}, 200, None),
    ("image: bad base64 characters", "/embeddings/image", {"image": "iVBOR*w0KGgo!!"}, 400, "base64"),
    ("image: bad base64 padding", "/embeddings/image", {"image": b64(PNG)[:-3]}, 400, "base64"),
    ("image: not an image", "/embeddings/image", {"image": b64(b"plain text, not pixels" * 10)}, 400, "image"),
    ("image: PNG declaring 100000x100000", "/embeddings/image", {"image": b64(png_header_only(100000, 100000))},
     413, "pixels"),
    ("image: truncated JPEG", "/embeddings/image", {"image": b64(JPEG[:len(JPEG) // 2])}, 400, "truncated"),
    ("image: 0x0 PNG", "/embeddings/image", {"image": b64(png_header_only(0, 0))}, 400, None),
    ("image: URL instead of data", "/embeddings/image", {"image": "http://127.0.0.1:9/cat.png"}, 400, "base64"),
    ("image: bad item in batch", "/embeddings/image/batch", {"images": [b64(PNG), "%%%"]}, 400, "images[1]"),
    ("image: animated GIF", "/embeddings/image", {"image": b64(animated_gif())}, 200, None),
    ("image: 16-bit PNG", "/embeddings/image", {"image": b64(sixteen_bit_png())}, 200, None),
    ("image: CMYK JPEG", "/embeddings/image", {"image": b64(encoded(Image.new("CMYK", (20, 20)), "JPEG"))}, 200, None),
]


def send(server, path: str, body, headers: dict | None = None) -> requests.Response:
    headers = {**AUTH, **JSON, **(headers or {})}
    if isinstance(body, bytes):
        return requests.post(server.url + path, data=body, headers=headers, timeout=60)
    return requests.post(server.url + path, json=body, headers=headers, timeout=60)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_every_hostile_input_gets_its_status_and_the_server_stays_correct(tiny_clip_server, tiny_clip_model):
    failures = []
    for name, path, body, status, words in HOSTILE:
        response = send(tiny_clip_server, path, body)
        message = response.json().get("error", "") if response.status_code != 200 else ""
        if response.status_code != status or (words and words not in message):
            failures.append(f"{name}: {response.status_code} {message!r} (expected {status} with {words!r})")
    assert not failures, "\n".join(failures)
    assert_still_correct(tiny_clip_server, tiny_clip_model)


def assert_still_correct(server, reference_model) -> None:
    text = send(server, "/embeddings", {"text": "a red square"}).json()["embeddings"][0]
    assert_same_vectors(text, reference_model.encode(["a red square"])[0])
    image = Image.new("RGB", (24, 24), "orange")
    vector = send(server, "/embeddings/image", {"image": b64(PNG)}).json()["embeddings"][0]
    assert_same_vectors(vector, reference_model.encode([image])[0], IMAGE_MIN_COSINE)


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", ""])
def test_json_with_another_content_type_is_read_as_json(tiny_clip_server, content_type):
    response = send(tiny_clip_server, "/embeddings", b'{"text": "typed oddly"}', {"Content-Type": content_type})
    assert response.status_code == 200


def test_multipart_to_a_text_route_says_it_wants_json(tiny_clip_server):
    response = requests.post(tiny_clip_server.url + "/embeddings", files={"text": ("a.txt", b"hello")},
                             headers=AUTH, timeout=30)
    assert response.status_code == 400 and "JSON" in response.json()["error"]


def test_a_body_over_the_limit_is_refused_before_it_is_read(tiny_clip_server):
    """Declare a 1 GB body and send 1 KB of it: the server answers 413 though the rest never comes.

    A server that waited for the rest would never answer, and the read would end in a timeout.
    """
    host, port = tiny_clip_server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=PATIENCE) as connection:
        connection.sendall(
            f"POST /embeddings HTTP/1.1\r\nHost: {host}\r\nX-API-Key: {TEST_API_KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {2 ** 30}\r\n\r\n".encode() + b"x" * 1024)
        status, body = read_answer(connection)
    assert status == 413, body
    assert "limit of 33554432 bytes (MAX_REQUEST_SIZE)" in json.loads(body)["error"]


def test_hostile_inputs_on_a_text_only_model_get_501_for_images(server):
    response = requests.post(server.url + "/embeddings/image", json={"image": b64(PNG)},
                             headers=AUTH, timeout=30)
    assert response.status_code == 501 and "CLIP" in response.json()["error"]
