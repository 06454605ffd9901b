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


def check_token_ids(con: duckdb.DuckDBPyConnection, vocab_size: int, where: str) -> None:
    """Every id of the tokens table (token, teacher top-K, behaviour top-K) in [0, V)."""
    bad = {
        "token_id": "token_id < 0 OR token_id >= $v",
        "teacher_topk_ids": "list_min(teacher_topk_ids) < 0 OR list_max(teacher_topk_ids) >= $v",
        "behavior_topk_ids": "list_min(behavior_topk_ids) < 0 OR list_max(behavior_topk_ids) >= $v",
    }
    for col, cond in bad.items():
        row = con.execute(
            f"SELECT sample_id, pos, {col} FROM tokens WHERE {cond} ORDER BY sample_id, pos "
            "LIMIT 1",
            {"v": vocab_size},
        ).fetchone()
        if row is not None:
            shown = row[2] if not isinstance(row[2], list) else row[2][:8]
            raise UserError(
                f"tokens column '{col}' holds an id outside the vocabulary [0, {vocab_size}) "
                f"(sample {row[0]!r}, pos {row[1]}: {shown})",
                where,
                REDO_SCORE,
            )


def check_topk_order(con: duckdb.DuckDBPyConnection, files: list[Path], where: str) -> None:
    """Teacher top-K log-probs in descending order, checked on the stored delta code (every
    delta after the first >= 0), which costs O(K) per token instead of decoding."""
    if not files:
        return
    src = ", ".join("'" + str(p).replace("'", "''") + "'" for p in files)
    q = codec.PHYSICAL
    row = con.execute(
        f"SELECT sample_id, pos FROM read_parquet([{src}]) "
        f"WHERE len({q}) > 1 AND list_min({q}[2:]) < 0 ORDER BY sample_id, pos LIMIT 1"
    ).fetchone()
    if row is not None:
        raise UserError(
            f"teacher top-K log-probs are not in descending order (sample {row[0]!r}, pos "
            f"{row[1]})",
            where,
            REDO_SCORE,
        )


def check_select_inputs(
    con: duckdb.DuckDBPyConnection,
    ro_dir: Path,
    tk_dir: Path,
    tk_files: list[Path],
    vocab_size: int | None,
) -> None:
    """What select checks in pass 1 beyond values (``rollouts``/``tokens`` views of ``con``)."""
    check_rollout_keys(con, str(ro_dir))
    if vocab_size is not None:
        check_token_ids(con, vocab_size, str(tk_dir))
    check_topk_order(con, tk_files, str(tk_dir))


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
