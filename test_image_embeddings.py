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

import io
import os
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import replace

import numpy as np
import pytest
import requests
from PIL import Image, ImageOps

from batcher import QueueFullError
from config import Settings
from image_embeddings import ImageInputError, ImageTooLargeError, decode_base64_image, open_image, to_rgb
from model_loading import load_models
from model_locator import ModelNotFoundError, locate_model
from self_check import IMAGE_MIN_COSINE
from service import IMAGE_WORK_TOKENS
from testkit import (AUTH, SAME_ENGINE_MIN_COSINE, TEST_API_KEY, app_without_model, assert_same_vectors, b64,
                     bake_and_export, cosine, encoded, error_of, png_header_only, post, run_python, running_service,
                     servers_on, serving)
from tiny_clip import TINY_DIMENSION

# Small limits for the app that checks the size errors.
SMALL_IMAGE_SIZE = 2000
SMALL_BATCH = 3
# Pillow warns when it opens the header of an image above its own pixel limit; the service then refuses it.
ignore_bomb_warning = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")


# --- helpers --------------------------------------------------------------------

def two_colour_image(size=(48, 32), left=(220, 30, 30), right=(30, 30, 220)) -> Image.Image:
    """A non-square image whose halves differ, so rotations and flips change what the model sees."""
    image = Image.new("RGB", size, left)
    image.paste(right, (size[0] // 2, 0, size[0], size[1]))
    image.paste((30, 200, 30), (0, 0, size[0] // 4, size[1] // 4))
    return image


def embed_image(server, image_field: str) -> np.ndarray:
    response = post(server, "/embeddings/image", json={"image": image_field})
    assert response.status_code == 200, response.text
    return np.array(response.json()["embeddings"][0], dtype=np.float32)


def reference(model, image: Image.Image) -> np.ndarray:
    """sentence-transformers' own vector for an image."""
    return model.encode([image], convert_to_numpy=True)[0]


def upload(data: bytes, name: str = "upload") -> dict:
    """A multipart form's file field as Flask's test client takes it."""
    return {"image": (io.BytesIO(data), name)}


# --- the model is detected and used in one space ----------------------------------

def test_clip_folder_loads_as_multimodal_and_reports_it(tiny_clip_server, tiny_clip_service):
    response = requests.get(tiny_clip_server.url + "/health/ready", timeout=10)
    assert response.status_code == 200
    assert response.json()["supports_images"] is True
    assert tiny_clip_service.dimension() == TINY_DIMENSION


def test_text_and_image_vectors_have_the_same_dimension(tiny_clip_server):
    text = post(tiny_clip_server, "/embeddings", json={"text": "a red square"}).json()["embeddings"][0]
    image = embed_image(tiny_clip_server, b64(encoded(two_colour_image())))
    assert len(text) == len(image) == TINY_DIMENSION


def test_clip_text_through_our_path_equals_model_encode(tiny_clip_service, tiny_clip_model):
    texts = ["a red square", "blue", "A much longer sentence about a small blue square, with punctuation!"]
    ours = np.stack(tiny_clip_service.embed_texts(texts).vectors)
    assert_same_vectors(ours, tiny_clip_model.encode(texts, convert_to_numpy=True))


def test_clip_special_tokens_and_padding(tiny_clip_models, tiny_clip_model):
    text_embedder = tiny_clip_models.text
    tokenizer = tiny_clip_model.tokenizer
    assert text_embedder.prefix_ids == [tokenizer.bos_token_id]
    assert text_embedder.suffix_ids == [tokenizer.eos_token_id]
    # CLIP pads with its end token; the text tower pools at the first end token, so padding a short
    # text next to a long one must not change its vector.
    assert text_embedder.tokenizer.pad_id == tokenizer.eos_token_id
    short, long = "red", "red " * 30
    together = text_embedder.embed([short, long])
    assert_same_vectors(together[0], text_embedder.embed([short])[0], SAME_ENGINE_MIN_COSINE)
    assert_same_vectors(together[1], text_embedder.embed([long])[0], SAME_ENGINE_MIN_COSINE)


def test_text_longer_than_77_tokens_is_averaged_over_windows(tiny_clip_service, tiny_clip_models, tiny_clip_model):
    text_embedder = tiny_clip_models.text
    assert text_embedder.max_seq_length == 77
    # Single-letter words are one token each, so each window decodes back to exactly its words.
    words = [chr(ord("a") + index % 26) for index in range(200)]
    window = text_embedder.window_size
    assert window == 75
    pieces = [" ".join(words[start:start + window]) for start in range(0, len(words), window)]
    piece_vectors = tiny_clip_model.encode(pieces, convert_to_numpy=True)
    weights = np.array([min(window, len(words) - start) for start in range(0, len(words), window)], dtype=np.float32)
    expected = (piece_vectors * weights[:, None]).sum(axis=0) / weights.sum()
    result = tiny_clip_service.embed_texts([" ".join(words)])
    assert_same_vectors(result.vectors[0], expected)
    assert result.token_count == 200 + 3 * 2


# --- image vectors ----------------------------------------------------------------

def test_image_vector_equals_sentence_transformers_encode(tiny_clip_server, tiny_clip_model):
    image = two_colour_image()
    assert_same_vectors(embed_image(tiny_clip_server, b64(encoded(image))), reference(tiny_clip_model, image),
                        IMAGE_MIN_COSINE)


def test_same_image_gives_the_same_vector(tiny_clip_server):
    field = b64(encoded(two_colour_image()))
    np.testing.assert_array_equal(embed_image(tiny_clip_server, field), embed_image(tiny_clip_server, field))


def test_batch_returns_vectors_in_input_order_equal_to_single_requests(tiny_clip_server):
    # More images than MAX_BATCH_SIZE (8), so the batch takes two forward passes.
    images = [b64(encoded(Image.new("RGB", (40, 30), (index * 25, 255 - index * 25, (index * 70) % 256))))
              for index in range(11)]
    response = post(tiny_clip_server, "/embeddings/image/batch", json={"images": images})
    assert response.status_code == 200, response.text
    batch = response.json()["embeddings"]
    assert len(batch) == len(images)
    for field, vector in zip(images, batch):
        assert_same_vectors(np.array(vector[0]), embed_image(tiny_clip_server, field), SAME_ENGINE_MIN_COSINE)
    assert not np.allclose(batch[0][0], batch[1][0])


def test_base64_data_uri_wrapped_base64_and_multipart_give_the_same_vector(tiny_clip_server):
    data = encoded(two_colour_image())
    plain = embed_image(tiny_clip_server, b64(data))
    data_uri = embed_image(tiny_clip_server, "data:image/png;base64," + b64(data))
    wrapped_text = b64(data)
    wrapped = embed_image(tiny_clip_server, "\n".join(wrapped_text[i:i + 76] for i in range(0, len(wrapped_text), 76)))
    response = post(tiny_clip_server, "/embeddings/image", files={"image": ("picture.png", data, "image/png")})
    assert response.status_code == 200, response.text
    multipart = np.array(response.json()["embeddings"][0], dtype=np.float32)
    for vector in (data_uri, wrapped, multipart):
        np.testing.assert_array_equal(vector, plain)


@pytest.mark.parametrize("image_format, options", [
    ("JPEG", {"quality": 90}), ("PNG", {}), ("WEBP", {"lossless": True}), ("WEBP", {"quality": 80}),
    ("GIF", {}), ("BMP", {}), ("TIFF", {}), ("TIFF", {"compression": "tiff_lzw"}),
])
def test_every_accepted_format_is_embedded(tiny_clip_server, tiny_clip_model, image_format, options):
    data = encoded(two_colour_image(), image_format, **options)
    decoded = Image.open(io.BytesIO(data)).convert("RGB")
    assert_same_vectors(embed_image(tiny_clip_server, b64(data)), reference(tiny_clip_model, decoded), IMAGE_MIN_COSINE)


def test_animated_gif_uses_its_first_frame(tiny_clip_server, tiny_clip_model):
    red, blue = Image.new("RGB", (40, 40), (255, 0, 0)), Image.new("RGB", (40, 40), (0, 0, 255))
    data = encoded(red, "GIF", save_all=True, append_images=[blue], duration=100, loop=0)
    assert Image.open(io.BytesIO(data)).n_frames == 2
    vector = embed_image(tiny_clip_server, b64(data))
    assert_same_vectors(vector, reference(tiny_clip_model, red), IMAGE_MIN_COSINE)
    assert not np.allclose(vector, reference(tiny_clip_model, blue), atol=1e-3)


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
def test_every_mode_is_converted_to_rgb(tiny_clip_server, tiny_clip_model, name, image, image_format, expected_rgb):
    data = encoded(image, image_format)
    assert Image.open(io.BytesIO(data)).mode == image.mode
    assert_same_vectors(embed_image(tiny_clip_server, b64(data)), reference(tiny_clip_model, expected_rgb),
                        IMAGE_MIN_COSINE)


def test_cmyk_jpeg_is_accepted(tiny_clip_server):
    data = encoded(Image.new("CMYK", (30, 20), (0, 255, 255, 0)), "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    assert embed_image(tiny_clip_server, b64(data)).shape == (TINY_DIMENSION,)


def test_exif_orientation_is_honoured(tiny_clip_server, tiny_clip_model):
    upright_image = two_colour_image(size=(32, 48))
    # Stored turned on its side, with a tag saying "rotate 90 degrees clockwise to view" (6).
    stored = upright_image.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encoded(stored, "PNG", exif=exif)
    assert ImageOps.exif_transpose(Image.open(io.BytesIO(data))).tobytes() == upright_image.tobytes()
    vector = embed_image(tiny_clip_server, b64(data))
    assert_same_vectors(vector, reference(tiny_clip_model, upright_image), IMAGE_MIN_COSINE)
    assert not np.allclose(vector, reference(tiny_clip_model, stored), atol=1e-3)


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


# Run in a fresh process, whose peak memory is its own: the test process's peak is whatever its largest test held.
# The peak is read from /proc (VmHWM), not ru_maxrss, which a child inherits from its parent's peak on Linux. After
# the images refused from their headers, one image that fits is really decoded: the measure sees decoding.
MEASURE_HEADER_CHECKS = """
import gc, io, json, sys
from PIL import Image
from image_embeddings import ImageTooLargeError, open_image

def memory_kb(field):
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))

small = io.BytesIO()
Image.new("RGB", (8, 8), "teal").save(small, "PNG")
open_image(small.getvalue(), 50_000_000)  # Pillow's PNG plugin loaded and warmed up
fits, *bombs = [open(path, "rb").read() for path in sys.argv[1:]]
gc.collect()
before = {"peak_kb": memory_kb("VmHWM"), "resident_kb": memory_kb("VmRSS")}
refused = []
for data in bombs:
    try:
        open_image(data, 50_000_000)
    except ImageTooLargeError as error:
        refused.append(str(error))
after_refusals = memory_kb("VmHWM")
open_image(fits, 50_000_000)
print(json.dumps({**before, "refused": refused, "after_refusals_kb": after_refusals,
                  "after_decoding_kb": memory_kb("VmHWM")}))
"""


def test_pixel_limit_is_checked_from_the_header_before_decoding(tmp_path):
    fits = tmp_path / "3000x3000.png"
    Image.new("RGB", (3000, 3000), "teal").save(fits, "PNG")
    bombs = []
    for width, height in [(100_000, 100_000), (10_000, 10_000), (8_000, 7_000)]:
        bombs.append(tmp_path / f"{width}x{height}.png")
        bombs[-1].write_bytes(png_header_only(width, height))
    measured = run_python(MEASURE_HEADER_CHECKS, str(fits), *map(str, bombs))
    assert len(measured["refused"]) == len(bombs), measured
    assert all("pixels" in message for message in measured["refused"]), measured
    # The peak before was what the process held then, so any memory the checks took would raise it.
    assert measured["peak_kb"] - measured["resident_kb"] < 20 * 1024, measured
    # 8000 x 7000 RGB pixels would take 168 MB: none were allocated. Decoding 3000 x 3000 (27 MB) shows.
    assert measured["after_refusals_kb"] - measured["peak_kb"] < 5 * 1024, measured
    assert measured["after_decoding_kb"] - measured["after_refusals_kb"] > 20 * 1024, measured


def test_max_image_pixels_is_refused_from_the_header():
    with pytest.raises(ImageTooLargeError, match="MAX_IMAGE_PIXELS"):
        open_image(encoded(Image.new("RGB", (100, 100))), 9_999)


def test_sixteen_bit_samples_are_scaled_not_clipped():
    grey = to_rgb(sixteen_bit_grey(0x4000))
    assert grey.mode == "RGB"
    assert grey.getpixel((0, 0)) == (64, 64, 64)


# --- errors refused before any image is decoded: the app on a stand-in service, no model ----------------

@pytest.mark.parametrize("bad", ["not base64!", "abc", "a===", "QUJD\u00e9"])
def test_invalid_base64_is_400(bad):
    message = error_of(app_without_model(images=True).post("/embeddings/image", {"image": bad}), 400)
    assert message.startswith("image is not valid base64"), message


def test_invalid_base64_is_400_on_a_real_server_as_without_a_model(tiny_clip_server):
    """End to end on the tiny CLIP: the same answer as the app on the stand-in service gives."""
    real = post(tiny_clip_server, "/embeddings/image", {"image": "abc"})
    without_model = app_without_model(images=True).post("/embeddings/image", {"image": "abc"})
    assert (real.status_code, real.json()) == (without_model.status_code, without_model.get_json())
    assert real.status_code == 400


@pytest.mark.parametrize("body, words", [
    ({}, "Missing field 'image'"),
    ({"image": 12}, "must be a base64 string"),
    ({"image": ""}, "no base64 data"),
    ({"image": "   "}, "no base64 data"),
])
def test_missing_or_wrong_field_is_400(body, words):
    assert words in error_of(app_without_model(images=True).post("/embeddings/image", body), 400)


def test_image_over_max_image_size_is_413_before_decoding():
    app = app_without_model(images=True, max_image_size=SMALL_IMAGE_SIZE)
    too_big = b64(encoded(Image.effect_noise((64, 64), 64).convert("RGB")))
    assert len(too_big) * 3 // 4 > SMALL_IMAGE_SIZE
    assert "MAX_IMAGE_SIZE" in error_of(app.post("/embeddings/image", {"image": too_big}), 413)
    # Garbage of the same length is refused for its size too: it was never decoded.
    assert "MAX_IMAGE_SIZE" in error_of(app.post("/embeddings/image", {"image": "!" * len(too_big)}), 413)


def test_multipart_upload_over_max_image_size_is_413():
    app = app_without_model(images=True, max_image_size=SMALL_IMAGE_SIZE)
    response = app.post("/embeddings/image", data=upload(b"\xff" * 5000, "big.bin"))
    assert "MAX_IMAGE_SIZE" in error_of(response, 413)


def test_multipart_without_the_image_file_is_400():
    app = app_without_model(images=True)
    assert "-F image=@" in error_of(app.post("/embeddings/image", data={"photo": (io.BytesIO(b"x"), "a.png")}), 400)
    response = app.post("/embeddings/image", data={"image": "abc", "other": (io.BytesIO(b"x"), "a.png")})
    assert "is text, not a file" in error_of(response, 400)


def test_batch_size_limits():
    app = app_without_model(images=True, max_images_per_batch=SMALL_BATCH)
    good = b64(encoded(Image.new("RGB", (8, 8))))
    response = app.post("/embeddings/image/batch", {"images": [good] * (SMALL_BATCH + 1)})
    assert "MAX_IMAGES_PER_BATCH" in error_of(response, 400)
    assert "at least one image" in error_of(app.post("/embeddings/image/batch", {"images": []}), 400)
    assert "array" in error_of(app.post("/embeddings/image/batch", {"images": good}), 400)
    response = app.post("/embeddings/image/batch", data={"images": (io.BytesIO(b"x"), "a.png")})
    assert "takes JSON" in error_of(response, 400)


def test_image_routes_need_the_api_key():
    response = app_without_model(images=True).post("/embeddings/image", {"image": "aGk="}, headers={})
    assert response.status_code == 401


def test_a_text_only_model_answers_501_naming_the_model():
    app = app_without_model()
    image = b64(encoded(two_colour_image()))
    for path, body in [("/embeddings/image", {"image": image}), ("/embeddings/image/batch", {"images": [image]})]:
        message = error_of(app.post(path, body), 501)
        assert "all-MiniLM-L6-v2" in message and "clip-ViT-B-32" in message and "EMBEDDING_MODEL" in message
    assert "embeds text only" in error_of(app.post("/embeddings/image", data=upload(b"x", "a.png")), 501)


# --- errors of images that are decoded, on the tiny CLIP ------------------------------------------


@pytest.mark.parametrize("name, data, words", [
    ("text", b"hello, I am not an image", "not a readable image"),
    ("empty", b"", "empty (0 bytes)"),
    ("truncated PNG", encoded(Image.effect_noise((64, 64), 64))[:400], "truncated"),
    ("JPEG cut in its header", encoded(Image.effect_noise((64, 64), 64).convert("RGB"), "JPEG")[:300], "truncated"),
    ("JPEG cut in its data", encoded(Image.effect_noise((64, 64), 64).convert("RGB"), "JPEG")[:-600], "truncated"),
    ("zero-size PNG", png_header_only(0, 10), "zero width or height"),
    ("unsupported format (ICO)", encoded(Image.new("RGB", (16, 16)), "ICO"), "not a readable image"),
])
def test_unusable_bytes_are_400(tiny_clip_server, name, data, words):
    response = post(tiny_clip_server, "/embeddings/image", files={"image": ("upload", data)})
    assert words in error_of(response, 400)
    if data:
        response = post(tiny_clip_server, "/embeddings/image", json={"image": b64(data)})
        assert words in error_of(response, 400)


@ignore_bomb_warning
@pytest.mark.parametrize("width, height", [(100_000, 100_000), (10_000, 10_000), (8_000, 7_000)])
def test_decompression_bomb_is_413(tiny_clip_server, width, height):
    data = png_header_only(width, height)
    assert len(data) < 100
    assert "pixels" in error_of(post(tiny_clip_server, "/embeddings/image", json={"image": b64(data)}), 413)


def test_an_image_that_takes_too_much_memory_to_decode_is_413(tiny_clip_settings):
    # 300x300: WebP takes about 17 bytes a pixel to decode (1.5 MB), PNG about 5 (0.45 MB).
    settings = replace(tiny_clip_settings, max_image_decode_bytes=1_000_000)
    picture = two_colour_image((300, 300))
    with servers_on(settings, load_models(settings)) as start:
        live = start()
        message = error_of(post(live, "/embeddings/image", json={"image": b64(encoded(picture, "WEBP"))}), 413)
        assert post(live, "/embeddings/image", json={"image": b64(encoded(picture, "PNG"))}).status_code == 200
    assert message.startswith("image is a 300x300 WEBP file, which takes about 1 MiB to decode")
    assert "MAX_IMAGE_DECODE_BYTES" in message and "send it as JPEG" in message


def test_batch_with_one_bad_image_names_its_index(tiny_clip_server):
    good = b64(encoded(two_colour_image()))
    response = post(tiny_clip_server, "/embeddings/image/batch", json={"images": [good, good, b64(b"not an image")]})
    assert error_of(response, 400).startswith("images[2] holds bytes that are not a readable image")
    response = post(tiny_clip_server, "/embeddings/image/batch", json={"images": [good, "***", good]})
    assert error_of(response, 400).startswith("images[1] is not valid base64")
    response = post(tiny_clip_server, "/embeddings/image/batch", json={"images": [good, 7]})
    assert error_of(response, 400).startswith("images[1] must be a base64 string")
    response = post(tiny_clip_server, "/embeddings/image/batch", json={"images": [b64(png_header_only(9000, 9000))]})
    assert error_of(response, 413).startswith("images[0] is 9000x9000")


def test_worker_is_healthy_after_every_error(tiny_clip_server, tiny_clip_model):
    assert requests.get(tiny_clip_server.url + "/health/ready", timeout=10).status_code == 200
    image = two_colour_image()
    assert_same_vectors(embed_image(tiny_clip_server, b64(encoded(image))), reference(tiny_clip_model, image),
                        IMAGE_MIN_COSINE)


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
    with running_service(settings) as service, serving(settings, service) as live:
        red = embed_image(live, b64(encoded(Image.new("RGB", (224, 224), (255, 0, 0)))))
        blue = embed_image(live, b64(encoded(Image.new("RGB", (224, 224), (0, 0, 255)))))
        texts = post(live, "/embeddings/batch", json={"texts": ["a solid red color", "a solid blue color"]})
        red_text, blue_text = (np.array(vector[0]) for vector in texts.json()["embeddings"])
    assert cosine(red_text, red) > cosine(red_text, blue)
    assert cosine(blue_text, blue) > cosine(blue_text, red)


def test_image_overload_gets_429_at_once_and_accepted_images_are_correct(
        tiny_clip_settings, tiny_clip_models, tiny_clip_model, monkeypatch):
    # The queue holds one image request's work besides the one in the model.
    with running_service(replace(tiny_clip_settings, queue_max_tokens=IMAGE_WORK_TOKENS),
                         lambda _: tiny_clip_models) as service:
        check_image_overload(service, tiny_clip_models.images, tiny_clip_model, monkeypatch)


def check_image_overload(service, image_embedder, tiny_clip_model, monkeypatch):
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
            assert_same_vectors(future.result(30)[0], tiny_clip_model.encode([image])[0], IMAGE_MIN_COSINE)
    assert len(service.embed_images([encoded(images[3])])) == 1


# --- the OpenAI-compatible route with a CLIP model (issue 6) -------------------

def openai_embed(server, items, **fields) -> requests.Response:
    served = requests.get(server.url + "/v1/models", headers=AUTH, timeout=10).json()["data"][0]["id"]
    return requests.post(server.url + "/v1/embeddings", headers=AUTH, timeout=60,
                         json={"model": served, "input": items, **fields})


def test_openai_route_embeds_image_data_uris_and_texts_in_one_space(tiny_clip_server):
    red_square = "data:image/png;base64," + b64(encoded(Image.new("RGB", (40, 40), (220, 30, 30))))
    picture = "data:image/jpeg;base64," + b64(encoded(two_colour_image(), "JPEG"))
    answer = openai_embed(tiny_clip_server, ["a red square", red_square, picture], encoding_format="float")
    assert answer.status_code == 200, answer.text
    vectors = [np.array(item["embedding"], dtype=np.float32) for item in answer.json()["data"]]
    assert_same_vectors(vectors[1], embed_image(tiny_clip_server, red_square), SAME_ENGINE_MIN_COSINE)
    assert_same_vectors(vectors[2], embed_image(tiny_clip_server, picture), SAME_ENGINE_MIN_COSINE)
    text_only = post(tiny_clip_server, "/embeddings", json={"text": "a red square"}).json()["embeddings"][0]
    assert_same_vectors(vectors[0], text_only, SAME_ENGINE_MIN_COSINE)
    assert len({len(vector) for vector in vectors}) == 1
    # Images count no tokens: usage is the text's tokens alone.
    text_usage = openai_embed(tiny_clip_server, "a red square").json()["usage"]
    assert answer.json()["usage"] == text_usage


def test_openai_route_names_the_unusable_image_by_its_place_in_input(tiny_clip_server):
    good = "data:image/png;base64," + b64(encoded(Image.new("RGB", (40, 40), (220, 30, 30))))
    not_an_image = "data:image/png;base64," + b64(b"this is not a picture at all")
    answer = openai_embed(tiny_clip_server, ["some text", good, not_an_image])
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["message"].startswith("input[2] ") and error["param"] == "input"
    bad_base64 = openai_embed(tiny_clip_server, ["data:image/png;base64,@@@@"])
    assert bad_base64.status_code == 400 and bad_base64.json()["error"]["message"].startswith("input[0]")
