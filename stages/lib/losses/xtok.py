"""Losses for a teacher of another tokenizer (docs/CROSS_TOKENIZER.md): sampled-token OPD on
aligned chunks, top-K forward KL on mapped ids, and ULD's sorted-probability distance."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from stages.lib.losses.common import Metrics, _finish, _kl, _pg
from stages.lib.losses.prepared import Prepared, prepare


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
