"""The seed papers' claims on the chat demo world: several seeds, one command, one table.

    python scripts/claims.py --world runs/world --root runs/claims --seeds 0 1 2
    python scripts/claims.py --seeds 0 1 2 --report --out docs/RESULTS.md  # tabulate, train none
    python scripts/claims.py --groups online,edge --seeds 0 --dry     # compose only, run nothing

Every row trains with the `demo` experiment as it is (its train settings: lr, warmup, epochs,
selection, loss), on the cached rollouts and teacher log-probs of its run dir, and is evaluated
at its ``final`` checkpoint (the same number of optimizer steps for every row). Groups, run in
this order (a call with several seeds runs a group for every seed before the next group):

* ``online`` (Lightning OPD's headline): offline OPD, the demo itself (one rollout + scoring pass,
  ``train.epochs`` passes over it) against online OPD: R rounds (default R = ``train.epochs``:
  one epoch per round), each with fresh rollouts from the current student scored by a live
  teacher pass, ``train.epochs / R`` epochs each (the same total optimizer steps; round 1 shares
  the offline row's rollouts), the demo's one lr schedule split over the rounds
  (``round_schedule``). Each round is a training of its own (fresh Adam state).
* ``rounds`` (what separates the two): online OPD as ``pipeline.rounds`` runs it (the warmup and
  cosine restart every round), and two controls that train the same rounds on the offline
  rollouts, without fresh data: with the restarted and with the split schedule.
* ``edge`` (EDGE-OPD): guided vs unguided rollouts (``rollout.guided_fraction`` 0.5 vs 0), each
  with the top-K loss (``topk_fkl``, the demo; the guided one is the offline row) and the
  sampled-token loss (``opd_k1``).
* ``tip`` (TIP): ``select=entropy_half`` (50 % of tokens, sampled by entropy) vs ``select=all``,
  both on the demo's guided cache with its loss.

Compute: every rollout, scoring, selection and training call is timed in process CPU seconds
(``time.process_time``: every thread of this process) into ``<run_dir>/cpu.json``; a row's
compute is the sum over the calls it needs (its cache's rollout + score, its select + train; the
online row: all of its rounds). A re-run skips finished work (the stages resume); a call killed
before it completes is not recorded, and its work's rerun then counts only what was left.
Writes ``<root>/claims.json`` (every number) and ``<root>/claims.md`` (the table: mean ± std over
seeds, then the per-seed values); ``--report`` tabulates the finished rows without training,
``--out FILE`` also replaces FILE's ``claims-table`` block.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for p in (REPO, REPO / "scripts"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import demo_matrix  # noqa: E402
from results_table import SETS  # noqa: E402

from stages import eval as eval_stage  # noqa: E402
from stages import rollout, score, select, train  # noqa: E402
from stages.lib.config import Config, compose, derive, round_config  # noqa: E402
from stages.lib.config.compose import round_name  # noqa: E402
from stages.lib.layout import RunLayout  # noqa: E402
from stages.lib.store import atomic_write_text, file_lock  # noqa: E402

# A row's training: overrides of the demo config, or rounds of epochs / R epochs each, every round
# a training of its own from the previous round's final weights: with fresh rollouts scored by the
# teacher (ONLINE, the pipeline's rounds), or on the round-1 rollouts again (RESTARTS: the same
# schedule restarts and optimizer resets as ONLINE, without fresh data).
# ONLINE_SCHEDULE: ONLINE with the demo's one schedule split over the rounds (round r starts at the
# lr the cosine has at (r-1)/R of the run and ends at its lr at r/R; the warmup once, then a
# RESET_WARMUP-step warmup after each round's fresh optimizer).
ONLINE, RESTARTS, ONLINE_SCHEDULE = "online", "restarts", "online_schedule"
RESTARTS_SCHEDULE = "restarts_schedule"  # RESTARTS with ONLINE_SCHEDULE's split schedule
SPLIT = (ONLINE_SCHEDULE, RESTARTS_SCHEDULE)
RESET_WARMUP = 5
# (group, row label, run-dir kind, train name, its training)
ROWS = [
    ("online", "offline OPD (the demo: 1 rollout + scoring pass)", "guided", "offline", []),
    (
        "online",
        "online OPD: fresh rollouts + teacher pass every round, the demo's lr schedule split",
        "sched",  # its own run dir: the rounds row's round dirs hold that row's rollouts
        "online_sched",
        ONLINE_SCHEDULE,
    ),
    (
        "rounds",
        "online OPD as pipeline.rounds (schedule restarts per round)",
        "guided",
        "online",
        ONLINE,
    ),
    (
        "rounds",
        "control: the same restarts on the offline rollouts",
        "guided",
        "restarts",
        RESTARTS,
    ),
    (
        "rounds",
        "control: the split schedule's rounds on the offline rollouts",
        "guided",
        "restarts_sched",
        RESTARTS_SCHEDULE,
    ),
    ("edge", "EDGE: guided rollouts, topk_fkl (= offline OPD)", "guided", "offline", []),
    ("edge", "EDGE: unguided rollouts, topk_fkl", "unguided", "topk", []),
    ("edge", "EDGE: guided rollouts, opd_k1", "guided", "opd_k1", ["loss=opd_k1"]),
    ("edge", "EDGE: unguided rollouts, opd_k1", "unguided", "opd_k1", ["loss=opd_k1"]),
    ("tip", "TIP: all tokens", "guided", "all", ["select=all"]),
    ("tip", "TIP: 50 % of tokens by entropy", "guided", "tip50", ["select=entropy_half"]),
]
GROUPS = ["online", "rounds", "edge", "tip"]


def demo_config(kind: str, seed: int, root: Path, world: Path) -> Config:
    """The `demo` experiment on ``world``: the run dir whose rollouts + scores rows share."""
    ov = demo_matrix.overrides(world, root / f"seed{seed}" / kind, seed) + [
        "train.shuffle=true",  # rows shuffled, as the demo did when these runs began (main d9fc6d4)
    ]
    if kind == "unguided":
        ov.append("rollout.guided_fraction=0")
    return compose("pipeline", ov)


def online_rounds(epochs: int, rounds: int) -> list[str]:
    """``rounds`` rounds of ``epochs / rounds`` epochs: the offline row's optimizer steps (0: one
    round per epoch, each with its own warmup + cosine, as every round of ``pipeline.rounds``)."""
    rounds = rounds or epochs
    if rounds < 1 or epochs % rounds:
        raise SystemExit(f"error: --rounds {rounds} must divide train.epochs {epochs}")
    return [f"pipeline.rounds={rounds}", f"train.epochs={epochs // rounds}"]


def row_config(cfg: Config, name: str, extra: list[str] | str, rounds: int) -> Config:
    """A row's select + train config: the demo's plus the row's overrides and its train.name."""
    ov = online_rounds(cfg.train.epochs, rounds) if isinstance(extra, str) else extra
    if extra in SPLIT:
        ov += round_schedule(cfg.train, 1, rounds or cfg.train.epochs)
    return derive(cfg, [*ov, f"train.name={name}"], f"claims row {name}")


def round_schedule(tc, r: int, rounds: int) -> list[str]:
    """Round ``r``'s slice of the run's cosine (``tc``: the demo's train config)."""

    def f(p: float) -> float:  # the cosine's lr factor at progress p of the whole run
        return tc.min_lr_ratio + (1 - tc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p))

    a, b = f((r - 1) / rounds), f(r / rounds)
    warmup = tc.warmup_steps if r == 1 else RESET_WARMUP
    return [
        f"train.lr={tc.lr * a:.6g}",
        f"train.min_lr_ratio={b / a:.6g}",
        f"train.warmup_steps={warmup}",
    ]


class Ledger:
    """Process CPU seconds of each stage call, kept in ``<run_dir>/cpu.json``: the first call that
    completes is the work's cost; a later call (another row on the same cache) only finds it
    done, and its few seconds of loading are not added."""

    def __init__(self, run_dir: str, execute: bool = True):
        self.path = Path(run_dir) / "cpu.json"
        self.cpu = json.loads(self.path.read_text()) if self.path.is_file() else {}
        self.execute = execute  # False: walk a row's calls without running them (--report)

    def run(self, key: str, stage, cfg: Config):
        if not self.execute:
            return None
        if key in self.cpu:
            return stage.run(cfg)
        t = time.process_time()
        out = stage.run(cfg)
        self.record(key, time.process_time() - t)
        return out

    def record(self, key: str, seconds: float) -> None:
        """Add one entry: re-read under a lock, so claims processes sharing a run dir (seeds run
        side by side, a control beside a group) never drop each other's entries."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with file_lock(self.path.with_name("cpu.json.lock"), "the CPU ledger"):
            on_disk = json.loads(self.path.read_text()) if self.path.is_file() else {}
            self.cpu = {**on_disk, **self.cpu, key: seconds}
            atomic_write_text(self.path, json.dumps(self.cpu, indent=1, sort_keys=True))


def train_row(cfg: Config, led: Ledger, r: int = 1) -> list[str]:
    """One select + train (round ``r`` of a run dir); its ledger keys."""
    pre = "" if r == 1 else f"round{r}/"
    keys = [f"{pre}select/{cfg.select.name}", f"{pre}train/{cfg.train.name}"]
    led.run(keys[0], select, cfg)
    led.run(keys[1], train, cfg)
    return keys


def ensure_row(cfg: Config, rcfg: Config, led: Ledger, how) -> tuple[str, list[str]]:
    """Run one row (its cache first); (its eval checkpoint name, the ledger keys it costs)."""
    keys = ["rollout", "score"]
    led.run("rollout", rollout, cfg)
    led.run("score", score, cfg)
    keys += train_row(rcfg, led)
    name, rounds = rcfg.train.name, rcfg.pipeline.rounds
    for r in range(2, rounds + 1 if isinstance(how, str) else 0):
        if how in (ONLINE, ONLINE_SCHEDULE):  # fresh rollouts from round r-1's weights, scored
            c = round_config(rcfg, r)  # by the teacher
            if how == ONLINE_SCHEDULE:
                c = derive(c, round_schedule(cfg.train, r, rounds), "claims round schedule")
            led.run(f"round{r}/rollout", rollout, c)
            led.run(f"round{r}/score", score, c)
            keys += [f"round{r}/rollout", f"round{r}/score", *train_row(c, led, r)]
        else:  # RESTARTS: the same cached selection, from round r-1's weights
            prev = RunLayout.of(rcfg.run_dir).final(round_name(name, r - 1))
            ov = [f"train.name={round_name(name, r)}", f"train.init={prev}"]
            ov += round_schedule(cfg.train, r, rounds) if how in SPLIT else []
            c = derive(rcfg, ov, "claims")
            keys.append(f"train/{c.train.name}")
            led.run(keys[-1], train, c)
    return round_name(name, rounds), keys


def fmt(vals: list[float], scale: float = 100.0, digits: int = 1) -> str:
    if not vals:
        return "-"
    m = f"{scale * statistics.mean(vals):.{digits}f}"
    return m if len(vals) == 1 else f"{m} ± {scale * statistics.stdev(vals):.{digits}f}"


def table(rows: dict, seeds: list[int], command: str) -> str:
    """Mean ± std per row, then the per-seed values; every number from ``command``."""
    head = ["claim / row", *SETS, "CPU s", "seeds"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    per = ["| row | seed | " + " | ".join(SETS) + " | CPU s |", "|---" * (len(SETS) + 3) + "|"]
    for label, row in rows.items():
        acc = {s: [row["seeds"][k][s] for k in sorted(row["seeds"])] for s in SETS}
        cpu = [row["seeds"][k]["cpu_s"] for k in sorted(row["seeds"])]
        cells = [fmt(acc[s]) for s in SETS] + [fmt(cpu, 1.0, 0), str(len(cpu))]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
        for k in sorted(row["seeds"]):
            v = row["seeds"][k]
            cells = [f"{100 * v[s]:.1f}" for s in SETS] + [f"{v['cpu_s']:.0f}"]
            per.append(f"| {label} | {k} | " + " | ".join(cells) + " |")
    return (
        f"Greedy accuracy (%) at the final checkpoint, mean ± std over seeds; CPU s = process CPU "
        f"seconds of the row's rollouts, teacher scoring, selection and training. Command: "
        f"`{command}`.\n\n" + "\n".join(lines) + "\n\nPer seed:\n\n" + "\n".join(per) + "\n"
    )


def dry_line(seed: int, kind: str, name: str, c: Config) -> str:
    return (
        f"seed {seed} {kind:8s} {name:8s} rounds={c.pipeline.rounds} epochs={c.train.epochs} "
        f"select={c.select.name} loss={c.loss.name} guided={c.rollout.guided_fraction} {c.run_dir}"
    )


def one_row(cfg: Config, rcfg: Config, how, report: bool) -> dict | None:
    """Run (or with ``report`` only read) one row: its accuracies, the base's, and its CPU s."""
    led = Ledger(cfg.run_dir, execute=not report)
    ckpt, keys = ensure_row(cfg, rcfg, led, how)
    done = RunLayout.of(cfg.run_dir).final(ckpt).is_dir() or any(
        RunLayout.of(cfg.run_dir).root.glob(f"round*/checkpoints/{ckpt}/final")
    )
    if not done or any(k not in led.cpu for k in keys):
        return None  # --report: a row still running (or not started)
    res = eval_stage.run(derive(cfg, [f"eval.checkpoints=[base,{ckpt}]"], "claims eval"))
    v = {s: res[ckpt][s]["accuracy"] for s in SETS}
    v["cpu_s"] = sum(led.cpu[k] for k in keys)
    v["cpu_parts"] = {k: round(led.cpu[k], 1) for k in keys}
    return {"row": v, "base": {s: res["base"][s]["accuracy"] for s in SETS}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--world", default="runs/world", help="demo world dir (make_demo.py --out)")
    ap.add_argument("--root", default="runs/claims", help="where the run dirs go")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--groups", default=",".join(GROUPS), help="subset of " + ",".join(GROUPS))
    ap.add_argument(
        "--rounds",
        type=int,
        default=0,
        help="online rounds (divide train.epochs; 0 = one an epoch)",
    )
    ap.add_argument(
        "--names",
        default=None,
        help="only the rows of these train names (comma-separated, e.g. restarts_sched)",
    )
    ap.add_argument("--dry", action="store_true", help="compose every row's config, run nothing")
    ap.add_argument("--report", action="store_true", help="tabulate the finished rows, train none")
    ap.add_argument("--out", default=None, help="also into this Markdown file's claims-table block")
    args = ap.parse_args(argv)
    world, root = Path(args.world), Path(args.root)
    groups = [g for g in GROUPS if g in args.groups.split(",")]
    command = "python scripts/claims.py " + " ".join(argv if argv is not None else sys.argv[1:])
    out: dict = {"command": command, "rows": {"base (no training)": {"group": "-", "seeds": {}}}}
    for group in groups:  # a group for every seed before the next group: the priority order
        for seed in args.seeds:
            for g, label, kind, name, how in ROWS:
                if g != group or (args.names and name not in args.names.split(",")):
                    continue
                cfg = demo_config(kind, seed, root, world)
                rcfg = row_config(cfg, name, how, args.rounds)
                if args.dry:
                    print(dry_line(seed, kind, name, rcfg))
                    continue
                got = one_row(cfg, rcfg, how, args.report)
                if got is None:
                    continue
                out["rows"].setdefault(label, {"group": g, "seeds": {}})["seeds"][seed] = got["row"]
                out["rows"]["base (no training)"]["seeds"][seed] = {**got["base"], "cpu_s": 0.0}
                root.mkdir(parents=True, exist_ok=True)
                atomic_write_text(root / "claims.json", json.dumps(out, indent=1))
                atomic_write_text(root / "claims.md", table(out["rows"], args.seeds, command))
    if not args.dry and (root / "claims.md").is_file():
        md = (root / "claims.md").read_text()
        if args.out:  # e.g. docs/RESULTS.md: only its generated block
            from docs_tables import replace_block

            out_md = Path(args.out)
            atomic_write_text(out_md, replace_block(out_md.read_text(), "claims-table", md))
        print(md, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
