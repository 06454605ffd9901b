"""The SQL command: views over a run's shards, correct rows, one-line errors (run as a subprocess)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from stages import sql
from tests.test_select import LENS, run_select, write_run

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, list[dict]]:
    d = tmp_path_factory.mktemp("sqlrun")
    seqs = write_run(d)
    run_select(d, "all")
    run_select(d, "trust_region")
    return d, seqs


def cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "stages.sql", *args],
        cwd=ROOT,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_query_returns_the_right_rows(run):
    d, seqs = run
    q = seqs[3]
    p = cli(
        str(d),
        f"SELECT pos, token_id FROM tokens WHERE sample_id = '{q['sample_id']}' ORDER BY pos",
    )
    assert p.returncode == 0, p.stderr
    lines = p.stdout.strip().splitlines()
    body = [tuple(int(x) for x in ln.split("|")) for ln in lines[2:-1]]
    assert body == [(i, int(t)) for i, t in enumerate(q["response_ids"])]
    assert lines[-1] == f"({len(q['response_ids'])} rows)"


def test_selected_view_has_every_selection(run):
    d, seqs = run
    con, views = sql.connect(d)
    assert views == ["rollouts", "tokens", "selected"]
    got = dict(
        con.execute("SELECT selection, sum(n_kept) FROM selected GROUP BY 1 ORDER BY 1").fetchall()
    )
    assert got["all"] == sum(LENS) - 2  # two teacher-prefix tokens
    trust = sum(
        int(((q["teacher_lp"] - q["behavior_lp"] >= np.log(0.5)) & (q["segment"] == 0)).sum())
        for q in seqs
    )
    assert got["trust_region"] == trust  # the same rule, recomputed by hand
    for _, q in sql.examples():  # every README example runs on a real run
        sql.query(con, q)
    assert len(sql.examples()) == 5


def test_bad_sql_and_missing_run_are_one_line_errors(run, tmp_path):
    d, _ = run
    p = cli(str(d), "SELEC nonsense")
    assert p.returncode != 0 and p.stderr.startswith("error: SQL error")
    assert len(p.stderr.strip().splitlines()) == 1
    p = cli(str(tmp_path / "nope"), "SELECT 1")
    assert p.returncode != 0 and "not found" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


def test_interactive_shell(run):
    d, _ = run
    p = cli(str(d), stdin=".tables\nSELECT count(*) AS n\nFROM rollouts;\nbad;\n.quit\nSELECT 1;\n")
    assert p.returncode == 0, p.stderr
    assert "tokens" in p.stdout and "selected" in p.stdout
    assert str(len(LENS)) in [ln.strip() for ln in p.stdout.splitlines()]  # count(*) of rollouts
    assert "error: SQL error" in p.stdout  # a bad statement does not end the shell
    assert "(1 row)" in p.stdout and p.stdout.count("(1 row)") == 1  # nothing after .quit
