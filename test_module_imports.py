"""The project's own modules, read as source: no import cycle, no test module importing another, and the image
carries what the service imports.

Imports are read with ast wherever they stand, so an import deferred into a function (the usual way
to make a cycle work) counts like one at the top of the module.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
# What gunicorn loads: its settings file and the app's module (`main:create_app()`).
SERVICE_ENTRY_FILES = ("gunicorn.conf.py", "main.py")


def project_modules() -> dict[str, Path]:
    """The project's modules by import name: the Python files at the repository's root."""
    return {path.name.removesuffix(".py"): path for path in HERE.glob("*.py")}


def imported_names(path: Path) -> set[str]:
    """The top-level package or module of every import in a file, wherever the import stands."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def import_graph() -> dict[str, set[str]]:
    """Each project module and the project modules it imports."""
    modules = project_modules()
    return {name: (imported_names(path) & modules.keys()) - {name} for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as the modules along it (the first again at the end), or None."""
    finished: set[str] = set()

    def visit(module: str, path: list[str]) -> list[str] | None:
        if module in path:
            return path[path.index(module):] + [module]
        if module in finished:
            return None
        for imported in sorted(graph.get(module, ())):
            cycle = visit(imported, path + [module])
            if cycle:
                return cycle
        finished.add(module)
        return None

    for module in sorted(graph):
        cycle = visit(module, [])
        if cycle:
            return cycle
    return None


def test_the_cycle_finder_finds_cycles_and_only_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"main": {"api"}, "api": {"main"}}) == ["api", "main", "api"]
    assert find_cycle({"main": {"api", "common"}, "api": {"common"}, "common": set()}) is None


def test_deferred_imports_count(tmp_path):
    module = tmp_path / "deferring.py"
    module.write_text("import os.path\n\n\ndef create():\n    from main import create_app\n    import api_docs\n")
    assert imported_names(module) == {"os", "main", "api_docs"}


def test_no_project_modules_import_each_other():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def is_test_module(name: str) -> bool:
    return name.startswith("test_")


def forbidden_test_imports(modules: dict[str, Path]) -> dict[str, list[str]]:
    """The modules each test module imports that it must not: another test module, or conftest (whose fixtures
    pytest hands out). Shared helpers live in testkit.py; conftest.py and testkit.py import no test module, and
    conftest.py no tool (the benchmark, the soak)."""
    tests = {name for name in modules if is_test_module(name)}
    forbidden = {name: tests | {"conftest"} for name in tests}
    forbidden["testkit"] = tests | {"conftest", "benchmark_embeddings", "soak_embeddings"}
    forbidden["conftest"] = tests | {"benchmark_embeddings", "soak_embeddings"}
    found = {name: sorted((imported_names(modules[name]) & not_allowed) - {name})
             for name, not_allowed in forbidden.items() if name in modules}
    return {name: imported for name, imported in found.items() if imported}


def test_the_test_import_check_finds_test_modules_importing_each_other(tmp_path):
    sources = {"test_a.py": "from test_b import helper\n", "test_b.py": "def helper():\n    import conftest\n",
               "test_c.py": "from testkit import helper\n", "testkit.py": "import json\n",
               "conftest.py": "from benchmark_embeddings import free_port\n"}
    for name, source in sources.items():
        (tmp_path / name).write_text(source)
    modules = {path.name.removesuffix(".py"): path for path in tmp_path.glob("*.py")}
    assert forbidden_test_imports(modules) == {"test_a": ["test_b"], "test_b": ["conftest"],
                                               "conftest": ["benchmark_embeddings"]}


def test_no_test_module_imports_another_or_conftest():
    forbidden = forbidden_test_imports(project_modules())
    assert forbidden == {}, f"import shared helpers from testkit.py instead: {forbidden}"


def runtime_stage_files(dockerfile: Path) -> set[str]:
    """The files the Dockerfile's runtime stage copies from the build context (COPY without --from)."""
    text = dockerfile.read_text().replace("\\\n", " ")
    stage = re.split(r"(?im)^FROM\s+\S+\s+AS\s+runtime\s*$", text)[1]
    files = set()
    for line in stage.splitlines():
        words = line.split()
        if words and words[0].upper() == "COPY" and not any(word.startswith("--from") for word in words):
            files |= set(words[1:-1])
    return files


def modules_needed_to_serve() -> set[str]:
    """Every project module gunicorn's entry files import, directly or through one another."""
    modules, graph = project_modules(), import_graph()
    needed = set()
    waiting = set().union(*(imported_names(HERE / name) & modules.keys() for name in SERVICE_ENTRY_FILES))
    while waiting:
        module = waiting.pop()
        needed.add(module)
        waiting |= graph[module] - needed
    return needed


def test_the_image_carries_every_module_the_service_imports():
    copied = runtime_stage_files(HERE / "Dockerfile")
    assert set(SERVICE_ENTRY_FILES) <= copied
    needed = {f"{module}.py" for module in modules_needed_to_serve()} | set(SERVICE_ENTRY_FILES)
    assert {"openvino_engine.py", "torch_engine.py"} <= needed  # imported inside functions, followed too
    missing = needed - copied
    assert not missing, f"add {sorted(missing)} to the runtime stage's COPY line in the Dockerfile"
    # Nothing else: tests, the benchmark, the soak, the exporter and test helpers stay out of the image.
    extra = {name for name in copied if name.endswith(".py")} - needed
    assert not extra, f"{sorted(extra)} are copied into the image but the service never imports them"
