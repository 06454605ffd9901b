"""Choose the demo's checkpoint on the validation split carved from the training prompts.

    python scripts/demo_choose.py --run-dir runs/demo --name topk_fkl-evidence_retain \
        --world runs/world [--reading-margin 4] [--public-margin 3]

The train stage of the `demo` experiment saves a checkpoint every ``train.save_every`` steps. Each
of them (and ``final``) answers ``prompts/val.parquet`` of the world greedily: held-out open-book
reading anchors (never trained on) and a sample of the private and public *training* questions
(``world.validation_split``; no eval set is read). The rule, fixed before any eval number was
seen: among the checkpoints whose validation reading and public accuracy stay within
``--reading-margin`` / ``--public-margin`` points of the base, the one with the most private
training questions right (ties: the earliest). When none stays within, the same rule holds each
checkpoint to the best reading and public level any checkpoint kept (the drop then came with
training itself, from the first checkpoint on), and only when even that leaves none, the one
with the least violation. The chosen weights are copied to ``checkpoints/<name>-val/final`` (the eval stage picks
them up with every other ``final``) and every checkpoint's numbers to
``checkpoints/<name>-val/choice.json``. A second call with the same inputs returns at once.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
for p in (REPO, REPO / "scripts"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from stages.lib.errors import UserError, user_errors_exit  # noqa: E402

# The val.parquet kinds and the name each is reported under.
KINDS = {"private": "private", "public": "public", "reading_anchor": "reading"}
# Model files copied into the chosen checkpoint (the trainer state is not).
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors")


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--run-dir", default="runs/demo", help="the pipeline's run_dir")
    ap.add_argument("--name", default="topk_fkl-evidence_retain", help="train.name of the run")
    ap.add_argument("--world", default="runs/world", help="the demo world (make_demo.py --out)")
    ap.add_argument("--base", default=None, help="base model dir (default <world>/models/base)")
    # 4, not 3: with 3, on the make-demo world every checkpoint from step 100 on sat 2.5-4 points
    # under the base on validation reading, so the rule threw away the late checkpoints the goal
    # (5 points on eval) allows and kept step 500 (docs/RESULTS.md shows both margins per run).
    ap.add_argument("--reading-margin", type=float, default=4.0, help="points below the base")
    ap.add_argument("--public-margin", type=float, default=3.0, help="points below the base")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    return ap.parse_args(argv)


def candidates(ckpt_root: Path) -> list[tuple[int | None, Path]]:
    """(step, dir) of every saved step checkpoint in step order, then final (step None)."""
    out: list[tuple[int | None, Path]] = []
    steps = [d for d in ckpt_root.glob("step-*") if d.name[5:].isdigit()]
    for d in sorted(steps, key=lambda d: int(d.name[5:])):
        if (d / "model.safetensors").is_file():
            out.append((int(d.name[5:]), d))
    if (ckpt_root / "final" / "model.safetensors").is_file():
        out.append((None, ckpt_root / "final"))
    return out


def val_rows(world: Path) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    path = world / "prompts" / "val.parquet"
    if not path.is_file():
        raise UserError(
            "the world has no validation split",
            str(path),
            "rebuild it: python scripts/make_demo.py",
        )
    return pq.read_table(path).to_pylist()


def accuracies(model_dir: Path, rows: list[dict[str, Any]]) -> dict[str, float]:
    """Greedy accuracy (%) per validation kind, the student's view (no evidence)."""
    from demoworld import world as W
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="float32").eval()
    out = {}
    for kind, name in KINDS.items():
        sub = [r for r in rows if r["kind"] == kind]
        out[name] = round(100 * W.greedy_accuracy(model, tok, sub, use_context=False), 2)
    return out


def violation(acc: dict[str, float], base: dict[str, float], margins: dict[str, float]) -> float:
    """Points by which reading/public fall below base - margin (0 = within)."""
    return sum(max(0.0, base[k] - margins[k] - acc[k]) for k in margins)


def choose(table: list[dict[str, Any]], base: dict[str, float], margins: dict[str, float]) -> int:
    """Index into ``table`` (rows with step and accuracies, in step order) of the chosen one."""
    within = [i for i, r in enumerate(table) if violation(r["val"], base, margins) == 0]
    if not within:
        # No checkpoint keeps the base's level: the drop came with training itself (it is there
        # from the first checkpoint on), so hold each checkpoint to the best level any checkpoint
        # kept instead of choosing the least-trained one.
        best = {k: max(r["val"][k] for r in table) for k in margins}
        within = [i for i, r in enumerate(table) if violation(r["val"], best, margins) == 0]
        if not within:
            return min(
                range(len(table)), key=lambda i: (violation(table[i]["val"], best, margins), i)
            )
    return max(within, key=lambda i: (table[i]["val"]["private"], -i))


def copy_model(src: Path, dest: Path) -> None:
    """Weights + tokenizer of ``src`` into ``dest`` (via a temp dir renamed into place)."""
    tmp = dest.with_name(f".tmp-{dest.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in src.iterdir():
        if f.name in MODEL_FILES or f.name.startswith(("tokenizer", "special_tokens", "chat_")):
            shutil.copy2(f, tmp / f.name)
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(tmp, dest)


@user_errors_exit
def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one "Loading weights" bar per checkpoint is noise
    if args.threads:
        torch.set_num_threads(args.threads)
    run, world = Path(args.run_dir), Path(args.world)
    root = run / "checkpoints" / args.name
    cands = candidates(root)
    if not cands:
        raise UserError(
            "no trained checkpoint to choose from", str(root), "run the train stage first"
        )
    out_dir = run / "checkpoints" / f"{args.name}-val"
    key = [str(d) for _, d in cands] + [args.reading_margin, args.public_margin]
    done = out_dir / "choice.json"
    if done.is_file() and json.loads(done.read_text()).get("key") == key:
        print(f"choice (cached): {json.loads(done.read_text())['chosen']}")
        return 0
    rows = val_rows(world)
    base = accuracies(Path(args.base) if args.base else world / "models" / "base", rows)
    margins = {"reading": args.reading_margin, "public": args.public_margin}
    table = []
    for step, d in cands:
        table.append({"checkpoint": d.name, "step": step, "val": accuracies(d, rows)})
        print(f"  {d.name}: validation {table[-1]['val']}", flush=True)
    i = choose(table, base, margins)
    out_dir.mkdir(parents=True, exist_ok=True)
    copy_model(cands[i][1], out_dir / "final")
    info = {"key": key, "chosen": table[i], "base_val": base, "margins": margins, "all": table}
    (out_dir / "choice.json").write_text(json.dumps(info, indent=2) + "\n")
    print(f"validation (base): {base}")
    print(f"chosen: {table[i]['checkpoint']} (step {table[i]['step']}): {table[i]['val']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
