"""Prove an engine's vectors before serving them: the probe set of the manifest, encoded again.

The export wrote reference vectors computed by the torch model (manifest.py).
Before the service reports ready, the engine encodes the same probes through
the serving pipeline (tokenizer, windows, averaging; image preprocessing) and
every vector must point the same way as its reference. A manifest that does
not belong to its model files (edited, truncated, another model's) fails here.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from embeddings import TextEmbedder
from image_embeddings import ImageEmbedder
from manifest import PADDING_PAIR, Manifest, ProbeText, vectors_of

TEXT_MIN_COSINE = 0.9999
IMAGE_MIN_COSINE = 0.999
# Cosine cannot see a vector's length: a manifest that says the model does not normalise, when
# it does, would pass on direction alone. Lengths must agree this closely too.
MAX_NORM_RATIO_ERROR = 1e-3


@dataclass(frozen=True)
class Bounds:
    min_cosine: float
    max_norm_ratio_error: float


# int8 weights move every vector a little (all-MiniLM-L6-v2's probes: min cosine 0.99900 against torch, README
# "int8"): their own bound, looser than f32's and bf16's, and still far above what a wrong model gives.
INT8_TEXT_MIN_COSINE = 0.998
TEXT_BOUNDS = {"f32": Bounds(TEXT_MIN_COSINE, MAX_NORM_RATIO_ERROR),
               "bf16": Bounds(TEXT_MIN_COSINE, MAX_NORM_RATIO_ERROR),
               "int8": Bounds(INT8_TEXT_MIN_COSINE, 1e-2)}


@dataclass(frozen=True)
class SelfCheckResult:
    failures: list[str]
    text_min_cosine: float | None
    image_min_cosine: float | None

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def summary(self) -> str:
        parts = []
        if self.text_min_cosine is not None:
            parts.append(f"text probes min cosine {self.text_min_cosine:.6f}")
        if self.image_min_cosine is not None:
            parts.append(f"image probes min cosine {self.image_min_cosine:.6f}")
        return ", ".join(parts) + ("" if self.passed else "; " + "; ".join(self.failures))


def self_check(text: TextEmbedder, images: ImageEmbedder | None, manifest: Manifest, folder: Path,
               text_bounds: Bounds = TEXT_BOUNDS["f32"]) -> SelfCheckResult:
    failures = _tokenizer_failures(text, manifest)
    text_cosines = [_compare("text probe", [probe.name for probe in probes],
                             text.embed([probe.text for probe in probes], prompt_name),
                             vectors_of(probes), text_bounds, failures)
                    for prompt_name, probes in _by_prompt(manifest.probe_texts).items()]
    # Read together, the short text is padded by far more than 64 tokens: what a traced attention must survive.
    pair = [probe for name in PADDING_PAIR for probe in manifest.probe_texts
            if probe.name == name and probe.prompt_name is None]
    text_cosines.append(_compare("padded probe pair", [probe.name for probe in pair],
                                 text.embed([probe.text for probe in pair]), vectors_of(pair), text_bounds,
                                 failures))
    text_min = min((cosine for cosine in text_cosines if cosine is not None), default=None)
    image_min = None
    if manifest.probe_images:
        if images is None:
            failures.append("the manifest has image probes but the export has no image tower")
        else:
            pictures = [manifest.probe_image(folder, probe) for probe in manifest.probe_images]
            image_min = _compare("image probe", [probe.name for probe in manifest.probe_images],
                                 images.embed(pictures), vectors_of(manifest.probe_images),
                                 Bounds(IMAGE_MIN_COSINE, MAX_NORM_RATIO_ERROR), failures)
    return SelfCheckResult(failures, text_min, image_min)


def _by_prompt(probes: list[ProbeText]) -> dict[str | None, list[ProbeText]]:
    groups: dict[str | None, list[ProbeText]] = {}
    for probe in probes:
        groups.setdefault(probe.prompt_name, []).append(probe)
    return groups


def _tokenizer_failures(text: TextEmbedder, manifest: Manifest) -> list[str]:
    failures = []
    for probe in manifest.probe_texts:
        if probe.prompt_name is not None:
            continue  # the same texts are checked without a prompt
        ids = text.tokenizer.token_ids([probe.text])[0]
        if ids != probe.token_ids:
            failures.append(f"the tokenizer gives other token ids for probe {probe.name!r} than the model's own "
                            f"({len(ids)} against {len(probe.token_ids)} tokens)")
    return failures


def _compare(kind: str, names: list[str], vectors: list[np.ndarray], references: np.ndarray, bounds: Bounds,
             failures: list[str]) -> float | None:
    if not names:
        failures.append(f"the manifest has no {kind}s: export the model again")
        return None
    actual = np.asarray(vectors, dtype=np.float32)
    if actual.shape != references.shape:
        failures.append(f"{kind} vectors have shape {actual.shape}, the manifest's {references.shape}")
        return None
    cosines = cosine_rows(actual, references)
    norm_ratios = np.linalg.norm(actual, axis=1) / np.maximum(np.linalg.norm(references, axis=1), 1e-30)
    for name, cosine, ratio in zip(names, cosines, norm_ratios):
        if not cosine >= bounds.min_cosine:  # NaN fails too
            failures.append(f"{kind} {name!r} has cosine {cosine:.6f} to its reference, below {bounds.min_cosine}")
        elif not abs(ratio - 1) <= bounds.max_norm_ratio_error:
            failures.append(f"{kind} {name!r} is {ratio:.4f} times as long as its reference")
    return float(np.min(cosines))


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of each row of a with the same row of b."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    norms = np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1)
    return (a64 * b64).sum(axis=1) / np.maximum(norms, 1e-30)
