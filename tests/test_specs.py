"""The stage specs (``SPEC`` of each stage module) against what they describe.

A spec is only useful if it is true: its config group is the stage's field of ``Config``, the
groups it says it uses are the ones its module reads, its folders are run-layout folders, and the
``distillery`` listing, the pipeline's plan and docs/ARCHITECTURE.md's stage tables agree with it.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import re
import typing
from pathlib import Path

import pytest

from stages import cli, pipeline
from stages.lib.config import STAGES, Config
from stages.lib.layout import RunLayout
from stages.lib.spec import EXTRAS, StageSpec

ROOT = Path(__file__).resolve().parent.parent
NAMES = (*STAGES, "pipeline")
COMMON = {"run_dir", "seed", "overwrite", "debug", "source", "stage"}  # every stage's keys
FIELDS = typing.get_type_hints(Config)


def spec_of(name: str) -> StageSpec:
    return importlib.import_module(f"stages.{name}").SPEC


@pytest.mark.parametrize("name", NAMES)
def test_spec_names_its_module_run_and_config_group(name: str) -> None:
    mod = importlib.import_module(f"stages.{name}")
    s = mod.SPEC
    assert isinstance(s, StageSpec) and s.name == name
    assert s.run is mod.run and callable(mod.main)
    assert s.config is FIELDS[name], f"{name}: config {s.config} is not Config.{name}"
    assert set(s.uses) <= set(FIELDS), f"{name}: unknown groups {set(s.uses) - set(FIELDS)}"
    assert set(s.extras) <= set(EXTRAS)


def _config_reads(path: Path) -> set[str]:
    """The groups a module reads as ``cfg.<group>`` (any name bound to a Config)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            if node.value.id in ("cfg", "rcfg", "vcfg") and node.attr in FIELDS:
                out.add(node.attr)
    return out


@pytest.mark.parametrize("name", NAMES)
def test_spec_declares_every_group_its_module_reads(name: str) -> None:
    s = spec_of(name)
    read = _config_reads(ROOT / "stages" / f"{name}.py")
    undeclared = read - {name, *s.uses} - COMMON
    assert not undeclared, f"stages/{name}.py reads {sorted(undeclared)}, not in its SPEC.uses"


def _layout_folders() -> set[str]:
    """Every folder and file RunLayout names, relative to the run (names as ``<x>``)."""
    lay = RunLayout(Path("/run"))
    out = set()
    for attr in dir(RunLayout):
        v = getattr(lay, attr, None)
        if isinstance(v, Path) and v.is_relative_to(lay.root) and v != lay.root:
            out.add(v.relative_to(lay.root).as_posix())
    for method in ("selected", "checkpoints", "train", "final"):
        out.add(getattr(lay, method)("x").relative_to(lay.root).as_posix())
    return out


def _as_path(entry: str) -> str:
    return re.sub(r"<[^>]+>", "x", entry).rstrip("/")


@pytest.mark.parametrize("name", NAMES)
def test_spec_folders_are_run_layout_folders_or_config_keys(name: str) -> None:
    folders = _layout_folders()
    for entry in (*spec_of(name).reads, *spec_of(name).writes):
        if "/" not in entry and "." in entry and not entry.endswith(".json"):
            group, key = entry.split(".", 1)  # a config key, e.g. data.prompts
            assert key in {f.name for f in dataclasses.fields(FIELDS[group])}, entry
            continue
        path = _as_path(entry)
        assert any(f == path or f.startswith(path + "/") for f in folders), (
            f"{name}: {entry!r} is not a folder of stages/lib/layout.py"
        )


def test_every_written_folder_has_one_writer() -> None:
    writers: dict[str, list[str]] = {}
    for name in NAMES:
        for entry in spec_of(name).writes:
            writers.setdefault(entry, []).append(name)
    assert all(len(w) == 1 for w in writers.values()), writers


def test_the_listing_and_the_pipeline_come_from_the_same_stages() -> None:
    assert cli.COMMANDS == ("pipeline", *STAGES, "sql")
    assert pipeline.ROUND_STAGES == tuple(s for s in STAGES if spec_of(s).rounds)
    assert pipeline.VARIANT_STAGES == tuple(s for s in STAGES if spec_of(s).variants)
    # what a round re-runs is the chain from fresh rollouts to a trained checkpoint
    assert pipeline.ROUND_STAGES == ("rollout", "score", "select", "train")
    assert pipeline.VARIANT_STAGES == ("select", "train")


def _table_rows(md: str, heading: str) -> dict[str, str]:
    """``name`` -> the whole row, for the first table after ``heading``."""
    part = md[md.index(heading) :]
    rows = {}
    for line in part.splitlines()[1:]:
        if line.startswith("#"):
            break
        m = re.match(r"\| `([a-z_]+)` \|", line)
        if m:
            rows[m.group(1)] = line
    return rows


def test_architecture_stage_tables_match_the_specs() -> None:
    md = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    roles = _table_rows(md, "### The stages (`stages/`)")
    assert set(NAMES) <= set(roles), set(NAMES) - set(roles)
    io = _table_rows(md, "### What each stage reads and writes")
    assert set(io) == set(NAMES)
    for name in NAMES:
        row = io[name]
        for entry in (*spec_of(name).reads, *spec_of(name).writes):
            assert entry in row, f"docs/ARCHITECTURE.md, {name}: {entry!r} is not in its row"
