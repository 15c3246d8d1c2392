"""download_models.py on the real bundled model, baked and exported into a temporary MODELS_DIR."""
from __future__ import annotations

import contextlib
import io
import logging
import shutil
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

import download_models
from config import Settings
from manifest import source_files, write_source_record
from model_locator import baked_model_dir, exported_model_dir, locate_local_source, locate_model
from testkit import MODEL, SAME_ENGINE_MIN_COSINE, TEST_API_KEY, assert_same_vectors, running_service
from torch_engine import load_transformers_tokenizer

SCRIPT = Path(__file__).with_name("download_models.py")


def set_build_environment(env: pytest.MonkeyPatch, models_dir: Path) -> None:
    """The build's environment: EMBEDDING_MODEL and MODELS_DIR set, nothing else of the caller's."""
    for name in ("EMBEDDING_MODEL", "TOKENIZER_MODEL", "MODELS_DIR", "ALLOW_MODEL_DOWNLOAD", "MAX_BATCH_SIZE",
                 "ENGINE", "ENGINE_PRECISION"):
        env.delenv(name, raising=False)
    env.setenv("EMBEDDING_MODEL", MODEL)
    env.setenv("MODELS_DIR", str(models_dir))


@pytest.fixture
def bake_environment(monkeypatch, tmp_path) -> Path:
    models_dir = tmp_path / "models"
    set_build_environment(monkeypatch, models_dir)
    return models_dir


@dataclass(frozen=True)
class Bake:
    models_dir: Path
    output: str  # what download_models.py printed


@pytest.fixture(scope="module")
def bake(tmp_path_factory) -> Bake:
    """The bundled model and its tokenizer baked and exported once, as the image build does, for the tests that
    only read what it made: each bake and export takes about ten seconds of the module's time."""
    models_dir = tmp_path_factory.mktemp("bake") / "models"
    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as env, contextlib.redirect_stdout(printed):
        set_build_environment(env, models_dir)
        env.setenv("TOKENIZER_MODEL", f"sentence-transformers/{MODEL}")
        assert download_models.main(["--no-download"]) == 0
    return Bake(models_dir, printed.getvalue())


def test_bakes_the_bundled_model_and_its_tokenizer(bake):
    baked = baked_model_dir(bake.models_dir, MODEL)
    assert (baked / "modules.json").is_file()
    assert (baked / "model.safetensors").is_file()
    assert locate_model(MODEL, bake.models_dir, allow_download=False).source == "baked folder"
    assert "found in installed package" in bake.output
    assert "verified: one text gives a vector of 384 numbers" in bake.output
    assert "verified: the tokenizer loads offline and fits the model" in bake.output
    exported = exported_model_dir(bake.models_dir, MODEL, "openvino")
    assert (exported / "manifest.json").is_file() and (exported / "text.xml").is_file()
    assert "verified: openvino" in bake.output and "reproduces the torch vectors" in bake.output
    # Nothing but the baked folder and its export is left behind: no staging folder, no hub cache.
    assert sorted(path.name for path in bake.models_dir.iterdir()) == sorted([baked.name, exported.name])
    # Readable by anyone: the image serves them as an unprivileged user, not as the user who built them.
    for folder in (baked, exported):
        assert all(path.stat().st_mode & 0o005 == 0o005 for path in [folder, *folder.rglob("*")] if path.is_dir())
        assert all(path.stat().st_mode & 0o004 for path in folder.rglob("*") if path.is_file())


def test_service_loads_the_baked_model_and_embeds_like_the_bundled_one(bake, torch_service, caplog):
    settings = Settings(api_keys=(TEST_API_KEY,), models_dir=str(bake.models_dir))
    for engine in ("auto", "torch"):
        with caplog.at_level(logging.INFO), running_service(replace(settings, engine=engine)) as service:
            text = "Baked and bundled models give the same vector."
            baked_vector = service.embed_texts([text]).vectors[0]
            bundled_vector = torch_service.embed_texts([text]).vectors[0]
            assert_same_vectors(baked_vector, bundled_vector, SAME_ENGINE_MIN_COSINE if engine == "torch" else 0.9999)
    assert f"from {baked_model_dir(bake.models_dir, MODEL)} (baked folder)" in caplog.text
    assert "Self-check passed on openvino" in caplog.text


def test_a_second_run_keeps_the_baked_model(bake, monkeypatch, capsys):
    set_build_environment(monkeypatch, bake.models_dir)
    monkeypatch.setenv("TOKENIZER_MODEL", f"sentence-transformers/{MODEL}")
    baked = baked_model_dir(bake.models_dir, MODEL)
    weights_written = (baked / "model.safetensors").stat().st_mtime_ns
    capsys.readouterr()

    assert download_models.main(["--no-download"]) == 0

    # The export made from these files passes its self-check, which proves the bake too: nothing is redone.
    output = capsys.readouterr().out
    assert f"{MODEL}: already exported in {exported_model_dir(bake.models_dir, MODEL, 'openvino')}" in output
    assert "exporting" not in output and "baked into" not in output
    assert (baked / "model.safetensors").stat().st_mtime_ns == weights_written


def test_a_broken_baked_folder_is_baked_again(bake_environment, monkeypatch, capsys):
    monkeypatch.setenv("ENGINE", "torch")  # the bake alone: no export is made for the torch engine
    baked = baked_model_dir(bake_environment, MODEL)
    baked.mkdir(parents=True)
    (baked / "modules.json").write_text("not json")
    # Baked from the very files the package holds, and broken since.
    source = locate_local_source(MODEL)
    write_source_record(baked, source_files(Path(source.path), source.package))

    assert download_models.main(["--no-download"]) == 0

    output = capsys.readouterr().out
    assert "does not load" in output and f"{MODEL}: baked into {baked}" in output
    assert locate_model(MODEL, bake_environment, allow_download=False).source == "baked folder"
    assert "export" not in output and not exported_model_dir(bake_environment, MODEL, "openvino").exists()


def test_a_missing_model_exits_non_zero_and_says_where_it_looked(bake_environment, monkeypatch):
    monkeypatch.setenv("EMBEDDING_MODEL", "no-such-model-anywhere")
    finished = subprocess.run([sys.executable, str(SCRIPT), "--no-download"],
                              capture_output=True, text=True, timeout=120)
    assert finished.returncode == 1
    assert "Model 'no-such-model-anywhere' not found" in finished.stderr
    assert "no baked model in" in finished.stderr and "downloads from the model hub are off" in finished.stderr
    assert not bake_environment.exists() or not any(bake_environment.iterdir())


def test_a_failed_hub_download_exits_non_zero_with_a_clear_message(bake_environment, monkeypatch, capsys):
    # conftest sets HF_HUB_OFFLINE=1, so the hub attempt fails at once, as it does in a build without network.
    monkeypatch.setenv("EMBEDDING_MODEL", "no-such-model-anywhere")

    assert download_models.main([]) == 1

    error = capsys.readouterr().err
    assert "model 'no-such-model-anywhere' is not on this machine" in error
    assert "downloading it from the model hub failed" in error
    assert [path.name for path in bake_environment.iterdir()] == []


def test_allow_model_download_overrules_no_download(bake_environment, monkeypatch, capsys):
    # make run passes --no-download; ALLOW_MODEL_DOWNLOAD=true (README: EMBEDDING_MODEL=clip-ViT-B-32 make run)
    # must still reach for the hub. conftest's HF_HUB_OFFLINE=1 makes that attempt fail at once.
    monkeypatch.setenv("EMBEDDING_MODEL", "no-such-model-anywhere")
    monkeypatch.setenv("ALLOW_MODEL_DOWNLOAD", "true")

    assert download_models.main(["--no-download"]) == 1

    error = capsys.readouterr().err
    assert "downloading it from the model hub failed" in error and "downloads from the model hub are off" not in error


def test_a_bad_setting_exits_with_the_variable_named(bake_environment, monkeypatch, capsys):
    monkeypatch.setenv("MAX_BATCH_SIZE", "many")

    assert download_models.main(["--no-download"]) == 2

    assert "MAX_BATCH_SIZE must be a whole number" in capsys.readouterr().err


def test_a_tokenizer_folder_is_baked_and_found_once_the_folder_is_gone(
        bake_environment, monkeypatch, tmp_path, reference_model):
    bundled = Path(locate_model(MODEL, bake_environment, allow_download=False).path)
    tokenizer_folder = tmp_path / "build-context" / "tokenizer"
    tokenizer_folder.mkdir(parents=True)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        shutil.copy(bundled / name, tokenizer_folder / name)
    monkeypatch.setenv("TOKENIZER_MODEL", str(tokenizer_folder))

    assert download_models.main(["--no-download"]) == 0

    shutil.rmtree(tokenizer_folder)  # as in the image, where the build context is gone
    location = locate_model(str(tokenizer_folder), bake_environment, allow_download=False)
    assert location.source == "baked folder"
    settings = Settings(models_dir=str(bake_environment), tokenizer_model=str(tokenizer_folder))
    tokenizer = load_transformers_tokenizer(settings, reference_model)
    assert tokenizer("hello world")["input_ids"] == [101, 7592, 2088, 102]
    # The export carries that tokenizer, and the service serving it needs no folder.
    with running_service(replace(settings, api_keys=(TEST_API_KEY,))) as service:
        assert service.embed_texts(["hello world"]).token_count == 4  # [CLS] hello world [SEP]
