"""Select stage: decide, in SQL, which tokens carry the learning signal; write train-ready rows.

Reads ``run_dir/rollouts/`` and ``run_dir/tokens/`` (both verified with ``store.open_committed``,
then read in place by DuckDB) and writes ``run_dir/selected/<select.name>/`` (the ``selected``
table: one row per sequence with per-token ``weights``, the teacher/behaviour/reference columns and
the teacher top-K flattened to T*K) plus a summary in the manifest (``extra.summary``), printed as a
small table. Several selections of one run coexist; a re-run with the same inputs and config is a
no-op, a killed run resumes per shard, another config is refused unless ``overwrite=true``.

    python -m stages.select run_dir=runs/demo select=entropy_half
    python -m stages.select run_dir=runs/demo select=evidence 'select.rules.0.params.threshold=0.5'

How it works:

1. Pass 1 (DuckDB, CPU, memory-bounded: ``select.memory_limit``, spills to a per-process folder
   under ``run_dir/.duckdb_tmp/``; the views come from ``stages.lib.views``, the one way a run is
   opened): the token values it reads are checked first (NaN/inf, positive log-probs: an error
   naming the column, shard and row), then each rule of ``select.rules`` is one parameterised SQL file in
   ``stages/sql_policies/<policy>.sql`` (read the header of each for its formula, its paper and its
   parameters; parameters are DuckDB prepared parameters ``$name``, validated here first). A policy
   returns a weight for every token (0 = excluded); rules compose by the product of their weights.
   ``policy`` may also be a path to your own ``.sql`` file following the same contract (all.sql).
2. Pass 2 (per input shard, Arrow): the weights of a tokens shard are joined back by row number,
   tokens are put in sequence order, checked against the rollouts (ids, lengths, positions), and
   written as per-sequence rows (``select.rows_per_shard`` per output shard). A sequence whose
   tokens are all excluded stays (``n_kept = 0``) and is counted, never dropped silently.
   Columnar throughout: a per-sequence list column is the tokens' flat values plus new offsets
   (no copy when the rows are already in sequence order, as the score stage writes them); the
   codec's top-K deltas are decoded once, straight to float32; shard s is written by a
   background thread while shard s+1 is read and assembled.

Where the time goes (5M tokens, K = 32, 25 shards, 2 cores; ``scripts/bench_select.py``): Parquet
write of the output ~35 % of the CPU, Parquet read of the inputs ~25 %, DuckDB ~15 %, top-K decode
and assembly ~12 %, checksums of inputs and outputs ~7 %, output validation ~3 %.

Selections from rollout-time values (behaviour entropy/log-probs) are exact for one pass over fresh
rollouts and a proxy afterwards; the behaviour log-prob is kept so the trainer can measure staleness.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import shutil
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from data_schemas import codec, rollouts, selected, tokens
from data_schemas import manifest as manifest_mod
from data_schemas.common import LOGPROB_TOL
from stages.lib import store, views
from stages.lib.config import Config, SelectConfig, as_dict
from stages.lib.entry import hydra_entry
from stages.lib.errors import UserError
from stages.lib.layout import RunLayout

POLICY_DIR = Path(__file__).resolve().parent / "sql_policies"
POSITION_BUCKETS = ((0, 3), (4, 7), (8, 15), (16, 31), (32, None))
ROW_BITS = 32  # rid = shard << 32 | row number in the shard file

NEEDS_FIX = {
    "behavior_entropy": "score with score.behavior=true score.entropy=true (full-vocabulary entropy)",
    "ref_logprob": "score with ref.path set (a reference model), or use the span rule alone "
    "(threshold=null top_fraction=null span=true)",
    "xtok_mapped_frac": "the tokens are not cross-tokenizer: score a teacher of another "
    "tokenizer with score.cross_tokenizer=align, or drop this policy",
}


# ----------------------------------------------------------------------------- policy registry
@dataclass(frozen=True)
class Param:
    """One policy parameter: its default and a check (strict: bound values are numbers/choices)."""

    default: Any
    check: Callable[[Any], bool]
    rule: str  # what the check enforces, for the error message


def _num(lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False, null=False):
    def ok(v: Any) -> bool:
        if v is None:
            return null
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            return False
        return (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)

    return ok


def _choice(*options: str) -> Callable[[Any], bool]:
    return lambda v: v in options


def _bool(v: Any) -> bool:
    return isinstance(v, bool)


INF = math.inf
ENTROPY_PARAMS = {
    "rho": Param(0.5, _num(0, 1, lo_open=True), "a number in (0, 1]"),
    "mode": Param("sample", _choice("sample", "top"), "'sample' or 'top'"),
    "alpha": Param(1.0, _num(0, INF, hi_open=True), "a number >= 0"),
}
Q3_PARAMS = {
    "entropy_quantile": Param(0.5, _num(0, 1, lo_open=True, hi_open=True), "a number in (0, 1)"),
    "divergence_quantile": Param(0.9, _num(0, 1, hi_open=True), "a number in [0, 1)"),
    "divergence": Param("rkl", _choice("rkl", "abs"), "'rkl' or 'abs'"),
}


@dataclass(frozen=True)
class Policy:
    params: dict[str, Param] = field(default_factory=dict)
    # per-token columns that must be non-null on student tokens, given the bound parameters
    needs: Callable[[dict], tuple[str, ...]] = lambda p: ()


POLICIES: dict[str, Policy] = {
    "all": Policy(),
    "entropy": Policy(ENTROPY_PARAMS, lambda p: ("behavior_entropy",)),
    "tip_q3": Policy(Q3_PARAMS, lambda p: ("behavior_entropy",)),
    "tip_type_aware": Policy({**ENTROPY_PARAMS, **Q3_PARAMS}, lambda p: ("behavior_entropy",)),
    "evidence": Policy(
        {
            "threshold": Param(1.0, _num(-INF, INF, null=True), "a number (nats) or null"),
            "top_fraction": Param(None, _num(0, 1, lo_open=True, null=True), "in (0, 1] or null"),
            "span": Param(True, _bool, "true or false"),
            "keep_rest": Param(0.0, _num(0, 1), "a number in [0, 1]"),
        },
        lambda p: (
            ("ref_logprob",) if p["threshold"] is not None or p["top_fraction"] is not None else ()
        ),
    ),
    "retain": Policy({"weight": Param(1.0, _num(0, INF, hi_open=True), "a number >= 0")}),
    "teacher": Policy(
        {
            "name": Param(None, lambda v: isinstance(v, str) and bool(v), "a teacher name"),
            "weight": Param(0.0, _num(0, INF, hi_open=True), "a number >= 0"),
        }
    ),
    "trust_region": Policy({"tau": Param(0.5, _num(0, 1, lo_open=True), "a number in (0, 1]")}),
    "iw_position": Policy({"w_max": Param(1.5, _num(1, INF, hi_open=True), "a number >= 1")}),
    "xtok_mapped": Policy(
        {"min_frac": Param(0.5, _num(0, 1), "a number in [0, 1]")},
        lambda p: ("xtok_mapped_frac",),
    ),
}


@dataclass
class Rule:
    """A resolved rule: the policy name, its SQL text and its validated parameters."""

    policy: str
    sql: str
    params: dict[str, Any]
    needs: tuple[str, ...]


def sql_parameters(sql: str) -> set[str]:
    """The ``$name`` prepared parameters a SQL text uses (comments ignored)."""
    body = "\n".join(line.split("--", 1)[0] for line in sql.splitlines())
    return set(re.findall(r"\$([A-Za-z_][A-Za-z0-9_]*)", body))


def resolve_rule(policy: str, params: dict[str, Any]) -> Rule:
    """Validate a rule's policy and parameters (UserError naming the fix) and load its SQL."""
    where = f"select.rules (policy {policy})"
    params = dict(params or {})
    if policy.endswith(".sql"):  # the user's own policy file: scalars only, bound as given
        path = Path(policy)
        if not path.is_file():
            raise UserError(f"policy file {policy} not found", where, "give an existing .sql path")
        for k, v in params.items():
            if not (v is None or isinstance(v, bool | int | float | str)):
                raise UserError(
                    f"parameter {k}={v!r} is not a scalar", where, "use numbers/strings"
                )
        return Rule(policy, path.read_text(), params, ())
    if policy not in POLICIES:
        raise UserError(
            f"unknown selection policy '{policy}'",
            where,
            f"use one of {sorted(POLICIES)} or a path to your own .sql file",
        )
    spec = POLICIES[policy]
    unknown = sorted(set(params) - set(spec.params))
    if unknown:
        raise UserError(
            f"unknown parameter(s) {unknown} for policy '{policy}'",
            where,
            f"its parameters are {sorted(spec.params)} (see stages/sql_policies/{policy}.sql)",
        )
    bound = {}
    for name, p in spec.params.items():
        v = params.get(name, p.default)
        if isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        if not p.check(v):
            raise UserError(
                f"parameter {name}={v!r} of policy '{policy}' must be {p.rule}",
                where,
                f"set select.rules[i].params.{name}",
            )
        bound[name] = v
    return Rule(policy, (POLICY_DIR / f"{policy}.sql").read_text(), bound, spec.needs(bound))


def bind(rule: Rule, *, seed: int, ln_v: float) -> dict[str, Any]:
    """Exactly the parameters the SQL text uses (DuckDB refuses missing and unused ones)."""
    avail = {**rule.params, "seed": int(seed), "ln_v": float(ln_v)}
    used = sql_parameters(rule.sql)
    missing = sorted(used - set(avail))
    if missing:
        raise UserError(
            f"policy {rule.policy} uses parameter(s) {missing} that are not set",
            "select.rules",
            "add them to the rule's params",
        )
    return {k: avail[k] for k in sorted(used)}


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


def _roll_up(rows: list[tuple], label: Callable[[tuple], str | None]) -> dict:
    """Sum fine groups (key..., tokens, kept, first pos) into the groups ``label`` names, ordered
    by their first position, then name; a None label (no entropy) is left out."""
    acc: dict[str, list[int]] = {}
    for r in rows:
        g = label(r)
        if g is None:
            continue
        n, k, first = acc.setdefault(g, [0, 0, r[-1]])
        acc[g] = [n + r[-3], k + r[-2], min(first, r[-1])]
    return {
        g: {"tokens": int(n), "kept": int(k), "fraction": (k / n) if n else 0.0}
        for g, (n, k, _) in sorted(acc.items(), key=lambda kv: (kv[1][2], kv[0]))
    }


def _bucket(i: int) -> str:
    lo, hi = POSITION_BUCKETS[i]
    return f"{lo}-{hi}" if hi is not None else f"{lo}+"


def _quadrant(no_h: bool | None, low_h: bool | None, low_d: bool | None) -> str | None:
    if no_h:
        return None
    h, d = ("low" if low_h else "high"), ("low" if low_d else "high")
    return f"{h}_entropy/{d}_divergence"


def _median(con: duckdb.DuckDBPyConnection, col: str) -> float | None:
    """DuckDB's ``median`` of a DOUBLE column of ``w`` over student tokens, computed in numpy.

    DuckDB's median is a holistic aggregate that holds every value in memory outside the
    spillable buffers: at 50M tokens it failed under a 1GB ``select.memory_limit``. Here the
    values stream out (w may spill) into one float64 array (8 bytes per student token), and the
    result is DuckDB's own formula, bit for bit: ``lo + 0.5 * (hi - lo)`` for an even count.
    """
    x = con.execute(f"SELECT {col} FROM w WHERE segment = 0 AND {col} IS NOT NULL").fetchnumpy()
    x = np.asarray(x[col], np.float64)  # [n]
    if len(x) == 0:
        return None
    lo_i, hi_i = (len(x) - 1) // 2, len(x) // 2
    x.partition([lo_i, hi_i])
    lo, hi = float(x[lo_i]), float(x[hi_i])
    return lo if lo_i == hi_i else lo + 0.5 * (hi - lo)


def summarize(con: duckdb.DuckDBPyConnection) -> dict:
    """Kept tokens overall, per TIP quadrant (median splits), guided/unguided, position bucket."""
    # sequences = tokens at pos 0: pass 2 proves one row per response position (or fails)
    total, student, kept, wsum, n_seq = con.execute(
        "SELECT count(*), count(*) FILTER (WHERE segment = 0), count(*) FILTER (WHERE weight > 0), "
        "coalesce(sum(weight), 0), count(*) FILTER (WHERE pos = 0) FROM w"
    ).fetchone()
    bucket = "CASE " + " ".join(
        f"WHEN pos <= {hi} THEN {i}" for i, (_, hi) in enumerate(POSITION_BUCKETS) if hi is not None
    )
    bucket += f" ELSE {len(POSITION_BUCKETS) - 1} END"
    # One aggregation into at most 4 x 2 x 5 fine groups, rolled up here three ways: a hash
    # aggregate on small keys instead of three GROUP BYs on strings built per token.
    mh, md = (_median(con, c) for c in ("h", "d"))
    rows = con.execute(
        f"""
        SELECT h IS NULL, h < $mh, d < $md, is_guided, {bucket} AS b,
               count(*), count(*) FILTER (WHERE weight > 0), min(pos)
        FROM w WHERE segment = 0 GROUP BY ALL
        """,
        {"mh": mh, "md": md},
    ).fetchall()
    return {
        "tokens_total": int(total),
        "student_tokens": int(student),
        "tokens_kept": int(kept),
        "kept_fraction": kept / student if student else 0.0,
        "weight_sum": float(wsum),
        "sequences": int(n_seq),
        "by_quadrant": _roll_up(rows, lambda r: _quadrant(*r[:3])),
        "by_guided": _roll_up(rows, lambda r: "guided" if r[3] else "unguided"),
        "by_position": _roll_up(rows, lambda r: _bucket(r[4])),
    }


# ----------------------------------------------------------------------------- Arrow pass
# What pass 2 reads of a tokens shard, as stored: the top-K log-probs stay in the codec's
# fixed-point deltas (data_schemas/codec.py) and are decoded here with the fixed-K fast path.
TOKEN_COLUMNS = (
    "sample_id",
    "pos",
    "token_id",
    "segment",
    "teacher_logprob",
    "behavior_logprob",
    "ref_logprob",
    "teacher_topk_ids",
    codec.PHYSICAL,
    "teacher_topk_logmass",
    "behavior_topk_ids",
    "teacher_logprobs_on_behavior_topk",
    *tokens.XTOK_COLUMNS,  # cross-tokenizer shards only (read when present)
)
ROLLOUT_COLUMNS = (
    "sample_id",
    "prompt_id",
    "is_guided",
    "train_prompt_ids",
    "response_ids",
    "response_len",
)


def read_tokens_shard(path: Path) -> pa.Table:
    """The columns pass 2 needs of one tokens shard, top-K log-probs still codec-encoded.

    A shard in the logical layout (``teacher_topk_logprobs`` as floats) is read as it is.
    """
    names = set(pq.read_schema(path).names)
    cols = [c for c in TOKEN_COLUMNS if c in names]
    if codec.PHYSICAL not in names:
        cols.append(codec.LOGICAL)
    return pq.read_table(path, columns=cols)


def decode_topk(deltas: np.ndarray, k: int) -> np.ndarray:
    """Flat codec deltas [N*K] of fixed-K lists -> flat float32 log-probs [N*K].

    Equal to ``codec.decode_logprobs`` (tested) but a row-wise cumsum on the [N, K] view instead
    of a global cumsum plus per-list corrections: ~8x faster on millions of tokens. int32 sums
    are exact when no prefix sum can overflow (|d| * K < 2^31, true for any log-prob above
    -2^22 / K nats); otherwise int64. int -> float32 then * -STEP (a power of two) rounds exactly
    like the codec's float64 product cast to float32.
    """
    d = deltas.reshape(-1, k)  # [N, K]
    big = len(deltas) and max(int(deltas.max()), -int(deltas.min())) * k >= 2**31
    q = np.cumsum(d, axis=1, dtype=np.int64 if big else np.int32)  # [N, K] fixed-point, >= 0
    out = q.astype(np.float32)
    out *= np.float32(-codec.STEP)
    return out.reshape(-1)


def _flat_values(col: pa.ChunkedArray) -> pa.Array:
    """The values of a list column as one array (zero copy for a single chunk)."""
    arr = col.combine_chunks()
    return arr.flatten()


def sequence_order(ro: pa.Table, tk: pa.Table, where: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Sequence offsets [S+1] and the token row for every flat (sequence, pos) slot.

    Proves that every response position has exactly one token row and that the tokens match
    ``response_ids``. The order is None when the rows are already in sequence order (what the
    score stage writes), so the columns can be used without a gather.
    """
    fix = "re-run python -m stages.score with overwrite=true (tokens must match the rollouts)"
    n_seq = ro.num_rows
    lens = ro["response_len"].to_numpy().astype(np.int64)  # [S]
    offsets = np.zeros(n_seq + 1, np.int64)
    np.cumsum(lens, out=offsets[1:])
    n_tok = int(offsets[-1])
    row = pc.fill_null(pc.index_in(tk["sample_id"], value_set=ro["sample_id"]), -1).to_numpy()
    pos = tk["pos"].to_numpy().astype(np.int64)  # [N]
    if (row < 0).any():
        sid = tk["sample_id"][int(np.flatnonzero(row < 0)[0])]
        raise UserError(
            f"token rows for sample {sid} which is not in the rollouts shard", where, fix
        )
    if (pos < 0).any() or (pos >= lens[row]).any():
        raise UserError("token positions outside the response length", where, fix)
    dest = offsets[row] + pos  # [N] flat index of each token row in sequence order
    hits = np.bincount(dest, minlength=n_tok)
    if len(dest) != n_tok or (hits != 1).any():
        raise UserError(
            f"{int((hits == 0).sum())} response positions missing and "
            f"{int((hits > 1).sum())} duplicated in the tokens table",
            where,
            fix,
        )
    order = None
    if not np.array_equal(dest, np.arange(n_tok)):
        order = np.empty(n_tok, np.int64)
        order[dest] = np.arange(n_tok)  # order[j] = token row that goes to flat position j
    token_id = tk["token_id"].to_numpy()
    if order is not None:
        token_id = token_id[order]
    if not np.array_equal(token_id, pc.list_flatten(ro["response_ids"]).to_numpy()):
        raise UserError("tokens.token_id differs from rollouts.response_ids", where, fix)
    return offsets, order


def topk_lists(
    tk: pa.Table, ids: str, lps: str, offsets: np.ndarray, order: np.ndarray | None, where: str
) -> tuple[int, pa.Array | None, pa.Array | None]:
    """K and the per-sequence [T*K] lists of one top-K pair (None, None when not stored).

    The flat values are reused as they are (sequence order) or gathered row-wise; only the
    list offsets change (offsets * K). Codec-encoded log-probs are decoded to float32.
    """
    fix = "re-run python -m stages.score with overwrite=true"
    n_tok = int(offsets[-1])
    nulls = tk[ids].null_count
    if nulls == n_tok:
        return 0, None, None
    if nulls:
        raise UserError(f"{ids} is null for some tokens only", where, fix)
    flat_ids = _flat_values(tk[ids])
    k = len(flat_ids) // n_tok if n_tok else 0
    lens = pc.list_value_length(tk[ids])
    if n_tok and (len(flat_ids) != n_tok * k or pc.min_max(lens).as_py() != {"min": k, "max": k}):
        raise UserError(f"{ids} lists are not all of one length K", where, fix)
    flat_lps = _flat_values(tk[lps])
    if len(flat_lps) != len(flat_ids):
        raise UserError(f"{lps} and {ids} differ in length", where, fix)
    if order is not None:
        flat_ids = pa.array(flat_ids.to_numpy().reshape(n_tok, k)[order].ravel())  # [N*K]
        flat_lps = pa.array(
            flat_lps.to_numpy(zero_copy_only=False).reshape(n_tok, k)[order].ravel()
        )
    if lps == codec.PHYSICAL:
        flat_lps = pa.array(decode_topk(flat_lps.to_numpy(), k))
    offk = pa.array((offsets * k).astype(np.int32))
    return k, pa.ListArray.from_arrays(offk, flat_ids), pa.ListArray.from_arrays(offk, flat_lps)


def assemble(ro: pa.Table, tk: pa.Table, weight: np.ndarray, where: str) -> pa.Table:
    """Per-sequence rows (rollouts order) from one rollouts shard and its tokens shard.

    ``tk`` is a shard as ``read_tokens_shard`` returns it (or in the logical layout); ``weight``
    is aligned with its rows. Everything is columnar: a list column is its flat values in
    sequence order plus the response offsets, so no Python loop runs per sequence or token.
    """
    offsets, order = sequence_order(ro, tk, where)
    n_seq, n_tok = ro.num_rows, int(offsets[-1])
    off32 = pa.array(offsets.astype(np.int32))

    def per_token(name: str) -> pa.Array:
        values = tk[name].combine_chunks()
        if order is not None:
            values = values.take(pa.array(order))
        return pa.ListArray.from_arrays(off32, values)

    lps = codec.PHYSICAL if codec.PHYSICAL in tk.column_names else codec.LOGICAL
    k, t_ids, t_lps = topk_lists(tk, "teacher_topk_ids", lps, offsets, order, where)
    kb, b_ids, b_lps = topk_lists(
        tk, "behavior_topk_ids", "teacher_logprobs_on_behavior_topk", offsets, order, where
    )
    ref_nulls = tk["ref_logprob"].null_count
    if 0 < ref_nulls < n_tok:
        raise UserError(
            "ref_logprob is null for some tokens only",
            where,
            "re-run python -m stages.score with overwrite=true",
        )
    w = weight if order is None else weight[order]
    w = w.astype(np.float32)  # [N]
    kept = np.concatenate([[0], np.cumsum(w > 0)])  # [N+1] (reduceat mishandles empty rows)
    n_kept = kept[offsets[1:]] - kept[offsets[:-1]]  # [S]
    empty_lists = lambda typ: pa.nulls(n_seq, pa.list_(typ))  # noqa: E731
    table = pa.table(
        {
            "sample_id": ro["sample_id"],
            "prompt_id": ro["prompt_id"],
            "is_guided": ro["is_guided"],
            "train_prompt_ids": ro["train_prompt_ids"],
            "response_ids": ro["response_ids"],
            "response_len": ro["response_len"],
            "n_kept": pa.array(n_kept.astype(np.int32)),
            "weights": pa.ListArray.from_arrays(off32, pa.array(w)),
            "segments": per_token("segment"),
            "teacher_logprob": per_token("teacher_logprob"),
            "behavior_logprob": per_token("behavior_logprob"),
            "ref_logprob": empty_lists(pa.float32()) if ref_nulls else per_token("ref_logprob"),
            "topk_k": pa.array(np.full(n_seq, k, np.int32)),
            "teacher_topk_ids": t_ids,
            "teacher_topk_logprobs": t_lps,
            "teacher_topk_logmass": per_token("teacher_topk_logmass"),
            "behavior_topk_k": pa.array(np.full(n_seq, kb, np.int32)),
            "behavior_topk_ids": b_ids if kb else empty_lists(pa.int32()),
            "teacher_logprobs_on_behavior_topk": b_lps if kb else empty_lists(pa.float16()),
        },
        schema=selected.SCHEMA,
    )
    if "xtok_chunk" in tk.column_names:
        table = _with_xtok(table, tk, per_token, offsets, order, k)
    return table


def _with_xtok(table: pa.Table, tk: pa.Table, per_token, offsets, order, k: int) -> pa.Table:
    """The cross-tokenizer columns (``selected.XTOK_FIELDS``), per sequence like the others."""
    for f in selected.XTOK_FIELDS[:-1]:  # per token [T]
        table = table.append_column(f, per_token(f.name).cast(f.type))
    n_tok = int(offsets[-1])
    probs = _flat_values(tk["xtok_sorted_probs"]).to_numpy(zero_copy_only=False)  # [N*K]
    probs = probs.reshape(n_tok, k)
    if order is not None:
        probs = probs[order]
    offk = pa.array((offsets * k).astype(np.int32))  # [S + 1]
    f = selected.XTOK_FIELDS[-1]  # [T*K]
    return table.append_column(f, pa.ListArray.from_arrays(offk, pa.array(probs.reshape(-1))))


def output_plan(ro_manifest: dict, rows_per_shard: int) -> list[int]:
    """First output shard of each input shard (plus the total at the end): deterministic resume."""
    starts = [0]
    for s in ro_manifest["shards"]:
        starts.append(starts[-1] + math.ceil(s["rows"] / rows_per_shard))
    return starts


# ----------------------------------------------------------------------------- the stage
def dataset_id_of(ro_id: str, tk_id: str, sel: SelectConfig, seed: int) -> str:
    # memory_limit/threads change how, not what: they do not enter the id
    cfg = {k: v for k, v in as_dict_select(sel).items() if k not in ("memory_limit", "threads")}
    return store.content_id({"rollouts": ro_id, "tokens": tk_id, "select": cfg, "seed": seed})


def as_dict_select(sel: SelectConfig) -> dict:
    return {
        "name": sel.name,
        "rules": [{"policy": r.policy, "params": dict(r.params)} for r in sel.rules],
        "rows_per_shard": sel.rows_per_shard,
        "row_group_rows": sel.row_group_rows,
        "memory_limit": sel.memory_limit,
        "threads": sel.threads,
    }


def _vocab_ln(*manifests: dict) -> float:
    """ln V for the entropy normaliser H/ln V (it only scales the sampling keys and sets the floor)."""
    for m in manifests:
        for where in (m.get("extra", {}), m.get("extra", {}).get("tokenizer", {})):
            v = where.get("vocab_size") if isinstance(where, dict) else None
            if isinstance(v, int) and v > 1:
                return math.log(v)
    return 1.0


def _inputs(layout: RunLayout) -> tuple[dict, dict]:
    """The verified rollouts and tokens manifests, checked to belong together."""
    ro_m = store.open_committed(
        layout.rollouts, rollouts, what_writes_it="python -m stages.rollout"
    )
    tk_m = store.open_committed(layout.tokens, tokens, what_writes_it="python -m stages.score")
    fix = "re-run python -m stages.score with overwrite=true"
    if tk_m["inputs"].get("rollouts", ro_m["dataset_id"]) != ro_m["dataset_id"]:
        raise UserError(
            "the tokens were scored from other rollouts than the ones in this run",
            str(layout.tokens),
            fix,
        )
    if len(tk_m["shards"]) != len(ro_m["shards"]):
        raise UserError(
            f"tokens has {len(tk_m['shards'])} shards, rollouts {len(ro_m['shards'])} (must be 1:1)",
            str(layout.tokens),
            fix,
        )
    return ro_m, tk_m


def _check_config(sel: SelectConfig, layout: RunLayout) -> list[Rule]:
    layout.selected(sel.name)  # a safe folder name, or a UserError
    if sel.rows_per_shard < 1:
        raise UserError("select.rows_per_shard must be >= 1", "config", "fix select.rows_per_shard")
    if not sel.rules:
        raise UserError("select.rules is empty", "config", "give at least one rule (policy: all)")
    return [resolve_rule(r.policy, r.params) for r in sel.rules]


def _done(out_dir: Path, dataset_id: str, cfg: Config) -> dict | None:
    """The summary of an up-to-date selection; refuses another one unless ``overwrite``."""
    existing = manifest_mod.read(out_dir)
    if existing is not None and existing["dataset_id"] == dataset_id:
        return existing["extra"].get("summary", {})
    if existing is not None and not cfg.overwrite:  # refuse before the expensive pass
        raise UserError(
            f"{out_dir} already holds a selection from a different run or config "
            f"(dataset_id {existing['dataset_id']}, this run {dataset_id})",
            str(out_dir),
            "pass overwrite=true to replace it, or choose another select.name",
        )
    return None


def run(cfg: Config) -> dict:
    sel, layout = cfg.select, RunLayout.of(cfg.run_dir)
    rules = _check_config(sel, layout)
    out_dir = layout.selected(sel.name)
    ro_m, tk_m = _inputs(layout)
    dataset_id = dataset_id_of(ro_m["dataset_id"], tk_m["dataset_id"], sel, cfg.seed)
    summary = _done(out_dir, dataset_id, cfg)
    if summary is not None:
        print_summary(summary, sel.name)
        print(f"select: {out_dir} is up to date (dataset {dataset_id}); nothing written")
        return {"dataset_id": dataset_id, "dir": str(out_dir), "summary": summary}
    tmp_dir = layout.duckdb_tmp / f"select-{sel.name}-{os.getpid()}"  # per process
    con = None
    try:
        con = open_pass1(layout, {"rollouts": ro_m, "tokens": tk_m}, tmp_dir, sel)
        check_values(con, layout.tokens)
        check_needs(con, rules, str(layout.tokens))
        compute_weights(con, rules, seed=cfg.seed, ln_v=_vocab_ln(tk_m, ro_m))
        summary = summarize(con)
        _check_kept(summary, sel, rules)
        summary["sequences_no_kept"] = write_selected(
            con, cfg, dataset_id, out_dir, layout, ro_m, tk_m, rules, summary
        )
    finally:
        if con is not None:
            con.close()
        shutil.rmtree(tmp_dir, ignore_errors=True)
        with contextlib.suppress(OSError):  # the shared parent, once no select uses it
            tmp_dir.parent.rmdir()
    print_summary(summary, sel.name)
    m = manifest_mod.read(out_dir)
    print(
        f"select: wrote {m['rows']} sequences in {len(m['shards'])} shard(s) to {out_dir} "
        f"(dataset {dataset_id})"
    )
    return {"dataset_id": dataset_id, "dir": str(out_dir), "summary": summary}


def _check_kept(summary: dict, sel: SelectConfig, rules: list[Rule]) -> None:
    if summary["tokens_kept"] == 0:
        desc = "; ".join(f"{r.policy} {r.params}" for r in rules)
        raise UserError(
            f"selection '{sel.name}' keeps 0 of {summary['student_tokens']} student tokens "
            f"({desc}): nothing to train on",
            "select.rules",
            "loosen the policy parameters (e.g. a lower threshold) or choose another policy",
        )


def shard_weights(con: duckdb.DuckDBPyConnection, shard: int, n_rows: int) -> np.ndarray:
    """The weights of one tokens shard, aligned with its rows [N] (any row order in ``w``)."""
    lo = shard << ROW_BITS
    got = con.execute(
        f"SELECT rid - {lo} AS row, weight FROM w WHERE rid >= {lo} AND rid < {lo + (1 << ROW_BITS)}"
    ).fetchnumpy()
    weight = np.zeros(n_rows, np.float64)
    weight[got["row"]] = got["weight"]
    return weight


def write_selected(con, cfg, dataset_id, out_dir, layout, ro_m, tk_m, rules, summary) -> int:
    """Pass 2: per input shard, assemble and write; commit the manifest. Returns #n_kept==0 rows.

    Writing (validation, zstd, fsync) runs in one background thread while the next shard is read
    and assembled: Parquet IO and numpy release the GIL, so the two overlap on a second core.
    At most one assembled shard waits to be written (memory stays bounded), and shards are
    written in order, one at a time, as before.
    """
    sel = cfg.select
    plan = output_plan(ro_m, sel.rows_per_shard)
    tk_dir = layout.tokens
    ro_paths, tk_paths = store.shard_paths(layout.rollouts, ro_m), store.shard_paths(tk_dir, tk_m)
    no_kept = 0

    def write(w: store.DatasetWriter, outs: range, table: pa.Table) -> None:
        for j, o in enumerate(outs):
            w.write_shard(o, table.slice(j * sel.rows_per_shard, sel.rows_per_shard))

    with (
        store.open_writer(
            out_dir,
            selected,
            dataset_id=dataset_id,
            stage="select",
            overwrite=cfg.overwrite,
            row_group_rows=min(sel.rows_per_shard, sel.row_group_rows),
        ) as w,
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="select-write") as writer,
    ):
        pending: Future | None = None
        for s in range(len(ro_paths)):
            outs = range(plan[s], plan[s + 1])
            if all(w.is_done(o) for o in outs):  # resume: already written
                for o in outs:
                    n_kept = pq.read_table(w.shard_path(o), columns=["n_kept"])["n_kept"]
                    no_kept += int((n_kept.to_numpy() == 0).sum())
                continue
            ro = pq.read_table(ro_paths[s], columns=list(ROLLOUT_COLUMNS))
            tk = read_tokens_shard(tk_paths[s])
            weight = shard_weights(con, s, tk.num_rows)  # [N] aligned with the tokens rows
            table = assemble(ro, tk, weight, f"shard {s} of {tk_dir}")
            no_kept += int((table["n_kept"].to_numpy() == 0).sum())
            if pending is not None:
                pending.result()  # raises the writer's error, if any
            pending = writer.submit(write, w, outs, table)
        if pending is not None:
            pending.result()
        summary["sequences_no_kept"] = no_kept
        models = {  # each manifest's model folders, resolved here (run-relative ones too)
            role: store.model_path(m, role, directory=d)
            for m, d in ((ro_m, layout.rollouts), (tk_m, tk_dir))
            for role in (m.get("models") or {})
        }
        w.commit(
            plan[-1],
            config=as_dict(cfg),
            fingerprints={**ro_m["fingerprints"], **tk_m["fingerprints"]},
            inputs={"rollouts": ro_m["dataset_id"], "tokens": tk_m["dataset_id"]},
            models=models,
            teacher_temperature=tk_m.get("teacher_temperature"),
            extra={
                "summary": summary,
                "rules": [{"policy": r.policy, "params": r.params} for r in rules],
            },
        )
    return no_kept


def print_summary(summary: dict, name: str) -> None:
    """The summary as a small table on stdout."""
    if not summary:
        return
    print(
        f"selection '{name}': kept {summary['tokens_kept']} / {summary['student_tokens']} student "
        f"tokens ({100 * summary['kept_fraction']:.1f} %), weight sum {summary['weight_sum']:.1f}, "
        f"{summary.get('sequences_no_kept', 0)} of {summary['sequences']} sequences with none kept"
    )
    print(f"  {'group':<36} {'tokens':>10} {'kept':>10} {'fraction':>9}")
    for section in ("by_quadrant", "by_guided", "by_position"):
        for g, v in summary.get(section, {}).items():
            print(f"  {g:<36} {v['tokens']:>10} {v['kept']:>10} {v['fraction']:>9.3f}")


main = hydra_entry("select")(run)

if __name__ == "__main__":
    main()
