"""Data contract checks across rows and shards, where a run's data is read to be used.

The schema checks (``data_schemas``) look at one table at a time; what they cannot see is a
``sample_id`` in two shards, one ``(prompt_id, sample_idx)`` under two sample ids, or ids and
orders that are only wrong against the vocabulary of the run. A handed-over or damaged run must
not train to "done" on such data (docs/RELIABILITY.md), so:

- select (pass 1, before anything is written): ``check_select_inputs`` on its DuckDB views;
- the trainer's loader: ``duplicate_sample_id`` once per selection, ``topk_order_problem`` per
  row group (with the vocabulary check it already had).

Each failure is one UserError naming the dataset, the first offending value and the fix.
"""

from __future__ import annotations

from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa

from data_schemas import codec
from stages.lib.errors import UserError

REDO_SCORE = "re-run python -m stages.score with overwrite=true on intact rollouts"
REDO_ROLLOUT = "re-run python -m stages.rollout (then score) with overwrite=true"


def manifest_vocab_size(*manifests: dict) -> int | None:
    """The vocabulary size a dataset recorded (score: ``extra.vocab_size``), or None."""
    for m in manifests:
        extra = m.get("extra") if isinstance(m, dict) else None
        for where in (extra or {}, (extra or {}).get("tokenizer") or {}):
            v = where.get("vocab_size") if isinstance(where, dict) else None
            if isinstance(v, int) and v > 0:
                return v
    return None


# ----------------------------------------------------------------------------- select (DuckDB)
def check_rollout_keys(con: duckdb.DuckDBPyConnection, where: str) -> None:
    """Every ``sample_id`` once, every ``(prompt_id, sample_idx)`` under one sample id."""
    dup = con.execute(
        "SELECT sample_id, count(*) AS n FROM rollouts GROUP BY 1 HAVING n > 1 "
        "ORDER BY sample_id LIMIT 1"
    ).fetchone()
    if dup is not None:
        raise UserError(
            f"sample_id {dup[0]!r} appears {dup[1]} times in the rollouts (a sample in two "
            "shards, or copied rows)",
            where,
            REDO_ROLLOUT,
        )
    two = con.execute(
        "SELECT prompt_id, sample_idx, list(DISTINCT sample_id ORDER BY sample_id) AS ids "
        "FROM rollouts GROUP BY 1, 2 HAVING count(DISTINCT sample_id) > 1 "
        "ORDER BY prompt_id, sample_idx LIMIT 1"
    ).fetchone()
    if two is not None:
        raise UserError(
            f"sample {two[1]} of prompt {two[0]!r} is stored under {len(two[2])} sample ids "
            f"({', '.join(map(repr, two[2][:3]))})",
            where,
            REDO_ROLLOUT,
        )


_ID_COLS = ("token_id", "teacher_topk_ids", "behavior_topk_ids")


def _bad_conditions(vocab_size: int | None) -> dict[str, tuple[str, int, int]]:
    """column -> (SQL condition of a bad row, the valid [lo, hi) of its stored values) over the
    stored tokens columns. The top-K log-probs are stored delta-coded (data_schemas/codec.py):
    the first is -log-prob >= 0, the others >= 0 exactly when the list descends."""
    q = codec.PHYSICAL
    out = {}
    if vocab_size is not None:
        v = int(vocab_size)
        out["token_id"] = (f"token_id < 0 OR token_id >= {v}", 0, v)
        for c in _ID_COLS[1:]:
            out[c] = (f"list_min({c}) < 0 OR list_max({c}) >= {v}", 0, v)
    out[q] = (f"list_min({q}) < 0", 0, 2**31)
    return out


def _leaf(col: str) -> str:
    return col if col == "token_id" else f"{col}.list.element"


def stats_within(files: list[Path], col: str, lo: int, hi: int) -> bool:
    """Whether the Parquet statistics of every row group prove ``lo <= value < hi`` for the
    column (all-null chunks count as within). False when a statistic is missing or says
    otherwise: then the rows are scanned."""
    from stages.lib import store

    leaf = _leaf(col)
    for p in files:
        md = store.open_shard(p).metadata
        for g in range(md.num_row_groups):
            rg = md.row_group(g)
            idx = [i for i in range(rg.num_columns) if rg.column(i).path_in_schema == leaf]
            if not idx:
                return col == "behavior_topk_ids"  # an optional column the shard left out
            c = rg.column(idx[0])
            st = c.statistics
            if st is None:
                return False
            if not st.has_min_max:
                if st.null_count != c.num_values:
                    return False
                continue
            if not (lo <= st.min and st.max < hi):
                return False
    return True


def check_tokens(
    con: duckdb.DuckDBPyConnection, files: list[Path], vocab_size: int | None, where: str
) -> None:
    """Every id of the tokens table (token, teacher top-K, behaviour top-K) in [0, V) and the
    teacher top-K log-probs in descending order. The Parquet column statistics (min/max per row
    group, in the footers) prove it for honest files at no cost; where they are missing or show
    a problem, the stored rows are scanned (O(K) per token, no decoding) and the first bad row is
    named. A file whose statistics lie passes here and is refused by the trainer's loader."""
    if not files:
        return
    names = ", ".join("'" + str(p).replace("'", "''") + "'" for p in files)
    src = f"read_parquet([{names}])"
    for col, (cond, lo, hi) in _bad_conditions(vocab_size).items():
        if stats_within(files, col, lo, hi):
            continue
        row = con.execute(
            f"SELECT count(*) FILTER (WHERE {cond}), min(sample_id) FILTER (WHERE {cond}) FROM {src}"
        ).fetchone()
        if not row[0]:
            continue
        pos = con.execute(
            f"SELECT min(pos) FROM {src} WHERE sample_id = $s AND ({cond})", {"s": row[1]}
        ).fetchone()[0]
        if col == codec.PHYSICAL:
            what = (
                f"teacher top-K log-probs are not in descending order (or > 0) in {row[0]} row(s)"
            )
        else:
            what = (
                f"tokens column '{col}' holds ids outside the vocabulary [0, {vocab_size}) "
                f"in {row[0]} row(s)"
            )
        raise UserError(f"{what}, first sample {row[1]!r} pos {pos}", where, REDO_SCORE)


def check_select_inputs(
    con: duckdb.DuckDBPyConnection,
    ro_dir: Path,
    tk_dir: Path,
    tk_files: list[Path],
    vocab_size: int | None,
) -> None:
    """What select checks in pass 1 beyond values (``rollouts`` view of ``con``, the tokens
    shard files)."""
    check_rollout_keys(con, str(ro_dir))
    check_tokens(con, tk_files, vocab_size, str(tk_dir))


# ----------------------------------------------------------------------------- the loader
def duplicate_sample_id(sample_ids: list[pa.Array]) -> tuple[str, int] | None:
    """(a sample id, how many times) for an id that occurs more than once across the arrays."""
    ids = pa.chunked_array(sample_ids, type=pa.string()) if sample_ids else None
    if ids is None or len(ids) == 0:
        return None
    counts = ids.value_counts()
    n = counts.field("counts").to_numpy()
    if (n > 1).any():
        i = int(np.argmax(n > 1))
        return counts.field("values")[i].as_py(), int(n[i])
    return None


def topk_order_problem(tbl: pa.Table) -> str | None:
    """The first token whose teacher top-K log-probs rise (a row group of a selection)."""
    col = tbl["teacher_topk_logprobs"].combine_chunks()
    if len(col) == 0:
        return None
    offsets = col.offsets.to_numpy()
    vals = col.values.to_numpy(zero_copy_only=False)
    lo, hi = int(offsets[0]), int(offsets[-1])
    if hi - lo < 2:
        return None
    k = np.repeat(tbl["topk_k"].to_numpy(), np.diff(offsets))  # [N] K of each element's row
    start = np.repeat(offsets[:-1], np.diff(offsets))  # [N] first element of the row
    i = np.arange(lo, hi)  # [N] flat positions of this table's values
    last_in_block = (i - start) % np.maximum(k, 1) == k - 1  # [N] no successor in its K-block
    rises = np.zeros(hi - lo, bool)
    rises[:-1] = vals[lo + 1 : hi] > vals[lo : hi - 1]
    bad = rises & ~last_in_block
    if not bad.any():
        return None
    j = int(bad.argmax())
    row = int(np.searchsorted(offsets, lo + j, side="right") - 1)
    t = (lo + j - int(offsets[row])) // max(int(k[j]), 1)
    return (
        f"sample {tbl['sample_id'][row].as_py()!r}, token {t}: teacher top-K log-probs "
        "are not in descending order"
    )
