"""The sampled-token losses: the policy-gradient OPD family (opd_k1, vopd, exopd, tropd's trusted
part) and SFT. See the package docstring for the shared surrogate and the importance weight."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from stages.lib.losses.common import Metrics, _finish, _kl, _pg, _renorm, _segment, _support
from stages.lib.losses.prepared import Prepared, prepare
from stages.lib.losses.topk import _topk_fkl_tokens


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
