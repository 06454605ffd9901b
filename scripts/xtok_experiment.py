"""The cross-tokenizer demo experiment: do the private facts transfer from a teacher that tokenizes
them differently? Runs (or only tabulates, ``--table-only``) both rows of docs/CROSS_TOKENIZER.md:

- same tokenizer: ``teacher_big`` (the world's word-level tokenizer), the ``demo_lightning`` recipe
  (SFT on the teacher's greedy answers, 12 epochs, then offline OPD with ``topk_fkl``), and
  ``opd_k1`` re-trained on the same cache (the sampled-token twin of ``chunk_opd``);
- another tokenizer: ``teacher_bpe`` (byte-level BPE, 600 ids, trained like teacher_big by
  ``scripts/demoworld/xtok_teacher.py``), the same recipe with ``score.cross_tokenizer=align``:
  SFT through text, OPD with ``chunk_opd``, and ``mapped_topk_fkl`` re-trained on the same cache.

Every stage resumes what is done, so a re-run only tabulates. Writes ``--out`` (JSON: per seed,
per checkpoint, the eval accuracies; the means and standard deviations; the teachers' own
accuracies) and prints a Markdown table.

    OMP_NUM_THREADS=1 python scripts/make_demo.py --out runs/world --teacher-big --threads 1
    OMP_NUM_THREADS=1 python scripts/demoworld/xtok_teacher.py --world runs/world --out runs/world_xtok
    OMP_NUM_THREADS=1 python scripts/xtok_experiment.py --seeds 0 1 2 --out runs/xtok_experiment.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SETS = ("private_closed", "private_paraphrase", "public_closed", "reading")
BPE = "runs/world_xtok/models/teacher_bpe"

# row label -> (run dir prefix, checkpoint names to try in order)
ROWS = {
    "base (closed-book)": ("xtok_big", ["base"]),
    "same tokenizer (teacher_big): SFT only": ("xtok_big", ["sft"]),
    "same tokenizer: SFT + OPD `topk_fkl`": ("xtok_big", ["topk_fkl-all"]),
    "same tokenizer: SFT + OPD `opd_k1`": ("xtok_big", ["opd_k1-all"]),
    "another tokenizer (teacher_bpe): SFT through text only": ("xtok_bpe", ["sft"]),
    "another tokenizer: SFT + OPD `chunk_opd`": ("xtok_bpe", ["chunk_opd-all"]),
    # -v2: seeds re-scored after the in-context mapping (XTOK_VERSION 2) landed; a fresh run is -all
    "another tokenizer: SFT + OPD `mapped_topk_fkl`": (
        "xtok_bpe",
        ["mapped_topk_fkl-v2", "mapped_topk_fkl-all"],
    ),
}


def commands(seed: int) -> list[list[str]]:
    """Every stage command of one seed, both rows (each resumes what is done)."""
    py = [sys.executable, "-m"]
    big = ["experiment=demo_lightning", f"seed={seed}", f"run_dir=runs/xtok_big_s{seed}"]
    bpe = [
        "experiment=demo_lightning",
        f"seed={seed}",
        f"run_dir=runs/xtok_bpe_s{seed}",
        f"teacher.path={BPE}",
        "score.cross_tokenizer=align",
    ]
    return [
        [*py, "stages.pipeline", *big],
        [*py, "stages.train", *big, "loss=opd_k1"],
        [*py, "stages.eval", *big],
        [*py, "stages.pipeline", *bpe, "loss=chunk_opd"],
        [*py, "stages.train", *bpe, "loss=mapped_topk_fkl"],
        [*py, "stages.eval", *bpe],
    ]


def table(seeds: list[int]) -> dict:
    per: dict[str, dict[int, dict[str, float]]] = {}
    for label, (prefix, names) in ROWS.items():
        for s in seeds:
            p = ROOT / "runs" / f"{prefix}_s{s}" / "eval" / "results.json"
            if not p.exists():
                continue
            res = json.loads(p.read_text())["results"]
            name = next((n for n in names if n in res), None)
            if name is not None:
                per.setdefault(label, {})[s] = {k: res[name][k]["accuracy"] for k in SETS}
    summary = {}
    for label, by_seed in per.items():
        cols = {}
        for k in SETS:
            v = [100 * r[k] for r in by_seed.values()]
            cols[k] = {"mean": statistics.mean(v), "std": statistics.stdev(v) if len(v) > 1 else 0}
        summary[label] = {"seeds": sorted(by_seed), **cols}
    teachers = {}
    for name, p in (
        ("teacher_big", ROOT / "runs/world/world.json"),
        ("teacher_bpe", ROOT / "runs/world_xtok/teacher_bpe.json"),
    ):
        if p.exists():
            d = json.loads(p.read_text())
            acc = d["models"][name]["accuracy"] if "models" in d else d["accuracy"]
            teachers[name] = {k: acc.get(k) for k in SETS}
    return {"per_seed": per, "summary": summary, "teachers": teachers}


def markdown(t: dict) -> str:
    lines = [
        "| run | private_closed | private_paraphrase | public_closed | reading | seeds |",
        "|---|---|---|---|---|---|",
    ]
    for name, acc in t["teachers"].items():
        cells = " | ".join(f"{100 * acc[k]:.1f}" for k in SETS)
        lines.append(f"| {name} itself | {cells} | |")
    for label, r in t["summary"].items():
        cells = " | ".join(
            f"{r[k]['mean']:.1f}" + (f" ± {r[k]['std']:.1f}" if len(r["seeds"]) > 1 else "")
            for k in SETS
        )
        lines.append(f"| {label} | {cells} | {len(r['seeds'])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default="runs/xtok_experiment.json")
    ap.add_argument("--table-only", action="store_true", help="tabulate what has run")
    args = ap.parse_args(argv)
    if not args.table_only:
        for need in (ROOT / "runs/world/models/teacher_big", ROOT / BPE):
            if not need.is_dir():
                ap.error(f"{need} is missing: build it first (commands in the docstring)")
        for s in args.seeds:
            for cmd in commands(s):
                print("+", " ".join(cmd[2:]), flush=True)
                subprocess.run(cmd, cwd=ROOT, check=True)
    t = table(args.seeds)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(t, indent=1) + "\n")
    print(markdown(t))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
