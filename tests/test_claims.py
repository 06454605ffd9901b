"""scripts/claims.py: its rows' configs, its CPU ledger and its table (no model runs)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import claims
import pytest


def configs(tmp_path, rounds=0):
    out = {}
    for _, _, kind, name, extra in claims.ROWS:
        cfg = claims.demo_config(kind, 0, tmp_path / "runs", tmp_path / "world")
        out[(kind, name)] = (cfg, claims.row_config(cfg, name, extra, rounds))
    return out


def test_rows_keep_the_demo_recipe_and_differ_only_where_the_claim_says(tmp_path):
    rows = configs(tmp_path)
    demo, offline = rows[("guided", "offline")]
    assert (offline.train.epochs, offline.pipeline.rounds) == (demo.train.epochs, 1)
    _, online = rows[("guided", "online")]
    # online: the same optimizer steps as offline, spread over rounds of fresh rollouts
    assert (online.pipeline.rounds, online.train.epochs) == (offline.train.epochs, 1)
    assert claims.row_config(demo, "online", claims.ONLINE, 4).train.epochs * 4 == demo.train.epochs
    _, restarts = rows[("guided", "restarts")]
    assert (restarts.pipeline.rounds, restarts.train.epochs) == (demo.train.epochs, 1)
    assert (online.train.lr, online.select.name, online.loss.name) == (
        offline.train.lr,
        offline.select.name,
        offline.loss.name,
    )
    ung, ung_k1 = rows[("unguided", "opd_k1")]
    assert ung.rollout.guided_fraction == 0 and demo.rollout.guided_fraction == 0.5
    assert ung_k1.loss.name == "opd_k1" and ung_k1.select.name == offline.select.name
    assert rows[("guided", "tip50")][1].select.name == "entropy_half"
    assert rows[("guided", "all")][1].select.name == "all"
    # rows sharing a run dir share its rollouts and scores, so their train names must differ
    names = [(c.run_dir, c.train.name) for _, c in rows.values()]
    assert len(set(names)) == len(names)


def test_rounds_must_divide_the_epochs(tmp_path):
    cfg = claims.demo_config("guided", 0, tmp_path, tmp_path)
    with pytest.raises(SystemExit, match="must divide"):
        claims.row_config(cfg, "online", claims.ONLINE, 5)


def test_ledger_keeps_the_first_completed_call(tmp_path):
    calls = []
    burn = SimpleNamespace(run=lambda cfg: calls.append(sum(i * i for i in range(300_000))))
    claims.Ledger(str(tmp_path)).run("rollout", burn, None)
    first = json.loads((tmp_path / "cpu.json").read_text())["rollout"]
    assert first > 0
    claims.Ledger(str(tmp_path)).run("rollout", burn, None)  # another row: runs, not re-counted
    assert json.loads((tmp_path / "cpu.json").read_text())["rollout"] == first
    assert len(calls) == 2


def test_table_has_mean_std_and_every_seed():
    v = {s: 0.5 for s in claims.SETS}
    rows = {"r": {"seeds": {0: {**v, "cpu_s": 10.0}, 1: {**v, "private_closed": 0.7, "cpu_s": 20}}}}
    md = claims.table(rows, [0, 1], "python scripts/claims.py --seeds 0 1")
    assert "| r | 60.0 ± 14.1 | 50.0 ± 0.0 |" in md
    assert "| 15 ± 7 | 2 |" in md
    assert "| r | 1 | 70.0 |" in md and "python scripts/claims.py --seeds 0 1" in md


def test_round_schedules_split_the_demo_cosine(tmp_path):
    tc = claims.demo_config("guided", 0, tmp_path, tmp_path).train
    parts = [dict(o.split("=") for o in claims.round_schedule(tc, r, 12)) for r in range(1, 13)]
    assert float(parts[0]["train.lr"]) == pytest.approx(tc.lr)
    assert int(parts[0]["train.warmup_steps"]) == tc.warmup_steps
    end = float(parts[-1]["train.lr"]) * float(parts[-1]["train.min_lr_ratio"])
    assert end == pytest.approx(tc.lr * tc.min_lr_ratio, rel=1e-4)  # ends where the demo ends
    for a, b in zip(parts, parts[1:], strict=False):  # each round starts where the last ended
        a_end = float(a["train.lr"]) * float(a["train.min_lr_ratio"])
        assert float(b["train.lr"]) == pytest.approx(a_end, rel=1e-4)


def test_names_picks_single_rows_of_a_group(tmp_path, capsys):
    """--names runs only the named rows (a control re-run without its group's expensive rows)."""
    common = [
        "--world",
        str(tmp_path / "w"),
        "--root",
        str(tmp_path / "r"),
        "--seeds",
        "0",
        "--dry",
    ]
    assert claims.main([*common, "--groups", "rounds", "--names", "restarts_sched"]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("seed 0")]
    assert len(lines) == 1 and " restarts_sched rounds=" in lines[0]
    assert claims.main([*common, "--groups", "rounds"]) == 0
    assert len([ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("seed")]) == 3
    assert not (tmp_path / "r").exists()  # --dry writes nothing


def test_ledgers_sharing_a_run_dir_keep_each_others_entries(tmp_path):
    """Two claims processes on one run dir (a control beside a group): each opened the ledger
    before the other wrote; neither write may drop the other's entry."""
    burn = SimpleNamespace(run=lambda cfg: sum(i * i for i in range(100_000)))
    a, b = claims.Ledger(str(tmp_path)), claims.Ledger(str(tmp_path))
    a.run("train/restarts_sched-r13", burn, None)
    b.run("train/tip50", burn, None)  # b's in-memory copy predates a's entry
    on_disk = json.loads((tmp_path / "cpu.json").read_text())
    assert set(on_disk) == {"train/restarts_sched-r13", "train/tip50"}
