"""Benchmark the tokens table's storage: bytes per token of the codec layout vs the naive one.

(a) Synthetic teacher top-K (K = 32) over a 151,936-token vocabulary, realistically peaked: a
Zipf-like unigram prior (ids loosely in frequency order, as in BPE vocabularies) plus contextual
candidates with Gumbel noise and a few dominant tokens; the log-softmax normaliser is exact over the
whole vocabulary (computed in closed form, no [N, V] tensor). Median top-1 probability ~0.88, median
K-th log-prob ~ -15 nats. The same rows are written twice through the real write path
(``stages.lib.store``): once with the codec (``data_schemas/codec.py``), once as the naive layout
(int32 ids, fp16 top-K log-probs, fp32 scalars, zstd 3, default dictionaries, the store's layout
before the codec). A worst case with ids uncorrelated with frequency is reported as well.
(b) The demo's committed shards (``runs/demo/tokens``) when they exist: bytes per token on disk.

Also: the max abs error of the decoded top-K log-probs against the fp32 truth (codec and fp16),
and read costs (pyarrow read + decode, DuckDB view scan) relative to the naive layout.

    .venv/bin/python scripts/bench_storage.py --out bench_storage.json [--quick]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from data_schemas import codec, tokens  # noqa: E402
from stages.lib import store  # noqa: E402

VOCAB = 151_936
K = 32
SEQ_LEN = 400  # response tokens per synthetic sample


# ----------------------------------------------------------------------------- synthetic data
def unigram_prior(rng: np.random.Generator, ids_follow_frequency: bool) -> np.ndarray:
    """Log-prior per token id [V]: Zipf over frequency rank; ids loosely sorted by frequency."""
    rank = np.arange(VOCAB)
    logits = -1.1 * np.log1p(rank)  # [V] by rank
    if ids_follow_frequency:  # BPE merges: frequent tokens get low ids, with much noise
        key = np.log1p(rank) + rng.normal(0.0, 1.5, VOCAB)
        id_of_rank = np.empty(VOCAB, np.int64)
        id_of_rank[np.argsort(key, kind="stable")] = rank
    else:
        id_of_rank = rng.permutation(VOCAB)
    prior = np.empty(VOCAB)
    prior[id_of_rank] = logits
    return prior  # [V] indexed by token id


def synth_topk(
    n: int, *, seed: int = 0, ids_follow_frequency: bool = True, candidates: int = 256
) -> tuple[np.ndarray, np.ndarray]:
    """Teacher top-K ids [n, K] int32 and fp32 log-probs [n, K] (sorted descending, exact lse)."""
    rng = np.random.default_rng(seed)
    prior = unigram_prior(rng, ids_follow_frequency)  # [V]
    prior_mass = np.exp(prior - prior.max())
    log_z_prior = prior.max() + np.log(prior_mass.sum())
    top_prior = np.argsort(-prior)[: K + candidates]  # tokens that can enter top-K unboosted
    p = prior_mass / prior_mass.sum()
    # contextual candidates: mostly common tokens (drawn from the prior), some rare ones
    cand = np.where(
        rng.random((n, candidates)) < 0.7,
        rng.choice(VOCAB, size=(n, candidates), p=p),
        rng.integers(0, VOCAB, (n, candidates)),
    )  # [n, C]
    scale = rng.lognormal(1.2, 0.6, (n, 1))  # peakedness varies per position
    boost = scale * rng.gumbel(size=(n, candidates)) + rng.normal(4.0, 2.0, (n, 1))  # [n, C]
    boost[:, :3] += scale * rng.uniform(1.0, 4.0, (n, 3))  # a few dominant tokens
    ids = np.empty((n, K), np.int32)
    lps = np.empty((n, K), np.float32)
    z_prior = np.exp(log_z_prior)
    for i in range(n):
        c, first = np.unique(cand[i], return_index=True)
        lg = prior[c] + boost[i, first]  # boosted candidate logits
        # exact full-vocabulary normaliser: prior mass, candidates swapped for their boosted logits
        log_z = np.log(max(z_prior - np.exp(prior[c]).sum(), 0.0) + np.exp(lg).sum())
        others = top_prior[~np.isin(top_prior, c)][:K]
        all_ids = np.concatenate([c, others])
        all_lg = np.concatenate([lg, prior[others]])
        top = np.argsort(-all_lg, kind="stable")[:K]
        ids[i] = all_ids[top]
        lps[i] = all_lg[top] - log_z
    return ids, lps


def _lists(values: np.ndarray, typ: pa.DataType) -> pa.Array:
    n, k = values.shape
    return pa.ListArray.from_arrays(
        pa.array(np.arange(0, n * k + 1, k), pa.int32()), pa.array(values.reshape(-1), typ)
    )


def tokens_table(ids: np.ndarray, lps: np.ndarray, seed: int = 1) -> pa.Table:
    """A logical tokens table around the top-K: realistic scalar columns, no ref / behaviour top-K."""
    n = len(ids)
    rng = np.random.default_rng(seed)
    pick = np.minimum(rng.geometric(0.6, n) - 1, K - 1)  # sampled token: mostly a top-ranked one
    rows = np.arange(n)
    t_lp = lps[rows, pick]
    probs = np.exp(lps.astype(np.float64))
    return pa.table(
        {
            "sample_id": pa.array([f"s{i // SEQ_LEN:07d}" for i in range(n)], pa.string()),
            "pos": pa.array((rows % SEQ_LEN).astype(np.int32)),
            "token_id": pa.array(ids[rows, pick]),
            "segment": pa.array(np.zeros(n, np.uint8)),
            "is_guided": pa.array(np.zeros(n, bool)),
            "teacher_logprob": pa.array(t_lp.astype(np.float32)),
            "teacher_topk_ids": _lists(ids, pa.int32()),
            "teacher_topk_logprobs": _lists(lps, pa.float32()),
            "teacher_topk_logmass": pa.array(np.log(probs.sum(1)).astype(np.float32)),
            "teacher_entropy": pa.array((-(probs * lps).sum(1)).astype(np.float16)),
            "behavior_logprob": pa.array(
                np.minimum(t_lp + rng.normal(0, 0.5, n), 0).astype(np.float32)
            ),
            "behavior_entropy": pa.array(rng.gamma(1.0, 1.0, n).astype(np.float16)),
            "ref_logprob": pa.nulls(n, pa.float32()),
            "behavior_topk_ids": pa.nulls(n, pa.list_(pa.int32())),
            "teacher_logprobs_on_behavior_topk": pa.nulls(n, pa.list_(pa.float16())),
        }
    )


# ----------------------------------------------------------------------------- layouts
class TokensV2:
    """The tokens table module writing codec version 2 (fp16 dictionaries, zstd 9): the layout of
    shards written before version 3, read by the same ``tokens`` module."""

    NAME, VERSION, SCHEMA = tokens.NAME, tokens.VERSION, tokens.SCHEMA
    validate = staticmethod(tokens.validate)
    decode = staticmethod(tokens.decode)
    physical_columns = staticmethod(tokens.physical_columns)
    DUCKDB_SELECT = tokens.DUCKDB_SELECT

    @staticmethod
    def encode(table: pa.Table) -> pa.Table:
        return codec.encode_table(table, version=2)

    @staticmethod
    def parquet_options(schema: pa.Schema) -> dict:
        return codec.parquet_options(schema, version=2)


def plane_entropy_bits(ids: np.ndarray, lps: np.ndarray) -> dict:
    """Order-0 entropies (bits per entry) of what the codec stores: the id byte planes (summed)
    and the log-prob deltas. A coder of independent symbols cannot go below these."""

    def h(x: np.ndarray) -> float:
        _, c = np.unique(x, return_counts=True)
        p = c / c.sum()
        return float(-(p * np.log2(p)).sum())

    planes = ids.astype(np.int64)
    q = np.rint(-lps.astype(np.float64) / codec.STEP).astype(np.int64)  # [n, K]
    d = np.concatenate([q[:, :1], np.diff(q, axis=1)], axis=1)  # [n, K]
    return {
        "ids_byte_planes": sum(h((planes >> (8 * b)) & 255) for b in range(3)),
        "logprob_deltas": h(d),
    }


class NaiveTokens:
    """The tokens table module as it was before the codec: fp16 top-K, no hooks (store defaults)."""

    NAME = tokens.NAME
    VERSION = 1
    SCHEMA = tokens.SCHEMA_ONE_TEACHER.set(
        tokens.SCHEMA_ONE_TEACHER.get_field_index("teacher_topk_logprobs"),
        pa.field("teacher_topk_logprobs", pa.list_(pa.float16()), nullable=False),
    )

    @staticmethod
    def validate(table: pa.Table, *, where: str = "", vocab_size: int | None = None) -> pa.Table:
        return table.cast(NaiveTokens.SCHEMA)


def write(directory: Path, table_module, table: pa.Table, shard_rows: int) -> dict:
    """Write ``table`` through the store (shards of ``shard_rows``) and commit; the manifest."""
    n_shards = max(1, -(-table.num_rows // shard_rows))
    with store.open_writer(directory, table_module, dataset_id="bench", stage="bench") as w:
        for s in range(n_shards):
            w.write_shard(s, table.slice(s * shard_rows, shard_rows))
        w.commit(n_shards, config={}, fingerprints={}, inputs={})
    return json.loads((directory / "_manifest.json").read_text())


def column_bytes(directory: Path, m: dict) -> dict[str, int]:
    out: dict[str, int] = {}
    for p in store.shard_paths(directory, m):
        md = pq.ParquetFile(p).metadata
        for g in range(md.num_row_groups):
            for c in range(md.num_columns):
                cc = md.row_group(g).column(c)
                name = cc.path_in_schema.split(".")[0]
                out[name] = out.get(name, 0) + cc.total_compressed_size
    return out


def _best_of(fn, reps: int = 3) -> float:
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def measure(n: int, seed: int, ids_follow_frequency: bool, work: Path, timings: bool) -> dict:
    ids, lps = synth_topk(n, seed=seed, ids_follow_frequency=ids_follow_frequency)
    table = tokens_table(ids, lps, seed=seed + 1)
    shard_rows = 65_536
    d_codec, d_naive, d_v2 = work / "codec", work / "naive", work / "v2"
    t0 = time.process_time()
    m_codec = write(d_codec, tokens, table, shard_rows)
    t_write = time.process_time() - t0
    t0 = time.process_time()
    m_v2 = write(d_v2, TokensV2, table, shard_rows)
    t_write_v2 = time.process_time() - t0
    m_naive = write(d_naive, NaiveTokens, table, shard_rows)
    back_v2 = store.read_table(d_v2, tokens, columns=["teacher_topk_logprobs"])
    back = store.read_table(d_codec, tokens, columns=["teacher_topk_logprobs"])
    got = np.asarray(back["teacher_topk_logprobs"].combine_chunks().values).reshape(n, K)
    fp16 = lps.astype(np.float16).astype(np.float64)
    res = {
        "bytes_per_token": m_codec["bytes"] / n,
        "naive_bytes_per_token": m_naive["bytes"] / n,
        "v2_bytes_per_token": m_v2["bytes"] / n,
        "v2_reads_equal": back_v2.equals(back),
        "write_cpu_us_per_token": 1e6 * t_write / n,
        "v2_write_cpu_us_per_token": 1e6 * t_write_v2 / n,
        "entropy_bits_per_entry": plane_entropy_bits(ids, lps),
        "max_abs_logprob_error": float(np.abs(got.astype(np.float64) - lps).max()),
        "naive_max_abs_logprob_error": float(np.abs(fp16 - lps).max()),
        "codec_bytes_per_column": {
            k: round(v / n, 2) for k, v in sorted(column_bytes(d_codec, m_codec).items())
        },
        "naive_bytes_per_column": {
            k: round(v / n, 2) for k, v in sorted(column_bytes(d_naive, m_naive).items())
        },
        "median_top1_prob": float(np.median(np.exp(lps[:, 0]))),
        "median_kth_logprob": float(np.median(lps[:, -1])),
    }
    if timings:  # read costs of the top-K log-probs, codec over naive (same run, best of 3)
        cols = ["teacher_topk_logprobs"]
        t_codec = _best_of(lambda: store.read_table(d_codec, tokens, columns=cols))
        t_naive = _best_of(lambda: store.read_table(d_naive, NaiveTokens, columns=cols))
        res["read_decode_over_naive"] = t_codec / t_naive
        con = duckdb.connect()
        con.execute("SET threads = 2")
        glob = "bucket=*/*.parquet"
        con.execute(
            f"CREATE VIEW tc AS SELECT {tokens.DUCKDB_SELECT} FROM "
            f"read_parquet('{d_codec / glob}', hive_partitioning = true)"
        )
        con.execute(
            f"CREATE VIEW tn AS SELECT * FROM read_parquet('{d_naive / glob}', "
            "hive_partitioning = true)"
        )
        q = "SELECT sum(teacher_topk_logprobs[{i}]), sum(teacher_logprob) FROM {v}"
        sums = [con.execute(q.format(i=K, v=v)).fetchone() for v in ("tc", "tn")]
        res["duckdb_view_sum_kth_logprob"] = {"codec": sums[0][0], "naive": sums[1][0]}
        t_vc = _best_of(lambda: con.execute(q.format(i=K, v="tc")).fetchall())
        t_vn = _best_of(lambda: con.execute(q.format(i=K, v="tn")).fetchall())
        res["duckdb_topk_scan_over_naive"] = t_vc / t_vn
        s_q = "SELECT sum(teacher_logprob - behavior_logprob), count(*) FROM {v} WHERE pos < 200"
        t_sc = _best_of(lambda: con.execute(s_q.format(v="tc")).fetchall())
        t_sn = _best_of(lambda: con.execute(s_q.format(v="tn")).fetchall())
        res["duckdb_scalar_scan_over_naive"] = t_sc / t_sn
    return res


def demo_shards(run_dir: Path = ROOT / "runs" / "demo") -> dict:
    """Bytes per token of the demo's committed tokens shards (b), or why there are none."""
    d = run_dir / "tokens"
    m = None
    if (d / "_manifest.json").exists():
        m = json.loads((d / "_manifest.json").read_text())
    if not m or not m.get("rows"):
        return {"storage.demo_bytes_per_token": None, "storage.demo_note": f"no committed {d}"}
    k = None
    first = store.shard_paths(d, m)[0]
    ids = pq.read_table(first, columns=["teacher_topk_ids"])["teacher_topk_ids"]
    if len(ids):
        k = len(ids[0])
    return {
        "storage.demo_bytes_per_token": m["bytes"] / m["rows"],
        "storage.demo_rows": m["rows"],
        "storage.demo_schema_version": m["schema_version"],
        "storage.demo_topk": k,
        "storage.demo_note": "codec layout"
        if m["schema_version"] == tokens.VERSION
        else f"written with schema version {m['schema_version']} (before the codec)",
    }


def bench(quick: bool) -> dict:
    n = 20_000 if quick else 200_000
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="bench_storage_") as tmp:
        main = measure(n, 0, True, Path(tmp) / "a", timings=True)
        worst = measure(n // 4, 7, False, Path(tmp) / "b", timings=False)
    out = {
        "storage.tokens": n,
        "storage.topk": K,
        "storage.vocab": VOCAB,
        "storage.bytes_per_token_k32": main["bytes_per_token"],
        "storage.naive_bytes_per_token_k32": main["naive_bytes_per_token"],
        "storage.codec_version": codec.CODEC_VERSION,
        "storage.v2_bytes_per_token_k32": main["v2_bytes_per_token"],
        "storage.v2_reads_equal": main["v2_reads_equal"],
        # order-0 entropy of the top-K ids' byte planes + log-prob deltas, bytes per token
        "storage.topk_order0_entropy_bytes": K * sum(main["entropy_bits_per_entry"].values()) / 8,
        "storage.write_cpu_us_per_token": main["write_cpu_us_per_token"],
        "storage.v2_write_cpu_us_per_token": main["v2_write_cpu_us_per_token"],
        "storage.ratio_vs_naive": main["bytes_per_token"] / main["naive_bytes_per_token"],
        "storage.max_abs_logprob_error": main["max_abs_logprob_error"],
        "storage.error_bound": codec.MAX_ABS_ERROR,
        "storage.naive_max_abs_logprob_error": main["naive_max_abs_logprob_error"],
        "storage.bytes_per_token_k32_ids_uncorrelated": worst["bytes_per_token"],
        "storage.naive_bytes_per_token_k32_ids_uncorrelated": worst["naive_bytes_per_token"],
        "storage.read_decode_over_naive": main.get("read_decode_over_naive"),
        "storage.duckdb_topk_scan_over_naive": main.get("duckdb_topk_scan_over_naive"),
        "storage.duckdb_scalar_scan_over_naive": main.get("duckdb_scalar_scan_over_naive"),
        "storage.detail": main,
        "storage.layout": (
            f"top-K log-probs: int32 deltas of round(-lp / 2**-{codec.STEP_BITS}), "
            "BYTE_STREAM_SPLIT; ids and fp32 scalars BYTE_STREAM_SPLIT; fp16 plain; dictionary "
            f"for strings/uint8; zstd {codec.ZSTD_LEVEL[codec.CODEC_VERSION]} "
            f"(codec version {codec.CODEC_VERSION})"
        ),
        "storage.goal": "<= 85 bytes/token at K = 32 with max abs error <= 2**-10",
    }
    out.update(demo_shards())
    out["storage.seconds"] = time.time() - t0
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--quick", action="store_true", help="20k tokens instead of 200k")
    args = ap.parse_args()
    res = bench(args.quick)
    Path(args.out).write_text(json.dumps(res, indent=1, default=str))
    print(json.dumps({k: v for k, v in res.items() if k != "storage.detail"}, indent=1))
