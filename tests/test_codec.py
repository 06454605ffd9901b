"""The tokens storage codec: bounded round-trip error, the stored layout, transparent readers."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_schemas import codec, tokens
from stages import sql
from stages.lib import store
from tests.test_select import K, run_select, write_run

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import bench  # noqa: E402
import bench_storage  # noqa: E402


def peaked_lists(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    """Sorted-descending log-probs [n, k] of peaked random distributions (fp32)."""
    logits = rng.gumbel(size=(n, 4 * k)) * rng.lognormal(1.0, 0.8, (n, 1))  # [n, 4k]
    logits[:, 0] += rng.uniform(0, 30, n)  # a dominant token, sometimes very dominant
    lp = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
    return -np.sort(-lp, axis=1)[:, :k].astype(np.float32)


def test_round_trip_error_within_bound_on_peaked_data():
    rng = np.random.default_rng(0)
    lp = peaked_lists(rng, 2000, 32)  # [N, K]
    assert lp.min() < -40  # the tails reach far: fp16 would be off by > 1e-2 there
    lengths = np.full(len(lp), 32)
    d = codec.encode_logprobs(lp.ravel(), lengths)
    assert d.dtype == np.int32 and (d >= 0).all()  # sorted lists -> non-negative deltas
    back = codec.decode_logprobs(d, lengths)
    err = np.abs(back.astype(np.float64) - lp.astype(np.float64).ravel()).max()
    assert err <= codec.MAX_ABS_ERROR <= 1e-3
    fp16_err = np.abs(lp.astype(np.float16).astype(np.float64) - lp).max()
    assert fp16_err > codec.MAX_ABS_ERROR  # the codec beats the old fp16 column
    # the synthetic benchmark generator is held to the same bound
    _, syn = bench_storage.synth_topk(300, seed=3)
    d = codec.encode_logprobs(syn.ravel(), np.full(300, bench_storage.K))
    back = codec.decode_logprobs(d, np.full(300, bench_storage.K))
    assert np.abs(back - syn.ravel()).max() <= 2**-10


def test_ragged_unsorted_and_null_lists_round_trip():
    vals = [[-0.1, -2.5, -2.5, -7.0], [], None, [-3.0, -0.2, -9.75], [0.0], [-150.123]]
    arr = pa.array(vals, pa.list_(pa.float32()))
    tbl = pa.table({"sample_id": pa.array(["a"] * len(vals)), "teacher_topk_logprobs": arr})
    enc = codec.encode_table(tbl)
    assert enc.column_names == ["sample_id", codec.PHYSICAL]
    assert enc.schema.field(codec.PHYSICAL).type == pa.list_(pa.int32())
    dec = codec.decode_table(enc)
    assert dec.column_names == tbl.column_names
    got = dec["teacher_topk_logprobs"].to_pylist()
    assert got[2] is None and got[1] == []
    for a, b in zip(vals, got, strict=True):
        if a:
            assert np.abs(np.array(a) - np.array(b)).max() <= codec.MAX_ABS_ERROR
    # DuckDB's decoding expression gives the same float32 values as numpy's
    con = duckdb.connect()
    con.register("enc", enc)
    rows = con.execute(f"SELECT {codec.DUCKDB_DECODE} FROM enc").fetchall()
    assert [r[0] for r in rows] == got


def _tokens_shard(n: int, seed: int = 0) -> pa.Table:
    ids, lps = bench_storage.synth_topk(n, seed=seed)
    return bench_storage.tokens_table(ids, lps, seed=seed), lps


def test_store_writes_the_codec_layout_and_reads_it_back(tmp_path):
    table, lps = _tokens_shard(600)
    d = tmp_path / "tokens"
    with store.open_writer(d, tokens, dataset_id="x", stage="score", row_group_rows=256) as w:
        w.write_shard(0, table)
        assert w.commit(1, config={}, fingerprints={}, inputs={})
    m = store.open_committed(d, tokens)
    f = pq.ParquetFile(store.shard_paths(d, m)[0])
    assert codec.PHYSICAL in f.schema_arrow.names
    assert "teacher_topk_logprobs" not in f.schema_arrow.names
    col = f.schema_arrow.names.index(codec.PHYSICAL)
    assert "BYTE_STREAM_SPLIT" in f.metadata.row_group(0).column(col).encodings
    back = store.read_table(d, tokens)
    assert back.schema.names == tokens.SCHEMA_ONE_TEACHER.names  # logical, in order (one teacher)
    tokens.validate(back)
    got = np.stack(back["teacher_topk_logprobs"].to_numpy(zero_copy_only=False))  # [N, K]
    assert np.abs(got - lps).max() <= codec.MAX_ABS_ERROR
    for c in ("teacher_logprob", "teacher_topk_ids", "teacher_topk_logmass", "behavior_logprob"):
        assert back[c].equals(table[c])  # everything else is lossless
    streamed = pa.concat_tables(
        t for t, _ in store.stream(d, m, columns=["pos", "teacher_topk_logprobs"], table=tokens)
    )
    assert streamed["teacher_topk_logprobs"].equals(back["teacher_topk_logprobs"])


@pytest.fixture(scope="module")
def codec_run(tmp_path_factory) -> tuple[Path, list[dict]]:
    d = tmp_path_factory.mktemp("codecrun")
    return d, write_run(d)


def test_tokens_view_and_select_match_the_truth(codec_run):
    d, seqs = codec_run
    con, _ = sql.connect(d)
    for q in seqs:
        rows = con.execute(
            "SELECT teacher_topk_logprobs, teacher_topk_ids, teacher_logprob FROM tokens "
            "WHERE sample_id = ? ORDER BY pos",
            [q["sample_id"]],
        ).fetchall()
        lp = np.array([r[0] for r in rows], np.float32)  # [T, K]
        # the test run's fp16 log-probs lie in [-6, -2], on the codec's 2**-9 grid: exact
        np.testing.assert_array_equal(lp, q["topk_lp"].astype(np.float32))
        assert [r[1] for r in rows] == q["topk_ids"].tolist()
        np.testing.assert_array_equal(np.array([r[2] for r in rows], np.float32), q["teacher_lp"])
    # the view and the pyarrow read path agree value for value
    view = con.execute(
        "SELECT sample_id, pos, teacher_topk_logprobs FROM tokens ORDER BY sample_id, pos"
    ).fetchall()
    tbl = store.read_table(d / "tokens", tokens).sort_by(
        [("sample_id", "ascending"), ("pos", "ascending")]
    )
    assert [r[2] for r in view] == tbl["teacher_topk_logprobs"].to_pylist()
    _, rows = run_select(d, "all")
    for q in seqs:
        got = np.array(rows[q["sample_id"]]["teacher_topk_logprobs"], np.float16)
        np.testing.assert_array_equal(got, q["topk_lp"].ravel())
        assert rows[q["sample_id"]]["topk_k"] == K


def test_bench_records_a_failing_suite_instead_of_crashing():
    res = bench.run_suite("no_such_suite", quick=True)
    assert "no_such_suite.error" in res and "ModuleNotFoundError" in res["no_such_suite.error"]
    # the same through a child process (full mode's isolation)
    res = bench.run_suite_isolated("no_such_suite", quick=True)
    assert "ModuleNotFoundError" in res["no_such_suite.error"]


# Quick mode starts no vLLM engine, and the demo figure needs a demo run: these may be null.
MAY_BE_NULL = {
    "score.vllm_tokens_per_s_over_hf",
    "rollout.vllm_stage_overhead",
    "demo.end_to_end_seconds",
}


@pytest.mark.slow
def test_bench_quick_runs(tmp_path):
    """The CI bench: fails on a crash (any suite), never on a noisy timing (values only finite)."""
    out = tmp_path / "bench.json"
    p = subprocess.run(
        [sys.executable, "scripts/bench.py", "--quick", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    res = json.loads(out.read_text())  # written even when a suite failed
    errors = {k: v for k, v in res.items() if k.endswith((".error", ".traceback"))}
    assert not errors, errors
    assert p.returncode == 0, p.stderr[-2000:]
    for k in bench.HEADLINE + ("machine.nproc", "machine.cpu", "machine.torch", "date"):
        assert k in res, k
    for k in set(bench.HEADLINE) - MAY_BE_NULL:
        assert isinstance(res[k], (int, float)) and math.isfinite(res[k]), (k, res[k])
    assert res["storage.max_abs_logprob_error"] <= codec.MAX_ABS_ERROR
    assert res["storage.bytes_per_token_k32"] < res["storage.naive_bytes_per_token_k32"]


def test_bench_exits_nonzero_when_a_suite_crashed(tmp_path, monkeypatch):
    def crash(quick):
        raise RuntimeError("boom")

    import types

    monkeypatch.setitem(sys.modules, "bench_crash", types.SimpleNamespace(bench=crash))
    monkeypatch.setattr(bench, "SUITES", ("crash",))
    argv = ["bench.py", "--quick", "--isolate", "no", "--out", str(tmp_path / "b.json")]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as e:
        bench.main()
    assert e.value.code == 1
    res = json.loads((tmp_path / "b.json").read_text())
    assert res["crash.error"] == "RuntimeError: boom"


def test_public_decode_takes_arrow_and_pandas():
    """``codec.decode``: the one-liner for readers outside distillery (docs/DATA.md)."""
    import pandas as pd

    lp = [[-0.5, -1.25, -3.0], [-0.001953125, -2.0, -9.5]]
    logical = pa.table({"pos": [0, 1], codec.LOGICAL: pa.array(lp, pa.list_(pa.float32()))})
    stored = codec.encode_table(logical)
    assert codec.PHYSICAL in stored.column_names
    assert codec.decode(stored).equals(logical)
    df = codec.decode(stored.to_pandas())
    assert list(df.columns) == ["pos", codec.LOGICAL]
    assert [list(x) for x in df[codec.LOGICAL]] == lp
    plain = pd.DataFrame({"a": [1]})
    assert codec.decode(plain) is plain  # no coded column: unchanged
    with pytest.raises(TypeError, match="pyarrow Table or a pandas/polars"):
        codec.decode([1, 2])


def test_codec_versions_2_and_3_read_the_same(tmp_path):
    """Shards written before codec version 3 (fp16 dictionaries, zstd 9) read as before, equal
    to version-3 shards of the same rows; each shard's footer says which version wrote it."""
    table, lps = _tokens_shard(400, seed=5)
    dirs = {}
    for name, module in (("v2", bench_storage.TokensV2), ("v3", tokens)):
        d = dirs[name] = tmp_path / name
        with store.open_writer(d, module, dataset_id="x", stage="score", row_group_rows=128) as w:
            w.write_shard(0, table)
            assert w.commit(1, config={}, fingerprints={}, inputs={})
    files = {k: pq.ParquetFile(next(d.glob("bucket=*/*.parquet"))) for k, d in dirs.items()}
    assert codec.shard_version(files["v2"].metadata.metadata) == 2
    assert codec.shard_version(files["v3"].metadata.metadata) == codec.CODEC_VERSION == 3
    ent = files["v3"].schema_arrow.names.index("teacher_entropy")
    assert "PLAIN_DICTIONARY" not in files["v3"].metadata.row_group(0).column(ent).encodings
    assert files["v3"].metadata.row_group(0).column(ent).compression == "ZSTD"
    back = {k: store.read_table(d, tokens) for k, d in dirs.items()}  # the same reader for both
    assert back["v2"].equals(back["v3"])
    for c in ("teacher_entropy", "behavior_entropy", "teacher_topk_ids", "teacher_logprob"):
        assert back["v3"][c].equals(table[c])
    got = np.stack(back["v3"]["teacher_topk_logprobs"].to_numpy(zero_copy_only=False))
    assert np.abs(got - lps).max() <= codec.MAX_ABS_ERROR
    con = duckdb.connect()  # DuckDB reads plain fp16 and the v2 dictionaries alike
    q = "SELECT sum(teacher_entropy), sum(behavior_entropy), sum(teacher_topk_logprobs[32]) FROM "
    sums = [
        con.execute(
            f"{q} (SELECT {tokens.DUCKDB_SELECT} FROM read_parquet('{d}/bucket=*/*.parquet'))"
        ).fetchone()
        for d in dirs.values()
    ]
    assert sums[0] == sums[1]
    assert sums[0][0] == pytest.approx(
        float(np.sum(table["teacher_entropy"].to_numpy().astype(np.float64)))
    )
