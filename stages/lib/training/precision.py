"""Training precision: bf16 autocast, and fp32 master weights for bf16 parameters (``bf16_params``)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn


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
