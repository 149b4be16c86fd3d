"""Packaging of the Slicer extension: the oldest Python it runs on (3.9, Slicer 5.8), the Extensions Index metadata
(literal URLs, the catalog entry naming SlicerRT) and the import graph of the engine (no circles, the pipeline never
imports the MRML layer)."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULE = ROOT / "ReirradiationNPC"
LIB = MODULE / "ReirradiationNPCLib"


# ------------------------------------------------------------------------------------------ Python 3.9

def _vermin() -> Path:
    exe = Path(sys.executable).parent / ("vermin.exe" if sys.platform == "win32" else "vermin")
    if not exe.exists():
        pytest.fail("vermin is not installed: pip install -e '.[test]' (it is in the test extra)")
    return exe


def test_vermin_finds_nothing_newer_than_python_3_9():
    """The same command as .ci/run: the module and its library need at most Python 3.9 (Slicer 5.8)."""
    res = subprocess.run([str(_vermin()), "-t=3.9-", "--no-tips", "--eval-annotations", "--violations", str(MODULE)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "Target versions not met" not in res.stdout


def test_vermin_would_catch_a_python_3_10_construct(tmp_path):
    """The check can fail: a 3.10 construct (zip(strict=)) in a scanned file is reported."""
    (tmp_path / "new.py").write_text("pairs = list(zip([1], [2], strict=True))\n", encoding="utf-8")
    res = subprocess.run([str(_vermin()), "-t=3.9-", "--no-tips", "--violations", str(tmp_path)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode != 0 and "3.10" in res.stdout


_TYPE_NAMES = {"int", "float", "str", "bool", "bytes", "list", "dict", "tuple", "set", "frozenset", "complex",
               "type", "object", "Path", "Callable"}


def _is_type_expr(node) -> bool:
    if isinstance(node, ast.Constant):
        return node.value is None
    if isinstance(node, ast.Name):
        return node.id in _TYPE_NAMES or (node.id[:1].isupper() and not node.id.isupper())
    if isinstance(node, ast.Attribute):
        return node.attr in ("ndarray", "Transform", "Image", "Path")
    if isinstance(node, ast.Subscript):
        return _is_type_expr(node.value)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        return _is_type_expr(node.left) or _is_type_expr(node.right)
    return False


def runtime_type_unions(source: str) -> list[int]:
    """Line numbers of ``X | Y`` type unions evaluated when the module runs (TypeError on Python 3.9): anywhere
    outside annotations, and inside annotations too when annotations are not postponed
    (no ``from __future__ import annotations``)."""
    tree = ast.parse(source)
    postponed = any(isinstance(s, ast.ImportFrom) and s.module == "__future__"
                    and any(a.name == "annotations" for a in s.names) for s in tree.body)
    in_annotation: set[int] = set()
    if postponed:
        for node in ast.walk(tree):
            anns = []
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                args = node.args
                anns = [a.annotation for a in args.args + args.kwonlyargs + args.posonlyargs] + [node.returns]
                anns += [a.annotation for a in (args.vararg, args.kwarg) if a is not None]
            elif isinstance(node, ast.AnnAssign):
                anns = [node.annotation]
            for a in anns:
                if a is not None:
                    in_annotation.update(id(n) for n in ast.walk(a))
    return sorted({n.lineno for n in ast.walk(tree)
                   if isinstance(n, ast.BinOp) and isinstance(n.op, ast.BitOr) and id(n) not in in_annotation
                   and _is_type_expr(n.left) and _is_type_expr(n.right)})


def test_no_type_union_is_evaluated_at_runtime():
    """vermin cannot tell a postponed annotation from a runtime ``X | Y``; this scan can (the eqd2.py
    ``ArrayLike = np.ndarray | float`` that stopped Slicer 5.8 from opening the module)."""
    found = {str(f.relative_to(ROOT)): runtime_type_unions(f.read_text(encoding="utf-8"))
             for f in sorted(MODULE.rglob("*.py"))}
    assert {f: lines for f, lines in found.items() if lines} == {}


def test_runtime_union_scan_can_fail():
    assert runtime_type_unions("import numpy as np\nArrayLike = np.ndarray | float\n") == [2]
    assert runtime_type_unions("def f(x: int | None): pass\n") == [1]  # not postponed: evaluated at def time
    assert runtime_type_unions("from __future__ import annotations\ndef f(x: int | None) -> str | None: pass\n") == []
    assert runtime_type_unions("flags = 1 | 2\nmerged = {'a': 1} | {'b': 2}\n") == []


def test_minimum_slicer_version_is_stated():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    module = (MODULE / "ReirradiationNPC.py").read_text(encoding="utf-8")
    assert re.search(r"Slicer 5\.8 or later", readme)
    assert "Slicer 5.8 or later" in module
    assert 'requires-python = ">=3.9"' in (ROOT / "pyproject.toml").read_text(encoding="utf-8")


# ---------------------------------------------------------------------------------- Extensions Index

def _cmake_set(name: str) -> str:
    text = (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    m = re.search(rf"set\({name}\s+(.+?)\)\s*(#.*)?$", text, re.MULTILINE)
    assert m, name
    return m.group(1).strip().strip('"')


@pytest.mark.parametrize("name", ["EXTENSION_HOMEPAGE", "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS"])
def test_extension_urls_are_literal(name):
    """The Index checker reads the literal value: it must start with http and hold no CMake variable."""
    for url in _cmake_set(name).split():
        assert url.startswith("http") and "${" not in url, url


def test_icon_and_screenshot_urls_name_files_of_this_repository():
    for name in ("EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS"):
        for url in _cmake_set(name).split():
            rel = url.split("/main/", 1)[1]
            assert (ROOT / rel).is_file(), url


def test_catalog_entry_names_slicerrt_as_build_dependency():
    entry = json.loads((ROOT / "ReirradiationNPC.json").read_text(encoding="utf-8"))
    assert entry["$schema"].startswith("https://raw.githubusercontent.com/Slicer/Slicer/main/Schemas/"
                                       "slicer-extension-catalog-entry-schema")
    assert entry["build_dependencies"] == ["SlicerRT"]
    assert _cmake_set("EXTENSION_DEPENDS").split() == entry["build_dependencies"]
    assert entry["category"] == _cmake_set("EXTENSION_CATEGORY")
    assert entry["scm_url"].startswith("https://") and entry["scm_url"].endswith(".git")
    assert entry["scm_url"][: -len(".git")] == _cmake_set("EXTENSION_HOMEPAGE")
    assert {"scm_revision", "build_subdirectory", "tier"} <= set(entry)


# -------------------------------------------------------------------------------------- import graph

def _imports(path: Path) -> set[str]:
    """Engine modules imported by ``path`` (module level and inside functions: a lazy import is still an edge)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                out.add(node.module.split(".")[0])
            else:
                out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ReirradiationNPCLib."):
            out.add(node.module.split(".")[1])
    return out


def _graph() -> dict[str, set[str]]:
    names = {p.stem for p in LIB.glob("*.py")}
    return {p.stem: _imports(p) & names - {p.stem} for p in LIB.glob("*.py")}


def test_engine_imports_have_no_circle():
    graph = _graph()
    cycles = []

    def visit(node, path):
        for nxt in sorted(graph[node]):
            if nxt in path:
                cycles.append(path[path.index(nxt):] + [nxt])
            elif len(path) < 12:
                visit(nxt, path + [nxt])

    for start in sorted(graph):
        visit(start, [start])
    assert cycles == []


def test_engine_never_imports_the_mrml_layer():
    """Nothing the pipeline reaches (imports, transitively, lazy ones included) is an MRML module: the scene writer
    is passed in from the edge (the CLI, the batch runner) as an extra output."""
    graph = _graph()
    reached, todo = set(), ["pipeline"]
    while todo:
        m = todo.pop()
        for nxt in graph.get(m, ()):
            if nxt not in reached:
                reached.add(nxt)
                todo.append(nxt)
    assert sorted(m for m in reached if m.startswith("mrml") or m in ("presenter", "cli", "batch")) == []
    assert "mrml_scene" in graph["cli"]  # the edge does call it


# --------------------------------------------------------------------------------------- the panel file

def test_every_widget_the_module_binds_exists_in_the_ui_file():
    """No Slicer GUI runs here: at least every ``self.ui.<name>`` (and the button tables) must name a widget of the
    .ui file, and the parameter-bound widgets must name parameters of the parameter node."""
    import xml.etree.ElementTree as ET
    ui = ET.parse(MODULE / "Resources" / "UI" / "ReirradiationNPC.ui")
    widgets = {w.get("name") for w in ui.iter("widget")}
    source = (MODULE / "ReirradiationNPC.py").read_text(encoding="utf-8")
    used = set(re.findall(r"self\.ui\.(\w+)", source))
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") in ("ACTION_BUTTONS", "ADJUST_SPINBOXES")
                                                for t in node.targets):
            value = ast.literal_eval(node.value)
            used |= set(value.values() if isinstance(value, dict) else value)
    assert used and used - widgets == set()
    params = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == "ReirradiationNPCParameterNode":
            params = {s.target.id for s in node.body if isinstance(s, ast.AnnAssign)}
    bound = {p.findtext("string") for p in ui.iter("property") if p.get("name") == "SlicerParameterName"}
    assert bound and bound - params == set()
    assert "registrationMethod: Annotated[str, Choice([\"rigid\"" in source  # Register works by default


def test_description_files_meet_the_index_checkers_offline_rules():
    """What the Extensions Index checker verifies without network: the CMake project name is the catalog file's
    name; icon and screenshot set() lines are quoted literal strings closed by ')' directly; the repository name
    holds 'Slicer'; a licence file at the top; a known category (Radiotherapy, as SlicerRT's extensions)."""
    cmake = (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    assert re.search(r"^project\(ReirradiationNPC\)", cmake, re.MULTILINE)
    assert (ROOT / "ReirradiationNPC.json").is_file()
    assert re.search(r'^set\(EXTENSION_ICONURL "http[^"]+"\)', cmake, re.MULTILINE)
    assert re.search(r'^set\(EXTENSION_SCREENSHOTURLS "http[^"]+"\)', cmake, re.MULTILINE)
    entry = json.loads((ROOT / "ReirradiationNPC.json").read_text(encoding="utf-8"))
    assert "slicer" in entry["scm_url"].rsplit("/", 1)[-1].lower()
    assert entry["category"] == "Radiotherapy"
    assert (ROOT / "LICENSE.txt").is_file()
