"""The pipeline: every stage in order, with one resolved config; resumes what is done.

    python -m stages.pipeline experiment=demo

Order (``pipeline.stages``): sft (when ``sft.enabled``) -> rollout -> score ->
select -> train -> eval -> report. Each stage skips work whose manifest already exists for the
same config (dataset ids), resumes a partial shard set, and refuses data written by a different
config unless ``overwrite=true``. ``pipeline.variants`` are extra training runs on the SAME cached
rollouts and teacher log-probs (another loss or selection): only select + train run again.
``pipeline.rounds`` > 1 adds rounds of fresh rollouts: rollout -> score -> select -> train again
from the previous round's checkpoint, under ``run_dir/round<r>/``; eval then shows every round.

The run is planned first, as data (:func:`plan`: a list of steps, each a stage, its typed config
and a label), printed, then executed. Variant and round configs are composed again from the
pipeline's own command line plus a few overrides (``stages.lib.config.variant_config`` and
``round_config``), so they follow the command line's rules exactly.
Reads/writes: everything under ``run_dir`` (see ``stages/lib/layout.py``).
"""

from __future__ import annotations

import importlib
import json
import time
from dataclasses import dataclass

from stages.lib.config import Config, hydra_entry, round_config, variant_config
from stages.lib.layout import RunLayout
from stages.lib.store import atomic_write_text


@dataclass(frozen=True)
class Step:
    """One stage run of the plan."""

    stage: str  # module stages.<stage>, run as stages.<stage>.run(cfg)
    cfg: Config  # the typed config it runs with
    label: str  # what the plan prints (e.g. "variant opd: train")
    group: str  # timings key the step adds to: the stage, "variant:<name>" or "round<r>"


def _describe(cfg: Config) -> str:
    return f"run_dir={cfg.run_dir} train.name={cfg.train.name} select={cfg.select.name}"


def plan(cfg: Config) -> list[Step]:
    """The steps ``run`` executes, in order: ``pipeline.stages``, with the variants' and later
    rounds' steps right after ``train``, so that ``eval`` (and the report, which shows its
    results) come after every checkpoint exists."""
    steps: list[Step] = []
    for stage in cfg.pipeline.stages:
        if stage == "sft" and not cfg.sft.enabled:
            continue
        steps.append(Step(stage, cfg, stage, stage))
        if stage != "train":
            continue
        for v in cfg.pipeline.variants:
            vcfg = variant_config(cfg, v)
            label, group = f"variant {v.name}", f"variant:{v.name}"
            steps += [Step(s, vcfg, f"{label}: {s}", group) for s in ("select", "train")]
        for r in range(2, cfg.pipeline.rounds + 1):
            rcfg = round_config(cfg, r)
            steps += [
                Step(s, rcfg, f"round {r}: {s}", f"round{r}")
                for s in ("rollout", "score", "select", "train")
            ]
    return steps


def format_plan(steps: list[Step]) -> str:
    lines = [f"pipeline plan: {len(steps)} steps"]
    for i, st in enumerate(steps, 1):
        lines.append(f"  {i:2d}. {st.label:<24s} {_describe(st.cfg)}")
    return "\n".join(lines)


def run_stage(name: str, cfg: Config) -> dict:
    mod = importlib.import_module(f"stages.{name}")
    t0 = time.time()
    print(f"\n=== {name} ===", flush=True)
    out = mod.run(cfg)
    print(f"=== {name} done in {time.time() - t0:.1f}s ===", flush=True)
    return out if isinstance(out, dict) else {}


def run(cfg: Config) -> dict:
    t0 = time.time()
    steps = plan(cfg)  # every derived config composes (and is checked) before anything runs
    print(format_plan(steps), flush=True)
    timings: dict[str, float] = {}
    for st in steps:
        if st.label != st.stage:
            print(f"\n--- {st.label} ({_describe(st.cfg)}) ---", flush=True)
        t = time.time()
        run_stage(st.stage, st.cfg)
        timings[st.group] = timings.get(st.group, 0.0) + time.time() - t
    timings["total"] = time.time() - t0
    print("\npipeline timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
    lay = RunLayout.of(cfg.run_dir)
    lay.root.mkdir(parents=True, exist_ok=True)
    # read by scripts/bench.py (demo.end_to_end_seconds)
    atomic_write_text(lay.timings, json.dumps(timings, indent=1))
    print(f"pipeline: done, {len(steps)} steps; wrote {lay.root}/ ({_wrote(cfg, steps)})")
    return timings


def _wrote(cfg: Config, steps: list[Step]) -> str:
    """What the run left where, for the last line."""
    lay = RunLayout.of(cfg.run_dir)
    out = []
    for st in steps:
        if st.stage == "sft":
            out.append(str(lay.sft_final))
        if st.stage == "train":
            out.append(str(RunLayout.of(st.cfg.run_dir).final(st.cfg.train.name)))
    if any(st.stage == "eval" for st in steps):
        out.append(str(lay.eval_results))
    if any(st.stage == "report" for st in steps):
        out.append(str(lay.report))
    out.append(str(lay.timings))
    return ", ".join(out)


main = hydra_entry("pipeline")(run)

if __name__ == "__main__":
    main()
