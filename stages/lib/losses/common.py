"""What every loss shares: the diagnostics and the weighted sum (``_finish``), the metric
averaging, and the small math on top-K supports (renormalise, KL, the policy-gradient term)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from stages.lib.losses.prepared import Prepared

Metrics = dict[str, Tensor]
LossFn = Callable[..., tuple[Tensor, Metrics]]

# Metrics averaged over on-policy (segment 0) weighted tokens rather than all weighted tokens:
# r_t estimates the reverse KL only on tokens the student sampled itself.
ONPOLICY_METRICS = ("reward", "rkl_k1", "staleness")
# Count metrics (kept as totals) and max-reduced metrics (the trainer takes the max, not the sum).
COUNT_METRICS = ("tokens", "tokens_onpolicy")
MAX_SUFFIX = "_max"


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
