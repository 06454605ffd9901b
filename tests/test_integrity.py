"""The cross-row contract checks of stages/lib/integrity.py on small tables (the CLI cases are in
tests/test_bad_inputs.py): top-K order per token block, duplicate sample ids across shards."""

from __future__ import annotations

import pyarrow as pa

from stages.lib import integrity


def _table(rows: list[tuple[str, int, list[float]]]) -> pa.Table:
    return pa.table(
        {
            "sample_id": [r[0] for r in rows],
            "topk_k": pa.array([r[1] for r in rows], pa.int32()),
            "teacher_topk_logprobs": pa.array([r[2] for r in rows], pa.list_(pa.float32())),
        }
    )


def test_topk_order_blocks_and_slices():
    ok = _table(
        [
            ("a", 2, [-0.1, -2.0, -0.5, -0.5]),  # two tokens; a rise across blocks is fine
            ("b", 3, [-1.0, -1.0, -1.0]),  # ties
            ("c", 1, [-3.0, -0.1, -0.2]),  # K = 1: every element its own block
            ("d", 2, []),
        ]
    )
    assert integrity.topk_order_problem(ok) is None
    bad = _table([("a", 2, [-0.1, -2.0, -0.5, -0.4]), ("b", 2, [-0.3, -0.1])])
    assert "sample 'a', token 1" in integrity.topk_order_problem(bad)
    assert "sample 'b', token 0" in integrity.topk_order_problem(bad.slice(1))
    assert integrity.topk_order_problem(bad.slice(0, 0)) is None
    assert integrity.topk_order_problem(ok.slice(2)) is None


def test_duplicate_sample_id_across_shards():
    a, b = pa.array(["s1", "s2"]), pa.array(["s3", "s1"])
    assert integrity.duplicate_sample_id([a, b]) == ("s1", 2)
    assert integrity.duplicate_sample_id([a, pa.array(["s3"])]) is None
    assert integrity.duplicate_sample_id([]) is None


def test_manifest_vocab_size():
    assert integrity.manifest_vocab_size({"extra": {"vocab_size": 100}}) == 100
    assert (
        integrity.manifest_vocab_size({"extra": {}}, {"extra": {"tokenizer": {"vocab_size": 7}}})
        == 7
    )
    assert integrity.manifest_vocab_size({"extra": None}) is None
