"""Import boundaries and the run layout, read from the source (no imports executed).

- the library (stages/lib) never imports a stage, scripts/ or the demo world;
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
