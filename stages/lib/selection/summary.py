"""The selection summary: kept fractions overall, by position bucket and by entropy/divergence
quadrant, and medians; printed after a selection."""

from __future__ import annotations

from collections.abc import Callable

import duckdb
import numpy as np

from stages.lib.progress import log

POSITION_BUCKETS = ((0, 3), (4, 7), (8, 15), (16, 31), (32, None))


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


def print_summary(summary: dict, name: str) -> None:
    """The summary as a small table on stdout."""
    if not summary:
        return
    log.info(
        f"selection '{name}': kept {summary['tokens_kept']} / {summary['student_tokens']} student "
        f"tokens ({100 * summary['kept_fraction']:.1f} %), weight sum {summary['weight_sum']:.1f}, "
        f"{summary.get('sequences_no_kept', 0)} of {summary['sequences']} sequences with none kept"
    )
    log.info(f"  {'group':<36} {'tokens':>10} {'kept':>10} {'fraction':>9}")
    for section in ("by_quadrant", "by_guided", "by_position"):
        for g, v in summary.get(section, {}).items():
            log.info(f"  {g:<36} {v['tokens']:>10} {v['kept']:>10} {v['fraction']:>9.3f}")
