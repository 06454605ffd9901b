"""Thread setup under concurrent load: a training-like torch workload idle and beside busy loops.

Each measurement is a child process (OpenMP reads its environment once, when torch loads it) that
builds a small random Llama from a config, warms up, and times ``--steps`` training steps
(forward, backward, AdamW) on 2 torch threads. The parent runs every thread setup at every load
(0, 1 and 2 pure-Python busy-loop processes beside it), interleaved and repeated, and reports for
each setup its slowdown against its own idle time, that slowdown over the fair share of 2 cores
(1.5x beside one busy process, 2x beside two), and its idle time against the default setup's.

    OMP_NUM_THREADS=1 python scripts/bench_threads.py --out runs/bench_threads.json [--quick]
    OMP_NUM_THREADS=1 python scripts/bench_threads.py --quick --realtime-only --repeats 4 \
        --setups default,project,passive,one_thread --out x.json   # idle speed, as root

``--workload`` picks what each child times: ``step`` (the default, the small Llama above),
``world`` (the demo world build's base-model training: the world's tokenizer, model and
``pretrain`` loop for ``--steps`` steps; the world's own package sets the project's threads up)
or ``train_stage`` (``python -m stages.train experiment=demo train.max_steps=N`` on a copy of
``--run`` taken once, whole command wall time, imports included). For these two, ``default``
means GNU OpenMP's own spin count set explicitly (``GOMP_SPINCOUNT=300000``), since the project's
code sets its own otherwise:

    OMP_NUM_THREADS=1 python scripts/bench_threads.py --workload world --steps 60 \
        --setups default,project --out runs/bench_threads_world.json
    OMP_NUM_THREADS=1 python scripts/bench_threads.py --workload train_stage --steps 60 \
        --run runs/demo_chat_s0 --setups default,project --out runs/bench_threads_train.json

The machine's load average is recorded at the start and the end: other jobs on the machine add to
the busy loops, so read the ratios from one run, never absolute times across runs. ``--nice -20``
(as root) puts the bench and its busy loops above the other jobs of the same cgroup (it did not
shield them from other agents' jobs here); ``--realtime`` times each setup idle as a SCHED_FIFO
process, which gets both cores whatever the load (the kernel leaves others 5 %).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FAIR = {0: 1.0, 1: 1.5, 2: 2.0}  # fair-share slowdown of a 2-thread job on 2 cores
# a pure-Python busy loop that ends when its parent does (checks every ~10 ms)
BUSY = (
    "import os\nppid = os.getppid()\nwhile os.getppid() == ppid:\n"
    "    for _ in range(100_000):\n        pass\n"
)

# setup name -> environment added to the child's (before torch loads OpenMP)
SETUPS: dict[str, dict[str, str]] = {
    "default": {},  # GNU OpenMP's own policy: spin 300k iterations (milliseconds), then sleep
    "passive": {"OMP_WAIT_POLICY": "PASSIVE"},  # sleep at once when a thread waits
    "spin_1k": {"GOMP_SPINCOUNT": "1000"},  # a very short spin, then sleep
    "spin_10k": {"GOMP_SPINCOUNT": "10000"},  # a short spin, then sleep
    "spin_30k": {"GOMP_SPINCOUNT": "30000"},
    "spin_100k": {"GOMP_SPINCOUNT": "100000"},
    "one_thread": {"BENCH_TORCH_THREADS": "1"},  # no parallel regions at all (reference)
    "project": {},  # stages.lib.threads.setup(), as every entry point runs it  # whatever stages.lib.threads sets up (the project's default)
}


def _report(torch, t: float, c: float) -> None:
    """The child's one JSON line: wall and CPU seconds since (t, c), threads, environment."""
    out = {
        "seconds": time.perf_counter() - t,
        "cpu_seconds": time.process_time() - c,
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "env": {k: os.environ.get(k) for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")},
    }
    print(json.dumps(out), flush=True)


def child(steps: int, use_project: bool) -> None:
    """Time ``steps`` training steps of a small Llama; print one JSON line."""
    if use_project:
        sys.path.insert(0, str(ROOT))
        from stages.lib import threads

        threads.setup()
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if not use_project:
        torch.set_num_threads(int(os.environ.get("BENCH_TORCH_THREADS", "2")))
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=2048,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
    )
    model = LlamaForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, cfg.vocab_size, (4, 128))  # [B, T]

    def step() -> None:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    t, c = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step()
    _report(torch, t, c)


def child_world(steps: int) -> None:
    """Time ``steps`` steps of the demo world's base-model training (world.pretrain)."""
    import dataclasses

    sys.path.insert(0, str(ROOT / "scripts"))
    # the world's package sets the project's threads up, so it loads before torch does
    from demoworld import world as W  # noqa: I001

    torch = W.torch

    s = W.WorldSettings()
    torch.set_num_threads(s.threads)
    world = W.make_world(s)
    tok = W.make_tokenizer(W.vocabulary(world))
    model = W.make_model(s.base, tok, s.seed)
    ms = dataclasses.replace(s.base, steps=steps)
    t, c = time.perf_counter(), time.process_time()
    W.pretrain(model, tok, world, ms, s.seed)
    _report(torch, t, c)


def train_stage_cmd(run: Path, steps: int) -> list[str]:
    """The demo recipe's train stage on ``run`` (a copy), stopped after ``steps`` steps."""
    return [
        sys.executable, "-m", "stages.train", "experiment=demo", f"run_dir={run}",
        f"train.max_steps={steps}", "train.name=threads_bench", "overwrite=true",
    ]  # fmt: skip


def _realtime() -> None:
    """In the child before exec: FIFO real-time scheduling, inherited by its threads."""
    os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10))


WORKLOAD = {"name": "step", "run": None}  # set by main(): what run_child times


def run_child(setup: str, steps: int, realtime: bool = False) -> dict:
    drop = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")  # each setup sets its own
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(SETUPS[setup])
    if WORKLOAD["name"] != "step" and setup == "default":
        env["GOMP_SPINCOUNT"] = "300000"  # the runtime's own value (the project code sets 1000)
    if WORKLOAD["name"] == "train_stage":
        t0 = time.perf_counter()
        subprocess.run(
            train_stage_cmd(WORKLOAD["run"], steps), env=env, cwd=ROOT, check=True,
            capture_output=True, timeout=1800, preexec_fn=_realtime if realtime else None,
        )  # fmt: skip
        return {"seconds": time.perf_counter() - t0, "threads": None, "interop_threads": None,
                "env": {k: env.get(k) for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}}  # fmt: skip
    cmd = [sys.executable, __file__, "--child", "--steps", str(steps)]
    if WORKLOAD["name"] == "world":
        cmd.append("--world")
    if setup == "project":
        cmd.append("--project")
    p = subprocess.run(
        cmd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
        preexec_fn=_realtime if realtime else None,
    )
    return json.loads(p.stdout.strip().splitlines()[-1])


def busy(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(n)]


def stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.kill()
        p.wait()


def idle_realtime(setups: list[str], steps: int, repeats: int) -> dict:
    """Idle speed with the machine to itself: each child real-time (SCHED_FIFO, root only; the
    kernel still leaves other jobs 5 % of each second), no busy loops, interleaved."""
    times: dict[str, list[float]] = {s: [] for s in setups}
    for _ in range(repeats):
        for s in setups:
            times[s].append(run_child(s, steps, realtime=True)["seconds"])
            print(f"{s} idle real-time: {times[s][-1]:.2f} s", file=sys.stderr, flush=True)
    best = {s: min(v) for s, v in times.items()}
    out = {"threads.idle_realtime_times": times}
    for s in setups:
        out[f"threads.{s}.idle_realtime_over_{setups[0]}"] = best[s] / best[setups[0]]
    return out


def bench(
    quick: bool, setups: list[str], repeats: int | None = None, steps: int | None = None
) -> dict:
    steps = steps or (6 if quick else 15)
    repeats = repeats or (1 if quick else 2)
    runs: dict[str, dict[int, list[float]]] = {s: {n: [] for n in FAIR} for s in setups}
    info: dict[str, dict] = {}
    load0 = os.getloadavg()
    t0 = time.time()
    for r in range(repeats):
        for n in FAIR:
            procs = busy(n)
            try:
                order = setups[r % len(setups) :] + setups[: r % len(setups)]  # rotate
                for s in order:
                    res = run_child(s, steps)
                    runs[s][n].append(res["seconds"])
                    print(f"{s} busy={n}: {res['seconds']:.2f} s", file=sys.stderr, flush=True)
                    info[s] = {k: res[k] for k in ("threads", "interop_threads", "env")}
            finally:
                stop(procs)
    out: dict = {
        "threads.steps": steps,
        "threads.workload": WORKLOAD["name"],
        "threads.repeats": repeats,
        "threads.loadavg_start": load0,
        "threads.loadavg_end": os.getloadavg(),
        "threads.nproc": os.cpu_count(),
        "threads.seconds": time.time() - t0,
        "threads.fair_share": FAIR,
        "threads.setups": {s: {**SETUPS[s], **info.get(s, {})} for s in setups},
        "threads.times": runs,
    }
    base_idle = statistics.median(runs[setups[0]][0])
    for s in setups:
        med = {n: statistics.median(v) for n, v in runs[s].items()}
        out[f"threads.{s}.idle_over_{setups[0]}"] = med[0] / base_idle
        for n in (1, 2):
            out[f"threads.{s}.slowdown_busy{n}"] = med[n] / med[0]
            out[f"threads.{s}.over_fair_busy{n}"] = med[n] / med[0] / FAIR[n]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="JSON file to write")
    ap.add_argument(
        "--quick", action="store_true", help="6 steps, 1 repeat, 2 setups (~1 minute when idle)"
    )
    ap.add_argument("--repeats", type=int, help="interleaved repeats (default 1 quick, 2 full)")
    ap.add_argument(
        "--setups",
        help="comma-separated setup names (default: all; with --quick: default,project)",
    )
    ap.add_argument(
        "--nice",
        type=int,
        default=0,
        help="niceness of the bench, its children and its busy loops (e.g. -20 as root: the "
        "measurement then competes with its own busy loops, hardly with other jobs)",
    )
    ap.add_argument(
        "--realtime",
        action="store_true",
        help="also time each setup idle as a real-time process (root; the idle speed on a busy "
        "machine)",
    )
    ap.add_argument("--realtime-only", action="store_true", help="only the real-time idle check")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--project", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, help="timed steps per child (default 6 quick, 15)")
    ap.add_argument(
        "--workload",
        choices=("step", "world", "train_stage"),
        default="step",
        help="what each child times (see the module docstring)",
    )
    ap.add_argument("--run", help="train_stage: a demo run dir with a selection (copied once)")
    ap.add_argument("--world", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        if args.world:
            child_world(args.steps or 15)
        else:
            child(args.steps or 15, args.project)
        return
    WORKLOAD["name"] = args.workload
    if args.workload == "train_stage":
        if not args.run or not (Path(args.run) / "selected").is_dir():
            ap.error("--workload train_stage needs --run DIR, a demo run with a selection")
        import shutil
        import tempfile

        tmp = Path(tempfile.mkdtemp(prefix="bench_threads_"))
        WORKLOAD["run"] = tmp / "run"
        shutil.copytree(args.run, WORKLOAD["run"], ignore=shutil.ignore_patterns("checkpoints"))
    if args.nice:
        os.setpriority(os.PRIO_PROCESS, 0, args.nice)  # inherited by every child
    setups = (args.setups or ("default,project" if args.quick else ",".join(SETUPS))).split(",")
    if unknown := set(setups) - set(SETUPS):
        ap.error(f"unknown setups {sorted(unknown)}; known: {', '.join(SETUPS)}")
    res = {} if args.realtime_only else bench(args.quick, setups, args.repeats, args.steps)
    res["threads.nice"] = args.nice
    if args.realtime or args.realtime_only:
        res.update(
            idle_realtime(setups, args.steps or (6 if args.quick else 15), args.repeats or 3)
        )
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))
    print(json.dumps({k: v for k, v in res.items() if k != "threads.times"}, indent=1))


if __name__ == "__main__":
    main()
