"""The demo recipe's own parts: the validation split, the checkpoint choice, the verdict, and the
world's content hash and portable kernels (scripts/demoworld, demo_choose.py, demo_verdict.py).

Quick worlds only (a few seconds each); the portable-kernel test builds two more in subprocesses.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from demoworld import world as dw

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import demo_choose  # noqa: E402
import demo_verdict  # noqa: E402


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("recipe") / "w"
    dw.build_world(out, dw.WorldSettings.quick())
    return out


def _rows(world: Path, name: str) -> list[dict]:
    return pq.read_table(world / "prompts" / f"{name}.parquet").to_pylist()


# ------------------------------------------------------------------ validation split
def test_validation_split_comes_from_training_prompts_only(world: Path) -> None:
    mix, fit, val = (_rows(world, n) for n in ("train_mix", "train_fit", "val"))
    mix_ids, fit_ids = {r["id"] for r in mix}, {r["id"] for r in fit}
    assert {r["id"] for r in val} <= mix_ids  # nothing from an eval set
    held = [r for r in val if r["kind"] == "reading_anchor"]
    assert held and not ({r["id"] for r in held} & fit_ids)  # held-out anchors never trained on
    fitted = [r for r in val if r["kind"] != "reading_anchor"]
    assert {r["kind"] for r in fitted} == {"private", "public"}
    assert {r["id"] for r in fitted} <= fit_ids  # training questions stay in training
    assert len(fit) == len(mix) - len(held)
    for name in ("private_closed", "private_paraphrase", "public_closed", "reading"):
        assert not {r["id"] for r in _rows(world, name)} & {r["id"] for r in held}


def test_validation_split_is_every_sixth_row_of_each_kind() -> None:
    mix = [{"id": f"{k}{i}", "kind": k} for k in ("private", "reading_anchor") for i in range(13)]
    fit, val = dw.validation_split(mix)
    assert [r["id"] for r in val] == [
        "private0",
        "private6",
        "private12",
        "reading_anchor0",
        "reading_anchor6",
        "reading_anchor12",
    ]
    assert len(fit) == 26 - 3


# ------------------------------------------------------------------ checkpoint choice
def _t(*vals: tuple[float, float, float]) -> list[dict]:
    return [
        {"checkpoint": f"step-{i}", "val": {"private": p, "public": u, "reading": r}}
        for i, (p, u, r) in enumerate(vals)
    ]


BASE = {"private": 0.0, "public": 100.0, "reading": 90.0}
MARGINS = {"reading": 3.0, "public": 3.0}


def test_choice_is_the_most_private_within_the_margins() -> None:
    table = _t((40, 100, 90), (85, 99, 88), (95, 99, 86.5), (99, 99, 80))
    assert demo_choose.choose(table, BASE, MARGINS) == 1  # 86.5 is 3.5 below: out
    table = _t((40, 100, 90), (85, 99, 88), (95, 99, 87.0), (99, 99, 80))
    assert demo_choose.choose(table, BASE, MARGINS) == 2  # exactly 3 below: in


def test_choice_ties_go_to_the_earliest_and_none_within_holds_to_the_best_kept() -> None:
    assert demo_choose.choose(_t((90, 100, 90), (90, 100, 89)), BASE, MARGINS) == 0
    # None within 3 of the base's reading 90: held to the best kept (public 100, reading 85).
    table = _t((99, 90, 80), (80, 100, 85), (95, 100, 84))
    assert demo_choose.choose(table, BASE, MARGINS) == 2  # 84 >= 85 - 3; row 0's public is out
    table = _t((10, 100, 86), (40, 100, 85), (80, 100, 82.5))
    assert demo_choose.choose(table, BASE, MARGINS) == 1  # 82.5 is 3.5 below the best kept


def test_choose_end_to_end_copies_the_weights(world: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    root = run / "checkpoints" / "t"
    base = world / "models" / "base"
    for name in ("step-000010", "step-000002", "final"):  # real (base) weights in each
        shutil.copytree(base, root / name)
    assert demo_choose.main(["--run-dir", str(run), "--name", "t", "--world", str(world)]) == 0
    info = json.loads((run / "checkpoints" / "t-val" / "choice.json").read_text())
    assert [r["checkpoint"] for r in info["all"]] == ["step-000002", "step-000010", "final"]
    assert info["chosen"]["checkpoint"] == "step-000002"  # all equal: the earliest
    chosen = run / "checkpoints" / "t-val" / "final"
    assert (chosen / "model.safetensors").read_bytes() == (base / "model.safetensors").read_bytes()
    assert not list(chosen.glob("trainer_state*"))


def test_choose_without_checkpoints_is_one_error_line(world: Path, tmp_path: Path) -> None:
    cmd = [sys.executable, str(REPO / "scripts" / "demo_choose.py"), "--run-dir", str(tmp_path)]
    p = subprocess.run(cmd + ["--world", str(world)], capture_output=True, text=True)
    assert p.returncode == 2
    assert p.stderr.strip().startswith("error: no trained checkpoint to choose from")
    assert len(p.stderr.strip().splitlines()) == 1


# ------------------------------------------------------------------ verdict
def test_verdict_margins_and_boundaries() -> None:
    floor, drop = demo_verdict.GOAL[0], demo_verdict.GOAL[2]
    assert demo_verdict.verdict(floor, 2.0, 80.0)[0]
    met, line = demo_verdict.verdict(floor, 2.0, 71.0)
    assert not met and "missed by 9.0 points" in line
    assert demo_verdict.verdict(drop, 94.0, 89.0)[0]  # exactly 5 below
    # 293 and 278 of 300 right: 5 points, which float arithmetic makes 5.000000000000014.
    assert demo_verdict.verdict(drop, 100 * 293 / 300, 100 * 278 / 300)[0]
    assert not demo_verdict.verdict(drop, 100 * 293 / 300, 100 * 277 / 300)[0]
    met, line = demo_verdict.verdict(drop, 92.7, 86.0)
    assert not met and "missed by 1.7 points" in line


def _results(run: Path, rows: dict[str, dict[str, float]]) -> None:
    (run / "eval").mkdir(parents=True)
    res = {ck: {s: {"accuracy": a / 100, "n": 300} for s, a in r.items()} for ck, r in rows.items()}
    (run / "eval" / "results.json").write_text(json.dumps({"results": res}))


def test_verdict_prints_table_goal_and_verdict(tmp_path: Path, capsys) -> None:
    sets = demo_verdict.SETS
    _results(
        tmp_path, {"base": dict(zip(sets, (2, 1, 100, 94))), "x": dict(zip(sets, (95, 80, 99, 88)))}
    )
    args = ["--run-dir", str(tmp_path), "--checkpoint", "x"]
    assert demo_verdict.main(args) == 0
    out = capsys.readouterr().out
    assert "| x | 95.0 | 80.0 | 99.0 | 88.0 |" in out
    assert "MISSED reading within 5 points of the base" in out and "missed by 1.0 points" in out
    assert out.strip().splitlines()[-1].startswith("verdict: goal MISSED")
    assert demo_verdict.main(args + ["--strict"]) == 1


# ------------------------------------------------------------------ content hash, kernels
def test_content_hash_names_the_content(world: Path, tmp_path: Path) -> None:
    info = json.loads((world / "world.json").read_text())
    assert info["content_hash"] == dw.content_hash(world)
    other = dw.build_world(tmp_path / "s1", dataclasses.replace(dw.WorldSettings.quick(), seed=1))
    assert other["content_hash"] != info["content_hash"]


def test_portable_kernels_give_the_same_bits_under_other_mkl_paths(tmp_path: Path) -> None:
    """MKL_ENABLE_INSTRUCTIONS=AVX2 stands in for a CPU without AVX-512 (what this CPU can show)."""
    hashes = []
    for name, extra in (("a", {}), ("b", {"MKL_ENABLE_INSTRUCTIONS": "AVX2"})):
        cmd = [sys.executable, str(REPO / "scripts" / "make_demo.py"), "--quick", "--kernels"]
        cmd += ["portable", "--out", str(tmp_path / name)]
        env = {**os.environ, **extra, "OMP_NUM_THREADS": "1"}
        subprocess.run(cmd, check=True, env=env, capture_output=True)
        info = json.loads((tmp_path / name / "world.json").read_text())
        assert info["kernels_active"]["mode"] == "portable"
        hashes.append(info["content_hash"])
    assert hashes[0] == hashes[1]
