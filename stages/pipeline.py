"""The pipeline: every stage in order, with one resolved config; resumes what is done.

    python -m stages.pipeline experiment=demo

Order (``pipeline.stages``): sft (when ``sft.enabled``) -> rollout -> score ->
select -> train -> eval -> report. Each stage skips work whose manifest already exists for the
same config (dataset ids), resumes a partial shard set, and refuses data written by a different
config unless ``overwrite=true``. ``pipeline.variants`` are extra training runs on the SAME cached
rollouts and teacher log-probs (another loss or selection): only select + train run again.
``pipeline.rounds`` > 1 adds rounds of fresh rollouts: rollout -> score -> select -> train again
from the previous round's checkpoint, under ``run_dir/round<r>/``; eval then shows every round.
Reads/writes: everything under ``run_dir`` (see DESIGN.md).
"""

from __future__ import annotations

import copy
import importlib
import json
import time
from pathlib import Path

import yaml
from omegaconf import OmegaConf

from stages.lib.config import CONF_DIR, Config, hydra_entry
from stages.lib.errors import UserError
from stages.lib.store import atomic_write_text

GROUPS = ("select", "loss", "train", "eval", "rollout", "score", "data")


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """A copy of ``cfg`` with Hydra-style overrides: ``group=option`` loads conf/<group>/<option>.yaml,
    ``a.b=value`` sets a key. Keys are type-checked against the dataclasses."""
    node = OmegaConf.structured(copy.deepcopy(cfg))
    for ov in overrides:
        key, sep, value = ov.partition("=")
        if not sep:
            raise UserError(f"override '{ov}' is not key=value", "pipeline.variants", None)
        if key in GROUPS and (CONF_DIR / key / f"{value}.yaml").exists():
            node[key] = OmegaConf.merge(
                OmegaConf.structured(type(getattr(cfg, key))()),
                OmegaConf.load(CONF_DIR / key / f"{value}.yaml"),
            )
        else:
            try:
                OmegaConf.update(
                    node,
                    key,
                    # YAML scalars as on the command line: 3.34 is a float, null is None
                    yaml.safe_load(value)
                    if not value.startswith(("[", "{"))
                    else OmegaConf.create(value),
                    merge=False,
                )
            except Exception as e:  # noqa: BLE001 - OmegaConf raises several types here
                raise UserError(
                    f"bad override '{ov}' ({e})",
                    "pipeline.variants",
                    "use group=option or a.b=value with existing keys",
                ) from None
    # train.name / train.selection default to interpolations of loss.name and select.name, which
    # the typed config has already resolved: re-derive them unless the overrides set them.
    keys = {ov.partition("=")[0] for ov in overrides}
    if "select" in keys and "train.selection" not in keys:
        node.train.selection = node.select.name
    if keys & {"select", "loss"} and "train.name" not in keys:
        node.train.name = f"{node.loss.name}-{node.select.name}"
    return OmegaConf.to_object(node)  # type: ignore[return-value]


def round_config(cfg: Config, r: int) -> Config:
    """Round ``r`` (>= 2) of fresh rollouts: the policy and the initial weights are round r-1's
    final checkpoint; teacher, reference, selection and loss stay; outputs go to run_dir/round<r>/.
    The seed moves on so that the samples (and which prompts are guided) are fresh."""
    prev_dir = Path(cfg.run_dir) if r == 2 else Path(cfg.run_dir) / f"round{r - 1}"
    prev_name = cfg.train.name if r == 2 else f"{cfg.train.name}-r{r - 1}"
    out = copy.deepcopy(cfg)
    out.run_dir = str(Path(cfg.run_dir) / f"round{r}")
    out.student.path = str(prev_dir / "checkpoints" / prev_name / "final")
    out.seed = cfg.seed + r - 1
    out.train.name = f"{cfg.train.name}-r{r}"
    out.train.init = None
    out.sft.enabled = False  # the SFT warm start happened before round 1
    out.pipeline.variants = []
    return out


def run_stage(name: str, cfg: Config) -> dict:
    mod = importlib.import_module(f"stages.{name}")
    t0 = time.time()
    print(f"\n=== {name} ===", flush=True)
    out = mod.run(cfg)
    print(f"=== {name} done in {time.time() - t0:.1f}s ===", flush=True)
    return out if isinstance(out, dict) else {}


def run(cfg: Config) -> dict:
    t0 = time.time()
    timings: dict[str, float] = {}
    for stage in cfg.pipeline.stages:
        if stage == "sft" and not cfg.sft.enabled:
            continue
        if stage == "eval" and (cfg.pipeline.variants or cfg.pipeline.rounds > 1):
            continue  # evaluate once, after the variants and later rounds are trained too
        t = time.time()
        run_stage(stage, cfg)
        timings[stage] = time.time() - t
        if stage == "train":
            for v in cfg.pipeline.variants:
                vcfg = apply_overrides(cfg, [*v.overrides, f"train.name={v.name}"])
                t = time.time()
                print(f"\n--- variant {v.name}: {' '.join(v.overrides)} ---", flush=True)
                run_stage("select", vcfg)
                run_stage("train", vcfg)
                timings[f"variant:{v.name}"] = time.time() - t
        if stage == "train":
            for r in range(2, cfg.pipeline.rounds + 1):
                rcfg, t = round_config(cfg, r), time.time()
                print(f"\n--- round {r}: rollouts from {rcfg.student.path} ---", flush=True)
                for name in ("rollout", "score", "select", "train"):
                    run_stage(name, rcfg)
                timings[f"round{r}"] = time.time() - t
    if (cfg.pipeline.variants or cfg.pipeline.rounds > 1) and "eval" in cfg.pipeline.stages:
        t = time.time()
        run_stage("eval", cfg)
        timings["eval"] = time.time() - t
    timings["total"] = time.time() - t0
    print("\npipeline timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
    # read by scripts/bench.py (demo.end_to_end_seconds)
    atomic_write_text(Path(cfg.run_dir) / "timings.json", json.dumps(timings, indent=1))
    return timings


main = hydra_entry("pipeline")(run)

if __name__ == "__main__":
    main()
