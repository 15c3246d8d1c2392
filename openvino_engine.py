"""The serving engine: OpenVINO on the CPU, running a model exported at build time (model_export.py).

OpenVINO was chosen over ONNX Runtime by measurement (README, "Inference engine"):
on a CPU with bf16 it ran all-MiniLM-L6-v2 about 4x faster than either torch or
ONNX Runtime in f32, at cosine >= 0.99994 against torch, and it was no slower in
f32 where the CPU has no bf16. It releases the GIL while it infers, so one
process serves HTTP on some threads while its model thread runs on every core.
"""
from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import openvino as ov

NAME = "openvino"
# "auto" lets OpenVINO pick the fastest precision the CPU supports (bf16 where it has
# AVX-512 BF16 or AMX, f32 elsewhere); "f32" forces full precision. "int8" is the model with int8
# weights (quantize.py), computed at what "auto" picks.
PRECISION_HINTS = {"auto": None, "f32": "f32", "int8": None}


class OpenVINOEngine:
    """Compiled text (and image) towers of one exported model; one forward pass at a time per tower.

    Each tower has one infer request, which OpenVINO refuses to run twice at once ("Infer
    Request is busy"), so calls are serialised here; concurrency comes from batching instead.
    """

    name = NAME

    def __init__(self, text_model: Path, image_model: Path | None, precision: str, threads: int) -> None:
        core = ov.Core()
        config: dict[str, object] = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY",
                                     "NUM_STREAMS": 1}
        if PRECISION_HINTS[precision] is not None:
            config["INFERENCE_PRECISION_HINT"] = PRECISION_HINTS[precision]
        self._text = core.compile_model(str(text_model), "CPU", config)
        self._text_request = self._text.create_infer_request()
        self._text_lock = threading.Lock()
        self._image_lock = threading.Lock()
        self._takes_token_types = "token_type_ids" in {port.get_any_name() for port in self._text.inputs}
        self._image_request = None
        if image_model is not None:
            self._image_request = core.compile_model(str(image_model), "CPU", config).create_infer_request()
        computed_in = self._text.get_property("INFERENCE_PRECISION_HINT").to_string()
        self.precision = "int8" if precision == "int8" else computed_in

    def encode_text(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self._takes_token_types:
            inputs["token_type_ids"] = np.zeros_like(input_ids)
        with self._text_lock:
            # A copy: the request reuses its output buffer on the next call.
            return self._text_request.infer(inputs)[0].copy()

    def encode_images(self, pixel_values: np.ndarray) -> np.ndarray:
        if self._image_request is None:
            raise RuntimeError("this export has no image tower")
        with self._image_lock:
            return self._image_request.infer({0: pixel_values})[0].copy()
