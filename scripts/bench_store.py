"""Benchmark the store on object storage: shard write and read throughput, S3 server vs local disk.

One run measures both sides on the same shards, so the ratios are taken under the same load:

- **local**: shards written as the store commits them (Parquet, zstd, fsync, rename) into a local
  dataset folder, then read back whole (``pyarrow.parquet``);
- **s3**: the same shards written into the mirror of an ``s3://`` run inside a real remote
  session (``stages.lib.remote``: lease, then each shard uploaded under its final key as it is
  committed, the manifest last), then read on an "other machine" two ways: ``pull`` (manifest
  and listed shards into an empty mirror, then read locally) and ``stream`` (row groups read in
  place by byte ranges, ``store.open_shard``, as the trainer does).

The S3 server is moto's (``moto[server]``, the ``s3`` extra) in a separate process on 127.0.0.1:
it keeps objects in memory, so the figures are the client path's cost (HTTP, multipart, copies),
not a cloud bucket's (whose latency and bandwidth dominate there).

    .venv/bin/python scripts/bench_store.py --out bench_store.json [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from stages.lib import remote, store  # noqa: E402
from stages.lib.mirror import _REMOTES, open_remote, pull  # noqa: E402
from stages.lib.uri import ENV_MIRROR, mirror_of  # noqa: E402

BUCKET = "distillery-bench"


def shard_table(rng: np.random.Generator, rows: int, tokens: int) -> pa.Table:
    """A tokens-like shard: per row a response of ``tokens`` ids and float32 log-probs."""
    ids = rng.integers(0, 50_000, size=rows * tokens, dtype=np.int32)
    lps = -rng.exponential(2.0, size=rows * tokens).astype(np.float32)
    offsets = pa.array(np.arange(0, rows * tokens + 1, tokens, dtype=np.int32))
    return pa.table(
        {
            "sample_id": pa.array([f"s{i:08d}" for i in range(rows)]),
            "response_ids": pa.ListArray.from_arrays(offsets, pa.array(ids)),
            "logprobs": pa.ListArray.from_arrays(offsets, pa.array(lps)),
        }
    )


def write_shards(directory: Path, tables: list[pa.Table]) -> float:
    """Commit shards the store's way (temp, fsync, rename, then the publish hook); seconds."""
    t0 = time.perf_counter()
    for s, t in enumerate(tables):
        path = directory / store.shard_relpath(s)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{store.TMP_PREFIX}{path.name}")
        pq.write_table(t, tmp, compression="zstd", compression_level=3, row_group_size=1024)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        if store.HOOKS.published is not None:
            store.HOOKS.published(path)
    manifest = {"shards": [{"path": store.shard_relpath(s)} for s in range(len(tables))]}
    store.atomic_write_text(directory / "_manifest.json", json.dumps(manifest))
    return time.perf_counter() - t0


def read_all(paths: list[Path]) -> tuple[float, int]:
    t0 = time.perf_counter()
    rows = 0
    for p in paths:
        pf = store.open_shard(p)
        for g in range(pf.metadata.num_row_groups):
            rows += pf.read_row_group(g).num_rows
    return time.perf_counter() - t0, rows


def start_server() -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(200):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc, f"http://127.0.0.1:{port}"
        time.sleep(0.1)
    proc.kill()
    raise SystemExit("moto server did not start")


def bench(n_shards: int, rows: int, tokens: int, work: Path) -> dict:
    rng = np.random.default_rng(0)
    tables = [shard_table(rng, rows, tokens) for _ in range(n_shards)]
    local = work / "local" / "tokens"
    t_local_w = write_shards(local, tables)
    paths = [local / store.shard_relpath(s) for s in range(n_shards)]
    nbytes = sum(p.stat().st_size for p in paths)
    t_local_r, n_rows = read_all(paths)

    uri = f"s3://{BUCKET}/bench/run"
    os.environ[ENV_MIRROR] = str(work / "mirror-writer")
    _REMOTES.clear()
    with remote.stage_session(SimpleNamespace(run_dir=uri), "bench"):
        t_s3_w = write_shards(mirror_of(uri) / "tokens", tables)

    os.environ[ENV_MIRROR] = str(work / "mirror-reader-pull")  # another machine
    _REMOTES.clear()
    t0 = time.perf_counter()
    pull(open_remote(uri))
    pulled = [mirror_of(uri) / "tokens" / store.shard_relpath(s) for s in range(n_shards)]
    t_pull = time.perf_counter() - t0
    t_pull_read, _ = read_all(pulled)

    os.environ[ENV_MIRROR] = str(work / "mirror-reader-stream")
    _REMOTES.clear()
    r = open_remote(uri)
    pull(r, streamed=("tokens/",))  # the manifest only
    with remote.streaming(r):
        streamed = [r.mirror / "tokens" / store.shard_relpath(s) for s in range(n_shards)]
        assert not any(p.exists() for p in streamed)
        t_stream, n2 = read_all(streamed)
    assert n2 == n_rows

    def rate(seconds: float) -> float:
        return round(nbytes / seconds, 1)

    res = {
        "shards": n_shards, "rows": n_rows, "bytes": nbytes,
        "local.write_bytes_per_s": rate(t_local_w),
        "local.read_bytes_per_s": rate(t_local_r),
        "s3.write_bytes_per_s": rate(t_s3_w),
        "s3.pull_then_read_bytes_per_s": rate(t_pull + t_pull_read),
        "s3.stream_read_bytes_per_s": rate(t_stream),
    }  # fmt: skip
    res["ratio.write_s3_over_local"] = round(t_local_w / t_s3_w, 3)
    res["ratio.pull_read_s3_over_local"] = round(t_local_r / (t_pull + t_pull_read), 3)
    res["ratio.stream_read_s3_over_local"] = round(t_local_r / t_stream, 3)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench_store.json")
    ap.add_argument("--quick", action="store_true", help="8 shards of ~2 MB instead of 32 of ~8")
    args = ap.parse_args()
    try:
        import boto3
    except ImportError:
        raise SystemExit("needs the s3 extra: pip install -e '.[s3]'") from None
    proc, endpoint = start_server()
    os.environ.update(
        AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1", AWS_REGION="us-east-1",
    )  # fmt: skip
    try:
        boto3.client("s3").create_bucket(Bucket=BUCKET)
        shards, rows = (8, 1024) if args.quick else (32, 4096)
        with tempfile.TemporaryDirectory() as work:
            res = bench(shards, rows, 256, Path(work))
    finally:
        proc.kill()
        proc.wait()
    res["server"] = "moto (in-memory S3, separate process, 127.0.0.1)"
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
