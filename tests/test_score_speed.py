"""``score.compile`` (stages/lib/scoring/hf.py ``hf_model``): the compiled decoder and the oneDNN head give the
eager path's numbers to GEMM rounding, and its mistakes are one error each.

The tolerance is stated, not "close": on the benchmark's 134M model the stored log-probs of the
compiled path differ from the eager ones by at most ~4e-6 nats (docs/BENCHMARKS.md, score); here
the bound is 1e-4 nats, the HF backend's own tolerance against a plain recomputation.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from data_schemas import manifest
from stages.lib import logprobs as lp
from stages.lib import models
from stages.lib.config import compose
from stages.lib.errors import UserError
from stages.lib.scoring.hf import hf_model, hf_score
from stages.lib.scoring.plan import Pass, Role
from stages.score import run
from tests.test_score import cfg_for, read_tokens, write_rollouts

TOL = 1e-4  # nats: compiled / oneDNN vs eager / MKL, stored fp32 columns
FP16_TOL = 2e-3  # the fp16-stored top-K log-probs and entropies


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _jobs(vocab: int, seed: int = 0) -> list[Pass]:
    """Rows of different lengths (batches of several rows with padding, and one long row)."""
    rng = np.random.default_rng(seed)
    role = Role("teacher", "", "float32", "t", 8, True)
    out = []
    for i, (p, r) in enumerate([(5, 9), (7, 3), (4, 12), (6, 6), (9, 30)]):
        prefix = [2] + rng.integers(4, vocab, p - 1).tolist()
        out.append(Pass((i,), role, prefix, rng.integers(4, vocab, r).tolist(), k=8, entropy=True))
    return out


def _score(m, jobs, vocab: int) -> list[dict]:
    with torch.inference_mode():
        hf_score(m, jobs, vocab_size=vocab, batch_tokens=64, chunk=7, pad_id=0, done={},
                 behavior_topk=0)  # fmt: skip
    return [dict(j.result) for j in jobs]


def _assert_close(a: list[dict], b: list[dict]) -> float:
    """Every stored float within TOL; top-K ids equal wherever the top-K is not a near tie."""
    worst = 0.0
    for x, y in zip(a, b, strict=True):
        for name in ("logprob", "topk_logprobs", "topk_logmass", "entropy"):
            d = float(np.abs(x[name] - y[name]).max())
            assert d < TOL, (name, d)
            worst = max(worst, d)
        gaps = np.abs(np.diff(x["topk_logprobs"], axis=1)).min(axis=1)  # [R]
        clear = gaps > 10 * TOL
        assert clear.mean() > 0.5  # the check below is not vacuous
        assert (x["topk_ids"][clear] == y["topk_ids"][clear]).all()
    return worst


def test_onednn_head_matches_the_mkl_head(tiny_teacher):
    model = models.load_model(str(tiny_teacher), "teacher")
    vocab = len(models.load_tokenizer(str(tiny_teacher)))
    h = torch.randn(37, model.config.hidden_size)  # [n, H]
    z_mkl = lp.model_head(model)(h)  # [n, V]
    z_dnn = lp.model_head(model, onednn=True)(h)
    assert z_dnn.dtype == torch.float32 and z_dnn.shape == z_mkl.shape
    assert (z_dnn - z_mkl).abs().max() < 1e-4 * z_mkl.abs().max()
    t = torch.randint(4, vocab, (37,))
    a = lp.logits_stats_(z_mkl.clone(), t, 8, vocab)
    b = lp.logits_stats_(z_dnn.clone(), t, 8, vocab)
    assert (a["logprob"] - b["logprob"]).abs().max() < TOL


def test_compiled_scoring_equals_eager_to_gemm_rounding(tiny_teacher):
    """Batches of several padded rows and a batch of one row (a second compile: sizes 0 and 1
    are specialised) through the compiled body and oneDNN head, against eager."""
    model = models.load_model(str(tiny_teacher), "teacher")
    vocab = len(models.load_tokenizer(str(tiny_teacher)))
    eager = _score(hf_model(model, torch.device("cpu")), _jobs(vocab), vocab)
    compiled = _score(hf_model(model, torch.device("cpu"), compiled=True), _jobs(vocab), vocab)
    worst = _assert_close(compiled, eager)
    assert worst < TOL


@pytest.mark.slow  # one more compile (~20 s on a busy 2-core machine)
def test_stage_with_compile_true_equals_the_default_to_tolerance(tmp_path, tiny_lm, tiny_teacher):
    """The key reaches the stage: the same rollouts scored with score.compile=true give the
    default run's rows, ids and floats to TOL, and the manifest records the key."""
    runs = {}
    for name, extra in (("eager", ()), ("compiled", ("score.compile=true",))):
        d = tmp_path / name
        write_rollouts(d, tiny_lm, n_rows=6, rows_per_shard=3)
        cfg = cfg_for(d, tiny_lm, tiny_teacher, "score.behavior=false", "score.topk=8", *extra)
        assert run(cfg)["committed"]
        runs[name] = read_tokens(d)
    a, b = runs["eager"].to_pydict(), runs["compiled"].to_pydict()
    assert a["sample_id"] == b["sample_id"] and a["token_id"] == b["token_id"]
    for col in ("teacher_logprob", "teacher_topk_logmass"):
        np.testing.assert_allclose(a[col], b[col], atol=TOL, rtol=0)
    np.testing.assert_allclose(a["teacher_entropy"], b["teacher_entropy"], atol=FP16_TOL, rtol=0)
    m = json.loads((tmp_path / "compiled" / "tokens" / manifest.FILENAME).read_text())
    assert m["config"]["score"]["compile"] is True


def test_compile_must_be_a_bool(tmp_path, tiny_lm, tiny_teacher):
    with pytest.raises(UserError) as e:
        cfg_for(tmp_path, tiny_lm, tiny_teacher, "score.compile=sometimes")
    assert "score.compile" in str(e.value)


def test_no_cxx_compiler_is_one_user_error(tiny_teacher, tmp_path, monkeypatch):
    """Without g++/clang++ on PATH, TorchInductor would fail at the first forward with a long
    trace; the stage says so before any scoring."""
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory: no compiler on it
    monkeypatch.delenv("CXX", raising=False)
    model = models.load_model(str(tiny_teacher), "teacher")
    with pytest.raises(UserError) as e:
        models.compiled_body(model)
    msg = str(e.value)
    assert "C++ compiler" in msg and "score.compile=false" in msg


def test_default_config_does_not_compile(tmp_path, tiny_lm, tiny_teacher):
    cfg = compose("score", [f"run_dir={tmp_path}", f"teacher.path={tiny_teacher}"])
    assert cfg.score.compile is False
    model = models.load_model(str(tiny_teacher), "teacher")
    assert hf_model(model, torch.device("cpu")).body is None
