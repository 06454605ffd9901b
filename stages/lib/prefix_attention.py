"""Attention over one shared prefix and its rows, without repeating the prefix's keys and values.

The rows of a batch that continue the same prefix (the ``rollout.n`` samples of a prompt) need
that prefix's keys and values in every layer. Repeating them per row (``batch_select_indices``,
then the cache's concatenation) copies ``rows · prefix`` keys and values twice per layer, and the
backward scatters their gradients back: on CPU that was 5-8 % of a training step. Here the
prefix stays one tensor per group, and each layer's attention is split in two parts that share a
softmax:

- **prefix part**: the queries of a group's rows are stacked (``[G, kv_heads, n · g · L, d]``,
  ``g`` query heads per key head) and attend to that group's ``[G, kv_heads, P, d]`` keys in one
  batched matmul, padded prefix positions masked;
- **own part**: each row attends to its own keys (``[R, kv_heads, S, d]``) under ``bias``
  (causal in training and scoring; the filled positions of a decoding buffer);
- the two are merged exactly by their log-sum-exps (``lse = logaddexp(lse_prefix, lse_own)``):
  the softmax over ``prefix ⊕ own`` keys, the same floats in another summation order.

It is plain differentiable torch (no custom backward), so it serves the trainer, the score
stage and decoding alike. It materialises the scores (``[G, kv_heads, n · g · L, P]``), which a
fused kernel does not: ``fits`` chooses it only where those scores take no more memory than the
repeated keys and values they replace (``g · L <= 2 · d``, about: short responses, and always
single-token decoding steps), and only for models whose attention is plain full attention.

How it plugs into transformers: ``active(model, ctx)`` switches the model's attention
implementation to this module's registered function for one forward (transformers then builds
no mask: ``ctx`` carries its own) and back afterwards; outside it every call goes to SDPA.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass

import torch
from torch import Tensor, nn

NAME = "distillery_shared_prefix"
_CTX: contextvars.ContextVar[PrefixContext | None] = contextvars.ContextVar(NAME, default=None)


@dataclass
class PrefixContext:
    """What one forward's attention reads besides its own keys and values.

    ``keys[i]`` / ``values[i]``: layer ``i``'s prefix keys and values ``[G, kv_heads, P, d]``
    (after the position encoding). ``prefix_bias`` ``[G, 1, 1, P]``: 0 where the prefix has a
    token, -inf at its padding. ``slots`` ``[G · n]``: the row sitting in each (group, slot), or
    ``R`` (a zero row) where a group has fewer than ``n`` rows; ``row_slot`` ``[R]``: each row's
    flat slot. ``own_bias``: broadcastable to ``[R, 1, L, S]``, the own part's additive mask.
    """

    keys: list[Tensor]
    values: list[Tensor]
    prefix_bias: Tensor | None
    slots: Tensor
    row_slot: Tensor
    n: int
    own_bias: Tensor
    calls: int = 0  # layers that ran through split_attention (checked by the caller)


def context(layers: list, prefix_mask: Tensor, owner: list[int], own_bias: Tensor) -> PrefixContext:
    """The context of rows ``owner`` (row r continues prefix ``owner[r]``) over a prefix cache's
    ``layers`` (transformers cache layers, keys and values ``[G, kv_heads, P, d]``) whose tokens
    ``prefix_mask`` ``[G, P]`` marks."""
    keys = layers[0].keys
    slots, row_slot, n = layout(owner, prefix_mask.shape[0], keys.device)
    return PrefixContext(
        keys=[x.keys for x in layers],
        values=[x.values for x in layers],
        prefix_bias=padding_bias(prefix_mask.to(keys.device), keys.dtype),  # [G, 1, 1, P]
        slots=slots,
        row_slot=row_slot,
        n=n,
        own_bias=own_bias,
    )


def layout(owner: list[int], groups: int, device: torch.device | str) -> tuple[Tensor, Tensor, int]:
    """``(slots [G·n], row_slot [R], n)`` for rows whose prefix is ``owner[r]``: row ``r`` takes
    the next free slot of its group; ``n`` is the largest group; empty slots name row ``R``."""
    n = max([owner.count(g) for g in range(groups)] + [1])
    used = [0] * groups
    slots, row_slot = [len(owner)] * (groups * n), []
    for r, g in enumerate(owner):
        row_slot.append(g * n + used[g])
        slots[row_slot[-1]] = r
        used[g] += 1
    as_long = dict(dtype=torch.long, device=device)
    return torch.tensor(slots, **as_long), torch.tensor(row_slot, **as_long), n


def padding_bias(mask: Tensor, dtype: torch.dtype) -> Tensor | None:
    """``[G, P]`` 0/1 prefix mask -> ``[G, 1, 1, P]`` additive bias (0 or -inf); None when no
    prefix is padded."""
    if bool(mask.all()):
        return None
    bias = torch.zeros(mask.shape, dtype=dtype, device=mask.device)  # [G, P]
    return bias.masked_fill(mask == 0, float("-inf"))[:, None, None, :]


def causal_bias(length: int, dtype: torch.dtype, device: torch.device | str) -> Tensor:
    """``[1, 1, L, L]`` additive causal mask: position ``j`` sees ``0..j``."""
    full = torch.full((length, length), float("-inf"), dtype=dtype, device=device)
    return full.triu(1)[None, None]


def fits(model: nn.Module, query_len: int) -> bool:
    """Whether the split attention suits ``model`` for ``query_len`` queries per row: plain full
    attention through transformers' attention interface (no sliding window, logit soft-capping,
    per-layer attention types or dropout), and scores no larger than the repeated keys and
    values they replace (``g · L <= 2 · d`` per prefix position: ``g · L`` scores vs ``2 · d``
    key and value floats for each of a row's query heads' key head). Not under gradient
    checkpointing: its recomputation in the backward would run outside ``active``."""
    if getattr(model, "gradient_checkpointing", False) and torch.is_grad_enabled():
        return False
    cfg = getattr(model, "config", None)
    if cfg is None or getattr(cfg, "_attn_implementation", None) not in ("sdpa", "eager"):
        return False
    if getattr(cfg, "attn_logit_softcapping", None) or getattr(cfg, "attention_dropout", 0.0):
        return False
    if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True):
        return False
    if any(t != "full_attention" for t in getattr(cfg, "layer_types", None) or []):
        return False
    heads = getattr(cfg, "num_attention_heads", None)
    if not heads:
        return False
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return (heads // kv_heads) * query_len <= 2 * head_dim


@contextlib.contextmanager
def active(model: nn.Module, ctx: PrefixContext):
    """Run ``model``'s attention through ``split_attention`` with ``ctx`` for one forward."""
    _register()
    cfg = model.config
    before = cfg._attn_implementation
    token = _CTX.set(ctx)
    cfg._attn_implementation = NAME
    try:
        yield
    finally:
        cfg._attn_implementation = before
        _CTX.reset(token)


def split_attention(
    q: Tensor, k: Tensor, v: Tensor, ctx: PrefixContext, layer: int, scaling: float
) -> Tensor:
    """``softmax([q·kp, q·k] · scaling + bias) @ [vp, v]`` without repeating ``kp``/``vp``.

    ``q`` ``[R, h, L, d]``, ``k``/``v`` ``[R, kv_heads, S, d]`` (the rows' own keys), the prefix
    ``ctx.keys[layer]`` ``[G, kv_heads, P, d]``. Returns ``[R, L, h, d]`` (what transformers'
    attention functions return). The softmax is taken against a detached row maximum over both
    parts (it cancels exactly, in value and gradient) and normalised once at the end.
    """
    r, h, length, d = q.shape
    kp, vp = ctx.keys[layer], ctx.values[layer]  # [G, kvh, P, d] each
    groups, kvh = kp.shape[0], kp.shape[1]
    g, n = h // kvh, ctx.n
    q = q * scaling  # [R, h, L, d]: cheaper than scaling the scores
    # prefix part: a group's rows stacked as queries, [G, kvh, n·g·L, d]
    q_pad = torch.cat([q, q.new_zeros(1, h, length, d)])  # [R + 1, h, L, d]
    q_pre = q_pad[ctx.slots].view(groups, n, kvh, g, length, d).transpose(1, 2)
    s_pre = torch.matmul(q_pre.reshape(groups, kvh, -1, d), kp.transpose(-1, -2))  # [G, kvh, Q, P]
    if ctx.prefix_bias is not None:
        s_pre = s_pre + ctx.prefix_bias
    # own part: [R, kvh, g·L, S]
    s_own = torch.matmul(q.reshape(r, kvh, g * length, d), k.transpose(-1, -2))
    s_own = (s_own.view(r, kvh, g, length, -1) + ctx.own_bias[:, :, None]).view(s_own.shape)
    with torch.no_grad():  # one maximum per query row over both parts
        top = torch.maximum(_slots_to_rows(s_pre.amax(-1), ctx), s_own.amax(-1))
        top_g = _rows_to_slots(top, ctx)  # [G, kvh, Q]
    e_pre = torch.exp(s_pre - top_g[..., None])  # [G, kvh, Q, P]
    e_own = torch.exp(s_own - top[..., None])  # [R, kvh, g·L, S]
    den = _slots_to_rows(e_pre.sum(-1), ctx) + e_own.sum(-1)  # [R, kvh, g·L]
    num = _slots_to_rows(torch.matmul(e_pre, vp), ctx) + torch.matmul(e_own, v)
    out = (num / den[..., None]).view(r, h, length, d)  # [R, h, L, d]
    return out.transpose(1, 2)  # [R, L, h, d]


def _rows_to_slots(x: Tensor, ctx: PrefixContext) -> Tensor:
    """``[R, kvh, Q']`` per row -> ``[G, kvh, n·Q']`` in slot layout (empty slots 0)."""
    groups, n = len(ctx.slots) // ctx.n, ctx.n
    pad = torch.cat([x, x.new_zeros(1, *x.shape[1:])])  # [R + 1, kvh, Q']
    return (
        pad[ctx.slots]
        .view(groups, n, x.shape[1], -1)
        .transpose(1, 2)
        .reshape(groups, x.shape[1], -1)
    )


def _slots_to_rows(x: Tensor, ctx: PrefixContext) -> Tensor:
    """``[G, kvh, n·Q', ...]`` in slot layout -> ``[R, kvh, Q', ...]`` per row."""
    groups, n = x.shape[0], ctx.n
    kvh, tail = x.shape[1], x.shape[3:]
    per = x.view(groups, kvh, n, -1, *tail).transpose(1, 2)  # [G, n, kvh, Q', ...]
    return per.reshape(groups * n, kvh, -1, *tail)[ctx.row_slot]  # [R, kvh, Q', ...]


def attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kw):
    """The registered transformers attention function: ``split_attention`` under ``active``,
    SDPA otherwise (a model switched to this name outside ``active`` still runs correctly)."""
    ctx = _CTX.get()
    if ctx is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kw
        )
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    ctx.calls += 1
    return split_attention(query, key, value, ctx, module.layer_idx, scale), None


def split_rows(
    decoder: nn.Module,
    cache,
    g_mask: Tensor,
    own: Tensor,
    r_ids: Tensor,
    pos: Tensor,
) -> Tensor | None:
    """The response rows' hidden states ``[R, L, H]`` with each layer's attention split into
    the prefix's keys (one tensor per prefix, ``stages.lib.prefix_attention``) and the row's
    own, or None where that split does not suit the model (then the caller repeats the cache).
    Right-padded rows need no mask of their own: a real token never sees the padding after it."""
    layers = getattr(cache, "layers", None)
    if not layers or not fits(decoder, r_ids.shape[1]):
        return None
    device, dtype = layers[0].keys.device, layers[0].keys.dtype
    causal = causal_bias(r_ids.shape[1], dtype, device)  # [1, 1, L, L]
    ctx = context(layers, g_mask, own.tolist(), causal)
    with active(decoder, ctx):
        h = decoder(input_ids=r_ids.to(device), position_ids=pos.to(device), use_cache=False)
    if ctx.calls != len(layers):  # attention that bypasses transformers' interface: not split
        return None
    return h.last_hidden_state  # [R, L, H]


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, attention_forward)
