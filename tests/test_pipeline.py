"""End to end on a quick demo world: every stage in order, resume, re-train on cached shards."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from demoworld import world as demoworld

from stages import pipeline
from stages.lib.config import compose


@pytest.fixture(scope="module")
def quick_world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("world") / "w"
    demoworld.build_world(out, demoworld.WorldSettings.quick())
    return out


def demo_overrides(world: Path, run_dir: Path) -> list[str]:
    base = world / "models" / "base"
    sets = ",".join(
        f"{n}: {world / 'prompts' / (n + '.parquet')}"
        for n in ("private_closed", "private_paraphrase", "public_closed", "reading")
    )
    return [
        "experiment=demo",
        f"run_dir={run_dir}",
        f"student.path={base}",
        f"teacher.path={base}",
        f"ref.path={base}",
        f"data.prompts={world / 'prompts' / 'train.parquet'}",
        f"data.eval_sets={{{sets}}}",
        "train.epochs=1",
        "eval.kl_prompts=4",
        "rollout.max_new_tokens=12",
        "pipeline.stages=[rollout,score,select,train,eval]",
    ]


def test_pipeline_end_to_end_and_retrain_on_cache(quick_world, tmp_path):
    run_dir = tmp_path / "run"
    cfg = compose("pipeline", demo_overrides(quick_world, run_dir))
    pipeline.run(cfg)
    for d in ("rollouts", "tokens", f"selected/{cfg.select.name}"):
        assert (run_dir / d / "_manifest.json").exists(), d
    assert (run_dir / "checkpoints" / cfg.train.name / "final" / "config.json").exists()
    res = json.loads((run_dir / "eval" / "results.json").read_text())["results"]
    assert {"base", cfg.train.name} <= set(res)
    stamp = {p: p.stat().st_mtime_ns for p in (run_dir / "tokens").rglob("*.parquet")}

    # a second run resumes: nothing is recomputed (same shards, untouched)
    pipeline.run(cfg)
    assert {p: p.stat().st_mtime_ns for p in (run_dir / "tokens").rglob("*.parquet")} == stamp

    # re-train with another loss and selection on the cached log-probs: no rollout/score rerun
    from stages import select, train

    cfg2 = compose("train", [*demo_overrides(quick_world, run_dir), "loss=opd_k1", "select=all"])
    select.run(cfg2)
    train.run(cfg2)
    assert (run_dir / "checkpoints" / "opd_k1-all" / "final" / "config.json").exists()
    assert {p: p.stat().st_mtime_ns for p in (run_dir / "tokens").rglob("*.parquet")} == stamp

    # a second round of fresh rollouts: round 1 is reused as it is, round 2 samples with round 1's
    # checkpoint, trains on from it, and eval shows both
    from stages.lib import models

    cfg3 = compose("pipeline", [*demo_overrides(quick_world, run_dir), "pipeline.rounds=2"])
    pipeline.run(cfg3)
    assert {p: p.stat().st_mtime_ns for p in (run_dir / "tokens").rglob("*.parquet")} == stamp
    r1 = run_dir / "checkpoints" / cfg.train.name / "final"
    r2 = run_dir / "round2" / "checkpoints" / f"{cfg.train.name}-r2" / "final"
    assert (r2 / "config.json").exists()
    roll = json.loads((run_dir / "round2" / "rollouts" / "_manifest.json").read_text())
    assert roll["fingerprints"]["student"] == models.model_fingerprint(str(r1), "student")
    res = json.loads((run_dir / "eval" / "results.json").read_text())["results"]
    assert list(res)[-1] == f"{cfg.train.name}-r2" and "base" in res


def test_apply_overrides_types_and_groups():
    cfg = compose("pipeline", ["experiment=demo"])
    v = pipeline.apply_overrides(
        cfg, ["loss=vopd", "select=entropy_half", "train.lr=0.01", "train.name=x"]
    )
    assert (v.loss.name, v.select.name, v.train.lr, v.train.name) == (
        "vopd",
        "entropy_half",
        0.01,
        "x",
    )
    assert cfg.loss.name == "topk_fkl"  # the original is untouched
    # the selection a variant trains on follows its select group (regression: it kept the old one)
    assert v.train.selection == "entropy_half"
    # an untyped parameter gets the YAML type the command line would give it
    r = pipeline.apply_overrides(
        cfg, ["select=evidence_retain", "select.rules.1.params.weight=3.5", "seed=3"]
    )
    assert r.select.rules[1].params["weight"] == 3.5 and r.seed == 3
    w = pipeline.apply_overrides(cfg, ["select=all", "loss=opd_k1"])
    assert (w.train.selection, w.train.name) == ("all", "opd_k1-all")
