"""The SQL command: views over a run's shards, correct rows, one-line errors (run as a subprocess)."""

from __future__ import annotations

import hashlib
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
    assert views == ["rollouts", "tokens", "selected", "selected/all", "selected/trust_region"]
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


# ----------------------------------------------------------------------------- read-only (#16)
def snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` with its sha256 (locks included: nothing may change)."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def refused(d: Path, q: str, tmp_path: Path) -> subprocess.CompletedProcess:
    before, outside = snapshot(d), snapshot(tmp_path)
    p = cli(str(d), q)
    assert p.returncode == 2, (q, p.stdout, p.stderr)
    assert len(p.stderr.strip().splitlines()) == 1 and p.stderr.startswith("error: "), p.stderr
    assert snapshot(d) == before and snapshot(tmp_path) == outside, q
    return p


def test_read_only_refuses_writes_attach_extensions_network(run, tmp_path):
    d, _ = run
    shard = next((d / "tokens").rglob("*.parquet"))
    manifest = d / "tokens" / "_manifest.json"
    cases = {
        f"COPY (SELECT 1) TO '{manifest}'": "COPY",
        # allowed_paths lists this shard: only the statement check stops an in-place overwrite
        f"COPY (SELECT 1 AS a) TO '{shard}' (FORMAT parquet, USE_TMP_FILE false)": "COPY",
        f"COPY tokens TO '{tmp_path / 'out.csv'}'": "COPY",
        f"ATTACH '{tmp_path / 'x.duckdb'}' AS x": "ATTACH",
        "INSTALL httpfs": "LOAD",
        "LOAD httpfs": "LOAD",
        "SET enable_external_access = true": "SET",
        f"EXPORT DATABASE '{tmp_path / 'exp'}'": "EXPORT",
        "CREATE TABLE t AS SELECT 1": "CREATE",
    }
    for q, kind in cases.items():
        p = refused(d, q, tmp_path)
        assert f"is {kind}" in p.stderr and "read-only" in p.stderr, (q, p.stderr)


def test_read_only_multi_statement_runs_nothing_if_one_is_refused(run, tmp_path):
    d, _ = run
    out = tmp_path / "x.csv"
    p = refused(d, f"SELECT 1; COPY (SELECT 2) TO '{out}'; SELECT 3", tmp_path)
    assert "statement 2 of 3 is COPY" in p.stderr and p.stdout == ""
    assert not out.exists()
    ok = cli(str(d), "SELECT count(*) AS n FROM rollouts; SELECT 42 AS answer")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.count("(1 row)") == 2 and "42" in ok.stdout


def test_read_only_select_cannot_reach_other_files_or_network(run, tmp_path):
    d, _ = run
    (tmp_path / "secret.csv").write_text("a\n1\n")
    for q in (
        f"SELECT * FROM read_csv('{tmp_path / 'secret.csv'}')",
        "SELECT * FROM read_parquet('https://example.com/x.parquet')",
        "SELECT * FROM glob('/etc/*')",
    ):
        p = refused(d, q, tmp_path)
        assert "SQL error" in p.stderr and "disabled by configuration" in p.stderr, p.stderr
    con, _ = sql.connect(d)  # in-process: the settings stay locked
    with pytest.raises(Exception, match="locked"):
        con.execute("SET enable_external_access = true")
    # the views still read every shard
    assert con.execute("SELECT count(*) FROM tokens").fetchone()[0] == sum(LENS)


def test_allow_writes_flag_lifts_the_limits(run, tmp_path):
    d, _ = run
    out = tmp_path / "tokens.csv"
    p = cli(str(d), f"COPY (SELECT sample_id, pos FROM tokens) TO '{out}'", "--allow-writes")
    assert p.returncode == 0, p.stderr
    assert len(out.read_text().splitlines()) == sum(LENS) + 1
