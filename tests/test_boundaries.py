"""Import boundaries and the run layout, read from the source (no imports executed).

- the library (stages/lib) never imports a stage, scripts/ or the demo world;
- no import circle inside the library, at any depth (function-level imports included), and the
  run-URI module (stages/lib/uri.py) imports nothing of the library but errors;
- one module (stages/lib/config/compose.py) touches Hydra's private API;
- data_schemas (the data contract) imports nothing of stages;
- no stage or library module builds a run path by hand (``run_dir / "..."``): paths come from
  stages/lib/layout.py.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LIB = sorted((ROOT / "stages" / "lib").rglob("*.py"))  # sub-packages included
SCHEMAS = sorted((ROOT / "data_schemas").glob("*.py"))
STAGE_CODE = sorted((ROOT / "stages").rglob("*.py"))


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at any depth (functions included), as dotted names."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return out


def _forbidden_for_lib(mod: str) -> bool:
    if mod.startswith(("scripts", "demoworld", "tests")):
        return True
    if mod == "stages" or not mod.startswith("stages."):
        return False
    return not (mod == "stages.lib" or mod.startswith("stages.lib."))


@pytest.mark.parametrize("path", LIB, ids=lambda p: str(p.relative_to(ROOT / "stages" / "lib")))
def test_library_imports_no_stage_script_or_demo(path: Path) -> None:
    bad = sorted(m for m in imported_modules(path) if _forbidden_for_lib(m))
    assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


@pytest.mark.parametrize("path", SCHEMAS, ids=lambda p: p.name)
def test_data_contract_imports_nothing_of_stages(path: Path) -> None:
    bad = sorted(m for m in imported_modules(path) if m.split(".")[0] in ("stages", "scripts"))
    assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_the_checker_sees_a_violation(tmp_path: Path) -> None:
    # the AST walk finds imports inside functions, where the old code hid them
    src = tmp_path / "m.py"
    src.write_text("def f():\n    from stages import select\n    import demoworld.world\n")
    mods = imported_modules(src)
    assert {m for m in mods if _forbidden_for_lib(m)} == {"stages.select", "demoworld.world"}


_RUN_PATH = re.compile(r"""run_dir\)?\s*/\s*(f?["'])""")


@pytest.mark.parametrize("path", STAGE_CODE, ids=lambda p: str(p.relative_to(ROOT / "stages")))
def test_no_hand_built_run_paths(path: Path) -> None:
    if path.name == "layout.py":
        return
    hits = [
        f"{path.relative_to(ROOT)}:{i}: {line.strip()}"
        for i, line in enumerate(path.read_text().splitlines(), 1)
        if _RUN_PATH.search(line)
    ]
    assert not hits, "run paths built by hand (use stages/lib/layout.py):\n" + "\n".join(hits)


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(paths: list[Path]) -> dict[str, set[str]]:
    """Module -> the modules of ``paths`` it imports (``from pkg import mod`` counts as ``mod``)."""
    names = {module_name(p): p for p in paths}
    return {m: {x for x in imported_modules(p) if x in names and x != m} for m, p in names.items()}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import circles of ``graph``: its strongly connected components of two or more modules."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while not comp or comp[-1] != v:
                comp.append(stack.pop())
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_library_has_no_import_circle() -> None:
    found = circles(import_graph(LIB))
    assert not found, f"import circles in stages/lib: {found}"


def test_the_circle_check_sees_a_circle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert circles(graph) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_uri_module_is_dependency_free() -> None:
    # uri.py may use the error type and safety.py (credentials in a URI), which is stdlib-only
    ours = {
        name: sorted(
            m
            for m in imported_modules(ROOT / "stages" / "lib" / name)
            if m.split(".")[0] in ("stages", "data_schemas")
        )
        for name in ("uri.py", "safety.py")
    }
    assert ours["safety.py"] == ["data_schemas.errors", "data_schemas.errors.UserError"], ours
    assert set(ours["uri.py"]) <= set(ours["safety.py"]) | {"stages.lib", "stages.lib.safety"}, ours


def test_one_module_touches_hydras_private_api() -> None:
    users = sorted(
        str(p.relative_to(ROOT))
        for p in STAGE_CODE
        if any(m.startswith("hydra._internal") for m in imported_modules(p))
    )
    assert users == ["stages/lib/config/compose.py"], users
