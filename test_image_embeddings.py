"""Image and cross-modal embeddings on a tiny CLIP built at test time, served over real HTTP.

No CLIP weights can be downloaded here, so the tests build a CLIP with random
weights (fixed seed), a byte-level BPE tokenizer from a vocabulary written by
the test, and a CLIP image processor, and save them in the folder layout of the
sentence-transformers clip-ViT-B-32 model (modules.json pointing at a
0_CLIPModel module folder). The service loads that folder through its normal
loading code. The vectors mean nothing, but every path from HTTP request to
model output is the real one.

`test_real_clip_places_colours_next_to_their_names` needs a real CLIP model and is
skipped without one; run it with
    CLIP_MODEL_PATH=/path/to/clip-ViT-B-32 .venv/bin/pytest -q test_image_embeddings.py -k real_clip
"""
from __future__ import annotations

import base64
import io
import os
import resource
import struct
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import replace

import numpy as np
import pytest
import requests
from PIL import Image, ImageOps

from conftest import (SAME_ENGINE_MIN_COSINE, TEST_API_KEY, assert_same_vectors, bake_and_export, existing,
                      running_service, servers_on, start_live_server)
from config import Settings, SettingsError, load_settings
from image_embeddings import ImageInputError, ImageTooLargeError, decode_base64_image, open_image, to_rgb
from main import create_app
from model_loading import load_models
from model_locator import ModelNotFoundError, locate_model
from batcher import QueueFullError
from self_check import IMAGE_MIN_COSINE
from service import IMAGE_WORK_TOKENS, EmbeddingService
from tiny_clip import TINY_DIMENSION

HEADERS = {"X-API-Key": TEST_API_KEY}
# Small limits for the server that checks the size errors.
SMALL_IMAGE_SIZE = 2000
SMALL_BATCH = 3
# Pillow warns when it opens the header of an image above its own pixel limit; the service then refuses it.
ignore_bomb_warning = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")


# --- the tiny CLIP ------------------------------------------------------------

@pytest.fixture(scope="module")
def clip_settings(tiny_clip_settings) -> Settings:
    return tiny_clip_settings


@pytest.fixture(scope="module")
def clip_service(tiny_clip_service) -> EmbeddingService:
    return tiny_clip_service


@pytest.fixture(scope="module")
def clip_model(tiny_clip_model):
    """The tiny CLIP on torch with its own preprocessing: the reference every vector is checked against."""
    return tiny_clip_model


@pytest.fixture(scope="module")
def clip_server(tiny_clip_server):
    return tiny_clip_server


@pytest.fixture(scope="module")
def small_limits_server(clip_settings, clip_service):
    settings = replace(clip_settings, max_image_size=SMALL_IMAGE_SIZE, max_images_per_batch=SMALL_BATCH)
    live = start_live_server(create_app(settings, existing(clip_service)))
    yield live
    live.stop()


# --- helpers --------------------------------------------------------------------

def encoded(image: Image.Image, image_format: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, image_format, **options)
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def two_colour_image(size=(48, 32), left=(220, 30, 30), right=(30, 30, 220)) -> Image.Image:
    """A non-square image whose halves differ, so rotations and flips change what the model sees."""
    image = Image.new("RGB", size, left)
    image.paste(right, (size[0] // 2, 0, size[0], size[1]))
    image.paste((30, 200, 30), (0, 0, size[0] // 4, size[1] // 4))
    return image


def post(server, path: str, **kwargs) -> requests.Response:
    return requests.post(server.url + path, headers=HEADERS, timeout=60, **kwargs)


def embed_image(server, image_field: str) -> np.ndarray:
    response = post(server, "/embeddings/image", json={"image": image_field})
    assert response.status_code == 200, response.text
    return np.array(response.json()["embeddings"][0], dtype=np.float32)


def reference(model, image: Image.Image) -> np.ndarray:
    """sentence-transformers' own vector for an image."""
    return model.encode([image], convert_to_numpy=True)[0]


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height but whose data holds almost nothing: a decompression bomb."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + chunk(b"IEND", b""))


def error_of(response: requests.Response, status: int) -> str:
    assert response.status_code == status, (response.status_code, response.text)
    return response.json()["error"]


# --- the model is detected and used in one space ----------------------------------

def test_clip_folder_loads_as_multimodal_and_reports_it(clip_server, clip_service):
    response = requests.get(clip_server.url + "/health/ready", timeout=10)
    assert response.status_code == 200
    assert response.json()["supports_images"] is True
    assert clip_service.dimension() == TINY_DIMENSION


def test_text_and_image_vectors_have_the_same_dimension(clip_server):
    text = post(clip_server, "/embeddings", json={"text": "a red square"}).json()["embeddings"][0]
    image = embed_image(clip_server, b64(encoded(two_colour_image())))
    assert len(text) == len(image) == TINY_DIMENSION


def test_clip_text_through_our_path_equals_model_encode(clip_service, clip_model):
    texts = ["a red square", "blue", "A much longer sentence about a small blue square, with punctuation!"]
    ours = np.stack(clip_service.embed_texts(texts).vectors)
    assert_same_vectors(ours, clip_model.encode(texts, convert_to_numpy=True))


def test_clip_special_tokens_and_padding(tiny_clip_models, clip_model):
    text_embedder = tiny_clip_models.text
    tokenizer = clip_model.tokenizer
    assert text_embedder.prefix_ids == [tokenizer.bos_token_id]
    assert text_embedder.suffix_ids == [tokenizer.eos_token_id]
    # CLIP pads with its end token; the text tower pools at the first end token, so padding a short
    # text next to a long one must not change its vector.
    assert text_embedder.tokenizer.pad_id == tokenizer.eos_token_id
    short, long = "red", "red " * 30
    together = text_embedder.embed([short, long])
    assert_same_vectors(together[0], text_embedder.embed([short])[0], SAME_ENGINE_MIN_COSINE)
    assert_same_vectors(together[1], text_embedder.embed([long])[0], SAME_ENGINE_MIN_COSINE)


def test_text_longer_than_77_tokens_is_averaged_over_windows(clip_service, tiny_clip_models, clip_model):
    text_embedder = tiny_clip_models.text
    assert text_embedder.max_seq_length == 77
    # Single-letter words are one token each, so each window decodes back to exactly its words.
    words = [chr(ord("a") + index % 26) for index in range(200)]
    window = text_embedder.window_size
    assert window == 75
    pieces = [" ".join(words[start:start + window]) for start in range(0, len(words), window)]
    piece_vectors = clip_model.encode(pieces, convert_to_numpy=True)
    weights = np.array([min(window, len(words) - start) for start in range(0, len(words), window)], dtype=np.float32)
    expected = (piece_vectors * weights[:, None]).sum(axis=0) / weights.sum()
    result = clip_service.embed_texts([" ".join(words)])
    assert_same_vectors(result.vectors[0], expected)
    assert result.token_count == 200 + 3 * 2


# --- image vectors ----------------------------------------------------------------

def test_image_vector_equals_sentence_transformers_encode(clip_server, clip_model):
    image = two_colour_image()
    assert_same_vectors(embed_image(clip_server, b64(encoded(image))), reference(clip_model, image), IMAGE_MIN_COSINE)


def test_same_image_gives_the_same_vector(clip_server):
    field = b64(encoded(two_colour_image()))
    np.testing.assert_array_equal(embed_image(clip_server, field), embed_image(clip_server, field))


def test_batch_returns_vectors_in_input_order_equal_to_single_requests(clip_server):
    # More images than MAX_BATCH_SIZE (8), so the batch takes two forward passes.
    images = [b64(encoded(Image.new("RGB", (40, 30), (index * 25, 255 - index * 25, (index * 70) % 256))))
              for index in range(11)]
    response = post(clip_server, "/embeddings/image/batch", json={"images": images})
    assert response.status_code == 200, response.text
    batch = response.json()["embeddings"]
    assert len(batch) == len(images)
    for field, vector in zip(images, batch):
        assert_same_vectors(np.array(vector[0]), embed_image(clip_server, field), SAME_ENGINE_MIN_COSINE)
    assert not np.allclose(batch[0][0], batch[1][0])


def test_base64_data_uri_wrapped_base64_and_multipart_give_the_same_vector(clip_server):
    data = encoded(two_colour_image())
    plain = embed_image(clip_server, b64(data))
    data_uri = embed_image(clip_server, "data:image/png;base64," + b64(data))
    wrapped_text = b64(data)
    wrapped = embed_image(clip_server, "\n".join(wrapped_text[i:i + 76] for i in range(0, len(wrapped_text), 76)))
    response = post(clip_server, "/embeddings/image", files={"image": ("picture.png", data, "image/png")})
    assert response.status_code == 200, response.text
    multipart = np.array(response.json()["embeddings"][0], dtype=np.float32)
    for vector in (data_uri, wrapped, multipart):
        np.testing.assert_array_equal(vector, plain)


@pytest.mark.parametrize("image_format, options", [
    ("JPEG", {"quality": 90}), ("PNG", {}), ("WEBP", {"lossless": True}), ("WEBP", {"quality": 80}),
    ("GIF", {}), ("BMP", {}), ("TIFF", {}), ("TIFF", {"compression": "tiff_lzw"}),
])
def test_every_accepted_format_is_embedded(clip_server, clip_model, image_format, options):
    data = encoded(two_colour_image(), image_format, **options)
    decoded = Image.open(io.BytesIO(data)).convert("RGB")
    assert_same_vectors(embed_image(clip_server, b64(data)), reference(clip_model, decoded), IMAGE_MIN_COSINE)


def test_animated_gif_uses_its_first_frame(clip_server, clip_model):
    red, blue = Image.new("RGB", (40, 40), (255, 0, 0)), Image.new("RGB", (40, 40), (0, 0, 255))
    data = encoded(red, "GIF", save_all=True, append_images=[blue], duration=100, loop=0)
    assert Image.open(io.BytesIO(data)).n_frames == 2
    vector = embed_image(clip_server, b64(data))
    assert_same_vectors(vector, reference(clip_model, red), IMAGE_MIN_COSINE)
    assert not np.allclose(vector, reference(clip_model, blue), atol=1e-3)


def sixteen_bit_grey(value: int, size=(24, 24)) -> Image.Image:
    return Image.frombytes("I;16", size, np.full(size[::-1], value, dtype="<u2").tobytes())


@pytest.mark.parametrize("name, image, image_format, expected_rgb", [
    ("RGBA opaque", Image.new("RGBA", (30, 20), (200, 40, 10, 255)), "PNG", Image.new("RGB", (30, 20), (200, 40, 10))),
    ("RGBA transparent shows white", Image.new("RGBA", (30, 20), (200, 40, 10, 0)), "PNG",
     Image.new("RGB", (30, 20), (255, 255, 255))),
    ("P", two_colour_image().convert("P"), "PNG", two_colour_image().convert("P").convert("RGB")),
    ("L", Image.new("L", (30, 20), 90), "PNG", Image.new("RGB", (30, 20), (90, 90, 90))),
    ("LA half transparent", Image.new("LA", (30, 20), (0, 128)), "PNG", Image.new("RGB", (30, 20), (127, 127, 127))),
    ("CMYK", Image.new("CMYK", (30, 20), (0, 255, 255, 0)), "TIFF", Image.new("RGB", (30, 20), (255, 0, 0))),
    ("I;16 scaled to 8 bits", sixteen_bit_grey(0x8000), "PNG", Image.new("RGB", (24, 24), (128, 128, 128))),
])
def test_every_mode_is_converted_to_rgb(clip_server, clip_model, name, image, image_format, expected_rgb):
    data = encoded(image, image_format)
    assert Image.open(io.BytesIO(data)).mode == image.mode
    assert_same_vectors(embed_image(clip_server, b64(data)), reference(clip_model, expected_rgb), IMAGE_MIN_COSINE)


def test_cmyk_jpeg_is_accepted(clip_server):
    data = encoded(Image.new("CMYK", (30, 20), (0, 255, 255, 0)), "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    assert embed_image(clip_server, b64(data)).shape == (TINY_DIMENSION,)


def test_exif_orientation_is_honoured(clip_server, clip_model):
    upright_image = two_colour_image(size=(32, 48))
    # Stored turned on its side, with a tag saying "rotate 90 degrees clockwise to view" (6).
    stored = upright_image.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encoded(stored, "PNG", exif=exif)
    assert ImageOps.exif_transpose(Image.open(io.BytesIO(data))).tobytes() == upright_image.tobytes()
    vector = embed_image(clip_server, b64(data))
    assert_same_vectors(vector, reference(clip_model, upright_image), IMAGE_MIN_COSINE)
    assert not np.allclose(vector, reference(clip_model, stored), atol=1e-3)


# --- decoding rules, without HTTP -------------------------------------------------------

def test_data_uri_must_be_base64():
    with pytest.raises(ImageInputError, match="not base64-encoded"):
        decode_base64_image("data:image/png,%89PNG", 1000)
    with pytest.raises(ImageInputError, match="','"):
        decode_base64_image("data:image/png;base64", 1000)
    assert decode_base64_image("DATA:image/png;charset=x;BASE64,aGk=", 1000) == b"hi"


def test_size_is_refused_from_the_base64_length_before_decoding():
    # Not valid base64 at all, yet refused as too large: the length alone decides.
    with pytest.raises(ImageTooLargeError, match="MAX_IMAGE_SIZE"):
        decode_base64_image("!" * 4000, 2000)
    assert len(decode_base64_image(b64(b"x" * 2000), 2000)) == 2000
    with pytest.raises(ImageTooLargeError):
        decode_base64_image(b64(b"x" * 2001), 2000)


@ignore_bomb_warning
def test_pixel_limit_is_checked_from_the_header_before_decoding():
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for width, height in [(100_000, 100_000), (10_000, 10_000), (8_000, 7_000)]:
        with pytest.raises(ImageTooLargeError, match="pixels"):
            open_image(png_header_only(width, height), 50_000_000)
    # 8000 x 7000 RGB pixels would take 168 MB; none were allocated.
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before < 50_000  # kilobytes
    with pytest.raises(ImageTooLargeError, match="MAX_IMAGE_PIXELS"):
        open_image(encoded(Image.new("RGB", (100, 100))), 9_999)


def test_max_image_pixels_setting():
    assert load_settings({}).max_image_pixels == 50_000_000
    assert load_settings({"MAX_IMAGE_PIXELS": "1000"}).max_image_pixels == 1000
    with pytest.raises(SettingsError, match="MAX_IMAGE_PIXELS"):
        load_settings({"MAX_IMAGE_PIXELS": "lots"})


def test_sixteen_bit_samples_are_scaled_not_clipped():
    grey = to_rgb(sixteen_bit_grey(0x4000))
    assert grey.mode == "RGB"
    assert grey.getpixel((0, 0)) == (64, 64, 64)


# --- errors over HTTP --------------------------------------------------------------------

def test_invalid_base64_is_400(clip_server):
    for bad in ["not base64!", "abc", "a===", "QUJD\u00e9"]:
        assert "base64" in error_of(post(clip_server, "/embeddings/image", json={"image": bad}), 400)


@pytest.mark.parametrize("body, words", [
    ({}, "Missing field 'image'"),
    ({"image": 12}, "must be a base64 string"),
    ({"image": ""}, "no base64 data"),
    ({"image": "   "}, "no base64 data"),
])
def test_missing_or_wrong_field_is_400(clip_server, body, words):
    assert words in error_of(post(clip_server, "/embeddings/image", json=body), 400)


def test_image_over_max_image_size_is_413_before_decoding(small_limits_server):
    too_big = b64(encoded(Image.effect_noise((64, 64), 64).convert("RGB")))
    assert len(too_big) * 3 // 4 > SMALL_IMAGE_SIZE
    assert "MAX_IMAGE_SIZE" in error_of(post(small_limits_server, "/embeddings/image", json={"image": too_big}), 413)
    # Garbage of the same length is refused for its size too: it was never decoded.
    error_of(post(small_limits_server, "/embeddings/image", json={"image": "!" * len(too_big)}), 413)


def test_multipart_upload_over_max_image_size_is_413(small_limits_server):
    response = post(small_limits_server, "/embeddings/image", files={"image": ("big.bin", b"\xff" * 5000)})
    assert "MAX_IMAGE_SIZE" in error_of(response, 413)


def test_multipart_without_the_image_file_is_400(clip_server):
    assert "-F image=@" in error_of(post(clip_server, "/embeddings/image", files={"photo": ("a.png", b"x")}), 400)
    response = post(clip_server, "/embeddings/image", data={"image": "abc"}, files={"other": ("a.png", b"x")})
    assert "is text, not a file" in error_of(response, 400)


@pytest.mark.parametrize("name, data, words", [
    ("text", b"hello, I am not an image", "not a readable image"),
    ("empty", b"", "empty (0 bytes)"),
    ("truncated PNG", encoded(Image.effect_noise((64, 64), 64))[:400], "truncated"),
    ("JPEG cut in its header", encoded(Image.effect_noise((64, 64), 64).convert("RGB"), "JPEG")[:300], "truncated"),
    ("JPEG cut in its data", encoded(Image.effect_noise((64, 64), 64).convert("RGB"), "JPEG")[:-600], "truncated"),
    ("zero-size PNG", png_header_only(0, 10), "zero width or height"),
    ("unsupported format (ICO)", encoded(Image.new("RGB", (16, 16)), "ICO"), "not a readable image"),
])
def test_unusable_bytes_are_400(clip_server, name, data, words):
    response = post(clip_server, "/embeddings/image", files={"image": ("upload", data)})
    assert words in error_of(response, 400)
    if data:
        response = post(clip_server, "/embeddings/image", json={"image": b64(data)})
        assert words in error_of(response, 400)


@ignore_bomb_warning
@pytest.mark.parametrize("width, height", [(100_000, 100_000), (10_000, 10_000), (8_000, 7_000)])
def test_decompression_bomb_is_413(clip_server, width, height):
    data = png_header_only(width, height)
    assert len(data) < 100
    assert "pixels" in error_of(post(clip_server, "/embeddings/image", json={"image": b64(data)}), 413)


def test_an_image_that_takes_too_much_memory_to_decode_is_413(clip_settings):
    # 300x300: WebP takes about 17 bytes a pixel to decode (1.5 MB), PNG about 5 (0.45 MB).
    settings = replace(clip_settings, max_image_decode_bytes=1_000_000)
    picture = two_colour_image((300, 300))
    with servers_on(settings, load_models(settings)) as start:
        live = start()
        message = error_of(post(live, "/embeddings/image", json={"image": b64(encoded(picture, "WEBP"))}), 413)
        assert post(live, "/embeddings/image", json={"image": b64(encoded(picture, "PNG"))}).status_code == 200
    assert message.startswith("image is a 300x300 WEBP file, which takes about 1 MiB to decode")
    assert "MAX_IMAGE_DECODE_BYTES" in message and "send it as JPEG" in message


def test_batch_with_one_bad_image_names_its_index(clip_server):
    good = b64(encoded(two_colour_image()))
    response = post(clip_server, "/embeddings/image/batch", json={"images": [good, good, b64(b"not an image")]})
    assert error_of(response, 400).startswith("images[2] holds bytes that are not a readable image")
    response = post(clip_server, "/embeddings/image/batch", json={"images": [good, "***", good]})
    assert error_of(response, 400).startswith("images[1] is not valid base64")
    response = post(clip_server, "/embeddings/image/batch", json={"images": [good, 7]})
    assert error_of(response, 400).startswith("images[1] must be a base64 string")
    response = post(clip_server, "/embeddings/image/batch", json={"images": [b64(png_header_only(9000, 9000))]})
    assert error_of(response, 413).startswith("images[0] is 9000x9000")


def test_batch_size_limits(small_limits_server):
    good = b64(encoded(Image.new("RGB", (8, 8))))
    response = post(small_limits_server, "/embeddings/image/batch", json={"images": [good] * (SMALL_BATCH + 1)})
    assert "MAX_IMAGES_PER_BATCH" in error_of(response, 400)
    assert "at least one image" in error_of(post(small_limits_server, "/embeddings/image/batch",
                                                 json={"images": []}), 400)
    assert "array" in error_of(post(small_limits_server, "/embeddings/image/batch", json={"images": good}), 400)
    response = post(small_limits_server, "/embeddings/image/batch", files={"images": ("a.png", b"x")})
    assert "takes JSON" in error_of(response, 400)


def test_image_routes_need_the_api_key(clip_server):
    response = requests.post(clip_server.url + "/embeddings/image", json={"image": "aGk="}, timeout=10)
    assert response.status_code == 401


def test_worker_is_healthy_after_every_error(clip_server, clip_model):
    assert requests.get(clip_server.url + "/health/ready", timeout=10).status_code == 200
    image = two_colour_image()
    assert_same_vectors(embed_image(clip_server, b64(encoded(image))), reference(clip_model, image), IMAGE_MIN_COSINE)


# --- a text-only model --------------------------------------------------------------

def test_text_only_model_answers_400_naming_the_model(server):
    assert requests.get(server.url + "/health/ready", timeout=10).json()["supports_images"] is False
    image = b64(encoded(two_colour_image()))
    for path, body in [("/embeddings/image", {"image": image}), ("/embeddings/image/batch", {"images": [image]})]:
        message = error_of(post(server, path, json=body), 400)
        assert "all-MiniLM-L6-v2" in message and "clip-ViT-B-32" in message and "EMBEDDING_MODEL" in message
    response = post(server, "/embeddings/image", files={"image": ("a.png", b"x")})
    assert response.status_code == 400


# --- a real CLIP model, when one is present --------------------------------------------

def real_clip_folder() -> str | None:
    """CLIP_MODEL_PATH, or clip-ViT-B-32 where the service itself would find it without downloading."""
    if os.environ.get("CLIP_MODEL_PATH"):
        return os.environ["CLIP_MODEL_PATH"]
    try:
        return locate_model("clip-ViT-B-32", Settings().models_dir, allow_download=False).path
    except ModelNotFoundError:
        return None


@pytest.mark.skipif(real_clip_folder() is None,
                    reason="needs a real CLIP model: set CLIP_MODEL_PATH to a clip-ViT-B-32 folder")
def test_real_clip_places_colours_next_to_their_names(tmp_path):
    # Upstream measured with clip-ViT-B-32: red text vs red square 0.294, vs blue square 0.233;
    # blue text vs blue square 0.293, vs red square 0.237.
    settings = Settings(api_keys=(TEST_API_KEY,), embedding_model=real_clip_folder(), models_dir=str(tmp_path))
    bake_and_export(settings)
    with running_service(settings) as service:
        live = start_live_server(create_app(settings, existing(service)))
        try:
            red = embed_image(live, b64(encoded(Image.new("RGB", (224, 224), (255, 0, 0)))))
            blue = embed_image(live, b64(encoded(Image.new("RGB", (224, 224), (0, 0, 255)))))
            texts = post(live, "/embeddings/batch", json={"texts": ["a solid red color", "a solid blue color"]})
            red_text, blue_text = (np.array(vector[0]) for vector in texts.json()["embeddings"])
        finally:
            live.stop()
    assert cosine(red_text, red) > cosine(red_text, blue)
    assert cosine(blue_text, blue) > cosine(blue_text, red)


def test_image_overload_gets_429_at_once_and_accepted_images_are_correct(
        clip_settings, tiny_clip_models, clip_model, monkeypatch):
    # The queue holds one image request's work besides the one in the model.
    with running_service(replace(clip_settings, queue_max_tokens=IMAGE_WORK_TOKENS),
                         lambda _: tiny_clip_models) as service:
        check_image_overload(service, tiny_clip_models.images, clip_model, monkeypatch)


def check_image_overload(service, image_embedder, clip_model, monkeypatch):
    gate, entered = threading.Event(), threading.Event()
    real_embed = image_embedder.embed_prepared

    def held_model(prepared):  # a model call held until the test lets it through, so requests pile up
        entered.set()
        gate.wait()
        return real_embed(prepared)

    monkeypatch.setattr(image_embedder, "embed_prepared", held_model)
    images = [Image.new("RGB", (40, 30), color) for color in ("red", "green", "blue", "white")]
    with ThreadPoolExecutor(3) as pool:
        try:
            in_model = pool.submit(service.embed_images, [encoded(images[0])])
            assert entered.wait(30)
            contenders = {pool.submit(service.embed_images, [encoded(image)]): image for image in images[1:3]}
            # One fits in the queue; the other is refused at once, while the model is still held.
            refused = next(as_completed(contenders, timeout=30))
            with pytest.raises(QueueFullError):
                refused.result()
        finally:
            gate.set()
        [accepted] = [future for future in contenders if future is not refused]
        for image, future in [(images[0], in_model), (contenders[accepted], accepted)]:
            assert_same_vectors(future.result(30)[0], clip_model.encode([image])[0], IMAGE_MIN_COSINE)
    assert len(service.embed_images([encoded(images[3])])) == 1


# --- the OpenAI-compatible route with a CLIP model (issue 6) -------------------

def openai_embed(server, items, **fields) -> requests.Response:
    served = requests.get(server.url + "/v1/models", headers=HEADERS, timeout=10).json()["data"][0]["id"]
    return requests.post(server.url + "/v1/embeddings", headers=HEADERS, timeout=60,
                         json={"model": served, "input": items, **fields})


def test_openai_route_embeds_image_data_uris_and_texts_in_one_space(clip_server):
    red_square = "data:image/png;base64," + b64(encoded(Image.new("RGB", (40, 40), (220, 30, 30))))
    picture = "data:image/jpeg;base64," + b64(encoded(two_colour_image(), "JPEG"))
    answer = openai_embed(clip_server, ["a red square", red_square, picture], encoding_format="float")
    assert answer.status_code == 200, answer.text
    vectors = [np.array(item["embedding"], dtype=np.float32) for item in answer.json()["data"]]
    assert_same_vectors(vectors[1], embed_image(clip_server, red_square), SAME_ENGINE_MIN_COSINE)
    assert_same_vectors(vectors[2], embed_image(clip_server, picture), SAME_ENGINE_MIN_COSINE)
    text_only = post(clip_server, "/embeddings", json={"text": "a red square"}).json()["embeddings"][0]
    assert_same_vectors(vectors[0], text_only, SAME_ENGINE_MIN_COSINE)
    assert len({len(vector) for vector in vectors}) == 1
    # Images count no tokens: usage is the text's tokens alone.
    text_usage = openai_embed(clip_server, "a red square").json()["usage"]
    assert answer.json()["usage"] == text_usage


def test_openai_route_names_the_unusable_image_by_its_place_in_input(clip_server):
    good = "data:image/png;base64," + b64(encoded(Image.new("RGB", (40, 40), (220, 30, 30))))
    not_an_image = "data:image/png;base64," + b64(b"this is not a picture at all")
    answer = openai_embed(clip_server, ["some text", good, not_an_image])
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["message"].startswith("input[2] ") and error["param"] == "input"
    bad_base64 = openai_embed(clip_server, ["data:image/png;base64,@@@@"])
    assert bad_base64.status_code == 400 and bad_base64.json()["error"]["message"].startswith("input[0]")
