"""G-OPD expert merge on the demo world: one student distilled from two experts, routed by half.

    python scripts/expert_merge.py --world runs/world --out runs/expert_merge --seeds 0 1 2

1. The private entities are split into halves A and B (alternating, in the world's order).
2. Two experts: the base fine-tuned closed-book on ONE half's private facts by the world's own
   training function (``world.pretrain``: half of each batch is that half's closed-book QA, the
   rest the base's pretraining mix of public closed-book QA and open-book reading, so that an
   expert stays a reader and keeps the public facts). Neither expert ever sees the other half.
3. Prompts (``<out>/prompts``): every private training prompt of train_mix, its ``kind``
   relabelled ``private_a`` / ``private_b``, plus a fixed sample of public questions and
   open-book reading anchors; eval sets per half (closed-book and paraphrased), public, reading.
4. Per seed, ONE pipeline run (one rollout + score cache): the student (the base) rolls out
   (guided rollouts for half the prompts, as in the demo); each rollout is scored by the expert of
   its half (``score.route_by.sql`` over the prompts: public and reading prompts split between
   the two experts by a hash of their id); ``select=all``; two trainings on the same cache,
   ``opd_k1`` and ``exopd`` (lambda = --lam, reference = the base); eval of the base, both
   experts and both students.
5. ``<out>/results.json``: per checkpoint and eval set the mean, standard deviation and values
   over seeds, each run's pipeline command line and timings, the experts' training.

Everything resumes: experts, prompts and pipeline stages already done (same settings) are reused.
``--quick`` builds a tiny world under ``<out>/world`` and runs one seed end to end (a smoke test).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import statistics
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

import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402
from demoworld import world as W  # noqa: E402

HALVES = ("a", "b")
SETS = ["private_a", "private_b", "paraphrase_a", "paraphrase_b", "public_closed", "reading"]
# The route: each private prompt to its half's expert, the rest split by a hash of the id.
ROUTE_SQL = (
    "CASE WHEN kind = 'private_a' THEN 'a' WHEN kind = 'private_b' THEN 'b' "
    "WHEN hash(id) % 2 = 0 THEN 'a' ELSE 'b' END"
)


# ----------------------------------------------------------------------------- world and halves
def load_world(world_dir: Path) -> tuple[W.World, dict]:
    """The world object rebuilt from world.json's settings, checked against its prompt files."""
    info = json.loads((world_dir / "world.json").read_text())
    world = W.make_world(W.settings_from_dict(info["settings"]))
    rows = pq.read_table(world_dir / "prompts" / "private_closed.parquet").to_pylist()
    for r in rows:
        attr, ent = W.row_attr_entity(r)
        if world.facts[ent][attr] != r["answer"]:
            raise SystemExit(
                f"world.json does not rebuild the world at {world_dir} (row {r['id']})"
            )
    return world, info


def halves(world: W.World) -> dict[str, list[str]]:
    return {"a": world.private[0::2], "b": world.private[1::2]}


def half_of(row: dict, split: dict[str, list[str]]) -> str | None:
    if not row["id"].startswith("private-"):
        return None
    _, ent = W.row_attr_entity(row)
    return next(h for h, ents in split.items() if ent in ents)


# ----------------------------------------------------------------------------- prompts
def _write(rows: list[dict], path: Path) -> None:
    """Atomically (parallel calls, one per seed, rewrite the same bytes while others read)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    W.write_prompts(rows, tmp)
    os.replace(tmp, path)


def write_prompts(world_dir: Path, out: Path, split: dict, n_public: int, n_anchor: int) -> dict:
    """Training prompts and eval sets under ``out/prompts`` (the same for every seed)."""
    src, dst = world_dir / "prompts", out / "prompts"
    dst.mkdir(parents=True, exist_ok=True)
    rng = random.Random(1234)
    mix = pq.read_table(src / "train_mix.parquet").to_pylist()
    private = [r for r in mix if r["kind"] == "private"]
    for r in private:
        r["kind"] = f"private_{half_of(r, split)}"
    public = [r for r in mix if r["kind"] == "public"]
    anchors = [r for r in mix if r["kind"] == "reading_anchor"]
    rows = (
        private
        + rng.sample(public, min(n_public, len(public)))
        + rng.sample(anchors, min(n_anchor, len(anchors)))
    )
    _write(rows, dst / "train.parquet")
    for name, file in (("private", "private_closed"), ("paraphrase", "private_paraphrase")):
        evals = pq.read_table(src / f"{file}.parquet").to_pylist()
        for h in HALVES:
            _write([r for r in evals if half_of(r, split) == h], dst / f"{name}_{h}.parquet")
    for name in ("public_closed", "reading"):
        _write(pq.read_table(src / f"{name}.parquet").to_pylist(), dst / f"{name}.parquet")
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["kind"]] = counts.get(r["kind"], 0) + 1
    return {"train_rows": len(rows), "train_kinds": counts}


# ----------------------------------------------------------------------------- experts
def build_expert(
    world: W.World, world_dir: Path, ents: list[str], dest: Path, args: argparse.Namespace, h: str
) -> dict:
    """The base fine-tuned closed-book on ``ents``' facts (plus its own mix); cached by settings."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    want = {
        "entities": ents,
        "steps": args.expert_steps,
        "lr": args.expert_lr,
        "private_frac": args.expert_private_frac,
        "seed": 300 + HALVES.index(h),
        "world_key": json.loads((world_dir / "world.json").read_text())["key"],
    }
    meta = dest / "expert.json"
    if meta.is_file() and json.loads(meta.read_text())["settings"] == want:
        return json.loads(meta.read_text())
    t0 = time.time()
    torch.set_num_threads(1)
    base = world_dir / "models" / "base"
    tok = AutoTokenizer.from_pretrained(base)
    model = LlamaForCausalLM.from_pretrained(base, attn_implementation="eager")
    ms = dataclasses.replace(
        world.settings.base, steps=args.expert_steps, lr=args.expert_lr, warmup=20
    )
    only = dataclasses.replace(world, private=ents)  # the other half never appears
    info = W.pretrain(model, tok, only, ms, want["seed"], args.expert_private_frac, f"expert_{h}")
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dest, safe_serialization=True)
    tok.save_pretrained(dest)
    doc = {"settings": want, **info, "train_seconds": round(time.time() - t0, 1)}
    rows = pq.read_table(world_dir / "prompts" / "private_closed.parquet").to_pylist()
    mine = [r for r in rows if W.row_attr_entity(r)[1] in ents]
    other = [r for r in rows if W.row_attr_entity(r)[1] not in ents]
    doc["private_closed_own_half"] = round(W.greedy_accuracy(model, tok, mine, False), 4)
    doc["private_closed_other_half"] = round(W.greedy_accuracy(model, tok, other, False), 4)
    meta.write_text(json.dumps(doc, indent=1) + "\n")
    return doc


# ----------------------------------------------------------------------------- the pipeline runs
def pipeline_overrides(out: Path, world_dir: Path, seed: int, args: argparse.Namespace) -> list:
    base = world_dir / "models" / "base"
    p = out / "prompts"
    experts = {h: out / "models" / f"expert_{h}" for h in HALVES}
    evals = [f"++data.eval_sets.{s}={p / (s + '.parquet')}" for s in SETS]
    # reference trainings on the same cache (other losses), e.g. topk_fkl
    sfx = suffix(args)
    refs = "".join(f", {{name: {n}{sfx}, overrides: ['loss={n}']}}" for n in args.reference_losses)
    extra = "".join(f"{n}{sfx}," for n in args.reference_losses)
    return [
        "experiment=demo",
        f"run_dir={out / f'seed{seed}'}",
        f"seed={seed}",
        f"data.prompts={p / 'train.parquet'}",
        *evals,
        f"student.path={base}",
        f"teacher.path={experts['a']}",  # the eval stage's KL column only (scoring is routed)
        f"ref.path={base}",
        f"+teachers={{a: {{path: {experts['a']}}}, b: {{path: {experts['b']}}}}}",
        f'score.route_by.sql="{ROUTE_SQL}"',
        "rollout.teacher_template='{prompt}'",  # the experts know the facts closed-book
        "select=all",
        "loss=opd_k1",
        f"train.name=opd_k1{sfx}",
        f"train.epochs={args.epochs}",
        f"pipeline.variants=[{{name: exopd{sfx}, overrides: ['loss=exopd', "
        f"'loss.terms.0.kwargs.lam={args.lam}']}}{refs}]",
        f"eval.sets=[{','.join(SETS)}]",
        f"eval.checkpoints=[base,opd_k1{sfx},exopd{sfx},{extra}{experts['a']},{experts['b']}]",
        "eval.kl_set=private_a",
        "eval.kl_prompts=16",
        "pipeline.stages=[rollout,score,select,train,eval]",
    ]


DEFAULT_EPOCHS = 6


def suffix(args: argparse.Namespace) -> str:
    """Train names (and result files) of a schedule other than the default carry its epochs, so
    several schedules train side by side on one cache (opd_k1, opd_k1-e12, ...)."""
    return "" if args.epochs == DEFAULT_EPOCHS or args.quick else f"-e{args.epochs}"


def shell_line(ovs: list[str]) -> str:
    """The same run as a shell command (each override single-quoted)."""
    q = ["'" + o.replace("'", "'\\''") + "'" for o in ovs]
    return "OMP_NUM_THREADS=1 python -m stages.pipeline " + " ".join(q)


def run_seed(out: Path, world_dir: Path, seed: int, args: argparse.Namespace) -> dict:
    from stages import pipeline
    from stages.lib.config import compose
    from stages.lib.layout import RunLayout

    ovs = pipeline_overrides(out, world_dir, seed, args)
    cfg = compose("pipeline", ovs)
    t0 = time.time()
    timings = pipeline.run(cfg)
    lay = RunLayout.of(cfg.run_dir)
    results = json.loads(lay.eval_results.read_text())
    return {
        "command": shell_line(ovs),
        "seconds": round(time.time() - t0, 1),
        "timings": {k: round(v, 1) for k, v in timings.items()},
        "accuracy": accuracies(results),
    }


def accuracies(results: dict) -> dict[str, dict[str, float]]:
    """checkpoint -> eval set -> greedy accuracy, from the eval stage's results.json."""
    return {
        ck: {s: e["accuracy"] for s, e in sets.items() if isinstance(e, dict) and "accuracy" in e}
        for ck, sets in results["results"].items()
    }


def summarize(per_seed: dict[int, dict]) -> dict[str, dict[str, dict[str, Any]]]:
    """checkpoint -> set -> {mean, sd, values} over seeds."""
    table: dict[str, dict[str, dict[str, Any]]] = {}
    for res in per_seed.values():
        for ck, sets in res["accuracy"].items():
            for s, v in sets.items():
                table.setdefault(ck, {}).setdefault(s, {"values": []})["values"].append(v)
    for sets in table.values():
        for cell in sets.values():
            vals = cell["values"]
            cell["mean"] = round(statistics.fmean(vals), 4)
            cell["sd"] = round(statistics.stdev(vals), 4) if len(vals) > 1 else 0.0
    return table


def markdown(table: dict, n: int) -> str:
    head = "| checkpoint | " + " | ".join(SETS) + " |"
    lines = [head, "|" + "---|" * (len(SETS) + 1)]
    for ck, sets in table.items():
        cells = [
            f"{100 * sets[s]['mean']:.1f} ± {100 * sets[s]['sd']:.1f}" if s in sets else "-"
            for s in SETS
        ]
        lines.append(f"| {ck} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + f"\n\n(greedy accuracy %, mean ± sd over {n} seed(s))"


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--world", type=Path, default=Path("runs/world"))
    ap.add_argument("--out", type=Path, default=Path("runs/expert_merge"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument(
        "--epochs", type=int, default=DEFAULT_EPOCHS, help="training epochs (both losses)"
    )
    ap.add_argument("--lam", type=float, default=1.25, help="ExOPD lambda (> 1)")
    ap.add_argument(
        "--reference-losses",
        nargs="*",
        default=["topk_fkl"],
        help="more trainings on the same cache, for reference (the demo's top-K forward KL)",
    )
    ap.add_argument("--n-public", type=int, default=150, help="public prompts in the mix")
    ap.add_argument("--n-anchor", type=int, default=150, help="reading anchors in the mix")
    ap.add_argument("--expert-steps", type=int, default=400)
    ap.add_argument("--expert-lr", type=float, default=1e-3)
    ap.add_argument("--expert-private-frac", type=float, default=0.5)
    ap.add_argument("--only", choices=["experts", "all"], default="all")
    ap.add_argument(
        "--halves", nargs="+", choices=HALVES, help="with --only experts: build just these"
    )
    ap.add_argument("--quick", action="store_true", help="tiny world, one seed (smoke test)")
    args = ap.parse_args(argv)
    out, world_dir = args.out.resolve(), args.world.resolve()
    if args.quick:
        world_dir = out / "world"
        W.build_world(world_dir, W.WorldSettings.quick())
        args.seeds, args.epochs, args.expert_steps = args.seeds[:1], 1, 20
    world, _ = load_world(world_dir)
    split = halves(world)
    doc: dict[str, Any] = {
        "world": str(world_dir),
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    doc["command"] = "python scripts/expert_merge.py " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    doc["halves"] = split
    doc["prompts"] = write_prompts(world_dir, out, split, args.n_public, args.n_anchor)
    doc["experts"] = {
        h: build_expert(world, world_dir, split[h], out / "models" / f"expert_{h}", args, h)
        for h in (args.halves or HALVES)
    }
    print(json.dumps(doc["experts"], indent=1), flush=True)
    if args.only == "experts":
        return 0
    for seed in args.seeds:  # each seed's result is kept in seed<s>.json (reused when unchanged)
        seed_json = out / f"seed{seed}{suffix(args)}.json"
        want = shell_line(pipeline_overrides(out, world_dir, seed, args))
        old = json.loads(seed_json.read_text()) if seed_json.is_file() else None
        if not (old and old["command"] == want):
            atomic_json(seed_json, keep_costs(run_seed(out, world_dir, seed, args), old))
    # the table: every seed asked for (a separate call per seed may run them in parallel)
    per_seed = {
        s: json.loads((out / f"seed{s}{suffix(args)}.json").read_text()) for s in args.seeds
    }
    doc["per_seed"] = per_seed
    doc["table"] = summarize(per_seed)
    res_path = out / (
        f"results{suffix(args)}.json"
        if len(args.seeds) > 1
        else f"results_seed{args.seeds[0]}{suffix(args)}.json"
    )
    atomic_json(res_path, doc)
    print(markdown(doc["table"], len(per_seed)))
    print(f"wrote {res_path}")
    return 0


def keep_costs(new: dict, old: dict | None) -> dict:
    """A re-run reuses what an earlier call of the same seed computed (those stages take ~0 s):
    each timing keeps the larger of the two, i.e. what the work cost when it was done."""
    if old:
        for k, v in old["timings"].items():
            new["timings"][k] = max(v, new["timings"].get(k, 0.0))
        t = new["timings"]
        t["total"] = round(sum(v for k, v in t.items() if k != "total"), 1)
        new["earlier_command"] = old["command"]
    return new


def atomic_json(path: Path, doc: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    os.replace(tmp, path)


if __name__ == "__main__":
    raise SystemExit(main())
