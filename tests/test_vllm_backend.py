"""Parity tests for the vLLM backend (stages/lib/vllm_backend.py) against a fp32 transformers forward.

One engine is shared by the whole module (engine start is ~25-40 s on CPU). The model is a tiny
random Llama with scaled-up output weights so that next-token distributions are peaked (logit std
~3): with a near-uniform distribution the top-K and sampling checks would pass trivially.
Timings are printed (run with ``-s`` to see them).
"""

from __future__ import annotations

import functools
import math
import time
from pathlib import Path

import numpy as np
import pytest

from stages.lib import vllm_backend as vb

_OK, _WHY = vb.vllm_available()
pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(not _OK, reason=f"vLLM not usable here: {_WHY}"),
]

N_WORDS = 124  # + 4 specials = vocab 128
SPECIALS = ["<pad>", "<unk>", "<bos>", "<eos>"]
BOS, EOS = 2, 3
TOL = 1e-3  # nats; fp32 on both sides, measured gap ~1e-5
K = 8
SEED = 1234


def build_tiny_llama(
    path: str, *, seed: int = 0, logit_scale: float = 1.0, head_dim: int = 64
) -> None:
    """Save a tiny random Llama + WordLevel tokenizer to ``path`` (save_pretrained format)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    vocab.update({f"w{i}": len(SPECIALS) + i for i in range(N_WORDS)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<bos>",
        eos_token="<eos>",
    )
    hf_tok.save_pretrained(path)

    cfg = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=128,
        num_attention_heads=128 // head_dim,
        head_dim=head_dim,  # head_dim 16 is unsupported by the vLLM CPU attention kernels
        num_key_value_heads=128 // head_dim,
        intermediate_size=256,
        num_hidden_layers=2,
        max_position_embeddings=256,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=0,
        tie_word_embeddings=False,
        dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        # Random init gives logits with std ~0.1 (near-uniform); scale the head so std is ~3.
        h = torch.randn(4, 16, cfg.hidden_size)
        normed = model.model.norm(h)
        std = model.lm_head(normed).std().item()
        model.lm_head.weight.mul_(3.0 * logit_scale / std)
    model.save_pretrained(path, safe_serialization=True)


@functools.cache
def _hf_model(model_dir: str):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def hf_logprobs(model_dir: str, seqs: list[list[int]]) -> list[np.ndarray]:
    """Full-vocabulary fp32 log_softmax for each sequence: [len-1, V], row t predicts seq[t+1]."""
    import torch

    model = _hf_model(model_dir)
    out = []
    with torch.no_grad():
        for s in seqs:
            logits = model(torch.tensor([s])).logits[0, :-1].float()
            out.append(torch.log_softmax(logits, dim=-1).numpy())
    return out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tiny_llama"))
    build_tiny_llama(path)
    return path


@pytest.fixture(scope="module")
def llm(model_dir):
    t0 = time.perf_counter()
    engine = vb.get_llm(model_dir, seed=SEED, max_model_len=256, max_logprobs=K)
    print(f"\n[vllm] engine start: {time.perf_counter() - t0:.1f} s")
    yield engine
    vb.clear_llm_cache()


def _prompts(n_prompts: int, rng: np.random.Generator) -> list[list[int]]:
    lo = len(SPECIALS)
    return [
        [BOS] + rng.integers(lo, lo + N_WORDS, size=int(rng.integers(3, 12))).tolist()
        for _ in range(n_prompts)
    ]


def test_get_llm_is_cached(llm, model_dir):
    assert vb.get_llm(model_dir, seed=SEED, max_model_len=256, max_logprobs=K) is llm


def test_generate_shapes_reproducible_and_parity(llm, model_dir):
    prompts = _prompts(6, np.random.default_rng(0))
    kw = dict(n=3, temperature=1.0, top_p=1.0, max_new_tokens=24, seed=7, eos_id=EOS)
    t0 = time.perf_counter()
    out = vb.generate(llm, prompts, **kw)
    dt = time.perf_counter() - t0
    ntok = sum(len(s["response_ids"]) for ss in out for s in ss)
    print(f"\n[vllm] generate: {ntok} tokens in {dt:.2f} s = {ntok / dt:.0f} tok/s")

    assert len(out) == len(prompts)
    for samples in out:
        assert len(samples) == 3
        for s in samples:
            ids, lps = s["response_ids"], s["logprobs"]
            assert 1 <= len(ids) <= 24 and len(lps) == len(ids)
            assert all(isinstance(t, int) for t in ids)
            assert all(lp <= 0.0 and math.isfinite(lp) for lp in lps)
            if s["finish_reason"] == "eos":
                assert ids[-1] == EOS and EOS not in ids[:-1]
            else:
                assert s["finish_reason"] == "length"
                assert len(ids) == 24 and EOS not in ids
    # The n samples of a prompt use different seeds, so they should not all coincide.
    assert any(len({tuple(s["response_ids"]) for s in ss}) > 1 for ss in out)

    # Same seed -> same output, also when prompts are submitted again in another batch.
    again = vb.generate(llm, prompts, **kw)
    assert [[s["response_ids"] for s in ss] for ss in again] == [
        [s["response_ids"] for s in ss] for ss in out
    ]
    other = vb.generate(llm, prompts, **{**kw, "seed": 8})
    assert [[s["response_ids"] for s in ss] for ss in other] != [
        [s["response_ids"] for s in ss] for ss in out
    ]

    # Sampled-token log-probs equal a fp32 transformers forward on prompt + response.
    seqs, spans = [], []
    for p, samples in zip(prompts, out, strict=True):
        for s in samples:
            seqs.append(p + s["response_ids"])
            spans.append((len(p), s))
    ref = hf_logprobs(model_dir, seqs)
    gap = 0.0
    for (plen, s), lsm in zip(spans, ref, strict=True):
        ids = s["response_ids"]
        hf = lsm[plen - 1 + np.arange(len(ids)), ids]
        gap = max(gap, float(np.max(np.abs(hf - np.asarray(s["logprobs"])))))
    print(f"[vllm] generate log-prob max |vLLM - HF| = {gap:.2e}")
    assert gap < TOL


def test_generate_raw_logprobs_ignore_temperature(llm, model_dir):
    """Stored log-probs are the raw (temperature-1) distribution even when sampling at T != 1."""
    prompts = _prompts(2, np.random.default_rng(1))
    out = vb.generate(
        llm, prompts, n=2, temperature=0.7, top_p=0.9, max_new_tokens=10, seed=3, eos_id=EOS
    )
    seqs = [p + s["response_ids"] for p, ss in zip(prompts, out, strict=True) for s in ss]
    ref = hf_logprobs(model_dir, seqs)
    i = 0
    for p, ss in zip(prompts, out, strict=True):
        for s in ss:
            ids = s["response_ids"]
            hf = ref[i][len(p) - 1 + np.arange(len(ids)), ids]
            np.testing.assert_allclose(s["logprobs"], hf, atol=TOL, rtol=0)
            i += 1


def test_generate_stops_on_eos(llm):
    """Force EOS to be likely by naming the most probable next token as EOS for one prompt."""
    prompt = [BOS, 10, 11, 12]
    greedy = vb.generate(
        llm, [prompt], n=1, temperature=0.0, top_p=1.0, max_new_tokens=5, seed=0, eos_id=EOS
    )[0][0]
    first = greedy["response_ids"][0]
    out = vb.generate(
        llm, [prompt], n=1, temperature=0.0, top_p=1.0, max_new_tokens=5, seed=0, eos_id=first
    )[0][0]
    assert out["response_ids"] == [first]
    assert out["finish_reason"] == "eos"
    # Several EOS ids: stops on any of them, the stop token is kept.
    out = vb.generate(
        llm,
        [prompt],
        n=1,
        temperature=0.0,
        top_p=1.0,
        max_new_tokens=5,
        seed=0,
        eos_id=[EOS, first],
    )[0][0]
    assert out["response_ids"] == [first] and out["finish_reason"] == "eos"


def test_score_parity_with_transformers(llm, model_dir):
    rng = np.random.default_rng(2)
    prefixes = _prompts(8, rng)
    lo = len(SPECIALS)
    responses = [
        rng.integers(lo, lo + N_WORDS, size=int(rng.integers(1, 30))).tolist() for _ in prefixes
    ]
    responses[0] = responses[0] + [EOS]
    t0 = time.perf_counter()
    got = vb.score(llm, prefixes, responses, k=K)
    dt = time.perf_counter() - t0
    ntok = sum(len(p) + len(r) for p, r in zip(prefixes, responses, strict=True))
    print(f"\n[vllm] score: {ntok} tokens in {dt:.2f} s = {ntok / dt:.0f} tok/s (top-{K})")

    ref = hf_logprobs(model_dir, [p + r for p, r in zip(prefixes, responses, strict=True)])
    gap_lp = gap_topk = 0.0
    for p, r, g, lsm in zip(prefixes, responses, got, ref, strict=True):
        T = len(r)
        rows = lsm[len(p) - 1 : len(p) - 1 + T]  # [T, V]
        assert g["logprob"].shape == (T,) and g["logprob"].dtype == np.float32
        assert g["topk_ids"].shape == (T, K) and g["topk_ids"].dtype == np.int32
        assert g["topk_logprobs"].shape == (T, K) and g["topk_logprobs"].dtype == np.float32
        assert g["topk_logmass"].shape == (T,) and g["entropy"].shape == (T,)
        assert np.isnan(g["entropy"]).all()

        hf_tok = rows[np.arange(T), r]
        gap_lp = max(gap_lp, float(np.abs(hf_tok - g["logprob"]).max()))
        # Sorted descending, and equal to the true top-K log-probs.
        assert (np.diff(g["topk_logprobs"], axis=1) <= 0).all()
        hf_topk = -np.sort(-rows, axis=1)[:, :K]
        gap_topk = max(gap_topk, float(np.abs(hf_topk - g["topk_logprobs"]).max()))
        # The ids' own HF log-probs equal the reported ones; ids are a true top-K up to ties
        # (an id is only allowed if its HF log-prob is >= the K-th largest, within tolerance).
        at_ids = np.take_along_axis(rows, g["topk_ids"].astype(np.int64), axis=1)
        np.testing.assert_allclose(at_ids, g["topk_logprobs"], atol=TOL, rtol=0)
        assert (at_ids >= hf_topk[:, -1:] - TOL).all()
        assert all(len(set(row)) == K for row in g["topk_ids"].tolist())
        mass = np.log(np.exp(hf_topk.astype(np.float64)).sum(axis=1))
        np.testing.assert_allclose(g["topk_logmass"], mass, atol=TOL, rtol=0)
        assert (g["topk_logmass"] <= 1e-6).all()
    print(f"[vllm] score max |vLLM - HF|: token log-prob {gap_lp:.2e}, top-K {gap_topk:.2e}")
    assert gap_lp < TOL and gap_topk < TOL


def test_score_actual_token_outside_topk(llm, model_dir):
    """Responses of least-likely tokens: the prompt log-prob dict then has K+1 entries."""
    prefix = [BOS, 20, 21, 22]
    (lsm,) = hf_logprobs(model_dir, [prefix + [4]])
    worst = int(np.argmin(lsm[len(prefix) - 1]))
    (g,) = vb.score(llm, [prefix], [[worst]], k=K)
    assert worst not in g["topk_ids"][0].tolist()
    np.testing.assert_allclose(g["logprob"][0], lsm[len(prefix) - 1, worst], atol=TOL)
    assert g["logprob"][0] < g["topk_logprobs"][0, -1]


def test_score_empty_response_and_validation(llm):
    (g,) = vb.score(llm, [[BOS, 5]], [[]], k=K)
    assert g["logprob"].shape == (0,) and g["topk_ids"].shape == (0, K)
    with pytest.raises(ValueError):
        vb.score(llm, [[]], [[5]], k=K)


def test_helpers():
    assert isinstance(vb.cuda_available(), bool)
    ok, why = vb.vllm_available()
    assert ok and "vllm" in why


def test_unsupported_head_size_is_one_readable_error(tmp_path):
    """An engine that cannot start (head size 16 on CPU) ends the stage with one error line."""
    import subprocess
    import sys

    from stages.lib.vllm_backend import _on_cpu

    if not _on_cpu():
        pytest.skip("the head-size check is the CPU backend's")
    model = tmp_path / "m16"
    build_tiny_llama(str(model), head_dim=16)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"id": "a", "prompt": "<bos> w1 w2"}\n')
    cmd = [sys.executable, "-m", "stages.rollout", f"run_dir={tmp_path / 'run'}"]
    cmd += [f"student.path={model}", f"data.prompts={prompts}", "rollout.backend=vllm"]
    repo = Path(__file__).resolve().parent.parent
    p = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stderr[-2000:]
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "head size 16" in errors[0] and "Traceback" not in p.stderr
    assert not list((tmp_path / "run").glob("rollouts/bucket=*/*.parquet"))
