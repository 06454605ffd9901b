"""Typed configs: dataclasses registered in Hydra's ConfigStore, composed from ``conf/``.

Every stage composes the same tree (``conf/base.yaml``): ``student``/``teacher``/``ref`` (one
``model`` group in three roles), ``data``, ``rollout``, ``score``, ``select``, ``loss``, ``train``,
``eval``, ``sft``, ``report``, ``pipeline`` and ``experiment`` files that pin whole runs. A
mistyped key fails at compose time (struct mode); impossible values fail in ``__post_init__`` with
a ``UserError``. Library code receives the typed ``Config`` (``OmegaConf.to_object``), never a
raw dict, so it does not need ``cfg.get("k", default)``.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from stages.lib.errors import UserError, report_and_exit

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def _check(ok: bool, key: str, what: str) -> None:
    if not ok:
        raise UserError(f"impossible config value: {key} {what}", "config", f"fix {key}")


@dataclass
class ModelConfig:
    # Local Hugging Face model directory (save_pretrained format); null when the role is unused.
    path: str | None = None
    # Weights dtype for inference passes (rollout/score): float32 | bfloat16 | float16.
    dtype: str = "float32"
    # Short label used in reports; defaults to the directory name.
    name: str | None = None


@dataclass
class DataConfig:
    # Prompts: a JSONL or Parquet file, or a `datasets` save_to_disk folder; columns id and
    # prompt (text) or messages (a chat: [{role, content}]), optional context, answer, kind.
    prompts: str | None = None
    # Split read from a save_to_disk DatasetDict (prompts and eval sets).
    split: str = "train"
    # Eval sets: name -> prompts file with verifiable answers (used by the eval stage).
    eval_sets: dict[str, str] = field(default_factory=dict)
    # Use only the first N prompts (smoke runs); null = all.
    max_prompts: int | None = None

    def __post_init__(self) -> None:
        _check(self.max_prompts is None or self.max_prompts > 0, "data.max_prompts", "must be > 0")


@dataclass
class WorkerConfig:
    # This worker's index in 0..count-1: it writes shards s with s % count == index.
    index: int = 0
    # Number of workers splitting rollout/score shards (across processes or machines).
    count: int = 1

    def __post_init__(self) -> None:
        _check(self.count >= 1, "worker.count", "must be >= 1")
        _check(0 <= self.index < self.count, "worker.index", "must be in 0..worker.count-1")


@dataclass
class RolloutConfig:
    # hf | vllm | auto (auto = vllm where CUDA is present, else hf).
    backend: str = "auto"
    # Samples per prompt.
    n: int = 2
    # Sampling temperature (> 0) and nucleus top-p in (0, 1].
    temperature: float = 1.0
    top_p: float = 1.0
    # Maximum response length in tokens (the EOS token counts).
    max_new_tokens: int = 32
    # Fraction of prompts (those with a context) whose rollouts are guided (EDGE-OPD).
    guided_fraction: float = 0.0
    # Text the student is trained on ({prompt}; never the context).
    prompt_template: str = "{prompt}"
    # Text a guided rollout is generated from.
    guided_template: str = "{context} {prompt}"
    # Prefix the teacher scores the response after ("{prompt}" = no privileged context).
    teacher_template: str = "{context} {prompt}"
    # Longest prompt (tokens) accepted; null = the model's context length minus max_new_tokens.
    max_prompt_tokens: int | None = None
    # What to do with a longer prompt: error (default) | skip (listed in the manifest, not written).
    too_long: str = "error"
    # Prompts per shard (a shard is the unit of resume and of worker splitting).
    prompts_per_shard: int = 256
    # Prompts per generation batch (HF backend).
    batch_size: int = 64
    # vLLM: fraction of memory for the KV cache (on CPU, of system RAM).
    vllm_memory_fraction: float = 0.25
    # Chat rows (`messages`): a Jinja chat template file replacing the tokenizers' own (null =
    # each tokenizer's chat_template; the teacher prefix uses the teacher tokenizer's).
    chat_template: str | None = None
    # Keyword arguments of apply_chat_template for the student's prefixes (train and rollout).
    template_kwargs: dict[str, Any] = field(default_factory=dict)
    # The same for the teacher's prefix only (e.g. {enable_thinking: true} for a thinking teacher).
    teacher_template_kwargs: dict[str, Any] = field(default_factory=dict)
    # Where a chat row's privileged context goes in the teacher (and guided) prefix: system
    # (appended to the system message, created when absent) | user (before the last user message).
    context_placement: str = "system"
    # Wording of the context block ({context}); joined to the message text by context_separator.
    context_template: str = "{context}"
    context_separator: str = "\n\n"
    # Chat rows with earlier assistant turns: one sample per assistant turn (the student regenerates
    # each, after the turns before it) instead of one sample after the whole conversation.
    expand_turns: bool = False
    # Extra stop token ids and stop strings (besides the tokenizer EOS and every id of the model's
    # generation_config.eos_token_id); the stop token is kept in the response.
    stop_token_ids: list[int] = field(default_factory=list)
    stop_strings: list[str] = field(default_factory=list)
    # How a response is graded against the prompt's answer (the `correct` column):
    # words | exact | contains | normalised | regex (stages/lib/grading.py).
    match: str = "words"

    def __post_init__(self) -> None:
        from stages.lib.grading import MODES

        _check(self.backend in ("hf", "vllm", "auto"), "rollout.backend", "must be hf|vllm|auto")
        _check(
            self.context_placement in ("system", "user"),
            "rollout.context_placement",
            "must be system|user",
        )
        _check("{context}" in self.context_template, "rollout.context_template", "needs {context}")
        _check(all(s for s in self.stop_strings), "rollout.stop_strings", "must be non-empty")
        _check(all(i >= 0 for i in self.stop_token_ids), "rollout.stop_token_ids", "must be >= 0")
        _check(self.match in MODES, "rollout.match", f"must be one of {'|'.join(MODES)}")
        _check(self.n >= 1, "rollout.n", "must be >= 1")
        _check(self.temperature > 0, "rollout.temperature", "must be > 0")
        _check(0 < self.top_p <= 1, "rollout.top_p", "must be in (0, 1]")
        _check(self.max_new_tokens >= 1, "rollout.max_new_tokens", "must be >= 1")
        _check(0 <= self.guided_fraction <= 1, "rollout.guided_fraction", "must be in [0, 1]")
        _check(self.too_long in ("error", "skip"), "rollout.too_long", "must be error|skip")
        _check(self.prompts_per_shard >= 1, "rollout.prompts_per_shard", "must be >= 1")


@dataclass
class ScoreConfig:
    # hf | vllm | auto (as in rollout).
    backend: str = "auto"
    # Teacher top-K ids/log-probs stored per token (must be <= the vocabulary size).
    topk: int = 32
    # Also score the behaviour policy (full-vocab entropy and log-prob after the rollout prompt).
    behavior: bool = True
    # Behaviour top-K ids with the teacher's log-probs on them (vOPD student support); 0 = off.
    behavior_topk: int = 0
    # Compute full-vocabulary entropies (teacher and behaviour).
    entropy: bool = True
    # Token budget per forward batch (sequences are length-bucketed to fill it).
    batch_tokens: int = 8192
    # Positions per chunk of the fp32 LM head (bounds memory; 128-256 keeps [chunk, V] in cache).
    chunk_positions: int = 256
    # Allow an OPD teacher that differs from the SFT teacher (Lightning OPD teacher consistency).
    allow_teacher_mismatch: bool = False

    def __post_init__(self) -> None:
        _check(self.backend in ("hf", "vllm", "auto"), "score.backend", "must be hf|vllm|auto")
        _check(self.topk >= 1, "score.topk", "must be >= 1")
        _check(self.behavior_topk >= 0, "score.behavior_topk", "must be >= 0")
        _check(self.batch_tokens >= 1, "score.batch_tokens", "must be >= 1")


@dataclass
class SelectRule:
    # A policy: the name of a SQL file in stages/sql_policies/ (all, entropy, tip_q3, ...).
    policy: str = "all"
    # Its parameters (bound into the SQL); see the header of the SQL file.
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class SelectConfig:
    # Output name: selected/<name>/. Several selections of one run coexist.
    name: str = "all"
    # Policies composed by the product of their weights (a mask is a 0/1 weight).
    rules: list[SelectRule] = field(default_factory=lambda: [SelectRule()])
    # Rows per output shard.
    rows_per_shard: int = 4096
    # Rows per Parquet row group: the unit the trainer shuffles and strides over ranks (small =
    # better mixing of neighbouring prompts; each row is one sequence).
    row_group_rows: int = 64
    # DuckDB memory limit (it spills to disk beyond it) and threads.
    memory_limit: str = "4GB"
    threads: int = 2


@dataclass
class LossTerm:
    # Loss name: opd_k1 | vopd | exopd | topk_fkl | topk_rkl | gkd_jsd | tropd | sft.
    name: str = "opd_k1"
    # Weight of this term in the sum.
    weight: float = 1.0
    # Loss-specific arguments (is_clip, support, lam, tail_bucket, form, beta, tau, outlier).
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class LossConfig:
    # Label used in run names and reports.
    name: str = "opd_k1"
    # Terms summed with their weights (composition of losses).
    terms: list[LossTerm] = field(default_factory=lambda: [LossTerm()])
    # Temperature of the student/teacher distributions inside the loss.
    temperature: float = 1.0

    def __post_init__(self) -> None:
        _check(self.temperature > 0, "loss.temperature", "must be > 0")
        _check(len(self.terms) >= 1, "loss.terms", "needs at least one term")


@dataclass
class LoraConfig:
    # LoRA rank; 0 = full fine-tuning.
    r: int = 0
    # LoRA alpha and dropout.
    alpha: int = 16
    dropout: float = 0.0
    # Module names to adapt.
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"]
    )
    # Save merged weights (a plain HF checkpoint) or the adapter only.
    save_merged: bool = True


@dataclass
class TrainConfig:
    # Run name: checkpoints/<name>/ and metrics; several trainings of one run dir coexist.
    name: str = "${loss.name}-${select.name}"
    # Selection to train on: selected/<selection>/ (default: the current select.name).
    selection: str = "${select.name}"
    # Initial weights: null = student.path (or the SFT checkpoint when the run has one).
    init: str | None = None
    # Passes over the selected shards; max_steps caps optimizer steps (null = no cap).
    epochs: int = 1
    max_steps: int | None = None
    # Token budget of one micro-batch (prompt + response tokens, padded), and micro-batches per step.
    micro_batch_tokens: int = 4096
    grad_accum: int = 1
    # AdamW.
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    # Schedule: warmup steps then cosine (to min_lr_ratio * lr) or constant.
    warmup_steps: int = 0
    schedule: str = "cosine"
    min_lr_ratio: float = 0.1
    # Gradient clipping by global norm (0 = off).
    grad_clip: float = 1.0
    # Shuffle row groups per epoch (seeded).
    shuffle: bool = True
    # Log metrics every N steps; save a resumable checkpoint every N steps (null = end only).
    log_every: int = 10
    save_every: int | None = None
    # Continue from the latest checkpoint of this run name when one exists.
    resume: bool = True
    # Standard (online) OPD baseline: live teacher forward pass in the loop instead of cached values.
    online: bool = False
    # auto | cpu | cuda; bf16 autocast on CUDA.
    device: str = "auto"
    # Shard the model with FSDP2 under torchrun (else DDP when world size > 1).
    fsdp: bool = False
    # Positions per chunk of the student's LM head inside the loss.
    chunk_positions: int = 1024
    # Row groups prefetched by the background loader thread.
    prefetch: int = 2
    # Also write TensorBoard events.
    tensorboard: bool = True
    # Optional LoRA adapters.
    lora: LoraConfig = field(default_factory=LoraConfig)

    def __post_init__(self) -> None:
        _check(self.epochs >= 1, "train.epochs", "must be >= 1")
        _check(self.grad_accum >= 1, "train.grad_accum", "must be >= 1")
        _check(self.micro_batch_tokens >= 1, "train.micro_batch_tokens", "must be >= 1")
        _check(self.lr > 0, "train.lr", "must be > 0")
        _check(self.schedule in ("cosine", "constant"), "train.schedule", "must be cosine|constant")


@dataclass
class SftConfig:
    # Run the SFT stage (teacher answers the prompts, student trained with cross-entropy).
    enabled: bool = False
    # Teacher responses per prompt, and their sampling temperature (0 = greedy).
    n: int = 1
    temperature: float = 0.0
    # SFT optimisation (the rest of the train group applies).
    epochs: int = 3
    lr: float = 1e-3


@dataclass
class EvalConfig:
    # Eval set names from data.eval_sets (empty = all).
    sets: list[str] = field(default_factory=list)
    # Checkpoints to evaluate: names under checkpoints/ or paths (empty = base + every trained one).
    checkpoints: list[str] = field(default_factory=list)
    # Greedy decoding length and batch size.
    max_new_tokens: int = 32
    batch_size: int = 128
    # Sampled pass@k (0 = off) at this temperature.
    pass_k: int = 0
    temperature: float = 1.0
    # Held-out prompts for mean per-token reverse KL to the teacher (first eval set if null).
    kl_set: str | None = None
    # Prompts used for the KL estimate.
    kl_prompts: int = 64
    # How an answer is graded: words | exact | contains | normalised | regex (stages/lib/grading.py).
    match: str = "words"
    # Save every greedy generation (text and ids) under eval/generations/<checkpoint>/<set>.parquet.
    save_generations: bool = True

    def __post_init__(self) -> None:
        from stages.lib.grading import MODES

        _check(self.match in MODES, "eval.match", f"must be one of {'|'.join(MODES)}")
        _check(self.max_new_tokens >= 1, "eval.max_new_tokens", "must be >= 1")
        _check(self.batch_size >= 1, "eval.batch_size", "must be >= 1")
        _check(self.pass_k >= 0, "eval.pass_k", "must be >= 0")


@dataclass
class ReportConfig:
    # Rollouts sampled into the HTML token browser.
    max_rollouts: int = 200
    # Teacher top-k entries shown per token.
    show_topk: int = 8


@dataclass
class TrainVariant:
    # A training run of the pipeline on the cached shards: loss, select and train overrides.
    name: str = MISSING
    overrides: list[str] = field(default_factory=list)


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

    def __post_init__(self) -> None:
        _check(self.rounds >= 1, "pipeline.rounds", "must be >= 1")


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
    ref: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    select: SelectConfig = field(default_factory=SelectConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sft: SftConfig = field(default_factory=SftConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)


def register() -> None:
    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)


register()


def to_config(cfg: DictConfig) -> Config:
    """Resolve interpolations and turn a composed DictConfig into the typed ``Config``."""
    return OmegaConf.to_object(cfg)  # type: ignore[return-value]


def as_dict(cfg: Config) -> dict:
    """A plain, JSON-able dict of the resolved config (stored in manifests)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


def compose(stage: str, overrides: list[str] | None = None) -> Config:
    """Compose a stage's config like the CLI does (tests, the pipeline, notebooks)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = hydra_compose(config_name=stage, overrides=list(overrides or []))
    return to_config(cfg)


def _check_overrides(stage: str, argv: list[str]) -> None:
    """Compose once before Hydra does, so that a mistyped key or a malformed override is one
    ``error:`` line (exit 2) instead of Hydra's multi-line report."""
    if any(a.startswith("-") for a in argv):  # --help, --cfg, --multirun: Hydra's business
        return
    overrides = [a for a in argv if not a.lstrip("+~").startswith("hydra")]
    try:
        compose(stage, overrides)
    except UserError:
        return  # impossible values: reported by the stage's own entry point
    except Exception as e:  # hydra/omegaconf override and composition errors
        msgs = [str(e), str(e.__cause__ or "")]
        what = "; ".join(ln.strip() for m in msgs for ln in m.splitlines() if ln.strip())
        report_and_exit(
            UserError(
                f"invalid config override: {what[:400]}",
                "command line",
                f"check the key names and values (python -m stages.{stage} --cfg job prints "
                "the whole config)",
            )
        )


def hydra_entry(stage: str) -> Callable[[Callable[[Config], Any]], Callable[[], None]]:
    """Make a stage's ``main()``: compose ``conf/<stage>.yaml`` + CLI overrides, run, exit cleanly.

    Hydra's output directory is disabled: pipeline data lives only under ``run_dir``.
    """

    def deco(run: Callable[[Config], Any]) -> Callable[[], None]:
        import hydra

        @hydra.main(config_path=str(CONF_DIR), config_name=stage, version_base="1.3")
        def _main(dcfg: DictConfig) -> None:
            try:
                cfg = to_config(dcfg)
                run(cfg)
            except UserError as err:
                report_and_exit(err)

        @functools.wraps(run)
        def main() -> None:
            # no Hydra output dirs or log files: runs are keyed by run_dir
            sys.argv += [
                "hydra.output_subdir=null",
                "hydra.run.dir=.",
                "hydra/job_logging=none",
                "hydra/hydra_logging=none",
            ]
            _check_overrides(stage, sys.argv[1:])
            _main()

        return main

    return deco
