"""The fused low-memory student log-softmax: one [N, V] fp32 block per loss call.

The head's logits become the log-softmax in place, are gathered once at every id column the
losses read, and, in backward, are overwritten by their own gradient, row block by row block;
temporaries are a few rows wide (``ROW_ELEMS`` elements each). ``chunk_for_budget`` turns a MiB
budget into the positions per call (``train.loss_memory_mib``).
"""

from __future__ import annotations

import torch
from torch import Tensor

# The fused path's working set is ONE [N, V] fp32 block (the head's output, overwritten by the
# log-softmax and then by the gradient) plus scratch: it passes over the block a few rows at a
# time, each temporary at most ROW_ELEMS elements. The budget reserves SCRATCH_BUFFERS of them:
# up to four are alive at once (a tail's backward), the rest covers the head matmul's workspace
# (16 MiB at V = 151,936; measured: scripts/bench_real_shape.py, loss_working_set).
ROW_ELEMS = 2**20  # elements per row-block temporary (4 MiB fp32)
SCRATCH_BUFFERS = 8
MIN_CHUNK = 32  # positions per loss call at the least (smaller head matmuls waste the GEMM)


def row_block(width: int) -> int:
    """Rows per pass over an [N, width] block: the most whose [rows, width] fits ROW_ELEMS."""
    return max(1, ROW_ELEMS // width)


def chunk_for_budget(budget_mib: float, vocab_size: int) -> int:
    """Positions per loss call whose working set (one [chunk, V] fp32 block and the scratch)
    fits ``budget_mib`` MiB; at least ``MIN_CHUNK``."""
    scratch = SCRATCH_BUFFERS * ROW_ELEMS * 4  # bytes
    return max(MIN_CHUNK, int((budget_mib * 2**20 - scratch) // (vocab_size * 4)))


def _in_set(ids: Tensor, valid: Tensor, width: int) -> Tensor:
    """[rows, width] bool: the columns named by the valid entries of ``ids`` [rows, K]."""
    hit = torch.zeros(ids.shape[0], width + 1, dtype=torch.bool, device=ids.device)
    # invalid entries write to a spare last column: every write is True, so duplicates are safe
    return hit.scatter_(1, torch.where(valid, ids, width), True)[:, :width]


def _student_topk(z: Tensor, k: int, vocab_size: int) -> Tensor:
    """The ids [N, k] of each row's ``k`` largest logits among the first ``vocab_size`` columns,
    by row block. The log-softmax at any temperature keeps the order, so these are the student's
    ``k`` most probable tokens; found on the logits, before they are overwritten."""
    out = torch.empty(z.shape[0], k, dtype=torch.long, device=z.device)  # [N, k]
    rb = row_block(z.shape[1])
    with torch.no_grad():
        for s in range(0, z.shape[0], rb):
            out[s : s + rb] = z[s : s + rb, :vocab_size].topk(k, dim=-1).indices
    return out


def _lse_(x: Tensor) -> Tensor:
    """``logsumexp`` over the last axis of ``x`` [b, W] -> [b, 1], computed over ``x`` itself
    (destroyed: no temporary of its size); a row of -inf gives -inf."""
    m = x.amax(dim=-1, keepdim=True)  # [b, 1]
    m = torch.where(torch.isfinite(m), m, 0.0)  # all -inf (or +inf) rows: no inf - inf NaN
    return x.sub_(m).exp_().sum(dim=-1, keepdim=True).log_().add_(m)


def _log_softmax_(z: Tensor, temperature: float, vocab_size: int) -> Tensor:
    """``z`` [N, W] fp32 becomes its log-softmax at ``temperature`` over the first ``vocab_size``
    columns (the rest -inf), IN PLACE, row block by row block: one [row_block, W] scratch."""
    if temperature != 1.0:
        z.div_(temperature)
    if z.shape[1] > vocab_size:
        z[:, vocab_size:] = float("-inf")
    rb = row_block(z.shape[1])
    buf = z.new_empty(min(rb, z.shape[0]), z.shape[1])  # [b, W]
    for s in range(0, z.shape[0], rb):
        blk = z[s : s + rb]  # [b, W] view
        blk.sub_(_lse_(buf[: blk.shape[0]].copy_(blk)))
    return z


def _outside_lse(logp: Tensor, ids: Tensor, valid: Tensor) -> Tensor:
    """``log Σ_{j ∉ ids} exp(logp_j)`` per row [N] (-inf when nothing is outside), by row block."""
    out = torch.empty(logp.shape[0], device=logp.device)  # [N]
    rb = row_block(logp.shape[1])
    buf = logp.new_empty(min(rb, logp.shape[0]), logp.shape[1])  # [b, W] scratch
    for s in range(0, logp.shape[0], rb):
        blk = logp[s : s + rb]  # [b, W]
        mask = _in_set(ids[s : s + rb], valid[s : s + rb], blk.shape[1])  # [b, W] bool
        masked = buf[: blk.shape[0]].copy_(blk).masked_fill_(mask, float("-inf"))  # [b, W]
        out[s : s + rb] = _lse_(masked)[:, 0]
    return out


class _FusedLogProbs(torch.autograd.Function):
    """The student's fp32 log-softmax, its values at the stored id columns and its log-mass
    outside chosen id sets, in ONE [N, V] block: the logits' own, reused twice.

    Forward: the logits become the log-softmax in place (``inplace``; else in a copy), gathered
    once at every id column. Backward, row block by row block: dL/dlogp of the block in a
    [row_block, V] scratch (scatter of the gathered values' gradients plus each tail's dense term),
    then ``(g − softmax · Σ g) / T`` written over the block of the saved log-softmax, which is
    returned as the logits' gradient. Peak: that one block plus ``SCRATCH_BUFFERS`` row blocks.
    The saved log-softmax is consumed, so the backward runs once (no ``retain_graph``).
    """

    @staticmethod
    def forward(ctx, z, ids, sets, temperature, vocab_size, inplace):  # noqa: ANN001
        ctx.set_materialize_grads(False)  # unused outputs send None, not [N, V] of zeros
        logp = z if inplace and z.dtype == torch.float32 else z.float().clone()  # [N, W]
        _log_softmax_(logp, temperature, vocab_size)
        vals = logp.gather(1, ids)  # [N, K_all]
        tails = [_outside_lse(logp, ids[:, lo:hi], valid) for lo, hi, valid in sets]  # [N] each
        ctx.sets = [(lo, hi) for lo, hi, _ in sets]
        ctx.temperature, ctx.dtype, ctx.spent = temperature, z.dtype, False
        ctx.save_for_backward(logp, ids, *tails, *[v for _, _, v in sets])
        return (vals, *tails)

    @staticmethod
    def backward(ctx, g_vals, *g_tails):  # noqa: ANN001
        if ctx.spent:
            raise RuntimeError(
                "the fused log-softmax's backward runs once: its buffer became the gradient "
                "(backward(retain_graph=True) twice through a loss is not supported)"
            )
        ctx.spent = True
        logp, ids, *rest = ctx.saved_tensors
        k = len(ctx.sets)
        tails = []  # (lo, hi, log-mass, valid, gradient) of each tail that has a gradient
        for (lo, hi), lse, valid, g in zip(ctx.sets, rest[:k], rest[k:], g_tails, strict=True):
            if g is not None:
                has = torch.isfinite(lse)  # [N]; no tail: no gradient (and no -inf - -inf NaN)
                tails.append((lo, hi, torch.where(has, lse, 0.0), valid, torch.where(has, g, 0.0)))
        rows, width = logp.shape
        rb = row_block(width)
        acc = logp.new_empty(min(rb, rows), width)  # [b, W] dL/dlogp of one row block
        share = torch.empty_like(acc) if tails else None  # [b, W] one tail's dense term
        for s in range(0, rows, rb):
            e = min(s + rb, rows)
            blk, g = logp[s:e], acc[: e - s].zero_()  # [b, W] views
            if g_vals is not None:
                g.scatter_add_(1, ids[s:e], g_vals[s:e])
            for lo, hi, lse, valid, g_t in tails:
                mask = _in_set(ids[s:e, lo:hi], valid[s:e], width)  # [b, W]
                sh = torch.sub(blk, lse[s:e, None], out=share[: e - s]).exp_()
                g.add_(sh.masked_fill_(mask, 0.0).mul_(g_t[s:e, None]))
            # through the log-softmax, over the saved block: g − softmax · Σ g
            blk.exp_().mul_(g.sum(-1, keepdim=True)).neg_().add_(g)
        if ctx.temperature != 1.0:
            logp.div_(ctx.temperature)
        return logp.to(ctx.dtype), None, None, None, None, None
