"""Training checkpoints: step folders, resume (identity checked, RNG and optimizer restored), atomic
saves (temp folder, then rename), pruning, and the one-trainer-per-name lock."""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as tdist

from stages.lib import store, trainer_state
from stages.lib.errors import UserError, fault_point
from stages.lib.loader import MicroBatchStream, StepPlan
from stages.lib.training.job import Job, State, Trainer
from stages.lib.training.objective import unwrap

STEP_DIR = re.compile(r"^step-(\d{6,})\Z")


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
    """Optimizer (when the checkpoint has it: ``train.save_optimizer``), schedule, RNG, position."""
    if "optimizer" in resumed:
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


# ============================================================================ checkpoint
def all_finite(tensors: list[torch.Tensor]) -> bool:
    """Whether every element of ``tensors`` is finite, in one read pass per tensor and no copy:
    its minimum and maximum (``aminmax``), which an inf anywhere makes infinite and a NaN
    anywhere makes NaN (both propagate). ``isfinite(t).all()`` takes four passes; an fp64 sum
    first copies the tensor to fp64."""
    ends = [x for t in tensors if t.numel() for x in torch.aminmax(t.detach())]  # [] -> True
    return not ends or bool(torch.isfinite(torch.stack(ends)).all())


def check_finite_params(job: Job, trainer: Trainer) -> None:
    """Refuse to save diverged weights (e.g. train.lr=inf: a finite loss, then inf parameters)."""
    local = lambda p: p.to_local() if hasattr(p, "to_local") else p  # noqa: E731
    bad = not all_finite([local(p) for p in trainer.params])
    flag = job.dist.all_reduce(torch.tensor([float(bad)]), "max")
    if flag.item() > 0:
        raise UserError(
            "the weights became non-finite (the optimizer diverged); nothing was saved",
            str(job.ckpt_root),
            "lower train.lr (and keep train.grad_clip > 0), then re-run",
        )


def final_dtype(tc, device: torch.device) -> torch.dtype:
    """``train.final_dtype``: auto = bfloat16 on CUDA, float32 elsewhere."""
    name = tc.final_dtype
    if name == "auto":
        name = "bfloat16" if device.type == "cuda" else "float32"
    return getattr(torch, name)


def _cast(sd: dict, dtype: torch.dtype) -> dict:
    """The state dict with its floating tensors in ``dtype`` (others as they are). Tensors that
    share storage (tied embeddings) stay shared, so ``save_pretrained`` still writes them once."""
    out, done = {}, {}
    for k, v in sd.items():
        if not v.is_floating_point():
            out[k] = v
            continue
        key = (v.data_ptr(), tuple(v.shape), tuple(v.stride()))
        if key not in done:
            done[key] = v.to(dtype)
        out[k] = done[key]
    return out


def _write_checkpoint(
    job: Job, trainer: Trainer, payload: dict, tmp: Path, merge: bool, dtype: torch.dtype | None
) -> None:
    """HF weights + tokenizer (rank 0) and every rank's trainer state, into ``tmp``; ``dtype``:
    the weights' dtype on disk (None = as trained)."""
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
        if dtype is not None and not hasattr(model, "peft_config"):  # adapters stay as trained
            sd = _cast(sd if sd is not None else model.state_dict(), dtype)
        model.save_pretrained(tmp, state_dict=sd) if sd is not None else model.save_pretrained(tmp)
        job.tok.save_pretrained(tmp)
    fault_point("mid_checkpoint")  # weights written, trainer state not yet
    trainer_state.save(tmp, dist.rank, payload)


def save_checkpoint(
    job: Job, trainer: Trainer, state: State, loader: MicroBatchStream, plan: StepPlan, path: Path,
    *, merge: bool,
) -> None:  # fmt: skip
    """Write a checkpoint into a temp folder, then rename it to ``path`` (atomic); prune old steps.

    ``final/`` (what users ship) holds the weights in ``train.final_dtype`` and a trainer state
    without optimizer moments (it marks the run finished); step checkpoints hold the weights as
    trained and, with ``train.save_optimizer``, the optimizer moments (an exact resume).
    A full disk (or any write error) removes the temp folder and raises one UserError; the
    checkpoints written before stay, so a re-run resumes from the newest of them.
    """
    check_finite_params(job, trainer)
    final = path == job.final_dir
    payload = {
        "step": state.step,
        "scheduler": trainer.sched.state_dict(), "rng": rng_state(), "loader": loader.position(),
        "history": state.history, "logged": state.logged, "skipped": state.skipped,
        "identity": job.identity, "plan": plan.__dict__,
    }  # fmt: skip
    if job.cfg.train.save_optimizer and not final:
        payload["optimizer"] = trainer.optim.state_dict()
    dtype = final_dtype(job.cfg.train, job.dist.device) if final else None
    tmp = path.with_name(f"{store.TMP_PREFIX}{path.name}")
    try:
        _write_checkpoint(job, trainer, payload, tmp, merge, dtype)
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
