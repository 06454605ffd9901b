"""Every distillation loss in docs/METHODS.md, as small pure functions of the student's logits.

Interface (the trainer calls it once per micro-batch chunk of response positions):

    loss_sum, metrics = LOSSES[name](logits, batch, vocab_size=V, temperature=1.0, **kwargs)

- ``logits`` [N, V]: the student's logits at the N selected response positions (position p scores
  token p + 1), any float dtype; cast to fp32 and log-softmaxed **once** per call over the full
  (unpadded) vocabulary. Only K columns are gathered from it; no dense teacher [N, V] is ever built.
- ``batch``: per-token tensors named like the stored columns: ``token_id`` [N] int, ``weight`` [N]
  (selection weight, 0 = excluded; all ones when absent), ``segment`` [N] uint8 (0 = on-policy
  student token, 1 = teacher-prefix / off-policy guidance token; all 0 when absent),
  ``teacher_logprob`` [N], ``teacher_topk_ids`` [N, K], ``teacher_topk_logprobs`` [N, K],
  ``teacher_topk_logmass`` [N], ``behavior_logprob`` [N], optional ``ref_logprob`` [N],
  ``behavior_topk_ids`` [N, Kb] and ``teacher_logprobs_on_behavior_topk`` [N, Kb].
- ``vocab_size``: the tokenizer's size; logit columns ``>= vocab_size`` (padded embedding rows) are
  masked out of the normaliser. ``temperature`` divides the student's logits. The stored teacher
  log-probs must have been scored at the same temperature (the trainer checks the manifest).
- Returns ``loss_sum = Σ_t w_t · L_t``: a weighted **sum**, not a mean. The trainer divides by the
  global Σ w over all accumulation steps and ranks, so splitting a batch into chunks and summing is
  exactly one call (tested). ``metrics`` are detached sums too; ``average_metrics`` turns the
  accumulated totals into means (each metric knows its denominator).

Excluded tokens (w = 0) contribute nothing, not even NaN: their per-token inputs are zeroed before
any arithmetic, so unscored rows (NaN teacher log-probs, id -1 padding) are harmless.

Policy-gradient losses (``opd_k1``, ``vopd``, ``exopd``, the trusted part of ``tropd``) share the
surrogate ``L_t = −sg(A_t)·log π_θ(y_t)``, whose gradient is the REINFORCE estimate
``−A_t ∇log π_θ(y_t)`` of ``∇ KL(π_θ‖π_T)`` when ``A_t = r_t`` and ``y_t ~ π_θ``. They take an optional
truncated importance weight ``is_clip = C``: ``A_t ← min(π_θ(y_t)/π_b(y_t), C)·A_t`` (detached), for
rollouts sampled by an older student ``π_b`` (stale data; off by default, as in Lightning OPD).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

Metrics = dict[str, Tensor]
LossFn = Callable[..., tuple[Tensor, Metrics]]

# Metrics averaged over on-policy (segment 0) weighted tokens rather than all weighted tokens:
# r_t estimates the reverse KL only on tokens the student sampled itself.
ONPOLICY_METRICS = ("reward", "rkl_k1", "staleness")
# Count metrics (kept as totals) and max-reduced metrics (the trainer takes the max, not the sum).
COUNT_METRICS = ("tokens", "tokens_onpolicy")
MAX_SUFFIX = "_max"


# ---------------------------------------------------------------------------- shared inputs

# Id columns whose student log-probs the fused path gathers in its one pass (any present);
# ``student_topk_ids`` is the student's own top-k (``uld``), found before the log-softmax.
GATHER_COLUMNS = (
    "token_id",
    "teacher_topk_ids",
    "behavior_topk_ids",
    "teacher_mapped_ids",
    "student_topk_ids",
)
# Loss -> the id column whose complement's student log-mass it reads (the tail bucket).
TAIL_SETS = {
    "topk_fkl": "teacher_topk_ids",
    "tropd": "teacher_topk_ids",
    "mapped_topk_fkl": "teacher_mapped_ids",
}
# The fused path's working set is ONE [N, V] fp32 block (the head's output, overwritten by the
# log-softmax and then by the gradient) plus scratch: it passes over the block a few rows at a
# time, each temporary at most ROW_ELEMS elements. The budget reserves SCRATCH_BUFFERS of them:
# up to four are alive at once (a tail's backward), the rest covers the head matmul's workspace
# (measured: scripts/bench_real_shape.py, loss_working_set).
ROW_ELEMS = 2**20  # elements per row-block temporary (4 MiB fp32)
SCRATCH_BUFFERS = 6
MIN_CHUNK = 32  # positions per loss call at the least (smaller head matmuls waste the GEMM)


def row_block(width: int) -> int:
    """Rows per pass over an [N, width] block: the most whose [rows, width] fits ROW_ELEMS."""
    return max(1, ROW_ELEMS // width)


def chunk_for_budget(budget_mib: float, vocab_size: int) -> int:
    """Positions per loss call whose working set (one [chunk, V] fp32 block and the scratch)
    fits ``budget_mib`` MiB; at least ``MIN_CHUNK``."""
    scratch = SCRATCH_BUFFERS * ROW_ELEMS * 4  # bytes
    return max(MIN_CHUNK, int((budget_mib * 2**20 - scratch) // (vocab_size * 4)))


def _id_columns(batch: Mapping[str, Tensor]) -> tuple[list[str], Tensor | None]:
    """The gathered id columns present and their concatenation [N, K_all] (ids < 0 -> 0)."""
    names = [c for c in GATHER_COLUMNS if isinstance(batch.get(c), Tensor)]
    parts = [batch[c].long().reshape(batch[c].shape[0], -1) for c in names]  # [N, K_c]
    return names, (torch.cat(parts, dim=1).clamp(min=0) if parts else None)


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


@dataclass
class Prepared:
    """The student's log-probs and the cleaned per-token batch, computed once per call.

    ``combined_loss`` builds one and passes it as ``logits`` to every term, so the [N, V]
    log-softmax is computed once per call however many terms there are. The losses read the
    student only through the gathered columns (``at``) and the tails (``tail``): no [N, V] tensor
    is handed out (the fused path's one block becomes the gradient in backward).
    """

    vocab_size: int  # real vocabulary columns (the rest are padding)
    token_logp: Tensor  # [N] log π_θ(y_t), with grad
    batch: dict[str, Tensor]  # per-token fields, excluded rows zeroed, floats in fp32
    w: Tensor  # [N] fp32 selection weight
    cols: dict[str, Tensor]  # id column -> student log-probs there [N, K], with grad
    tails: dict[str, tuple[Tensor, Tensor]]  # id column -> (log-mass outside [N], has_tail [N])

    def at(self, name: str) -> Tensor:
        """Student full-vocabulary log-probs at the ids of column ``name`` -> [N, K]."""
        if name not in self.cols:
            raise KeyError(f"batch has no {name!r} column")
        return self.cols[name]

    def tail(self, name: str) -> tuple[Tensor, Tensor]:
        """(log Σ p_θ outside the valid ids of column ``name`` [N], 0 where none; has_tail [N])."""
        if name not in self.tails:
            raise KeyError(f"the tail outside {name!r} was not prepared (see TAIL_SETS)")
        return self.tails[name]

    def need(self, name: str, why: str) -> Tensor:
        if name not in self.batch:
            raise KeyError(f"batch has no {name!r} column, needed by {why}")
        return self.batch[name]


def _clean(batch: Mapping[str, Tensor], n: int, w: Tensor) -> dict[str, Tensor]:
    """Per-token fields with excluded rows (w = 0) zeroed before any arithmetic."""
    keep = w != 0  # [N]
    clean: dict[str, Tensor] = {}
    for name, x in batch.items():
        if not isinstance(x, Tensor) or x.ndim == 0:
            continue
        if x.shape[0] != n:
            raise ValueError(f"batch[{name!r}] has {x.shape[0]} rows, logits have {n}")
        k = keep.view(-1, *([1] * (x.ndim - 1)))  # [N, 1...] broadcast over the K axis
        if x.is_floating_point():
            clean[name] = torch.where(k, x.float(), 0.0)
        elif name.endswith("_ids") or name == "token_id":
            clean[name] = torch.where(k, x.long(), 0)  # id -1 padding must still gather
        else:
            clean[name] = x
    if "token_id" not in clean:
        raise KeyError("batch has no 'token_id' column")
    return clean


def _valid(ids: Tensor) -> Tensor:
    """Which ids [N, K] are members of their set: -1 (a teacher token without a student id in
    ``teacher_mapped_ids``) is not."""
    return ids >= 0


def prepare(
    logits: Tensor | Prepared,
    batch: Mapping[str, Tensor],
    vocab_size: int | None = None,
    temperature: float = 1.0,
    *,
    tails: tuple[str, ...] = (),
    topk: int = 0,
    dense: bool = False,
    inplace: bool = False,
) -> Prepared:
    """Student log-softmax (fp32, full unpadded vocabulary, at ``temperature``) + cleaned batch.

    ``tails``: id columns whose complement's log-mass to prepare (``TAIL_SETS``). ``topk``: also
    gather the student's ``topk`` most probable tokens (column ``student_topk_ids``, in decreasing
    order). ``inplace``: the fused path may overwrite fp32 ``logits`` with the log-softmax and,
    in backward, with its gradient (the trainer's own head output: no second block).
    ``dense``: plain autograd through an [N, V] ``torch.log_softmax`` instead of the fused path:
    the reference the fused path is tested against (several blocks of memory; no loss uses it).
    """
    if isinstance(logits, Prepared):
        return logits
    n, width = logits.shape
    vocab_size = width if vocab_size is None else vocab_size
    if vocab_size > width:
        raise ValueError(f"vocab_size={vocab_size} exceeds the logits' {width} columns")
    w = batch.get("weight")
    w = torch.ones(n, device=logits.device) if w is None else w.float()  # [N]
    clean = _clean(batch, n, w)
    if topk:
        clean["student_topk_ids"] = _student_topk(logits.detach(), topk, vocab_size)  # [N, k]
    names, ids = _id_columns(clean)  # [N, K_all]
    span, lo = {}, 0  # column -> its [lo, hi) range in ids
    for c in names:
        span[c] = (lo, lo + clean[c].reshape(n, -1).shape[1])
        lo = span[c][1]
    wanted = [c for c in dict.fromkeys(tails) if c in span]
    valids = {c: _valid(clean[c]) for c in wanted}
    if dense:
        z = logits.float()  # [N, V]
        if temperature != 1.0:
            z = z / temperature
        if width > vocab_size:  # out of place: keeps autograd happy
            z = z.masked_fill(torch.arange(width, device=z.device) >= vocab_size, float("-inf"))
        logp = torch.log_softmax(z, dim=-1)  # [N, V]
        vals = logp.gather(1, ids)  # [N, K_all]
        got = {}
        for c in wanted:
            lo, hi = span[c]
            in_set = _in_set(ids[:, lo:hi], valids[c], width)  # [N, V]
            has = (~in_set & torch.isfinite(logp)).any(dim=-1)  # [N]
            # S columns get a finite floor, not -inf: K = V stays finite, gradient included
            floor = torch.finfo(logp.dtype).min
            got[c] = torch.logsumexp(logp.masked_fill(in_set, floor), dim=-1)  # [N]
            got[c] = (torch.where(has, got[c], 0.0), has)
    else:
        sets = [(*span[c], valids[c]) for c in wanted]
        vals, *lses = _FusedLogProbs.apply(logits, ids, sets, temperature, vocab_size, inplace)
        got = {}
        for c, lse in zip(wanted, lses, strict=True):
            has = torch.isfinite(lse)  # [N]
            got[c] = (torch.where(has, lse, 0.0), has)
    cols = {}
    for c in names:
        lo, hi = span[c]
        cols[c] = vals[:, lo:hi].reshape(clean[c].shape)  # [N] or [N, K]
    return Prepared(vocab_size, cols["token_id"], clean, w, cols, got)


def _segment(p: Prepared) -> Tensor:
    seg = p.batch.get("segment")
    return torch.zeros_like(p.w, dtype=torch.long) if seg is None else seg.long()  # [N]


def _base_metrics(p: Prepared) -> Metrics:
    """Diagnostics every loss reports (sums; see ``average_metrics``)."""
    lp = p.token_logp.detach()  # [N]
    on = p.w * (_segment(p) == 0)  # [N] on-policy weight
    m = {"tokens": p.w.sum(), "tokens_onpolicy": on.sum()}
    if "teacher_logprob" in p.batch:
        r = p.batch["teacher_logprob"] - lp  # [N]
        m["reward"] = (on * r).sum()
        m["rkl_k1"] = -m["reward"]  # k1 estimate of KL(π_θ‖π_T) on tokens sampled from π_θ
    if "behavior_logprob" in p.batch:
        m["staleness"] = (on * (lp - p.batch["behavior_logprob"])).sum()
    return m


def _finish(p: Prepared, per_token: Tensor, extra: Metrics | None = None) -> tuple[Tensor, Metrics]:
    loss_sum = (p.w * per_token).sum()  # scalar; linear in w
    m = _base_metrics(p)
    m["loss"] = loss_sum.detach()
    for name, v in (extra or {}).items():
        m[name] = v.detach()
    return loss_sum, m


def average_metrics(totals: Mapping[str, float]) -> dict[str, float]:
    """Turn metric totals (summed over chunks, accumulation steps and ranks) into means.

    ``reward``, ``rkl_k1``, ``staleness`` are divided by ``tokens_onpolicy``; ``*_max`` and the token
    counts are kept; everything else (losses, KLs, IS weight, fractions) is divided by ``tokens``.
    """
    out = {}
    for name, v in totals.items():
        base = name.rsplit("/", 1)[-1]
        if base in COUNT_METRICS or base.endswith(MAX_SUFFIX):
            out[name] = float(v)
            continue
        den = totals.get("tokens_onpolicy" if base in ONPOLICY_METRICS else "tokens", 0.0)
        out[name] = float(v) / float(den) if den else math.nan
    return out


# ------------------------------------------------------------------------------- helpers


def _renorm(lp: Tensor) -> Tensor:
    """log p̃ on a support: log-probs [N, K] renormalised to sum to 1 over K."""
    return lp - torch.logsumexp(lp, dim=-1, keepdim=True)  # [N, K]


def _kl(log_a: Tensor, log_b: Tensor) -> Tensor:
    """``KL(a‖b) = Σ_i a_i (log a_i − log b_i)`` over the last axis, with 0·log 0 = 0.

    Entries with ``a_i = 0`` are replaced by 0 *before* the arithmetic so that neither the value
    nor the gradient can pick up ``0·(−inf)`` NaNs.
    """
    a = log_a.exp()  # [N, K]
    live = a > 0
    diff = torch.where(live, log_a, 0.0) - torch.where(live, log_b, 0.0)  # [N, K]
    return (a * diff).sum(-1)  # [N]


def _support(p: Prepared, support: str, why: str) -> tuple[str, Tensor]:
    """(the ids' column name, teacher full-vocab log-probs on them [N, K] fp32) for a top-K
    support; the student's log-probs there are ``p.at(name)``."""
    if support == "teacher":
        p.need("teacher_topk_ids", why)
        return "teacher_topk_ids", p.need("teacher_topk_logprobs", why)
    if support == "behavior":
        p.need("behavior_topk_ids", why)
        return "behavior_topk_ids", p.need("teacher_logprobs_on_behavior_topk", why)
    raise ValueError(f"support must be 'teacher' or 'behavior', got {support!r}")


def _pg(p: Prepared, adv: Tensor, is_clip: float | None) -> tuple[Tensor, Metrics]:
    """Per-token policy-gradient surrogate ``−sg(iw·A)·log π_θ(y)`` [N] and IS metrics."""
    lp = p.token_logp  # [N]
    adv = adv.detach()  # [N]
    m: Metrics = {}
    if is_clip is not None:
        if is_clip <= 0:
            raise ValueError("is_clip must be > 0")
        beh = p.need("behavior_logprob", "the importance weight (is_clip)")
        ratio = (lp.detach() - beh).exp()  # [N] π_θ/π_b
        iw = ratio.clamp(max=is_clip)  # [N] truncated: bounded variance, small bias
        m["is_weight"] = (p.w * iw).sum()
        m["is_clipped"] = (p.w * (ratio > is_clip)).sum()
        live = ratio.masked_fill(p.w == 0, 0.0)
        m["is_ratio_max"] = live.max() if live.numel() else live.new_zeros(())
        adv = adv * iw
    return -adv * lp, m


def _topk_fkl_tokens(p: Prepared, tail_bucket: bool, why: str) -> Tensor:
    """Per-token top-K forward KL on the teacher's support [N] (see ``topk_fkl``)."""
    col, t_lp = _support(p, "teacher", why)  # the ids' column, [N, K]
    s_lp = p.at(col)  # [N, K] student, full-vocab normalised
    if not tail_bucket:
        return _kl(_renorm(t_lp), _renorm(s_lp))
    # Teacher tail mass from the stored fp32 log-mass (top-K log-probs may be stored in fp16).
    logmass = p.batch.get("teacher_topk_logmass")
    if logmass is None:
        logmass = torch.logsumexp(t_lp, dim=-1)  # [N]
    tail_t = (-torch.expm1(logmass.clamp(max=0.0))).clamp(0.0, 1.0)  # [N] 1 − exp(logmass)
    # Student tail mass = logsumexp over the columns outside S, computed exactly from the
    # log-softmax rather than as 1 − Σ_S p_θ (which cancels catastrophically when the tail is
    # small). When S covers every real column (K = V; padded columns are not part of the tail)
    # the tail is empty for both models: a stored log-mass a hair below 0 (a logaddexp's -1e-7,
    # fp16 rounding) is rounding, not mass. Such rows get no tail term at all.
    log_tail_s, has_tail = p.tail(col)  # [N], [N]
    tail = torch.special.xlogy(tail_t, tail_t) - tail_t * log_tail_s  # [N]
    head = _kl(t_lp, s_lp)  # [N] Σ_S p_T (log p_T − log p_θ), unnormalised
    return head + torch.where(has_tail, tail, 0.0)  # [N]


# --------------------------------------------------------------------------------- losses


def opd_k1(
    logits: Tensor | Prepared,
    batch: Mapping[str, Tensor],
    *,
    vocab_size: int | None = None,
    temperature: float = 1.0,
    is_clip: float | None = None,
) -> tuple[Tensor, Metrics]:
    """Sampled-token OPD (K1; Lightning OPD, Thinking Machines' on-policy distillation).

    ``r_t = log π_T(y_t) − log π_θ(y_t)``,  ``L_t = −sg(r_t)·log π_θ(y_t)``.

    The gradient ``−r_t ∇log π_θ(y_t) = (log π_θ − log π_T)(y_t)·∇log π_θ(y_t)`` is the
    single-sample estimate of ``∇ KL(π_θ‖π_T)`` for ``y_t ~ π_θ``. Optional truncated importance
    weight ``min(exp(log π_θ − log π_b), is_clip)`` (detached) for stale rollouts.
    """
    p = prepare(logits, batch, vocab_size, temperature)
    r = p.need("teacher_logprob", "opd_k1") - p.token_logp.detach()  # [N]
    per_token, m = _pg(p, r, is_clip)
    return _finish(p, per_token, m)


def vopd(
    logits: Tensor | Prepared,
    batch: Mapping[str, Tensor],
    *,
    vocab_size: int | None = None,
    temperature: float = 1.0,
    support: str = "teacher",
    is_clip: float | None = None,
) -> tuple[Tensor, Metrics]:
    """vOPD: OPD with a control-variate baseline.

    ``A_t = r_t + sg(KL_t(π_θ‖π_T))``,  ``L_t = −sg(A_t)·log π_θ(y_t)``, with
    ``KL_t = Σ_{i∈S} p̃_θ(i)(log p̃_θ(i) − log p̃_T(i))`` on a top-K support ``S``, both distributions
    renormalised on it: ``support="teacher"`` (stored teacher top-K ids and log-probs) or
    ``"behavior"`` (the behaviour policy's top-K ids with the teacher's log-probs on them).

    Sign: ``E_{y~π_θ}[r_t] = −KL_t(π_θ‖π_T)``, so ``A_t = r_t + KL_t = r_t − E[r_t]`` is the reward
    minus its expected value (a state-value baseline): adding ``+KL`` *centres* the reward. It keeps
    the gradient unbiased because the baseline ``b_t = −KL_t`` does not depend on the sampled
    ``y_t`` (only on ``s_t`` and the stored support) and is detached:
    ``E_y[b_t ∇log π_θ(y)] = b_t ∇Σ_y π_θ(y) = 0``. The top-K approximation of ``KL_t`` only makes
    the baseline less optimal (less variance reduction), never biased.
    """
    p = prepare(logits, batch, vocab_size, temperature)
    col, t_lp = _support(p, support, "vopd")  # the ids' column, [N, K]
    kl = _kl(_renorm(p.at(col).detach()), _renorm(t_lp))  # [N] baseline, no gradient
    r = p.need("teacher_logprob", "vopd") - p.token_logp.detach()  # [N]
    per_token, m = _pg(p, r + kl, is_clip)
    m["baseline_kl"] = (p.w * kl).sum()
    return _finish(p, per_token, m)


def exopd(
    logits: Tensor | Prepared,
    batch: Mapping[str, Tensor],
    *,
    vocab_size: int | None = None,
    temperature: float = 1.0,
    lam: float = 1.25,
    is_clip: float | None = None,
) -> tuple[Tensor, Metrics]:
    """G-OPD / ExOPD: reward extrapolation past the teacher.

    ``A_t = λ·log π_T(y_t) + (1−λ)·log π_ref(y_t) − log π_θ(y_t)``, ``L_t = −sg(A_t)·log π_θ(y_t)``.
    λ = 1 is ``opd_k1`` exactly (``ref_logprob`` is then not read); λ = 1.25 is ExOPD's default
    (λ > 1 extrapolates along the teacher-minus-reference direction). ``π_ref`` is the student's
    initial checkpoint by default, or the teacher's pre-RL base for "reward correction".
    """
    p = prepare(logits, batch, vocab_size, temperature)
    t = p.need("teacher_logprob", "exopd")  # [N]
    if lam == 1.0:
        target = t  # bit-identical to opd_k1 (and no ref column needed)
    else:
        target = lam * t + (1.0 - lam) * p.need("ref_logprob", f"exopd with lam={lam}")  # [N]
    per_token, m = _pg(p, target - p.token_logp.detach(), is_clip)
    return _finish(p, per_token, m)


def topk_fkl(
    logits: Tensor | Prepared,
    batch: Mapping[str, Tensor],
    *,
    vocab_size: int | None = None,
    temperature: float = 1.0,
    tail_bucket: bool = True,
) -> tuple[Tensor, Metrics]:
    """Top-K forward KL ``KL(π_T‖π_θ)`` on the teacher's top-K support ``S``.

    ``tail_bucket=True`` (default; TRL's trick): a (K+1)-way distribution, the K teacher ids plus one
    bucket for everything else. Teacher: ``p_T(i) = exp(teacher_topk_logprobs)`` and tail
    ``1 − exp(teacher_topk_logmass)``; student: its full-vocabulary probabilities ``p_θ(i)`` (not
    renormalised) and tail ``1 − Σ_{i∈S} p_θ(i)``:

        L_t = Σ_{i∈S} p_T(i)(log p_T(i) − log p_θ(i)) + tail_T (log tail_T − log tail_θ)

    With K = V (no truncation) the tail is empty and this is the dense forward KL exactly.
    ``tail_bucket=False``: both distributions renormalised on ``S``:
    ``Σ_{i∈S} p̃_T(i)(log p̃_T(i) − log p̃_θ(i))`` (blind to mass the student puts outside ``S``).
    """
    tails = ("teacher_topk_ids",) if tail_bucket else ()
    p = prepare(logits, batch, vocab_size, temperature, tails=tails)
    return _finish(p, _topk_fkl_tokens(p, tail_bucket, "topk_fkl"))


def topk_rkl(
    logits: Tensor | Prepared,
    batch: Mapping[str, Tensor],
    *,
    vocab_size: int | None = None,
    temperature: float = 1.0,
    support: str = "teacher",
    form: str = "biased",
    renormalize: bool = True,
) -> tuple[Tensor, Metrics]:
    """Top-K reverse KL ``KL(π_θ‖π_T)`` on a top-K support (teacher's or behaviour's).

    ``renormalize=True`` (default), with ``p̃`` renormalised on ``S``:

    - ``form="biased"``: ``L_t = Σ_{i∈S} p̃_θ(i)(log p̃_θ(i) − log p̃_T(i))``, gradient through p̃_θ.
    - ``form="stopgrad"`` ("Many Faces" fix):
      ``L_t = −Σ_{i∈S} sg(p̃_θ(i)(log p̃_T(i) − log p̃_θ(i)))·log p̃_θ(i)``.

    Note: with both distributions renormalised the two forms have the **same gradient** (because
    ``Σ_S p̃_θ ∇log p̃_θ = ∇Σ_S p̃_θ = 0``); only the reported value differs (the stop-gradient
    surrogate's value is not a KL, so its KL is reported as ``kl``). The forms differ when the
    student is *not* renormalised, ``renormalize=False`` (docs/METHODS.md's formula, full-vocabulary
    log-probs inside the logs): ``biased`` = ``Σ_{i∈S} p_θ(i)(log p_θ(i) − log p_T(i))``, whose
    gradient carries the extra ``∇Σ_S p_θ`` term that pushes mass out of ``S``; ``stopgrad`` =
    ``−Σ_{i∈S} sg(p̃_θ(i)(log p_T(i) − log p_θ(i)))·log p_θ(i)``, which drops it.
    "Rethinking OPD" default: ``support="behavior"`` with K = 16 (the student's support).
    """
    if form not in ("biased", "stopgrad"):
        raise ValueError(f"form must be 'biased' or 'stopgrad', got {form!r}")
    p = prepare(logits, batch, vocab_size, temperature)
    col, t_lp = _support(p, support, "topk_rkl")  # the ids' column, [N, K]
    s_lp = p.at(col)  # [N, K] full-vocab
    s_tilde = _renorm(s_lp)  # [N, K]
    if renormalize:
        s_log, t_log = s_tilde, _renorm(t_lp)
    else:
        s_log, t_log = s_lp, t_lp
    kl = _kl(s_log, t_log)  # [N] (truncated when not renormalised)
    if form == "biased":
        return _finish(p, kl, {"kl": (p.w * kl).sum()})
    coef = (s_tilde.exp() * (t_log - s_log)).detach()  # [N, K]
    per_token = -(coef * s_log).sum(-1)  # [N]
    return _finish(p, per_token, {"kl": (p.w * kl).sum()})


def gkd_jsd(
    logits: Tensor | Prepared,
    batch: Mapping[str, Tensor],
    *,
    vocab_size: int | None = None,
    temperature: float = 1.0,
    beta: float = 0.5,
) -> tuple[Tensor, Metrics]:
    """Generalised Jensen-Shannon divergence (GKD, OPSD) on the teacher's top-K support.

    Both distributions renormalised on ``S`` (teacher at the stored temperature, student at
    ``temperature``; OPSD: K = 50, β = 0.5, both at the sampling temperature). TRL's convention
    (``GKDTrainer.generalized_jsd_loss``):

        M = β·p̃_T + (1−β)·p̃_θ,   JSD_β = β·KL(p̃_T‖M) + (1−β)·KL(p̃_θ‖M)
        β = 0 → KL(p̃_T‖p̃_θ) (forward),   β = 1 → KL(p̃_θ‖p̃_T) (reverse)

    The endpoints are evaluated as the KLs themselves. The interior formula tends to 0 at both
    ends, but in the matching direction: ``JSD_β / β → KL(p_T‖p_θ)`` as β → 0 and
    ``JSD_β / (1−β) → KL(p_θ‖p_T)`` as β → 1, which is why β (the teacher's weight in M) is also
    the weight of ``KL(p_T‖M)``: small β behaves like (a scaled) forward KL. Expect the loss scale
    to jump at the endpoints.
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    p = prepare(logits, batch, vocab_size, temperature)
    col, t_lp = _support(p, "teacher", "gkd_jsd")  # the ids' column, [N, K]
    s = _renorm(p.at(col))  # [N, K]
    t = _renorm(t_lp)  # [N, K]
    if beta == 0.0:
        jsd = _kl(t, s)  # [N]
    elif beta == 1.0:
        jsd = _kl(s, t)  # [N]
    else:
        log_m = torch.logsumexp(
            torch.stack([t + math.log(beta), s + math.log(1.0 - beta)]), dim=0
        )  # [N, K]
        jsd = beta * _kl(t, log_m) + (1.0 - beta) * _kl(s, log_m)  # [N]
    return _finish(p, jsd)


def tropd(
    logits: Tensor | Prepared,
    batch: Mapping[str, Tensor],
    *,
    vocab_size: int | None = None,
    temperature: float = 1.0,
    tau: float = 0.5,
    outlier: str = "fkl",
    tail_bucket: bool = True,
    is_clip: float | None = None,
) -> tuple[Tensor, Metrics]:
    """TrOPD: OPD only where the teacher is trusted (the trust test is the **inferred** form).

    On student tokens (``segment == 0``) the teacher is trusted when
    ``min(π_T(y_t)/π_θ(y_t), 1) ≥ τ``, i.e. ``r_t ≥ log τ`` (current student, detached):

    - trusted: ``opd_k1`` (``−sg(r_t)·log π_θ(y_t)``);
    - untrusted, ``outlier="fkl"``: top-K forward KL (``topk_fkl``, tail bucket per ``tail_bucket``);
      ``"mask"``: nothing; ``"clip"``: ``opd_k1`` with the reward clipped at ``log τ``,
      ``−sg(max(r_t, log τ))·log π_θ(y_t)`` (bounded push-down instead of a huge negative reward).

    Teacher-prefix tokens (``segment == 1``, off-policy guidance sampled from the teacher) get top-K
    forward KL: a policy gradient is meaningless on tokens the student did not sample. Other
    segments (privileged context, padding) get nothing; the selection gives them w = 0 anyway.
    τ = 0.5 is a default, not a published value.
    """
    if not 0.0 < tau <= 1.0:
        raise ValueError(f"tau must be in (0, 1], got {tau}")
    if outlier not in ("fkl", "mask", "clip"):
        raise ValueError(f"outlier must be 'fkl', 'mask' or 'clip', got {outlier!r}")
    tails = ("teacher_topk_ids",) if tail_bucket else ()
    p = prepare(logits, batch, vocab_size, temperature, tails=tails)
    seg = _segment(p)  # [N]
    r = p.need("teacher_logprob", "tropd") - p.token_logp.detach()  # [N]
    log_tau = math.log(tau)
    student = seg == 0
    trusted = student & (r >= log_tau)  # [N]
    untrusted = student & ~trusted  # [N]
    guide = seg == 1  # [N]
    k1, m = _pg(p, r, is_clip)  # [N]
    zero = torch.zeros_like(k1)
    per_token = torch.where(trusted, k1, zero)  # [N]
    if outlier == "clip":
        clipped, _ = _pg(p, r.clamp(min=log_tau), is_clip)  # [N]
        per_token = torch.where(untrusted, clipped, per_token)
    use_fkl = guide | untrusted if outlier == "fkl" else guide  # [N]
    if bool(use_fkl.any()):
        fkl = _topk_fkl_tokens(p, tail_bucket, "tropd")  # [N]
        per_token = torch.where(use_fkl, fkl, per_token)
    m["trusted"] = (p.w * trusted).sum()
    m["untrusted"] = (p.w * untrusted).sum()
    m["guide"] = (p.w * guide).sum()
    return _finish(p, per_token, m)


def sft(
    logits: Tensor | Prepared,
    batch: Mapping[str, Tensor],
    *,
    vocab_size: int | None = None,
    temperature: float = 1.0,
) -> tuple[Tensor, Metrics]:
    """SFT / cross-entropy on the stored tokens: ``L_t = −log π_θ(y_t)``."""
    p = prepare(logits, batch, vocab_size, temperature)
    return _finish(p, -p.token_logp)


# ------------------------------------------------------- teachers of another tokenizer


def _chunk_sums(values: Tensor, key: Tensor) -> Tensor:
    """Per row, the sum of ``values`` [N] over the rows with the same ``key`` [N] -> [N]."""
    _, inv = torch.unique(key, return_inverse=True)  # [N] dense group index
    sums = values.new_zeros(int(inv.max()) + 1 if inv.numel() else 0)  # [G]
    return sums.index_add(0, inv, values)[inv]  # [N]


def chunk_opd(
    logits: Tensor | Prepared,
    batch: Mapping[str, Tensor],
    *,
    vocab_size: int | None = None,
    temperature: float = 1.0,
) -> tuple[Tensor, Metrics]:
    """Sampled-token OPD on aligned chunks (a teacher of another tokenizer; docs/METHODS.md).

    ``chunk_index`` [N] int: rows with equal values are the student tokens of one aligned chunk
    (unique across the samples of the batch); ``teacher_chunk_logprob`` [N]: the teacher's chunk
    log-prob, repeated on each of its tokens. Chunk-level K1 reward and surrogate:

        A_c = log π_T(c) − Σ_{t∈c} log π_θ(y_t),   L_t = −sg(A_{c(t)})·log π_θ(y_t)

    so a chunk's tokens together contribute ``−A_c·log π_θ(c)``, the REINFORCE estimate on the
    chunk. One-token chunks on both sides give ``opd_k1`` exactly. The student sum runs over the
    weighted rows of the call: a chunk's tokens must arrive in one call and be kept or dropped
    together (the trainer and the selection see to it); under that contract the loss is linear in
    the weights and splits into calls exactly, like every other loss.
    """
    p = prepare(logits, batch, vocab_size, temperature)
    live = (p.w != 0).float()  # [N]
    s_chunk = _chunk_sums(live * p.token_logp.detach(), p.need("chunk_index", "chunk_opd"))  # [N]
    adv = p.need("teacher_chunk_logprob", "chunk_opd") - s_chunk  # [N]
    per_token, m = _pg(p, adv, None)
    m["chunk_reward"] = (p.w * adv).sum()
    return _finish(p, per_token, m)


def mapped_topk_fkl(
    logits: Tensor | Prepared,
    batch: Mapping[str, Tensor],
    *,
    vocab_size: int | None = None,
    temperature: float = 1.0,
) -> tuple[Tensor, Metrics]:
    """Top-K forward KL on the teacher's top-K mapped into student ids, with the tail bucket.

    ``teacher_mapped_ids`` [N, K] (student ids; -1 where the teacher's token string has no student
    id), ``teacher_mapped_logprobs`` [N, K] (ignored at -1), optional ``teacher_mapped_logmass`` [N]
    (log Σ of the mapped probabilities; recomputed when absent). With ``M`` the mapped ids:

        L_t = Σ_{i∈M} p_T(i)(log p_T(i) − log p_θ(i)) + tail_T (log tail_T − log tail_θ)

    ``tail_T = 1 − Σ_M p_T`` holds the unmapped and the beyond-K mass; ``tail_θ = 1 − Σ_M p_θ``.
    Everything mapped is ``topk_fkl`` (tail bucket) exactly; nothing mapped is 0.
    """
    p = prepare(logits, batch, vocab_size, temperature, tails=("teacher_mapped_ids",))
    raw = p.need("teacher_mapped_ids", "mapped_topk_fkl")  # [N, K]
    valid = raw >= 0  # [N, K]
    t_lp = torch.where(valid, p.need("teacher_mapped_logprobs", "mapped_topk_fkl"), -math.inf)
    logmass = p.batch.get("teacher_mapped_logmass")
    if logmass is None:
        logmass = torch.logsumexp(t_lp, dim=-1)  # [N]
    tail_t = (-torch.expm1(logmass.clamp(max=0.0))).clamp(0.0, 1.0)  # [N]
    # the student's mass outside the mapped set (unmapped entries are not members)
    log_tail_s, has_tail = p.tail("teacher_mapped_ids")  # [N], [N]
    tail = torch.special.xlogy(tail_t, tail_t) - tail_t * log_tail_s  # [N]
    head = _kl(t_lp, p.at("teacher_mapped_ids"))  # [N] unmapped entries have p_T = 0
    per_token = head + torch.where(has_tail, tail, 0.0)  # [N]
    # Nothing mapped: both sides are the one bucket, KL 0 exactly (not a logsumexp's rounding).
    per_token = torch.where(valid.any(dim=-1), per_token, 0.0)  # [N]
    mass = (p.w * (logmass.exp())).sum()
    return _finish(p, per_token, {"mapped_mass": mass})


def _uld_k(batch: Mapping[str, Tensor], k: int | None, vocab_size: int) -> int:
    """The student's top-k length in ``uld``: ``k`` (default the teacher's K_T), at most V."""
    t = batch.get("teacher_sorted_probs")
    if t is None:
        raise KeyError("batch has no 'teacher_sorted_probs' column, needed by uld")
    k_s = min(t.shape[1] if k is None else k, vocab_size)
    if k_s < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return k_s


def uld(
    logits: Tensor | Prepared,
    batch: Mapping[str, Tensor],
    *,
    vocab_size: int | None = None,
    temperature: float = 1.0,
    k: int | None = None,
) -> tuple[Tensor, Metrics]:
    """ULD: L1 distance between the sorted probability vectors (no id matching).

    ``teacher_sorted_probs`` [N, K_T] (decreasing); the student's ``k`` largest probabilities
    (default K_T, at most V), both zero-padded to the longer length:
    ``L_t = Σ_i |sort(p_θ)_i − sort(p_T)_i|``. With K_T and k covering both vocabularies this is
    ULD's full-vocabulary distance (the smaller vocabulary padded with zeros). Rows whose teacher
    probabilities are all 0 (no comparable teacher position) contribute 0. The student's top-k
    are gathered like any id column (``prepare(topk=k)``): no [N, V] tensor under autograd.
    """
    vocab = logits.vocab_size if isinstance(logits, Prepared) else vocab_size or logits.shape[1]
    k_s = _uld_k(batch, k, vocab)
    p = prepare(logits, batch, vocab_size, temperature, topk=k_s)
    t = p.need("teacher_sorted_probs", "uld")  # [N, K_T]
    s = p.at("student_topk_ids")[:, :k_s].exp()  # [N, k_s] decreasing, with grad
    n = max(k_s, t.shape[1])
    s = torch.nn.functional.pad(s, (0, n - k_s))  # [N, n]
    t = torch.nn.functional.pad(t, (0, n - t.shape[1]))  # [N, n]
    # A row with no teacher probabilities (all 0: no comparable teacher position, e.g. inside an
    # aligned chunk) has nothing to match: 0, not the student's mass.
    has_t = t.sum(-1) > 0  # [N]
    return _finish(p, torch.where(has_t, (s - t).abs().sum(-1), 0.0))


LOSSES: dict[str, LossFn] = {
    "opd_k1": opd_k1,
    "vopd": vopd,
    "exopd": exopd,
    "topk_fkl": topk_fkl,
    "topk_rkl": topk_rkl,
    "gkd_jsd": gkd_jsd,
    "tropd": tropd,
    "sft": sft,
    "chunk_opd": chunk_opd,
    "mapped_topk_fkl": mapped_topk_fkl,
    "uld": uld,
}

_BASE_KEYS = ("tokens", "tokens_onpolicy", "reward", "rkl_k1", "staleness")


def combined_loss(
    logits: Tensor,
    batch: Mapping[str, Tensor],
    terms: list[tuple[str, float, dict]],
    vocab_size: int | None = None,
    temperature: float = 1.0,
    inplace: bool = False,
) -> tuple[Tensor, Metrics]:
    """Weighted sum of loss terms, ``Σ_j c_j · loss_sum_j``, sharing one student log-softmax.

    ``terms``: ``[(name, coefficient, kwargs), ...]`` with names from ``LOSSES``. Metrics: the
    shared diagnostics once (``tokens``, ``reward``, ...), ``loss`` (the total) and each term's own
    metrics prefixed ``<name>/`` (``<name>#<j>/`` when a name repeats). ``inplace``: ``logits``
    (fp32, owned by the caller, not used again) become the log-softmax, then its gradient: the
    call's one [N, V] block.
    """
    if not terms:
        raise ValueError("combined_loss needs at least one term")
    names = [t[0] for t in terms]
    for name in names:
        if name not in LOSSES:
            raise KeyError(f"unknown loss {name!r}; known: {sorted(LOSSES)}")
    tails = tuple(TAIL_SETS[n] for n in names if n in TAIL_SETS)
    vocab = vocab_size or logits.shape[1]
    ks = [_uld_k(batch, (kw or {}).get("k"), vocab) for n, _, kw in terms if n == "uld"]
    p = prepare(
        logits,
        batch,
        vocab_size,
        temperature,
        tails=tails,
        topk=max(ks, default=0),
        inplace=inplace,
    )
    total: Tensor | None = None
    metrics: Metrics = {}
    for j, (name, coef, kwargs) in enumerate(terms):
        loss, m = LOSSES[name](p, batch, **(kwargs or {}))
        label = name if names.count(name) == 1 else f"{name}#{j}"
        total = coef * loss if total is None else total + coef * loss
        for k, v in m.items():
            if k in _BASE_KEYS:
                metrics[k] = v
            else:
                metrics[f"{label}/{k}"] = v
    metrics["loss"] = total.detach()
    return total, metrics
