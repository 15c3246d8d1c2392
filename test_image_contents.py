"""The image's runtime stage copies exactly the modules the service imports: none missing, nothing else.

The Dockerfile lists the runtime modules by name (no `COPY *.py`), so tests, the benchmark, the soak,
the exporter and test helpers stay out of the image; this checks that list against the imports that
gunicorn.conf.py and main.py really make, lazy ones inside functions included.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent
SERVICE_ENTRY_POINTS = ("gunicorn.conf.py", "main.py")


def runtime_stage_copies() -> set[str]:
    """The .py files the Dockerfile's runtime stage copies from the build context."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    runtime = dockerfile[dockerfile.index(" AS runtime"):]
    joined = runtime.replace("\\\n", " ")
    copies = [line.split()[1:-1] for line in joined.splitlines()
              if line.startswith("COPY ") and "--from" not in line]
    return {name for names in copies for name in names if name.endswith(".py")}


def project_modules_imported_by(path: Path) -> set[str]:
    """The project's own modules a file imports anywhere in it (top level or inside functions)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return {f"{name}.py" for name in names if (ROOT / f"{name}.py").is_file()}


def modules_the_service_needs() -> set[str]:
    needed, waiting = set(), list(SERVICE_ENTRY_POINTS)
    while waiting:
        module = waiting.pop()
        if module not in needed:
            needed.add(module)
            waiting.extend(project_modules_imported_by(ROOT / module))
    return needed


def test_the_image_copies_every_module_the_service_imports_and_nothing_else():
    copied, needed = runtime_stage_copies(), modules_the_service_needs()
    assert "openvino_engine.py" in needed and "torch_engine.py" in needed  # lazy imports are followed
    assert needed - copied == set(), "missing from the Dockerfile's runtime COPY"
    assert copied - needed == set(), "copied into the image but never imported by the service"
    assert not [name for name in copied if re.match(r"(test_|conftest|benchmark_|soak_|tiny_clip)", name)]
