"""Log-prob kernels against a dense ``torch.log_softmax(logits.float(), -1)`` reference."""

import math

import pytest
import torch
from torch import nn

from stages.lib import logprobs
from stages.lib.logprobs import (
    gather_logprobs,
    head_logprob_stats,
    logits_logprob_stats,
    response_positions,
    sequence_stats,
    topk_exact,
)

ATOL = 1e-5


def _dense(logits, vocab_size, temperature=1.0):
    """Reference: full log-softmax over the first vocab_size columns only."""
    return torch.log_softmax(logits[:, :vocab_size].double() / temperature, -1)  # [N, V]


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(0)
    return torch.randn(37, 50, generator=g) * 3  # [N, V]


def assert_matches_dense(out: dict, ref: torch.Tensor, targets: torch.Tensor, k: int) -> None:
    """Every statistic against the dense fp64 reference log-probs ``ref`` [N, V]."""
    n = ref.shape[0]
    torch.testing.assert_close(
        out["logprob"].double(), ref[torch.arange(n), targets], atol=ATOL, rtol=0
    )
    vals, ids = ref.topk(k, -1)
    assert torch.equal(out["topk_ids"].long(), ids)
    torch.testing.assert_close(out["topk_logprobs"].double(), vals, atol=ATOL, rtol=0)
    torch.testing.assert_close(
        out["topk_logmass"].double(), torch.logsumexp(vals, -1), atol=ATOL, rtol=0
    )
    ent = -(ref.exp() * ref).sum(-1)
    torch.testing.assert_close(out["entropy"].double(), ent, atol=ATOL, rtol=0)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_stats_match_dense(logits, temperature):
    n, v = logits.shape
    targets = torch.randint(0, v, (n,), generator=torch.Generator().manual_seed(1))
    out = logits_logprob_stats(logits, targets, 8, v, temperature=temperature, chunk=5)
    ref = _dense(logits, v, temperature)
    assert out["logprob"].dtype == torch.float32
    assert out["topk_ids"].dtype == torch.int32
    assert_matches_dense(out, ref, targets, 8)
    # sorted by descending probability
    assert (out["topk_logprobs"][:, 1:] <= out["topk_logprobs"][:, :-1]).all()


def test_k_equals_vocab_full_mass(logits):
    n, v = logits.shape
    out = logits_logprob_stats(logits, torch.zeros(n, dtype=torch.long), v, v)
    assert torch.equal(out["topk_logmass"], torch.zeros(n))
    ref = _dense(logits, v)
    torch.testing.assert_close(
        out["entropy"].double(), -(ref.exp() * ref).sum(-1), atol=ATOL, rtol=0
    )
    assert torch.equal(out["topk_ids"].long().sort(-1).values, torch.arange(v).expand(n, v))


def test_k_zero_is_empty(logits):
    n, v = logits.shape
    out = logits_logprob_stats(logits, torch.zeros(n, dtype=torch.long), 0, v, want_entropy=False)
    assert out["topk_ids"].shape == (n, 0) and out["topk_logprobs"].shape == (n, 0)
    assert torch.isnan(out["topk_logmass"]).all()
    assert "entropy" not in out


def test_padded_vocab_rows_ignored(logits):
    n, v = logits.shape
    vocab = v - 7  # the last 7 embedding rows are padding
    padded = logits.clone()
    padded[:, vocab:] = 100.0  # huge: would dominate top-K and the normaliser if not masked
    targets = torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(2))
    out = logits_logprob_stats(padded, targets, 10, vocab)
    clean = logits_logprob_stats(logits[:, :vocab], targets, 10, vocab)
    assert (out["topk_ids"] < vocab).all()
    for key in clean:
        torch.testing.assert_close(out[key], clean[key], atol=ATOL, rtol=0)
    # K = tokenizer vocabulary on a padded head: all the real mass, none of the padding
    full = logits_logprob_stats(padded, targets, vocab, vocab)
    assert (full["topk_ids"] < vocab).all() and torch.equal(full["topk_logmass"], torch.zeros(n))
    lp, log_z = gather_logprobs(padded, targets[:, None], vocab)
    torch.testing.assert_close(lp[:, 0], clean["logprob"], atol=ATOL, rtol=0)
    torch.testing.assert_close(log_z, torch.logsumexp(logits[:, :vocab], -1), atol=ATOL, rtol=0)
    with pytest.raises(ValueError):
        logits_logprob_stats(logits, targets, 4, v + 1)  # tokenizer larger than the head


def test_chunk_size_does_not_matter(logits):
    n, v = logits.shape
    targets = torch.randint(0, v, (n,), generator=torch.Generator().manual_seed(3))
    outs = [logits_logprob_stats(logits, targets, 6, v, chunk=c) for c in (1, 4, 37, 4096)]
    for o in outs[1:]:
        for key in o:
            torch.testing.assert_close(o[key], outs[0][key], atol=1e-6, rtol=0)


def test_head_path_equals_logits_path(logits):
    g = torch.Generator().manual_seed(4)
    hidden = torch.randn(37, 16, generator=g)  # [N, H]
    head = nn.Linear(16, 50, bias=False)
    targets = torch.randint(0, 45, (37,), generator=g)
    a = head_logprob_stats(hidden, head, targets, 5, 45, chunk=8)
    b = logits_logprob_stats(head(hidden).detach(), targets, 5, 45)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=ATOL, rtol=0)
    # a bf16 head is computed in fp32 from an fp32 copy of its weight
    c = head_logprob_stats(hidden, head.to(torch.bfloat16), targets, 5, 45)
    ref = logits_logprob_stats(hidden @ head.weight.float().T, targets, 5, 45)
    torch.testing.assert_close(c["logprob"], ref["logprob"], atol=ATOL, rtol=0)


def test_head_sees_at_most_chunk_rows():
    g = torch.Generator().manual_seed(7)
    hidden = torch.randn(23, 8, generator=g)  # [N, H]
    w = torch.randn(30, 8, generator=g)  # [V, H]
    seen = []

    def head(h):
        seen.append(h.shape[0])
        return h @ w.T

    out = head_logprob_stats(hidden, head, torch.zeros(23, dtype=torch.long), 3, 30, chunk=4)
    assert max(seen) == 4 and sum(seen) == 23
    assert out["logprob"].shape == (23,)


@pytest.mark.parametrize("v", [64 * 40, 64 * 40 + 17, 100])  # whole segments, a tail, plain
@pytest.mark.parametrize("k", [1, 8, 32])
def test_topk_exact_is_torch_topk(v, k):
    g = torch.Generator().manual_seed(v + k)
    z = torch.randn(9, v, generator=g) * 3  # [n, V]
    z[0, -3:] = torch.tensor([50.0, 52.0, 51.0])  # the top of row 0 is in the last segment
    vals, ids = topk_exact(z, k)
    ref_vals, ref_ids = z.topk(k, dim=1)
    assert torch.equal(vals, ref_vals) and torch.equal(ids, ref_ids)
    # many ties (integer logits): the same values, each id once, ids pointing at those values
    t = torch.randint(0, 4, (9, v), generator=g).float()  # [n, V]
    vals, ids = topk_exact(t, k)
    assert torch.equal(vals, t.topk(k, dim=1).values)
    assert torch.equal(t.gather(1, ids), vals)
    assert all(len(set(row)) == k for row in ids.tolist())


def test_large_vocab_blocks_match_dense(monkeypatch):
    """The fused path (segment top-K with a tail, several row blocks) against the dense reference,
    on a padded head with a temperature; the input logits are left as they were."""
    monkeypatch.setattr(logprobs, "_BLOCK_ELEMENTS", 3 * 4000)  # 3 rows a block
    g = torch.Generator().manual_seed(8)
    n, width, vocab = 11, 4000, 3001  # 999 padded columns; 3001 = 46 segments of 64 + 57
    z = torch.randn(n, width, generator=g) * 4  # [N, V]
    z[:, vocab:] = 100.0
    before = z.clone()
    targets = torch.randint(0, vocab, (n,), generator=g)
    out = logits_logprob_stats(z, targets, 16, vocab, temperature=0.8, chunk=7)
    assert torch.equal(z, before)
    assert_matches_dense(out, _dense(z, vocab, 0.8), targets, 16)


def test_neg_inf_logits_have_zero_probability(logits):
    """A logit at -inf (a banned token) has p = 0 and adds 0·log 0 = 0 to the entropy."""
    n, v = logits.shape
    banned = logits.clone()
    banned[:, 7] = float("-inf")
    targets = torch.zeros(n, dtype=torch.long)
    out = logits_logprob_stats(banned, targets, 4, v)
    ref = _dense(logits, v)
    keep = torch.arange(v) != 7
    clean = torch.log_softmax(logits[:, keep].double(), -1)  # [N, V-1]
    torch.testing.assert_close(
        out["entropy"].double(), -(clean.exp() * clean).sum(-1), atol=ATOL, rtol=0
    )
    assert torch.isfinite(out["logprob"]).all() and (out["topk_ids"] != 7).all()
    assert ref.shape == (n, v)


def test_gather_logprobs_grad(logits):
    n, v = logits.shape
    ids = torch.randint(0, v, (n, 4), generator=torch.Generator().manual_seed(5))
    x = logits.clone().requires_grad_(True)
    lp, log_z = gather_logprobs(x, ids, v, temperature=2.0)
    ref = torch.log_softmax(logits / 2.0, -1).gather(1, ids)
    torch.testing.assert_close(lp, ref, atol=ATOL, rtol=0)
    lp.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_response_positions():
    pos = response_positions([2, 1], [3, 2], seq_len=5)
    # row 0: tokens at 2,3,4 scored by 1,2,3; row 1: tokens at 1,2 scored by 0,1 (+5)
    assert pos.tolist() == [1, 2, 3, 5, 6]
    with pytest.raises(ValueError):
        response_positions([0], [1], seq_len=3)


def _tiny_llama(vocab=50):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=1,
        num_key_value_heads=1,
        head_dim=64,
        vocab_size=vocab,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("vocab_size", [50, 44])  # 44: the head has 6 padded rows
def test_sequence_stats_match_model_logits(vocab_size):
    model = _tiny_llama()
    prefixes = [[3, 5, 7], [1], [2, 4, 6, 8, 10, 12]]
    responses = [[9, 11], [13, 2, 4, 5, 6], [7]]
    responses = [[t % vocab_size for t in r] for r in responses]
    k = 5
    out = sequence_stats(model, prefixes, responses, k, vocab_size, chunk=3, pad_id=0)
    assert len(out) == 3
    for p, r, o in zip(prefixes, responses, out):
        ids = torch.tensor([p + r])
        with torch.no_grad():
            logits = model(ids).logits[0]  # [T, V], unpadded single row
        ref = torch.log_softmax(logits[:, :vocab_size].double(), -1)  # [T, V]
        scoring = ref[len(p) - 1 : len(p) - 1 + len(r)]  # [R, V]
        assert o["logprob"].shape == (len(r),) and o["topk_ids"].shape == (len(r), k)
        expect = scoring[torch.arange(len(r)), torch.tensor(r)]
        torch.testing.assert_close(
            torch.from_numpy(o["logprob"]).double(), expect, atol=ATOL, rtol=0
        )
        vals, top = scoring.topk(k, -1)
        assert torch.equal(torch.from_numpy(o["topk_ids"]).long(), top)
        torch.testing.assert_close(
            torch.from_numpy(o["topk_logprobs"]).double(), vals, atol=ATOL, rtol=0
        )
        ent = -(scoring.exp() * scoring).sum(-1)
        torch.testing.assert_close(torch.from_numpy(o["entropy"]).double(), ent, atol=ATOL, rtol=0)
        assert math.isfinite(float(o["topk_logmass"].sum()))


def test_sequence_stats_empty_response():
    model = _tiny_llama()
    out = sequence_stats(model, [[1, 2], [3]], [[], [4, 5]], 3, 50)
    assert out[0]["logprob"].shape == (0,) and out[0]["topk_ids"].shape == (0, 3)
    assert out[1]["logprob"].shape == (2,)
