"""Prefix-shared scoring (``score.share_prefix``, stages/lib/scoring/hf.py ``share_units`` / ``hf_score``,
stages/lib/logprobs.py ``shared_prefix_hidden``): each distinct (model, prefix) runs once and its
responses are scored against its KV cache.

The promise is numerical: the stored values equal the unshared path's (one forward per
``prefix ⊕ response`` row) within 1e-5 nats, with the same top-K ids except where two logits are
within rounding of each other. Checked on random models of two families (Llama, and Qwen2 with
grouped-query attention, q/k/v biases and a padded vocabulary), prefixes of 1 to 60 tokens, ragged
responses of 1 to 30 tokens and groups of 1 to 5 responses, then through the stage.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stages.lib import logprobs as lp
from stages.lib import models
from stages.lib.config import compose
from stages.lib.errors import UserError
from stages.lib.scoring.hf import hf_model, hf_score, share_units
from stages.lib.scoring.plan import Pass, Role
from stages.score import run
from tests.test_score import cfg_for, read_tokens, write_rollouts

TOL = 1e-5  # nats: shared vs unshared, fp32 columns
FP16_TOL = 2e-3  # fp16-stored columns (entropies, teacher log-probs on the behaviour top-K)
TIE = 1e-5  # top-K neighbours closer than this may swap under another summation order

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def qwen2_gqa(vocab: int) -> torch.nn.Module:
    """A random Qwen2 (4 query heads over 2 KV heads, q/k/v biases), vocabulary padded by 6."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(7)
    cfg = Qwen2Config(
        vocab_size=vocab + 6, hidden_size=128, intermediate_size=192, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=False,
    )  # fmt: skip
    model = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(4.0)  # peaked distributions: top-K not degenerate
    return model


def ragged_jobs(vocab: int, seed: int, k: int = 8) -> list[Pass]:
    """Groups of 1-5 responses (1-30 tokens) after prefixes of 1-60 tokens, shuffled."""
    rng = np.random.default_rng(seed)
    role = Role("teacher", "", "float32", "t", k, True)
    jobs = []
    for g, p in enumerate([1, 2, 7, 16, 33, 60, 5]):
        prefix = [2] + rng.integers(4, vocab, p - 1).tolist()
        for i in range(int(rng.integers(1, 6))):
            resp = rng.integers(4, vocab, int(rng.integers(1, 31))).tolist()
            jobs.append(Pass((g, i), role, prefix, resp, k=k, entropy=True))
    order = rng.permutation(len(jobs))
    return [jobs[i] for i in order]


def score(m, jobs: list[Pass], vocab: int, share: bool, batch_tokens: int = 512) -> list[dict]:
    for j in jobs:
        j.result = None
    with torch.inference_mode():
        hf_score(m, jobs, vocab_size=vocab, batch_tokens=batch_tokens, chunk=13, pad_id=0,
                 done={}, behavior_topk=0, share_prefix=share)  # fmt: skip
    return [dict(j.result) for j in jobs]


def assert_same(a: list[dict], b: list[dict]) -> dict:
    """Every float within TOL; top-K ids equal except between neighbours closer than TIE."""
    worst = dict.fromkeys(("logprob", "topk_logprobs", "topk_logmass", "entropy"), 0.0)
    near = clear = 0
    for x, y in zip(a, b, strict=True):
        for name in worst:
            d = float(np.abs(x[name] - y[name]).max())
            assert d <= TOL, (name, d)
            worst[name] = max(worst[name], d)
        gaps = np.abs(np.diff(x["topk_logprobs"], axis=1))  # [R, K-1]
        tie = np.zeros_like(x["topk_ids"], dtype=bool)  # [R, K]
        tie[:, 1:] |= gaps < TIE
        tie[:, :-1] |= gaps < TIE
        assert (x["topk_ids"][~tie] == y["topk_ids"][~tie]).all()
        near, clear = near + int(tie.sum()), clear + int((~tie).sum())
    assert clear > 100 * max(near, 1)  # the id check is not vacuous
    return worst


@pytest.fixture(scope="module")
def two_models(tiny_teacher):
    llama = models.load_model(str(tiny_teacher), "teacher")
    vocab = len(models.load_tokenizer(str(tiny_teacher)))
    return vocab, {"llama": llama, "qwen2_gqa": qwen2_gqa(vocab)}


@pytest.mark.parametrize("family", ["llama", "qwen2_gqa"])
@pytest.mark.parametrize("seed", [0, 1])
def test_shared_scoring_equals_unshared(two_models, family, seed):
    vocab, ms = two_models
    m = hf_model(ms[family], torch.device("cpu"))
    jobs = ragged_jobs(vocab, seed)
    assert share_units(jobs, 512)[0]  # some groups do share
    tokens = []
    hook = m.model.get_input_embeddings().register_forward_hook(
        lambda mod, args, out: tokens.append(args[0].numel())
    )
    try:
        plain = score(m, jobs, vocab, share=False)
        n_plain = sum(tokens)
        tokens.clear()
        shared = score(m, jobs, vocab, share=True)
        n_shared = sum(tokens)
    finally:
        hook.remove()
    assert_same(shared, plain)
    # the prefixes really ran once: fewer tokens through the decoder (padding included; equal
    # counts would mean nothing was shared)
    assert n_shared < n_plain, (n_shared, n_plain)
    for x, j in zip(shared, jobs, strict=True):
        assert x["logprob"].shape == (len(j.response),)


def test_shared_scoring_equals_a_plain_forward(two_models):
    """Against the model's own logits (the score stage's reference), not only the other path."""
    vocab, ms = two_models
    model = ms["qwen2_gqa"]
    jobs = ragged_jobs(vocab, 3)
    got = score(hf_model(model, torch.device("cpu")), jobs, vocab, share=True)
    for x, j in zip(got, jobs, strict=True):
        ids = torch.tensor([j.prefix + j.response])
        with torch.no_grad():
            z = model(ids).logits[0, len(j.prefix) - 1 : -1].float()[:, :vocab]  # [R, V]
        ref = torch.log_softmax(z, -1)
        want = ref.gather(1, torch.tensor(j.response)[:, None]).squeeze(1).numpy()
        assert np.abs(x["logprob"] - want).max() <= TOL


def test_one_token_responses_and_budget_splits(two_models):
    """Responses of one token (no response forward), and a budget so small that groups are split
    across units and some jobs fall back to the unshared path: still the same numbers."""
    vocab, ms = two_models
    m = hf_model(ms["llama"], torch.device("cpu"))
    role = Role("teacher", "", "float32", "t", 4, True)
    rng = np.random.default_rng(5)
    jobs = []
    for g, p in enumerate([3, 40, 90]):
        prefix = rng.integers(4, vocab, p).tolist()
        for i in range(4):
            r = 1 if i < 2 else int(rng.integers(2, 12))
            jobs.append(Pass((g, i), role, prefix, rng.integers(4, vocab, r).tolist(), k=4,
                            entropy=True))  # fmt: skip
    units, single = share_units(jobs, 150)
    shared = {i for u in units for piece in u for i in piece}
    assert {0, 1, 2, 3} <= shared  # the short prefix: one unit
    assert shared & {4, 5, 6, 7} and set(single) & {4, 5, 6, 7}  # a group split by the budget
    assert {8, 9, 10, 11} <= set(single)  # a prefix too long to share two rows within 150
    assert_same(score(m, jobs, vocab, True, 150), score(m, jobs, vocab, False, 150))


def test_share_units_cover_every_job_once_within_budget():
    role = Role("teacher", "", "float32", "t", 1, False)
    rng = np.random.default_rng(0)
    jobs = []
    for g in range(30):
        prefix = [g] + [1] * int(rng.integers(0, 80))  # distinct per group
        for i in range(int(rng.integers(1, 9))):
            jobs.append(Pass((g, i), role, prefix, [1] * int(rng.integers(1, 40))))
    for budget in (64, 300, 2048, 100_000):
        units, single = share_units(jobs, budget)
        seen = sorted([i for u in units for piece in u for i in piece] + single)
        assert seen == list(range(len(jobs)))
        for u in units:
            rows = [i for piece in u for i in piece]
            p = max(len(jobs[i].prefix) for i in rows)
            r = max(len(jobs[i].response) for i in rows)
            assert len(rows) * (p + r) <= budget
            assert any(len(piece) > 1 for piece in u)
            for piece in u:  # one prefix per piece
                assert len({tuple(jobs[i].prefix) for i in piece}) == 1
        where = {i: n for n, u in enumerate(units) for piece in u for i in piece}
        for g in range(30):  # a group that fits one unit is never split (its prefix runs once)
            idx = [i for i, j in enumerate(jobs) if j.key[0] == g]
            p, r = len(jobs[idx[0]].prefix), max(len(jobs[i].response) for i in idx)
            if len(idx) > 1 and len(idx) * (p + r) <= budget:
                assert len({where.get(i, -1) for i in idx}) == 1, (budget, g)
    # room for everything: one unit, and only the groups of one job left unshared
    big_units, big_single = share_units(jobs, 100_000)
    alone = [i for i, j in enumerate(jobs) if sum(x.prefix == j.prefix for x in jobs) == 1]
    assert len(big_units) == 1 and big_single == alone


def test_shared_prefix_hidden_rejects_bad_input(two_models):
    _, ms = two_models
    with pytest.raises(ValueError):
        lp.shared_prefix_hidden(ms["llama"], [[]], [[5]], [0])
    with pytest.raises(ValueError):
        lp.shared_prefix_hidden(ms["llama"], [[5]], [[5], [6]], [0])


def test_stage_shared_equals_unshared(tmp_path, tiny_lm, tiny_teacher):
    """n = 3 samples per prompt, behaviour and reference on, behaviour top-K gathered from the
    teacher: every stored column of ``share_prefix=true`` (the default) equals ``false``'s."""
    out = {}
    for name, extra in (("shared", ()), ("plain", ("score.share_prefix=false",))):
        d = tmp_path / name
        write_rollouts(d, tiny_lm, n_rows=12, rows_per_shard=6, samples=3)
        cfg = cfg_for(d, tiny_lm, tiny_teacher, f"ref.path={tiny_lm}", "score.topk=8",
                      "score.behavior_topk=4", *extra)  # fmt: skip
        res = run(cfg)
        assert res["committed"]
        out[name] = read_tokens(d).to_pydict()
    a, b = out["shared"], out["plain"]
    assert a["sample_id"] == b["sample_id"] and a["token_id"] == b["token_id"]
    for col in ("teacher_logprob", "teacher_topk_logmass", "behavior_logprob", "ref_logprob"):
        np.testing.assert_allclose(a[col], b[col], atol=TOL, rtol=0)
    for col in ("teacher_entropy", "behavior_entropy"):
        np.testing.assert_allclose(a[col], b[col], atol=FP16_TOL, rtol=0)
    ta, tb = np.array(a["teacher_topk_logprobs"]), np.array(b["teacher_topk_logprobs"])
    assert np.abs(ta - tb).max() <= 2**-10 + TOL  # the codec's bound
    np.testing.assert_allclose(
        np.array(a["teacher_logprobs_on_behavior_topk"]),
        np.array(b["teacher_logprobs_on_behavior_topk"]),
        atol=FP16_TOL,
        rtol=0,
    )
    same_ids = np.array(a["teacher_topk_ids"]) == np.array(b["teacher_topk_ids"])
    assert same_ids.mean() > 0.999


def test_share_prefix_must_be_a_bool(tmp_path, tiny_lm, tiny_teacher):
    with pytest.raises(UserError) as e:
        cfg_for(tmp_path, tiny_lm, tiny_teacher, "score.share_prefix=maybe")
    assert "score.share_prefix" in str(e.value)
    cfg = compose("score", [f"run_dir={tmp_path}", f"teacher.path={tiny_teacher}"])
    assert cfg.score.share_prefix is True
