"""The SFT stage with a teacher of another tokenizer (score.cross_tokenizer=align).

- Identity: a teacher that is the student's weights under a permuted vocabulary answers greedily;
  after the text round trip its answers, prefixes and log-probs in the SFT table equal those of
  the same-tokenizer path (the student itself as teacher); answers with a special token inside
  are the only ones dropped, and counted.
- Hand-built splits: a teacher answer with one teacher token = two student tokens and the reverse
  gives the expected student ids, and the teacher's log-prob of each chunk spread over its
  student tokens (the per-answer sum is the teacher's sequence log-prob).
- Refusals: answers the student's tokenizer cannot spell are dropped and counted; none left is one
  error before any output; the default (refuse) still stops on another tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from stages import sft
from stages.lib import align, models, store, xtok
from stages.lib.config import compose
from stages.lib.errors import UserError
from tests.conftest import WORDS, write_prompts
from tests.test_score_xtok import SPECIALS, pair, save_lm, word_tokenizer  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def sft_cfg(run_dir: Path, student: Path, teacher: Path, prompts: Path, *extra: str):
    return compose(
        "sft",
        [
            f"run_dir={run_dir}",
            f"student.path={student}",
            f"teacher.path={teacher}",
            f"data.prompts={prompts}",
            "sft.enabled=true",
            "sft.epochs=2",
            "sft.temperature=0",
            "rollout.max_new_tokens=5",
            "rollout.backend=hf",
            *extra,
        ],
    )


def selected_rows(run_dir: Path) -> list[dict]:
    d = run_dir / "selected" / "sft"
    m = store.open_committed(d, sft.selected_schema)
    return [r for p in store.shard_paths(d, m) for r in pq.read_table(p).to_pylist()]


def test_permuted_vocabulary_sft_is_the_same_tokenizer_sft(tmp_path, pair):  # noqa: F811
    student, teacher, _ = pair
    prompts = write_prompts(tmp_path / "prompts.parquet", n=6)
    same, cross = tmp_path / "same", tmp_path / "cross"
    sft.run(sft_cfg(same, student, student, prompts))
    sft.run(sft_cfg(cross, student, teacher, prompts, "score.cross_tokenizer=align"))
    m = json.loads((cross / "selected" / "sft" / "_manifest.json").read_text())
    x = m["extra"]["cross_tokenizer"]
    # an answer with a special token inside (the random teacher samples <unk>/<bos>) has no text
    # to carry across: it is dropped and counted; every other answer is the same-tokenizer one
    tok = models.load_tokenizer(str(student))
    a = [
        r
        for r in selected_rows(same)
        if not any(i in tok.all_special_ids for i in r["response_ids"][:-1])
    ]
    b = selected_rows(cross)
    assert x["kept"] == len(a) == len(b) >= 4 and sum(x["refused"].values()) == 6 - len(a)
    assert set(x["refused"]) <= {"special_token"}
    for ra, rb in zip(a, b, strict=True):
        for col in ("sample_id", "train_prompt_ids", "response_ids", "response_len", "weights"):
            assert ra[col] == rb[col], col
        np.testing.assert_allclose(ra["teacher_logprob"], rb["teacher_logprob"], atol=1e-5)
    assert m["fingerprints"]["tokenizer"] == models.tokenizer_fingerprint(
        models.load_tokenizer(str(student))
    )
    # the SFT data itself stays in the teacher's ids (it is the teacher's output)
    raw = store.open_committed(cross / "sft_data", sft.rollouts_schema)
    assert raw["fingerprints"]["tokenizer"] != m["fingerprints"]["tokenizer"]
    assert (cross / "checkpoints" / "sft" / "final" / "config.json").exists()


def _hand_vocabs(tmp_path: Path):
    """Student: w12 -> w1 ##2, w34 whole. Teacher: w12 whole, w34 -> w3 ##4 (other ids too)."""
    base = SPECIALS + [w for w in WORDS if w not in ("w12", "w34")] + ["##2", "##4"]
    s_tok = word_tokenizer({t: i for i, t in enumerate(base + ["w34"])}, wordpiece=True)
    t_tok = word_tokenizer({t: i for i, t in enumerate(["w12"] + base)}, wordpiece=True)
    return s_tok, t_tok


def test_hand_built_splits_convert_and_spread_the_chunk_logprobs(tmp_path):
    s_tok, t_tok = _hand_vocabs(tmp_path)
    t_ids = t_tok("w12 w34 w5", add_special_tokens=False)["input_ids"] + [t_tok.eos_token_id]
    assert t_tok.convert_ids_to_tokens(t_ids) == ["w12", "w3", "##4", "w5", "<eos>"]
    lp = [-1.0, -2.0, -3.0, -4.0, -5.0]  # the teacher's own per-token log-probs
    rows = pa.Table.from_pylist(
        [{"prompt_id": "p0", "response_ids": t_ids, "behavior_logprobs": lp}]
        + [
            {
                "prompt_id": "p1",
                "response_ids": t_ids[:1] + [1] + t_ids[1:],
                "behavior_logprobs": lp,
            }
        ]
    )  # the second holds <unk> inside: a special token has no text to carry across
    table = pa.Table.from_pydict(
        {
            **{c: rows[c] for c in rows.column_names},
            "train_prompt_ids": pa.array([[0], [0]], pa.list_(pa.int32())),
            "response_len": pa.array([5, 6], pa.int32()),
        }
    )
    refused: dict = {}
    v = xtok.Vocabs.of(t_tok, s_tok)
    out = sft.to_student_ids(table, v, {"p0": [2, 7], "p1": [2, 8]}, refused)
    assert out.num_rows == 1 and refused == {"special_token": 1}
    r = out.to_pylist()[0]
    assert s_tok.convert_ids_to_tokens(r["response_ids"]) == ["w1", "##2", "w34", "w5", "<eos>"]
    assert r["train_prompt_ids"] == [2, 7] and r["response_len"] == 5
    # chunks {w12 | w1 ##2}, {w3 ##4 | w34}, {w5}, {<eos>}: -1 split in two, -2 + -3 merged
    np.testing.assert_allclose(r["behavior_logprobs"], [-0.5, -0.5, -5.0, -4.0, -5.0])
    assert sum(r["behavior_logprobs"]) == pytest.approx(sum(lp))


def test_spread_chunks_preserves_every_chunk_sum():
    rng = np.random.default_rng(0)
    offs_a = [(0, 2), (2, 3), (3, 7), (7, 8)]  # a 9-character text, two tokenizations
    offs_b = [(0, 1), (1, 3), (3, 5), (5, 7), (7, 9)]
    offs_a = [*offs_a, (8, 9)]
    ch = align.align_spans(offs_a, offs_b)
    src = rng.normal(size=len(offs_a)).tolist()
    out = sft.spread_chunks(src, ch)
    assert len(out) == len(offs_b)
    for (sa, sb), (ta, tb) in zip(ch.student_range, ch.teacher_range, strict=True):
        assert sum(out[ta:tb]) == pytest.approx(sum(src[sa:sb]))


def test_no_answer_the_student_can_spell_is_one_error_before_output(tmp_path):
    """A teacher that always says "zz", a word the student's vocabulary lacks."""
    s_tok = word_tokenizer({t: i for i, t in enumerate(SPECIALS + WORDS)})
    t_tok = word_tokenizer({t: i for i, t in enumerate(["zz"] + SPECIALS + WORDS)})
    student = save_lm(tmp_path / "student", s_tok)
    teacher = save_lm(tmp_path / "teacher", t_tok)
    m = models.load_model(str(teacher), "teacher")
    with torch.no_grad():  # every logit 0: greedy takes the first id, "zz"
        m.model.norm.weight.zero_()
    m.save_pretrained(teacher)
    prompts = write_prompts(tmp_path / "prompts.parquet", n=3)
    run_dir = tmp_path / "run"
    cfg = sft_cfg(run_dir, student, teacher, prompts, "score.cross_tokenizer=align")
    with pytest.raises(UserError, match=r"round-trips through the student's tokenizer.*roundtrip"):
        sft.run(cfg)
    assert not (run_dir / "selected").exists()
    assert not (run_dir / "checkpoints").exists()


def test_default_still_refuses_a_teacher_of_another_tokenizer(tmp_path, pair):  # noqa: F811
    student, teacher, _ = pair
    prompts = write_prompts(tmp_path / "prompts.parquet", n=2)
    with pytest.raises(UserError, match="tokenizer"):
        sft.run(sft_cfg(tmp_path / "run", student, teacher, prompts))
    assert not (tmp_path / "run" / "sft_data").exists()


def test_answers_that_are_not_utf8_are_refused_not_carried_as_replacement_characters():
    """A byte-level teacher's answer holding a lone byte of a character has no text: the SFT
    text path drops and counts it (reason invalid_utf8) instead of training on U+FFFD; a whole
    character sampled as its byte tokens is text and is kept, spelled by the student."""
    from tests import wild_tokenizers as wt

    t_tok, s_tok = wt.byte_bpe(400), wt.byte_bpe(300)
    byte = {b: i for b, i in align.byte_map(t_tok).byte_ids.items()}
    ok = t_tok("the café", add_special_tokens=False)["input_ids"]
    split = t_tok("the caf", add_special_tokens=False)["input_ids"] + [byte[0xC3], byte[0xA9]]
    lone = t_tok("the ", add_special_tokens=False)["input_ids"] + [byte[0xC3]]
    eos = t_tok.eos_token_id
    rows = [[*ok, eos], [*split, eos], [*lone, eos]]
    table = pa.table({
        "prompt_id": ["p0", "p1", "p2"],
        "response_ids": pa.array(rows, pa.list_(pa.int32())),
        "behavior_logprobs": pa.array([[-1.0] * len(r) for r in rows], pa.list_(pa.float32())),
        "train_prompt_ids": pa.array([[0]] * 3, pa.list_(pa.int32())),
        "response_len": pa.array([len(r) for r in rows], pa.int32()),
    })  # fmt: skip
    refused: dict = {}
    out = sft.to_student_ids(table, xtok.Vocabs.of(t_tok, s_tok), {"p0": [1], "p1": [1]}, refused)
    assert refused == {"invalid_utf8": 1} and out["prompt_id"].to_pylist() == ["p0", "p1"]
    bm = align.byte_map(s_tok)
    for r in out.to_pylist():
        assert bm.spans(r["response_ids"][:-1])[0] == "the café".encode()
        assert r["response_ids"][-1] == s_tok.eos_token_id
