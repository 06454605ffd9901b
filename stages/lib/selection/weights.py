"""Selection pass 1 (DuckDB): every token's weight, the product of the policies' weights, over the
tokens and rollouts views; value checks and the per-shard weight read-back."""

from __future__ import annotations

from pathlib import Path

import duckdb
import numpy as np

from data_schemas.common import LOGPROB_TOL
from stages.lib import store, views
from stages.lib.config import SelectConfig
from stages.lib.errors import UserError
from stages.lib.layout import RunLayout
from stages.lib.selection.policies import NEEDS_FIX, Rule, bind

ROW_BITS = 32  # rid = shard << 32 | row number in the shard file


# ----------------------------------------------------------------------------- DuckDB pass
# scalar columns of tok that pass 1 reads: log-probs finite and <= 0, entropies finite (or null)
LOGPROB_COLS = ("teacher_logprob", "behavior_logprob", "ref_logprob", "teacher_topk_logmass")


ENTROPY_COLS = ("behavior_entropy", "teacher_entropy")


def open_pass1(layout: RunLayout, manifests: dict[str, dict], tmp_dir: Path, sel: SelectConfig):
    """A memory-bounded DuckDB session (spills to ``tmp_dir``) with the run's views
    (``stages.lib.views``) and the two pass 1 reads: ``tok`` (tokens + rid + shard) and
    ``rollouts_in``."""
    try:
        tmp_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise store.disk_error(e, str(tmp_dir)) from None
    con = views.connect(threads=sel.threads, memory_limit=sel.memory_limit, temp_dir=tmp_dir)
    views.open_run(
        layout, datasets=("rollouts", "tokens"), manifests=manifests, row_ids=True, con=con
    )
    con.execute(
        f"""
        CREATE OR REPLACE VIEW tok AS
        SELECT (_shard << {ROW_BITS}) | _row AS rid, _shard AS shard,
            sample_id, pos, token_id, segment, is_guided, teacher_logprob, behavior_logprob,
            behavior_entropy, teacher_entropy, ref_logprob, teacher_topk_logmass, teacher_id,
            xtok_chunk, xtok_chunk_logprob, xtok_mapped_k, xtok_mapped_frac
        FROM tokens
        """
    )
    con.execute(
        "CREATE OR REPLACE VIEW rollouts_in AS SELECT * EXCLUDE (_shard, _row) FROM rollouts"
    )
    return con


def check_values(con: duckdb.DuckDBPyConnection, tk_dir: Path) -> None:
    """Refuse NaN/inf (or positive log-probs) in what pass 1 reads, naming column and row."""
    bad = {c: f"NOT isfinite({c}) OR {c} > {LOGPROB_TOL}" for c in LOGPROB_COLS}
    bad |= {c: f"NOT isfinite({c})" for c in ENTROPY_COLS}
    counts = con.execute(
        "SELECT " + ", ".join(f"count(*) FILTER (WHERE {b})" for b in bad.values()) + " FROM tok"
    ).fetchone()
    for (col, cond), n in zip(bad.items(), counts):
        if not n:
            continue
        shard, row, sid, pos, v = con.execute(
            f"SELECT shard, rid & {(1 << ROW_BITS) - 1}, sample_id, pos, {col} FROM tok "
            f"WHERE {cond} ORDER BY rid LIMIT 1"
        ).fetchone()
        rule = "finite and <= 0" if col in LOGPROB_COLS else "finite"
        raise UserError(
            f"tokens column '{col}' has {n} invalid value(s), first {v!r} at row {row} of shard "
            f"{shard} (sample {sid}, pos {pos}); it must be {rule}",
            str(tk_dir / store.shard_relpath(shard)),
            "re-run python -m stages.score with overwrite=true; check the models for NaN weights",
        )


def check_needs(con: duckdb.DuckDBPyConnection, rules: list[Rule], where: str) -> None:
    """A policy whose input column is null on student tokens cannot run: say which and how to fix."""
    cols = sorted({c for r in rules for c in r.needs})
    if not cols:
        return
    counts = con.execute(
        "SELECT "
        + ", ".join(f"count(*) FILTER (WHERE {c} IS NULL)" for c in cols)
        + " FROM tok WHERE segment = 0"
    ).fetchone()
    for c, n in zip(cols, counts):
        if n:
            policy = next(r.policy for r in rules if c in r.needs)
            raise UserError(
                f"selection policy '{policy}' needs {c}, which is null for {n} student tokens",
                where,
                NEEDS_FIX.get(c, "re-run the score stage with that column"),
            )


def _policy_error(i: int, rule: Rule, msg: str) -> UserError:
    return UserError(
        f"selection policy '{rule.policy}' {msg}",
        f"select.rules[{i}]",
        "a policy must return exactly one (rid, weight >= 0) per row of tok",
    )


def _explain_bad_rids(con: duckdb.DuckDBPyConnection, rules: list[Rule], n_tok: int) -> None:
    """Name the rule whose rids are not one per token (only runs once a check has failed)."""
    for i, rule in enumerate(rules):
        n, dup, missing = con.execute(
            f"SELECT (SELECT count(*) FROM rule_{i}), "
            f"(SELECT count(*) - count(DISTINCT rid) FROM rule_{i}), "
            f"(SELECT count(*) FROM tok ANTI JOIN rule_{i} USING (rid))"
        ).fetchone()
        if dup or missing:
            raise _policy_error(
                i,
                rule,
                f"returned {n} rows for {n_tok} tokens ({dup} duplicated rid, {missing} missing)",
            )


def compute_weights(con: duckdb.DuckDBPyConnection, rules: list[Rule], *, seed: int, ln_v: float):
    """Create the temp table ``w`` (rid, pos, segment, is_guided, h, d, weight).

    ``w`` is not sorted by rid (sorting all tokens cost more than the rest of this function):
    ``shard_weights`` scatters any order, and the join emits rows in scan order, roughly by rid,
    so DuckDB's min/max zone maps still skip most of ``w`` for one shard's rid range.
    """
    n_tok = con.execute("SELECT count(*) FROM tok").fetchone()[0]
    for i, rule in enumerate(rules):
        try:
            con.execute(
                f"CREATE OR REPLACE TEMP TABLE rule_{i} AS {rule.sql}",
                bind(rule, seed=seed, ln_v=ln_v),
            )
            n, bad = con.execute(
                f"SELECT count(*), count(*) FILTER (WHERE weight IS NULL OR NOT isfinite(weight) "
                f"OR weight < 0) FROM rule_{i}"
            ).fetchone()
        except duckdb.Error as e:
            raise UserError(
                f"selection policy '{rule.policy}' failed in DuckDB: {str(e).splitlines()[0]}",
                f"select.rules[{i}]",
                "check the policy's SQL and parameters",
            ) from None
        if n != n_tok or bad:
            raise _policy_error(
                i,
                rule,
                f"returned {n} rows for {n_tok} tokens ({bad} null/negative/non-finite weights)",
            )
    product = " * ".join(f"r{i}.weight" for i in range(len(rules)))
    # Tokens the cross-tokenizer teacher did not score (xtok_chunk < 0): weight 0 whatever the
    # policy says (the SQL is unchanged when there are none: same-tokenizer runs as before).
    if con.execute("SELECT count(*) FROM tok WHERE xtok_chunk < 0").fetchone()[0]:
        product = f"({product}) * CASE WHEN xtok_chunk < 0 THEN 0.0 ELSE 1.0 END"
    joins = " ".join(f"LEFT JOIN rule_{i} AS r{i} USING (rid)" for i in range(len(rules)))
    con.execute(
        f"""
        CREATE OR REPLACE TEMP TABLE w AS
        SELECT rid, pos, segment, is_guided, behavior_entropy::DOUBLE AS h,
               (behavior_logprob - teacher_logprob)::DOUBLE AS d, ({product})::DOUBLE AS weight
        FROM tok {joins}
        """
    )
    # Every rule has n_tok rows with non-null weights, so the left joins give exactly n_tok rows
    # and no null weight iff each rule holds every rid once: the one-to-one check without a
    # count(DISTINCT rid) per rule (a hash aggregate over all tokens, each time).
    n_w, missing = con.execute(
        "SELECT count(*), count(*) FILTER (WHERE weight IS NULL) FROM w"
    ).fetchone()
    if n_w != n_tok or missing:
        _explain_bad_rids(con, rules, n_tok)
    for i in range(len(rules)):
        con.execute(f"DROP TABLE rule_{i}")


def shard_weights(con: duckdb.DuckDBPyConnection, shard: int, n_rows: int) -> np.ndarray:
    """The weights of one tokens shard, aligned with its rows [N] (any row order in ``w``)."""
    lo = shard << ROW_BITS
    got = con.execute(
        f"SELECT rid - {lo} AS row, weight FROM w WHERE rid >= {lo} AND rid < {lo + (1 << ROW_BITS)}"
    ).fetchnumpy()
    weight = np.zeros(n_rows, np.float64)
    weight[got["row"]] = got["weight"]
    return weight
