"""The training groups: the loss terms, LoRA, the trainer and the SFT warm start; one dataclass each,
a comment on every key, values checked in ``__post_init__``."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from stages.lib.config.checks import (
    _check,
    _check_finite,
    _interpolation,
    check_loss_term,
)
from stages.lib.layout import check_name


@dataclass
class LossTerm:
    # Loss name: opd_k1 | vopd | exopd | topk_fkl | topk_rkl | gkd_jsd | tropd | sft.
    name: str = "opd_k1"
    # Weight of this term in the sum.
    weight: float = 1.0
    # Loss-specific arguments (is_clip, support, lam, tail_bucket, form, beta, tau, outlier).
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check(math.isfinite(self.weight), "loss.terms[].weight", "must be finite")
        # a negative weight would train the student away from the teacher
        _check(self.weight >= 0, "loss.terms[].weight", f"must be >= 0 (got {self.weight})")
        check_loss_term(self.name, self.kwargs)


@dataclass
class LossConfig:
    # Label used in run names and reports.
    name: str = "opd_k1"
    # Terms summed with their weights (composition of losses).
    terms: list[LossTerm] = field(default_factory=lambda: [LossTerm()])
    # Temperature of the student/teacher distributions inside the loss.
    temperature: float = 1.0

    def __post_init__(self) -> None:
        _check_finite(self, "loss")
        _check(self.temperature > 0, "loss.temperature", "must be > 0")
        _check(len(self.terms) >= 1, "loss.terms", "needs at least one term")
        _check(any(t.weight > 0 for t in self.terms), "loss.terms[].weight", "one must be > 0")


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

    def __post_init__(self) -> None:
        _check(self.r >= 0, "train.lora.r", "must be >= 0")
        _check(self.alpha > 0, "train.lora.alpha", "must be > 0")
        _check(0 <= self.dropout < 1, "train.lora.dropout", "must be in [0, 1)")


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
    # torch's fused AdamW kernel (one pass over each tensor instead of about seven: ~3x faster
    # optimizer steps on CPU; Hugging Face Trainer's default since torch 2.8). Off: the per-tensor kernel,
    # whose weights differ from the fused one's by rounding (~1 ulp per step); the demo experiments
    # pin it off, the kernel their documented results were measured with.
    fused_adamw: bool = True
    # Schedule: warmup steps then cosine (to min_lr_ratio * lr) or constant.
    warmup_steps: int = 0
    schedule: str = "cosine"
    min_lr_ratio: float = 0.1
    # Gradient clipping by global norm (0 = off).
    grad_clip: float = 1.0
    # Row order per epoch (seeded; row groups are shuffled in every mode but false):
    # prompts = the blocks of rows with the same train prompt (a prompt's rollout.n samples) are
    # shuffled inside each row group, its rows kept adjacent, so they share micro-batches and
    # share_prefix runs the prompt once for them; rows (or true, its meaning before prompts
    # existed) = single rows, scattering a prompt's samples; false = storage order.
    shuffle: bool | str = "prompts"
    # Log metrics every N steps; save a resumable checkpoint every N steps (null = end only).
    log_every: int = 10
    save_every: int | None = None
    # Continue from the latest checkpoint of this run name when one exists.
    resume: bool = True
    # Standard (online) OPD baseline: live teacher forward pass in the loop instead of cached values.
    online: bool = False
    # auto | cpu | cuda.
    device: str = "auto"
    # Shard the model with FSDP2 under torchrun (else DDP when world size > 1).
    fsdp: bool = False
    # Positions per chunk of the student's LM head inside the loss; null = the most that fit
    # train.loss_memory_mib (the loss's working set is one [chunk, V] fp32 block and scratch).
    chunk_positions: int | None = None
    # Memory budget of the loss's [chunk, V] working set, in MiB (used when chunk_positions is
    # null): at V = 151,936 the default 512 gives 828 positions per chunk.
    loss_memory_mib: int = 512
    # Row groups prefetched by the background loader thread.
    prefetch: int = 2
    # Experiment trackers, each fed the metrics.jsonl rows and the resolved config:
    # tensorboard (events in train/<name>/tb), wandb, mlflow (extras: pip install distillery[trackers]).
    trackers: list[str] = field(default_factory=lambda: ["tensorboard"])
    # W&B mode (offline writes train/<name>/wandb, `wandb sync` uploads it later; online needs a login)
    # and the W&B project / MLflow experiment name.
    wandb_mode: str = "offline"
    tracker_project: str = "distillery"
    # MLflow tracking URI; null = a file store in train/<name>/mlruns.
    mlflow_tracking_uri: str | None = None
    # Whole-model activation checkpointing: recompute each decoder layer in backward (less memory,
    # ~1 more forward of compute).
    gradient_checkpointing: bool = False
    # Rows of a micro-batch with the same train prompt (the rollout.n samples of a prompt) run
    # the prompt through the student once and their responses against its KV cache: the same
    # loss and gradients to GEMM rounding, less compute with long prompts. Pays when a prompt's
    # samples share micro-batches: train.shuffle=prompts (the default) or false keeps them
    # adjacent; rows scatters them. Off under gradient_checkpointing and FSDP (one decoder call
    # per micro-batch there).
    share_prefix: bool = True
    # With share_prefix: each layer's attention reads the prompt's keys once for all its rows
    # (split into the prompt part and each row's own, one softmax) instead of a copy per row;
    # the same loss and gradients to GEMM rounding. false: the copied cache (the numerics the
    # demo's documented runs were measured with).
    split_attention: bool = True
    # auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16 (autocast on CPU and CUDA) |
    # bf16_params (bf16 parameters, fp32 master weights in the optimizer). The LM head, the
    # log-softmax and the loss are fp32 in every mode.
    precision: str = "auto"
    # Keep the newest N step checkpoints (older step-* folders are deleted; null = keep all).
    keep_last: int | None = 3
    # Weights dtype of final/ (weights only, Hugging Face format: what you ship): auto (bfloat16
    # on CUDA, float32 elsewhere) | float32 | bfloat16 | float16.
    final_dtype: str = "auto"
    # Optimizer moments in step checkpoints (an exact resume); false = weights, schedule and RNG
    # only: a resume restarts the moments, and an Adam checkpoint is a third of the size.
    save_optimizer: bool = True
    # Token weights read from the selection must lie in [0, max_weight] (else the run stops).
    max_weight: float = 1e3
    # Micro-batches with a non-finite loss that may be skipped (and counted) before the run stops;
    # 0 = stop at the first one. Single process only.
    max_bad_micro_batches: int = 0
    # Load pickled weights (pytorch_model.bin) for init/teacher: a pickle can run code on load.
    allow_pickled_weights: bool = False
    # Optional LoRA adapters.
    lora: LoraConfig = field(default_factory=LoraConfig)
    # Parameters kept frozen in full fine-tuning: regular expressions searched in each parameter's
    # name (e.g. [self_attn, embed_tokens] trains only the MLPs and norms: new facts go into the
    # MLPs while the attention that reads the context stays the base's). Each must match at
    # least one parameter and one parameter must stay trainable (checked when the model loads).
    freeze: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        _check_finite(self, "train")  # first: lr=nan fails every comparison below
        _check(self.epochs >= 1, "train.epochs", "must be >= 1")
        _check(self.grad_accum >= 1, "train.grad_accum", "must be >= 1")
        _check(self.micro_batch_tokens >= 1, "train.micro_batch_tokens", "must be >= 1")
        _check(self.lr > 0 and math.isfinite(self.lr), "train.lr", "must be finite and > 0")
        _check(self.schedule in ("cosine", "constant"), "train.schedule", "must be cosine|constant")
        if not _interpolation(self.name):  # the schema's default, resolved at compose
            check_name(self.name, "train.name")  # checkpoints/<name>/: overwrite deletes it
        if not _interpolation(self.selection):
            check_name(self.selection, "train.selection")
        _check(self.max_steps is None or self.max_steps >= 1, "train.max_steps", "must be >= 1")
        _check(self.weight_decay >= 0, "train.weight_decay", "must be >= 0")
        _check(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            "train.betas",
            "must be two numbers in [0, 1)",
        )
        _check(self.warmup_steps >= 0, "train.warmup_steps", "must be >= 0")
        _check(0 <= self.min_lr_ratio <= 1, "train.min_lr_ratio", "must be in [0, 1]")
        _check(self.grad_clip >= 0, "train.grad_clip", "must be >= 0 (0 = off)")
        _check(self.log_every >= 1, "train.log_every", "must be >= 1")
        _check(self.save_every is None or self.save_every >= 1, "train.save_every", "must be >= 1")
        _check(
            self.chunk_positions is None or self.chunk_positions >= 1,
            "train.chunk_positions",
            "must be >= 1 (or null: from train.loss_memory_mib)",
        )
        _check(self.loss_memory_mib >= 1, "train.loss_memory_mib", "must be >= 1 (MiB)")
        _check(self.prefetch >= 0, "train.prefetch", "must be >= 0")
        for t in self.trackers:
            _check(t in TRACKERS, "train.trackers", f"entries must be among {list(TRACKERS)}")
        _check(
            self.wandb_mode in ("offline", "online"), "train.wandb_mode", "must be offline|online"
        )
        _check(self.precision in PRECISIONS, "train.precision", f"must be one of {PRECISIONS}")
        _check(isinstance(self.share_prefix, bool), "train.share_prefix", "must be true|false")
        _check(
            isinstance(self.split_attention, bool), "train.split_attention", "must be true|false"
        )
        _check(
            self.shuffle in (True, False, "prompts", "rows"),
            "train.shuffle",
            f"must be prompts|rows|false (true = rows), not {self.shuffle!r}",
        )
        _check(
            not (self.precision == "bf16_params" and self.lora.r > 0),
            "train.precision=bf16_params",
            "is for full fine-tuning (LoRA keeps the base frozen; use precision=bf16)",
        )
        _check(self.keep_last is None or self.keep_last >= 1, "train.keep_last", "must be >= 1")
        for pat in self.freeze:
            _check(_regex_ok(pat), "train.freeze", f"{pat!r} is not a valid regular expression")
        _check(
            not (self.freeze and self.lora.r > 0),
            "train.freeze",
            "is for full fine-tuning (LoRA already keeps the base frozen; use train.lora.target_modules)",
        )
        _check(
            self.final_dtype in ("auto", "float32", "bfloat16", "float16"),
            "train.final_dtype",
            f"must be auto|float32|bfloat16|float16 (got {self.final_dtype!r})",
        )
        _check(self.max_weight > 0, "train.max_weight", "must be > 0")
        _check(self.max_bad_micro_batches >= 0, "train.max_bad_micro_batches", "must be >= 0")


TRACKERS = ("tensorboard", "wandb", "mlflow")


PRECISIONS = ("auto", "fp32", "bf16", "bf16_params")


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

    def __post_init__(self) -> None:
        _check_finite(self, "sft")
        _check(self.n >= 1, "sft.n", "must be >= 1")
        _check(self.temperature >= 0, "sft.temperature", "must be >= 0 (0 = greedy)")
        _check(self.epochs >= 1, "sft.epochs", "must be >= 1")
        _check(self.lr > 0, "sft.lr", "must be > 0")


def _regex_ok(pattern: str) -> bool:
    try:
        re.compile(pattern)
    except re.error:
        return False
    return bool(pattern)
