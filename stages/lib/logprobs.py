"""Per-token log-prob statistics, computed memory-bounded from a causal LM's hidden states.

Used by the ``score`` stage (teacher, behaviour and reference passes), by rollout tests and by the
trainer. One rule everywhere (docs/METHODS.md, "Notation"): a log-prob is the **full-vocabulary**
log-softmax of **fp32** LM-head logits, then gathered; never a softmax over K survivors.

Memory: the head is applied to ``chunk`` positions at a time, so at most ``[chunk, V]`` fp32 logits
live at once (V = 152k, chunk = 1024 is ~600 MB); ``[B, T, V]`` is never built for a batch. The
statistics are computed from the logits in place, in fused passes (no ``[chunk, V]`` log-softmax,
probabilities or products), a cache-sized block of rows at a time.

Padded vocabularies: some families pad the embedding matrix past the tokenizer (151,936 vs 152,064
rows). ``vocab_size`` is always the *tokenizer's* size; rows ``>= vocab_size`` are dropped (or set
to -inf) before the softmax, so they enter neither the normaliser nor the top-K.

Public functions:

- ``head_logprob_stats(hidden, lm_head, targets, k, vocab_size, ...)``: stats from hidden states.
- ``logits_logprob_stats(logits, targets, k, vocab_size, ...)``: the same from given logits.
- ``logits_stats_(z, targets, k, vocab_size, ...)``: the same from fp32 logits it may overwrite.
- ``topk_exact(z, k)``: ``torch.topk`` over rows, exact, via a segment-max pre-filter.
- ``gather_logprobs(logits, ids, vocab_size, temperature)``: log-probs at given ids + log-normaliser.
- ``model_hidden_states(model, input_ids, attention_mask, body=None)``: final (normed) hidden
  states (``body``: a compiled decoder to run instead, ``stages.lib.models.compiled_body``).
- ``model_head(model, onednn=False)``: the output head as an fp32 callable (with the model's logit
  transforms); ``onednn`` runs its matmul through oneDNN (scoring only, no gradient).
- ``response_positions(prefix_lens, response_lens, seq_len)``: flat indices of scoring positions.
- ``shared_prefix_hidden(model, prefixes, responses, owner)``: the hidden states that score each
  response, each distinct prefix run once (its KV cache shared by all its responses).
- ``response_hidden(model, input_ids, attention_mask, positions, share_prefix)``: the trainer's
  hidden states at the scoring positions, prefixes shared when rows repeat one.
- ``sequence_stats(model, prefix_ids, response_ids, k, vocab_size, ...)``: the whole path.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stages.lib.prefix_attention import split_rows

Head = Callable[[Tensor], Tensor] | nn.Module


def _check_vocab(width: int, vocab_size: int, k: int | None = None) -> None:
    if vocab_size > width:
        raise ValueError(
            f"vocab_size={vocab_size} (tokenizer) exceeds the head's {width} rows: wrong tokenizer?"
        )
    if k is not None and not 0 <= k <= vocab_size:
        raise ValueError(f"top-k must be in [0, vocab_size={vocab_size}], got k={k}")


def masked_logits(logits: Tensor, vocab_size: int, temperature: float = 1.0) -> Tensor:
    """fp32 logits at ``temperature`` with padded-vocabulary columns (``>= vocab_size``) at -inf.

    Out of place, so it is safe inside autograd (the trainer's student logits).
    """
    z = logits.float()  # [n, V]
    if temperature != 1.0:
        z = z / temperature
    width = z.shape[-1]
    _check_vocab(width, vocab_size)
    if width > vocab_size:
        pad = torch.arange(width, device=z.device) >= vocab_size  # [V]
        z = z.masked_fill(pad, float("-inf"))
    return z


def onednn_ok(device: torch.device | str) -> bool:
    """Whether oneDNN fp32 GEMMs can run on ``device`` (CPU builds with mkldnn only)."""
    return torch.device(device).type == "cpu" and torch.backends.mkldnn.is_available()


def _fp32_head(lm_head: Head, onednn: bool = False) -> Callable[[Tensor], Tensor]:
    """The head as a callable returning fp32 logits.

    An ``nn.Linear`` head (what every transformers causal LM has) is computed in fp32 from an fp32
    copy of its weight, made once here, not per chunk: bf16 matmuls would round logits by ~1e-2
    before the log-softmax (DESIGN: "compute the head in fp32"). Other callables are trusted and
    their output is cast with ``.float()``.

    ``onednn`` (a CPU ``nn.Linear`` only; ignored otherwise): the matmul runs through oneDNN on a
    copy of the weight in its own layout (one more ``[V, H]`` fp32 copy resident), which on an
    AVX-512 CPU does a ``[256, 768] x [768, 32000]`` chunk at ~1.3x MKL's rate (docs/BENCHMARKS.md,
    score). Still fp32 in, fp32 accumulate, fp32 out; only the summation order differs from MKL's
    (logits differ by ~1e-6 relative). No autograd: scoring only, never the trainer.
    """
    if isinstance(lm_head, nn.Linear):
        w = lm_head.weight.float()  # [V, H]; no copy when already fp32
        b = None if lm_head.bias is None else lm_head.bias.float()
        if onednn and onednn_ok(w.device):
            wd = w.detach().to_mkldnn()  # [V, H] oneDNN layout
            b = None if b is None else b.detach()
            pointwise = torch.ops.mkldnn._linear_pointwise
            return lambda h: pointwise(h.float().contiguous(), wd, b, "none", [], "")
        return lambda h: F.linear(h.float(), w, b)
    return lambda h: lm_head(h).float()


# Logits per block of the elementwise statistics (< 32 MiB fp32: glibc reuses the block's temporary
# instead of mmap-ing, page-faulting and zeroing a fresh one each time). Smaller blocks stay in L2
# across the passes (max, exp, sum, dot) but cost a thread barrier per pass each; V = 32k, 3,456
# positions, stats time beyond the head matmul: 1 MB blocks 0.41 s on one idle thread but 2.6 s on
# two busy ones, 32 MB blocks 0.66 s and 1.3 s, 128 MB blocks 0.86 s and 1.2 s.
_BLOCK_ELEMENTS = (1 << 23) - 1
# Top-K pre-filter: the vocabulary in segments of this many logits (see ``topk_exact``).
_SEGMENT = 64


def topk_exact(z: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """``z.topk(k, dim=1)`` (sorted, descending), exact, in about one streaming pass over ``z``.

    ``torch.topk`` costs ~5x a max-reduction at V = 32k, K = 32. Instead: take the max of each
    segment of ``_SEGMENT`` logits, keep the ``k`` segments with the largest maxima and run
    ``topk`` over their ``k·_SEGMENT`` logits (plus the tail past the last whole segment).
    Exact: the ``k`` kept maxima are ``k`` logits ``>= τ`` (the k-th largest segment max), so
    the k-th largest logit is ``>= τ``, and every logit of a dropped segment is ``<= τ``: only
    ties at ``τ`` may resolve to other ids, as they may in ``torch.topk`` itself. 1.65x faster
    than ``torch.topk`` (one thread, [256, 32000], K = 32). ``z`` [n, V] -> values [n, K]
    (dtype of ``z``), ids [n, K] int64.
    """
    n, v = z.shape
    g = v // _SEGMENT
    if k == 0 or 4 * k * _SEGMENT > v:  # the filter would not shrink the search: plain topk
        return z.topk(k, dim=1)
    segs = z[:, : g * _SEGMENT].unflatten(1, (g, _SEGMENT))  # [n, G, S]
    keep = segs.amax(2).topk(k, dim=1, sorted=False).indices  # [n, K] segment ids
    cand = segs.gather(1, keep[:, :, None].expand(n, k, _SEGMENT)).flatten(1)  # [n, K·S]
    offs = torch.arange(_SEGMENT, device=z.device)  # [S]
    cand_ids = (keep[:, :, None] * _SEGMENT + offs).flatten(1)  # [n, K·S]
    if g * _SEGMENT < v:  # the tail segment (shorter than _SEGMENT) is always a candidate
        tail = torch.arange(g * _SEGMENT, v, device=z.device).expand(n, -1)  # [n, r]
        cand = torch.cat([cand, z[:, g * _SEGMENT :]], dim=1)  # [n, K·S + r]
        cand_ids = torch.cat([cand_ids, tail], dim=1)
    vals, where = cand.topk(k, dim=1)  # [n, K] each, sorted
    return vals, cand_ids.gather(1, where)


def _block_stats_(
    z: Tensor, targets: Tensor, k: int, want_entropy: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Log-prob, top-K and entropy of one block of fp32 logits ``z`` [n, V] (unpadded, already
    divided by the temperature), in place: ``z`` is overwritten with ``z - max``.

    One fused pass set instead of a dense log-softmax: with ``y = z - max`` and ``s = Σ exp(y)``,
    ``log π = y - log s`` and ``H = log s - Σ exp(y)·y / s`` (the same sums ``log_softmax`` does;
    every ``exp(y)·y <= 0``, so the entropy is a sum of non-negative terms, no cancellation). Top-K
    runs on the logits (same order as the log-probs), its first value is the row max.
    """
    if k > 0:
        vals, ids = topk_exact(z, k)  # [n, K] each
        top = vals[:, :1]  # [n, 1] the row max
    else:
        vals = ids = z.new_empty(z.shape[0], 0)
        top = z.amax(1, keepdim=True)  # [n, 1]
    y = z.sub_(top)  # [n, V] <= 0
    e = y.exp()  # [n, V] the only block temporary
    log_s = e.sum(1).log()  # [n]
    logprob = y.gather(1, targets[:, None]).squeeze(1) - log_s  # [n]
    topk_lp = (vals - top) - log_s[:, None]  # [n, K]
    entropy = None
    if want_entropy:
        dot = torch.linalg.vecdot(e, y)  # [n] Σ exp(y)·y
        bad = dot.isnan()  # a -inf logit: 0·(-inf); define 0·log 0 = 0
        if bad.any():
            dot[bad] = torch.linalg.vecdot(e[bad], y[bad].masked_fill(e[bad] == 0, 0.0))
        entropy = log_s - dot / log_s.exp()  # [n]
    return logprob, ids, topk_lp, entropy


@torch.no_grad()
def logits_stats_(
    z: Tensor,
    targets: Tensor,
    k: int,
    vocab_size: int,
    temperature: float = 1.0,
    want_entropy: bool = True,
) -> dict[str, Tensor]:
    """``head_logprob_stats`` of fp32 logits ``z`` [n, V] that the caller gives up: ``z`` is
    overwritten (no copy of a [n, V] block is made). Keys and meanings as ``head_logprob_stats``.

    Works through ``z`` in row blocks of ~``_BLOCK_ELEMENTS`` so each block stays in cache across
    the passes over it. ``targets`` [n] int64 in ``[0, vocab_size)`` (not checked here).
    """
    if z.dtype != torch.float32:
        raise ValueError(f"logits_stats_ needs fp32 logits, got {z.dtype}")
    _check_vocab(z.shape[-1], vocab_size, k)
    z = z[:, :vocab_size]  # [n, V]: padded rows enter neither the normaliser nor the top-K
    if temperature != 1.0:
        z.div_(temperature)
    rows = max(1, _BLOCK_ELEMENTS // max(vocab_size, 1))
    parts = [  # at least one (maybe empty) block, so the outputs have their shapes when n = 0
        _block_stats_(z[s : s + rows], targets[s : s + rows], k, want_entropy)
        for s in range(0, max(z.shape[0], 1), rows)
    ]
    logprob, ids, topk_lp, entropy = (
        None if p[0] is None else torch.cat(p) for p in zip(*parts, strict=True)
    )
    if k == 0:
        logmass = torch.full_like(logprob, math.nan)  # undefined: no top-K
    elif k == vocab_size:
        logmass = torch.zeros_like(logprob)  # the mass is 1 by definition, not 1 ± 1e-7
    else:
        logmass = torch.logsumexp(topk_lp, dim=-1)  # [n]
    out = {
        "logprob": logprob,
        "topk_ids": ids.to(torch.int32),
        "topk_logprobs": topk_lp,
        "topk_logmass": logmass,
    }
    if want_entropy:
        out["entropy"] = entropy
    return out


@torch.no_grad()
def head_logprob_stats(
    hidden: Tensor,
    lm_head: Head,
    targets: Tensor,
    k: int,
    vocab_size: int,
    temperature: float = 1.0,
    chunk: int = 1024,
    want_entropy: bool = True,
) -> dict[str, Tensor]:
    """Log-prob statistics of the next-token distributions at ``N`` positions, chunked.

    With ``z = head(h).float() / temperature`` (padded columns dropped) and
    ``log π = log_softmax(z)`` over the full vocabulary:

    - ``logprob`` [N] fp32: ``log π(target)``.
    - ``topk_ids`` [N, K] int32, sorted by descending probability; ``topk_logprobs`` [N, K] fp32:
      the full-vocabulary log-probs at those ids (not renormalised).
    - ``topk_logmass`` [N] fp32: ``log Σ_{i∈top-K} π(i)``; exactly 0 when K = vocab_size. With
      k = 0 there is no top-K: the id/log-prob tensors are ``[N, 0]`` and the logmass is NaN
      (undefined, deliberately not 0 so it cannot pass for "all the mass").
    - ``entropy`` [N] fp32: ``−Σ_i π(i) log π(i)`` over the full vocabulary (only when
      ``want_entropy``; the key is absent otherwise, so a consumer cannot read a placeholder).

    No gradient (scoring). ``hidden`` is [N, H]; ``targets`` [N] int64; ``chunk`` bounds the live
    ``[chunk, V]`` fp32 logits. The head's output is used as scratch (``logits_stats_``); a head
    that returns its input (or a view of it) is copied first.
    """
    n = hidden.shape[0]
    if targets.shape != (n,):
        raise ValueError(f"targets must be [{n}], got {tuple(targets.shape)}")
    if chunk < 1:
        raise ValueError("chunk must be >= 1")
    head = _fp32_head(lm_head)
    targets = targets.to(device=hidden.device, dtype=torch.long)
    # Checked once up front (a device sync), not per chunk: an id past the tokenizer would
    # silently gather a padded row's -inf.
    if n and (int(targets.min()) < 0 or int(targets.max()) >= vocab_size):
        raise ValueError(f"target ids must be in [0, {vocab_size})")
    parts = []
    for s in range(0, max(n, 1), chunk):
        h = hidden[s : s + chunk]  # [n, H]
        z = head(h)  # [n, V] fp32
        if z.untyped_storage().data_ptr() == h.untyped_storage().data_ptr():
            z = z.clone()  # an identity-like head: never overwrite the caller's tensor
        t = targets[s : s + chunk]  # [n]
        parts.append(logits_stats_(z, t, k, vocab_size, temperature, want_entropy))
    return {name: torch.cat([p[name] for p in parts]) for name in parts[0]}


def logits_logprob_stats(
    logits: Tensor,
    targets: Tensor,
    k: int,
    vocab_size: int,
    temperature: float = 1.0,
    chunk: int = 1024,
    want_entropy: bool = True,
) -> dict[str, Tensor]:
    """``head_logprob_stats`` from precomputed logits ``[N, V]`` (the head is the identity).

    Still chunked: each ``[chunk, V]`` slice is cast to fp32 separately (a copy, so ``logits``
    is left as it was), so bf16 logits for many positions never become one fp32 copy.
    """
    return head_logprob_stats(
        logits, lambda x: x, targets, k, vocab_size, temperature, chunk, want_entropy
    )


def gather_logprobs(
    logits: Tensor, ids: Tensor, vocab_size: int, temperature: float = 1.0
) -> tuple[Tensor, Tensor]:
    """Full-vocabulary log-probs at given ids, with gradient (the trainer's top-K terms).

    ``logits`` [N, V] (any float dtype, cast to fp32), ``ids`` [N, K] integer ids
    ``< vocab_size``. Returns ``(log π(ids)`` [N, K] fp32, ``logZ`` [N] fp32) where
    ``logZ = logsumexp(z)`` over the unpadded vocabulary and ``log π(i) = z_i − logZ``, with
    ``z = logits / temperature``. Only the [N, V] fp32 logits are materialised (no [N, V] log-softmax).
    """
    z = masked_logits(logits, vocab_size, temperature)  # [N, V]
    log_z = torch.logsumexp(z, dim=-1)  # [N]
    return z.gather(1, ids.long()) - log_z[:, None], log_z  # [N, K], [N]


# ---------------------------------------------------------------- transformers causal LMs


def model_hidden_states(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    body: Callable[..., object] | None = None,
) -> Tensor:
    """Final hidden states ``[B, T, H]`` of a transformers causal LM, *after* its final norm.

    Runs the decoder body (``model.get_decoder()``, i.e. ``model.model`` for Llama/Qwen/Gemma),
    whose ``last_hidden_state`` already includes the final norm, and never calls the LM head: the
    head is applied later, in chunks, at the scoring positions only. Falls back to
    ``output_hidden_states=True`` (whose last entry is normed in transformers' decoder models) for
    architectures without a decoder accessor. Right padding keeps default position ids correct.
    ``body``: a stand-in for the decoder with its call signature (a compiled copy of it).
    """
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if body is not None:
        decoder = body
    if decoder is not None and decoder is not model:
        out = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return out.last_hidden_state  # [B, T, H]
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        output_hidden_states=True,
        use_cache=False,
    )
    return out.hidden_states[-1]  # [B, T, H]


def model_head(model: nn.Module, onednn: bool = False) -> Callable[[Tensor], Tensor]:
    """The model's output head as an fp32 callable ``[n, H] -> [n, V]``.

    Applies the logit transforms transformers performs after ``lm_head`` for the families that
    have one (Gemma 2/3 ``final_logit_softcapping``, Granite ``logits_scaling``), so that the
    result equals ``model(...).logits`` (tested for Llama). Differentiable (unless ``onednn``, see
    ``_fp32_head``); but for a non-fp32 head the fp32 weight copy is a snapshot taken here, so a
    trainer calls this once per step.
    """
    head = _fp32_head(model.get_output_embeddings(), onednn)
    cfg = getattr(model, "config", None)
    cap = getattr(cfg, "final_logit_softcapping", None)
    scale = getattr(cfg, "logits_scaling", None)

    def apply(h: Tensor) -> Tensor:
        z = head(h)  # [n, V] fp32
        if scale:
            z = z / scale
        if cap:
            z = torch.tanh(z / cap) * cap
        return z

    return apply


def response_positions(
    prefix_lens: Sequence[int], response_lens: Sequence[int], seq_len: int
) -> Tensor:
    """Flat indices into a right-padded ``[B, seq_len]`` batch of the positions scoring responses.

    Row ``b`` holds ``prefix_b ⊕ response_b``; response token ``j`` sits at ``prefix_lens[b] + j``
    and is scored by the *previous* position's next-token distribution (position p predicts token
    p + 1), so its index is ``b·seq_len + prefix_lens[b] − 1 + j``. Rows are concatenated in order
    (``[M]`` int64, ``M = Σ response_lens``). Every prefix must be non-empty: nothing predicts the
    first token of a sequence.
    """
    idx = []
    for b, (p, r) in enumerate(zip(prefix_lens, response_lens, strict=True)):
        if p < 1:
            raise ValueError(f"row {b}: empty prefix, nothing scores the first response token")
        if p + r > seq_len:
            raise ValueError(f"row {b}: prefix {p} + response {r} exceeds seq_len {seq_len}")
        start = b * seq_len + p - 1
        idx.append(torch.arange(start, start + r, dtype=torch.long))
    return torch.cat(idx) if idx else torch.zeros(0, dtype=torch.long)  # [M]


def can_share_prefix(model: nn.Module) -> bool:
    """Whether ``shared_prefix_hidden`` can run ``model``: a transformers decoder (``get_decoder``)
    that takes a KV cache and explicit position ids (every causal LM of the library does)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    return decoder is not None and decoder is not model


def shared_prefix_hidden(
    model: nn.Module,
    prefixes: list[list[int]],
    responses: list[list[int]],
    owner: Sequence[int],
    pad_id: int = 0,
    split: bool = True,
) -> Tensor:
    """Final hidden states ``[M, H]`` at the positions that score each response (``M = Σ
    len(responses)``, rows in order, as ``response_positions`` orders them), with each distinct
    prefix run through the decoder **once**.

    ``responses[b]`` continues ``prefixes[owner[b]]``. Two forwards: the ``G`` prefixes
    (right-padded ``[G, P]``, KV cache kept), then every response row ``[R, L]`` against its
    prefix's keys, with position ids continuing the prefix (``P_g + j``) and the prefix's padding
    masked. ``split`` (default): each layer's attention reads a prefix's keys once for all its
    rows (``stages.lib.prefix_attention``, where it suits the model); else, or where it does not
    suit, ``batch_select_indices`` repeats the prefix's cache per row. Response
    token 0 is scored by the prefix's last position (one hidden state, shared by its responses);
    token ``j >= 1`` by response position ``j - 1``, so a response's last token is never fed.
    With ``split``, under autograd (every prefix >= 2 tokens), that last position is fed as each
    row's first token instead, so nothing reads the prefix pass's output and backward skips its
    last layer.

    Equal to one forward over each ``prefix ⊕ response`` up to GEMM rounding (the same floats
    in another summation order: ~1e-6 in log-probs, tests/test_score_prefix.py). Memory: the
    cache of the ``R`` rows, ``R · (P + L)`` tokens of keys and values per layer, the same tokens
    a padded batch of those rows would hold (the caller bounds it, ``batch_tokens``).

    Differentiable (the trainer's ``response_hidden``): the prefix's keys and values are one
    tensor that every response reads, so backward sums its gradient over them. The score stage
    calls it under ``torch.inference_mode``.
    """
    if len(responses) != len(owner):
        raise ValueError("responses and owner must have the same length")
    if any(len(p) < 1 for p in prefixes):
        raise ValueError("empty prefix: nothing scores the first response token")
    device = next(model.parameters()).device
    decoder = model.get_decoder()
    # Under autograd a prefix's last token is fed with each of its rows (n copies of one
    # position): no one reads the prefix pass's output, so backward skips its last layer over
    # every prefix position for one nonzero gradient (~4 % of a step at a 256-token prompt). With
    # ``split`` only: ``split=False`` keeps the arithmetic of earlier runs (the demo pins it).
    lead = int(split and torch.is_grad_enabled() and all(len(p) >= 2 for p in prefixes))
    g_ids, g_mask = _pad_right([p[: len(p) - lead] for p in prefixes], pad_id)  # [G, P] each
    p_lens = g_mask.sum(1)  # [G]
    out = decoder(input_ids=g_ids.to(device), attention_mask=g_mask.to(device), use_cache=True)
    h_pre = out.last_hidden_state  # [G, P, H]
    own = torch.as_tensor(list(owner), dtype=torch.long)  # [R]
    last = None  # [G, H]: the prefix's last position scores token 0 (unless lead)
    if not lead:
        last = h_pre[torch.arange(len(prefixes), device=device), (p_lens - 1).to(device)]
    # the tokens whose outputs score tokens 1..r-1 (and token 0 too when lead)
    tails = [[prefixes[o][-1]] * lead + list(r[:-1]) for r, o in zip(responses, owner)]
    width = max((len(t) for t in tails), default=0)
    h_resp = None
    if width:
        r_ids, r_mask = _pad_right(tails, pad_id)  # [R, L] each
        pos = p_lens[own][:, None] + torch.arange(width)  # [R, L] continuing each prefix
        if split:  # the prefix's keys read once per prefix (stages.lib.prefix_attention)
            h_resp = split_rows(decoder, out.past_key_values, g_mask, own, r_ids, pos)
        if h_resp is None:  # the prefix's cache repeated per row (the model's own attention)
            cache = out.past_key_values
            cache.batch_select_indices(own.to(device))  # [G, ...] -> [R, ...] per layer
            mask = torch.cat([g_mask[own], r_mask], dim=1)  # [R, P + L]
            h_resp = decoder(
                input_ids=r_ids.to(device),
                attention_mask=mask.to(device),
                position_ids=pos.to(device),
                past_key_values=cache,
                use_cache=True,
            ).last_hidden_state  # [R, L, H]
    rows = []
    for b, r in enumerate(responses):
        if not lead:
            rows.append(last[int(own[b])][None])  # [1, H] scores token 0
        if len(r) > 1 - lead:
            rows.append(h_resp[b, : len(r) - 1 + lead])  # [r - 1 + lead, H]
    if not rows:
        return h_pre.new_zeros(0, h_pre.shape[-1])
    return torch.cat(rows)  # [M, H]


def prefix_groups(
    input_ids: Tensor, attention_mask: Tensor, positions: Tensor
) -> tuple[list[list[int]], list[list[int]], list[int]] | None:
    """A right-padded ``prefix ⊕ response`` batch ([B, L], ``positions`` as
    ``response_positions`` makes them) as ``(distinct prefixes, responses, owner)`` for
    ``shared_prefix_hidden``, or None when no two rows share a prefix (or a row scores nothing,
    or the batch is not laid out that way): then sharing saves nothing."""
    b, width = input_ids.shape
    pos = positions.tolist()
    ids, lens = input_ids.tolist(), attention_mask.sum(1).tolist()
    first, count = [None] * b, [0] * b
    for p in pos:
        row = p // width
        first[row] = p if first[row] is None else first[row]
        count[row] += 1
    keys: dict[tuple, int] = {}
    prefixes, responses, owner = [], [], []
    for row in range(b):
        if first[row] is None:
            return None
        p = first[row] - row * width + 1  # prefix length: position p - 1 scores response token 0
        if p + count[row] != lens[row]:
            return None
        key = tuple(ids[row][:p])
        if key not in keys:
            keys[key] = len(prefixes)
            prefixes.append(list(key))
        owner.append(keys[key])
        responses.append(ids[row][p : p + count[row]])
    return (prefixes, responses, owner) if len(prefixes) < b else None


def response_hidden(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    positions: Tensor,
    share_prefix: bool = False,
    split: bool = True,
) -> Tensor:
    """Final hidden states ``[M, H]`` at ``positions`` of a right-padded ``prefix ⊕ response``
    batch, with gradient (the trainer's forward). ``share_prefix``: rows with the same prefix
    (the ``rollout.n`` samples of a prompt) run it once (``prefix_groups``,
    ``shared_prefix_hidden``); the same numbers to GEMM rounding, gradients included."""
    if share_prefix and can_share_prefix(model):
        groups = prefix_groups(input_ids, attention_mask, positions)
        if groups is not None:
            return shared_prefix_hidden(model, *groups, split=split)  # [M, H]
    hidden = model_hidden_states(model, input_ids, attention_mask)  # [B, L, H]
    return hidden.reshape(-1, hidden.shape[-1])[positions]  # [M, H]


def _pad_right(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Right-padded ``(ids, attention_mask)``, both [B, T] int64 (T >= 1)."""
    seq_len = max([len(r) for r in rows] + [1])
    ids = torch.full((len(rows), seq_len), pad_id, dtype=torch.long)  # [B, T]
    mask = torch.zeros((len(rows), seq_len), dtype=torch.long)  # [B, T]
    for b, row in enumerate(rows):
        if len(row):
            ids[b, : len(row)] = torch.as_tensor(list(row), dtype=torch.long)
            mask[b, : len(row)] = 1
    return ids, mask


@torch.no_grad()
def sequence_stats(
    model: nn.Module,
    prefix_ids: list[list[int]],
    response_ids: list[list[int]],
    k: int,
    vocab_size: int,
    temperature: float = 1.0,
    chunk: int = 1024,
    pad_id: int = 0,
    want_entropy: bool = True,
) -> list[dict[str, np.ndarray]]:
    """Score each response after its prefix: one dict of numpy arrays per sequence.

    Pads ``prefix ⊕ response`` rows on the right, runs the decoder once for the batch, keeps the
    hidden states at the response-scoring positions only (``response_positions``) and applies the
    head to them in chunks (``head_logprob_stats``). Keys per sequence (length ``R`` = its response
    length): ``logprob`` [R] fp32, ``topk_ids`` [R, K] int32, ``topk_logprobs`` [R, K] fp32,
    ``topk_logmass`` [R] fp32, ``entropy`` [R] fp32.

    The model runs in its own dtype and mode: load it in fp32 and call ``model.eval()`` for scores
    (the score stage does); the head is computed in fp32 regardless. The caller picks the batch
    (all rows are forwarded together, padded to the longest).
    """
    if len(prefix_ids) != len(response_ids):
        raise ValueError("prefix_ids and response_ids must have the same length")
    if not prefix_ids:
        return []
    device = next(model.parameters()).device
    p_lens = [len(p) for p in prefix_ids]
    r_lens = [len(r) for r in response_ids]
    seq_len = max(p + r for p, r in zip(p_lens, r_lens))
    ids = torch.full((len(p_lens), seq_len), pad_id, dtype=torch.long)  # [B, T]
    mask = torch.zeros((len(p_lens), seq_len), dtype=torch.long)  # [B, T]
    for b, (p, r) in enumerate(zip(prefix_ids, response_ids)):
        row = list(p) + list(r)
        ids[b, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[b, : len(row)] = 1
    pos = response_positions(p_lens, r_lens, seq_len)  # [M]
    # The target of position p is the token at p + 1 in the same row.
    targets = ids.reshape(-1)[pos + 1]  # [M]
    hidden = model_hidden_states(model, ids.to(device), mask.to(device))  # [B, T, H]
    hidden = hidden.reshape(-1, hidden.shape[-1])[pos.to(device)]  # [M, H]
    stats = head_logprob_stats(
        hidden,
        model_head(model),
        targets.to(device),
        k,
        vocab_size,
        temperature,
        chunk,
        want_entropy,
    )
    stats = {name: t.cpu().numpy() for name, t in stats.items()}
    out, start = [], 0
    for r in r_lens:
        out.append({name: a[start : start + r] for name, a in stats.items()})
        start += r
    return out
