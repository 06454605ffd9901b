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

# Where each part lives: fused.py (the one-block log-softmax and its gradient, chunk_for_budget),
# prepared.py (``prepare``: the gathered log-probs and the cleaned batch), common.py (metrics and
# shared math), sampled.py (opd_k1, vopd, exopd, tropd, sft), topk.py (topk_fkl, topk_rkl,
# gkd_jsd), xtok.py (chunk_opd, mapped_topk_fkl, uld). Import public names from here.
from collections.abc import Mapping

from torch import Tensor

from stages.lib.losses.common import (
    COUNT_METRICS,
    MAX_SUFFIX,
    ONPOLICY_METRICS,
    LossFn,
    Metrics,
    average_metrics,
)
from stages.lib.losses.fused import (
    MIN_CHUNK,
    ROW_ELEMS,
    SCRATCH_BUFFERS,
    chunk_for_budget,
    row_block,
)
from stages.lib.losses.prepared import GATHER_COLUMNS, TAIL_SETS, Prepared, prepare
from stages.lib.losses.sampled import exopd, opd_k1, sft, tropd, vopd
from stages.lib.losses.topk import gkd_jsd, topk_fkl, topk_rkl
from stages.lib.losses.xtok import _uld_k, chunk_opd, mapped_topk_fkl, uld

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


__all__ = [
    "COUNT_METRICS",
    "GATHER_COLUMNS",
    "LOSSES",
    "MAX_SUFFIX",
    "MIN_CHUNK",
    "ONPOLICY_METRICS",
    "ROW_ELEMS",
    "SCRATCH_BUFFERS",
    "TAIL_SETS",
    "LossFn",
    "Metrics",
    "Prepared",
    "average_metrics",
    "chunk_for_budget",
    "chunk_opd",
    "combined_loss",
    "exopd",
    "gkd_jsd",
    "mapped_topk_fkl",
    "opd_k1",
    "prepare",
    "row_block",
    "sft",
    "topk_fkl",
    "topk_rkl",
    "tropd",
    "uld",
    "vopd",
]
