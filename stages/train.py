"""Train stage: optimise an OPD loss on cached teacher log-probs, streamed from Parquet shards.

Reads ``run_dir/selected/<train.selection>/`` (the select stage's train-ready table: one row per
sequence, teacher top-K flattened T*K) and the initial weights (``train.init``, else
``run_dir/checkpoints/sft/final`` when SFT ran, else ``student.path``). Writes
``run_dir/checkpoints/<train.name>/step-NNNNNN/`` every ``train.save_every`` steps and ``final/``
(Hugging Face format + tokenizer, loadable by transformers and vLLM; ``trainer_state.pt`` holds the
optimizer, scheduler, RNG and loader states), ``run_dir/train/<train.name>/metrics.jsonl`` and
TensorBoard events in ``.../tb/``.

    python -m stages.train experiment=demo loss=vopd select=entropy_half
    torchrun --nproc_per_node=N -m stages.train experiment=demo [train.fsdp=true]

Recipe, top to bottom: setup (distributed, provenance, model, optimizer, plan, resume) -> train
(form the step's micro-batches; ``train_step``: all-reduce its weighted-token count,
forward/backward each micro-batch, clip, step; then log, save) -> cleanup (final checkpoint).
``train_step`` is also what ``scripts/bench_train.py`` times, offline against online.

- The student sees ``train_prompt_ids + response_ids``; only the hidden states at positions that
  predict response tokens go through the LM head (fp32, ``train.chunk_positions`` rows at a time,
  each chunk under activation checkpointing so one ``[chunk, V]`` block lives at once): ``[B, T, V]``
  is never built.
- Normalisation: loss = Σ_t w_t·L_t / (Σ w over every micro-batch of the step on every rank). The
  count is all-reduced before the first backward; DDP/FSDP average gradients over ranks, so each
  rank scales its sum by ``world_size / count``.
- ``train.online=true`` is the standard (live-teacher) OPD baseline: the teacher scores every
  micro-batch inside the loop. Its prefix is the rollout's ``teacher_prompt_ids`` (read once from
  ``run_dir/rollouts`` by sample_id, a two-column lookup), or ``train_prompt_ids`` when the run has
  no rollouts table (a teacher without privileged context). The behaviour-support columns
  (``teacher_logprobs_on_behavior_topk``) stay the cached ones.
- Every rank runs the same number of steps (``loader.plan_steps`` replays the packing on the length
  columns up front; the ragged tail is dropped and reported). Resume needs the same world size.
- Refused (UserError): a selection whose tokenizer fingerprint differs from the student's, a
  ``loss.temperature`` other than the cached log-probs' (1.0 unless the selected manifest's
  ``extra.teacher_temperature`` says otherwise), resuming checkpoints of another init model or
  selection, existing checkpoints with ``train.resume=false`` (unless ``overwrite=true``).
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
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as tdist
from torch import Tensor, nn

from data_schemas import manifest as manifest_mod
from data_schemas import rollouts as rollouts_table
from data_schemas import selected as selected_table
from stages.lib import models, store
from stages.lib.config import Config, as_dict, hydra_entry
from stages.lib.errors import UserError, fault_point
from stages.lib.loader import MicroBatch, MicroBatchStream, collate, plan_steps
from stages.lib.logprobs import model_head, model_hidden_states, sequence_stats
from stages.lib.losses import MAX_SUFFIX, average_metrics, combined_loss

STATE_FILE = "trainer_state.pt"


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


def state_file(rank: int) -> str:
    return STATE_FILE if rank == 0 else f"trainer_state.rank{rank}.pt"


def latest_step_dir(root: Path) -> Path | None:
    """The newest complete step checkpoint (temp dirs of an interrupted save are ignored)."""
    done = [p for p in root.glob("step-*") if (p / STATE_FILE).exists()]
    return max(done, key=lambda p: int(p.name.split("-")[1])) if done else None


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
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; NCCL on GPUs, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = models.pick_device(device_name)
    if world <= 1:
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
        self.terms, self.vocab_size, self.temperature, self.chunk = (
            terms,
            vocab_size,
            temperature,
            chunk,
        )

    def _chunk_loss(self, h: Tensor, batch: dict[str, Tensor]) -> tuple[Tensor, dict]:
        # The head and log-softmax stay fp32 even under bf16 autocast (DESIGN: fp32 head).
        with torch.autocast(h.device.type, enabled=False):
            logits = model_head(self.model)(h.float())  # [n, V] fp32
            return combined_loss(logits, batch, self.terms, self.vocab_size, self.temperature)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, positions: Tensor, batch: dict):
        hidden = model_hidden_states(self.model, input_ids, attention_mask)  # [B, L, H]
        h = hidden.reshape(-1, hidden.shape[-1])[positions]  # [M, H]
        n = h.shape[0]
        if n <= self.chunk:
            return self._chunk_loss(h, batch)
        total, metrics = None, {}
        for s in range(0, n, self.chunk):
            sub = {k: v[s : s + self.chunk] for k, v in batch.items()}
            # Recompute the chunk's [chunk, V] logits in backward instead of keeping them all.
            loss, m = torch.utils.checkpoint.checkpoint(
                self._chunk_loss, h[s : s + self.chunk], sub, use_reentrant=False
            )
            total = loss if total is None else total + loss
            add_metrics(metrics, m)
        return total, metrics


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


# ============================================================================ provenance
def selection_tokenizer(run_dir: Path, m: dict) -> str | None:
    """The selection's tokenizer fingerprint, following ``inputs`` to tokens/rollouts manifests."""
    if m["fingerprints"].get("tokenizer"):
        return m["fingerprints"]["tokenizer"]
    wanted = set(m["inputs"].values())
    for name in ("tokens", "rollouts"):
        up = manifest_mod.read(run_dir / name)
        if up is not None and up["dataset_id"] in wanted:
            if up["fingerprints"].get("tokenizer"):
                return up["fingerprints"]["tokenizer"]
            wanted |= set(up["inputs"].values())
    return None


def pick_init(cfg: Config, run_dir: Path) -> str:
    if cfg.train.init:
        return cfg.train.init
    sft = run_dir / "checkpoints" / "sft" / "final"
    if (sft / "config.json").exists():
        return str(sft)
    if not cfg.student.path:
        raise UserError("no initial weights", "train.init / student.path", "set student.path=DIR")
    return cfg.student.path


def teacher_prefixes(run_dir: Path) -> dict[str, list[int]] | None:
    """sample_id -> teacher_prompt_ids from the rollouts table (online mode), None if absent."""
    if manifest_mod.read(run_dir / "rollouts") is None:
        return None
    t = store.read_table(
        run_dir / "rollouts", rollouts_table, columns=["sample_id", "teacher_prompt_ids"]
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
            teacher,
            pre,
            mb.response_ids,
            k,
            vocab,
            cfg.loss.temperature,
            cfg.train.chunk_positions,
            pad_id,
            want_entropy=False,
        )
    # Built outside inference mode: the loss may save these tensors for backward.
    dev = mb.batch["token_id"].device
    cat = lambda key: torch.from_numpy(np.concatenate([s[key] for s in stats])).to(dev)  # noqa: E731
    mb.batch["teacher_logprob"] = cat("logprob")  # [M]
    mb.batch["teacher_topk_ids"] = cat("topk_ids").long()  # [M, K]
    mb.batch["teacher_topk_logprobs"] = cat("topk_logprobs")  # [M, K]
    mb.batch["teacher_topk_logmass"] = cat("topk_logmass")  # [M]


# ============================================================================ checkpoints
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


def save_checkpoint(
    path: Path, wrapped: nn.Module, tok, state: dict, dist: Dist, *, fsdp: bool, merge: bool
) -> None:
    """Write an HF checkpoint + this rank's trainer state to a temp dir, then rename (atomic)."""
    tmp = path.with_name(f"{store.TMP_PREFIX}{path.name}")
    if dist.main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    model = unwrap(wrapped)
    sd = None
    if fsdp:  # every rank takes part in gathering the full state dict
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(
            model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
    if dist.main:
        if merge and hasattr(model, "merge_and_unload"):
            model = model.merge_and_unload()  # LoRA folded into a plain checkpoint (end of run)
        model.save_pretrained(tmp, state_dict=sd) if sd is not None else model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    fault_point("mid_checkpoint")  # weights written, trainer state not yet
    torch.save(state, tmp / state_file(dist.rank))
    dist.barrier()
    if dist.main:
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    dist.barrier()


# ============================================================================ one optimizer step
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
) -> dict:
    """Forward/backward every micro-batch of one step, clip, step; the step's metric row.

    ``score(mb)``, when given, replaces the cached teacher columns first (``train.online``). The
    row holds the averaged loss metrics, ``grad_norm``, ``lr``, token counts and
    ``input_tokens`` (padded-batch tokens, summed over ranks) for the caller's tokens/s.
    """
    counts = torch.tensor(
        [
            float(sum(mb.batch["weight"].double().sum() for mb in mbs)),
            sum(mb.n_tokens for mb in mbs),
            sum(mb.n_kept for mb in mbs),
            sum(int(mb.attention_mask.sum()) for mb in mbs),
        ],
        dtype=torch.float64,
    )
    # Every micro-batch's weighted-token count is known before any backward: the denominator.
    count, n_tok, n_kept, n_in = dist.all_reduce(counts).tolist()
    scale = dist.world_size / count if count > 0 else 0.0
    sums: dict[str, Tensor] = {}
    for i, mb in enumerate(mbs):
        mb.to(dist.device)
        if score is not None:
            score(mb)
        with _no_sync(wrapped, i == len(mbs) - 1), autocast():
            loss_sum, mets = wrapped(mb.input_ids, mb.attention_mask, mb.positions, mb.batch)
            (loss_sum * scale).backward()
        add_metrics(sums, mets)
    totals = reduce_totals(sums, dist)
    clip = grad_clip if grad_clip > 0 else float("inf")
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip))
    lr = sched.get_last_lr()[0]
    if count > 0:  # a step whose tokens all have weight 0 changes nothing (not even decay)
        optim.step()
    optim.zero_grad(set_to_none=True)
    sched.step()
    return {
        **average_metrics(totals),
        "grad_norm": grad_norm,
        "lr": lr,
        "tokens": n_tok,
        "kept_fraction": n_kept / max(n_tok, 1),
        "weighted_tokens": count,
        "input_tokens": n_in,
    }


# ============================================================================ the recipe
def run(cfg: Config) -> dict:
    """Train on ``run_dir/selected/<train.selection>``; return a summary (steps, losses, paths)."""
    tc = cfg.train
    run_dir = Path(cfg.run_dir)
    dist = setup_distributed(tc.device)
    say = print if dist.main else (lambda *a, **k: None)

    # ---------------------------------------------------------------- setup: data and provenance
    sel_dir = run_dir / "selected" / tc.selection
    m = store.open_committed(
        sel_dir,
        selected_table,
        what_writes_it=f"python -m stages.select select.name={tc.selection}",
    )
    init = pick_init(cfg, run_dir)
    tok = models.load_tokenizer(init, "student")
    vocab = models.vocab_size(tok)
    tok_fp = models.tokenizer_fingerprint(tok)
    sel_tok = selection_tokenizer(run_dir, m)
    if sel_tok is None:
        raise UserError(
            "the selection has no tokenizer fingerprint (nor its inputs)",
            str(sel_dir),
            "re-run rollout/score/select with this version of distillery",
        )
    models.check_same_tokenizer(sel_tok, tok_fp, "selection", "student (train.init)")
    # Cached teacher log-probs are at the scoring temperature (score: 1.0 unless it records one).
    scored_t = float(m["extra"].get("teacher_temperature", 1.0))
    if not tc.online and cfg.loss.temperature != scored_t:
        raise UserError(
            f"loss.temperature={cfg.loss.temperature} but the cached teacher log-probs were scored "
            f"at temperature {scored_t}",
            str(sel_dir),
            f"set loss.temperature={scored_t}, or re-score at the loss temperature",
        )
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    identity = {
        "init": models.model_fingerprint(init, "student"),
        "tokenizer": tok_fp,
        "selection": m["dataset_id"],
        "world_size": dist.world_size,
    }

    ckpt_root = run_dir / "checkpoints" / tc.name
    out_dir = run_dir / "train" / tc.name
    final_dir = ckpt_root / "final"
    resume_from = None
    if ckpt_root.exists() and any(ckpt_root.iterdir()):
        if cfg.overwrite:
            dist.barrier()
            if dist.main:
                shutil.rmtree(ckpt_root)
                shutil.rmtree(out_dir, ignore_errors=True)
            dist.barrier()
        elif not tc.resume:
            raise UserError(
                f"checkpoints of run '{tc.name}' already exist",
                str(ckpt_root),
                "pass train.resume=true to continue, overwrite=true to start over, or another train.name",
            )
        else:
            resume_from = (
                final_dir if (final_dir / STATE_FILE).exists() else latest_step_dir(ckpt_root)
            )
    resumed = None
    if resume_from is not None:
        resumed = torch.load(resume_from / state_file(dist.rank), weights_only=False)
        if resumed["identity"] != identity:
            diff = [k for k in identity if resumed["identity"].get(k) != identity[k]]
            raise UserError(
                f"checkpoint {resume_from} was trained from another {'/'.join(diff)}: "
                + ", ".join(f"{k} {resumed['identity'].get(k)} (now {identity[k]})" for k in diff),
                str(resume_from),
                "pass overwrite=true to start over, or use another train.name",
            )
        if resume_from == final_dir:
            say(f"train: {tc.name} already finished ({final_dir})")
            return {
                "steps": resumed["step"],
                "final": str(final_dir),
                "history": resumed["history"],
                "metrics": resumed["logged"][-1] if resumed["logged"] else {},
                "skipped": True,
            }

    # ---------------------------------------------------------------- setup: model and optimizer
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    full_resume = resumed is not None and tc.lora.r == 0  # weights come from the step checkpoint
    model = models.load_model(
        str(resume_from) if full_resume else init, "student", dtype="float32", device="cpu"
    )
    models.check_embedding_rows(model, tok, "student")
    model.config.use_cache = False
    if tc.lora.r > 0:
        from peft import LoraConfig, PeftModel, get_peft_model

        if resumed is not None:
            model = PeftModel.from_pretrained(model, resume_from, is_trainable=True)
        else:
            lcfg = LoraConfig(
                r=tc.lora.r,
                lora_alpha=tc.lora.alpha,
                lora_dropout=tc.lora.dropout,
                target_modules=list(tc.lora.target_modules),
                task_type="CAUSAL_LM",
            )
            model = get_peft_model(model, lcfg)
    model.train()
    terms = [(t.name, t.weight, dict(t.kwargs)) for t in cfg.loss.terms]
    wrapped: nn.Module = ResponseLoss(
        model, terms, vocab, cfg.loss.temperature, tc.chunk_positions
    ).to(dist.device)
    if tc.fsdp and dist.world_size > 1:
        from torch.distributed.fsdp import fully_shard

        decoder = unwrap(wrapped).get_decoder()
        for layer in getattr(decoder, "layers", []):
            fully_shard(layer)
        fully_shard(wrapped)
    elif dist.world_size > 1:
        wrapped = nn.parallel.DistributedDataParallel(
            wrapped, device_ids=[dist.device.index] if dist.device.type == "cuda" else None
        )
    params = [p for p in wrapped.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=tc.lr, betas=tuple(tc.betas), weight_decay=tc.weight_decay)

    seed = cfg.seed if tc.shuffle else None
    plan = plan_steps(
        sel_dir,
        m,
        world_size=dist.world_size,
        epochs=tc.epochs,
        shuffle_seed=seed,
        budget=tc.micro_batch_tokens,
        grad_accum=tc.grad_accum,
        max_steps=tc.max_steps,
    )
    if plan.steps < 1:
        raise UserError(
            f"the selection is too small for one step: {min(plan.micro_per_rank)} micro-batches per rank, grad_accum={tc.grad_accum}",
            str(sel_dir),
            "lower train.grad_accum or the number of ranks, or raise train.epochs",
        )
    lam = functools.partial(
        lr_factor,
        warmup=tc.warmup_steps,
        total=plan.steps,
        schedule=tc.schedule,
        min_ratio=tc.min_lr_ratio,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lam)

    step, history, logged, start = 0, [], [], None
    if resumed is not None:
        optim.load_state_dict(resumed["optimizer"])
        sched.load_state_dict(resumed["scheduler"])
        set_rng_state(resumed["rng"])
        step, history, logged, start = (
            resumed["step"],
            resumed["history"],
            resumed["logged"],
            resumed["loader"],
        )
        say(f"train: resuming {tc.name} from {resume_from.name} (step {step}/{plan.steps})")
    loader = MicroBatchStream(
        sel_dir,
        m,
        tc.micro_batch_tokens,
        rank=dist.rank,
        world_size=dist.world_size,
        epochs=tc.epochs,
        shuffle_seed=seed,
        prefetch=tc.prefetch,
        start=start,
    )

    teacher, prefixes = None, None
    if tc.online:
        teacher = models.load_model(
            cfg.teacher.path, "teacher", dtype="float32", device=dist.device
        )
        t_tok = models.tokenizer_fingerprint(models.load_tokenizer(cfg.teacher.path, "teacher"))
        models.check_same_tokenizer(tok_fp, t_tok, "student", "teacher")
        prefixes = teacher_prefixes(run_dir)
    score = None
    if teacher is not None:

        def score(mb: MicroBatch) -> None:  # the cached K, so the loss sees the same support size
            k = mb.batch["teacher_topk_ids"].shape[1]
            online_teacher(teacher, mb, prefixes, k, vocab, cfg, pad_id)

    writer = None
    if dist.main:
        out_dir.mkdir(parents=True, exist_ok=True)
        # metrics.jsonl holds exactly the rows of the checkpoint we resume from (no duplicates)
        (out_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in logged))
        (out_dir / "config.json").write_text(json.dumps(as_dict(cfg), indent=1))
        if tc.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(out_dir / "tb"), purge_step=step)
        say(f"train: config\n{json.dumps(as_dict(cfg)['train'], indent=1)}\nloss: {terms}")
        say(
            f"train: {plan.steps} steps x {tc.grad_accum} micro-batches x {dist.world_size} ranks; init {init}; dropped {plan.dropped_micro_batches} tail micro-batches"
        )

    cuda = dist.device.type == "cuda"
    autocast = (
        (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else contextlib.nullcontext
    )
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    from tqdm import tqdm

    bar = tqdm(
        total=plan.steps,
        initial=step,
        desc=f"train {tc.name}",
        disable=not dist.main,
        dynamic_ncols=True,
    )

    def checkpoint(path: Path, merge: bool) -> None:
        state = {"step": step, "optimizer": optim.state_dict(), "scheduler": sched.state_dict()}
        state.update(rng=rng_state(), loader=loader.position(), history=history, logged=logged)
        state.update(identity=identity, plan=plan.__dict__)
        fsdp = tc.fsdp and dist.world_size > 1
        save_checkpoint(path, wrapped, tok, state, dist, fsdp=fsdp, merge=merge)

    # ---------------------------------------------------------------- train
    try:
        while step < plan.steps:
            t0 = time.perf_counter()
            # Form every micro-batch of the step first: its global weighted-token count is the
            # loss denominator, known before any backward.
            mbs = [
                collate(loader.next_micro_batch(), pad_id, str(sel_dir))
                for _ in range(tc.grad_accum)
            ]
            stats = train_step(
                wrapped, mbs, optim, sched, params, dist, grad_clip=tc.grad_clip,
                autocast=autocast, score=score,
            )  # fmt: skip
            step += 1
            sync()
            secs = time.perf_counter() - t0
            n_in = stats.pop("input_tokens")
            row = {"step": step, **stats, "tokens_per_s": n_in / secs, "step_s": secs}
            history.append(row["loss"])
            bar.update(1)
            bar.set_postfix(
                loss=f"{row['loss']:.4f}",
                rkl=f"{row.get('rkl_k1', float('nan')):.4f}",
                gn=f"{row['grad_norm']:.2f}",
                tps=f"{row['tokens_per_s']:.0f}",
            )
            if step % tc.log_every == 0 or step == plan.steps:
                logged.append(row)
                if dist.main:
                    with open(out_dir / "metrics.jsonl", "a") as f:
                        f.write(json.dumps(row) + "\n")
                    if writer is not None:
                        for k, v in row.items():
                            if k != "step" and isinstance(v, float) and math.isfinite(v):
                                writer.add_scalar(f"train/{k}", v, step)
            if tc.save_every and step % tc.save_every == 0 and step < plan.steps:
                checkpoint(ckpt_root / step_dir_name(step), merge=False)

        # ---------------------------------------------------------------- cleanup
        checkpoint(final_dir, merge=tc.lora.r > 0 and tc.lora.save_merged)
    finally:
        loader.close()
        bar.close()
        if writer is not None:
            writer.close()
    say(f"train: done, {step} steps, final loss {history[-1]:.4f} -> {final_dir}")
    return {
        "steps": step,
        "final": str(final_dir),
        "history": history,
        "metrics": logged[-1] if logged else {},
        "plan": plan.__dict__,
        "skipped": False,
    }


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


main = hydra_entry("train")(run)

if __name__ == "__main__":
    main()
