"""Every loss against a dense reference written independently here, on random logits.

The references use the full [N, V] teacher and student distributions (in float64), which the
losses never build; agreement with K = V shows the top-K machinery reduces to the dense math.
"""

import math

import pytest
import torch

from stages.lib.losses import (
    LOSSES,
    average_metrics,
    chunk_opd,
    combined_loss,
    exopd,
    gkd_jsd,
    mapped_topk_fkl,
    opd_k1,
    sft,
    topk_fkl,
    topk_rkl,
    tropd,
    uld,
    vopd,
)

N, V = 12, 20
ATOL = 2e-5


def make(k=V, seed=0, n=N, v=V, kb=None):
    """Student logits, dense teacher/behaviour log-probs and the stored-column batch."""
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(n, v, generator=g) * 2  # [N, V]
    t_lp = torch.log_softmax(torch.randn(n, v, generator=g) * 2, -1)  # [N, V]
    b_lp = torch.log_softmax(student + 0.3 * torch.randn(n, v, generator=g), -1)  # [N, V]
    ref_lp = torch.log_softmax(torch.randn(n, v, generator=g), -1)  # [N, V]
    y = torch.multinomial(b_lp.exp(), 1, generator=g).squeeze(1)  # [N]
    vals, ids = t_lp.topk(k, -1)  # [N, K]
    b_ids = b_lp.topk(kb or k, -1).indices  # [N, Kb]
    batch = {
        "token_id": y,
        "weight": torch.rand(n, generator=g) + 0.5,
        "segment": torch.zeros(n, dtype=torch.uint8),
        "teacher_logprob": t_lp.gather(1, y[:, None]).squeeze(1),
        "teacher_topk_ids": ids,
        "teacher_topk_logprobs": vals,
        "teacher_topk_logmass": torch.zeros(n) if k == v else torch.logsumexp(vals, -1),
        "behavior_logprob": b_lp.gather(1, y[:, None]).squeeze(1),
        "ref_logprob": ref_lp.gather(1, y[:, None]).squeeze(1),
        "behavior_topk_ids": b_ids,
        "teacher_logprobs_on_behavior_topk": t_lp.gather(1, b_ids),
    }
    batch.update(aligned_columns(batch, n))
    return student, t_lp, batch


def aligned_columns(batch, n):
    """Cross-tokenizer columns derived from the same teacher (no new random draws).

    Chunks of 1 and 2 tokens laid out so that the splits (at 5) and the exclusions (every third
    row) of the tests below never cut one: chunk_opd's contract is that a chunk arrives in one call
    and is kept or dropped whole. The teacher's chunk log-prob is the sum of its tokens'
    log-probs; every third top-K entry is unmapped (-1).
    """
    sizes = [1, 2, 1, 1, 1, 1, 2, 1, 2] * n
    chunk = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))[:n]  # [N]
    t_tok = batch["teacher_logprob"]
    chunk_lp = torch.zeros(len(sizes)).index_add(0, chunk, t_tok)[chunk]  # [N]
    ids, vals = batch["teacher_topk_ids"], batch["teacher_topk_logprobs"]
    unmapped = (torch.arange(ids.shape[1]) % 3 == 1).expand_as(ids)  # [N, K]
    return {
        "chunk_index": chunk,
        "teacher_chunk_logprob": chunk_lp,
        "teacher_mapped_ids": ids.masked_fill(unmapped, -1),
        "teacher_mapped_logprobs": vals.masked_fill(unmapped, -math.inf),
        "teacher_sorted_probs": vals.exp(),
    }


def grad_of(fn, logits, batch, **kw):
    x = logits.clone().requires_grad_(True)
    loss, m = fn(x, batch, **kw)
    loss.backward()
    return loss.detach(), x.grad, m


def dense_grad(ref_fn, logits):
    """Gradient of a dense float64 reference loss by autograd."""
    x = logits.double().clone().requires_grad_(True)
    ref_fn(x).backward()
    return x.grad.float()


def close(a, b, atol=ATOL):
    torch.testing.assert_close(
        torch.as_tensor(a).double(), torch.as_tensor(b).double(), atol=atol, rtol=1e-5
    )


def kl_rows(log_p, log_q):
    """Dense KL(p‖q) per row (float64)."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def restrict(lp, ids):
    """Renormalise dense log-probs [N, V] on a support given by ids [N, K] (dense, -inf elsewhere)."""
    mask = torch.zeros_like(lp, dtype=torch.bool).scatter(1, ids, True)
    masked = lp.masked_fill(~mask, -math.inf)
    return torch.log_softmax(masked, -1)


def xlogy_kl(log_p, log_q):
    """KL with 0·log 0 = 0 for dense vectors that have -inf entries."""
    p = log_p.exp()
    terms = torch.where(p > 0, p * (log_p - log_q.masked_fill(p == 0, 0.0)), 0.0)
    return terms.sum(-1)


# ------------------------------------------------------------------------ policy gradients


def test_opd_k1_value_and_policy_gradient():
    logits, t_lp, b = make()
    w, y = b["weight"], b["token_id"]
    loss, grad, m = grad_of(opd_k1, logits, b)
    s_lp = torch.log_softmax(logits.double(), -1)
    lp_y = s_lp[torch.arange(N), y]
    r = b["teacher_logprob"].double() - lp_y
    close(loss, (w * -r * lp_y).sum())
    # ∇_z log π(y) = onehot(y) − softmax(z): the REINFORCE estimate −r ∇log π(y)
    onehot = torch.nn.functional.one_hot(y, V).double()
    close(grad, -(w * r)[:, None] * (onehot - s_lp.exp()))
    close(m["reward"], (w * r).sum())
    close(m["rkl_k1"], -(w * r).sum())
    close(m["staleness"], (w * (lp_y - b["behavior_logprob"])).sum())
    close(m["tokens"], w.sum())


def test_opd_k1_is_clip_caps_weight():
    logits, _, b = make()
    b = dict(b)
    lp_y = torch.log_softmax(logits, -1)[torch.arange(N), b["token_id"]]
    # half the tokens very stale (ratio e^5 > C), half fresh (ratio e^-1 < C)
    b["behavior_logprob"] = lp_y - torch.where(torch.arange(N) % 2 == 0, 5.0, -1.0)
    c = 2.0
    loss, _, m = grad_of(opd_k1, logits, b, is_clip=c)
    r = b["teacher_logprob"] - lp_y
    iw = torch.where(torch.arange(N) % 2 == 0, torch.tensor(c), torch.tensor(math.exp(-1)))
    close(loss, (b["weight"] * -iw * r * lp_y).sum(), atol=1e-4)
    close(m["is_weight"], (b["weight"] * iw).sum(), atol=1e-4)
    close(m["is_clipped"], b["weight"][::2].sum())
    close(m["is_ratio_max"], math.exp(5), atol=1e-2)


def test_vopd_dense_baseline_and_gradient_difference():
    logits, t_lp, b = make()  # K = V: the baseline is the dense KL(π_θ‖π_T)
    w, y = b["weight"], b["token_id"]
    loss, grad, m = grad_of(vopd, logits, b)
    _, grad_k1, _ = grad_of(opd_k1, logits, b)
    s_lp = torch.log_softmax(logits.double(), -1)
    lp_y = s_lp[torch.arange(N), y]
    kl = kl_rows(s_lp, t_lp.double())
    adv = b["teacher_logprob"].double() - lp_y + kl
    close(loss, (w * -adv * lp_y).sum())
    close(m["baseline_kl"], (w * kl).sum())
    onehot = torch.nn.functional.one_hot(y, V).double()
    close(grad - grad_k1, -(w * kl)[:, None] * (onehot - s_lp.exp()))
    # the baseline centres the reward: E_{y~π_θ}[r + KL] = 0 (the sign check)
    r_all = t_lp.double() - s_lp
    close((s_lp.exp() * (r_all + kl[:, None])).sum(-1), torch.zeros(N), atol=1e-10)


@pytest.mark.parametrize("support", ["teacher", "behavior"])
def test_vopd_topk_support(support):
    logits, t_lp, b = make(k=6, seed=1)
    w, y = b["weight"], b["token_id"]
    ids = b["teacher_topk_ids"] if support == "teacher" else b["behavior_topk_ids"]
    loss, _, _ = grad_of(vopd, logits, b, support=support)
    s_lp = torch.log_softmax(logits.double(), -1)
    kl = xlogy_kl(restrict(s_lp, ids), restrict(t_lp.double(), ids))
    lp_y = s_lp[torch.arange(N), y]
    close(loss, (w * -(b["teacher_logprob"] - lp_y + kl) * lp_y).sum())


def test_exopd_lambda_one_is_opd_exactly_and_extrapolates():
    logits, _, b = make(seed=2)
    l1, g1, _ = grad_of(exopd, logits, b, lam=1.0)
    l0, g0, _ = grad_of(opd_k1, logits, b)
    assert torch.equal(l1, l0) and torch.equal(g1, g0)
    no_ref = {k: v for k, v in b.items() if k != "ref_logprob"}
    assert torch.equal(exopd(logits, no_ref, lam=1.0)[0], l0)
    with pytest.raises(KeyError):
        exopd(logits, no_ref, lam=1.25)
    lam = 1.25
    loss, _, _ = grad_of(exopd, logits, b, lam=lam)
    lp_y = torch.log_softmax(logits.double(), -1)[torch.arange(N), b["token_id"]]
    adv = lam * b["teacher_logprob"] + (1 - lam) * b["ref_logprob"] - lp_y
    close(loss, (b["weight"] * -adv * lp_y).sum())


# ------------------------------------------------------------------------ top-K divergences


def test_topk_fkl_full_support_equals_dense_forward_kl():
    logits, t_lp, b = make()
    w = b["weight"].double()
    loss, grad, _ = grad_of(topk_fkl, logits, b)
    ref = lambda x: (w * kl_rows(t_lp.double(), torch.log_softmax(x, -1))).sum()  # noqa: E731
    close(loss, ref(logits.double()))
    close(grad, dense_grad(ref, logits))
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize("logmass", [-1e-7, -1e-3])
@pytest.mark.parametrize("name", ["topk_fkl", "tropd"])
def test_full_support_with_a_logmass_just_below_zero_equals_dense(name, logmass):
    """K = V with a stored log-mass that is not exactly 0 (a scorer's logaddexp gives ~-1e-7, an
    fp16 fallback more): the tail is empty, so the loss is the dense forward KL, not ~1e31."""
    logits, t_lp, b = make(seed=5)
    b["teacher_topk_logmass"] = torch.full((N,), logmass)
    b["weight"][::3] = 0.0  # masked rows included
    b["teacher_logprob"] = torch.full((N,), -30.0)  # tropd: every token untrusted -> forward KL
    w = b["weight"].double()
    ref = lambda x: (w * kl_rows(t_lp.double(), torch.log_softmax(x, -1))).sum()  # noqa: E731
    loss, grad, m = grad_of(LOSSES[name], logits, b)
    assert abs(float(loss)) < 1e3, float(loss)
    close(loss, ref(logits.double()))
    close(grad, dense_grad(ref, logits))
    assert all(torch.isfinite(v).all() for v in m.values())


def test_padded_full_support_has_no_tail():
    """K = every real column of a padded vocabulary: the padded columns are no tail either."""
    logits, t_lp, b = make(seed=6)
    padded = torch.cat([logits, torch.randn(N, 4)], -1)  # [N, V + 4]
    b["teacher_topk_logmass"] = torch.full((N,), -1e-6)
    w = b["weight"].double()
    ref = (w * kl_rows(t_lp.double(), torch.log_softmax(logits.double(), -1))).sum()
    close(topk_fkl(padded, b, vocab_size=V)[0], ref)


def test_topk_fkl_tail_bucket_and_renormalised():
    k = 5
    logits, t_lp, b = make(k=k, seed=3)
    w, ids = b["weight"].double(), b["teacher_topk_ids"]
    t, s = t_lp.double(), torch.log_softmax(logits.double(), -1)
    in_s = torch.zeros_like(s, dtype=torch.bool).scatter(1, ids, True)

    def bucket(lp):  # (K+1)-way distribution: K ids then the tail
        head = lp.gather(1, ids)
        tail = torch.log(lp.exp().masked_fill(in_s, 0).sum(-1, keepdim=True))
        return torch.cat([head, tail], -1)

    ref = (w * kl_rows(bucket(t), bucket(s))).sum()
    loss, grad, _ = grad_of(topk_fkl, logits, b)
    close(loss, ref)
    ref_fn = lambda x: (w * kl_rows(bucket(t), bucket(torch.log_softmax(x, -1)))).sum()  # noqa: E731
    close(grad, dense_grad(ref_fn, logits))
    loss_nt, _, _ = grad_of(topk_fkl, logits, b, tail_bucket=False)
    close(loss_nt, (w * xlogy_kl(restrict(t, ids), restrict(s, ids))).sum())


def test_topk_rkl_full_support_equals_dense_reverse_kl():
    logits, t_lp, b = make(seed=4)
    w = b["weight"].double()
    ref = lambda x: (w * kl_rows(torch.log_softmax(x, -1), t_lp.double())).sum()  # noqa: E731
    loss, grad, _ = grad_of(topk_rkl, logits, b, form="biased")
    close(loss, ref(logits.double()))
    close(grad, dense_grad(ref, logits))


@pytest.mark.parametrize("support", ["teacher", "behavior"])
def test_topk_rkl_forms(support):
    logits, t_lp, b = make(k=6, seed=5)
    w = b["weight"].double()
    ids = b["teacher_topk_ids"] if support == "teacher" else b["behavior_topk_ids"]
    s, t = torch.log_softmax(logits.double(), -1), t_lp.double()
    kl = xlogy_kl(restrict(s, ids), restrict(t, ids))
    lb, gb, mb = grad_of(topk_rkl, logits, b, support=support, form="biased")
    ls, gs, ms = grad_of(topk_rkl, logits, b, support=support, form="stopgrad")
    close(lb, (w * kl).sum())
    close(ms["kl"], (w * kl).sum())
    # renormalised on the same support, both forms have the same gradient (documented)
    close(gs, gb)
    # stop-gradient surrogate value: −Σ_S sg(p̃_θ (log p̃_T − log p̃_θ)) · log p̃_θ
    sk = torch.log_softmax(s.gather(1, ids), -1)
    tk = torch.log_softmax(t.gather(1, ids), -1)
    sg_val = (w * -(sk.exp() * (tk - sk) * sk).sum(-1)).sum()
    close(ls, sg_val)
    # unnormalised (METHODS.md) forms differ in gradient
    _, gbu, _ = grad_of(topk_rkl, logits, b, support=support, form="biased", renormalize=False)
    _, gsu, _ = grad_of(topk_rkl, logits, b, support=support, form="stopgrad", renormalize=False)
    assert not torch.allclose(gbu, gsu, atol=1e-4)
    s_k, t_k = s.gather(1, ids), t.gather(1, ids)

    def ref_u(x):  # −Σ_S sg(p̃_θ (log p_T − log p_θ)) · log p_θ, full-vocab logs
        lp = torch.log_softmax(x, -1).gather(1, ids)
        coef = (torch.softmax(s_k, -1) * (t_k - s_k)).detach()
        return (w * -(coef * lp).sum(-1)).sum()

    close(gsu, dense_grad(ref_u, logits))

    def ref_bu(x):  # truncated Σ_S p_θ (log p_θ − log p_T)
        lp = torch.log_softmax(x, -1).gather(1, ids)
        return (w * (lp.exp() * (lp - t_k)).sum(-1)).sum()

    close(gbu, dense_grad(ref_bu, logits))


def dense_jsd(log_s, log_t, beta):
    """Independent generalised JSD: mixture in probability space."""
    m = torch.log(beta * log_t.exp() + (1 - beta) * log_s.exp())
    return beta * kl_rows(log_t, m) + (1 - beta) * kl_rows(log_s, m)


def test_gkd_jsd_endpoints_and_interior():
    logits, t_lp, b = make(seed=6)
    w = b["weight"].double()
    s, t = torch.log_softmax(logits.double(), -1), t_lp.double()
    close(gkd_jsd(logits, b, beta=0.0)[0], (w * kl_rows(t, s)).sum())  # forward
    close(gkd_jsd(logits, b, beta=1.0)[0], (w * kl_rows(s, t)).sum())  # reverse
    for beta in (0.3, 0.5, 0.9):
        ref = lambda x, beta=beta: (w * dense_jsd(torch.log_softmax(x, -1), t, beta)).sum()  # noqa: E731
        loss, grad, _ = grad_of(gkd_jsd, logits, b, beta=beta)
        close(loss, ref(logits.double()))
        close(grad, dense_grad(ref, logits))
    # the direction convention: JSD_β/β → forward KL as β → 0
    small = 1e-4
    limit = gkd_jsd(logits, b, beta=small)[0].double() / small
    torch.testing.assert_close(limit, (w * kl_rows(t, s)).sum(), rtol=1e-2, atol=0)


def test_gkd_jsd_topk_renormalised():
    logits, t_lp, b = make(k=7, seed=7)
    ids, w = b["teacher_topk_ids"], b["weight"].double()
    s, t = torch.log_softmax(logits.double(), -1).gather(1, ids), t_lp.double().gather(1, ids)
    s, t = torch.log_softmax(s, -1), torch.log_softmax(t, -1)
    close(gkd_jsd(logits, b, beta=0.5)[0], (w * dense_jsd(s, t, 0.5)).sum())


def test_sft_is_cross_entropy():
    logits, _, b = make(seed=8)
    ce = torch.nn.functional.cross_entropy(logits.double(), b["token_id"], reduction="none")
    close(sft(logits, b)[0], (b["weight"] * ce).sum())


# ------------------------------------------------------------------------------- TrOPD


def test_tropd_routes_tokens():
    k = 5
    logits, _, b = make(k=k, n=6, seed=9)
    b = dict(b)
    lp_y = torch.log_softmax(logits, -1)[torch.arange(6), b["token_id"]]
    # r = t − lp: token 0 trusted (r=0.2), 1 untrusted (r=−3 < log .5), 2 trusted at the edge
    # (r = log .5 + 1e-3), 3 untrusted; 4, 5 teacher-prefix (segment 1) with any r
    r = torch.tensor([0.2, -3.0, math.log(0.5) + 1e-3, -0.9, -5.0, 2.0])
    b["teacher_logprob"] = lp_y + r
    b["segment"] = torch.tensor([0, 0, 0, 0, 1, 1], dtype=torch.uint8)

    def per_token(fn, i, **kw):
        row = {key: v[i : i + 1] for key, v in b.items()}
        return fn(logits[i : i + 1], row, **kw)[0]

    k1 = [per_token(opd_k1, i) for i in range(6)]
    fkl = [per_token(topk_fkl, i) for i in range(6)]
    lp = lp_y.double()
    w = b["weight"]
    clipped = [w[i] * -max(float(r[i]), math.log(0.5)) * lp[i] for i in range(6)]
    expect = {
        "fkl": [k1[0], fkl[1], k1[2], fkl[3], fkl[4], fkl[5]],
        "mask": [k1[0], 0.0, k1[2], 0.0, fkl[4], fkl[5]],
        "clip": [k1[0], clipped[1], k1[2], clipped[3], fkl[4], fkl[5]],
    }
    for outlier, parts in expect.items():
        loss, m = tropd(logits, b, tau=0.5, outlier=outlier)
        close(loss, sum(float(x) for x in parts), atol=1e-4)
        close(m["trusted"], w[0] + w[2])
        close(m["untrusted"], w[1] + w[3])
        close(m["guide"], w[4] + w[5])
    # metrics only count on-policy tokens for the reward
    close(tropd(logits, b)[1]["reward"], (w[:4] * r[:4]).sum(), atol=1e-5)


# ------------------------------------------------------- weights, chunks, padding, composition

ALL = [
    ("opd_k1", {}),
    ("opd_k1", {"is_clip": 2.0}),
    ("vopd", {}),
    ("vopd", {"support": "behavior"}),
    ("exopd", {}),
    ("topk_fkl", {}),
    ("topk_fkl", {"tail_bucket": False}),
    ("topk_rkl", {"form": "biased"}),
    ("topk_rkl", {"form": "stopgrad", "support": "behavior"}),
    ("gkd_jsd", {"beta": 0.5}),
    ("tropd", {}),
    ("sft", {}),
    ("chunk_opd", {}),
    ("mapped_topk_fkl", {}),
    ("uld", {}),
    ("uld", {"k": 3}),
]


def test_registry_complete():
    assert set(LOSSES) == {
        "opd_k1",
        "vopd",
        "exopd",
        "topk_fkl",
        "topk_rkl",
        "gkd_jsd",
        "tropd",
        "sft",
        "chunk_opd",
        "mapped_topk_fkl",
        "uld",
    }


@pytest.mark.parametrize("name,kw", ALL)
def test_zero_weight_excluded_and_linear_in_w(name, kw):
    fn = LOSSES[name]
    logits, _, b = make(k=6, seed=10)
    b = dict(b)
    b["segment"] = torch.tensor([0, 1] * (N // 2), dtype=torch.uint8)
    excluded = torch.arange(N) % 3 == 0
    w1 = b["weight"].masked_fill(excluded, 0.0)
    poisoned = dict(b, weight=w1)
    # unscored / padded rows: NaN log-probs and id -1 must not leak through w = 0
    for key in (
        "teacher_logprob",
        "behavior_logprob",
        "ref_logprob",
        "teacher_topk_logprobs",
        "teacher_chunk_logprob",
        "teacher_mapped_logprobs",
        "teacher_sorted_probs",
    ):
        poisoned[key] = b[key].masked_fill(excluded.view(-1, *[1] * (b[key].ndim - 1)), math.nan)
    poisoned["token_id"] = b["token_id"].masked_fill(excluded, -1)
    poisoned["teacher_topk_ids"] = b["teacher_topk_ids"].masked_fill(excluded[:, None], -1)
    poisoned["teacher_mapped_ids"] = b["teacher_mapped_ids"].masked_fill(excluded[:, None], -1)
    loss_p, grad_p, _ = grad_of(fn, logits, poisoned, **kw)
    kept = {key: v[~excluded] for key, v in b.items()}
    loss_k, grad_k, _ = grad_of(fn, logits[~excluded], dict(kept, weight=w1[~excluded]), **kw)
    close(loss_p, loss_k)
    assert torch.isfinite(grad_p).all() and (grad_p[excluded] == 0).all()
    close(grad_p[~excluded], grad_k)
    # linearity: L(a·w1 + c·w2) = a·L(w1) + c·L(w2)
    w2 = torch.rand(N, generator=torch.Generator().manual_seed(11))
    la = fn(logits, dict(b, weight=w1), **kw)[0]
    lb = fn(logits, dict(b, weight=w2), **kw)[0]
    lab = fn(logits, dict(b, weight=2.0 * w1 + 0.5 * w2), **kw)[0]
    close(lab, 2.0 * la + 0.5 * lb, atol=1e-4)


@pytest.mark.parametrize("name,kw", ALL)
def test_chunks_sum_to_one_call(name, kw):
    fn = LOSSES[name]
    logits, _, b = make(k=6, seed=12)
    b = dict(b, segment=torch.tensor([0, 0, 1] * (N // 3), dtype=torch.uint8))
    whole, g_whole, m_whole = grad_of(fn, logits, b, **kw)
    x = logits.clone().requires_grad_(True)
    total, metrics = 0.0, {}
    for sl in (slice(0, 5), slice(5, N)):
        loss, m = fn(x[sl], {key: v[sl] for key, v in b.items()}, **kw)
        loss.backward()
        total = total + loss.detach()
        for key, v in m.items():
            metrics[key] = metrics.get(key, 0.0) + v if not key.endswith("_max") else v
    close(total, whole)
    close(x.grad, g_whole)
    for key, v in m_whole.items():
        if not key.endswith("_max"):
            close(metrics[key], v, atol=1e-4)


@pytest.mark.parametrize("name,kw", ALL)
def test_padded_vocab_columns_ignored(name, kw):
    fn = LOSSES[name]
    logits, _, b = make(k=6, seed=13)
    padded = torch.cat([logits, torch.full((N, 4), 50.0)], -1)  # 4 padded head rows, huge logits
    l0, g0, _ = grad_of(fn, logits, b, vocab_size=V, **kw)
    l1, g1, _ = grad_of(fn, padded, b, vocab_size=V, **kw)
    close(l1, l0)
    close(g1[:, :V], g0)
    assert (g1[:, V:] == 0).all()


def test_temperature_scales_student():
    logits, _, b = make(seed=14)
    close(sft(logits, b, temperature=2.0)[0], sft(logits / 2.0, b)[0])


def test_combined_loss_is_weighted_sum():
    logits, _, b = make(k=6, seed=15)
    terms = [("opd_k1", 1.0, {}), ("topk_fkl", 0.5, {}), ("topk_fkl", 0.1, {"tail_bucket": False})]
    total, m = combined_loss(logits, b, terms, vocab_size=V)
    parts = [LOSSES[n](logits, b, **kw)[0] * c for n, c, kw in terms]
    close(total, sum(parts))
    assert {"tokens", "reward", "loss", "opd_k1/loss", "topk_fkl#1/loss", "topk_fkl#2/loss"} <= set(
        m
    )
    avg = average_metrics({k: float(v) for k, v in m.items()})
    close(avg["reward"], float(m["reward"]) / float(m["tokens_onpolicy"]))
    close(avg["opd_k1/loss"], float(m["opd_k1/loss"]) / float(m["tokens"]))
    assert avg["tokens"] == float(m["tokens"])


# ------------------------------------------------------- teachers of another tokenizer


def test_chunk_opd_one_token_chunks_is_opd_k1_exactly():
    logits, _, b = make(seed=20)
    one = dict(b, chunk_index=torch.arange(N), teacher_chunk_logprob=b["teacher_logprob"])
    l0, g0, _ = grad_of(opd_k1, logits, b)
    l1, g1, _ = grad_of(chunk_opd, logits, one)
    assert torch.equal(l0, l1) and torch.equal(g0, g1)


def test_chunk_opd_dense_reference():
    logits, _, b = make(seed=21)
    b["weight"][[0, 7, 8]] = 0.0  # chunk 0 and the chunk of rows 7, 8 dropped whole
    w, y, c = b["weight"].double(), b["token_id"], b["chunk_index"]
    loss, grad, m = grad_of(chunk_opd, logits, b)
    s_lp = torch.log_softmax(logits.double(), -1)
    lp_y = s_lp[torch.arange(N), y]
    s_chunk = torch.stack([lp_y[(c == c[i]) & (w > 0)].sum() for i in range(N)])  # [N]
    adv = b["teacher_chunk_logprob"].double() - s_chunk
    close(loss, (w * -adv * lp_y).sum())
    close(m["chunk_reward"], (w * adv).sum())
    onehot = torch.nn.functional.one_hot(y, V).double()
    close(grad, -(w * adv)[:, None] * (onehot - s_lp.exp()))
    # a chunk's tokens together: −A_c · log π_θ(chunk), the REINFORCE estimate on the chunk
    chunk_total = sum(float((w * -adv * lp_y)[c == j].sum()) for j in range(int(c.max()) + 1))
    close(loss, chunk_total)


def dense_mapped_fkl(x, t_lp, ids, valid):
    """(V+1)-way reference: teacher head on the mapped student columns, everything else in a bucket.

    t_lp [N, K] the teacher's top-K log-probs, ids [N, K] their student ids (valid [N, K] where
    mapped): the teacher's mass is spread densely over student columns, 1 − Σ falls in the bucket.
    """
    s = torch.log_softmax(x, -1)  # [N, V]
    n, v = s.shape
    head_t = torch.zeros(n, v, dtype=s.dtype)  # [N, V]
    head_t = head_t.scatter_add(1, ids.clamp(min=0), torch.where(valid, t_lp.exp(), 0.0))
    in_m = torch.zeros(n, v).scatter_add(1, ids.clamp(min=0), valid.float()) > 0  # dup-safe
    head_s = torch.where(in_m, s.exp(), 0.0)
    tail_t = (1 - head_t.sum(-1, keepdim=True)).clamp(min=0)
    tail_s = torch.where(in_m, 0.0, s.exp()).sum(-1, keepdim=True)
    p = torch.cat([head_t, tail_t], -1)
    q = torch.cat([torch.where(in_m, head_s, 1.0), tail_s], -1)
    return torch.where(p > 0, p * (torch.log(p.clamp(min=1e-300)) - torch.log(q)), 0.0).sum(-1)


def test_mapped_topk_fkl_everything_mapped_is_topk_fkl_exactly():
    logits, _, b = make(k=5, seed=22)
    full = dict(
        b,
        teacher_mapped_ids=b["teacher_topk_ids"],
        teacher_mapped_logprobs=b["teacher_topk_logprobs"],
        teacher_mapped_logmass=b["teacher_topk_logmass"],
    )
    l0, g0, _ = grad_of(topk_fkl, logits, b)
    l1, g1, _ = grad_of(mapped_topk_fkl, logits, full)
    assert torch.equal(l0, l1) and torch.equal(g0, g1)


def test_mapped_topk_fkl_nothing_mapped_is_zero():
    logits, _, b = make(k=5, seed=23)
    none = dict(b, teacher_mapped_ids=torch.full_like(b["teacher_topk_ids"], -1))
    loss, grad, m = grad_of(mapped_topk_fkl, logits, none)
    assert float(loss) == 0.0 and (grad == 0).all() and float(m["mapped_mass"]) == 0.0


@pytest.mark.parametrize("k", [5, V])
def test_mapped_topk_fkl_dense_reference(k):
    logits, t_lp, b = make(k=k, seed=24)
    b["weight"][::4] = 0.0  # masked rows
    w = b["weight"].double()
    ids, valid = b["teacher_mapped_ids"], b["teacher_mapped_ids"] >= 0
    t_head = b["teacher_topk_logprobs"].double()
    ref = lambda x: (w * dense_mapped_fkl(x, t_head, ids, valid)).sum()  # noqa: E731
    loss, grad, m = grad_of(mapped_topk_fkl, logits, b)
    close(loss, ref(logits.double()))
    close(grad, dense_grad(ref, logits))
    mass = torch.where(valid, t_head.exp(), 0.0).sum(-1)
    close(m["mapped_mass"], (w * mass).sum())


def test_mapped_topk_fkl_full_vocabulary_all_mapped_is_dense_fkl():
    """K = V and every id mapped (a permuted vocabulary, mapped back): the dense forward KL."""
    logits, t_lp, b = make(seed=25)
    b = dict(b, teacher_mapped_ids=b["teacher_topk_ids"])
    b["teacher_mapped_logprobs"] = b["teacher_topk_logprobs"]
    w = b["weight"].double()
    ref = lambda x: (w * kl_rows(t_lp.double(), torch.log_softmax(x, -1))).sum()  # noqa: E731
    loss, grad, _ = grad_of(mapped_topk_fkl, logits, b)
    close(loss, ref(logits.double()))
    close(grad, dense_grad(ref, logits))


def dense_uld(x, t_probs, k=None):
    """Sorted-probability L1 with zero padding (the ULD paper's distance), dense, float64."""
    s = torch.softmax(x, -1).sort(-1, descending=True).values  # [N, V]
    if k is not None:
        s = s[:, :k]
    n = max(s.shape[1], t_probs.shape[1])
    s = torch.nn.functional.pad(s, (0, n - s.shape[1]))
    t = torch.nn.functional.pad(t_probs, (0, n - t_probs.shape[1]))
    return (s - t).abs().sum(-1)


@pytest.mark.parametrize("v_t", [V - 6, V, V + 7])
def test_uld_full_vocabularies_dense_reference(v_t):
    """Teacher vocabulary of another size, K = every id on both sides: ULD's full distance."""
    logits, _, b = make(seed=26)
    g = torch.Generator().manual_seed(27)
    t_full = torch.softmax(torch.randn(N, v_t, generator=g) * 2, -1)  # [N, V_T]
    b["teacher_sorted_probs"] = t_full.sort(-1, descending=True).values
    b["weight"][1] = 0.0
    w = b["weight"].double()
    k = max(V, v_t)
    ref = lambda x: (w * dense_uld(x, b["teacher_sorted_probs"].double())).sum()  # noqa: E731
    loss, grad, _ = grad_of(uld, logits, b, k=k)
    close(loss, ref(logits.double()))
    close(grad, dense_grad(ref, logits))


def test_uld_topk_truncated_and_identity_is_zero():
    logits, _, b = make(k=6, seed=28)
    w = b["weight"].double()
    t = b["teacher_sorted_probs"].double()  # [N, 6]
    close(uld(logits, b)[0], (w * dense_uld(logits.double(), t, k=6)).sum())
    close(uld(logits, b, k=3)[0], (w * dense_uld(logits.double(), t, k=3)).sum())
    ref = lambda x: (w * dense_uld(x, t, k=3)).sum()  # noqa: E731
    close(grad_of(uld, logits, b, k=3)[1], dense_grad(ref, logits))  # top-3 only get gradient
    # the student's own sorted probabilities as the teacher's: zero distance, whatever the ids
    own = torch.softmax(logits, -1).sort(-1, descending=True).values
    # to fp32 rounding: the loss's probabilities come from the fused in-place log-softmax, not
    # torch.softmax (a few ulp on each of the N x 20 entries)
    close(uld(logits, dict(b, teacher_sorted_probs=own))[0], 0.0, atol=1e-5)


# --------------------------------------------------------------- the fused (low-memory) path
FUSED_CASES = [
    ("opd_k1", {"is_clip": 2.0}),
    ("vopd", {"support": "behavior"}),
    ("exopd", {}),
    ("topk_fkl", {}),
    ("topk_fkl", {"tail_bucket": False}),
    ("topk_rkl", {"form": "stopgrad", "renormalize": False}),
    ("gkd_jsd", {"beta": 0.3}),
    ("tropd", {"tau": 0.9}),
    ("sft", {}),
    ("chunk_opd", {}),
    ("mapped_topk_fkl", {}),
    ("uld", {}),
    ("uld", {"k": 3}),
]


@pytest.mark.parametrize("k", [5, V])
@pytest.mark.parametrize("name,kw", FUSED_CASES)
def test_fused_path_equals_the_dense_autograd_path(name, kw, k):
    """The fused path (in-place log-softmax, one gather, tails by row block, the gradient built
    in one buffer) against the plain autograd path: value, metrics and gradient, at a loss
    temperature, with padded vocabulary columns, excluded rows, and K = V."""
    from stages.lib.losses import TAIL_SETS, prepare

    student, _, batch = make(k=k, seed=7)
    batch["weight"][::4] = 0.0
    batch["segment"][1::3] = 1
    logits = torch.cat([student, torch.randn(N, 3)], dim=1)  # 3 padded columns
    tails = (TAIL_SETS[name],) if name in TAIL_SETS else ()
    topk = kw.get("k", batch["teacher_sorted_probs"].shape[1]) if name == "uld" else 0

    def run(dense: bool):
        x = logits.clone().requires_grad_(True)
        p = prepare(x, batch, V, 0.7, tails=tails, topk=topk, dense=dense)
        loss, m = LOSSES[name](p, batch, **kw)
        loss.backward()
        return loss.detach(), x.grad, m

    got, g_got, m_got = run(False)
    ref, g_ref, m_ref = run(True)
    close(got, ref)
    close(g_got, g_ref)
    assert torch.all(g_got[:, V:] == 0)  # padded columns get no gradient
    for key in m_ref:
        close(m_got[key], m_ref[key])


@pytest.mark.parametrize("name,kw", [("topk_fkl", {}), ("mapped_topk_fkl", {}), ("uld", {})])
def test_fused_path_over_several_row_blocks(monkeypatch, name, kw):
    """Row blocks of 5 rows over N = 12 (5, 5, 2): the same loss and gradient as the dense
    autograd path (at V = 20 one block holds every row, so the loop is forced here)."""
    from stages.lib import losses
    from stages.lib.losses import fused

    monkeypatch.setattr(fused, "ROW_ELEMS", 5 * (V + 3))
    assert losses.row_block(V + 3) == 5
    student, _, batch = make(k=6, seed=11)
    batch["weight"][::5] = 0.0
    logits = torch.cat([student, torch.randn(N, 3)], dim=1)  # 3 padded columns
    got = []
    for dense in (False, True):
        x = logits.clone().requires_grad_(True)
        tails = (losses.TAIL_SETS[name],) if name in losses.TAIL_SETS else ()
        topk = 6 if name == "uld" else 0
        p = losses.prepare(x, batch, V, 1.4, tails=tails, topk=topk, dense=dense)
        loss, _ = LOSSES[name](p, batch, **kw)
        loss.backward()
        got.append((loss.detach(), x.grad))
    close(got[0][0], got[1][0])
    close(got[0][1], got[1][1])


def test_combined_inplace_overwrites_logits_and_keeps_the_gradient():
    """``inplace=True`` (the trainer's head output): same loss and gradient; the logits tensor
    itself holds the log-softmax after the forward and its own gradient after the backward (the
    call's one [N, V] block), and a second backward through it is refused."""
    student, _, batch = make(k=6, seed=3)
    terms = [
        ("tropd", 1.0, {}),
        ("topk_fkl", 0.5, {}),
        ("mapped_topk_fkl", 0.1, {}),
        ("uld", 0.2, {}),
    ]
    w = torch.randn(8, V, requires_grad=True)
    h = torch.randn(N, 8)
    grads = []
    for inplace in (False, True):
        w.grad = None
        logits = h @ w  # [N, V] not a leaf: may be overwritten
        logits.retain_grad()
        loss, _ = combined_loss(logits, batch, terms, V, 1.3, inplace=inplace)
        if inplace:
            close(logits.detach(), torch.log_softmax((h @ w).detach() / 1.3, -1))
        loss.backward(retain_graph=True)
        grads.append((loss.detach(), w.grad.clone(), logits.grad.clone()))
        if inplace:
            close(logits.detach(), grads[0][2])  # the buffer became dL/dlogits
            with pytest.raises(RuntimeError, match="runs once"):
                loss.backward()
    close(grads[0][0], grads[1][0])
    close(grads[0][1], grads[1][1])
    close(grads[0][2], grads[1][2])
