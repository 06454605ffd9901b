"""The pipeline: every stage in order, with one resolved config; resumes what is done.

    python -m stages.pipeline experiment=demo

Order (``pipeline.stages``): sft (when ``sft.enabled``) -> rollout -> score ->
select -> train -> eval -> report. Each stage skips work whose manifest already exists for the
same config (dataset ids), resumes a partial shard set, and refuses data written by a different
config unless ``overwrite=true``. ``pipeline.variants`` are extra training runs on the SAME cached
rollouts and teacher log-probs (another loss or selection): only select + train run again.
``pipeline.rounds`` > 1 adds rounds of fresh rollouts: rollout -> score -> select -> train again
from the previous round's checkpoint, under ``run_dir/round<r>/``; eval then shows every round.
``pipeline.adaptive`` makes those rounds conditional: after each round's training the pipeline
reads the trainer's ``staleness`` (or ``rkl_k1``) from that round's ``metrics.jsonl``
(:func:`decide`) and starts the next round only when ``|value| >= threshold``, up to
``max_rounds``. Each decision (and the round's rollout + score seconds) is recorded in
``run_dir/rounds.json``; a re-run re-reads the recorded decisions and continues from there.

The run is planned first, as data (:func:`plan`: a list of steps, each a stage, its typed config
and a label), printed, then executed. Variant and round configs are composed again from the
pipeline's own command line plus a few overrides (``stages.lib.config.variant_config`` and
``round_config``), so they follow the command line's rules exactly.
Reads/writes: everything under ``run_dir`` (see ``stages/lib/layout.py``).
"""

from __future__ import annotations

import importlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

from stages.lib import remote
from stages.lib.config import (
    ADAPTIVE_METRICS,
    STAGES,
    Config,
    PipelineConfig,
    round_config,
    variant_config,
)
from stages.lib.entry import hydra_entry
from stages.lib.errors import UserError
from stages.lib.layout import RunLayout
from stages.lib.progress import log
from stages.lib.spec import StageSpec
from stages.lib.store import atomic_write_text


@dataclass(frozen=True)
class Step:
    """One stage run of the plan."""

    stage: str  # module stages.<stage>, run as stages.<stage>.run(cfg)
    cfg: Config  # the typed config it runs with
    label: str  # what the plan prints (e.g. "variant opd: train")
    group: str  # timings key the step adds to: the stage, "variant:<name>" or "round<r>"
    round: int | None = None  # the round whose rollout/score/select/train this is (None: other)
    conditional: bool = False  # runs only if the previous round's decision fired (adaptive)


def _describe(cfg: Config) -> str:
    return f"run_dir={cfg.run_dir} train.name={cfg.train.name} select={cfg.select.name}"


def plan(cfg: Config) -> list[Step]:
    """The steps ``run`` executes, in order: ``pipeline.stages``, with the variants' and later
    rounds' steps right after ``train``, so that ``eval`` (and the report, which shows its
    results) come after every checkpoint exists."""
    steps: list[Step] = []
    ad = cfg.pipeline.adaptive
    last = ad.max_rounds if ad.enabled else cfg.pipeline.rounds
    for stage in cfg.pipeline.stages:
        if stage == "sft" and not cfg.sft.enabled:
            continue
        in_round = stage in ROUND_STAGES
        steps.append(Step(stage, cfg, stage, stage, round=1 if in_round else None))
        if stage != "train":
            continue
        for v in cfg.pipeline.variants:
            vcfg = variant_config(cfg, v)
            label, group = f"variant {v.name}", f"variant:{v.name}"
            steps += [Step(s, vcfg, f"{label}: {s}", group) for s in VARIANT_STAGES]
        for r in range(2, last + 1):  # adaptive: every possible round, each conditional
            rcfg, mark = round_config(cfg, r), "?" if ad.enabled else ""
            steps += [
                Step(s, rcfg, f"round {r}{mark}: {s}", f"round{r}", r, ad.enabled)
                for s in ROUND_STAGES
            ]
    return steps


def spec(name: str) -> StageSpec:
    """Stage ``name``'s spec (``SPEC`` of ``stages/<name>.py``)."""
    return importlib.import_module(f"stages.{name}").SPEC


# What a round of fresh rollouts, and a training variant, run again: from the stages' specs.
ROUND_STAGES = tuple(s for s in STAGES if spec(s).rounds)
VARIANT_STAGES = tuple(s for s in STAGES if spec(s).variants)


def format_plan(steps: list[Step]) -> str:
    cond = [st for st in steps if st.conditional]
    head = f"pipeline plan: {len(steps)} steps"
    lines = [head + (f" ({len(cond)} conditional)" if cond else "")]
    for i, st in enumerate(steps, 1):
        lines.append(f"  {i:2d}. {st.label:<24s} {_describe(st.cfg)}")
    if cond:
        ad = cond[0].cfg.pipeline.adaptive
        lines.append(
            f"  'round r?' steps run only if round r-1's training ends with |{ad.metric}| >= "
            f"{ad.threshold:g} (mean of its last {ad.window} logged rows; pipeline.adaptive, "
            f"at most {ad.max_rounds} rounds)"
        )
    return "\n".join(lines)


def run_stage(name: str, cfg: Config) -> dict:
    t0 = time.time()
    log.info(f"\n=== {name} ===")
    with remote.stage_session(cfg, name):  # a run on object storage: lease, pull, publish
        out = spec(name).run(cfg)
    log.info(f"=== {name} done in {time.time() - t0:.1f}s ===")
    return out if isinstance(out, dict) else {}


def run(cfg: Config) -> dict:
    with remote.stage_session(cfg, "pipeline"):  # nothing for a local run_dir
        return _run(cfg)


def _run(cfg: Config) -> dict:
    t0 = time.time()
    steps = plan(cfg)  # every derived config composes (and is checked) before anything runs
    log.info(format_plan(steps))
    timings: dict[str, float] = {}
    costs: dict[int, dict[str, float]] = {}  # round -> stage -> seconds (this invocation)
    decisions = Decisions(cfg) if cfg.pipeline.adaptive.enabled else None
    ran: list[Step] = []
    for st in steps:
        if st.conditional and decisions is not None and not decisions.runs(st.round):
            continue
        if st.label != st.stage:
            log.info(f"\n--- {st.label} ({_describe(st.cfg)}) ---")
        t = time.time()
        run_stage(st.stage, st.cfg)
        dt = time.time() - t
        timings[st.group] = timings.get(st.group, 0.0) + dt
        ran.append(st)
        if st.round is not None:
            costs.setdefault(st.round, {})[st.stage] = dt
        if decisions is not None and st.round is not None and st.stage == "train":
            decisions.after_training(st.round, st.cfg, costs.get(st.round, {}))
    timings["total"] = time.time() - t0
    log.info("\npipeline timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
    lay = RunLayout.of(cfg.run_dir)
    lay.root.mkdir(parents=True, exist_ok=True)
    # read by scripts/bench.py (demo.end_to_end_seconds)
    atomic_write_text(lay.timings, json.dumps(timings, indent=1))
    log.info(f"pipeline: done, {len(ran)} steps; wrote {lay.root}/ ({_wrote(cfg, ran)})")
    return timings


# ------------------------------------------------------------------------- adaptive rounds
def read_metrics(path: Path) -> list[dict]:
    """The rows of a training's metrics.jsonl (one JSON object per logged step)."""
    if not path.is_file():
        raise UserError(
            f"no training metrics at {path}",
            "pipeline.adaptive",
            "the round's training did not log (is train in pipeline.stages?); rerun the pipeline",
        )
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def decide(
    rows: list[dict], metric: str, threshold: float, window: int, where: str
) -> tuple[bool, float]:
    """(fire a new round?, the value): the mean of ``metric`` over the last ``window`` logged
    rows; fires when ``|value| >= threshold``. Pure: no files, no config."""
    if metric not in ADAPTIVE_METRICS:
        raise UserError(
            f"unknown round metric {metric!r}", where, f"use one of {list(ADAPTIVE_METRICS)}"
        )
    if not rows:
        raise UserError(
            "the round's training logged no rows", where, "rerun the round's training (train)"
        )
    last = rows[-window:]
    if any(metric not in r for r in last):
        raise UserError(
            f"the training metric {metric!r} is not in the logged rows",
            where,
            f"set pipeline.adaptive.metric to a logged one ({', '.join(ADAPTIVE_METRICS)}); "
            "staleness needs score.behavior=true, both need on-policy tokens",
        )
    value = sum(float(r[metric]) for r in last) / len(last)
    if not math.isfinite(value):
        raise UserError(
            f"the training metric {metric!r} is {value} (no on-policy tokens were trained?)",
            where,
            "check the selection keeps on-policy tokens, or choose another pipeline.adaptive.metric",
        )
    return abs(value) >= threshold, value


class Decisions:
    """The adaptive rounds' record (``run_dir/rounds.json``): one entry per finished round.
    A recorded entry made with the same metric, threshold and window is reused as it is."""

    def __init__(self, cfg: Config) -> None:
        self.ad = cfg.pipeline.adaptive
        self.path = RunLayout.of(cfg.run_dir).round_decisions
        old = json.loads(self.path.read_text()) if self.path.is_file() else {}
        self.recorded = {e["round"]: e for e in old.get("rounds", [])}
        self.entries: dict[int, dict] = {}
        self.last_round = 1  # the highest round allowed to run so far

    def runs(self, r: int | None) -> bool:
        return r is None or r <= self.last_round

    def after_training(self, r: int, rcfg: Config, cost: dict[str, float]) -> None:
        ad, old = self.ad, self.recorded.get(r)
        same = old is not None and (old["metric"], old["threshold"], old["window"]) == (
            ad.metric, ad.threshold, ad.window,
        )  # fmt: skip
        if same:
            fired, value = old["fired"], old["value"]
        else:
            path = RunLayout.of(rcfg.run_dir).metrics(rcfg.train.name)
            rows = read_metrics(path)
            fired, value = decide(rows, ad.metric, ad.threshold, ad.window, str(path))
        nxt = r + 1 if fired and r < ad.max_rounds else None
        seconds = {f"{s}_s": round(cost.get(s, 0.0), 3) for s in ("rollout", "score")}
        if old is not None:  # the cost is what the round took when it ran first
            seconds = {k: old.get(k, v) for k, v in seconds.items()}
        self.entries[r] = {
            "round": r, "train_name": rcfg.train.name, "metric": ad.metric,
            "value": value, "threshold": ad.threshold, "window": ad.window, "fired": fired,
            "next_round": nxt, **seconds,
        }  # fmt: skip
        self.last_round = nxt or r
        self._write()
        why = "starts round " + str(nxt) if nxt else ("max_rounds reached" if fired else "stops")
        log.info(
            f"pipeline: round {r} {ad.metric} {value:.4g} "
            f"{'>=' if fired else '<'} {ad.threshold:g}: {why}"
        )

    def _write(self) -> None:
        doc = {
            "metric": self.ad.metric,
            "threshold": self.ad.threshold,
            "max_rounds": self.ad.max_rounds,
            "rounds": [self.entries[r] for r in sorted(self.entries)],
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path, json.dumps(doc, indent=1))


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


SPEC = StageSpec(
    name="pipeline",
    run=run,
    config=PipelineConfig,
    uses=("sft", "select", "train"),
    reads=(),
    writes=("timings.json", "rounds.json"),
    dataset_id=(),
    extras=("s3",),
)

main = hydra_entry("pipeline")(run)

if __name__ == "__main__":
    main()
