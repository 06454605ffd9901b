"""Train stage: optimise an OPD loss on cached teacher log-probs, streamed from Parquet shards.

Reads ``run_dir/selected/<train.selection>/`` (the select stage's train-ready table: one row per
sequence, teacher top-K flattened T*K) and the initial weights (``train.init``, else
``run_dir/checkpoints/sft/final`` when SFT ran, else ``student.path``). Writes
``run_dir/checkpoints/<train.name>/step-NNNNNN/`` every ``train.save_every`` steps (the newest
``train.keep_last`` kept; Hugging Face safetensors + tokenizer, and ``trainer_state.safetensors`` +
``trainer_state.json`` with the optimizer (unless ``train.save_optimizer=false``), scheduler, RNG
and loader states, never a pickle) and ``final/`` (the weights only, in ``train.final_dtype``, +
tokenizer, loadable by transformers and vLLM), ``run_dir/train/<train.name>/metrics.jsonl``,
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
  by default as many as ``train.loss_memory_mib`` holds, each chunk under activation
  checkpointing; the loss's working set is two ``[chunk, V]`` blocks): ``[B, T, V]`` is never
  built. ``train.gradient_checkpointing`` also recomputes every decoder layer.
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
import random
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from data_schemas import manifest as manifest_mod
from data_schemas import selected as selected_table
from stages.lib import adapters, allocator, models, safety, store, trackers
from stages.lib.config import Config, TrainConfig, as_dict
from stages.lib.entry import hydra_entry
from stages.lib.errors import UserError
from stages.lib.layout import RunLayout
from stages.lib.loader import (
    MicroBatch,
    MicroBatchStream,
    StepPlan,
    collate,
    plan_steps,
    shuffle_order,
)
from stages.lib.losses import average_metrics
from stages.lib.progress import Progress, log
from stages.lib.spec import StageSpec
from stages.lib.training.checkpoint import (
    find_resume,
    load_resume,
    restore,
    run_lock,
    save_checkpoint,
    step_dir_name,
)
from stages.lib.training.distributed import (
    distribute,
    no_sync_unless_last,
    reduce_totals,
    setup_distributed,
    step_counts,
)
from stages.lib.training.job import Dist, Job, State, Trainer
from stages.lib.training.objective import ResponseLoss, add_metrics, loss_chunk, lr_factor
from stages.lib.training.online import online_scorer
from stages.lib.training.precision import MasterWeights, autocast_for


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
    for out in (layout.checkpoints(tc.name), layout.train(tc.name)):  # train.name, symlinks
        safety.check_output(out, layout.root, f"train.name={tc.name}")
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


# ============================================================================ setup: model
def apply_lora(model: nn.Module, lc, resume_from: Path | None) -> nn.Module:
    if resume_from is not None:
        return adapters.attach(model, resume_from, trainable=True, what="resuming a LoRA run")
    return adapters.new_adapter(model, lc)


def freeze(model: nn.Module, patterns: list[str]) -> None:
    """Keep the parameters whose name matches one of ``patterns`` (``train.freeze``) frozen."""
    if not patterns:
        return
    names = [n for n, _ in model.named_parameters()]
    for pat in patterns:  # each must match: a typo would otherwise train what it meant to freeze
        if not any(re.search(pat, n) for n in names):
            raise UserError(
                f"train.freeze pattern {pat!r} matches no parameter of the student",
                f"e.g. {names[0]}",
                "match a part of the names the model has (python -c 'print([n for n, _ in "
                "model.named_parameters()])')",
            )
    frozen = re.compile("|".join(f"(?:{pat})" for pat in patterns))
    for n, p in model.named_parameters():
        if frozen.search(n):
            p.requires_grad_(False)
    if not any(p.requires_grad for p in model.parameters()):
        raise UserError(
            "train.freeze freezes every parameter of the student",
            str(patterns),
            "leave some parameters trainable",
        )


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
    freeze(model, tc.freeze)
    model.train()
    terms = [(t.name, t.weight, dict(t.kwargs)) for t in job.cfg.loss.terms]
    # Prefix sharing calls the decoder twice per micro-batch with a KV cache: not with activation
    # checkpointing (transformers turns the cache off there) nor under FSDP2 (one unshard per
    # layer call is what it schedules for); DDP and one process are fine.
    share = tc.share_prefix and not tc.gradient_checkpointing and not job.fsdp
    wrapped = ResponseLoss(
        model, terms, job.vocab, job.cfg.loss.temperature, loss_chunk(tc, job.vocab), share,
        tc.split_attention,
    )  # fmt: skip
    wrapped = wrapped.to(job.dist.device)
    master = None
    if tc.precision == "bf16_params" and not job.fsdp:
        master = MasterWeights.of(model)
    return distribute(wrapped, job), master


def make_plan(job: Job) -> StepPlan:
    tc = job.cfg.train
    plan = plan_steps(
        job.sel_dir,
        job.manifest,
        world_size=job.dist.world_size,
        epochs=tc.epochs,
        **shuffle_order(tc.shuffle, job.cfg.seed),
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
    job: Job, wrapped: nn.Module, master: MasterWeights | None, plan: StepPlan
) -> Trainer:
    tc = job.cfg.train
    params = master.master if master else [p for p in wrapped.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(
        params, lr=tc.lr, betas=tuple(tc.betas), weight_decay=tc.weight_decay,
        fused=tc.fused_adamw or None,  # None: torch's default (per-tensor) kernel
    )  # fmt: skip
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


# ============================================================================ setup: outputs
def open_outputs(job: Job, state: State, plan: StepPlan) -> list:
    """metrics.jsonl (exactly the resumed checkpoint's rows), config.json, the trackers."""
    if not job.dist.main:
        return []
    cfg, tc, out = job.cfg, job.cfg.train, job.out_dir
    out.mkdir(parents=True, exist_ok=True)
    # rows logged after the resumed checkpoint (a crash, a second writer) are dropped here
    store.atomic_write_text(
        job.layout.metrics(tc.name), "".join(json.dumps(r) + "\n" for r in state.logged)
    )
    resolved = as_dict(cfg)
    job.layout.train_config(tc.name).write_text(json.dumps(resolved, indent=1))
    opened = trackers.open_trackers(tc.trackers, out, resolved, state.step, tc=tc, name=tc.name)
    job.say(f"train: config\n{json.dumps(resolved['train'], indent=1)}\nloss: {cfg.loss.terms}")
    job.say(
        f"train: {plan.steps} steps x {tc.grad_accum} micro-batches x {job.dist.world_size} ranks; "
        f"init {job.init}; dropped {plan.dropped_micro_batches} tail micro-batches"
    )
    return opened


def _bad_loss(value: float, mb: MicroBatch, where: str) -> UserError:
    ids = ", ".join(mb.sample_ids[:3]) + (" ..." if len(mb.sample_ids) > 3 else "")
    return UserError(
        f"non-finite loss ({value}) on the micro-batch of samples {ids}: training stopped before "
        "the optimizer step, nothing of this step was saved",
        where,
        "lower train.lr if the weights diverged, or check those rows; train.max_bad_micro_batches=N "
        "skips isolated bad micro-batches",
    )


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
        with no_sync_unless_last(wrapped, i == len(mbs) - 1):
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


# ============================================================================ loop
def record(job: Job, state: State, row: dict, plan: StepPlan, opened: list, bar) -> None:
    """Keep a step's row: the loss history, and every ``log_every`` steps metrics + trackers."""
    state.history.append(row["loss"])
    bar.update(1)
    bar.postfix(
        loss=f"{row['loss']:.4f}", rkl=f"{row.get('rkl_k1', float('nan')):.4f}",
        gn=f"{row['grad_norm']:.2f}", tps=f"{row['tokens_per_s']:.0f}",
    )  # fmt: skip
    if state.step % job.cfg.train.log_every == 0 or state.step == plan.steps:
        state.logged.append(row)
        if job.dist.main:
            with open(job.layout.metrics(job.cfg.train.name), "a") as f:
                f.write(json.dumps(row) + "\n")
            for t in opened:
                t.log(row)
            if not bar.tty:  # not a terminal: a log gets one line per logged step instead
                log.info(
                    f"train {job.cfg.train.name}: step {state.step}/{plan.steps} "
                    f"loss {row['loss']:.4f} grad_norm {row['grad_norm']:.3f} "
                    f"tokens/s {row['tokens_per_s']:.0f}"
                )


def train_loop(
    job: Job, trainer: Trainer, state: State, loader: MicroBatchStream, plan: StepPlan,
    score, opened: list,
) -> None:  # fmt: skip
    """Steps until the plan is done, a checkpoint every ``save_every``, then ``final/``."""
    tc, dist = job.cfg.train, job.dist
    sync = torch.cuda.synchronize if dist.device.type == "cuda" else (lambda: None)
    bar = Progress(
        plan.steps, f"train {tc.name}", "steps", every=None, initial=state.step, shown=dist.main
    )  # on a log: one line per logged step (record), not a timed line
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
            + ("" if "optimizer" in resumed else "; no optimizer state saved: its moments restart")
        )
    loader = MicroBatchStream(
        job.sel_dir, job.manifest, cfg.train.micro_batch_tokens, rank=job.dist.rank,
        world_size=job.dist.world_size, epochs=cfg.train.epochs,
        **shuffle_order(cfg.train.shuffle, cfg.seed), prefetch=cfg.train.prefetch,
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
        f"{job.final_dir} and {job.layout.metrics(job.cfg.train.name)}"
    )
    return summary(job, state, plan.__dict__, skipped=False)


@allocator.reuse()
def run(cfg: Config) -> dict:
    """Train on ``run_dir/selected/<train.selection>``; return a summary (steps, losses, paths)."""
    dist = setup_distributed(cfg.train.device)
    job = setup_job(cfg, dist)
    with run_lock(job):
        return train(job)


SPEC = StageSpec(
    name="train",
    run=run,
    config=TrainConfig,
    uses=("loss", "student", "teacher", "sft"),
    reads=("selected/<train.selection>/", "checkpoints/sft/", "rollouts/"),
    writes=("checkpoints/<train.name>/", "train/<train.name>/"),
    dataset_id=("init model", "tokenizer", "selection id", "world size"),
    extras=("trackers", "dev", "s3"),
    rounds=True,
    variants=True,
)

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
