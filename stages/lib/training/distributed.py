"""Data parallelism for the trainer: process group setup, DDP/FSDP2 wrapping, the step's token count
and metric totals all-reduced across ranks."""

from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as tdist
from torch import Tensor, nn

from stages.lib import models
from stages.lib.loader import MicroBatch
from stages.lib.losses import MAX_SUFFIX
from stages.lib.training.job import Dist, Job
from stages.lib.training.objective import unwrap


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


# ============================================================================ step
def no_sync_unless_last(wrapped: nn.Module, last: bool):
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
