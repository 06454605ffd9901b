"""The training objective: the response-only forward with the chunked fp32 head and the OPD loss,
its chunking, and the learning-rate schedule."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from stages.lib.logprobs import model_head, response_hidden
from stages.lib.losses import MAX_SUFFIX, chunk_for_budget, combined_loss


# ============================================================================ small pure helpers
def lr_factor(step: int, *, warmup: int, total: int, schedule: str, min_ratio: float) -> float:
    """LR multiplier for optimizer step ``step`` (0-based): linear warmup, then cosine or flat."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


# ============================================================================ the model under loss
class ResponseLoss(nn.Module):
    """Student forward that returns the weighted loss SUM over response tokens (and metric sums).

    Wrapped whole by DDP / FSDP2, so their hooks see one forward and one backward per micro-batch.
    """

    def __init__(
        self,
        model: nn.Module,
        terms: list,
        vocab_size: int,
        temperature: float,
        chunk: int,
        share_prefix: bool = False,
        split: bool = True,
    ):
        super().__init__()
        self.model = model
        self.terms, self.vocab_size = terms, vocab_size
        self.temperature, self.chunk = temperature, chunk
        self.share_prefix = share_prefix  # train.share_prefix: rows of one prompt run it once
        self.split = split  # train.split_attention: its keys read once, not copied per row

    def _chunk_loss(self, h: Tensor, batch: dict[str, Tensor]) -> tuple[Tensor, dict]:
        # The head and log-softmax stay fp32 under bf16 autocast and bf16 weights (docs: fp32 head).
        with torch.autocast(h.device.type, enabled=False):
            logits = model_head(self.model)(h.float())  # [n, V] fp32
            # in place: the logits become the log-softmax, then its gradient (one [n, V] block)
            return combined_loss(
                logits, batch, self.terms, self.vocab_size, self.temperature, inplace=True
            )

    def forward(self, input_ids: Tensor, attention_mask: Tensor, positions: Tensor, batch: dict):
        h = response_hidden(  # [M, H]
            self.model, input_ids, attention_mask, positions, self.share_prefix, self.split
        )
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
