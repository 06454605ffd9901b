"""The trainer's records: ``Dist`` (this process's rank, world size and device), ``Job`` (the
fixed facts of one run), ``Trainer`` (what a step changes) and ``State`` (what a checkpoint
restores besides weights, optimizer and RNG)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as tdist
from torch import Tensor, nn

from stages.lib.config import Config
from stages.lib.layout import RunLayout
from stages.lib.progress import log
from stages.lib.training.precision import MasterWeights


@dataclass
class Dist:
    """This process in the (possibly one-process) group: collectives are no-ops alone."""

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
        if self.dist.main:  # (the logger filters other ranks too; a Dist may not be torchrun's)
            log.info(" ".join(map(str, a)))


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


# ============================================================================ distributed seams
