"""Image embeddings: decode untrusted image bytes safely, then embed them with a multimodal model.

Decoding guards memory and time before any pixel is allocated: the encoded
size is checked before base64 decoding, the pixel count is read from the file
header and checked before the pixels are decoded, and only the first frame of
an animated file is ever decoded. A large image is decoded at reduced size when
its format allows it (JPEG decodes at 1/2, 1/4 or 1/8 scale), otherwise reduced
right after decoding, to no less than twice the model's input size on its
shortest side; it is converted to RGB a band of rows at a time, so no full-size
converted copy exists. Each image is then reduced to the model's input tensor
at once, so a batch holds at most one decoded image at a time.

A CLIP model embeds images with its image tower on the inference engine, after
the model's own preprocessing reproduced with Pillow and numpy; its text tower
is used through the text embedder, so texts and images land in one vector space.
"""
from __future__ import annotations

import base64
import binascii
import io
import math
import re
from dataclasses import asdict, dataclass
from typing import Any, Protocol, Sequence

import numpy as np
from PIL import ExifTags, Image, UnidentifiedImageError

from errors import ItemError

# The formats the service accepts. Pillow's JPEG opener also reads the MPO files many phone
# cameras write (a JPEG with preview pictures appended); only the first picture is decoded.
ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
ACCEPTED_FORMAT_NAMES = "JPEG, PNG, WebP, GIF, BMP or TIFF"

DATA_URI = re.compile(r"data:(?P<media_type>[^,;]*)(?P<parameters>(;[^,;]*)*),", re.IGNORECASE)
BASE64_ALPHABET = re.compile(r"[A-Za-z0-9+/]*={0,2}")
WHITESPACE = re.compile(r"\s+")
# Modes holding more than 8 bits per channel: Pillow's own conversion clips them instead of scaling.
HIGH_DEPTH_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N")
# Peak memory of decoding per pixel of the decoded size, measured on 12-megapixel files (peak RSS
# rise in a fresh process): WebP 16.8 bytes, PNG, BMP and TIFF 4.8, GIF 1.6, a drafted JPEG 4.8
# of its reduced size. Pillow decodes WebP at full size in RGBA and more besides.
DECODE_BYTES_PER_PIXEL = {"WEBP": 17}
OTHER_DECODE_BYTES_PER_PIXEL = 5
# Transparent pixels are shown on white, as the transformers image processors do.
BACKGROUND = (255, 255, 255, 255)
# A reduced image keeps at least this many times the model's input size on its shortest side, so the
# model's own bicubic resize, not the cheap reduction, decides the pixels the model sees.
DETAIL_MARGIN = 2
# Pixels converted to RGB at once while reducing: a few MB, whatever the size of the image.
BAND_PIXELS = 1 << 20
# The turn that shows an image upright, for each EXIF orientation value (as in ImageOps.exif_transpose).
UPRIGHT_TURNS = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


class ImageInputError(ItemError):
    """An uploaded image cannot be used (400); the message says why in words a person can act on.

    The message completes a sentence that starts with where the image was ("image[2] ..."); `index` is
    the image's position in a batch, set when a batch is prepared.
    """

    def __init__(self, detail: str, status: int = 400) -> None:
        super().__init__(status, detail)


class ImageTooLargeError(ImageInputError):
    """An uploaded image is over a size or pixel limit (413)."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail, status=413)


# --- decoding ---------------------------------------------------------------

def decode_base64_image(text: str, max_bytes: int) -> bytes:
    """The bytes of a base64 string or base64 data URI, refused before decoding when they would be too many."""
    payload = strip_data_uri(text.strip())
    if WHITESPACE.search(payload):
        # Tools such as `base64` without -w0 wrap their output in lines.
        payload = WHITESPACE.sub("", payload)
    if not payload:
        raise ImageInputError("holds no base64 data")
    padding = len(payload) - len(payload.rstrip("="))
    decoded_size = len(payload) * 3 // 4 - padding
    if decoded_size > max_bytes:
        raise ImageTooLargeError(f"is {decoded_size} bytes once decoded; the limit is {max_bytes} (MAX_IMAGE_SIZE)")
    if len(payload) % 4 or not BASE64_ALPHABET.fullmatch(payload):
        raise ImageInputError("is not valid base64: use the standard alphabet (A-Z a-z 0-9 + /) with '=' padding")
    try:
        return base64.b64decode(payload, validate=True)
    except binascii.Error as error:
        raise ImageInputError(f"is not valid base64: {error}") from None


def strip_data_uri(text: str) -> str:
    """The base64 part of a `data:image/...;base64,` URI, or the text itself when it is no data URI."""
    if text[:5].lower() != "data:":
        return text
    header = DATA_URI.match(text)
    if header is None:
        raise ImageInputError("is a data URI without the ',' that separates its header from its data")
    parameters = [parameter.strip().lower() for parameter in header["parameters"].split(";")]
    if "base64" not in parameters:
        raise ImageInputError("is a data URI that is not base64-encoded: use data:image/...;base64,<data>")
    return text[header.end():]


def check_byte_size(data: bytes, max_bytes: int) -> bytes:
    if len(data) > max_bytes:
        raise ImageTooLargeError(f"is larger than the limit of {max_bytes} bytes (MAX_IMAGE_SIZE)")
    return data


def open_image(data: bytes, max_pixels: int, input_size: int | None = None,
               max_decode_bytes: int | None = None) -> Image.Image:
    """Decode image bytes into an upright RGB image, refusing anything unsafe before it is decoded.

    With the model's input size (the side of the square its image processor makes), a larger image is
    decoded or reduced to a shortest side of at least DETAIL_MARGIN times that; a smaller one stays as it is.
    An image whose decoding would take more than max_decode_bytes of memory is refused before it is decoded.
    """
    if not data:
        raise ImageInputError("is empty (0 bytes): send the bytes of an image file")
    image = _open_header(data, max_pixels)
    if input_size:
        # JPEG decodes at the largest of 1/2, 1/4 or 1/8 scale that keeps this size; other formats ignore it.
        # The shortest side does not depend on the orientation, so the turn upright can come after.
        kept = DETAIL_MARGIN * input_size
        image.draft(None, (kept, kept))
    if max_decode_bytes is not None:
        check_decode_memory(image, max_decode_bytes)
    try:
        image.load()
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise ImageInputError(f"is a damaged or truncated {image.format} file that cannot be decoded "
                              f"({error})") from None
    # Read from the decoded file: a reduced copy carries no TIFF tags (and TIFF turns itself on load).
    turn = upright_turn(image)
    factor = min(image.size) // (DETAIL_MARGIN * input_size) if input_size else 1
    try:
        rgb = reduced_rgb(image, factor)
    except (OSError, ValueError) as error:
        raise ImageInputError(f"has pixel mode {image.mode} that cannot be converted to RGB ({error})") from None
    return rgb if turn is None else rgb.transpose(turn)


def check_decode_memory(image: Image.Image, max_decode_bytes: int) -> None:
    """Refuse an image whose decoding would take more memory than allowed, from its (drafted) size alone."""
    width, height = image.size
    needed = width * height * DECODE_BYTES_PER_PIXEL.get(image.format, OTHER_DECODE_BYTES_PER_PIXEL)
    if needed > max_decode_bytes:
        raise ImageTooLargeError(f"is a {width}x{height} {image.format} file, which takes about {needed >> 20} MiB "
                                 f"to decode (only JPEG is decoded at reduced size); the limit is "
                                 f"{max_decode_bytes} bytes (MAX_IMAGE_DECODE_BYTES): send it as JPEG, or smaller")


def _open_header(data: bytes, max_pixels: int) -> Image.Image:
    """Read the file header only: the format and the size, no pixels."""
    # Pillow's own decompression-bomb check in open() only warns between its limit and twice
    # that; the pixel limit below refuses every such image before decoding, without touching
    # the process-wide warning filters (warnings.catch_warnings is not thread-safe).
    try:
        image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageTooLargeError(f"declares far too many pixels ({error}); the limit is {max_pixels} pixels "
                                 f"(MAX_IMAGE_PIXELS)") from None
    except UnidentifiedImageError:
        # Pillow refuses headers that declare a zero width or height here too, without saying so.
        raise ImageInputError(f"holds bytes that are not a readable image: it is not {ACCEPTED_FORMAT_NAMES}, "
                              f"or its header is damaged (for example it declares a zero width or height)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise ImageInputError(f"is damaged or truncated: its image header cannot be read ({error})") from None
    width, height = image.size
    if width <= 0 or height <= 0:
        raise ImageInputError(f"has zero size ({width}x{height} pixels)")
    if width * height > max_pixels:
        raise _too_many_pixels(image.size, max_pixels)
    return image


def _too_many_pixels(size: tuple[int, int], max_pixels: int) -> ImageTooLargeError:
    width, height = size
    return ImageTooLargeError(f"is {width}x{height} = {width * height} pixels; the limit is {max_pixels} "
                              f"pixels (MAX_IMAGE_PIXELS)")


def upright_turn(image: Image.Image) -> Image.Transpose | None:
    """The turn its EXIF (or XMP) orientation tag says shows the image as it is meant to be seen."""
    try:
        return UPRIGHT_TURNS.get(image.getexif().get(ExifTags.Base.Orientation))
    except (OSError, SyntaxError, ValueError, TypeError, KeyError):
        # A broken EXIF block must not cost the user the image: use it as stored.
        return None


def reduced_rgb(image: Image.Image, factor: int) -> Image.Image:
    """to_rgb(image) reduced `factor` times (box average), converted a band of rows at a time.

    Each band's rows are a multiple of factor, so the result equals converting the whole image and then
    reducing it, without ever holding a full-size converted copy.
    """
    if factor < 2:
        return to_rgb(image)
    width, height = image.size
    band_rows = factor * max(1, BAND_PIXELS // (width * factor))
    reduced = Image.new("RGB", (-(-width // factor), -(-height // factor)))
    for top in range(0, height, band_rows):
        band = image.crop((0, top, width, min(top + band_rows, height)))
        reduced.paste(to_rgb(band).reduce(factor), (0, top // factor))
    return reduced


def to_rgb(image: Image.Image) -> Image.Image:
    """Three 8-bit channels whatever the source mode; transparency is shown on white."""
    if image.mode in HIGH_DEPTH_MODES:
        # 16-bit samples scaled to 8 bits; Pillow's convert would clip everything above 255 to white.
        image = image.convert("I").point(lambda value: value / 256).convert("L")
    if image.mode == "RGB":
        return image
    if "A" in image.getbands() or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, BACKGROUND)
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


# --- embedding --------------------------------------------------------------

class ImageEncoder(Protocol):
    """An engine's image tower: one vector per preprocessed image (N x 3 x H x W float32)."""

    def encode_images(self, pixel_values: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True)
class ImagePreprocessing:
    """The model's image processor, reproduced with Pillow and numpy (CLIP's steps and values).

    Resize so the shortest edge is `shortest_edge` (bicubic), crop the centre to
    crop_height x crop_width, scale the 8-bit values by `rescale_factor`, then
    normalise each channel with `mean` and `std`.
    """
    shortest_edge: int
    crop_height: int
    crop_width: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    rescale_factor: float = 1 / 255
    resample: int = int(Image.Resampling.BICUBIC)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ImagePreprocessing:
        return cls(**{**values, "mean": tuple(values["mean"]), "std": tuple(values["std"])})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def pixel_values(self, image: Image.Image) -> np.ndarray:
        """One RGB image as the model's input: 3 x crop_height x crop_width float32."""
        resized = image.resize(self._resized_size(image.size), resample=self.resample)
        pixels = center_crop(np.asarray(resized, dtype=np.float32), self.crop_height, self.crop_width)
        pixels = (pixels * self.rescale_factor - np.asarray(self.mean, dtype=np.float32)) \
            / np.asarray(self.std, dtype=np.float32)
        return np.ascontiguousarray(pixels.transpose(2, 0, 1), dtype=np.float32)

    @property
    def input_size(self) -> int:
        """The side of the square made of every image; large images are decoded at reduced size for it."""
        return max(self.shortest_edge, self.crop_height, self.crop_width)

    def _resized_size(self, size: tuple[int, int]) -> tuple[int, int]:
        """(width, height) with the shortest edge at shortest_edge, the other edge truncated as transformers does."""
        width, height = size
        short, long = (width, height) if width <= height else (height, width)
        new_long = int(self.shortest_edge * long / short)
        return (self.shortest_edge, new_long) if width <= height else (new_long, self.shortest_edge)


def center_crop(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """The centre height x width of an H x W x C array, padded with black where the image is smaller."""
    original_height, original_width = pixels.shape[:2]
    if original_height < height or original_width < width:
        padded = np.zeros((max(height, original_height), max(width, original_width), pixels.shape[2]),
                          dtype=pixels.dtype)
        top = math.ceil((padded.shape[0] - original_height) / 2)
        left = math.ceil((padded.shape[1] - original_width) / 2)
        padded[top:top + original_height, left:left + original_width] = pixels
        pixels = padded
    top = (pixels.shape[0] - height) // 2
    left = (pixels.shape[1] - width) // 2
    return pixels[top:top + height, left:left + width]


class ImageEmbedder:
    """Turns images into vectors with an engine's image tower."""

    def __init__(self, encoder: ImageEncoder, preprocessing: ImagePreprocessing, max_batch_size: int,
                 max_pixels: int, max_decode_bytes: int | None = None) -> None:
        self.encoder = encoder
        self.preprocessing = preprocessing
        self.max_batch_size = max_batch_size
        self.max_pixels = max_pixels
        self.max_decode_bytes = max_decode_bytes

    def prepare(self, image: Image.Image) -> np.ndarray:
        """The model's input for one image (resized, cropped, normalised)."""
        return self.preprocessing.pixel_values(image)

    def prepare_encoded(self, encoded_images: Sequence[bytes]) -> list[np.ndarray]:
        """Decode and prepare each image in turn, so only one decoded image is held at a time.

        An image that cannot be used raises its error with `index` set to its position.
        """
        prepared = []
        for index, data in enumerate(encoded_images):
            try:
                decoded = open_image(data, self.max_pixels, self.preprocessing.input_size, self.max_decode_bytes)
                prepared.append(self.prepare(decoded))
            except ImageInputError as error:
                error.index = index
                raise
        return prepared

    def embed_prepared(self, prepared: Sequence[np.ndarray]) -> list[np.ndarray]:
        """One vector per prepared image, in input order, in forward passes of at most max_batch_size images."""
        vectors = []
        for start in range(0, len(prepared), self.max_batch_size):
            batch = np.stack(prepared[start:start + self.max_batch_size])
            vectors.extend(np.asarray(self.encoder.encode_images(batch), dtype=np.float32))
        return vectors

    def embed(self, images: Sequence[Image.Image]) -> list[np.ndarray]:
        """One vector per decoded image, in input order."""
        return self.embed_prepared([self.prepare(to_rgb(image)) for image in images])
