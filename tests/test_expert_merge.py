"""scripts/expert_merge.py end to end on the quick world: experts, routed scoring, two losses."""

from __future__ import annotations

import json

import duckdb
from demoworld import world as W


def test_expert_merge_quick(tmp_path):
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "expert_merge", Path(__file__).resolve().parents[1] / "scripts" / "expert_merge.py"
    )
    em = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(em)
    assert em.main(["--quick", "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "results_seed0.json").read_text())  # one seed
    a, b = doc["halves"]["a"], doc["halves"]["b"]
    assert a and b and not set(a) & set(b)
    # each expert trained on its own half only
    assert doc["experts"]["a"]["settings"]["entities"] == a
    # every checkpoint evaluated on every set, both losses trained on one cache
    assert set(doc["table"]) == {"base", "opd_k1", "exopd", "topk_fkl", "expert_a", "expert_b"}
    assert all(set(v) == set(em.SETS) for v in doc["table"].values())
    assert "stages.pipeline" in doc["per_seed"]["0"]["command"]
    # private prompts are scored by their half's expert, the rest by either
    run = tmp_path / "seed0"
    got = duckdb.sql(
        f"SELECT r.kind, list(DISTINCT t.teacher_id ORDER BY t.teacher_id) "
        f"FROM read_parquet('{run}/tokens/**/*.parquet') t "
        f"JOIN read_parquet('{run}/rollouts/**/*.parquet') r USING (sample_id) GROUP BY 1"
    ).fetchall()
    routes = dict(got)
    assert routes["private_a"] == ["a"] and routes["private_b"] == ["b"]
    assert routes["public"] == ["a", "b"]
    # the half-split eval sets cover the private eval set exactly
    for h, ents in (("a", a), ("b", b)):
        sql = f"SELECT count(*) FROM '{tmp_path}/prompts/private_{h}.parquet'"
        assert duckdb.sql(sql).fetchall()[0][0] == len(ents) * len(W.ATTRS)


def test_adaptive_rounds_reads_stage_seconds_from_the_pipeline_log(tmp_path):
    """scripts/adaptive_rounds.py costs each round from the pipeline's own lines; a stage run
    again (resumed, reused: ~0 s) keeps its longest time; eval is not a round's cost."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "adaptive_rounds", Path(__file__).resolve().parents[1] / "scripts" / "adaptive_rounds.py"
    )
    ar = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ar)
    log = tmp_path / "run.log"
    log.write_text(
        "=== rollout ===\n=== rollout done in 30.5s ===\n=== score done in 8.0s ===\n"
        "=== train done in 100.0s ===\n"
        "--- round 2?: rollout (run_dir=x/round2 train.name=edge-r2 select=s) ---\n"
        "=== rollout done in 20.0s ===\n"
        "--- round 2?: score (run_dir=x/round2 train.name=edge-r2 select=s) ---\n"
        "=== score done in 5.0s ===\n=== eval done in 9.0s ===\n"
        "# a second call: everything reused\n=== rollout done in 0.4s ===\n"
        "--- round 2?: score (run_dir=x/round2 train.name=edge-r2 select=s) ---\n"
        "=== score done in 0.1s ===\n"
    )
    assert ar.stage_seconds(log) == {
        1: {"rollout": 30.5, "score": 8.0, "train": 100.0},
        2: {"rollout": 20.0, "score": 5.0},
    }
