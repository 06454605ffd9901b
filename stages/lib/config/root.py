"""The root ``Config``: the pipeline's own keys (variants, adaptive rounds) and the whole tree, registered in Hydra's ConfigStore."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from stages.lib import mirror
from stages.lib.config.checks import _check, _check_finite, _closest
from stages.lib.config.schema import (
    STAGES,
    DataConfig,
    EvalConfig,
    LauncherConfig,
    ModelConfig,
    ReportConfig,
    RolloutConfig,
    ScoreConfig,
    SelectConfig,
    WorkerConfig,
)
from stages.lib.config.training import LossConfig, SftConfig, TrainConfig
from stages.lib.errors import UserError
from stages.lib.layout import RunLayout, check_name


@dataclass
class TrainVariant:
    # A training run of the pipeline on the cached shards: loss, select and train overrides.
    name: str = MISSING
    overrides: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        check_name(self.name, "pipeline.variants[].name")  # it becomes the variant's train.name
        for ov in self.overrides:
            _check(
                "=" in ov,
                f"pipeline.variants[{self.name}].overrides",
                f"entries are key=value or group=option (got {ov!r})",
            )


ADAPTIVE_METRICS = ("staleness", "rkl_k1")  # trainer metrics a round decision can read


@dataclass
class AdaptiveConfig:
    # Rounds of fresh rollouts started on demand: after a round's training, the pipeline reads the
    # trainer's metric from that round's metrics.jsonl and starts the next round (rollout from the
    # round's final checkpoint -> score -> select -> train) when |value| >= threshold.
    # The metric: staleness (mean log pi_theta - log pi_b on the trained tokens: how far the
    # student has moved from the policy that sampled its data) | rkl_k1 (the k1 estimate of
    # KL(pi_theta || teacher) on those tokens).
    metric: str = "staleness"
    # Start a new round when |metric| >= threshold (in nats per token; >= 0).
    threshold: float = 0.05
    # Most rounds in all, round 1 included; 1 = off (no adaptive rounds; pipeline.rounds applies).
    max_rounds: int = 1
    # The value is the mean over the last `window` logged rows of the round's training.
    window: int = 4

    def __post_init__(self) -> None:
        _check_finite(self, "pipeline.adaptive")
        _check(
            self.metric in ADAPTIVE_METRICS,
            "pipeline.adaptive.metric",
            f"must be {'|'.join(ADAPTIVE_METRICS)} (got {self.metric!r})",
        )
        _check(self.threshold >= 0, "pipeline.adaptive.threshold", "must be >= 0")
        _check(self.max_rounds >= 1, "pipeline.adaptive.max_rounds", "must be >= 1")
        _check(self.window >= 1, "pipeline.adaptive.window", "must be >= 1")

    @property
    def enabled(self) -> bool:
        return self.max_rounds > 1


@dataclass
class PipelineConfig:
    # Stages in order (sft runs only when sft.enabled).
    stages: list[str] = field(
        default_factory=lambda: ["sft", "rollout", "score", "select", "train", "eval", "report"]
    )
    # Extra training runs on the same cached log-probs (ablations), each "key=value" overrides.
    variants: list[TrainVariant] = field(default_factory=list)
    # Rounds of fresh rollouts: round r >= 2 samples with round r-1's final checkpoint, scores with
    # the same teacher and reference, and trains on from it, all under run_dir/round<r>/ (its
    # checkpoint is checkpoints/<train.name>-r<r>). 1 = one offline pass (Lightning OPD).
    rounds: int = 1
    # Rounds started when the trainer's staleness (or KL) passes a threshold, instead of a fixed
    # number (pipeline.adaptive.max_rounds > 1 turns it on; then pipeline.rounds must stay 1).
    adaptive: AdaptiveConfig = field(default_factory=AdaptiveConfig)

    def __post_init__(self) -> None:
        _check(self.rounds >= 1, "pipeline.rounds", "must be >= 1")
        _check(
            self.rounds == 1 or not self.adaptive.enabled,
            "pipeline.rounds",
            "must be 1 when pipeline.adaptive.max_rounds > 1 (one round schedule: fixed or adaptive)",
        )
        for st in self.stages:
            if st not in STAGES:
                raise UserError(
                    f"unknown stage {st!r} in pipeline.stages",
                    "config",
                    f"use stages from {list(STAGES)}{_closest(st, STAGES)}",
                )
        _check(len(set(self.stages)) == len(self.stages), "pipeline.stages", "lists a stage twice")
        names = [v.name for v in self.variants]
        _check(len(set(names)) == len(names), "pipeline.variants", "names must be unique")


@dataclass
class Source:
    # How a config was composed (filled in by compose(); a value set by hand is replaced).
    # Primary config: conf/<stage>.yaml, or --config-name.
    config_name: str = ""
    # The overrides, in order.
    overrides: list[str] = field(default_factory=list)
    # Extra config folders (--config-dir), absolute; searched after conf/.
    config_dirs: list[str] = field(default_factory=list)


@dataclass
class Config:
    # Which stage this config is for (set by each primary config file).
    stage: str = "pipeline"
    # Every output of the run lives under this directory (rollouts/, tokens/, selected/, ...).
    run_dir: str = "runs/default"
    # Global seed (sampling, selection, shuffling, init).
    seed: int = 0
    # Replace outputs written by a different config instead of refusing.
    overwrite: bool = False
    # Show tracebacks for user errors.
    debug: bool = False
    # The model being trained, the teacher, and an optional reference model.
    student: ModelConfig = field(default_factory=ModelConfig)
    teacher: ModelConfig = field(default_factory=ModelConfig)
    # Several teachers for the score stage, by name (each scores the rollouts score.route_by
    # sends to it; one model resident at a time). Empty = `teacher` alone scores everything.
    # (Typed as plain mappings so that `teachers={a: {path: ...}}` works on the command line;
    # __post_init__ turns each into a checked ModelConfig.)
    teachers: dict[str, Any] = field(default_factory=dict)
    ref: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    # Where rollout and score run their shards: this process, or Ray actors.
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    select: SelectConfig = field(default_factory=SelectConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sft: SftConfig = field(default_factory=SftConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    # How this config was composed: derived configs (pipeline variants and rounds, the SFT
    # training) are composed again from it; manifests keep it as provenance.
    source: Source = field(default_factory=Source)

    def __post_init__(self) -> None:
        self.run_dir = mirror.adopt_credentials(self.run_dir)  # never kept in the config
        # numpy's seeds are 0..2**32-1: anything else is a traceback deep inside a stage
        _check(
            isinstance(self.seed, int) and 0 <= self.seed < 2**32, "seed", "must be in 0..2**32-1"
        )
        RunLayout.of(self.run_dir)  # not empty (an empty run_dir writes into the cwd)
        self._check_teachers()
        _check(
            self.launcher.kind == "local" or self.worker.count == 1,
            "launcher.kind=ray",
            "takes the whole shard plan: leave worker.index/worker.count at 0/1",
        )
        for group in ("rollout", "score"):  # a Ray actor holds one engine and its GPUs
            tp = getattr(self, group).tensor_parallel_size
            _check(
                self.launcher.kind == "local" or tp <= max(self.launcher.num_gpus, 1),
                f"{group}.tensor_parallel_size={tp}",
                f"needs launcher.num_gpus >= {tp} (each Ray actor's engine spans {tp} GPUs)",
            )
        ad = self.pipeline.adaptive
        _check(
            not (ad.enabled and ad.metric == "staleness" and not self.score.behavior),
            "pipeline.adaptive.metric=staleness",
            "needs score.behavior=true (staleness is measured against the behaviour log-prob)",
        )
        self._check_eval_sets()
        for v in self.pipeline.variants:
            _check(
                v.name != self.train.name,
                "pipeline.variants[].name",
                f"{v.name!r} is the main training's train.name (its checkpoints would collide)",
            )

    def _check_teachers(self) -> None:
        """`teachers` and `score.route_by` go together, and every route names a teacher."""
        rb, names = self.score.route_by, sorted(self.teachers)
        keys = [f.name for f in dataclasses.fields(ModelConfig)]
        for name, m in list(self.teachers.items()):
            check_name(name, "teachers key")  # it becomes the tokens' teacher_id
            if not isinstance(m, ModelConfig):
                bad = [k for k in (m or {}) if k not in keys] if isinstance(m, dict) else [m]
                _check(not bad, f"teachers.{name}", f"takes keys {keys} (got {bad})")
                self.teachers[name] = m = ModelConfig(**m)
            _check(m.path is not None, f"teachers.{name}.path", "must be set")
        if not self.teachers:
            _check(rb.column is None, "score.route_by.column", "needs teachers (several models)")
            _check(rb.sql is None, "score.route_by.sql", "needs teachers (several models)")
            return
        _check(rb.enabled, "score.route_by.column", "must be set with teachers (or route_by.sql)")
        for value, name in [*rb.map.items(), ("(default)", rb.default)]:
            if name is not None and name not in self.teachers:
                raise UserError(
                    f"score.route_by sends {value!r} to teacher {name!r}, which is not in teachers",
                    "score.route_by",
                    f"use one of {names}{_closest(str(name), names)}",
                )

    def _check_eval_sets(self) -> None:
        """eval.sets and eval.kl_set name data.eval_sets (checkable once eval sets are given)."""
        known = list(self.data.eval_sets)
        if not known:
            return  # the eval stage says that there is nothing to evaluate
        for n in self.eval.sets:
            if n not in known:
                raise UserError(
                    f"eval set {n!r} is not in data.eval_sets",
                    "eval.sets",
                    f"choose from {sorted(known)}{_closest(n, known)}",
                )
        pool = self.eval.sets or known
        if self.eval.kl_set is not None and self.eval.kl_set not in pool:
            raise UserError(
                f"eval.kl_set={self.eval.kl_set!r} is not among the eval sets",
                "eval.kl_set",
                f"set eval.kl_set to one of {sorted(pool)}{_closest(self.eval.kl_set, pool)} "
                "or null (the first eval set)",
            )


def register() -> None:
    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)


register()
