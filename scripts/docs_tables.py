"""The generated parts of the docs: the config key reference and the benchmark figures.

Two tables in docs/ are written by this script, between ``<!-- generated: NAME -->`` and
``<!-- end: NAME -->`` markers, and tests/test_docs.py fails when either is out of date:

- ``config-keys`` in docs/CONFIG.md: every key of the config schema (``stages/lib/config/``), its
  type, its default and the comment above it in the dataclass;
- ``figures`` in docs/BENCHMARKS.md: the headline benchmark figures, from docs/benchmarks.json
  (each with its goal, the command that measured it and the date).

    python scripts/docs_tables.py                          # rewrite both tables
    python scripts/docs_tables.py --check                  # exit 1 if a table is out of date
    python scripts/docs_tables.py --record runs/bench.json # take new figures from a bench JSON

``--record`` takes every figure whose key is in the given JSON (the output of scripts/bench.py or
of one suite's script, e.g. scripts/bench_score.py) into docs/benchmarks.json with that JSON's
date, then rewrites the table.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import datetime
import inspect
import json
import re
import sys
import textwrap
import typing
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CONFIG_MD = ROOT / "docs" / "CONFIG.md"
BENCH_MD = ROOT / "docs" / "BENCHMARKS.md"
BENCH_JSON = ROOT / "docs" / "benchmarks.json"


# ----------------------------------------------------------------------------- markers
def replace_block(text: str, name: str, body: str) -> str:
    """``text`` with the block between the markers of ``name`` replaced by ``body``."""
    begin, end = f"<!-- generated: {name} -->", f"<!-- end: {name} -->"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    if not pattern.search(text):
        raise SystemExit(f"docs: no {begin} ... {end} block")
    return pattern.sub(lambda _: f"{begin}\n{body.rstrip()}\n{end}", text)


def current_block(text: str, name: str) -> str:
    begin, end = f"<!-- generated: {name} -->", f"<!-- end: {name} -->"
    m = re.search(re.escape(begin) + r"\n(.*?)\n?" + re.escape(end), text, re.S)
    return m.group(1).rstrip() if m else ""


# ----------------------------------------------------------------------------- config keys
def field_comments(cls: type) -> dict[str, str]:
    """Field name -> the comment lines above it in the class's source. A comment covers the
    fields right below it (``# AdamW.`` over lr, weight_decay, betas)."""
    lines = textwrap.dedent(inspect.getsource(cls)).splitlines()
    out: dict[str, str] = {}
    last, end = "", -1  # the running comment, and the line where the previous field ended
    for node in ast.parse("\n".join(lines)).body[0].body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            i, text = node.lineno - 2, []
            while i >= 0 and lines[i].strip().startswith("#"):
                text.insert(0, lines[i].strip().lstrip("#").strip())
                i -= 1
            if text:
                last = " ".join(text)
            elif i != end - 1:  # neither a comment nor the previous field right above
                last = ""
            out[node.target.id] = last
            end = node.end_lineno
    return out


def _type_name(t: Any) -> str:
    s = t if isinstance(t, str) else getattr(t, "__name__", str(t))
    return s.replace("typing.", "")


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        v = f.default
    elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        v = f.default_factory()  # type: ignore[misc]
    else:
        return "(required)"
    if dataclasses.is_dataclass(v):
        return ""
    if v == "???":
        return "(required)"
    return json.dumps(
        v, default=lambda o: dataclasses.asdict(o) if dataclasses.is_dataclass(o) else str(o)
    )


def config_keys(cls: type | None = None, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(key, type, default, comment) for every leaf key of the schema, in declaration order;
    a list of dataclasses (``select.rules``) is listed as ``key[].field``."""
    from stages.lib.config import Config

    cls = cls or Config
    hints = typing.get_type_hints(cls)
    comments = field_comments(cls)
    rows = []
    for f in dataclasses.fields(cls):
        key, t = prefix + f.name, hints[f.name]
        inner = [a for a in typing.get_args(t) if dataclasses.is_dataclass(a)]
        if dataclasses.is_dataclass(t):
            rows += config_keys(t, key + ".")
        elif inner and typing.get_origin(t) is list:
            rows.append((key, _type_name(f.type), _default(f), comments.get(f.name, "")))
            rows += config_keys(inner[0], key + "[].")
        else:
            rows.append((key, _type_name(f.type), _default(f), comments.get(f.name, "")))
    return rows


def _cell(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def config_table() -> str:
    lines = ["| key | type | default | what it does |", "|---|---|---|---|"]
    for key, t, default, comment in config_keys():
        d = f"`{_cell(default)}`" if default else ""
        lines.append(f"| `{key}` | `{_cell(t)}` | {d} | {_cell(comment)} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- benchmark figures
def _fmt(value: Any, fmt: str) -> str:
    if isinstance(value, list):
        return " / ".join(_fmt(v, fmt) for v in value)
    return fmt.format(value) if isinstance(value, int | float) else str(value)


def meets(value: Any, goal: str | None) -> bool | None:
    """Whether ``value`` meets a goal written ``<= x`` or ``>= x`` (None: no goal to meet)."""
    m = re.fullmatch(r"(<=|>=)\s*([0-9.eE+-]+)(x?)", goal or "")
    if not m or not isinstance(value, int | float):
        return None
    bound = float(m.group(2))
    return value <= bound if m.group(1) == "<=" else value >= bound


def figures_table(doc: dict) -> str:
    lines = [
        "| metric | goal | measured | workload | measured by (date) |",
        "|---|---|---|---|---|",
    ]
    for f in doc["figures"]:
        shown = _fmt(f["value"], f.get("format", "{}"))
        ok = meets(f["value"], f.get("goal"))
        if ok:
            shown = f"**{shown}**"
        elif ok is False:
            shown += " (goal not met)"
        cmd = f"`{f['command']}` ({f['date']})"
        lines.append(
            f"| `{f['metric']}` | {_cell(f.get('goal') or '')} | {shown} | "
            f"{_cell(f.get('workload', ''))} | {_cell(cmd)} |"
        )
    return "\n".join(lines)


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out |= _flat(v, f"{prefix}{k}.")
        out[prefix + k] = v
    return out


def record(doc: dict, bench: dict, source: str) -> list[str]:
    """Take every figure of ``doc`` whose metric key is in ``bench`` (flattened); the names taken."""
    flat = _flat(bench)
    date = str(bench.get("date") or datetime.date.today().isoformat())[:10]
    taken = []
    for f in doc["figures"]:
        keys = f.get("keys") or [f["metric"]]
        if all(k in flat for k in keys):
            vals = [flat[k] for k in keys]
            f["value"] = vals if len(vals) > 1 else vals[0]
            f["date"], f["command"] = date, f.get("record_command") or source
            taken.append(f["metric"])
    return taken


# ----------------------------------------------------------------------------- main
def render() -> dict[Path, str]:
    """The two docs with their generated blocks brought up to date."""
    doc = json.loads(BENCH_JSON.read_text())
    return {
        CONFIG_MD: replace_block(CONFIG_MD.read_text(), "config-keys", config_table()),
        BENCH_MD: replace_block(BENCH_MD.read_text(), "figures", figures_table(doc)),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if a table is out of date")
    ap.add_argument("--record", type=Path, help="a benchmark JSON to take figures from")
    args = ap.parse_args(argv)
    if args.record:
        doc = json.loads(BENCH_JSON.read_text())
        taken = record(doc, json.loads(args.record.read_text()), f"recorded from {args.record}")
        BENCH_JSON.write_text(json.dumps(doc, indent=1) + "\n")
        print(f"recorded {len(taken)} figure(s): {', '.join(taken) or 'none'}")
    stale = [p for p, text in render().items() if p.read_text() != text]
    if args.check:
        for p in stale:
            print(f"{p.relative_to(ROOT)} is out of date: run python scripts/docs_tables.py")
        return 1 if stale else 0
    for p, text in render().items():
        p.write_text(text)
    print(f"updated {len(stale)} file(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
