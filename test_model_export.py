"""The export, its manifest and the start-up self-check, on the real bundled model the session exported.

Tampering is done on copies of the session's export: a manifest that does not belong to its
model files must never serve vectors.
"""
from __future__ import annotations

import json
import logging
import re
import shutil
from dataclasses import replace

import numpy as np
import pytest
import requests

import download_models
import model_loading
import quantize
from main import create_app
from manifest import PROBE_TEXTS, Manifest, ManifestError, file_facts
from model_loading import SelfCheckError, load_exported_models
from model_locator import exported_model_dir
from self_check import INT8_TEXT_MIN_COSINE, TEXT_BOUNDS, TEXT_MIN_COSINE, Bounds, cosine_rows
from testkit import MODEL, expected_precision, start_live_server, wait_for_loading


@pytest.fixture
def export_copy(test_settings, tmp_path):
    """A copy of the session's export of the bundled model, free to be tampered with; settings that serve it."""
    original = exported_model_dir(test_settings.models_dir, MODEL, "openvino")
    folder = tmp_path / original.name
    shutil.copytree(original, folder)
    return folder, replace(test_settings, embedding_model=str(folder))


def edit_manifest(folder, change) -> None:
    path = folder / "manifest.json"
    values = json.loads(path.read_text())
    change(values)
    path.write_text(json.dumps(values))


def readiness_of(settings) -> tuple[int, dict]:
    """Serve these settings over HTTP and ask /health/ready once loading has ended."""
    live = start_live_server(create_app(settings), wait_ready=False)
    try:
        wait_for_loading(live.service)
        response = requests.get(live.url + "/health/ready", timeout=10)
        return response.status_code, response.json()
    finally:
        live.stop()
        live.service.stop()


def test_the_manifest_records_the_model_and_its_probe_vectors(test_settings, reference_model):
    folder = exported_model_dir(test_settings.models_dir, MODEL, "openvino")
    manifest = Manifest.read(folder)
    assert (manifest.source_model, manifest.engine, manifest.weights_precision) == (MODEL, "openvino", "f32")
    assert (manifest.dimension, manifest.max_seq_length) == (384, 256)
    assert (manifest.pooling, manifest.normalize) == ("mean", True)
    assert manifest.modules == ["Transformer", "Pooling", "Normalize"]
    assert manifest.tokenizer["file"] == "tokenizer.json" and manifest.tokenizer["pad_id"] == 0
    assert {"text.xml", "text.bin", "tokenizer.json"} <= set(manifest.files)
    assert all(facts["size"] > 0 and len(facts["sha256"]) == 64 for facts in manifest.files.values())
    assert [probe.name for probe in manifest.probe_texts] == list(PROBE_TEXTS)
    long_probe = next(probe for probe in manifest.probe_texts if probe.name == "long")
    assert len(long_probe.token_ids) > 2 * 254  # split into three windows
    # The reference vectors are the torch model's own (the long one averaged over its windows, like ours).
    short = next(probe for probe in manifest.probe_texts if probe.name == "short")
    assert short.vector == pytest.approx(reference_model.encode(["hello world"])[0].tolist(), abs=1e-5)
    assert manifest.image_model is None and manifest.probe_images == []


def test_the_self_check_passes_and_bf16_serves_where_the_cpu_has_it(loaded_service, loaded_models):
    ready, body = loaded_service.readiness()
    assert ready and (body["engine"], body["precision"]) == ("openvino", expected_precision())
    min_cosine = re.search(r"text probes min cosine ([0-9.]+)", loaded_models.self_check)
    assert float(min_cosine[1]) >= TEXT_MIN_COSINE, loaded_models.self_check


def test_forced_f32_reproduces_torch_to_the_last_digits(test_settings):
    models = load_exported_models(replace(test_settings, engine_precision="f32"))
    assert models.precision == "f32"
    assert "min cosine 1.000000" in models.self_check


def test_an_edited_reference_vector_keeps_readiness_503_with_the_reason(export_copy):
    folder, settings = export_copy

    def rotate_one_vector(values):
        vector = values["probe_texts"][2]["vector"]
        values["probe_texts"][2]["vector"] = vector[1:] + vector[:1]

    edit_manifest(folder, rotate_one_vector)
    status, body = readiness_of(settings)
    assert status == 503 and body["status"] == "error"
    assert "does not reproduce the model's own vectors" in body["reason"] and "'sentence'" in body["reason"]
    assert "ENGINE=torch" in body["reason"]


def test_a_manifest_that_says_the_model_does_not_normalise_is_caught(export_copy):
    folder, settings = export_copy
    edit_manifest(folder, lambda values: values.update(normalize=False))
    # Only the long probe's windows are averaged, and its average is no longer normalised again.
    with pytest.raises(SelfCheckError, match="'long' is 0.9[0-9]* times as long as its reference"):
        load_exported_models(settings)


def test_a_same_size_edit_of_the_tokenizer_is_caught_by_its_digest(export_copy):
    folder, settings = export_copy
    tokenizer = folder / "tokenizer.json"
    text = tokenizer.read_text()
    # Two words of the same length trade ids: the file keeps its size, and no probe holds either word.
    edited = text.replace('"piano":', '"PIANO":').replace('"tiger":', '"piano":').replace('"PIANO":', '"tiger":')
    assert edited != text and len(edited) == len(text)
    tokenizer.write_text(edited)
    with pytest.raises(ManifestError, match="SHA-256"):
        load_exported_models(settings)


def test_edited_model_weights_are_caught_by_the_self_check(export_copy):
    folder, settings = export_copy
    weights = bytearray((folder / "text.bin").read_bytes())
    # Same size, other numbers: scale a block of float32 weights in the middle of the file.
    middle = len(weights) // 2 // 4 * 4
    block = memoryview(weights)[middle:middle + 400_000].cast("f")
    for index in range(len(block)):
        block[index] *= -3.0
    (folder / "text.bin").write_bytes(bytes(weights))
    with pytest.raises(ManifestError, match="SHA-256"):
        load_exported_models(settings)
    # Even with the manifest's digest brought in line (another model's weights with a manifest
    # rewritten for them), the vectors give them away.
    edit_manifest(folder, lambda values: values["files"]["text.bin"].update(file_facts(folder / "text.bin")))
    with pytest.raises(SelfCheckError, match="cosine"):
        load_exported_models(settings)


def test_a_truncated_model_file_is_caught_before_it_loads(export_copy):
    folder, settings = export_copy
    with open(folder / "text.bin", "r+b") as file:
        file.truncate(1000)
    with pytest.raises(ManifestError, match="truncated"):
        load_exported_models(settings)
    status, body = readiness_of(settings)
    assert status == 503 and "truncated" in body["reason"]


def test_another_models_manifest_is_caught(export_copy, tiny_clip_settings):
    folder, settings = export_copy
    clip_export = exported_model_dir(tiny_clip_settings.models_dir, tiny_clip_settings.embedding_model, "openvino")
    shutil.copy(clip_export / "manifest.json", folder / "manifest.json")
    with pytest.raises((ManifestError, SelfCheckError)):
        load_exported_models(settings)


def test_a_tokenizer_that_gives_other_ids_is_caught(export_copy):
    folder, settings = export_copy

    def other_ids(values):
        german = next(probe for probe in values["probe_texts"] if probe["name"] == "german")
        german["token_ids"] = german["token_ids"][:-1]

    edit_manifest(folder, other_ids)
    with pytest.raises(SelfCheckError, match="other token ids for probe 'german'"):
        load_exported_models(settings)


def test_a_failed_check_at_the_fast_precision_falls_back_to_f32(export_copy, monkeypatch, caplog):
    if expected_precision() == "f32":
        pytest.skip("this CPU has no bf16 instructions (avx512_bf16 or amx_bf16): the export serves in f32 already, "
                    "so there is no faster precision to fall back from")
    folder, settings = export_copy
    fastest = model_loading.open_export(folder, Manifest.read(folder), "auto", settings).precision
    assert fastest == "bf16"
    real_check, checked = model_loading.self_check, []

    def failing_first_time(text, images, manifest, folder):  # injected failure: the first precision is "wrong"
        result = real_check(text, images, manifest, folder)
        checked.append(text.encoder.precision)
        return replace(result, failures=["injected: below the bound"]) if len(checked) == 1 else result

    monkeypatch.setattr(model_loading, "self_check", failing_first_time)
    with caplog.at_level(logging.WARNING, logger="model_loading"):
        models = load_exported_models(settings)
    assert checked == [fastest, "f32"] and models.precision == "f32"
    assert "Self-check failed on openvino" in caplog.text


def test_an_export_that_fails_ends_the_build_with_how_to_use_torch(tmp_path, monkeypatch, capsys):
    for name in ("TOKENIZER_MODEL", "ENGINE", "ENGINE_PRECISION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("EMBEDDING_MODEL", MODEL)
    monkeypatch.setenv("MODELS_DIR", str(tmp_path))
    import model_export

    def broken_converter(*args, **kwargs):  # injected failure: a model the converter cannot handle
        raise RuntimeError("unsupported operation aten::fancy")

    monkeypatch.setattr(model_export.ov, "convert_model", broken_converter)
    assert download_models.main(["--no-download"]) == 1
    error = capsys.readouterr().err
    assert f"model {MODEL!r} cannot be served by openvino" in error and "unsupported operation" in error
    assert "--build-arg ENGINE=torch" in error and "ENGINE=torch" in error
    assert not exported_model_dir(tmp_path, MODEL, "openvino").exists()


# --- int8 (ENGINE_PRECISION=int8) -------------------------------------------------------------

def test_int8_weights_serve_within_their_own_bound_beside_the_f32_model(export_copy):
    folder, settings = export_copy
    int8 = replace(settings, engine_precision="int8")
    download_models.add_int8_model(int8, MODEL, folder)
    manifest = Manifest.read(folder)
    assert (manifest.int8_text_model, "text-int8.bin" in manifest.files) == ("text-int8.xml", True)
    assert manifest.text_model == "text.xml" and "text.bin" in manifest.files  # the f32 model stays
    assert (folder / "text-int8.bin").stat().st_size < (folder / "text.bin").stat().st_size / 3
    models, full = load_exported_models(int8), load_exported_models(replace(settings, engine_precision="f32"))
    assert models.precision == "int8"
    assert INT8_TEXT_MIN_COSINE <= float(re.search(r"min cosine ([0-9.]+)", models.self_check)[1]) < 0.9999
    texts = list(PROBE_TEXTS.values())
    assert cosine_rows(np.array(models.text.embed(texts)), np.array(full.text.embed(texts))).min() >= \
        INT8_TEXT_MIN_COSINE
    status, body = readiness_of(int8)
    assert (status, body["precision"]) == (200, "int8")


def test_int8_asked_of_an_export_without_it_says_how_to_make_it(export_copy):
    status, body = readiness_of(replace(export_copy[1], engine_precision="int8"))
    assert status == 503 and "has no int8 model" in body["reason"]
    assert "ENGINE_PRECISION=int8 make run" in body["reason"] and "--build-arg ENGINE_PRECISION=int8" in body["reason"]


def test_int8_below_its_bound_falls_back_to_the_next_precision_and_says_why(export_copy, monkeypatch, caplog):
    folder, settings = export_copy
    int8 = replace(settings, engine_precision="int8")
    download_models.add_int8_model(int8, MODEL, folder)
    monkeypatch.setitem(TEXT_BOUNDS, "int8", Bounds(0.9999999, 1e-2))  # a bound int8 weights cannot meet
    with caplog.at_level(logging.WARNING, logger="model_loading"):
        models = load_exported_models(int8)
    assert models.precision == expected_precision()
    assert "Self-check failed on openvino int8" in caplog.text
    assert "a faster precision failed the self-check (int8: text probe" in caplog.text


def test_a_quantization_that_fails_fails_the_build_and_keeps_the_f32_export(export_copy, monkeypatch, capsys):
    folder, settings = export_copy

    def broken(export_folder):
        raise RuntimeError("NNCF ran out of luck")

    monkeypatch.setattr(quantize, "add_int8_text_model", broken)
    with pytest.raises(download_models.BakeError) as failed:
        download_models.add_int8_model(replace(settings, engine_precision="int8"), MODEL, folder)
    assert f"model {MODEL!r} could not be quantized to int8" in str(failed.value)
    assert "NNCF ran out of luck" in str(failed.value) and "f32 export" in str(failed.value)
    assert load_exported_models(settings).precision == expected_precision()
