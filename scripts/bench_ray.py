"""Benchmark the Ray launcher: rollout + score wall time run locally vs on 1 and 2 Ray actors.

One run measures the same workload three ways: the plain local run (one process, one torch
thread), ``launcher.kind=ray`` with 1 actor, and with 2 actors (each actor 1 CPU, 1 thread), on a
local Ray cluster started once. Cluster start-up (``ray_init_s``) and actor start-up
(``actor_start_s``: 2 processes that import torch, transformers and the stages) are reported
apart: a cluster and its actors outlive a stage (the actors are pooled across stages). The three
settings run interleaved for ``repeats`` rounds (order reversed every other round) and each takes
its best round, so load that shifts during the run hits all three alike. Ratios:
``overhead_1_actor`` = Ray 1 actor / local - 1, ``speedup_2_vs_1`` = 1 actor / 2 actors, and
``cpu_overhead_1_actor`` from the CPU seconds of the driver plus the actors (Ray's own daemons not
counted), which other jobs on a shared machine do not inflate. Every run's shards are checked
byte-identical to the local run's.

Work: a random Llama policy (hidden 128, 2 layers, vocab 4,096) samples ``n`` responses per
prompt; a larger teacher (hidden 256) and the policy score them (2 passes per rollout). The machine
may be shared: the 1-minute load average is recorded before and after.

With ``--bucket`` a fourth setting runs interleaved with the others: 2 actors on a run in object
storage (``run_dir=s3://...`` on a moto S3 server in this process, 127.0.0.1), each actor
process with a mirror of its own, as on machines that share nothing but the bucket, and the
stages inside their sessions (lease, pull, publish) as their command lines run them.
``bucket_overhead_2_actors`` = bucket / ray_2_actors - 1; ``bucket_bytes`` counts, by dataset
folder and summed over the repeats, what the driver's and each actor's mirror fetched or wrote
(the driver fetches the rollouts it plans the score stage from, never the tokens shards the
actors wrote). The bucket's shards are checked
byte-identical to the local run's too.

Run: ``python scripts/bench_ray.py --out runs/bench/ray.json [--quick] [--bucket]`` (quick: < 2
minutes).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_rollout import build_model, write_prompts  # noqa: E402

from stages import rollout, score  # noqa: E402
from stages.lib import raylaunch, remote  # noqa: E402
from stages.lib.config import compose  # noqa: E402
from stages.lib.uri import ENV_MIRROR, is_remote  # noqa: E402

WARM_IMPORTS = (
    "stages.rollout",
    "stages.score",
    "transformers.models.llama.modeling_llama",
    "transformers.generation.utils",
)
QUICK = dict(prompts=64, n=2, max_new_tokens=24, per_shard=16, repeats=2)
FULL = dict(prompts=256, n=2, max_new_tokens=48, per_shard=32, repeats=3)


def overrides(student: Path, teacher: Path, prompts: Path, w: dict) -> list[str]:
    return [
        f"student.path={student}",
        f"teacher.path={teacher}",
        f"data.prompts={prompts}",
        "rollout.backend=hf",
        "score.backend=hf",
        "rollout.temperature=1.0",
        f"rollout.n={w['n']}",
        f"rollout.max_new_tokens={w['max_new_tokens']}",
        f"rollout.prompts_per_shard={w['per_shard']}",
        "rollout.batch_size=8",
    ]


def actors_cpu(ray) -> float:
    """CPU seconds the pooled actors' processes have used so far (all their threads)."""
    return sum(i["cpu_s"] for i in ray.get([a.info.remote() for a in raylaunch._POOL["actors"]]))


def stages(ray, run_dir: Path | str, args: list[str]) -> dict:
    """Rollout then score into a fresh ``run_dir`` (each stage in its session, as its command
    line runs it: nothing for a local folder): wall seconds of each, and the CPU seconds of this
    process plus the actors (what the work cost, whatever else the machine is running)."""
    if not is_remote(run_dir):
        shutil.rmtree(run_dir, ignore_errors=True)
    c0, a0, t0 = time.process_time(), actors_cpu(ray), time.perf_counter()
    with remote.stage_session(cfg := compose("rollout", args), "rollout"):
        rollout.run(cfg)
    t1 = time.perf_counter()
    with remote.stage_session(cfg := compose("score", args), "score"):
        score.run(cfg)
    t2 = time.perf_counter()
    cpu = time.process_time() - c0 + actors_cpu(ray) - a0
    return {"rollout_s": t1 - t0, "score_s": t2 - t1, "total_s": t2 - t0, "cpu_s": cpu}


def shard_bytes(run_dir: Path) -> dict[str, bytes]:
    return {
        p.relative_to(run_dir).as_posix(): p.read_bytes()
        for p in sorted(run_dir.glob("*/bucket=*/shard-*.parquet"))
    }


def start_actors(ray, base: list[str], n: int) -> float:
    """Start ``n`` pooled actors and import in them what the local run has imported by now (the
    driver built the models: torch, the stages, transformers' Llama and generation code)."""
    lc = compose("rollout", [*base, "launcher.kind=ray", f"launcher.actors={n}"]).launcher
    t0 = time.perf_counter()
    pool = raylaunch._actors(ray, lc, n)
    ray.get([a.info.remote(WARM_IMPORTS) for a in pool])
    return time.perf_counter() - t0


SETTINGS = {"local": (), "ray_1_actor": ("launcher.kind=ray", "launcher.actors=1")}
SETTINGS["ray_2_actors"] = ("launcher.kind=ray", "launcher.actors=2")
BUCKET = "bench-ray"


def start_s3(work: Path) -> object:
    """A moto S3 server on 127.0.0.1 and the AWS variables that point this process (and the Ray
    cluster started after it) at it; the driver's mirror under ``work``."""
    import socket

    import boto3
    from moto.server import ThreadedMotoServer

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    os.environ.update(
        AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1", AWS_REGION="us-east-1",
    )  # fmt: skip
    os.environ[ENV_MIRROR] = str(work / "driver")
    boto3.client("s3").create_bucket(Bucket=BUCKET)
    return server


def bucket_shards(prefix: str) -> dict[str, bytes]:
    """The shards of a run in the bucket, named as :func:`shard_bytes` names local ones."""
    import boto3

    c, out = boto3.client("s3"), {}
    for page in c.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        for o in page.get("Contents", []):
            if "/bucket=" in o["Key"]:
                body = c.get_object(Bucket=BUCKET, Key=o["Key"])["Body"].read()
                out[o["Key"][len(prefix) :]] = body
    return out


def mirror_bytes(root: Path) -> dict[str, int]:
    """Bytes of the files in a mirror by dataset folder (``<scheme>/<bucket>/<run>/<folder>``),
    all runs together; its own bookkeeping (hidden names) left out."""
    out: dict[str, int] = {}
    for p in root.rglob("*"):
        parts = p.relative_to(root).parts
        if p.is_file() and len(parts) > 4 and not any(x.startswith(".") for x in parts):
            out[parts[3]] = out.get(parts[3], 0) + p.stat().st_size
    return dict(sorted(out.items()))


def bench(quick: bool, bucket: bool = False) -> dict:
    import ray

    w = QUICK if quick else FULL
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="bench_ray_"))
    student = build_model(work / "student", hidden=128, layers=2)
    teacher = build_model(work / "teacher", hidden=256, layers=2)
    prompts = write_prompts(work / "prompts.parquet", w["prompts"])
    base = overrides(student, teacher, prompts, w)
    settings = dict(SETTINGS)
    server = None
    if bucket:  # every Ray setting with the same actor env: one actor pool for all of them
        server = start_s3(work)
        base.append(f"+launcher.env.{ENV_MIRROR}='{work}/actors/{{pid}}'")
        settings["ray_2_actors_bucket"] = SETTINGS["ray_2_actors"]
    res: dict = {"quick": quick, "workload": w, "cpus": os.cpu_count(), "repeats": w["repeats"]}
    res["load_avg_1m_before"] = os.getloadavg()[0]
    t0 = time.perf_counter()
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        runtime_env=raylaunch.job_runtime_env(),
        logging_level="WARNING",
        log_to_driver=False,
    )
    res["ray_init_s"] = time.perf_counter() - t0
    # both actors once (the 1-actor runs use the first): the pool is kept across runs
    res["actor_start_s"] = start_actors(ray, base, 2)
    runs: dict[str, list[dict]] = {name: [] for name in settings}
    identical = True
    for r in range(w["repeats"]):  # interleaved, the order reversed every other round
        for name in list(settings)[:: 1 if r % 2 == 0 else -1]:
            run_dir = work / name if name in SETTINGS else f"s3://{BUCKET}/r{r}"
            args = [*base, f"run_dir={run_dir}", *settings[name]]
            runs[name].append(stages(ray, run_dir, args))
        ref = shard_bytes(work / "local")
        identical &= all(shard_bytes(work / n) == ref for n in SETTINGS)
        if bucket:
            identical &= bucket_shards(f"r{r}/") == ref
    raylaunch.drop_pool()
    ray.shutdown()
    if server is not None:
        server.stop()
        actors = [d for d in (work / "actors").iterdir() if d.is_dir()]
        res["bucket_bytes"] = {
            "driver_mirror": mirror_bytes(work / "driver"),
            "actor_mirrors": [mirror_bytes(d) for d in actors],
            "local_run_shards": {
                t: sum(len(b) for k, b in shard_bytes(work / "local").items() if k.startswith(t))
                for t in ("rollouts", "tokens")
            },
            "repeats": w["repeats"],
        }
    res["load_avg_1m_after"] = os.getloadavg()[0]
    best = {n: min(x["total_s"] for x in v) for n, v in runs.items()}
    cpu = {n: min(x["cpu_s"] for x in v) for n, v in runs.items()}
    res |= {"runs": runs, "best_total_s": best, "best_cpu_s": cpu, "identical_bytes": identical}
    res["cpu_overhead_1_actor"] = cpu["ray_1_actor"] / cpu["local"] - 1
    res["shards"] = len(shard_bytes(work / "local"))
    res["overhead_1_actor"] = best["ray_1_actor"] / best["local"] - 1
    res["speedup_2_vs_1"] = best["ray_1_actor"] / best["ray_2_actors"]
    res["speedup_2_vs_local"] = best["local"] / best["ray_2_actors"]
    if bucket:
        res["bucket_overhead_2_actors"] = best["ray_2_actors_bucket"] / best["ray_2_actors"] - 1
        res["bucket_cpu_overhead_2_actors"] = cpu["ray_2_actors_bucket"] / cpu["ray_2_actors"] - 1
    shutil.rmtree(work, ignore_errors=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/bench/ray.json")
    ap.add_argument("--quick", action="store_true", help="small workload (< 2 minutes)")
    ap.add_argument("--bucket", action="store_true", help="also 2 actors on a moto S3 bucket")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    res = bench(args.quick, args.bucket)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
