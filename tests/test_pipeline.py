"""End to end on a quick demo world: every stage in order, resume, re-train on cached shards."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from demoworld import world as demoworld

from stages import pipeline
from stages.lib.config import compose
from stages.lib.errors import UserError


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


def test_pipeline_end_to_end_and_retrain_on_cache(quick_world, tmp_path, capsys):
    run_dir = tmp_path / "run"
    cfg = compose("pipeline", demo_overrides(quick_world, run_dir))
    pipeline.run(cfg)
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0] == "pipeline plan: 5 steps"
    assert out[-1].startswith(f"pipeline: done, 5 steps; wrote {run_dir}/")
    assert str(run_dir / "checkpoints" / cfg.train.name / "final") in out[-1]
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


def stages_of(steps) -> list[tuple[str, str]]:
    return [(st.label, st.stage) for st in steps]


def test_plan_plain_demo():
    cfg = compose("pipeline", ["experiment=demo"])
    steps = pipeline.plan(cfg)
    assert [st.stage for st in steps] == ["rollout", "score", "select", "train", "eval", "report"]
    assert all(st.cfg is cfg and st.label == st.stage == st.group for st in steps)
    text = pipeline.format_plan(steps)
    assert text.splitlines()[0] == "pipeline plan: 6 steps" and "train.name=topk_fkl-" in text


def test_plan_with_sft():
    cfg = compose("pipeline", ["experiment=demo_lightning"])
    assert [st.stage for st in pipeline.plan(cfg)][:2] == ["sft", "rollout"]
    off = compose("pipeline", ["experiment=demo_lightning", "sft.enabled=false"])
    assert "sft" not in [st.stage for st in pipeline.plan(off)]


def test_plan_with_two_variants():
    variants = (
        "pipeline.variants=[{name: k1, overrides: ['loss=opd_k1']},"
        " {name: tip, overrides: ['select=entropy_half', 'train.lr=0.01']}]"
    )
    cfg = compose("pipeline", ["experiment=demo", variants])
    steps = pipeline.plan(cfg)
    assert stages_of(steps) == [
        ("rollout", "rollout"),
        ("score", "score"),
        ("select", "select"),
        ("train", "train"),
        ("variant k1: select", "select"),
        ("variant k1: train", "train"),
        ("variant tip: select", "select"),
        ("variant tip: train", "train"),
        ("eval", "eval"),  # after every checkpoint exists, and before the report that shows it
        ("report", "report"),
    ]
    k1, tip = steps[4].cfg, steps[6].cfg
    assert steps[5].cfg is k1 and steps[5].group == "variant:k1"
    assert (k1.train.name, k1.loss.name, k1.select.name, k1.train.selection) == (
        "k1",
        "opd_k1",
        "evidence_retain",
        "evidence_retain",
    )
    assert (tip.train.name, tip.select.name, tip.train.selection, tip.train.lr) == (
        "tip",
        "entropy_half",
        "entropy_half",
        0.01,
    )
    assert k1.run_dir == tip.run_dir == cfg.run_dir and k1.train.epochs == cfg.train.epochs


def test_plan_with_two_rounds():
    cfg = compose("pipeline", ["experiment=demo", "pipeline.rounds=2", "train.name=t"])
    steps = pipeline.plan(cfg)
    assert stages_of(steps)[4:8] == [
        ("round 2: rollout", "rollout"),
        ("round 2: score", "score"),
        ("round 2: select", "select"),
        ("round 2: train", "train"),
    ]
    r2 = steps[4].cfg
    assert all(st.cfg is r2 and st.group == "round2" for st in steps[4:8])
    assert r2.run_dir == str(Path("runs/demo/round2")) and r2.train.name == "t-r2"
    assert r2.student.path == str(Path("runs/demo/checkpoints/t/final")) and r2.seed == 1
    assert [st.stage for st in steps[8:]] == ["eval", "report"] and steps[8].cfg is cfg


def test_a_bad_variant_fails_before_anything_runs(tmp_path):
    run_dir = tmp_path / "run"
    bad = "pipeline.variants=[{name: v, overrides: ['loss=nope']}]"
    cfg = compose("pipeline", ["experiment=demo", f"run_dir={run_dir}", bad])
    with pytest.raises(UserError, match=r"Could not find 'loss/nope'.*pipeline.variants\[v\]"):
        pipeline.run(cfg)
    assert not run_dir.exists()


def test_results_table_rows_compose(tmp_path, capsys):
    """Every row of scripts/results_table.py composes (its --dry path: no world, no model)."""
    import results_table

    rows = "headline,guided,unguided,unguided_mask,rounds,lightning,consistency"
    args = ["--dry", "--no-build", "--seeds", "0", "--rows", rows, "--root", str(tmp_path)]
    assert results_table.main(args) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == "results_table: 22 rows compose"
    # the 2 x 2 of teacher consistency: selfsft_big scores with teacher_big, its SFT is selfsft's
    assert any(ln.startswith("seed 0 selfsft_big") for ln in out)
    assert any("retain_w3" in ln and "select=evidence_retain_w3" in ln for ln in out)
    assert not any(tmp_path.iterdir())  # nothing written


# ------------------------------------------------------------------------- adaptive rounds
def rows(*values, metric="staleness"):
    return [{"step": i, "loss": 1.0, metric: v} for i, v in enumerate(values, 1)]


def test_decide_fires_at_the_threshold_and_not_below():
    decide = pipeline.decide
    assert decide(rows(0.0, 0.2), "staleness", 0.2, 1, "w") == (True, 0.2)  # exactly equal
    assert decide(rows(0.0, 0.1999), "staleness", 0.2, 1, "w") == (False, 0.1999)
    assert decide(rows(-0.3), "staleness", 0.2, 4, "w") == (True, -0.3)  # |value|
    fired, value = decide(rows(9.0, 0.1, 0.3), "staleness", 0.2, 2, "w")  # last 2 rows
    assert fired and value == pytest.approx(0.2)
    assert decide(rows(0.0), "staleness", 0.0, 1, "w") == (True, 0.0)
    assert decide(rows(0.5, metric="rkl_k1"), "rkl_k1", 1.0, 1, "w") == (False, 0.5)


def test_decide_errors():
    with pytest.raises(UserError, match=r"'staleness' is nan .*\(m.jsonl\)"):
        pipeline.decide(rows(0.1, float("nan")), "staleness", 0.2, 2, "m.jsonl")
    with pytest.raises(UserError, match="'rkl_k1' is not in the logged rows"):
        pipeline.decide(rows(0.1), "rkl_k1", 0.2, 2, "m.jsonl")
    with pytest.raises(UserError, match="logged no rows"):
        pipeline.decide([], "staleness", 0.2, 2, "m.jsonl")


def test_adaptive_config_checks():
    with pytest.raises(UserError, match="pipeline.adaptive.metric"):
        compose("pipeline", ["experiment=demo", "pipeline.adaptive.metric=loss"])
    with pytest.raises(UserError, match="pipeline.adaptive.threshold"):
        compose("pipeline", ["experiment=demo", "pipeline.adaptive.threshold=-1"])
    with pytest.raises(UserError, match="pipeline.rounds"):
        compose(
            "pipeline", ["experiment=demo", "pipeline.rounds=2", "pipeline.adaptive.max_rounds=3"]
        )
    with pytest.raises(UserError, match="score.behavior=true"):
        ovs = ["experiment=demo", "pipeline.adaptive.max_rounds=2", "score.behavior=false"]
        compose("pipeline", ovs)


def test_plan_with_adaptive_rounds():
    ovs = ["experiment=demo", "pipeline.adaptive.max_rounds=3", "train.name=t"]
    steps = pipeline.plan(compose("pipeline", ovs))
    assert [st.label for st in steps][4:8] == [f"round 2?: {s}" for s in pipeline.ROUND_STAGES]
    assert [st.round for st in steps] == [1, 1, 1, 1, *[2] * 4, *[3] * 4, None, None]
    assert [st.conditional for st in steps].count(True) == 8
    assert steps[8].cfg.train.name == "t-r3" and steps[8].cfg.run_dir == str(
        Path("runs/demo/round3")
    )
    text = pipeline.format_plan(steps).splitlines()
    assert text[0] == "pipeline plan: 14 steps (8 conditional)"
    assert "run only if round r-1's training ends with |staleness| >= 0.05" in text[-1]


def test_adaptive_rounds_fire_or_not(quick_world, tmp_path, capsys):
    """A huge threshold stops after round 1; a threshold of 0 starts round 2 from round 1's
    checkpoint (round 1 reused); a re-run re-reads rounds.json and recomputes nothing."""
    run_dir = tmp_path / "run"
    small = [
        *demo_overrides(quick_world, run_dir),
        "rollout.max_new_tokens=8",
        "data.max_prompts=8",
        "train.log_every=1",
        "pipeline.stages=[rollout,score,select,train]",
        "pipeline.adaptive.max_rounds=2",
    ]
    cfg = compose("pipeline", [*small, "pipeline.adaptive.threshold=1e9"])
    pipeline.run(cfg)
    out = capsys.readouterr().out
    assert "pipeline plan: 8 steps (4 conditional)" in out
    assert "pipeline: done, 4 steps;" in out and not (run_dir / "round2").exists()
    doc = json.loads((run_dir / "rounds.json").read_text())
    (e1,) = doc["rounds"]
    assert (e1["round"], e1["metric"], e1["fired"], e1["next_round"]) == (
        1,
        "staleness",
        False,
        None,
    )
    assert e1["threshold"] == 1e9 and e1["rollout_s"] > 0 and e1["score_s"] > 0
    rows1 = pipeline.read_metrics(run_dir / "train" / cfg.train.name / "metrics.jsonl")
    assert e1["value"] == pytest.approx(sum(r["staleness"] for r in rows1[-4:]) / len(rows1[-4:]))

    cfg0 = compose("pipeline", [*small, "pipeline.adaptive.threshold=0"])
    pipeline.run(cfg0)
    out = capsys.readouterr().out
    assert "pipeline: done, 8 steps;" in out and "starts round 2" in out
    r2 = run_dir / "round2" / "checkpoints" / f"{cfg.train.name}-r2" / "final"
    assert (r2 / "config.json").exists()
    doc = json.loads((run_dir / "rounds.json").read_text())
    e1b, e2 = doc["rounds"]
    assert (e1b["round"], e1b["fired"], e1b["next_round"], e1b["value"]) == (
        1,
        True,
        2,
        e1["value"],
    )
    assert e1b["rollout_s"] == e1["rollout_s"]  # the cost of the round when it ran
    assert (e2["round"], e2["fired"], e2["next_round"]) == (2, True, None)  # max_rounds reached
    assert e2["train_name"] == f"{cfg.train.name}-r2" and e2["rollout_s"] > 0

    stamp = {p: p.stat().st_mtime_ns for p in (run_dir / "round2").rglob("*.parquet")}
    pipeline.run(cfg0)
    assert {p: p.stat().st_mtime_ns for p in (run_dir / "round2").rglob("*.parquet")} == stamp
    assert json.loads((run_dir / "rounds.json").read_text()) == doc


def test_consistency_rows_swap_only_the_opd_teacher(tmp_path):
    """The 2 x 2 of teacher consistency: selfsft_big trains the SFT of selfsft (same SFT teacher:
    the base reading the evidence, so its SFT is copied, not redone) and scores with teacher_big."""
    import results_table as rt

    world = tmp_path / "world"
    sft_cfg = {
        k: rt.compose("pipeline", rt.run_dir_config(k, 0, tmp_path, world)[0])
        for k in ("selfsft", "selfsft_big")
    }
    assert sft_cfg["selfsft"].teacher.path == sft_cfg["selfsft_big"].teacher.path
    assert str(sft_cfg["selfsft"].teacher.path).endswith("models/base")
    assert "{context}" in sft_cfg["selfsft_big"].rollout.teacher_template
    opd = rt.run_config("selfsft_big", 0, tmp_path, world)
    assert str(opd.teacher.path).endswith("models/teacher_big")
    assert opd.rollout.teacher_template == "{prompt}" and opd.score.allow_teacher_mismatch
    assert rt.SFT_FROM["selfsft_big"][1] == "selfsft"
