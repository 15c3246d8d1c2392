"""Large images are decoded at reduced size, and still embed as they did when decoded at full size (issue 11).

The reference for every vector is the full decode: the file opened with Pillow at full size, turned upright,
and handed to ImageEmbedder.embed, which is how every image was embedded before decoding was reduced.
"""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageChops, ImageDraw, ImageOps

import image_embeddings
from image_embeddings import open_image, to_rgb
from testkit import cosine, encoded, run_python
from tiny_clip import TINY_IMAGE_SIZE, write_tiny_clip

MAX_PIXELS = 50_000_000
# clip-ViT-B-32's image processor: shortest edge resized to 224, then a 224x224 centre crop.
CLIP_INPUT_SIZE = 224
PEAK_LIMIT_MB = 60
# Large enough to be converted in several bands of rows, the last one shorter than the others.
BANDED_SIZE = (2000, 1500)
# Vectors of a reduced decode may differ from those of the full decode by no more than this.
MIN_COSINE = 0.999


def photo_like(size: tuple[int, int], grain: float = 4.0) -> Image.Image:
    """Colour gradients with sensor-like grain and a few sharp-edged shapes: it compresses like a photo.

    At 8000x6000 and JPEG quality 90 it is about 7.6 MiB, within the default MAX_IMAGE_SIZE.
    """
    down = Image.linear_gradient("L").resize(size)
    across = down.transpose(Image.Transpose.ROTATE_90).resize(size)
    ring = Image.radial_gradient("L").resize(size)
    noise = Image.effect_noise(size, grain)
    image = Image.merge("RGB", [ImageChops.add(gradient, noise, offset=-128) for gradient in (across, down, ring)])
    width, height = size
    draw = ImageDraw.Draw(image)
    draw.ellipse((width // 10, height // 8, width // 3, height // 2), fill=(230, 200, 40))
    draw.rectangle((width // 2, height * 5 // 8, width * 9 // 10, height * 7 // 8), fill=(20, 60, 30))
    return image


def with_orientation(image: Image.Image, orientation: int) -> tuple[Image.Image, Image.Exif]:
    """The image as a camera held on its side stores it, and the EXIF that says how to turn it upright."""
    turn_back = {6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}[orientation]
    exif = Image.Exif()
    exif[0x0112] = orientation
    return image.transpose(turn_back), exif


def full_decode(data: bytes) -> Image.Image:
    """The image decoded the way the service decoded every image before: at full size, then upright."""
    return ImageOps.exif_transpose(Image.open(io.BytesIO(data)))


# --- vectors of reduced decodes, on the tiny CLIP --------------------------------------

@pytest.fixture(scope="module")
def image_embedder(tiny_clip_models):
    return tiny_clip_models.images


def embed_file(image_embedder, data: bytes) -> np.ndarray:
    """The vector of an image file's bytes, along the service's own path (decoding included)."""
    return image_embedder.embed_prepared(image_embedder.prepare_encoded([data]))[0]


def check_reduced_decode_embeds_like_full_decode(image_embedder, data: bytes) -> Image.Image:
    upright = full_decode(data)
    decoded = open_image(data, MAX_PIXELS, image_embedder.preprocessing.input_size)
    # The reduction really happened, and kept twice the model's input size on the shortest side.
    assert decoded.width < upright.width and decoded.height < upright.height
    assert min(decoded.size) >= 2 * image_embedder.preprocessing.input_size
    # Upright: the sides keep the proportions of the upright image, not of the stored one.
    assert abs(decoded.width / decoded.height - upright.width / upright.height) < 0.02
    reduced_vector = embed_file(image_embedder, data)
    full_vector = image_embedder.embed([upright])[0]
    assert cosine(reduced_vector, full_vector) >= MIN_COSINE
    return upright


def test_large_jpeg_is_drafted_and_embeds_like_the_full_decode(image_embedder):
    data = encoded(photo_like((1600, 1200)), "JPEG", quality=90)
    check_reduced_decode_embeds_like_full_decode(image_embedder, data)


def test_large_png_is_reduced_and_embeds_like_the_full_decode(image_embedder):
    data = encoded(photo_like((1200, 900)), "PNG")
    check_reduced_decode_embeds_like_full_decode(image_embedder, data)


@pytest.mark.parametrize("orientation", [6, 8])
def test_rotated_jpeg_is_reduced_then_turned_upright(image_embedder, orientation):
    upright_photo = photo_like((1200, 1600))
    stored, exif = with_orientation(upright_photo, orientation)
    data = encoded(stored, "JPEG", quality=90, exif=exif)
    upright = check_reduced_decode_embeds_like_full_decode(image_embedder, data)
    assert upright.size == upright_photo.size
    # The check can tell: the photo embedded as stored, on its side, gives another vector.
    assert cosine(embed_file(image_embedder, data), image_embedder.embed([stored])[0]) < MIN_COSINE


def palette_with_a_transparent_colour() -> Image.Image:
    image = photo_like(BANDED_SIZE).quantize(64)
    image.info["transparency"] = 3
    return image


def transparent_towards_the_bottom() -> Image.Image:
    image = photo_like(BANDED_SIZE).convert("RGBA")
    image.putalpha(Image.linear_gradient("L").resize(image.size))
    return image


def sixteen_bit_ramp() -> Image.Image:
    width, height = BANDED_SIZE
    return Image.frombytes("I;16", BANDED_SIZE, np.linspace(0, 65535, width * height, dtype="<u2").tobytes())


def cmyk_photo() -> Image.Image:
    return photo_like(BANDED_SIZE).convert("CMYK")


@pytest.mark.parametrize("make_image, image_format", [
    (palette_with_a_transparent_colour, "GIF"),
    (transparent_towards_the_bottom, "PNG"),
    (sixteen_bit_ramp, "PNG"),
    (cmyk_photo, "TIFF"),
])
def test_reduction_converts_every_mode_as_the_full_decode_does(make_image, image_format):
    image = make_image()
    data = encoded(image, image_format)
    opened = Image.open(io.BytesIO(data))
    assert opened.mode == image.mode and opened.info.get("transparency") == image.info.get("transparency")
    input_size = 32
    factor = min(opened.size) // (2 * input_size)
    assert factor >= 2 and opened.width * opened.height > 2 * image_embeddings.BAND_PIXELS
    # Converted a band at a time, the result is exactly the full-size conversion reduced: transparency
    # is shown on white and 16-bit samples are scaled, pixel for pixel as before.
    expected = to_rgb(full_decode(data)).reduce(factor)
    assert open_image(data, MAX_PIXELS, input_size).tobytes() == expected.tobytes()


def test_small_image_is_not_reduced():
    data = encoded(photo_like((60, 40)), "JPEG", quality=90)
    assert open_image(data, MAX_PIXELS, 32).size == (60, 40)
    assert open_image(data, MAX_PIXELS, None).size == (60, 40)


# --- one 48-megapixel photo, measured in a fresh process ---------------------------------

# Run in a fresh process that imports and warms up everything first, so the rise of its peak resident memory
# (which counts what Pillow allocates in C too) is what decoding and preparing the photo cost. The peak is
# read from /proc (VmHWM) rather than ru_maxrss: a child's ru_maxrss starts at its parent's peak on Linux.
MEASURE_ONE_PHOTO = """
import gc, io, json, sys, time
from PIL import Image, ImageOps
from config import Settings
from model_loading import load_torch_models

def memory_kb(field):
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))

# Decoding and preprocessing are the same on every engine; the torch one needs no export of this CLIP.
image_embedder = load_torch_models(Settings(embedding_model=sys.argv[1], engine="torch")).images
small = io.BytesIO()
Image.new("RGB", (300, 200), "gray").save(small, "JPEG")
image_embedder.prepare_encoded([small.getvalue()])
with open(sys.argv[2], "rb") as photo:
    data = photo.read()
gc.collect()
before = {"peak_kb": memory_kb("VmHWM"), "resident_kb": memory_kb("VmRSS")}
started = time.perf_counter()
prepared = image_embedder.prepare_encoded([data])
seconds = time.perf_counter() - started
peak_after_kb = memory_kb("VmHWM")
reduced = image_embedder.embed_prepared(prepared)[0]
full = image_embedder.embed([ImageOps.exif_transpose(Image.open(io.BytesIO(data)))])[0]
cosine = float(reduced @ full / ((reduced @ reduced) * (full @ full)) ** 0.5)
print(json.dumps({**before, "peak_after_kb": peak_after_kb, "seconds": seconds, "cosine": cosine,
                  "input_size": image_embedder.preprocessing.input_size}))
"""


@pytest.fixture(scope="module")
def one_photo_measured(tmp_path_factory) -> dict:
    """Decoding and preparing one 48-megapixel JPEG photo for a CLIP with clip-ViT-B-32's input size."""
    folder = tmp_path_factory.mktemp("photo")
    model_folder = write_tiny_clip(folder / "clip-224", image_size=CLIP_INPUT_SIZE)
    photo_path = folder / "photo.jpg"
    photo_like((8000, 6000)).save(photo_path, "JPEG", quality=90)
    measured = run_python(MEASURE_ONE_PHOTO, str(model_folder), str(photo_path))
    print(f"48-megapixel JPEG: peak RSS +{(measured['peak_after_kb'] - measured['peak_kb']) / 1024:.1f} MB, "
          f"{measured['seconds']:.2f} s, cosine to the full decode {measured['cosine']:.7f}")
    return measured


def test_input_size_comes_from_the_image_processor(image_embedder, one_photo_measured):
    assert image_embedder.preprocessing.input_size == TINY_IMAGE_SIZE
    assert one_photo_measured["input_size"] == CLIP_INPUT_SIZE


def test_48_megapixel_jpeg_costs_at_most_60_mb_of_peak_memory(one_photo_measured):
    # The peak before decoding was what the process held then, so the rise of the peak is the decoding's cost.
    assert one_photo_measured["peak_kb"] - one_photo_measured["resident_kb"] < 20 * 1024
    extra_mb = (one_photo_measured["peak_after_kb"] - one_photo_measured["peak_kb"]) / 1024
    assert extra_mb <= PEAK_LIMIT_MB


def test_48_megapixel_jpeg_embeds_like_its_full_decode(one_photo_measured):
    assert one_photo_measured["cosine"] >= MIN_COSINE
