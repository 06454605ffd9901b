"""Train stage: optimise an OPD loss on cached teacher log-probs, streamed from Parquet shards.

Reads ``run_dir/selected/<train.selection>/`` (the select stage's train-ready table: one row per
sequence, teacher top-K flattened T*K) and the initial weights (``train.init``, else
``run_dir/checkpoints/sft/final`` when SFT ran, else ``student.path``). Writes
``run_dir/checkpoints/<train.name>/step-NNNNNN/`` every ``train.save_every`` steps (the newest
``train.keep_last`` kept) and ``final/`` (Hugging Face safetensors + tokenizer, loadable by
transformers and vLLM; ``trainer_state.safetensors`` + ``trainer_state.json`` hold the optimizer,
scheduler, RNG and loader states, never a pickle), ``run_dir/train/<train.name>/metrics.jsonl``,
``config.json`` and the trackers' outputs (``train.trackers``: TensorBoard in ``tb/``, W&B, MLflow).

    python -m stages.train experiment=demo loss=vopd select=entropy_half
    torchrun --nproc_per_node=N -m stages.train experiment=demo [train.fsdp=true]

The recipe, in four parts (torchtune's shape, plain functions over two small dataclasses):
- setup: ``setup_job`` (selection, tokenizer and temperature provenance -> ``Job``),
  ``find_resume``/``load_resume``, ``build_model`` (LoRA, activation checkpointing, precision,
  DDP/FSDP2), ``build_trainer`` (optimizer, schedule), ``open_outputs`` (metrics, trackers);
- step: ``train_step`` forms nothing itself: it all-reduces the step's weighted-token count,
  runs forward/backward per micro-batch with the finite-loss guard, clips, steps. It is also what
  ``scripts/bench_train.py`` times;
- checkpoint: ``save_checkpoint`` (temp folder, then rename; full disk -> one error, the temp
  folder removed), ``prune_steps``;
- loop: ``train_loop``, one screen.

- The student sees ``train_prompt_ids + response_ids``; only the hidden states at positions that
  predict response tokens go through the LM head (fp32, ``train.chunk_positions`` rows at a time,
  each chunk under activation checkpointing so one ``[chunk, V]`` block lives at once): ``[B, T, V]``
  is never built. ``train.gradient_checkpointing`` also recomputes every decoder layer.
- Precision (``train.precision``): fp32; ``bf16`` autocast (CPU and CUDA); ``bf16_params``: bf16
  weights with fp32 master copies in the optimizer (FSDP2: its mixed-precision policy). ``auto``
  = bf16 autocast on CUDA, fp32 on CPU. The head, log-softmax and loss are fp32 in every mode.
- Normalisation: loss = Σ_t w_t·L_t / (Σ w over every micro-batch of the step on every rank). The
  count is all-reduced before the first backward; DDP/FSDP average gradients over ranks, so each
  rank scales its sum by ``world_size / count``.
- Guards: a non-finite loss or gradient stops the run with one error before the optimizer step,
  so nothing diverged is saved (``train.max_bad_micro_batches`` skips and counts isolated bad
  micro-batches instead); parameters are checked finite before every checkpoint; every row read
  is validated (``loader.check_row_group``); one trainer per run name (a lock); Ctrl-C exits 130.
- ``train.online=true`` is the standard (live-teacher) OPD baseline: the teacher scores every
  micro-batch inside the loop. Its prefix is the rollout's ``teacher_prompt_ids`` (read once from
  ``run_dir/rollouts`` by sample_id, a two-column lookup), or ``train_prompt_ids`` when the run has
  no rollouts table (a teacher without privileged context).
- Every rank runs the same number of steps (``loader.plan_steps`` replays the packing on the length
  columns up front; the ragged tail is dropped and reported). Resume needs the same world size.
- Refused (UserError): a selection whose tokenizer fingerprint differs from the student's, a
  ``loss.temperature`` other than the cached log-probs' (1.0 unless the selected manifest's
  the manifest's ``teacher_temperature`` says otherwise), resuming checkpoints of another init model or
  selection, existing checkpoints with ``train.resume=false`` (unless ``overwrite=true``, which
  removes this name's ``checkpoints/<name>`` and ``train/<name>`` only), pickled states or weights.
- LoRA (``train.lora.r > 0``): step checkpoints hold the adapter (resume re-applies it to the init
  weights); ``final/`` is merged into a plain checkpoint unless ``train.lora.save_merged=false``.
  FSDP2 (``train.fsdp=true``) shards each decoder layer and the root; tested on CPU/gloo.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import random
import re
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as tdist
from torch import Tensor, nn

from data_schemas import manifest as manifest_mod
from data_schemas import rollouts as rollouts_table
from data_schemas import selected as selected_table
from stages.lib import models, store, trackers, trainer_state
from stages.lib.config import Config, as_dict
from stages.lib.entry import hydra_entry
from stages.lib.errors import UserError, fault_point
from stages.lib.layout import RunLayout
from stages.lib.loader import MicroBatch, MicroBatchStream, Plan, collate, plan_steps
from stages.lib.logprobs import model_head, model_hidden_states, sequence_stats
from stages.lib.losses import MAX_SUFFIX, average_metrics, chunk_for_budget, combined_loss

STEP_DIR = re.compile(r"^step-(\d{6,})$")


# ============================================================================ small pure helpers
def lr_factor(step: int, *, warmup: int, total: int, schedule: str, min_ratio: float) -> float:
    """LR multiplier for optimizer step ``step`` (0-based): linear warmup, then cosine or flat."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def step_dirs(root: Path) -> list[Path]:
    """Step checkpoint folders under ``root``, oldest first (temp folders are not among them)."""
    found = [p for p in root.glob("step-*") if p.is_dir() and STEP_DIR.match(p.name)]
    return sorted(found, key=lambda p: int(p.name[5:]))


def latest_step_dir(root: Path) -> Path | None:
    """The newest step checkpoint with a trainer state (a pickled one too: to be refused)."""
    done = [
        p for p in step_dirs(root) if trainer_state.is_complete(p) or trainer_state.has_pickle(p)
    ]
    return done[-1] if done else None


# ============================================================================ distributed seams
@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            tdist.barrier()

    def all_reduce(self, x: Tensor, op: str = "sum") -> Tensor:
        if self.world_size > 1:
            tdist.all_reduce(x, op=tdist.ReduceOp.SUM if op == "sum" else tdist.ReduceOp.MAX)
        return x


def setup_distributed(device_name: str) -> Dist:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK (a process group even for one process, so FSDP2
    runs under ``--nproc_per_node=1``); NCCL on GPUs, gloo on CPU."""
    device = models.pick_device(device_name)
    if "WORLD_SIZE" not in os.environ:
        return Dist(device=device)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    if not tdist.is_initialized():
        tdist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank=tdist.get_rank(), world_size=tdist.get_world_size(), device=device)


# ============================================================================ the model under loss
class ResponseLoss(nn.Module):
    """Student forward that returns the weighted loss SUM over response tokens (and metric sums).

    Wrapped whole by DDP / FSDP2, so their hooks see one forward and one backward per micro-batch.
    """

    def __init__(
        self, model: nn.Module, terms: list, vocab_size: int, temperature: float, chunk: int
    ):
        super().__init__()
        self.model = model
        self.terms, self.vocab_size = terms, vocab_size
        self.temperature, self.chunk = temperature, chunk

    def _chunk_loss(self, h: Tensor, batch: dict[str, Tensor]) -> tuple[Tensor, dict]:
        # The head and log-softmax stay fp32 under bf16 autocast and bf16 weights (docs: fp32 head).
        with torch.autocast(h.device.type, enabled=False):
            logits = model_head(self.model)(h.float())  # [n, V] fp32
            # in place: the logits become the log-softmax (losses.py: 2 x [n, V] working set)
            return combined_loss(
                logits, batch, self.terms, self.vocab_size, self.temperature, inplace=True
            )

    def forward(self, input_ids: Tensor, attention_mask: Tensor, positions: Tensor, batch: dict):
        hidden = model_hidden_states(self.model, input_ids, attention_mask)  # [B, L, H]
        h = hidden.reshape(-1, hidden.shape[-1])[positions]  # [M, H]
        n = h.shape[0]
        if n <= self.chunk:
            return self._chunk_loss(h, batch)
        total, metrics = None, {}
        for s, e in loss_splits(n, self.chunk, batch.get("chunk_index")):
            sub = {k: v[s:e] for k, v in batch.items()}
            # Recompute the chunk's [chunk, V] logits in backward instead of keeping them all.
            loss, m = torch.utils.checkpoint.checkpoint(
                self._chunk_loss, h[s:e], sub, use_reentrant=False
            )
            total = loss if total is None else total + loss
            add_metrics(metrics, m)
        return total, metrics


def loss_chunk(tc: Any, vocab: int) -> int:
    """``train.chunk_positions``, or (null) the most positions ``train.loss_memory_mib`` holds."""
    if tc.chunk_positions is not None:
        return tc.chunk_positions
    return chunk_for_budget(tc.loss_memory_mib, vocab)


def loss_splits(n: int, chunk: int, keys: Tensor | None = None) -> list[tuple[int, int]]:
    """``[s, e)`` ranges of about ``chunk`` positions covering ``n``. With ``keys`` (the aligned
    chunk ids of a cross-tokenizer batch) no range ends inside a run of equal keys: chunk_opd
    needs all of a chunk's tokens in one loss call (a chunk longer than ``chunk`` stays whole)."""
    if keys is None:
        return [(s, min(s + chunk, n)) for s in range(0, n, chunk)]
    k, out, s = keys.tolist(), [], 0
    while s < n:
        e = min(s + chunk, n)
        b = e
        while s < b < n and k[b] == k[b - 1]:  # back to the start of the chunk cut through
            b -= 1
        if b == s:  # one chunk longer than the range: keep it whole
            b = e
            while b < n and k[b] == k[b - 1]:
                b += 1
        out.append((s, b))
        s = b
    return out


def unwrap(model: nn.Module) -> nn.Module:
    """The Hugging Face (or PEFT) model inside DDP / ResponseLoss."""
    model = getattr(model, "module", model)
    return model.model if isinstance(model, ResponseLoss) else model


def add_metrics(sums: dict[str, Tensor], mets: dict[str, Tensor]) -> None:
    """Accumulate a micro-batch's metric sums (``*_max`` metrics by maximum)."""
    for k, v in mets.items():
        v = v.detach().double()
        if k in sums:
            v = torch.maximum(sums[k], v) if k.endswith(MAX_SUFFIX) else sums[k] + v
        sums[k] = v


def reduce_totals(sums: dict[str, Tensor], dist: Dist) -> dict[str, float]:
    """Metric totals over all ranks: one SUM all-reduce (and one MAX for ``*_max``)."""
    out = {}
    for op, keys in (
        ("sum", [k for k in sorted(sums) if not k.endswith(MAX_SUFFIX)]),
        ("max", [k for k in sorted(sums) if k.endswith(MAX_SUFFIX)]),
    ):
        if keys:
            vec = dist.all_reduce(torch.stack([sums[k].cpu() for k in keys]), op)
            out.update(zip(keys, vec.tolist()))
    return out


# ============================================================================ precision
@dataclass
class MasterWeights:
    """bf16 parameters trained through fp32 master copies (``train.precision=bf16_params``).

    The optimizer updates ``master``; after backward the bf16 gradients are widened into the
    masters' ``.grad``, after the step the masters are rounded into the bf16 parameters.
    Checkpoints hold the fp32 masters, so a resume continues from exactly what was trained.
    """

    params: list[Tensor]  # the model's trainable parameters (bf16)
    master: list[Tensor]  # their fp32 copies (what the optimizer sees)

    @classmethod
    def of(cls, model: nn.Module) -> MasterWeights:
        trainable = [p for p in model.parameters() if p.requires_grad]
        master = [p.detach().float().clone() for p in trainable]
        model.to(torch.bfloat16)
        return cls([p for p in model.parameters() if p.requires_grad], master)

    def grads_to_master(self) -> None:
        for p, m in zip(self.params, self.master):
            m.grad = None if p.grad is None else p.grad.float()
            p.grad = None

    def master_to_params(self) -> None:
        with torch.no_grad():
            for p, m in zip(self.params, self.master):
                p.copy_(m)

    def state_dict(self, model: nn.Module) -> dict[str, Tensor]:
        """The model's state dict with every trainable tensor replaced by its fp32 master."""
        by_ptr = {p.data_ptr(): m for p, m in zip(self.params, self.master)}
        return {k: by_ptr.get(v.data_ptr(), v) for k, v in model.state_dict().items()}


def autocast_for(precision: str, device: torch.device) -> Callable[[], Any]:
    """The context each forward runs under: bf16 autocast (``bf16``; ``auto`` on CUDA) or none."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


# ============================================================================ setup: the job
@dataclass
class Job:
    """The fixed facts of one training run, found by ``setup_job`` (read-only afterwards)."""

    cfg: Config
    dist: Dist
    layout: RunLayout
    sel_dir: Path
    manifest: dict
    init: str
    tok: Any
    vocab: int
    pad_id: int
    identity: dict  # what a resumed checkpoint must have been trained from

    @property
    def ckpt_root(self) -> Path:
        return self.layout.checkpoints(self.cfg.train.name)

    @property
    def final_dir(self) -> Path:
        return self.layout.final(self.cfg.train.name)

    @property
    def out_dir(self) -> Path:
        return self.layout.train(self.cfg.train.name)

    @property
    def fsdp(self) -> bool:
        return self.cfg.train.fsdp and tdist.is_initialized()

    def say(self, *a: Any) -> None:
        if self.dist.main:
            print(*a, flush=True)


def selection_tokenizer(layout: RunLayout, m: dict) -> str | None:
    """The selection's tokenizer fingerprint, following ``inputs`` to tokens/rollouts manifests."""
    if m["fingerprints"].get("tokenizer"):
        return m["fingerprints"]["tokenizer"]
    wanted = set(m["inputs"].values())
    for d in (layout.tokens, layout.rollouts):
        up = manifest_mod.read(d)
        if up is not None and up["dataset_id"] in wanted:
            if up["fingerprints"].get("tokenizer"):
                return up["fingerprints"]["tokenizer"]
            wanted |= set(up["inputs"].values())
    return None


def pick_init(cfg: Config, layout: RunLayout) -> str:
    if cfg.train.init:
        return cfg.train.init
    if (layout.sft_final / "config.json").exists():
        return str(layout.sft_final)
    if not cfg.student.path:
        raise UserError("no initial weights", "train.init / student.path", "set student.path=DIR")
    return cfg.student.path


def check_provenance(cfg: Config, layout: RunLayout, m: dict, tok_fp: str, sel_dir: Path) -> None:
    """The selection was made with the student's tokenizer, at the loss temperature."""
    sel_tok = selection_tokenizer(layout, m)
    if sel_tok is None:
        raise UserError(
            "the selection has no tokenizer fingerprint (nor its inputs)",
            str(sel_dir),
            "re-run rollout/score/select with this version of distillery",
        )
    models.check_same_tokenizer(sel_tok, tok_fp, "selection", "student (train.init)")
    # Cached teacher log-probs are at the scoring temperature, a typed manifest field that score
    # writes and select carries over (1.0 for selections written before it existed).
    scored_t = float(m.get("teacher_temperature") or 1.0)
    if not cfg.train.online and cfg.loss.temperature != scored_t:
        raise UserError(
            f"loss.temperature={cfg.loss.temperature} but the cached teacher log-probs were scored "
            f"at temperature {scored_t}",
            str(sel_dir),
            f"set loss.temperature={scored_t}, or re-score at the loss temperature",
        )


def setup_job(cfg: Config, dist: Dist) -> Job:
    """Resolve and check everything the run reads before any model loads."""
    tc = cfg.train
    layout = RunLayout.of(cfg.run_dir)
    layout.checkpoints(tc.name)  # validates train.name before anything touches the disk
    if not (math.isfinite(tc.lr) and tc.lr > 0):  # config validation refuses it too
        raise UserError(
            f"train.lr={tc.lr} is not a finite positive number", "config", "fix train.lr"
        )
    sel_dir = layout.selected(tc.selection)
    m = store.open_committed(
        sel_dir,
        selected_table,
        what_writes_it=f"python -m stages.select select.name={tc.selection}",
    )
    init = pick_init(cfg, layout)
    tok = models.load_tokenizer(init, "student")
    tok_fp = models.tokenizer_fingerprint(tok)
    check_provenance(cfg, layout, m, tok_fp, sel_dir)
    identity = {
        "init": models.model_fingerprint(init, "student"),
        "tokenizer": tok_fp,
        "selection": m["dataset_id"],
        "world_size": dist.world_size,
    }
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    vocab = models.vocab_size(tok)
    return Job(cfg, dist, layout, sel_dir, m, init, tok, vocab, pad_id, identity)


@contextlib.contextmanager
def run_lock(job: Job):
    """One trainer per run name (``store``'s flock: released by the kernel if the process dies)."""
    with contextlib.ExitStack() as stack:
        if job.dist.main:
            name = job.cfg.train.name
            lock = store.file_lock(
                job.layout.train_lock(name),
                f"training run '{name}'",
                blocking=False,
                holder="another trainer",
                where=str(job.ckpt_root),
                fix="wait for that training to finish (or stop it), or pick another train.name",
            )
            stack.enter_context(lock)
        yield


# ============================================================================ setup: resume
def clean_temp(root: Path) -> None:
    """Remove the temp folders of interrupted checkpoint saves (``.tmp-step-*``, ``.tmp-final``)."""
    for p in root.glob(f"{store.TMP_PREFIX}*"):
        shutil.rmtree(p, ignore_errors=True)


def find_resume(job: Job) -> Path | None:
    """The checkpoint to resume from (None: start fresh); ``overwrite`` clears this name first."""
    tc, root = job.cfg.train, job.ckpt_root
    if job.dist.main and root.exists():
        clean_temp(root)
    job.dist.barrier()
    if not root.exists() or not any(root.iterdir()):
        return None
    if job.cfg.overwrite:
        if job.dist.main:  # only this name's folders; the name is checked by the layout
            shutil.rmtree(root)
            shutil.rmtree(job.out_dir, ignore_errors=True)
        job.dist.barrier()
        return None
    if not tc.resume:
        raise UserError(
            f"checkpoints of run '{tc.name}' already exist",
            str(root),
            "pass train.resume=true to continue, overwrite=true to start over, or another train.name",
        )
    final = job.final_dir
    if trainer_state.is_complete(final) or trainer_state.has_pickle(final):
        return final
    return latest_step_dir(root)


def load_resume(job: Job, path: Path) -> dict:
    """This rank's trainer state of checkpoint ``path``, checked against the job's identity."""
    state = trainer_state.load(path, job.dist.rank)
    had = state.get("identity") or {}
    if had != job.identity:
        diff = [k for k in job.identity if had.get(k) != job.identity[k]]
        raise UserError(
            f"checkpoint {path} was trained from another {'/'.join(diff)}: "
            + ", ".join(f"{k} {had.get(k)} (now {job.identity[k]})" for k in diff),
            str(path),
            "pass overwrite=true to start over, or use another train.name",
        )
    return state


def rng_state() -> dict:
    s = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def set_rng_state(s: dict) -> None:
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


# ============================================================================ setup: model
def apply_lora(model: nn.Module, lc, resume_from: Path | None) -> nn.Module:
    from peft import LoraConfig, PeftModel, get_peft_model

    if resume_from is not None:
        return PeftModel.from_pretrained(model, resume_from, is_trainable=True)
    cfg = LoraConfig(
        r=lc.r,
        lora_alpha=lc.alpha,
        lora_dropout=lc.dropout,
        target_modules=list(lc.target_modules),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, cfg)


def distribute(wrapped: nn.Module, job: Job) -> nn.Module:
    """FSDP2 (each decoder layer, then the root) or DDP over the process group; as is alone."""
    if job.fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        bf16 = job.cfg.train.precision == "bf16_params"
        layer_mp = MixedPrecisionPolicy(
            param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32
        )
        # the root's inputs include the fp32 teacher columns: never cast them
        root_mp = MixedPrecisionPolicy(
            param_dtype=layer_mp.param_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False
        )
        for layer in getattr(unwrap(wrapped).get_decoder(), "layers", []):
            fully_shard(layer, mp_policy=layer_mp)
        fully_shard(wrapped, mp_policy=root_mp)
        return wrapped
    if job.dist.world_size > 1:
        ids = [job.dist.device.index] if job.dist.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(wrapped, device_ids=ids)
    return wrapped


def build_model(
    job: Job, resume_from: Path | None, resumed: dict | None
) -> tuple[nn.Module, MasterWeights | None]:
    """The student under its loss, on its device, distributed; fp32 masters for bf16_params."""
    tc = job.cfg.train
    full_resume = resumed is not None and tc.lora.r == 0  # weights come from the step checkpoint
    model = models.load_model(
        str(resume_from) if full_resume else job.init,
        "student",
        dtype="float32",
        device="cpu",
        allow_pickle=tc.allow_pickled_weights,
    )
    models.check_embedding_rows(model, job.tok, "student")
    model.config.use_cache = False
    if tc.gradient_checkpointing:  # every decoder layer recomputed in backward
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if tc.lora.r > 0:
        model = apply_lora(model, tc.lora, resume_from if resumed is not None else None)
    model.train()
    terms = [(t.name, t.weight, dict(t.kwargs)) for t in job.cfg.loss.terms]
    wrapped = ResponseLoss(
        model, terms, job.vocab, job.cfg.loss.temperature, loss_chunk(tc, job.vocab)
    )
    wrapped = wrapped.to(job.dist.device)
    master = None
    if tc.precision == "bf16_params" and not job.fsdp:
        master = MasterWeights.of(model)
    return distribute(wrapped, job), master


@dataclass
class Trainer:
    """What a step changes: the wrapped model, its optimizer and schedule."""

    wrapped: nn.Module
    optim: torch.optim.Optimizer
    sched: Any
    params: list[Tensor]  # what the optimizer updates (the fp32 masters under bf16_params)
    master: MasterWeights | None
    autocast: Callable[[], Any]


@dataclass
class State:
    """What a checkpoint restores besides weights, optimizer and RNG."""

    step: int = 0
    history: list[float] = field(default_factory=list)  # every step's loss
    logged: list[dict] = field(default_factory=list)  # the metrics.jsonl rows
    loader: dict | None = None  # MicroBatchStream.position()
    skipped: int = 0  # micro-batches skipped for a non-finite loss


def make_plan(job: Job) -> Plan:
    tc = job.cfg.train
    plan = plan_steps(
        job.sel_dir,
        job.manifest,
        world_size=job.dist.world_size,
        epochs=tc.epochs,
        shuffle_seed=job.cfg.seed if tc.shuffle else None,
        budget=tc.micro_batch_tokens,
        grad_accum=tc.grad_accum,
        max_steps=tc.max_steps,
    )
    if plan.steps < 1:
        raise UserError(
            f"the selection is too small for one step: {min(plan.micro_per_rank)} micro-batches "
            f"per rank, grad_accum={tc.grad_accum}",
            str(job.sel_dir),
            "lower train.grad_accum or the number of ranks, or raise train.epochs",
        )
    return plan


def build_trainer(
    job: Job, wrapped: nn.Module, master: MasterWeights | None, plan: Plan
) -> Trainer:
    tc = job.cfg.train
    params = master.master if master else [p for p in wrapped.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=tc.lr, betas=tuple(tc.betas), weight_decay=tc.weight_decay)
    lam = functools.partial(
        lr_factor,
        warmup=tc.warmup_steps,
        total=plan.steps,
        schedule=tc.schedule,
        min_ratio=tc.min_lr_ratio,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lam)
    autocast = autocast_for(tc.precision, job.dist.device)
    return Trainer(wrapped, optim, sched, params, master, autocast)


def _rewrap_dtensors(optim: torch.optim.Optimizer) -> None:
    """FSDP2: optimizer moments were saved as local shards; make them DTensors like their params."""
    from torch.distributed.tensor import DTensor

    for group in optim.param_groups:
        for p in group["params"]:
            st = optim.state.get(p, {})
            for k, v in st.items():
                if isinstance(p, DTensor) and not isinstance(v, DTensor) and v.dim() > 0:
                    st[k] = DTensor.from_local(
                        v.to(p.device), p.device_mesh, p.placements,
                        run_check=False, shape=p.shape, stride=p.stride(),
                    )  # fmt: skip


def restore(trainer: Trainer, resumed: dict) -> State:
    trainer.optim.load_state_dict(resumed["optimizer"])
    if tdist.is_initialized():
        _rewrap_dtensors(trainer.optim)
    trainer.sched.load_state_dict(resumed["scheduler"])
    set_rng_state(resumed["rng"])
    return State(
        step=resumed["step"],
        history=resumed["history"],
        logged=resumed["logged"],
        loader=resumed["loader"],
        skipped=resumed.get("skipped", 0),
    )


# ============================================================================ setup: online teacher
def teacher_prefixes(layout: RunLayout) -> dict[str, list[int]] | None:
    """sample_id -> teacher_prompt_ids from the rollouts table (online mode), None if absent."""
    if manifest_mod.read(layout.rollouts) is None:
        return None
    t = store.read_table(
        layout.rollouts, rollouts_table, columns=["sample_id", "teacher_prompt_ids"]
    )
    return dict(zip(t["sample_id"].to_pylist(), t["teacher_prompt_ids"].to_pylist()))


def online_teacher(
    teacher: nn.Module, mb: MicroBatch, prefixes, k: int, vocab: int, cfg: Config, pad_id: int
) -> None:
    """Replace the cached teacher columns of ``mb`` with a live teacher pass (standard OPD).

    What a live-teacher trainer does per micro-batch: a teacher forward under ``inference_mode``,
    full-vocabulary fp32 log-softmax, top-K gather (``sequence_stats``, as the score stage does).
    """
    pre = [prefixes.get(s, p) if prefixes else p for s, p in zip(mb.sample_ids, mb.prefix_ids)]
    with torch.inference_mode():
        stats = sequence_stats(
            teacher, pre, mb.response_ids, k, vocab, cfg.loss.temperature,
            loss_chunk(cfg.train, vocab), pad_id, want_entropy=False,
        )  # fmt: skip
    # Built outside inference mode: the loss may save these tensors for backward.
    dev = mb.batch["token_id"].device
    cat = lambda key: torch.from_numpy(np.concatenate([s[key] for s in stats])).to(dev)  # noqa: E731
    mb.batch["teacher_logprob"] = cat("logprob")  # [M]
    mb.batch["teacher_topk_ids"] = cat("topk_ids").long()  # [M, K]
    mb.batch["teacher_topk_logprobs"] = cat("topk_logprobs")  # [M, K]
    mb.batch["teacher_topk_logmass"] = cat("topk_logmass")  # [M]


def online_scorer(job: Job) -> Callable[[MicroBatch], None] | None:
    """``train.online``: a live teacher replacing the cached columns of each micro-batch."""
    cfg = job.cfg
    if not cfg.train.online:
        return None
    teacher = models.load_model(
        cfg.teacher.path, "teacher", dtype="float32", device=job.dist.device,
        allow_pickle=cfg.train.allow_pickled_weights,
    )  # fmt: skip
    t_tok = models.tokenizer_fingerprint(models.load_tokenizer(cfg.teacher.path, "teacher"))
    models.check_same_tokenizer(job.identity["tokenizer"], t_tok, "student", "teacher")
    prefixes = teacher_prefixes(job.layout)

    def score(mb: MicroBatch) -> None:  # the cached K, so the loss sees the same support size
        k = mb.batch["teacher_topk_ids"].shape[1]
        online_teacher(teacher, mb, prefixes, k, job.vocab, cfg, job.pad_id)

    return score


# ============================================================================ setup: outputs
def open_outputs(job: Job, state: State, plan: Plan) -> list:
    """metrics.jsonl (exactly the resumed checkpoint's rows), config.json, the trackers."""
    if not job.dist.main:
        return []
    cfg, tc, out = job.cfg, job.cfg.train, job.out_dir
    out.mkdir(parents=True, exist_ok=True)
    # rows logged after the resumed checkpoint (a crash, a second writer) are dropped here
    store.atomic_write_text(
        out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in state.logged)
    )
    resolved = as_dict(cfg)
    (out / "config.json").write_text(json.dumps(resolved, indent=1))
    opened = trackers.open_trackers(tc.trackers, out, resolved, state.step, tc=tc, name=tc.name)
    job.say(f"train: config\n{json.dumps(resolved['train'], indent=1)}\nloss: {cfg.loss.terms}")
    job.say(
        f"train: {plan.steps} steps x {tc.grad_accum} micro-batches x {job.dist.world_size} ranks; "
        f"init {job.init}; dropped {plan.dropped_micro_batches} tail micro-batches"
    )
    return opened


# ============================================================================ step
def _no_sync(wrapped: nn.Module, last: bool):
    """Skip the gradient all-reduce on all but the step's last micro-batch (DDP / FSDP2)."""
    if last:
        return contextlib.nullcontext()
    if isinstance(wrapped, nn.parallel.DistributedDataParallel):
        return wrapped.no_sync()
    if hasattr(wrapped, "set_requires_gradient_sync"):  # FSDP2

        @contextlib.contextmanager
        def off():
            wrapped.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                wrapped.set_requires_gradient_sync(True)

        return off()
    return contextlib.nullcontext()


def _bad_loss(value: float, mb: MicroBatch, where: str) -> UserError:
    ids = ", ".join(mb.sample_ids[:3]) + (" ..." if len(mb.sample_ids) > 3 else "")
    return UserError(
        f"non-finite loss ({value}) on the micro-batch of samples {ids}: training stopped before "
        "the optimizer step, nothing of this step was saved",
        where,
        "lower train.lr if the weights diverged, or check those rows; train.max_bad_micro_batches=N "
        "skips isolated bad micro-batches",
    )


def step_counts(mbs: list[MicroBatch], dist: Dist) -> list[float]:
    """(Σ weight, response tokens, kept tokens, input tokens) of a step, summed over ranks."""
    counts = torch.tensor(
        [
            float(sum(mb.batch["weight"].double().sum() for mb in mbs)),
            sum(mb.n_tokens for mb in mbs),
            sum(mb.n_kept for mb in mbs),
            sum(int(mb.attention_mask.sum()) for mb in mbs),
        ],
        dtype=torch.float64,
    )
    return dist.all_reduce(counts).tolist()


def train_step(
    wrapped: nn.Module,
    mbs: list[MicroBatch],
    optim: torch.optim.Optimizer,
    sched,
    params: list[Tensor],
    dist: Dist,
    *,
    grad_clip: float,
    autocast=contextlib.nullcontext,
    score=None,
    master: MasterWeights | None = None,
    max_skip: int = 0,
    where: str = "train",
) -> dict:
    """Forward/backward every micro-batch of one step, clip, step; the step's metric row.

    ``score(mb)``, when given, replaces the cached teacher columns first (``train.online``). A
    micro-batch with a non-finite loss is skipped (no backward; its tokens stay in the step's
    denominator) while fewer than ``max_skip`` were, else a UserError; so is a non-finite
    gradient norm, before ``optim.step``. The row holds the averaged loss metrics, ``grad_norm``,
    ``lr``, token counts, ``skipped_micro_batches`` and ``input_tokens`` (padded-batch tokens,
    summed over ranks) for the caller's tokens/s.
    """
    # Every micro-batch's weighted-token count is known before any backward: the denominator.
    count, n_tok, n_kept, n_in = step_counts(mbs, dist)
    scale = dist.world_size / count if count > 0 else 0.0
    sums: dict[str, Tensor] = {}
    skipped = 0
    for i, mb in enumerate(mbs):
        mb.to(dist.device)
        if score is not None:
            score(mb)
        with _no_sync(wrapped, i == len(mbs) - 1):
            with autocast():
                loss_sum, mets = wrapped(mb.input_ids, mb.attention_mask, mb.positions, mb.batch)
            if not bool(torch.isfinite(loss_sum)):
                # a skip would leave DDP/FSDP ranks waiting for this backward: one rank only
                if skipped >= max_skip or dist.world_size > 1 or (i == len(mbs) - 1 and not sums):
                    raise _bad_loss(float(loss_sum), mb, where)
                skipped += 1
                continue
            (loss_sum * scale).backward()
        add_metrics(sums, mets)
    totals = reduce_totals(sums, dist)
    if master is not None:
        master.grads_to_master()
    clip = grad_clip if grad_clip > 0 else float("inf")
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip))
    if not math.isfinite(grad_norm):
        optim.zero_grad(set_to_none=True)
        raise UserError(
            f"non-finite gradient (norm {grad_norm}): training stopped before the optimizer step",
            where,
            "lower train.lr (or raise loss temperature / check the selection's values)",
        )
    lr = sched.get_last_lr()[0]
    if count > 0:  # a step whose tokens all have weight 0 changes nothing (not even decay)
        optim.step()
        if master is not None:
            master.master_to_params()
    optim.zero_grad(set_to_none=True)
    sched.step()
    return {
        **average_metrics(totals),
        "grad_norm": grad_norm,
        "lr": lr,
        "tokens": n_tok,
        "kept_fraction": n_kept / max(n_tok, 1),
        "weighted_tokens": count,
        "skipped_micro_batches": skipped,
        "input_tokens": n_in,
    }


# ============================================================================ checkpoint
def check_finite_params(job: Job, trainer: Trainer) -> None:
    """Refuse to save diverged weights (e.g. train.lr=inf: a finite loss, then inf parameters)."""
    local = lambda p: p.to_local() if hasattr(p, "to_local") else p  # noqa: E731
    bad = any(not bool(torch.isfinite(local(p)).all()) for p in trainer.params)
    flag = job.dist.all_reduce(torch.tensor([float(bad)]), "max")
    if flag.item() > 0:
        raise UserError(
            "the weights became non-finite (the optimizer diverged); nothing was saved",
            str(job.ckpt_root),
            "lower train.lr (and keep train.grad_clip > 0), then re-run",
        )


def _write_checkpoint(job: Job, trainer: Trainer, payload: dict, tmp: Path, merge: bool) -> None:
    """HF weights + tokenizer (rank 0) and every rank's trainer state, into ``tmp``."""
    dist = job.dist
    if dist.main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    tmp.mkdir(parents=True, exist_ok=True)  # a node without a shared filesystem (object storage)
    model = unwrap(trainer.wrapped)
    sd = None
    if job.fsdp:  # every rank takes part in gathering the full state dict
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        sd = get_model_state_dict(model, options=opts)
    elif trainer.master is not None:
        sd = trainer.master.state_dict(model)  # the fp32 masters, not their bf16 rounding
    if dist.main:
        if merge and hasattr(model, "merge_and_unload"):
            model = model.merge_and_unload()  # LoRA folded into a plain checkpoint (end of run)
        model.save_pretrained(tmp, state_dict=sd) if sd is not None else model.save_pretrained(tmp)
        job.tok.save_pretrained(tmp)
    fault_point("mid_checkpoint")  # weights written, trainer state not yet
    trainer_state.save(tmp, dist.rank, payload)


def save_checkpoint(
    job: Job, trainer: Trainer, state: State, loader: MicroBatchStream, plan: Plan, path: Path,
    *, merge: bool,
) -> None:  # fmt: skip
    """Write a checkpoint into a temp folder, then rename it to ``path`` (atomic); prune old steps.

    A full disk (or any write error) removes the temp folder and raises one UserError; the
    checkpoints written before stay, so a re-run resumes from the newest of them.
    """
    check_finite_params(job, trainer)
    payload = {
        "step": state.step, "optimizer": trainer.optim.state_dict(),
        "scheduler": trainer.sched.state_dict(), "rng": rng_state(), "loader": loader.position(),
        "history": state.history, "logged": state.logged, "skipped": state.skipped,
        "identity": job.identity, "plan": plan.__dict__,
    }  # fmt: skip
    tmp = path.with_name(f"{store.TMP_PREFIX}{path.name}")
    try:
        _write_checkpoint(job, trainer, payload, tmp, merge)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise store.disk_error(e, str(path)) from None
    job.dist.barrier()
    if job.dist.main:
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
        if STEP_DIR.match(path.name):
            prune_steps(job.ckpt_root, job.cfg.train.keep_last)
    job.dist.barrier()
    if store.HOOKS.checkpoint is not None:  # object storage: every node publishes its part
        store.HOOKS.checkpoint(tmp, path, job.dist)


def prune_steps(root: Path, keep_last: int | None) -> None:
    """Delete all but the newest ``keep_last`` complete step checkpoints."""
    if keep_last is None:
        return
    done = [p for p in step_dirs(root) if trainer_state.is_complete(p)]
    for p in done[: max(0, len(done) - keep_last)]:
        shutil.rmtree(p, ignore_errors=True)


# ============================================================================ loop
def record(job: Job, state: State, row: dict, plan: Plan, opened: list, bar) -> None:
    """Keep a step's row: the loss history, and every ``log_every`` steps metrics + trackers."""
    state.history.append(row["loss"])
    bar.update(1)
    bar.set_postfix(
        loss=f"{row['loss']:.4f}", rkl=f"{row.get('rkl_k1', float('nan')):.4f}",
        gn=f"{row['grad_norm']:.2f}", tps=f"{row['tokens_per_s']:.0f}",
    )  # fmt: skip
    if state.step % job.cfg.train.log_every == 0 or state.step == plan.steps:
        state.logged.append(row)
        if job.dist.main:
            with open(job.out_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
            for t in opened:
                t.log(row)
            if bar.disable:  # not a terminal: a log gets one line per logged step instead
                print(
                    f"train {job.cfg.train.name}: step {state.step}/{plan.steps} "
                    f"loss {row['loss']:.4f} grad_norm {row['grad_norm']:.3f} "
                    f"tokens/s {row['tokens_per_s']:.0f}",
                    flush=True,
                )


def train_loop(
    job: Job, trainer: Trainer, state: State, loader: MicroBatchStream, plan: Plan,
    score, opened: list,
) -> None:  # fmt: skip
    """Steps until the plan is done, a checkpoint every ``save_every``, then ``final/``."""
    from tqdm import tqdm

    tc, dist = job.cfg.train, job.dist
    sync = torch.cuda.synchronize if dist.device.type == "cuda" else (lambda: None)
    tty = dist.main and sys.stderr.isatty()
    bar = tqdm(total=plan.steps, initial=state.step, desc=f"train {tc.name}", disable=not tty)
    with bar:
        while state.step < plan.steps:
            t0 = time.perf_counter()
            # Every micro-batch of the step first: their weighted-token count is the denominator.
            mbs = [
                collate(loader.next_micro_batch(), job.pad_id, str(job.sel_dir))
                for _ in range(tc.grad_accum)
            ]
            stats = train_step(
                trainer.wrapped, mbs, trainer.optim, trainer.sched, trainer.params, dist,
                grad_clip=tc.grad_clip, autocast=trainer.autocast, score=score,
                master=trainer.master, max_skip=tc.max_bad_micro_batches - state.skipped,
                where=f"{job.sel_dir}, step {state.step + 1}",
            )  # fmt: skip
            sync()
            state.step += 1
            state.skipped += stats.pop("skipped_micro_batches")
            secs = time.perf_counter() - t0
            row = {"step": state.step, **stats, "skipped_micro_batches": state.skipped}
            row.update(tokens_per_s=row.pop("input_tokens") / secs, step_s=secs)
            record(job, state, row, plan, opened, bar)
            if tc.save_every and state.step % tc.save_every == 0 and state.step < plan.steps:
                path = job.ckpt_root / step_dir_name(state.step)
                save_checkpoint(job, trainer, state, loader, plan, path, merge=False)
        merge = tc.lora.r > 0 and tc.lora.save_merged
        save_checkpoint(job, trainer, state, loader, plan, job.final_dir, merge=merge)


# ============================================================================ the recipe
def summary(job: Job, state: State, plan: dict | None, skipped: bool) -> dict:
    return {
        "steps": state.step,
        "final": str(job.final_dir),
        "history": state.history,
        "metrics": state.logged[-1] if state.logged else {},
        "plan": plan,
        "skipped": skipped,
    }


def train(job: Job) -> dict:
    """Setup (resume, model, optimizer, data, outputs), the loop, the final checkpoint."""
    cfg = job.cfg
    resume_from = find_resume(job)
    resumed = load_resume(job, resume_from) if resume_from is not None else None
    if resume_from == job.final_dir:
        job.say(f"train: {cfg.train.name} already finished ({job.final_dir})")
        done = State(resumed["step"], resumed["history"], resumed["logged"])
        return summary(job, done, resumed.get("plan"), skipped=True)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    wrapped, master = build_model(job, resume_from, resumed)
    plan = make_plan(job)
    trainer = build_trainer(job, wrapped, master, plan)
    state = State()
    if resumed is not None:
        state = restore(trainer, resumed)
        job.say(
            f"train: resuming {cfg.train.name} from {resume_from.name} (step {state.step}/{plan.steps})"
        )
    loader = MicroBatchStream(
        job.sel_dir, job.manifest, cfg.train.micro_batch_tokens, rank=job.dist.rank,
        world_size=job.dist.world_size, epochs=cfg.train.epochs,
        shuffle_seed=cfg.seed if cfg.train.shuffle else None, prefetch=cfg.train.prefetch,
        start=state.loader, vocab_size=job.vocab, max_weight=cfg.train.max_weight,
    )  # fmt: skip
    opened: list = []
    try:
        score = online_scorer(job)
        opened = open_outputs(job, state, plan)
        train_loop(job, trainer, state, loader, plan, score, opened)
    finally:
        loader.close()
        trackers.close_all(opened)
    job.say(
        f"train: done, {state.step} steps, final loss {state.history[-1]:.4f}; wrote "
        f"{job.final_dir} and {job.out_dir / 'metrics.jsonl'}"
    )
    return summary(job, state, plan.__dict__, skipped=False)


def run(cfg: Config) -> dict:
    """Train on ``run_dir/selected/<train.selection>``; return a summary (steps, losses, paths)."""
    dist = setup_distributed(cfg.train.device)
    job = setup_job(cfg, dist)
    with run_lock(job):
        return train(job)


_main = hydra_entry("train")(run)


def main(argv: list[str] | None = None) -> None:
    """The CLI: a user error is one line (exit 2), Ctrl-C exits 130 with checkpoints intact."""
    try:
        _main(argv)
    except KeyboardInterrupt:
        print(
            "train: interrupted; completed checkpoints are intact, re-run the same command to "
            "resume from the newest",
            file=sys.stderr,
        )
        sys.exit(130)


if __name__ == "__main__":
    main()
