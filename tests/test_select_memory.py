"""Select's summary medians, computed outside DuckDB's median (bounded memory at scale)."""

from __future__ import annotations

import duckdb
import numpy as np
import pyarrow as pa
import pytest

from stages.lib.selection.summary import _median


@pytest.mark.parametrize("n", [0, 1, 2, 7, 10, 1001, 20000])
def test_median_is_duckdbs_bit_for_bit(n):
    rng = np.random.default_rng(n)
    h = rng.normal(size=n).astype(np.float16).astype(np.float64)  # entropies: fp16 values
    b, t = rng.normal(size=(2, n)).astype(np.float32).astype(np.float64)  # fp32 log-probs
    w = pa.table(
        {
            "h": pa.array(h, mask=rng.random(n) < 0.1),  # some null entropies
            "d": b - t,  # log-prob differences: any double
            "segment": (rng.random(n) < 0.2).astype(np.uint8),  # teacher-prefix rows left out
        }
    )
    con = duckdb.connect()
    con.register("w", w)
    for col in ("h", "d"):
        want = con.execute(f"SELECT median({col}) FROM w WHERE segment = 0").fetchone()[0]
        got = _median(con, col)
        assert got == want or (got is None and want is None), (col, got, want)
