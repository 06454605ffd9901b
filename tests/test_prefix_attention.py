"""The split shared-prefix attention (stages/lib/prefix_attention.py) against a dense reference:
every row's softmax over its prefix's keys (repeated) and its own keys, values and gradients,
with query-head groups (GQA), groups of unequal size, padded prefixes and causal or per-row
masks; and the model-level switch (taken where it suits, refused where it does not, restored)."""

from __future__ import annotations

import pytest
import torch

from stages.lib import logprobs as lp
from stages.lib import models
from stages.lib import prefix_attention as pa

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def dense(q, k, v, kp, vp, owner, p_mask, own_bias, scaling):
    """The reference: each row's keys = its prefix's (repeated) ⊕ its own, one softmax."""
    g = q.shape[1] // k.shape[1]
    own = torch.as_tensor(owner)
    keys = torch.cat([kp[own], k], 2).repeat_interleave(g, 1)  # [R, h, P + S, d]
    vals = torch.cat([vp[own], v], 2).repeat_interleave(g, 1)
    bias_pre = torch.zeros(p_mask.shape).masked_fill(p_mask == 0, float("-inf"))[own]  # [R, P]
    own_b = own_bias.expand(q.shape[0], 1, q.shape[2], k.shape[2])  # [R, 1, L, S]
    bias = torch.cat([bias_pre[:, None, None, :].expand(-1, 1, q.shape[2], -1), own_b], -1)
    s = q @ keys.transpose(-1, -2) * scaling + bias  # [R, h, L, P + S]
    return (torch.softmax(s, -1) @ vals).transpose(1, 2)  # [R, L, h, d]


def case(owner, p_lens, heads, kv_heads, length, own_bias=None, own_len=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    groups, r, d, p = len(p_lens), len(owner), 8, max(p_lens)

    def t(*shape):
        return torch.randn(*shape, generator=gen).requires_grad_()

    s = own_len or length  # the rows' own keys
    q, k, v = t(r, heads, length, d), t(r, kv_heads, s, d), t(r, kv_heads, s, d)
    kp, vp = t(groups, kv_heads, p, d), t(groups, kv_heads, p, d)
    p_mask = torch.tensor([[1] * n + [0] * (p - n) for n in p_lens])  # [G, P] right-padded
    bias = own_bias if own_bias is not None else pa.causal_bias(length, torch.float32, "cpu")
    slots, row_slot, n = pa.layout(owner, groups, "cpu")
    ctx = pa.PrefixContext([kp], [vp], pa.padding_bias(p_mask, torch.float32), slots, row_slot,
                           n, bias)  # fmt: skip
    return (q, k, v, kp, vp), p_mask, bias, ctx


@pytest.mark.parametrize(
    "owner,p_lens,heads,kv_heads",
    [
        ([0, 0, 0, 1, 2, 2, 2, 2], [5, 9, 1], 4, 2),  # unequal groups, padded prefixes, GQA
        ([1, 0, 1, 0], [7, 7], 2, 2),  # rows interleaved across groups, no padding
        ([0], [3], 6, 1),  # one row, multi-query attention
    ],
)
def test_split_equals_dense_values_and_gradients(owner, p_lens, heads, kv_heads):
    tensors, p_mask, bias, ctx = case(owner, p_lens, heads, kv_heads, length=6)
    scaling = 8**-0.5
    got = pa.split_attention(*tensors[:3], ctx, 0, scaling)  # [R, L, h, d]
    want = dense(*tensors, owner, p_mask, bias, scaling)
    assert got.shape == want.shape
    assert float((got - want).detach().abs().max()) <= 1e-5
    up = torch.randn(got.shape, generator=torch.Generator().manual_seed(1))
    g_got = torch.autograd.grad((got * up).sum(), tensors)
    g_want = torch.autograd.grad((want * up).sum(), tensors)
    for a, b in zip(g_got, g_want, strict=True):
        assert float((a - b).abs().max()) <= 1e-5 * (1 + float(b.abs().max()))


def test_split_with_a_per_row_mask_of_filled_positions():
    """Decoding: row r has filled its first ``fill[r]`` own positions, one query each."""
    fill = torch.tensor([1, 3, 2, 4])
    bias = torch.zeros(4, 1, 1, 4).masked_fill(
        torch.arange(4)[None, None, None, :] >= fill[:, None, None, None], float("-inf")
    )
    tensors, p_mask, bias, ctx = case([0, 0, 1, 1], [4, 2], 4, 2, 1, own_bias=bias, own_len=4)
    with torch.no_grad():
        got = pa.split_attention(*tensors[:3], ctx, 0, 0.5)
        want = dense(*tensors, [0, 0, 1, 1], p_mask, bias, 0.5)
    assert float((got - want).abs().max()) <= 1e-5


def test_layout_slots_and_rows():
    slots, row_slot, n = pa.layout([1, 0, 1, 1], 2, "cpu")
    assert n == 3
    assert row_slot.tolist() == [3, 0, 4, 5]
    assert slots.tolist() == [1, 4, 4, 0, 2, 3]  # empty slots name row R = 4


def test_model_takes_the_split_path_and_matches_the_repeated_cache(tiny_lm, monkeypatch):
    """Llama through transformers: every layer runs split_attention, the hidden states equal the
    copied-cache path's (score/train.split_attention=false), and the model's attention setting is
    back to SDPA afterwards."""
    model = models.load_model(str(tiny_lm), "student")
    gen = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    prefixes = [torch.randint(4, vocab, (n,), generator=gen).tolist() for n in (3, 11)]
    responses = [torch.randint(4, vocab, (n,), generator=gen).tolist() for n in (5, 1, 8, 2)]
    owner = [0, 0, 1, 1]
    calls = []
    real = pa.split_attention
    monkeypatch.setattr(pa, "split_attention", lambda *a: calls.append(1) or real(*a))
    with torch.no_grad():
        split = lp.shared_prefix_hidden(model, prefixes, responses, owner)
        assert len(calls) == model.config.num_hidden_layers
        repeated = lp.shared_prefix_hidden(model, prefixes, responses, owner, split=False)
    assert len(calls) == model.config.num_hidden_layers  # split=False: the copied cache
    assert float((split - repeated).abs().max()) <= 1e-5
    assert model.config._attn_implementation == "sdpa"


def test_fits_refuses_what_it_cannot_split(tiny_lm):
    model = models.load_model(str(tiny_lm), "student")
    decoder = model.get_decoder()
    assert pa.fits(decoder, 1)
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    assert not pa.fits(decoder, 2 * head_dim + 1)  # scores would outgrow the repeated cache
    decoder.config.sliding_window = 4
    assert not pa.fits(decoder, 1)
    decoder.config.sliding_window = None
    decoder.gradient_checkpointing = True
    assert not pa.fits(decoder, 1)  # the backward's recomputation would run unsplit
    with torch.no_grad():
        assert pa.fits(decoder, 1)  # no backward, no recomputation


def test_active_restores_the_attention_setting_on_error(tiny_lm):
    model = models.load_model(str(tiny_lm), "student")
    ctx = pa.PrefixContext([], [], None, torch.zeros(1), torch.zeros(1), 1, torch.zeros(1))
    with pytest.raises(RuntimeError), pa.active(model, ctx):
        assert model.config._attn_implementation == pa.NAME
        raise RuntimeError("boom")
    assert model.config._attn_implementation == "sdpa"


def test_split_attention_keys(tmp_path):
    from stages.lib.config import compose
    from stages.lib.errors import UserError

    cfg = compose("train", [f"run_dir={tmp_path}"])
    assert cfg.train.split_attention is True and cfg.score.split_attention is True
    demo = compose("train", [f"run_dir={tmp_path}", "experiment=demo"])  # pinned: see demo.yaml
    assert (demo.train.split_attention, demo.score.split_attention) == (False, False)
    assert demo.train.fused_adamw is False
    for key in ("train.split_attention", "score.split_attention"):
        with pytest.raises(UserError) as e:
            compose("train", [f"run_dir={tmp_path}", f"{key}=sometimes"])
        assert key in str(e.value)
