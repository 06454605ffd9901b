"""Docs that cannot drift: each test fails when a doc misses what the code has.

- docs/ARCHITECTURE.md lists every library module (sub-packages' modules by name in their row)
  and every extra of pyproject.toml;
- docs/CONFIG.md's key list and docs/BENCHMARKS.md's figures table are what
  ``scripts/docs_tables.py`` generates (from the config schema and docs/benchmarks.json), and the
  key list has every key of the schema;
- the README's links point at files that exist.
"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import docs_tables
import pytest

ROOT = Path(__file__).resolve().parent.parent
ARCH = (ROOT / "docs" / "ARCHITECTURE.md").read_text()


def _library_rows() -> dict[str, str]:
    part = ARCH[ARCH.index("### The library (`stages/lib/`)") :]
    rows = {}
    for line in part.splitlines():
        m = re.match(r"\| `([a-z_]+/?)` \|", line)
        if m:
            rows[m.group(1)] = line
        elif rows and not line.startswith("|"):
            if line.strip():
                break
    return rows


LIB = ROOT / "stages" / "lib"


@pytest.mark.parametrize(
    "path",
    sorted(p for p in LIB.rglob("*.py") if p.name != "__init__.py" or p.parent != LIB),
    ids=lambda p: str(p.relative_to(LIB)),
)
def test_architecture_lists_every_library_module(path: Path) -> None:
    rows = _library_rows()
    rel = path.relative_to(LIB)
    if len(rel.parts) == 1:
        assert rel.stem in rows, f"docs/ARCHITECTURE.md: no row for stages/lib/{rel}"
        return
    pkg = rel.parts[0] + "/"
    assert pkg in rows, f"docs/ARCHITECTURE.md: no row for the sub-package stages/lib/{pkg}"
    if rel.name != "__init__.py":
        assert f"`{rel.stem}`" in rows[pkg], f"docs/ARCHITECTURE.md, {pkg}: {rel.stem} not named"


def test_architecture_lists_every_extra() -> None:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    layout = ARCH[ARCH.index("## Layout") : ARCH.index("### The stages")]
    missing = [e for e in extras if not re.search(rf"\b{re.escape(e)}\b", layout)]
    assert not missing, f"docs/ARCHITECTURE.md's layout block misses the extras {missing}"


def test_config_doc_lists_every_key() -> None:
    text = (ROOT / "docs" / "CONFIG.md").read_text()
    keys = [k for k, *_ in docs_tables.config_keys()]
    assert len(keys) > 100  # the walk reached the nested groups
    missing = [k for k in keys if f"`{k}`" not in text]
    assert not missing, f"docs/CONFIG.md misses {missing[:5]}: run python scripts/docs_tables.py"


def test_config_key_walk_sees_a_new_key() -> None:
    """The walk is what the doc test relies on: a key added to a group appears in it."""
    import dataclasses

    from stages.lib.config import ReportConfig

    @dataclasses.dataclass
    class Grown(ReportConfig):
        # A key added for the test.
        extra_knob: int = 3

    rows = docs_tables.config_keys(Grown, "report.")
    assert ("report.extra_knob", "int", "3", "A key added for the test.") in rows


def test_generated_tables_are_current() -> None:
    stale = [p.name for p, text in docs_tables.render().items() if p.read_text() != text]
    assert not stale, f"{stale} out of date: run python scripts/docs_tables.py"


def test_benchmark_figures_name_their_command_and_date() -> None:
    doc = json.loads((ROOT / "docs" / "benchmarks.json").read_text())
    for f in doc["figures"]:
        assert f["command"].startswith(("python ", "chrt ")) and "scripts/" in f["command"], f
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", f["date"]), f


def test_recording_a_bench_json_updates_the_figure() -> None:
    doc = {"figures": [{"metric": "select.speedup_vs_pandas", "goal": ">= 3", "value": 1.0,
                        "format": "{:.1f}x", "command": "old", "date": "2000-01-01"}]}  # fmt: skip
    taken = docs_tables.record(doc, {"select.speedup_vs_pandas": 4.25, "date": "2026-12-07T10:00"},
                               "python scripts/bench.py --out x.json")  # fmt: skip
    assert taken == ["select.speedup_vs_pandas"]
    f = doc["figures"][0]
    assert (f["value"], f["date"], f["command"]) == (
        4.25,
        "2026-12-07",
        "python scripts/bench.py --out x.json",
    )
    assert "**4.2x**" in docs_tables.figures_table(doc)
    f["value"] = 2.0
    assert "2.0x (goal not met)" in docs_tables.figures_table(doc)


def test_readme_links_exist() -> None:
    readme = (ROOT / "README.md").read_text()
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", readme)
    local = [x for x in links if not x.startswith(("http://", "https://", "mailto:"))]
    missing = [x for x in local if not (ROOT / x).exists()]
    assert not missing, f"README links to missing files: {missing}"
