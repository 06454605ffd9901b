"""Re-run the demo's results table: every ablation of the README, several seeds, one command.

    python scripts/results_table.py --seeds 0 1 2 --ablation-seeds 0           # docs/RESULTS.md (its table block)
    python scripts/results_table.py --seeds 0 1 2 --out docs/RESULTS.md        # everything
    python scripts/results_table.py --seeds 0 1 2 --rows headline               # base + EDGE-OPD
    python scripts/results_table.py --seeds 0 --rows guided,unguided,lightning  # one seed of the rest

Each seed gets its own run dirs under ``--root`` (default ``runs/results``); the stages resume, so
an interrupted call continues where it stopped and a second call only re-evaluates. Rows:

* ``headline``: base; EDGE-OPD (the ``demo`` experiment: guided rollouts, soft evidence mask times
  a retention weight of 10 on the reading anchors, 14 epochs); the same at 16 epochs, without the
  retention weight, and with a weight of 30.
* ``guided`` (same cached guided rollouts and teacher log-probs as EDGE-OPD): strict evidence
  mask; all tokens; ``opd_k1`` vs ``topk_fkl`` vs ``vopd`` vs ``exopd`` on the soft mask; TIP
  entropy 50 %.
* ``unguided``: OPSD without guidance (no guided rollouts, all tokens); ``unguided_mask``: the
  same rollouts with the evidence mask.
* ``rounds``: ``pipeline.rounds=2``: 8 epochs on the first rollouts, then fresh rollouts from
  that checkpoint, scored by the same teacher, and 8 more epochs.
* ``lightning``: ``demo_lightning`` (teacher_big): SFT only; SFT + offline OPD; a teacher-mismatch
  ablation (OPD teacher != SFT teacher, ``score.allow_teacher_mismatch=true``).
* ``consistency``: the other half of a 2 x 2 over (SFT teacher, OPD teacher) in {teacher_big, the
  base reading the evidence}: SFT on the base-with-evidence's answers, then OPD from that same
  teacher, and from teacher_big (mismatched). With ``lightning`` it tells teacher consistency
  apart from one teacher simply being the better one.

Writes a Markdown table (mean ± standard deviation over seeds, and n) and the raw numbers as JSON.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from stages import eval as eval_stage  # noqa: E402
from stages import pipeline, rollout, score, select, sft, train  # noqa: E402
from stages.lib.config import Config, compose, derive  # noqa: E402
from stages.lib.layout import RunLayout  # noqa: E402

SETS = ["private_closed", "private_paraphrase", "public_closed", "reading"]

# (row label, run-dir kind, train name, overrides on top of the run's config)
E16 = "train.epochs=16"  # the ablations ran at 16 epochs (the demo now trains 14)
GUIDED = [
    (
        "EDGE-OPD: guided + soft evidence mask x retention weight 10, 14 epochs (the demo)",
        "guided",
        "edge_retain_ep14",
        [],
    ),
    (
        "guided + soft evidence mask x retention weight 10, 16 epochs",
        "guided",
        "edge_retain",
        [E16],
    ),
    (
        "guided + soft evidence mask, no retention weight, 16 epochs (the first demo recipe)",
        "guided",
        "edge",
        ["select=evidence_soft", E16],
    ),
    (
        "guided + soft evidence mask x retention weight 30, 16 epochs",
        "guided",
        "edge_retain30",
        ["select=evidence_retain30", E16],
    ),
    (
        "guided + strict evidence mask (keep_rest 0)",
        "guided",
        "edge_strict",
        ["select=evidence", E16],
    ),
    ("guided, all tokens (topk_fkl)", "guided", "all", ["select=all", E16]),
    (
        "guided + soft evidence mask, opd_k1",
        "guided",
        "opd_k1",
        ["select=evidence_soft", "loss=opd_k1", E16],
    ),
    (
        "guided + soft evidence mask, vopd",
        "guided",
        "vopd",
        ["select=evidence_soft", "loss=vopd", E16],
    ),
    (
        "guided + soft evidence mask, exopd (lambda 1.25)",
        "guided",
        "exopd",
        ["select=evidence_soft", "loss=exopd", E16],
    ),
    ("guided, TIP entropy 50 % (topk_fkl)", "guided", "tip50", ["select=entropy_half", E16]),
    (
        "guided + soft evidence mask, 8 epochs",
        "guided",
        "ep8",
        ["select=evidence_soft", "train.epochs=8"],
    ),
    (
        "guided + soft evidence mask x retention weight 3.34 (anchor tokens at weight 1)",
        "guided",
        "retain_w3",
        [
            "select=evidence_retain",
            "select.name=evidence_retain_w3",
            "select.rules.1.params.weight=3.34",
            E16,
        ],
    ),
]
# pipeline.rounds=2: round 2 rolls out with round 1's checkpoint (fresh on-policy samples)
ROUNDS = [
    ("soft evidence mask, round 1 only (8 epochs)", "rounds", "edge8", None),
    ("soft evidence mask, 2 rounds of fresh rollouts x 8 epochs", "rounds", "edge8-r2", None),
]
UNGUIDED = [
    ("OPSD without guidance, all tokens", "unguided", "all", ["select=all", E16]),
]
UNGUIDED_MASK = [("unguided + evidence mask", "unguided", "evidence", ["select=evidence", E16])]
LIGHTNING = [
    ("Lightning: SFT only", "lightning", "sft", None),
    ("Lightning: SFT + offline OPD (topk_fkl)", "lightning", "opd", []),
    ("Lightning: teacher mismatch (OPD teacher = base reading evidence)", "mismatch", "opd", []),
]
# SFT teacher = the base reading the evidence ("self"): consistent OPD teacher, and teacher_big.
CONSISTENCY = [
    ("Consistency: SFT on self (base reading evidence) only", "selfsft", "sft", None),
    ("Consistency: SFT on self + OPD from self (consistent)", "selfsft", "opd", []),
    ("Consistency: SFT on self + OPD from teacher_big (mismatch)", "selfsft_big", "opd", []),
]
# The base reading the evidence as a teacher (SFT answers or OPD scores).
SELF_TEACHER = ["rollout.teacher_template='{context} {prompt}'"]
MISMATCH_OK = "score.allow_teacher_mismatch=true"
# A run dir whose SFT is another run dir's (same SFT config, deterministic): copied, not redone.
# kind -> the SFT row of the run dir it copies from.
SFT_FROM = {"mismatch": LIGHTNING[0], "selfsft_big": CONSISTENCY[0]}


def run_dir_config(kind: str, seed: int, root: Path, world: Path) -> tuple[list[str], bool]:
    base = world / "models" / "base"
    common = [
        f"seed={seed}",
        f"run_dir={root / f'seed{seed}' / kind}",
        f"data.prompts={world / 'prompts' / 'train_mix.parquet'}",
        *[f"data.eval_sets.{s}={world / 'prompts' / (s + '.parquet')}" for s in SETS],
    ]
    models = [f"student.path={base}", f"teacher.path={base}", f"ref.path={base}"]
    if kind == "guided":
        return ["experiment=demo", *common, *models], False
    if kind == "unguided":
        return ["experiment=demo", *common, *models, "rollout.guided_fraction=0"], False
    if kind == "rounds":
        rounds = ["pipeline.rounds=2", "train.epochs=8", "select=evidence_soft", "train.name=edge8"]
        return ["experiment=demo", *common, *models, *rounds], False
    big = world / "models" / "teacher_big"
    lightning = [
        "experiment=demo_lightning",
        *common,
        f"data.prompts={world / 'prompts' / 'train.parquet'}",  # no anchors: see the experiment
        f"student.path={base}",
        f"teacher.path={big}",
    ]
    if kind == "lightning":
        return lightning, True
    self_sft = [*lightning, f"teacher.path={base}", *SELF_TEACHER, f"ref.path={base}"]
    if kind == "selfsft":  # SFT and OPD teacher: the base reading the evidence
        return self_sft, True
    if kind == "selfsft_big":  # selfsft's SFT, then scored by teacher_big (run_config)
        return [*self_sft, MISMATCH_OK], True
    # mismatch: SFT on teacher_big's answers, but the OPD teacher is the base reading the evidence
    return [*lightning, MISMATCH_OK], True


def row_configs(kind: str, seed: int, root: Path, world: Path, rows: list) -> list:
    """(train name, its select+train config or None for a row the pipeline trains itself)."""
    cfg = run_config(kind, seed, root, world)
    where = f"results_table row of {kind}"
    return [
        (name, None if extra is None else derive(cfg, [*extra, f"train.name={name}"], where))
        for _, _, name, extra in rows
    ]


def run_config(kind: str, seed: int, root: Path, world: Path) -> Config:
    """The config a run dir's rollouts and scores come from (the mismatch run: its OPD teacher)."""
    ov, _ = run_dir_config(kind, seed, root, world)
    base, big = world / "models" / "base", world / "models" / "teacher_big"
    if kind == "mismatch":  # same SFT student, then scored by a different teacher
        ov = [*ov, f"teacher.path={base}", *SELF_TEACHER, f"ref.path={base}"]
    if kind == "selfsft_big":  # teacher_big knows the facts closed-book: it reads no evidence
        ov = [*ov, f"teacher.path={big}", "rollout.teacher_template='{prompt}'", f"ref.path={big}"]
    return compose("pipeline", ov)


def copy_sft(src: RunLayout, dst: RunLayout) -> None:
    """A run dir's SFT (same config, deterministic) into the run that shares it: not redone."""
    pairs = [
        (src.sft_data, dst.sft_data),
        (src.sft_selected, dst.sft_selected),
        (src.checkpoints("sft"), dst.checkpoints("sft")),
        (src.train("sft"), dst.train("sft")),
    ]
    for a, b in pairs:
        if a.exists():
            shutil.copytree(a, b, dirs_exist_ok=True)


def ensure_run(kind: str, seed: int, root: Path, world: Path, rows: list) -> dict:
    ov, has_sft = run_dir_config(kind, seed, root, world)
    cfg = compose("pipeline", ov)
    lay = RunLayout.of(cfg.run_dir)
    if kind in SFT_FROM and not lay.checkpoints("sft").exists():
        sft_row = SFT_FROM[kind]
        ensure_run(sft_row[1], seed, root, world, [sft_row])
        copy_sft(RunLayout.of(root / f"seed{seed}" / sft_row[1]), lay)
    if has_sft:
        sft.run(cfg)
    cfg = run_config(kind, seed, root, world)
    if kind == "rounds":  # both rounds through the pipeline (eval below)
        pipeline.run(derive(cfg, ["pipeline.stages=[rollout,score,select,train]"], "results_table"))
    rollout.run(cfg)
    score.run(cfg)
    names = []
    for name, tcfg in row_configs(kind, seed, root, world, rows):
        if tcfg is not None:
            select.run(tcfg)
            train.run(tcfg)
        names.append(name)
    ecfg = derive(cfg, [f"eval.checkpoints=[base,{','.join(names)}]"], "results_table eval")
    return eval_stage.run(ecfg)


def dry_run(plan: dict, seeds: list[int], root: Path, world: Path) -> int:
    """Compose every row's config (no model runs): the table's commands still compose."""
    n = 0
    for seed in seeds:
        for kind, rows in plan.items():
            for name, tcfg in row_configs(kind, seed, root, world, rows):
                c = tcfg or run_config(kind, seed, root, world)
                what = f"select={c.select.name} loss={c.loss.name} epochs={c.train.epochs}"
                print(f"seed {seed} {kind:9s} {name:18s} {c.run_dir} {what}")
                n += 1
    print(f"results_table: {n} rows compose")
    return 0


def fmt(vals: list[float]) -> str:
    if not vals:
        return "-"
    m = 100 * statistics.mean(vals)
    if len(vals) == 1:
        return f"{m:.1f}"
    return f"{m:.1f} ± {100 * statistics.stdev(vals):.1f}"


def write_table(args, table: dict, raw: dict, root: Path, seconds: float) -> None:
    lines = [
        "| run | " + " | ".join(SETS) + " | seeds |",
        "|---|" + "---|" * (len(SETS) + 1),
    ]
    for label, row in table.items():
        lines.append(
            f"| {label} | " + " | ".join(fmt(row[s]) for s in SETS) + f" | {len(row[SETS[0]])} |"
        )
    md = "\n".join(lines)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    head = (
        "Greedy accuracy (%) on the demo world's eval sets, mean ± std over seeds. Command: "
        f"`python scripts/results_table.py --seeds {' '.join(map(str, args.seeds))} "
        + (
            f"--ablation-seeds {' '.join(map(str, args.ablation_seeds))} "
            if args.ablation_seeds is not None
            else ""
        )
        + f"--rows {args.rows}` (this call: {seconds:.0f} s; runs already on disk are reused, "
        "only new ones train). The seeds column says how many seeds each row has.\n\n"
    )
    text = head + md + "\n"
    if out.exists() and "<!-- generated: results-table -->" in out.read_text():
        from docs_tables import replace_block  # docs/RESULTS.md: only its generated block

        text = replace_block(out.read_text(), "results-table", text)
    out.write_text(text)
    root.mkdir(parents=True, exist_ok=True)
    (root / "results.json").write_text(
        json.dumps({"table": table, "raw": raw}, indent=1, default=str)
    )
    print(md, flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--world", default="runs/world", help="demo world dir (make_demo.py)")
    ap.add_argument("--root", default="runs/results", help="where the run dirs go")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--rows", default="headline,guided,unguided,rounds,lightning")
    ap.add_argument("--out", default="docs/RESULTS.md")
    ap.add_argument(
        "--ablation-seeds",
        type=int,
        nargs="*",
        default=None,
        help="seeds that also run the non-headline rows (default: every seed)",
    )
    ap.add_argument(
        "--dry",
        action="store_true",
        help="compose every row's config and print it; run nothing (with --no-build: no world)",
    )
    ap.add_argument(
        "--no-build",
        action="store_true",
        help="use --world as it is (do not build or check its cache key)",
    )
    args = ap.parse_args(argv)
    world, root = Path(args.world), Path(args.root)
    wanted = set(args.rows.split(","))
    if not args.no_build:
        from demoworld import world as demoworld

        demoworld.build_world(
            world, demoworld.WorldSettings(teacher_big=bool(wanted & {"lightning", "consistency"}))
        )
    plan: dict[str, list] = {}
    if wanted & {"headline", "guided"}:
        plan["guided"] = GUIDED if "guided" in wanted else GUIDED[:4]
    if wanted & {"unguided", "unguided_mask"}:
        plan["unguided"] = (UNGUIDED if "unguided" in wanted else []) + (
            UNGUIDED_MASK if "unguided_mask" in wanted else []
        )
    if "rounds" in wanted:
        plan["rounds"] = ROUNDS
    if "lightning" in wanted:
        plan["lightning"] = LIGHTNING[:2]
        plan["mismatch"] = LIGHTNING[2:]
    if "consistency" in wanted:
        plan["selfsft"] = CONSISTENCY[:2]
        plan["selfsft_big"] = CONSISTENCY[2:]
    if args.dry:
        return dry_run(plan, args.seeds, root, world)
    ablation_seeds = args.seeds if args.ablation_seeds is None else args.ablation_seeds
    table: dict[str, dict[str, list[float]]] = {}
    raw: dict = {}
    t0 = time.time()
    for seed in args.seeds:
        for kind, rows in plan.items():
            if seed not in ablation_seeds:  # headline rows only
                if kind != "guided" or "headline" not in wanted:
                    continue
                rows = GUIDED[:4]
            res = ensure_run(kind, seed, root, world, rows)
            raw[f"seed{seed}/{kind}"] = res
            entries = [("base", "base")] if kind in ("guided", "unguided") else []
            entries += [(label, name) for label, _, name, _ in rows]
            for label, name in entries:
                if name not in res:
                    continue
                row = table.setdefault(label, {s: [] for s in SETS})
                if label == "base" and len(row[SETS[0]]) > args.seeds.index(seed):
                    continue  # base is shared by the guided and unguided run dirs
                for s in SETS:
                    row[s].append(res[name][s]["accuracy"])
            write_table(args, table, raw, root, time.time() - t0)  # after every run: partial ok
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
