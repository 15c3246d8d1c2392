"""An int8 copy of an export's text tower, made with NNCF at build or set-up time (ENGINE_PRECISION=int8).

NNCF is needed only here: what it writes is a plain OpenVINO model that the serving image runs with
OpenVINO alone. The recipe is int8 weights only (`nncf.compress_weights`, asymmetric, one scale per
output channel, every MatMul and embedding), which needs no calibration set. It was chosen by
measurement (README, "int8"): it kept all-MiniLM-L6-v2's nearest neighbours for 98.3% of 1,000
generated queries, where static int8 of weights and activations (`nncf.quantize` with the transformer
preset, calibrated on Debian's licence texts in the shapes served, with SmoothQuant, presets, range
estimators, the overflow fix and ignored scopes tried) kept at best 91%.
"""
from __future__ import annotations

import time
from pathlib import Path

import openvino as ov

from manifest import Manifest

INT8_TEXT_MODEL_FILE = "text-int8.xml"
RECIPE = "nncf.compress_weights INT8_ASYM (int8 weights, per output channel)"


def add_int8_text_model(folder: Path) -> float:
    """Write the int8 text tower beside the f32 one in an export folder and record it in the manifest.

    Returns the seconds it took. The f32 model and the rest of the export are left as they were, so a
    failure here leaves a working f32 export.
    """
    import nncf  # build-time only

    started = time.monotonic()
    manifest = Manifest.read(folder)
    model = ov.Core().read_model(str(folder / manifest.text_model))
    compressed = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM)
    ov.save_model(compressed, str(folder / INT8_TEXT_MODEL_FILE), compress_to_fp16=False)
    manifest.int8_text_model = INT8_TEXT_MODEL_FILE
    manifest.int8_recipe = RECIPE
    manifest.record_files(folder)
    manifest.write(folder)
    return time.monotonic() - started
