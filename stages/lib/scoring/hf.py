"""The Hugging Face scoring backend: batched forwards with the chunked fp32 head, one pass's
log-probs, top-K, entropies and gathered log-probs."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from stages.lib import logprobs as lp
from stages.lib import models
from stages.lib.scoring.plan import Pass, PassKey, length_buckets


def pad_right(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows right-padded to the longest: ``(ids, attention_mask)``, both [B, T] int64
    (right padding keeps the default position ids of every row correct)."""
    seq_len = max(len(r) for r in rows)
    ids = torch.full((len(rows), seq_len), pad_id, dtype=torch.long)  # [B, T]
    mask = torch.zeros((len(rows), seq_len), dtype=torch.long)  # [B, T]
    for b, row in enumerate(rows):
        ids[b, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[b, : len(row)] = 1
    return ids, mask


def topk_logmass(topk_logprobs: np.ndarray, k: int, vocab_size: int) -> np.ndarray:
    """log Σ exp of the first ``k`` log-probs per row ([R, >=k] -> [R]); exactly 0 when k = V."""
    if k == vocab_size:
        return np.zeros(len(topk_logprobs), dtype=np.float32)
    x = topk_logprobs[:, :k].astype(np.float64)  # [R, K]
    return np.logaddexp.reduce(x, axis=1).astype(np.float32) if len(x) else np.zeros(0, np.float32)


# ----------------------------------------------------------------------------- HF backend
@dataclass
class HFModel:
    model: torch.nn.Module
    head: object  # fp32 head callable [n, H] -> [n, V]
    device: torch.device
    body: object = None  # a compiled decoder callable (score.compile); None = eager


def hf_model(model: torch.nn.Module, device: torch.device, compiled: bool = False) -> HFModel:
    """The scoring view of a loaded model: eager, or (``compiled``: score.compile) with the decoder
    compiled by TorchInductor and the head's GEMM through oneDNN on CPU (both change the stored
    floats by GEMM rounding only: docs/BENCHMARKS.md, score)."""
    if not compiled:
        return HFModel(model, lp.model_head(model), device)
    head = lp.model_head(model, onednn=lp.onednn_ok(device))
    return HFModel(model, head, device, models.compiled_body(model))


def share_units(jobs: list[Pass], batch_tokens: int) -> tuple[list[list[list[int]]], list[int]]:
    """Which jobs score against a shared prefix, and in which units (pure).

    Jobs with the same prefix (``rollout.n`` samples of one prompt; roles of one model reading
    the same prefix) form a group; a group of two or more is shared: its prefix runs once. A
    *unit* is one prefix forward plus one response forward: a list of groups (each a list of job
    indices), packed in prefix-length order while ``rows · (longest prefix + longest response)
    <= batch_tokens``, the tokens the unshared batch of those rows would hold (so the repeated KV
    cache is bounded like today's batches). A group that does not fit the open unit starts a new
    one; only a group too large for any unit is split across units. Every group of one job, and
    every unit left without two jobs of one group, is returned in ``single`` (the unshared
    path). Returns ``(units, single)``.
    """
    groups: dict[tuple, list[int]] = {}
    for i, j in enumerate(jobs):
        groups.setdefault(tuple(j.prefix), []).append(i)
    single = [g[0] for g in groups.values() if len(g) == 1]
    shared = sorted(
        (g for g in groups.values() if len(g) > 1), key=lambda g: len(jobs[g[0]].prefix)
    )
    units: list[list[list[int]]] = []
    unit: list[list[int]] = []
    whole = lambda n, pm, rm: n * (pm + rm) <= batch_tokens  # noqa: E731  n rows fit
    rows = p_max = r_max = 0
    for g in shared:
        p = len(jobs[g[0]].prefix)
        r_g = max(len(jobs[i].response) for i in g)
        if (
            rows
            and not whole(rows + len(g), max(p_max, p), max(r_max, r_g))
            and whole(len(g), p, r_g)
        ):
            # g fits a unit of its own but not the open one: start a new unit rather than split
            # g (a split group runs its prefix once per piece)
            units.append([u for u in unit if u])
            unit, rows, p_max, r_max = [], 0, 0, 0
        unit.append([])  # g's piece in the open unit
        for i in g:
            r = len(jobs[i].response)
            if rows and (rows + 1) * (max(p_max, p) + max(r_max, r)) > batch_tokens:
                units.append([u for u in unit if u])  # full: close it, g goes on in a new one
                unit, rows, p_max, r_max = [[]], 0, 0, 0
            unit[-1].append(i)
            rows, p_max, r_max = rows + 1, max(p_max, p), max(r_max, r)
    units.append([u for u in unit if u])
    keep = []
    for u in units:  # a unit without a group of two shares nothing: the unshared path
        if any(len(piece) > 1 for piece in u):
            keep.append(u)
        else:
            single += [i for piece in u for i in piece]
    return keep, sorted(single)


@torch.no_grad()
def hf_score(
    m: HFModel,
    jobs: list[Pass],
    *,
    vocab_size: int,
    batch_tokens: int,
    chunk: int,
    pad_id: int,
    done: dict[PassKey, Pass],
    behavior_topk: int,
    stats: bool = True,
    gather: bool = True,
    progress=None,
    share_prefix: bool = True,
    split: bool = True,
) -> None:
    """Run ``jobs`` through a transformers model; fill ``job.result`` (when ``stats``) and
    ``job.gathered`` (when ``gather``: teacher log-probs at the behaviour top-Kb ids of
    ``done[key]``, which must already hold results).

    ``share_prefix`` (score.share_prefix): jobs with the same prefix run it once and score their
    responses against its KV cache (``share_units``, ``lp.shared_prefix_hidden``; always the
    eager decoder; ``split``, score.split_attention: the prefix's keys read once per prefix, not
    copied per row); the others, and everything when off, run as padded ``prefix ⊕ response``
    rows. Memory: at most ``batch_tokens`` padded tokens per forward (cache tokens counted); the
    fp32 head sees ``chunk`` response positions at a time (``[chunk, V]``, never ``[B, T, V]``).
    """
    units, single = [], list(range(len(jobs)))
    if share_prefix and lp.can_share_prefix(m.model):
        units, single = share_units(jobs, batch_tokens)
    kw = dict(vocab_size=vocab_size, chunk=chunk, done=done, behavior_topk=behavior_topk,
              stats=stats, gather=gather, progress=progress)  # fmt: skip
    for unit in units:
        batch = [jobs[i] for g in unit for i in g]
        prefixes = [jobs[g[0]].prefix for g in unit]
        owner = [u for u, g in enumerate(unit) for _ in g]
        hidden = lp.shared_prefix_hidden(
            m.model, prefixes, [j.response for j in batch], owner, pad_id, split
        )  # [M, H]
        _head_pass(m, batch, hidden, **kw)
    lengths = [len(jobs[i].prefix) + len(jobs[i].response) for i in single]
    for batch_idx in length_buckets(lengths, batch_tokens):
        batch = [jobs[single[i]] for i in batch_idx]
        ids, mask = pad_right([j.prefix + j.response for j in batch], pad_id)  # [B, T] each
        r_lens = [len(j.response) for j in batch]
        pos = lp.response_positions([len(j.prefix) for j in batch], r_lens, ids.shape[1])  # [M]
        hidden = lp.model_hidden_states(m.model, ids.to(m.device), mask.to(m.device), m.body)
        hidden = hidden.reshape(-1, hidden.shape[-1])[pos.to(m.device)]  # [M, H]
        _head_pass(m, batch, hidden, **kw)


def _head_pass(
    m: HFModel,
    batch: list[Pass],
    hidden: torch.Tensor,
    *,
    vocab_size: int,
    chunk: int,
    done: dict[PassKey, Pass],
    behavior_topk: int,
    stats: bool,
    gather: bool,
    progress,
) -> None:
    """The fp32 head over ``hidden`` [M, H] (the response-scoring positions of ``batch``, rows
    in order), ``chunk`` positions at a time: each job's statistics and gathers."""
    k = max(j.k for j in batch) if stats else 0
    want_entropy = stats and any(j.entropy for j in batch)
    r_lens = [len(j.response) for j in batch]
    targets = torch.tensor([t for j in batch for t in j.response], dtype=torch.long)  # [M]
    targets = targets.to(m.device)
    starts = np.concatenate([[0], np.cumsum(r_lens)])  # row b owns flat [starts[b], starts[b+1])
    # gather requests, flattened: flat position -> behaviour top-Kb ids to read
    g_pos, g_ids, g_where = [], [], []
    for b, j in enumerate(batch):
        for bkey in j.gathers if gather else ():
            g_pos.append(np.arange(starts[b], starts[b + 1]))
            g_ids.append(done[bkey].result["topk_ids"][:, :behavior_topk])
            g_where.append((j, bkey, len(j.response)))
    gpos = torch.from_numpy(np.concatenate(g_pos)) if g_pos else None  # [G]
    gids = torch.from_numpy(np.concatenate(g_ids)).to(m.device) if g_ids else None  # [G, Kb]
    gout = torch.empty(len(gpos) if g_pos else 0, behavior_topk)  # [G, Kb]
    parts: list[dict[str, torch.Tensor]] = []
    for s in range(0, len(targets), chunk):
        e = min(s + chunk, len(targets))
        z = m.head(hidden[s:e])  # [n, V] fp32
        if gpos is not None:  # before the stats, which overwrite z
            sel = ((gpos >= s) & (gpos < e)).nonzero().squeeze(1)  # [g]
            if len(sel):
                rows_ = (gpos[sel] - s).to(m.device)  # [g]
                got, _ = lp.gather_logprobs(z[rows_], gids[sel.to(m.device)], vocab_size)
                gout[sel] = got.cpu()  # [g, Kb]
        if stats:
            t = targets[s:e]  # [n]
            parts.append(lp.logits_stats_(z, t, k, vocab_size, want_entropy=want_entropy))
        del z
    if stats:
        flat = {n: torch.cat([p[n] for p in parts]).cpu().numpy() for n in parts[0]}
        for b, j in enumerate(batch):
            j.result = {n: a[starts[b] : starts[b + 1]] for n, a in flat.items()}
    g0 = 0
    for j, bkey, r in g_where:
        j.gathered[bkey] = gout[g0 : g0 + r].numpy()
        g0 += r
    if progress is not None:
        progress.update(sum(r_lens))
