"""The loader's columnar row-group -> sequence conversion."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from stages.lib.loader import LIST_COLUMNS, SCALAR_COLUMNS, _list_values, table_to_seqs


def test_table_to_seqs_reads_slices_and_chunks_right():
    rows = []
    for i in range(6):
        t = i + 1
        row = {c: i for c in SCALAR_COLUMNS}
        row |= {c: list(range(10 * i, 10 * i + t)) for c in LIST_COLUMNS}
        row["ref_logprob"] = None if i == 3 else [float(-i)] * t
        rows.append(row)
    full = pa.Table.from_pylist(rows)
    for tbl, first in (
        (full, 0),
        (full.slice(2, 3), 2),  # a slice: offsets point into the parent's values
        (pa.concat_tables([full.slice(1, 2), full.slice(3, 2)]), 1),  # two chunks
    ):
        seqs = table_to_seqs(tbl)
        assert len(seqs) == tbl.num_rows
        for j, s in enumerate(seqs):
            i = first + j
            t = i + 1
            np.testing.assert_array_equal(s["response_ids"], np.arange(10 * i, 10 * i + t))
            assert (s["ref_logprob"] is None) == (i == 3)


def test_list_values_of_a_plain_sliced_array():
    a = pa.array([[1], [2, 3], [4, 5, 6], [7]]).slice(2, 2)
    offsets, values, valid = _list_values(a)
    got = [values[offsets[i] : offsets[i + 1]].tolist() for i in range(len(a))]
    assert got == [[4, 5, 6], [7]] and valid.all()
