"""The `demo` recipe on several world builds x training seeds, with its worst run.

    python scripts/demo_matrix.py --worlds runs/w0 runs/w1 runs/w2 --seeds 0 1 2 \
        --out runs/matrix [--jobs 3] [--summary-only]

Each world is a ``scripts/make_demo.py --out DIR`` build (any seed, thread count or kernel path).
Each (world, seed) runs what ``make demo`` runs, with the world's paths: ``stages.pipeline
experiment=demo seed=S`` up to train, ``scripts/demo_choose.py``, then eval and report, in
``<out>/<world name>_s<S>/`` (log: ``run.log`` there); a re-run resumes what is done. ``--jobs``
(world, seed) pairs run side by side, each at ``OMP_NUM_THREADS=1``. Then one table: every run's
accuracy on the four eval sets, the base's, the goal's verdict per run, mean +- std and the worst
run per criterion; written to ``<out>/summary.json`` and printed (markdown).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import demo_verdict  # noqa: E402

PY = sys.executable
NAME = "topk_fkl-evidence_retain"  # train.name of the `demo` experiment
SETS = demo_verdict.SETS


def overrides(world: Path, run_dir: Path, seed: int) -> list[str]:
    """The `demo` experiment pointed at one world's files and one run dir."""
    m, p = world / "models" / "base", world / "prompts"
    out = [
        "experiment=demo",
        f"seed={seed}",
        f"run_dir={run_dir}",
        f"data.prompts={p}/train_fit.parquet",
    ]
    out += [f"{r}.path={m}" for r in ("student", "teacher", "ref")]
    return out + [f"data.eval_sets.{s}={p}/{s}.parquet" for s in SETS]


def commands(world: Path, run_dir: Path, seed: int) -> list[list[str]]:
    o = overrides(world, run_dir, seed)
    pipe = [PY, "-m", "stages.pipeline", *o]
    return [
        pipe + ["pipeline.stages=[rollout,score,select,train]"],
        [
            PY,
            str(REPO / "scripts" / "demo_choose.py"),
            "--run-dir",
            str(run_dir),
            "--world",
            str(world),
        ],
        pipe + ["pipeline.stages=[eval,report]", f"eval.checkpoints=[base,{NAME}-val]"],
    ]


def run_one(world: Path, seed: int, out: Path) -> Path:
    run_dir = out / f"{world.name}_s{seed}"
    run_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    with open(run_dir / "run.log", "a") as log:
        for cmd in commands(world, run_dir, seed):
            log.write("$ " + " ".join(cmd) + "\n")
            log.flush()
            subprocess.run(cmd, check=True, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    return run_dir


def collect(worlds: list[Path], seeds: list[int], out: Path) -> dict:
    """Every finished run's base and chosen accuracies (%) and verdicts."""
    runs = []
    for w in worlds:
        for s in seeds:
            path = out / f"{w.name}_s{s}" / "eval" / "results.json"
            if not path.is_file():
                continue
            acc = demo_verdict.load(path.parent.parent)
            if f"{NAME}-val" not in acc:
                continue
            base, run = acc["base"], acc[f"{NAME}-val"]
            verdicts = {
                c.set_name: demo_verdict.verdict(c, base[c.set_name], run[c.set_name])[0]
                for c in demo_verdict.GOAL
            }
            runs.append(
                {
                    "world": w.name,
                    "seed": s,
                    "base": base,
                    "chosen": run,
                    "final": acc.get(NAME),
                    "drop": {k: base[k] - run[k] for k in ("public_closed", "reading")},
                    "met": verdicts,
                    "all_met": all(verdicts.values()),
                }
            )
    return {"runs": runs, "planned": len(worlds) * len(seeds)}


def fmt(xs: list[float]) -> str:
    return (
        f"{statistics.mean(xs):.1f} ± {statistics.stdev(xs):.1f}" if len(xs) > 1 else f"{xs[0]:.1f}"
    )


def markdown(summary: dict) -> str:
    runs = summary["runs"]
    head = "| world | seed | " + " | ".join(SETS) + " | base private / public / reading | goal |"
    lines = [head, "|---" * 8 + "|"]
    for r in runs:
        cells = " | ".join(f"{r['chosen'][s]:.1f}" for s in SETS)
        b = r["base"]
        base = f"{b['private_closed']:.1f} / {b['public_closed']:.1f} / {b['reading']:.1f}"
        miss = [k for k, v in r["met"].items() if not v]
        lines.append(
            f"| {r['world']} | {r['seed']} | {cells} | {base} | {'met' if not miss else 'missed: ' + ', '.join(miss)} |"
        )
    if runs:
        lines.append(
            "| mean ± std | | "
            + " | ".join(fmt([r["chosen"][s] for r in runs]) for s in SETS)
            + " | | |"
        )
        worst_p = min(runs, key=lambda r: r["chosen"]["private_closed"])
        worst_r = max(runs, key=lambda r: r["drop"]["reading"])
        worst_u = max(runs, key=lambda r: r["drop"]["public_closed"])
        lines.append(
            f"\nWorst run: private_closed {worst_p['chosen']['private_closed']:.1f} % ({worst_p['world']} seed {worst_p['seed']}); "
            f"reading {-worst_r['drop']['reading']:+.1f} points ({worst_r['world']} seed {worst_r['seed']}); "
            f"public {-worst_u['drop']['public_closed']:+.1f} points ({worst_u['world']} seed {worst_u['seed']}). "
            f"Goal met on {sum(r['all_met'] for r in runs)} of {len(runs)} runs ({summary['planned']} planned)."
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--worlds", nargs="+", required=True, type=Path)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--out", type=Path, default=Path("runs/matrix"))
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--summary-only", action="store_true", help="only collect finished runs")
    args = ap.parse_args(argv)
    out = args.out.resolve()
    worlds = [w.resolve() for w in args.worlds]
    for w in worlds:
        if not (w / "prompts" / "val.parquet").is_file():
            print(
                f"error: no demo world with a validation split ({w}). Fix: python scripts/make_demo.py --out {w}",
                file=sys.stderr,
            )
            return 2
    if not args.summary_only:
        pairs = [(w, s) for s in args.seeds for w in worlds]
        with ThreadPoolExecutor(args.jobs) as ex:
            for f in [ex.submit(run_one, w, s, out) for w, s in pairs]:
                try:
                    print(f"done: {f.result()}", flush=True)
                except subprocess.CalledProcessError as e:
                    print(f"failed: {e.cmd[:3]} (see run.log)", flush=True)
    summary = collect(worlds, args.seeds, out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(markdown(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
