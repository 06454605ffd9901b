"""The top-K divergences on a stored support: forward KL with the tail bucket, reverse KL and the
generalised Jensen-Shannon divergence."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from stages.lib.losses.common import Metrics, _finish, _kl, _renorm, _support
from stages.lib.losses.prepared import Prepared, prepare


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
