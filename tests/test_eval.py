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


def test_eval_writes_results_and_caches(tmp_path, tiny_lm, tiny_teacher, capsys):
    cfg = _cfg(tmp_path, tiny_lm, tiny_teacher)
    res = eval_stage.run(cfg)
    # stdout is no TTY under capsys: a progress line per 30 s and at the end, then the result line
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("[eval] 1/1 checkpoints (100%)"), out
    assert out[-1].startswith("[eval] wrote "), out
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


def _gens(run_dir, ckpt: str, set_name: str = "a") -> list[dict]:
    import pyarrow.parquet as pq

    path = run_dir / "eval" / "generations" / ckpt / f"{set_name}.parquet"
    t = pq.read_table(path)
    assert t.schema.equals(eval_stage.GENERATIONS_SCHEMA)
    return t.to_pylist()


def test_generations_saved_per_prompt_and_round_trip(tmp_path, tiny_lm, tiny_teacher):
    from data_schemas import prompts as prompts_schema
    from stages.lib.grading import answer_matches

    cfg = _cfg(tmp_path, tiny_lm, tiny_teacher, **{"eval.match": "contains"})
    res = eval_stage.run(cfg)
    tok = models.load_tokenizer(str(tiny_lm))
    rows = prompts_schema.read(str(tmp_path / "ev.parquet")).to_pylist()
    gens = _gens(tmp_path / "run", "base")
    assert [g["prompt_id"] for g in gens] == [r["id"] for r in rows]
    for g, r in zip(gens, rows, strict=True):
        assert g["prompt_ids"] == tok(r["prompt"])["input_ids"]  # the rollout's student prefix
        assert g["response"] == tok.decode(g["response_ids"], skip_special_tokens=True)
        assert 1 <= len(g["response_ids"]) <= 4 and g["finish_reason"] in ("eos", "length")
        assert g["correct"] == answer_matches(g["response"], r["answer"], "contains")
    assert res["base"]["a"]["correct"] == sum(g["correct"] for g in gens)


def test_match_rule_is_configurable(tmp_path, tiny_lm, tiny_teacher):
    import pyarrow.parquet as pq

    p = write_prompts(tmp_path / "ev.parquet", n=6)
    t = pq.read_table(p)
    pq.write_table(t.set_column(t.schema.get_field_index("answer"), "answer", [["."] * 6]), p)
    ov = [f"run_dir={tmp_path / 'run'}", f"student.path={tiny_lm}", f"+data.eval_sets={{a: {p}}}"]
    ov += ["eval.max_new_tokens=4"]
    regex = eval_stage.run(compose("eval", ov + ["eval.match=regex"]))["base"]["a"]
    exact = eval_stage.run(compose("eval", ov + ["eval.match=exact"]))["base"]["a"]
    assert regex["accuracy"] == 1.0  # "." matches any non-empty response
    assert exact["accuracy"] < 1.0
    with pytest.raises(UserError, match="eval.match"):
        compose("eval", ov + ["eval.match=fuzzy"])


def test_pad_less_tokenizer(tmp_path, tiny_lm, tiny_teacher):
    import shutil

    from transformers import AutoTokenizer

    m = tmp_path / "nopad"
    shutil.copytree(tiny_lm, m)
    tok = AutoTokenizer.from_pretrained(m)
    tok.pad_token = None
    tok.save_pretrained(m)
    assert AutoTokenizer.from_pretrained(m).pad_token_id is None
    res = eval_stage.run(_cfg(tmp_path, m, tiny_teacher))
    assert res["base"]["a"]["n"] == 6 and len(_gens(tmp_path / "run", "base")) == 6


def test_adapter_only_checkpoint(tmp_path, tiny_lm, tiny_teacher):
    from peft import LoraConfig, get_peft_model

    base = models.load_model(str(tiny_lm))
    torch.manual_seed(0)
    lora = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():  # B starts at zero: make the adapter change the model
        for n, p in lora.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    final = tmp_path / "run" / "checkpoints" / "lora" / "final"
    lora.save_pretrained(final)  # adapter files only, as train.lora.save_merged=false writes
    assert not (final / "config.json").exists()
    merged = tmp_path / "merged"
    lora.merge_and_unload().save_pretrained(merged)
    models.load_tokenizer(str(tiny_lm)).save_pretrained(merged)
    cfg = _cfg(tmp_path, tiny_lm, tiny_teacher, **{"eval.checkpoints": f"[lora,{merged}]"})
    res = eval_stage.run(cfg)
    assert set(res) == {"lora", "merged"}
    assert res["lora"]["a"] == res["merged"]["a"]
    ids = lambda name: [g["response_ids"] for g in _gens(tmp_path / "run", name)]  # noqa: E731
    assert ids("lora") == ids("merged")


def test_pass_at_k_uses_the_shared_sampler(tmp_path, tiny_lm, tiny_teacher):
    cfg = _cfg(tmp_path, tiny_lm, tiny_teacher, **{"eval.pass_k": 2, "eval.match": "regex"})
    entry = eval_stage.run(cfg)["base"]["a"]
    assert 0.0 <= entry["pass@2"] <= 1.0


def test_a_prompt_longer_than_the_context_is_one_error(tmp_path, tiny_lm):
    """The rollout's length check, in eval: a 300-token prompt for a 256-position model (or one
    that leaves no room for eval.max_new_tokens) stops before any decoding or output."""
    from data_schemas import prompts as prompts_schema

    long = " ".join(f"w{i % 90}" for i in range(300))
    rows = [
        {"id": "ok", "prompt": "w1 w2", "answer": "w3"},
        {"id": "long", "prompt": long, "answer": "w3"},
    ]
    p = tmp_path / "ev.parquet"
    __import__("pyarrow.parquet", fromlist=["x"]).write_table(
        prompts_schema.from_rows(rows, "t"), p
    )
    cfg = compose("eval", [
        f"run_dir={tmp_path / 'run'}", f"student.path={tiny_lm}", f"+data.eval_sets={{a: {p}}}",
        "eval.max_new_tokens=4",
    ])  # fmt: skip
    with pytest.raises(
        UserError, match="eval prompt 'long' is 30[0-9] tokens long, over the limit of 252"
    ):
        eval_stage.run(cfg)
    assert not (tmp_path / "run" / "eval" / "results.json").exists()
