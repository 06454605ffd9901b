"""Adaptive (staleness-triggered) rounds against the fixed ``pipeline.rounds=2`` schedule.

    python scripts/adaptive_rounds.py --world runs/world --out runs/adaptive_rounds --seed 0

Two runs of the ``demo`` experiment on the demo world, same seed and recipe except the schedule:

* ``fixed``: ``pipeline.rounds=2`` (round 2 rolls out afresh from round 1's checkpoint);
* ``adaptive``: ``pipeline.adaptive.max_rounds=--max-rounds``: after each round's training, a new
  round starts only when |``--metric``| (mean of the last ``--window`` logged trainer rows)
  >= ``--threshold`` (``stages.pipeline.decide``; the decisions land in ``rounds.json``).

Each round trains ``--epochs`` epochs. Round r depends only on round r-1 (same configs, same
seeds), so the adaptive run dir is seeded with the fixed run's round 1 (and round 2 when round 1's
decision fires): its stages verify the dataset ids and skip them, and only the rounds the fixed
schedule did not run cost anything new; a shared round is costed at what it took in the fixed
run. Each pipeline runs as ``python -m stages.pipeline`` with its output in ``<out>/<run>.log``;
the per-round stage seconds are the pipeline's own "=== <stage> done in Xs ===" lines. Then, from
the adaptive run's logged metrics, the rounds other thresholds would have taken (pure ``decide``
on the same rows). Writes ``<out>/results.json``: per run the rounds taken, rollout + score
seconds, total stage seconds, the final checkpoint's accuracies, the commands. ``--quick``: a
tiny world, 1 epoch.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
for p in (REPO, REPO / "scripts"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from demoworld import world as W  # noqa: E402

from stages import pipeline  # noqa: E402
from stages.lib.config import compose  # noqa: E402
from stages.lib.layout import RunLayout  # noqa: E402

SETS = ["private_closed", "private_paraphrase", "public_closed", "reading"]
NAME = "edge"  # train.name of round 1 (later rounds: edge-r2, edge-r3)


def common(world: Path, run_dir: Path, seed: int, epochs: int) -> list[str]:
    base = world / "models" / "base"
    return [
        "experiment=demo",
        f"run_dir={run_dir}",
        f"seed={seed}",
        f"data.prompts={world / 'prompts' / 'train_mix.parquet'}",
        *[f"data.eval_sets.{s}={world / 'prompts' / (s + '.parquet')}" for s in SETS],
        f"student.path={base}",
        f"teacher.path={base}",
        f"ref.path={base}",
        f"train.epochs={epochs}",
        f"train.name={NAME}",
        "pipeline.stages=[rollout,score,select,train,eval]",
    ]


STAGE_DONE = re.compile(r"^=== (\w+) done in ([\d.]+)s ===")
ROUND_STEP = re.compile(r"^--- round (\d+)\??: (\w+) ")


def stage_seconds(log: Path) -> dict[int, dict[str, float]]:
    """round -> stage -> seconds, from the pipeline's own "=== <stage> done in Xs ===" lines
    (round r >= 2 steps follow a "--- round r: <stage>" header). A stage run in several calls of
    the same run dir (a resumed run) counts with its longest time: a reused stage takes ~0 s."""
    out: dict[int, dict[str, float]] = {}
    pending: tuple[int, str] | None = None
    for line in log.read_text(errors="replace").splitlines():
        if m := ROUND_STEP.match(line):
            pending = (int(m[1]), m[2])
        elif m := STAGE_DONE.match(line):
            stage, sec = m[1], float(m[2])
            r = pending[0] if pending and pending[1] == stage else 1
            pending = None
            if stage != "eval":
                out.setdefault(r, {})[stage] = max(out.get(r, {}).get(stage, 0.0), sec)
    return out


def run_pipeline(ovs: list[str], log: Path) -> float:
    """``python -m stages.pipeline <ovs>`` with its output appended to ``log``; wall seconds."""
    t0 = time.time()
    with open(log, "a") as fh:
        fh.write(f"\n# {time.strftime('%H:%M:%S')} {shell_line(ovs)}\n")
        fh.flush()
        cmd = [sys.executable, "-m", "stages.pipeline", *ovs]
        rc = subprocess.run(cmd, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT).returncode
    if rc:
        raise SystemExit(f"pipeline failed (exit {rc}); see {log}")
    return time.time() - t0


def shell_line(ovs: list[str]) -> str:
    return "OMP_NUM_THREADS=1 python -m stages.pipeline " + " ".join(
        "'" + o.replace("'", "'\\''") + "'" for o in ovs
    )


def summary(ovs: list[str], root: Path, rounds: dict[int, dict[str, float]], wall: float) -> dict:
    cfg = compose("pipeline", ovs)
    res = json.loads(RunLayout.of(cfg.run_dir).eval_results.read_text())["results"]
    last = max(r for r in rounds if "train" in rounds[r])
    final = NAME if last == 1 else f"{NAME}-r{last}"
    acc = {ck: {s: v["accuracy"] for s, v in sets.items() if s in SETS} for ck, sets in res.items()}
    rs = {r: round(v.get("rollout", 0) + v.get("score", 0), 1) for r, v in rounds.items()}
    return {
        "command": shell_line(ovs),
        "rounds_taken": last,
        "seconds_per_round": rounds,
        "rollout_plus_score_s": round(sum(rs.values()), 1),
        "total_s": round(sum(sum(v.values()) for v in rounds.values()), 1),
        "wall_s_this_call": round(wall, 1),
        "final_checkpoint": final,
        "final_accuracy": acc.get(final),
        "accuracy": acc,
    }


ROUND1 = ("rollouts", "tokens", "selected", f"checkpoints/{NAME}", f"train/{NAME}")


def share_rounds(fixed: Path, adaptive: Path, args: argparse.Namespace) -> list[int]:
    """Seed the adaptive run dir with the fixed run's rounds that it would run identically (same
    configs and seeds): round 1 always, round 2 when round 1's decision fires. The stages then
    check the dataset ids and skip them. Returns the shared rounds."""
    shared = [1]
    for rel in ROUND1:
        if not (adaptive / rel).exists():
            shutil.copytree(fixed / rel, adaptive / rel)
    rows = pipeline.read_metrics(RunLayout.of(fixed).metrics(NAME))
    fired, _ = pipeline.decide(rows, args.metric, args.threshold, args.window, "round 1")
    if fired and args.max_rounds >= 2 and (fixed / "round2").is_dir():
        if not (adaptive / "round2").exists():
            shutil.copytree(fixed / "round2", adaptive / "round2")
        shared.append(2)
    return shared


def what_if(root: Path, metric: str, window: int, thresholds: list[float], max_rounds: int) -> dict:
    """The rounds each threshold would take, from the adaptive run's own logged rows."""
    vals = {}
    for r in range(1, max_rounds + 1):
        lay = RunLayout.of(root if r == 1 else root / f"round{r}")
        path = lay.metrics(NAME if r == 1 else f"{NAME}-r{r}")
        if path.is_file():
            rows = pipeline.read_metrics(path)
            vals[r] = pipeline.decide(rows, metric, 0.0, window, str(path))[1]
    out: dict[str, Any] = {}
    for t in thresholds:
        r = 1
        while r < max_rounds and r in vals and abs(vals[r]) >= t:
            r += 1
        # a round that this run did not reach: its metric (and so any later decision) is unknown
        out[str(t)] = r if r in vals else f">= {r} (round {r} was not run here)"
    return {"metric_per_round": vals, "rounds_at_threshold": out}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--world", type=Path, default=Path("runs/world"))
    ap.add_argument("--out", type=Path, default=Path("runs/adaptive_rounds"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=4, help="epochs per round")
    ap.add_argument("--metric", default="staleness", choices=list(pipeline.ADAPTIVE_METRICS))
    ap.add_argument("--threshold", type=float, default=0.05)
    ap.add_argument("--window", type=int, default=4)
    ap.add_argument("--max-rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="tiny world, 1 epoch (smoke test)")
    args = ap.parse_args(argv)
    out, world = args.out.resolve(), args.world.resolve()
    if args.quick:
        world = out / "world"
        W.build_world(world, W.WorldSettings.quick())
        args.epochs = 1
    doc: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}}
    doc["command"] = "python scripts/adaptive_rounds.py " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    fixed = common(world, out / "fixed", args.seed, args.epochs) + ["pipeline.rounds=2"]
    adaptive = common(world, out / "adaptive", args.seed, args.epochs) + [
        f"pipeline.adaptive.metric={args.metric}",
        f"pipeline.adaptive.threshold={args.threshold}",
        f"pipeline.adaptive.window={args.window}",
        f"pipeline.adaptive.max_rounds={args.max_rounds}",
    ]
    fixed_dir, ad_dir = out / "fixed", out / "adaptive"
    wall = run_pipeline(fixed, out / "fixed.log")
    fixed_rounds = stage_seconds(out / "fixed.log")
    doc["fixed"] = summary(fixed, fixed_dir, fixed_rounds, wall)
    ad_dir.mkdir(parents=True, exist_ok=True)
    shared = share_rounds(fixed_dir, ad_dir, args)
    wall = run_pipeline(adaptive, out / "adaptive.log")
    ad_rounds = stage_seconds(out / "adaptive.log")
    decided = json.loads(RunLayout.of(ad_dir).round_decisions.read_text())
    ran = [1] + [e["next_round"] for e in decided["rounds"] if e["next_round"]]
    # a shared round's cost is what it took in the fixed run (the same work, done once)
    rounds = {r: fixed_rounds[r] if r in shared else ad_rounds.get(r, {}) for r in ran}
    doc["adaptive"] = summary(adaptive, ad_dir, rounds, wall)
    doc["adaptive"]["shared_with_fixed"] = shared
    doc["adaptive"]["rounds_json"] = decided
    doc["what_if"] = what_if(
        out / "adaptive",
        args.metric,
        args.window,
        [0.01, 0.02, 0.05, 0.1, 0.2, 0.5],
        args.max_rounds,
    )
    (out / "results.json").write_text(json.dumps(doc, indent=1) + "\n")
    for k in ("fixed", "adaptive"):
        d = doc[k]
        print(
            f"{k}: rounds {d['rounds_taken']}, rollout+score {d['rollout_plus_score_s']} s, "
            f"total {d['total_s']} s, final {d['final_checkpoint']} {d['final_accuracy']}"
        )
    print(json.dumps(doc["what_if"], indent=1))
    print(f"wrote {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
