"""Eval stage: accuracy and KL numbers on tiny models, results.json, caching, bad inputs."""

from __future__ import annotations

import json

import pytest
import torch

from stages import eval as eval_stage
from stages.lib import models
from stages.lib.config import compose
from stages.lib.errors import UserError
from tests.conftest import write_prompts


def _cfg(tmp_path, student, teacher, **extra):
    p = write_prompts(tmp_path / "ev.parquet", n=6)
    ov = [
        f"run_dir={tmp_path / 'run'}",
        f"student.path={student}",
        f"teacher.path={teacher}",
        f"+data.eval_sets={{a: {p}}}",
        "eval.max_new_tokens=4",
        "eval.kl_prompts=3",
    ]
    return compose("eval", ov + [f"{k}={v}" for k, v in extra.items()])


def test_eval_writes_results_and_caches(tmp_path, tiny_lm, tiny_teacher):
    cfg = _cfg(tmp_path, tiny_lm, tiny_teacher)
    res = eval_stage.run(cfg)
    assert set(res) == {"base"} and res["base"]["a"]["n"] == 6
    assert 0.0 <= res["base"]["a"]["accuracy"] <= 1.0 and res["base"]["rkl_to_teacher"] > 0
    doc = json.loads((tmp_path / "run" / "eval" / "results.json").read_text())
    assert doc["results"]["base"]["a"]["n"] == 6
    # a self-teacher reading the same prefix as the student: KL is exactly 0
    same = _cfg(tmp_path, tiny_lm, tiny_lm, **{"rollout.teacher_template": "'{prompt}'"})
    assert abs(eval_stage.run(same)["base"]["rkl_to_teacher"]) < 1e-5


def test_reverse_kl_matches_dense(tiny_lm, tiny_teacher):
    s, t = models.load_model(str(tiny_lm)), models.load_model(str(tiny_teacher))
    tok = models.load_tokenizer(str(tiny_lm))
    prefix, resp = [2, 10, 11], [12, 13, 3]
    got = eval_stage.reverse_kl_per_token(s, t, [prefix], [prefix], [resp], len(tok))
    ids = torch.tensor([prefix + resp])
    with torch.no_grad():
        ls = torch.log_softmax(s(ids).logits[0, 2:-1].float(), -1)
        lt = torch.log_softmax(t(ids).logits[0, 2:-1].float(), -1)
    ref = (ls.exp() * (ls - lt)).sum(-1).mean().item()
    assert got == pytest.approx(ref, rel=1e-5)


def test_unknown_eval_set_and_missing_answers(tmp_path, tiny_lm):
    with pytest.raises(UserError, match="no eval sets"):
        eval_stage.run(compose("eval", [f"student.path={tiny_lm}", f"run_dir={tmp_path}"]))
    p = write_prompts(tmp_path / "x.jsonl", n=2)
    rows = [json.loads(line) | {"answer": None} for line in p.read_text().splitlines()]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = compose(
        "eval", [f"student.path={tiny_lm}", f"run_dir={tmp_path}", f"+data.eval_sets={{x: {p}}}"]
    )
    with pytest.raises(UserError, match="without an answer"):
        eval_stage.run(cfg)
