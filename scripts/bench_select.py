"""Benchmark the select stage against pandas and against a bare pyarrow read + write.

On one synthetic run (>= 5M response tokens, teacher top-K = 32; quick mode ~0.5M), in the same
process and run:

* ours: ``stages.select.run`` with TIP entropy top-rho (rho = 0.5, global), including input
  checksum verification, validation of the output and the manifest;
* pandas: the same policy and the same per-sequence output (weights, per-token columns, top-K
  flattened T*K, float32 top-K log-probs), vectorised pandas/numpy written to Parquet; its output
  is checked equal to ours, column by column;
* bare: pyarrow reads every rollouts + tokens shard and writes it back (zstd), nothing else.

    .venv/bin/python scripts/bench_select.py --out bench_select.json [--quick] [--repeat N]

Keys: ``select.speedup_vs_pandas`` (pandas time / ours, goal >= 3) and
``select.time_over_bare_io`` (ours / bare, goal <= 2), from the fastest of ``--repeat`` interleaved
runs of each (1 quick, 2 full); ``*_cpu_s`` give the CPU seconds (all threads) next to the wall
times. Imports happen before timing (``warm_imports``).
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data_schemas import manifest as manifest_mod  # noqa: E402
from data_schemas import rollouts, selected, tokens  # noqa: E402
from stages.lib import store  # noqa: E402

V = 32000
K = 32
RHO = 0.5


def _lists(flat: np.ndarray, lens: np.ndarray, typ: pa.DataType) -> pa.Array:
    off = np.zeros(len(lens) + 1, np.int32)
    np.cumsum(lens, out=off[1:])
    return pa.ListArray.from_arrays(pa.array(off), pa.array(flat, typ))


def synth_shard(
    rng: np.random.Generator, s: int, n_seq: int, mean_t: int
) -> tuple[pa.Table, pa.Table]:
    """One rollouts shard and its tokens shard (valid under the schemas)."""
    lens = rng.integers(mean_t // 2, mean_t * 3 // 2 + 1, n_seq).astype(np.int32)  # [S]
    n = int(lens.sum())
    sids = np.array([f"r{s:04d}-{i:05d}" for i in range(n_seq)], dtype=object)
    resp = rng.integers(4, V, n).astype(np.int32)  # [N]
    blp = -rng.exponential(1.0, n).astype(np.float32)
    prompt = rng.integers(4, V, n_seq * 16).astype(np.int32)
    ro = pa.table(
        {
            "sample_id": pa.array(sids, pa.string()),
            "prompt_id": pa.array([f"p{s}-{i // 4}" for i in range(n_seq)]),
            "sample_idx": pa.array(np.arange(n_seq, dtype=np.int32) % 4),
            "train_prompt_ids": _lists(prompt, np.full(n_seq, 16), pa.int32()),
            "rollout_prompt_ids": _lists(prompt, np.full(n_seq, 16), pa.int32()),
            "teacher_prompt_ids": _lists(prompt, np.full(n_seq, 16), pa.int32()),
            "response_ids": _lists(resp, lens, pa.int32()),
            "behavior_logprobs": _lists(blp, lens, pa.float32()),
            "response_len": pa.array(lens),
            "is_guided": pa.array(np.arange(n_seq) % 2 == 0),
            "finish_reason": pa.array(["eos"] * n_seq),
            "temperature": pa.array(np.ones(n_seq, np.float32)),
            "top_p": pa.array(np.ones(n_seq, np.float32)),
            "answer": pa.nulls(n_seq, pa.string()),
            "kind": pa.nulls(n_seq, pa.string()),
            "correct": pa.nulls(n_seq, pa.bool_()),
        }
    )
    topk_lp = -np.sort(rng.uniform(3.5, 12.0, (n, K)), axis=1).astype(np.float16)  # [N, K]
    kl = np.full(n, K)
    tk = pa.table(
        {
            "sample_id": pa.array(np.repeat(sids, lens), pa.string()),
            "pos": pa.array(np.concatenate([np.arange(t, dtype=np.int32) for t in lens])),
            "token_id": pa.array(resp),
            "segment": pa.array(np.zeros(n, np.uint8)),
            "is_guided": pa.array(np.repeat(np.arange(n_seq) % 2 == 0, lens)),
            "teacher_logprob": pa.array(-rng.exponential(1.0, n).astype(np.float32)),
            "teacher_topk_ids": _lists(rng.integers(0, V, n * K).astype(np.int32), kl, pa.int32()),
            "teacher_topk_logprobs": _lists(topk_lp.ravel(), kl, pa.float16()),
            "teacher_topk_logmass": pa.array(
                np.log(np.exp(topk_lp.astype(np.float64)).sum(1)).astype(np.float32)
            ),
            "teacher_entropy": pa.array(rng.uniform(0, 4, n).astype(np.float16)),
            "behavior_logprob": pa.array(blp),
            "behavior_entropy": pa.array(rng.uniform(0, 4, n).astype(np.float16)),
            "ref_logprob": pa.array(-rng.exponential(1.0, n).astype(np.float32)),
            "behavior_topk_ids": pa.nulls(n, pa.list_(pa.int32())),
            "teacher_logprobs_on_behavior_topk": pa.nulls(n, pa.list_(pa.float16())),
        }
    )
    return ro, tk


def write_synthetic_run(
    run_dir: Path, n_tokens: int, *, seq_per_shard: int = 2000, mean_t: int = 100
) -> int:
    """Committed rollouts/ + tokens/ with about ``n_tokens`` tokens; returns the exact count."""
    rng = np.random.default_rng(0)
    n_shards = max(1, math.ceil(n_tokens / (seq_per_shard * mean_t)))
    ro_id, tk_id = store.content_id({"bench": n_tokens}), store.content_id({"bench-tok": n_tokens})
    total = 0
    with (
        store.open_writer(run_dir / "rollouts", rollouts, dataset_id=ro_id, stage="rollout") as wr,
        store.open_writer(run_dir / "tokens", tokens, dataset_id=tk_id, stage="score") as wt,
    ):
        for s in range(n_shards):
            ro, tk = synth_shard(rng, s, seq_per_shard, mean_t)
            wr.write_shard(s, ro)
            wt.write_shard(s, tk)
            total += tk.num_rows
        extra = {"vocab_size": V}
        wr.commit(n_shards, config={}, fingerprints={}, inputs={}, extra=extra)
        wt.commit(n_shards, config={}, fingerprints={}, inputs={"rollouts": ro_id}, extra=extra)
    return total


def run_ours(run_dir: Path, name: str) -> dict:
    from stages import select
    from stages.lib.config import compose

    cfg = compose(
        "select",
        [
            f"run_dir={run_dir}",
            "select=entropy_half",
            f"select.name={name}",
            "select.rules.0.params.mode=top",
            f"select.rules.0.params.rho={RHO}",
        ],
    )
    return select.run(cfg)


def run_pandas(run_dir: Path, out: Path) -> dict[str, np.ndarray]:
    """The same selection and per-sequence output with pandas (global top-rho by entropy)."""
    import pandas as pd

    out.mkdir(parents=True, exist_ok=True)
    tk = pd.concat(
        [
            tokens.decode(pq.read_table(p)).to_pandas()  # stored codec layout -> logical
            for p in sorted((run_dir / "tokens").glob("bucket=*/*.parquet"))
        ]
    )
    ro = pd.concat(
        [
            pq.read_table(p).to_pandas()
            for p in sorted((run_dir / "rollouts").glob("bucket=*/*.parquet"))
        ]
    )
    st = tk[tk["segment"] == 0]
    ranked = st.assign(h=-st["behavior_entropy"].astype("float64")).sort_values(
        ["h", "sample_id", "pos"], kind="stable"
    )
    keep = ranked.head(math.floor(RHO * len(st) + 0.5))
    tk["weight"] = np.float32(0)
    kept_idx = pd.MultiIndex.from_frame(keep[["sample_id", "pos"]])
    tk["weight"] = (
        pd.MultiIndex.from_frame(tk[["sample_id", "pos"]]).isin(kept_idx).astype(np.float32)
    )
    tk = tk.sort_values(["sample_id", "pos"])
    g = tk.groupby("sample_id", sort=True)
    agg = pd.DataFrame(
        {
            "weights": g["weight"].agg(list),
            "segments": g["segment"].agg(list),
            "teacher_logprob": g["teacher_logprob"].agg(list),
            "behavior_logprob": g["behavior_logprob"].agg(list),
            "ref_logprob": g["ref_logprob"].agg(list),
            "teacher_topk_ids": g["teacher_topk_ids"].agg(lambda s: np.concatenate(s.values)),
            "teacher_topk_logprobs": g["teacher_topk_logprobs"].agg(
                lambda s: np.concatenate(s.values)  # float32, as selected stores them
            ),
            "teacher_topk_logmass": g["teacher_topk_logmass"].agg(list),
            "n_kept": g["weight"].agg(lambda s: int((s > 0).sum())),
        }
    ).reset_index()
    df = ro[
        ["sample_id", "prompt_id", "is_guided", "train_prompt_ids", "response_ids", "response_len"]
    ].merge(agg, on="sample_id")
    df["topk_k"] = K
    df["behavior_topk_k"] = 0
    df["behavior_topk_ids"] = None
    df["teacher_logprobs_on_behavior_topk"] = None
    table = pa.Table.from_pandas(df, schema=selected.SCHEMA, preserve_index=False)
    pq.write_table(table, out / "selected.parquet", compression="zstd", compression_level=3)
    return {s: np.asarray(w) for s, w in zip(df["sample_id"], df["weights"])}


def run_bare(run_dir: Path, out: Path) -> None:
    """Read every input shard with pyarrow and write it back: the I/O floor."""
    for name in ("rollouts", "tokens"):
        for p in sorted((run_dir / name).glob("bucket=*/*.parquet")):
            dst = out / name / p.parent.name / p.name
            dst.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(pq.read_table(p), dst, compression="zstd", compression_level=3)


def warm_imports() -> None:
    """Import what each side uses before timing: module loading (hydra, duckdb, pandas: 1-2 s)
    is interpreter start-up, not the work compared, and bare IO would pay none of it."""
    import pandas  # noqa: F401

    from stages import select  # noqa: F401
    from stages.lib.config import compose  # noqa: F401


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*.parquet"))


def timed(fn, *args) -> tuple[float, float, Any]:
    """(wall seconds, CPU seconds of the whole process: every thread, DuckDB's too, result)."""
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    out = fn(*args)
    wall, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
    return wall, (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime), out


def same_tables(ours: Path, theirs: Path) -> bool:
    """Every column of the two selected outputs equal, row for row (rows matched by sample_id)."""
    a = store.read_table(ours, selected).sort_by("sample_id")
    b = pq.read_table(theirs).select(selected.SCHEMA.names).sort_by("sample_id")
    return a.num_rows == b.num_rows and all(
        a[c].combine_chunks().equals(b[c].combine_chunks()) for c in selected.SCHEMA.names
    )


def bench(quick: bool, repeat: int | None = None) -> dict:
    """Time bare IO, ours and pandas ``repeat`` times, interleaved (default: 1 quick, 2 full);
    each is reported by its fastest run, the usual defence against a shared, noisy machine."""
    n_target = 500_000 if quick else 5_000_000
    repeat = repeat or (1 if quick else 2)
    warm_imports()
    wall: dict[str, list[float]] = {"bare": [], "ours": [], "pandas": []}
    cpu: dict[str, list[float]] = {"bare": [], "ours": [], "pandas": []}
    res: dict = {}
    with tempfile.TemporaryDirectory(prefix="bench-select-") as tmp:
        run_dir, bare_dir, pandas_dir = Path(tmp) / "run", Path(tmp) / "bare", Path(tmp) / "pandas"
        t0 = time.perf_counter()
        n_tok = write_synthetic_run(run_dir, n_target)
        t_setup = time.perf_counter() - t0
        for r in range(repeat):
            for name, fn, args in (
                ("bare", run_bare, (run_dir, bare_dir)),
                ("ours", run_ours, (run_dir, f"bench{r}")),
                ("pandas", run_pandas, (run_dir, pandas_dir)),
            ):
                w, c, got = timed(fn, *args)
                wall[name].append(w)
                cpu[name].append(c)
                res = got if name == "ours" else res
            shutil.rmtree(bare_dir)
        out_dir = Path(res["dir"])
        n_seq = manifest_mod.read(out_dir)["rows"]
        bytes_ours, bytes_pandas = dir_bytes(out_dir), dir_bytes(pandas_dir)
        bytes_tokens = dir_bytes(run_dir / "tokens")
        same = same_tables(out_dir, pandas_dir / "selected.parquet")
        if not same:
            raise SystemExit("pandas and select disagree: the comparison would be meaningless")
    t_bare, t_ours, t_pandas = min(wall["bare"]), min(wall["ours"]), min(wall["pandas"])
    return {
        "select.tokens": n_tok,
        "select.topk": K,
        "select.quick": quick,
        "select.repeat": repeat,
        "select.setup_s": round(t_setup, 2),
        "select.ours_s": round(t_ours, 3),
        "select.pandas_s": round(t_pandas, 3),
        "select.bare_io_s": round(t_bare, 3),
        "select.speedup_vs_pandas": round(t_pandas / t_ours, 2),
        "select.time_over_bare_io": round(t_ours / t_bare, 2),
        "select.tokens_per_s": round(n_tok / t_ours),
        "select.sequences_per_s": round(n_seq / t_ours),
        "select.pandas_tokens_per_s": round(n_tok / t_pandas),
        # CPU seconds (all threads): what the work costs, whatever the machine's load
        "select.ours_cpu_s": round(min(cpu["ours"]), 2),
        "select.pandas_cpu_s": round(min(cpu["pandas"]), 2),
        "select.bare_io_cpu_s": round(min(cpu["bare"]), 2),
        "select.all_runs_s": {k: [round(x, 2) for x in v] for k, v in wall.items()},
        "select.output_bytes_per_token": round(bytes_ours / n_tok, 2),
        "select.pandas_output_bytes_per_token": round(bytes_pandas / n_tok, 2),
        "select.input_tokens_bytes_per_token": round(bytes_tokens / n_tok, 2),
        "select.outputs_equal": same,
    }


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench_select.json", help="JSON file to write")
    ap.add_argument("--quick", action="store_true", help="~0.5M tokens instead of 5M")
    ap.add_argument("--repeat", type=int, default=None, help="runs of each (1 quick, 2 full)")
    args = ap.parse_args()
    result = bench(args.quick, args.repeat)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
