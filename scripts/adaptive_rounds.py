"""Adaptive (staleness-triggered) rounds against the fixed ``pipeline.rounds=2`` schedule.

    python scripts/adaptive_rounds.py --world runs/world --out runs/adaptive_rounds --seed 0

Two runs of the ``demo`` experiment on the demo world, same seed and recipe except the schedule,
each in its own run dir (nothing shared, so each pays its own rollouts and scores):

* ``fixed``: ``pipeline.rounds=2`` (round 2 rolls out afresh from round 1's checkpoint);
* ``adaptive``: ``pipeline.adaptive.max_rounds=--max-rounds``: after each round's training, a new
  round starts only when |``--metric``| (mean of the last ``--window`` logged trainer rows)
  >= ``--threshold`` (``stages.pipeline.decide``; the decisions land in ``rounds.json``).

Each round trains ``--epochs`` epochs. Every stage call is timed here (so rollout and score seconds
are known per round for both runs). Then, from the adaptive run's logged metrics, the rounds other
thresholds would have taken (pure ``decide`` on the same rows; valid because round r only depends
on round r-1). Writes ``<out>/results.json``: per run the rounds taken, rollout + score seconds,
total seconds, the final checkpoint's accuracies, the commands. ``--quick``: a tiny world, 1 epoch.
"""

from __future__ import annotations

import argparse
import json
import os
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


class StageClock:
    """Wraps ``pipeline.run_stage``: (stage, run_dir, seconds) of every stage call."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, float]] = []
        self._orig = pipeline.run_stage

    def __enter__(self) -> StageClock:
        def timed(name: str, cfg: Any) -> dict:
            t = time.time()
            out = self._orig(name, cfg)
            self.calls.append((name, str(cfg.run_dir), time.time() - t))
            return out

        pipeline.run_stage = timed
        return self

    def __exit__(self, *exc: object) -> None:
        pipeline.run_stage = self._orig


def per_round(calls: list[tuple[str, str, float]], root: Path) -> dict[int, dict[str, float]]:
    """round -> stage -> seconds (round 1 = the run dir itself, r = run_dir/round<r>)."""
    out: dict[int, dict[str, float]] = {}
    for stage, rd, s in calls:
        if stage == "eval":
            continue
        name = Path(rd).name
        r = int(name[5:]) if Path(rd) != root and name.startswith("round") else 1
        out.setdefault(r, {})[stage] = round(out.get(r, {}).get(stage, 0.0) + s, 1)
    return out


def run_one(label: str, ovs: list[str], root: Path) -> dict:
    cfg = compose("pipeline", ovs)
    t0 = time.time()
    with StageClock() as clock:
        pipeline.run(cfg)
    total = time.time() - t0
    rounds = per_round(clock.calls, root)
    res = json.loads(RunLayout.of(cfg.run_dir).eval_results.read_text())["results"]
    last = max(rounds)
    final = NAME if last == 1 else f"{NAME}-r{last}"
    acc = {ck: {s: v["accuracy"] for s, v in sets.items() if s in SETS} for ck, sets in res.items()}
    return {
        "command": "OMP_NUM_THREADS=1 python -m stages.pipeline "
        + " ".join("'" + o.replace("'", "'\\''") + "'" for o in ovs),
        "rounds_taken": last,
        "seconds_per_round": rounds,
        "rollout_plus_score_s": round(
            sum(v.get("rollout", 0) + v.get("score", 0) for v in rounds.values()), 1
        ),
        "total_s": round(total, 1),
        "final_checkpoint": final,
        "final_accuracy": acc.get(final),
        "accuracy": acc,
    }


def what_if(root: Path, metric: str, window: int, thresholds: list[float], max_rounds: int) -> dict:
    """The rounds each threshold would take, from the adaptive run's own logged rows."""
    vals = {}
    for r in range(1, max_rounds + 1):
        lay = RunLayout.of(root if r == 1 else root / f"round{r}")
        path = lay.train(NAME if r == 1 else f"{NAME}-r{r}") / "metrics.jsonl"
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
    doc["fixed"] = run_one("fixed", fixed, out / "fixed")
    doc["adaptive"] = run_one("adaptive", adaptive, out / "adaptive")
    doc["adaptive"]["rounds_json"] = json.loads(
        RunLayout.of(out / "adaptive").round_decisions.read_text()
    )
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
