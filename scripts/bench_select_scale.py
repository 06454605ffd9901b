"""The select stage at scale: peak memory and time per token on >= 50M tokens against 5M.

Synthesises two committed runs (rollouts + tokens, K = 32, the tokens codec layout; the data of
``bench_select.synth_shard``), streaming: a few template shards are built and validated once, and
every shard written is a template with its sample ids renamed, so writing 50M tokens costs Parquet
writes only (zstd level 1 here, to keep the set-up short; select reads any encoding alike). Then
``stages.select`` (TIP entropy top-half, the defaults otherwise: ``select.memory_limit``,
``select.threads``) runs on each in its own child process, which reports its wall time, CPU time
and peak RSS (``VmHWM`` of the select process). The runs are deleted afterwards.

    OMP_NUM_THREADS=1 python scripts/bench_select_scale.py --out runs/bench_select_scale.json
    OMP_NUM_THREADS=1 python scripts/bench_select_scale.py --quick --out x.json  # 0.2M vs 2M

Keys: ``select_scale.peak_rss_gib`` (the large run; goal <= 2 GiB) and
``select_scale.time_per_token_large_over_small`` (goal <= 1).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import bench_select  # noqa: E402

from data_schemas import codec, rollouts, tokens  # noqa: E402
from data_schemas import manifest as manifest_mod  # noqa: E402
from stages.lib import store  # noqa: E402

SEQ_PER_SHARD = 2000
MEAN_T = 100  # response tokens per sequence: 200k tokens per shard
TEMPLATES = 4


class Prepared:
    """A table module writing already validated and encoded tables (the templates were checked
    once); the stored layout is the real one, with zstd level 1."""

    def __init__(self, module):
        self.NAME, self.VERSION, self.SCHEMA = module.NAME, module.VERSION, module.SCHEMA
        self._module = module

    def validate(self, table: pa.Table, **_: object) -> pa.Table:
        return table

    def parquet_options(self, schema: pa.Schema) -> dict:
        if self._module is tokens:
            return {**codec.parquet_options(schema), "compression_level": 1}
        return {"compression_level": 1}


def templates(rng: np.random.Generator) -> list[tuple[pa.Table, pa.Table]]:
    """Validated rollouts / stored tokens shard pairs, sample ids without their shard prefix."""
    out = []
    for t in range(TEMPLATES):
        ro, tk = bench_select.synth_shard(rng, t, SEQ_PER_SHARD, MEAN_T)
        ro = rollouts.validate(ro)
        tk = tokens.encode(tokens.validate(tk, vocab_size=bench_select.V))
        out.append((ro, tk))
    return out


def renamed(table: pa.Table, shard: int) -> pa.Table:
    """The template with every sample id's shard prefix replaced by ``shard``'s."""
    i = table.column_names.index("sample_id")
    sid = pc.utf8_slice_codeunits(table.column(i), 5)  # "r0003-00017" -> "-00017"
    prefix = pa.scalar(f"r{shard:04d}")
    return table.set_column(i, "sample_id", pc.binary_join_element_wise(prefix, sid, ""))


def write_run(run_dir: Path, n_tokens: int, tpl: list[tuple[pa.Table, pa.Table]]) -> int:
    """Committed rollouts/ + tokens/ of at least ``n_tokens`` tokens, shard by shard."""
    n_shards = -(-n_tokens // (SEQ_PER_SHARD * MEAN_T))
    done = manifest_mod.read(run_dir / "tokens")  # a kept run (--keep): write nothing
    if done is not None and len(done["shards"]) == n_shards:
        return done["rows"]
    ro_id = store.content_id({"scale": n_tokens})
    tk_id = store.content_id({"scale-tok": n_tokens})
    total = 0
    with (
        store.open_writer(
            run_dir / "rollouts", Prepared(rollouts), dataset_id=ro_id, stage="x"
        ) as wr,
        store.open_writer(run_dir / "tokens", Prepared(tokens), dataset_id=tk_id, stage="x") as wt,
    ):
        for s in range(n_shards):
            ro, tk = tpl[s % len(tpl)]
            wr.write_shard(s, renamed(ro, s))
            wt.write_shard(s, renamed(tk, s))
            total += tk.num_rows
        extra = {"vocab_size": bench_select.V}
        wr.commit(n_shards, config={}, fingerprints={}, inputs={}, extra=extra)
        wt.commit(n_shards, config={}, fingerprints={}, inputs={"rollouts": ro_id}, extra=extra)
    return total


def child(run_dir: Path, overrides: list[str]) -> None:
    """Run the select stage once; print wall, CPU and peak RSS as one JSON line."""
    from stages import select
    from stages.lib.config import compose

    cfg = compose(
        "select",
        [
            f"run_dir={run_dir}",
            "select=entropy_half",
            "select.name=scale",
            "select.rules.0.params.mode=top",
            f"select.rules.0.params.rho={bench_select.RHO}",
            *overrides,
        ],
    )
    t, c = time.perf_counter(), time.process_time()
    res = select.run(cfg)
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    # VmHWM: this process's own peak; ru_maxrss would carry the parent's peak across the exec
    hwm = next(ln for ln in open("/proc/self/status") if ln.startswith("VmHWM:"))
    peak = int(hwm.split()[1]) * 1024  # KiB -> bytes
    print(json.dumps({"wall_s": wall, "cpu_s": cpu, "peak_rss": peak, "dir": res["dir"]}))


def run_select(run_dir: Path, overrides: list[str]) -> dict:
    for old in (run_dir / "selected", run_dir / ".duckdb_tmp"):  # no resume from a kept run
        shutil.rmtree(old, ignore_errors=True)
    p = subprocess.run(
        [sys.executable, __file__, "--child", str(run_dir), *overrides],
        capture_output=True,
        text=True,
        timeout=3600,
    )
    if p.returncode:
        raise SystemExit(f"select failed on {run_dir}:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*.parquet"))


def bench(
    quick: bool, workdir: Path | None = None, overrides: list[str] | None = None, keep: bool = False
) -> dict:
    small, large = (200_000, 2_000_000) if quick else (5_000_000, 50_000_000)
    overrides = list(overrides or [])
    out: dict = {
        "select_scale.loadavg_start": os.getloadavg(),
        "select_scale.quick": quick,
        "select_scale.overrides": overrides,
    }
    if keep and workdir is not None:  # runs kept in workdir, reused by the next --keep
        tmp = workdir
        tmp.mkdir(parents=True, exist_ok=True)
    else:
        tmp = Path(tempfile.mkdtemp(prefix="bench-select-scale-", dir=workdir))
    try:
        t0 = time.perf_counter()
        tpl = templates(np.random.default_rng(0))
        runs = {}
        for name, n in (("small", small), ("large", large)):
            d = tmp / name
            t = time.perf_counter()
            n_tok = write_run(d, n, tpl)
            runs[name] = (d, n_tok)
            out[f"select_scale.{name}_tokens"] = n_tok
            out[f"select_scale.{name}_write_s"] = round(time.perf_counter() - t, 1)
            out[f"select_scale.{name}_tokens_bytes_per_token"] = round(
                dir_bytes(d / "tokens") / n_tok, 1
            )
        out["select_scale.setup_s"] = round(time.perf_counter() - t0, 1)
        for name in ("small", "large"):  # small first: its cache state is the colder one
            d, n_tok = runs[name]
            r = run_select(d, overrides)
            out[f"select_scale.{name}_wall_s"] = round(r["wall_s"], 2)
            out[f"select_scale.{name}_cpu_s"] = round(r["cpu_s"], 2)
            out[f"select_scale.{name}_peak_rss_gib"] = round(r["peak_rss"] / 2**30, 3)
            out[f"select_scale.{name}_us_per_token"] = round(1e6 * r["wall_s"] / n_tok, 3)
            out[f"select_scale.{name}_cpu_us_per_token"] = round(1e6 * r["cpu_s"] / n_tok, 3)
            if not keep:
                shutil.rmtree(d)  # free the disk before the next run
    finally:
        if not keep:
            shutil.rmtree(tmp, ignore_errors=True)
    out["select_scale.peak_rss_gib"] = out["select_scale.large_peak_rss_gib"]
    out["select_scale.time_per_token_large_over_small"] = round(
        out["select_scale.large_us_per_token"] / out["select_scale.small_us_per_token"], 3
    )
    out["select_scale.cpu_per_token_large_over_small"] = round(
        out["select_scale.large_cpu_us_per_token"] / out["select_scale.small_cpu_us_per_token"], 3
    )
    out["select_scale.loadavg_end"] = os.getloadavg()
    out["select_scale.goal"] = "peak RSS <= 2 GiB at >= 50M tokens; time per token <= the 5M run's"
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="JSON file to write")
    ap.add_argument("--quick", action="store_true", help="0.2M vs 2M tokens (~1-2 minutes)")
    ap.add_argument("--workdir", type=Path, help="where the runs are written (default: $TMPDIR)")
    ap.add_argument(
        "--keep",
        action="store_true",
        help="keep the runs in --workdir and reuse them next time (delete them yourself)",
    )
    ap.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    ap.add_argument(
        "overrides", nargs="*", help="select config overrides (select.memory_limit=1GB)"
    )
    args = ap.parse_args()
    if args.child:
        child(args.child, args.overrides)
        return
    res = bench(args.quick, args.workdir, args.overrides, args.keep)
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
