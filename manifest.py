"""The manifest that travels with an exported model, and the probe set it carries.

An export (model_export.py) writes `manifest.json` next to the engine's model
files: where the model came from, how it was exported, the shape of its
vectors, its tokenizer and image preprocessing, and reference vectors of a
fixed probe set computed by the torch model. The serving process reads it
and proves, before it reports ready, that the engine reproduces those vectors
(self_check.py).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

MANIFEST_FILE = "manifest.json"
FORMAT_VERSION = 2

# Short, long (split into windows on every model), multilingual and emoji texts: what users send.
LONG_PROBE = " ".join(
    f"Paragraph {number}: the river bends past the old mill, where engineers measured the flow of water "
    f"through the turbines and wrote down how much power each season gave the village."
    for number in range(1, 25))
# A text of about 150 tokens, read in one forward pass with a short one (PADDING_PAIR): the short one is then
# padded by far more than 64 tokens, where a traced attention that mishandles padding shows (ModernBERT's
# local attention window).
MEDIUM_PROBE = " ".join(LONG_PROBE.split()[:110])
PROBE_TEXTS: dict[str, str] = {
    "short": "hello world",
    "query": "how do I reset my password?",
    "sentence": "The quick brown fox jumps over the lazy dog near the riverbank.",
    "long": LONG_PROBE,
    "german": "Die Katze schläft auf dem Sofa, während draußen der Regen fällt.",
    "french": "Où se trouve la gare la plus proche, s'il vous plaît ?",
    "chinese": "今天天气很好，我们去公园散步吧。",
    "japanese": "東京は日本の首都で、人口が最も多い都市です。",
    "arabic": "القطة تنام على الأريكة",
    "russian": "Быстрая коричневая лиса перепрыгивает через ленивую собаку.",
    "hindi": "मुझे भारतीय खाना बहुत पसंद है।",
    "emoji": "🚀🔥 launch day! 🎉 thanks everyone 🙏",
    "code": "def add(a: int, b: int) -> int:\n    return a + b  # ünïcödé",
    "medium": MEDIUM_PROBE,
}
PADDING_PAIR = ("short", "medium")
# Texts read after each of the model's own prompts, with references from its encode(prompt_name=...).
PROMPTED_PROBES = ("query", "sentence")
PROBE_IMAGE_FOLDER = "probes"


def probe_images() -> dict[str, Image.Image]:
    """Fixed images drawn with Pillow: flat colours, shapes, a gradient, odd and small sizes (resize and crop)."""
    images = {
        "red": Image.new("RGB", (256, 256), (220, 30, 30)),
        "blue": Image.new("RGB", (256, 256), (30, 60, 220)),
    }
    gradient = np.linspace(0, 255, 320, dtype=np.float32)
    rows = np.stack([np.outer(np.linspace(0, 1, 200), gradient),
                     np.tile(gradient[::-1], (200, 1)),
                     np.full((200, 320), 128.0)], axis=-1)
    images["gradient_wide"] = Image.fromarray(rows.astype(np.uint8), "RGB")
    shapes = Image.new("RGB", (180, 300), (250, 250, 240))
    draw = ImageDraw.Draw(shapes)
    draw.ellipse((20, 40, 160, 180), fill=(30, 160, 60))
    draw.rectangle((40, 200, 140, 280), fill=(200, 120, 20))
    draw.line((0, 0, 180, 300), fill=(0, 0, 0), width=5)
    images["shapes_tall"] = shapes
    checker = (np.indices((48, 40)).sum(axis=0) // 8 % 2 * 255).astype(np.uint8)
    images["checker_small"] = Image.fromarray(checker, "L").convert("RGB")
    return images


@dataclass
class ProbeText:
    name: str
    text: str
    token_ids: list[int]  # the reference tokenizer's content ids (no special tokens, no prompt)
    vector: list[float]
    prompt_name: str | None = None  # read after this prompt of the model's (None: the default one, if any)


@dataclass
class ProbeImage:
    name: str
    file: str  # PNG under the export folder
    vector: list[float]


@dataclass
class Manifest:
    source_model: str  # as configured: name, hub id or folder name
    source_fingerprint: str  # fingerprint(source_files): changes when the source model does
    source_files: dict[str, str]  # the source model's files with their SHA-256, and its package
    engine: str
    weights_precision: str
    dimension: int
    max_seq_length: int
    pooling: str  # the model's pooling mode, or what its architecture does itself (CLIP: "clip_projection")
    normalize: bool
    modules: list[str]
    tokenizer: dict[str, Any]  # file, pad_id, source
    prompts: dict[str, str]  # the model's prompts by name, as sentence-transformers keeps them
    default_prompt_name: str | None  # the prompt encode() applies when none is named
    text_model: str  # the engine's model file for texts
    image_model: str | None = None
    image_preprocessing: dict[str, Any] | None = None
    int8_text_model: str | None = None  # the text tower with int8 weights, when one was made (quantize.py)
    int8_recipe: str | None = None
    files: dict[str, dict[str, Any]] = field(default_factory=dict)  # file -> size and sha256
    exported_with: dict[str, str] = field(default_factory=dict)  # library versions
    probe_texts: list[ProbeText] = field(default_factory=list)
    probe_images: list[ProbeImage] = field(default_factory=list)
    format: int = FORMAT_VERSION

    def record_files(self, folder: Path) -> None:
        """The size and SHA-256 of every file of the export folder, this manifest aside."""
        self.files = {path.relative_to(folder).as_posix(): file_facts(path) for path in sorted(folder.rglob("*"))
                      if path.is_file() and path.name != MANIFEST_FILE}

    def write(self, folder: Path) -> None:
        (folder / MANIFEST_FILE).write_text(json.dumps(asdict(self), indent=1, ensure_ascii=False))

    @classmethod
    def read(cls, folder: Path) -> Manifest:
        """The manifest of an exported model folder; ManifestError says what is wrong with it."""
        path = folder / MANIFEST_FILE
        try:
            values = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise ManifestError(f"{path} cannot be read as JSON: {error}") from None
        if not isinstance(values, dict) or values.get("format") != FORMAT_VERSION:
            raise ManifestError(f"{path} is not a manifest of format {FORMAT_VERSION}: export the model again")
        try:
            values["probe_texts"] = [ProbeText(**probe) for probe in values.get("probe_texts", [])]
            values["probe_images"] = [ProbeImage(**probe) for probe in values.get("probe_images", [])]
            return cls(**values)
        except TypeError as error:
            raise ManifestError(f"{path} lacks or has unknown fields ({error}): export the model again") from None

    def check_files(self, folder: Path) -> None:
        """Every file the manifest lists exists with its recorded size and SHA-256.

        The size catches a truncated copy at once; the digest catches an edit of the same size that the
        probes might not reach (a tokenizer entry no probe uses). Hashing MiniLM's 90 MB takes about 0.1 s.
        """
        if not self.files:
            raise ManifestError(f"{folder / MANIFEST_FILE} lists no files: export the model again")
        for name, facts in self.files.items():
            path = folder / name
            if not path.is_file():
                raise ManifestError(f"{path} is missing: the export is incomplete")
            if path.stat().st_size != facts["size"]:
                raise ManifestError(f"{path} has {path.stat().st_size} bytes but the manifest recorded "
                                    f"{facts['size']}: the file was changed or truncated after the export")
            if file_facts(path)["sha256"] != facts["sha256"]:
                raise ManifestError(f"{path} is not the file the manifest recorded (its SHA-256 differs): "
                                    f"it was changed after the export; export the model again")

    def probe_image(self, folder: Path, probe: ProbeImage) -> Image.Image:
        with Image.open(folder / probe.file) as image:
            return image.convert("RGB")


def vectors_of(probes: list[ProbeText] | list[ProbeImage]) -> np.ndarray:
    return np.asarray([probe.vector for probe in probes], dtype=np.float32)


# Written into a baked model folder: the files (and package) it was copied from, to tell when they change.
SOURCE_RECORD_FILE = "baked_from.json"
PACKAGE_KEY = "(package)"


def source_files(folder: Path, package: str | None = None) -> dict[str, str]:
    """Each file of a model folder with the SHA-256 of its contents, and the package (name and version) that
    carries the folder, if one does. Changes whenever the model does, even by an edit of the same size."""
    files = {path.relative_to(folder).as_posix(): file_facts(path)["sha256"] for path in sorted(folder.rglob("*"))
             if path.is_file() and path.name != SOURCE_RECORD_FILE}
    return {**files, PACKAGE_KEY: package} if package else files


def write_source_record(folder: Path, files: dict[str, str]) -> None:
    (folder / SOURCE_RECORD_FILE).write_text(json.dumps(files, indent=1, sort_keys=True))


def read_source_record(folder: Path) -> dict[str, str] | None:
    """The source_files() a baked folder was copied from; None when it has no record (baked by an older release)."""
    try:
        return json.loads((folder / SOURCE_RECORD_FILE).read_text())
    except (OSError, ValueError):
        return None


def fingerprint(files: dict[str, str]) -> str:
    """One digest of source_files()."""
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def what_changed(before: dict[str, str], after: dict[str, str]) -> str:
    """In words: which files of a model changed between two source_files() (at most a few of them named)."""
    changed = sorted(name for name in before.keys() & after.keys() if before[name] != after[name])
    parts = [f"{kind} {', '.join(names[:4])}{' and more' if len(names) > 4 else ''}" for kind, names in (
        ("changed:", changed), ("added:", sorted(after.keys() - before.keys())),
        ("removed:", sorted(before.keys() - after.keys()))) if names]
    return "; ".join(parts) or "nothing"


def file_facts(path: Path) -> dict[str, object]:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return {"size": path.stat().st_size, "sha256": digest.hexdigest()}


class ManifestError(RuntimeError):
    """An exported model's manifest is missing, unreadable or does not match its files."""
