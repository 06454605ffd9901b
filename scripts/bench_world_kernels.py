"""What portable (bit-reproducible) kernels cost the demo world's build, as ratios taken in one run.

    python scripts/bench_world_kernels.py --out runs/bench_world_kernels.json [--steps 30] [--reps 2]

Each setting runs ``--steps`` pretraining steps of the full-size demo base (scripts/demoworld) in a
fresh process (torch and MKL read their kernel settings once, at start), at ``--threads`` threads,
the settings alternated ``--reps`` times so that a change of machine load hits them alike. Settings:
``native`` (this CPU's fastest kernels), ``portable`` (``make_demo.py --kernels portable``: torch's
AVX2 kernels + MKL_CBWR=COMPATIBLE), and ``avx2_cbwr_avx2`` (torch AVX2 + MKL_CBWR=AVX2, whose
reproducibility MKL promises on Intel CPUs only). Writes seconds per step (median over reps) and
each setting's ratio to ``native``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SETTINGS = {
    "native": {},
    "portable": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "COMPATIBLE"},
    "avx2_cbwr_avx2": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2"},
}

CHILD = """
import dataclasses, sys, time, torch
sys.path.insert(0, {scripts!r})
from demoworld import world as W
torch.set_num_threads({threads})
s = W.WorldSettings(); w = W.make_world(s); tok = W.make_tokenizer(W.vocabulary(w))
m = W.make_model(s.base, tok, 1)
W.pretrain(m, tok, w, dataclasses.replace(s.base, steps=3, warmup=1), 1)  # warm-up
ms = dataclasses.replace(s.base, steps={steps}, warmup=5)
t = time.perf_counter(); W.pretrain(m, tok, w, ms, 1)
print((time.perf_counter() - t) / ms.steps, torch.backends.cpu.get_cpu_capability())
"""


def one(name: str, steps: int, threads: int) -> tuple[float, str]:
    code = CHILD.format(scripts=str(REPO / "scripts"), threads=threads, steps=steps)
    env = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "MKL_CBWR")}
    env |= {**SETTINGS[name], "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True
    ).stdout.split()
    return float(out[0]), out[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", default="runs/bench_world_kernels.json")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    runs: dict[str, list[float]] = {k: [] for k in SETTINGS}
    caps: dict[str, str] = {}
    for _ in range(args.reps):
        for name in SETTINGS:
            secs, caps[name] = one(name, args.steps, args.threads)
            runs[name].append(secs)
            print(f"{name}: {secs:.3f} s/step ({caps[name]})", flush=True)
    med = {k: statistics.median(v) for k, v in runs.items()}
    doc = {
        "steps": args.steps,
        "threads": args.threads,
        "load_avg": os.getloadavg(),
        "s_per_step": runs,
        "median_s_per_step": med,
        "ratio_to_native": {k: round(v / med["native"], 2) for k, v in med.items()},
        "torch_capability": caps,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(doc["ratio_to_native"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
