"""The score stage with a teacher of another tokenizer (score.cross_tokenizer=align), end to end.

- Identity: a teacher that is the student's weights under a permuted vocabulary (same strings,
  other ids) gives, through the stage, the same-tokenizer path's teacher log-probs, top-K (ids
  mapped back), log-mass and entropy, with one-token chunks and everything mapped.
- Hand-built splits: a student WordPiece vocabulary that splits ``w12`` where the teacher's has it
  whole, and the reverse for ``w34``: the stored chunk ids and chunk log-probs equal a hand
  computation from a plain transformers forward of the teacher on its own ids.
- Refusals: responses whose text the teacher cannot round-trip (or with a special token inside)
  get a negative ``xtok_chunk`` code, are counted in the manifest, and get selection weight 0.
- Errors: the default (refuse) is unchanged; align's own user errors come before any output.
- The same-tokenizer path is byte-identical with ``align`` switched on.
"""

from __future__ import annotations

import functools
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from data_schemas import manifest
from data_schemas import prompts as prompts_schema
from data_schemas import rollouts as rollouts_table
from data_schemas import tokens as tokens_table
from stages.lib import models, rollout_plan, store
from stages.lib.config import compose
from stages.lib.errors import UserError
from stages.score import run
from tests.conftest import WORDS, write_prompts

SPECIALS = ["<pad>", "<unk>", "<bos>", "<eos>"]
TOL = 1e-5


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ----------------------------------------------------------------------------- builders
def word_tokenizer(vocab: dict[str, int], wordpiece: bool = False):
    """A whitespace tokenizer over ``vocab`` (token -> id), BOS added, WordPiece decoder."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers import models as tk_models
    from transformers import PreTrainedTokenizerFast

    model = (
        tk_models.WordPiece(vocab=vocab, unk_token="<unk>")
        if wordpiece
        else tk_models.WordLevel(vocab=vocab, unk_token="<unk>")
    )
    tk = Tokenizer(model)
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    tk.decoder = decoders.WordPiece(prefix="##")
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
        unk_token="<unk>",
    )  # fmt: skip


def save_lm(out: Path, tok, seed: int = 0, weights: dict | None = None, ctx: int = 256) -> Path:
    """A tiny Llama for ``tok`` (random, peaked), or with ``weights`` (a state dict)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=1, num_key_value_heads=1, head_dim=64, max_position_embeddings=ctx,
        tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        if weights is None:
            model.lm_head.weight.mul_(4.0)
        else:
            model.load_state_dict(weights)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(student, permuted teacher, perm): teacher id perm[i] is student id i, weights moved."""
    root = tmp_path_factory.mktemp("xtok_pair")
    order = SPECIALS + WORDS
    s_tok = word_tokenizer({t: i for i, t in enumerate(order)})
    student = save_lm(root / "student", s_tok)
    perm = np.random.default_rng(0).permutation(len(order))
    t_tok = word_tokenizer({t: int(perm[i]) for i, t in enumerate(order)})
    from transformers import AutoModelForCausalLM

    sd = AutoModelForCausalLM.from_pretrained(student).state_dict()
    inv = np.argsort(perm)  # teacher row j holds student row inv[j]
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        sd[name] = sd[name][torch.from_numpy(inv)].clone()
    teacher = save_lm(root / "teacher", t_tok, weights=sd)
    return student, teacher, perm


def write_run(run_dir: Path, student: Path, responses: list[list[int]]) -> Path:
    """prompts.parquet + a committed rollouts table rendered from it with the student's
    tokenizer (as the rollout stage does), one response per prompt."""
    prompts = write_prompts(run_dir.parent / f"{run_dir.name}_prompts.parquet", n=len(responses))
    cfg = compose("score", [f"run_dir={run_dir}", f"student.path={student}"])
    tok = models.load_tokenizer(str(student))
    table = prompts_schema.read(str(prompts))
    items = rollout_plan.build_prompt_ids(tok, table, cfg.rollout, 0)
    rows = [
        {
            "sample_id": f"s{i:03d}", "prompt_id": p.prompt_id, "sample_idx": 0,
            "train_prompt_ids": p.train_ids, "rollout_prompt_ids": p.rollout_ids,
            "teacher_prompt_ids": p.teacher_ids, "response_ids": r,
            "behavior_logprobs": [-1.0] * len(r), "response_len": len(r), "is_guided": p.is_guided,
            "finish_reason": "eos" if r[-1] == tok.eos_token_id else "length", "temperature": 1.0,
            "top_p": 1.0, "answer": None, "kind": None, "correct": None,
        }
        for i, (p, r) in enumerate(zip(items, responses, strict=True))
    ]  # fmt: skip
    with store.open_writer(
        run_dir / "rollouts", rollouts_table, dataset_id="xtok-rollouts", stage="rollout",
        vocab_size=len(tok),
    ) as w:  # fmt: skip
        for s in range(0, len(rows), 4):
            w.write_shard(
                s // 4, pa.Table.from_pylist(rows[s : s + 4], schema=rollouts_table.SCHEMA)
            )
        assert w.commit(
            (len(rows) + 3) // 4,
            config={},
            fingerprints={
                "student": models.model_fingerprint(str(student)),
                "tokenizer": models.tokenizer_fingerprint(tok),
            },
            inputs={"prompts": prompts_schema.source_sha256(str(prompts))},
            extra={"policy_path": str(student)},
        )
    return prompts


def score(run_dir: Path, student: Path, teacher: Path, prompts: Path, *extra: str) -> dict:
    cfg = compose(
        "score",
        [
            f"run_dir={run_dir}", f"student.path={student}", f"teacher.path={teacher}",
            f"data.prompts={prompts}", "score.backend=hf", "score.topk=6", *extra,
        ],
    )  # fmt: skip
    return run(cfg)


def tokens_of(run_dir: Path) -> pa.Table:
    return store.read_table(run_dir / "tokens", tokens_table).sort_by(
        [("sample_id", "ascending"), ("pos", "ascending")]
    )


def ids_of(tok, words: str) -> list[int]:
    return tok(words, add_special_tokens=False)["input_ids"]


# ----------------------------------------------------------------------------- identity
def test_permuted_vocabulary_is_the_same_tokenizer_path(tmp_path, pair):
    student, teacher, perm = pair
    tok = models.load_tokenizer(str(student))
    rng = np.random.default_rng(1)
    plain = [i for i in range(4, len(tok)) if tok.convert_ids_to_tokens(i) not in (".", "?")]
    responses = [rng.choice(plain, size=int(rng.integers(2, 9))).tolist() for _ in range(7)]
    responses[1].append(tok.eos_token_id)  # a stop token: aligned to the teacher's EOS by role
    responses[4] = [tok.eos_token_id]  # only a stop
    # "w3" "." spell "w3." (the decoder's clean-up), which the student's own encoder cannot
    # read back: the student's ids as sampled are what the teacher reads
    responses[5] = ids_of(tok, "w3 .") + [tok.eos_token_id]
    same, cross = tmp_path / "same", tmp_path / "cross"
    prompts = write_run(same, student, responses)
    shutil.copytree(same / "rollouts", cross / "rollouts")
    score(same, student, student, prompts)
    out = score(cross, student, teacher, prompts, "score.cross_tokenizer=align")
    assert out["committed"]
    a, b = tokens_of(same), tokens_of(cross)
    assert a.num_rows == b.num_rows == sum(map(len, responses))
    for col in ("teacher_logprob", "teacher_topk_logmass", "teacher_entropy", "behavior_logprob"):
        np.testing.assert_allclose(
            b[col].to_numpy(zero_copy_only=False).astype(np.float64),
            a[col].to_numpy(zero_copy_only=False).astype(np.float64),
            atol=TOL,
            err_msg=col,
        )
    assert b["teacher_topk_ids"].to_pylist() == a["teacher_topk_ids"].to_pylist()
    np.testing.assert_allclose(
        np.array(b["teacher_topk_logprobs"].to_pylist()),
        np.array(a["teacher_topk_logprobs"].to_pylist()),
        atol=2**-9,  # one codec step: values within 1e-5 may round to neighbouring steps
    )
    # one-token chunks, everything mapped, the chunk log-prob is the token's
    pos = b["pos"].to_numpy()
    assert (b["xtok_chunk"].to_numpy() == pos).all()
    assert (b["xtok_mapped_k"].to_numpy() == 6).all()
    np.testing.assert_allclose(b["xtok_mapped_frac"].to_numpy(), 1.0, atol=1e-6)
    np.testing.assert_allclose(
        b["xtok_chunk_logprob"].to_numpy(), a["teacher_logprob"].to_numpy(), atol=TOL
    )
    top = np.exp(np.array(a["teacher_topk_logprobs"].to_pylist()))
    np.testing.assert_allclose(np.array(b["xtok_sorted_probs"].to_pylist()), top, atol=2e-3)
    m = manifest.read(cross / "tokens")
    x = m["extra"]["cross_tokenizer"]
    assert x["mode"] == "align" and x["refused_rows"] == 0 and x["rows"] == len(responses)
    assert m["dataset_id"] != manifest.read(same / "tokens")["dataset_id"]


def _compare_tokens(a: pa.Table, b: pa.Table) -> None:
    """The cross path's columns equal the same-tokenizer path's (ids already in student ids)."""
    assert a.num_rows == b.num_rows
    for col in ("teacher_logprob", "teacher_topk_logmass", "teacher_entropy", "behavior_logprob"):
        np.testing.assert_allclose(
            b[col].to_numpy(zero_copy_only=False).astype(np.float64),
            a[col].to_numpy(zero_copy_only=False).astype(np.float64),
            atol=TOL,
            err_msg=col,
        )
    assert b["teacher_topk_ids"].to_pylist() == a["teacher_topk_ids"].to_pylist()
    np.testing.assert_allclose(
        np.array(b["teacher_topk_logprobs"].to_pylist()),
        np.array(a["teacher_topk_logprobs"].to_pylist()),
        atol=2**-9,
    )
    assert (b["xtok_chunk"].to_numpy() == b["pos"].to_numpy()).all()  # one token per chunk


@pytest.mark.parametrize("flavor", ["byte_bpe", "sentencepiece_bpe"])
def test_permuted_identity_on_high_temperature_rollouts(tmp_path, flavor):
    """Byte-level BPE (byte tokens that are not UTF-8 alone) and SentencePiece with byte fallback
    (``<0xNN>``, ``▁``, the stripped first space): rollouts sampled at temperature 1.5 hold
    partial characters and splits the student's own encoder would not make; the permuted teacher
    still gives the same-tokenizer numbers on every token."""
    from stages import rollout as rollout_stage
    from stages.lib import align
    from tests import wild_tokenizers as wt

    s_tok = getattr(wt, flavor)()
    t_tok, perm = wt.permuted(s_tok)
    student = save_lm(tmp_path / "student", s_tok, seed=3, ctx=512)
    wt.save_permuted_model(student, tmp_path / "teacher", t_tok, perm)
    prompts = write_prompts(tmp_path / "prompts.parquet", n=8)
    same, cross = tmp_path / "same", tmp_path / "cross"
    rollout_stage.run(compose("rollout", [
        f"run_dir={same}", f"student.path={student}", f"data.prompts={prompts}",
        "rollout.backend=hf", "rollout.temperature=1.5", "rollout.max_new_tokens=24",
    ]))  # fmt: skip
    shutil.copytree(same / "rollouts", cross / "rollouts")
    rows = store.read_table(same / "rollouts", rollouts_table).to_pylist()
    bm = align.byte_map(s_tok)
    special = align.special_ids(s_tok)
    # a special token inside a response (a sampled <|im_start|>) is refused by design
    inside = {r["sample_id"] for r in rows if any(i in special for i in r["response_ids"][:-1])}
    partial = canon_differs = 0
    for r in rows:
        body = [i for i in r["response_ids"] if i not in special]
        partial += any(not align.is_utf8(bm.mid[i]) for i in body)
        data = bm.spans(body)[0] if body else b""
        canon_differs += align.encode_bytes(s_tok, bm, data) != body
    assert partial >= 3 and canon_differs >= 3, (partial, canon_differs)  # the cases are there
    score(same, student, student, prompts)
    out = score(cross, student, tmp_path / "teacher", prompts, "score.cross_tokenizer=align")
    assert out["committed"]
    a, b = tokens_of(same), tokens_of(cross)
    out_a = pa.compute.is_in(a["sample_id"], pa.array(sorted(inside), pa.string()))
    out_b = pa.compute.is_in(b["sample_id"], pa.array(sorted(inside), pa.string()))
    assert set(b.filter(out_b)["xtok_chunk"].to_pylist()) <= {-2}
    _compare_tokens(a.filter(pa.compute.invert(out_a)), b.filter(pa.compute.invert(out_b)))
    x = manifest.read(cross / "tokens")["extra"]["cross_tokenizer"]
    assert x["refused_rows"] == len(inside) < len(rows) // 4 and x["version"] == 3


def test_align_switch_keeps_same_tokenizer_shards_byte_identical(tmp_path, pair):
    student, _, _ = pair
    responses = [[5, 6, 7], [8, 9, 10, 3]]
    a, b = tmp_path / "a", tmp_path / "b"
    prompts = write_run(a, student, responses)
    shutil.copytree(a / "rollouts", b / "rollouts")
    score(a, student, student, prompts)
    score(b, student, student, prompts, "score.cross_tokenizer=align")
    files = sorted(p.relative_to(a / "tokens") for p in (a / "tokens").rglob("*.parquet"))
    assert files
    for f in files:
        assert (a / "tokens" / f).read_bytes() == (b / "tokens" / f).read_bytes()
    assert "cross_tokenizer" not in manifest.read(b / "tokens")["extra"]


# ----------------------------------------------------------------------------- refusals, errors
def test_refused_responses_are_counted_and_marked(tmp_path, pair):
    student, _, _ = pair
    tok = models.load_tokenizer(str(student))
    t_words = [x for x in SPECIALS + WORDS if x != "w77"]  # a teacher that cannot spell w77
    teacher = save_lm(
        tmp_path / "teacher", word_tokenizer({x: i for i, x in enumerate(t_words[::-1])})
    )
    w = lambda s: ids_of(tok, s)  # noqa: E731
    responses = [
        w("w1 w2"),
        w("w3 w77") + [tok.eos_token_id],  # no teacher token spells " w77"
        w("w4") + [tok.bos_token_id] + w("w5"),  # a special token inside
        w("w6 w7 w8"),
    ]
    prompts = write_run(tmp_path, student, responses)
    score(tmp_path, student, teacher, prompts, "score.cross_tokenizer=align")
    t = tokens_of(tmp_path)
    chunk = dict(
        zip(zip(t["sample_id"].to_pylist(), t["pos"].to_pylist()), t["xtok_chunk"].to_pylist())
    )
    assert {chunk[("s001", p)] for p in range(3)} == {-1}
    assert {chunk[("s002", p)] for p in range(3)} == {-2}
    assert chunk[("s000", 1)] == 1 and chunk[("s003", 2)] == 2
    refused = t.filter(pa.compute.less(t["xtok_chunk"], 0))
    # reward 0 on unscored tokens: the teacher column holds the behaviour's log-prob
    np.testing.assert_array_equal(refused["teacher_logprob"], refused["behavior_logprob"])
    assert refused["teacher_entropy"].null_count == refused.num_rows
    x = manifest.read(tmp_path / "tokens")["extra"]["cross_tokenizer"]
    assert x["refused_rows"] == 2 and x["refused_tokens"] == 6
    assert x["refused"]["roundtrip"] == 1 and x["refused"]["special_token"] == 1


def test_default_still_refuses_another_tokenizer(tmp_path, pair):
    student, teacher, _ = pair
    prompts = write_run(tmp_path, student, [[5, 6]])
    with pytest.raises(UserError, match="tokenizers differ"):
        score(tmp_path, student, teacher, prompts)
    assert not (tmp_path / "tokens" / manifest.FILENAME).exists()


@pytest.mark.parametrize(
    "extra, match",
    [
        (("score.behavior_topk=2",), "score.behavior_topk with a teacher of another tokenizer"),
        (("data.prompts=OTHER",), "is not the prompts file the rollouts were sampled from"),
    ],
)
def test_align_user_errors_before_any_output(tmp_path, pair, extra, match):
    student, teacher, _ = pair
    prompts = write_run(tmp_path, student, [[5, 6]])
    if "data.prompts=OTHER" in extra:
        other = write_prompts(tmp_path / "other.parquet", n=3)
        extra = (f"data.prompts={other}",)
    with pytest.raises(UserError, match=match):
        score(tmp_path, student, teacher, prompts, "score.cross_tokenizer=align", *extra)
    assert not (tmp_path / "tokens").exists() or not any((tmp_path / "tokens").rglob("*.parquet"))


def test_rollout_prompt_missing_from_prompts_is_one_error(tmp_path, pair):
    student, teacher, _ = pair
    prompts = write_run(tmp_path, student, [[5, 6], [7, 8]])
    rows = store.read_table(tmp_path / "rollouts", rollouts_table).to_pylist()
    # same file content, fewer rows read: the second rollout's prompt is not rendered
    with pytest.raises(UserError, match="is not in data.prompts"):
        score(tmp_path, student, teacher, prompts, "score.cross_tokenizer=align",
              "data.max_prompts=1")  # fmt: skip
    assert rows[1]["prompt_id"] == "p001"


# ----------------------------------------------------------------------------- hand-built splits
@functools.cache
def _dense(path: str, ids: tuple[int, ...]) -> np.ndarray:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1).numpy()


def test_hand_built_splits_through_the_stage(tmp_path):
    """Student: w12 -> w1 ##2 (split), w34 whole. Teacher: w12 whole, w34 -> w3 ##4."""
    base = SPECIALS + [w for w in WORDS if w not in ("w12", "w34")] + ["##2", "##4"]
    s_vocab = {t: i for i, t in enumerate(base + ["w34"])}
    t_vocab = {t: i for i, t in enumerate(["w12"] + base)}  # other ids too
    s_tok, t_tok = word_tokenizer(s_vocab, wordpiece=True), word_tokenizer(t_vocab, wordpiece=True)
    student = save_lm(tmp_path / "student", s_tok, seed=0)
    teacher = save_lm(tmp_path / "teacher", t_tok, seed=1)
    resp = ids_of(s_tok, "w12 w34 w5") + [s_tok.eos_token_id]
    assert s_tok.convert_ids_to_tokens(resp) == ["w1", "##2", "w34", "w5", "<eos>"]
    t_resp = ids_of(t_tok, "w12 w34 w5") + [t_tok.eos_token_id]
    assert t_tok.convert_ids_to_tokens(t_resp) == ["w12", "w3", "##4", "w5", "<eos>"]
    run_dir = tmp_path / "run"
    prompts = write_run(run_dir, student, [resp])
    score(run_dir, student, teacher, prompts, "score.cross_tokenizer=align", "score.topk=4")
    t = tokens_of(run_dir)
    # chunks by hand: {w1 ##2 | w12}, {w34 | w3 ##4}, {w5 | w5}, {<eos> | <eos>}
    assert t["xtok_chunk"].to_pylist() == [0, 0, 1, 2, 3]
    from data_schemas import prompts as ps
    from stages.lib import chat

    cfg = compose("score", [f"student.path={student}"])
    row = ps.read(str(prompts)).to_pylist()[0]
    t_prefix = chat.Renderer.of(cfg.rollout, s_tok, t_tok).teacher_ids(
        chat.turns(row, False)[0], row
    )
    lsm = _dense(str(teacher), tuple(t_prefix + t_resp))  # [L, V_T]
    tok_lp = [lsm[len(t_prefix) - 1 + j, t] for j, t in enumerate(t_resp)]  # per teacher token
    hand = [tok_lp[0], tok_lp[1] + tok_lp[2], tok_lp[3], tok_lp[4]]  # per chunk
    want = [hand[0], hand[0], hand[1], hand[2], hand[3]]
    np.testing.assert_allclose(t["xtok_chunk_logprob"].to_numpy(), want, atol=1e-5)
    # the standard column shares the chunk's log-prob among its student tokens
    np.testing.assert_allclose(
        t["teacher_logprob"].to_numpy(), [hand[0] / 2, hand[0] / 2, *hand[1:]], atol=1e-5
    )
    # top-K is mapped only at a chunk's first student token; inside a chunk nothing is
    mk = t["xtok_mapped_k"].to_pylist()
    assert mk[1] == 0 and all(k > 0 for k in (mk[0], mk[2], mk[3], mk[4]))
    # at pos 2 (w34), the teacher's top-4 after "w12" at its own position, mapped by string
    j = len(t_prefix) - 1 + 1  # teacher position predicting its token 1 (w3)
    top = np.argsort(-lsm[j], kind="stable")[:4]
    names = t_tok.convert_ids_to_tokens([int(i) for i in top])
    mapped = [s_vocab[n] for n in names if n in s_vocab]  # equal strings (specials: by role)
    ids2 = t["teacher_topk_ids"][2].as_py()
    assert ids2[: mk[2]] == mapped[: mk[2]]
    probs = np.array(t["xtok_sorted_probs"][2].as_py())
    np.testing.assert_allclose(probs, np.exp(lsm[j, top]), atol=2e-3)


# ----------------------------------------------------------------------------- select and train
def _hand_pair(root: Path):
    """A WordPiece student/teacher pair with splits on both sides (the hand-built case)."""
    base = SPECIALS + [w for w in WORDS if w not in ("w12", "w34")] + ["##2", "##4"]
    s_tok = word_tokenizer({t: i for i, t in enumerate(base + ["w34"])}, wordpiece=True)
    t_base = [w for w in base if w != "w77"]  # the teacher cannot spell w77
    t_tok = word_tokenizer({t: i for i, t in enumerate(["w12"] + t_base)}, wordpiece=True)
    return save_lm(root / "student", s_tok, seed=0), save_lm(root / "teacher", t_tok, seed=1)


def test_select_and_train_see_the_alignment(tmp_path):
    from data_schemas import selected
    from stages import select as select_stage
    from stages import train as train_stage

    student, teacher = _hand_pair(tmp_path)
    tok = models.load_tokenizer(str(student))
    w = lambda s: ids_of(tok, s)  # noqa: E731
    responses = [
        w("w12 w34 w5 w12") + [tok.eos_token_id],
        w("w3 w77"),  # refused (round trip)
        w("w34 w34 w7 w8 w12"),
        w("w9 w12 w1") + [tok.eos_token_id],
    ]
    run_dir = tmp_path / "run"
    prompts = write_run(run_dir, student, responses)
    score(run_dir, student, teacher, prompts, "score.cross_tokenizer=align", "score.topk=4")
    sel = compose("select", [f"run_dir={run_dir}", "select=xtok_mapped",
                             "select.rules.0.params.min_frac=0.0"])  # fmt: skip
    res = select_stage.run(sel)
    rows = {r["sample_id"]: r for r in store.read_table(Path(res["dir"]), selected).to_pylist()}
    assert rows["s001"]["weights"] == [0.0, 0.0] and rows["s001"]["xtok_chunk"] == [-1, -1]
    assert rows["s000"]["xtok_chunk"] == [0, 0, 1, 2, 3, 3, 4]
    assert all(x == 1.0 for x in rows["s000"]["weights"])  # min_frac 0: every scored chunk
    assert len(rows["s000"]["xtok_sorted_probs"]) == 7 * 4
    # a threshold drops chunks whole: equal chunk ids, equal weights
    sel = compose("select", [f"run_dir={run_dir}", "select=xtok_mapped", "select.name=strict",
                             "select.rules.0.params.min_frac=0.9"])  # fmt: skip
    rows2 = store.read_table(Path(select_stage.run(sel)["dir"]), selected).to_pylist()
    for r in rows2:
        by_chunk: dict[int, set] = {}
        for c, x in zip(r["xtok_chunk"], r["weights"], strict=True):
            by_chunk.setdefault(c, set()).add(x)
        assert all(len(v) == 1 for v in by_chunk.values())
    for loss in ("chunk_opd", "mapped_topk_fkl", "uld"):
        cfg = compose("train", [
            f"run_dir={run_dir}", f"student.path={student}", f"loss={loss}", "train.shuffle=false",
            "train.trackers=[]", "train.selection=xtok_mapped", f"train.name={loss}",
            "train.chunk_positions=3", "train.max_steps=2", "train.micro_batch_tokens=64",
        ])  # fmt: skip
        out = train_stage.run(cfg)
        assert out["steps"] >= 1 and np.isfinite(out["history"]).all(), loss
        assert out["history"][0] != 0.0 and not out["skipped"], loss
        extra = {
            "chunk_opd": "chunk_opd/chunk_reward",
            "mapped_topk_fkl": "mapped_topk_fkl/mapped_mass",
        }
        assert np.isfinite(out["metrics"][extra.get(loss, "loss")]), loss


def test_loss_splits_keep_chunks_whole():
    from stages.lib.training.objective import loss_splits

    assert loss_splits(7, 3) == [(0, 3), (3, 6), (6, 7)]
    keys = torch.tensor([0, 0, 1, 1, 1, 1, 1, 2, 3, 3])
    parts = loss_splits(10, 3, keys)
    assert parts[0][0] == 0 and parts[-1][1] == 10
    assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
    for _s, e in parts:
        assert e == 10 or keys[e] != keys[e - 1]  # never inside a chunk
    assert (2, 7) in parts  # a chunk longer than the range stays whole


def test_chunk_opd_over_loss_splits_equals_one_call():
    from stages.lib.losses import chunk_opd
    from stages.lib.training.objective import loss_splits

    g = torch.Generator().manual_seed(0)
    n, v = 12, 9
    logits = torch.randn(n, v, generator=g)
    keys = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4, 4, 5, 6, 6])
    batch = {
        "token_id": torch.randint(0, v, (n,), generator=g),
        "chunk_index": keys,
        "teacher_chunk_logprob": -torch.rand(n, generator=g) * 3,
        "behavior_logprob": -torch.rand(n, generator=g),
        "teacher_logprob": -torch.rand(n, generator=g),
    }
    whole, _ = chunk_opd(logits, batch)
    parts = sum(
        chunk_opd(logits[s:e], {k: x[s:e] for k, x in batch.items()})[0]
        for s, e in loss_splits(n, 4, keys)
    )
    torch.testing.assert_close(parts, whole)


def test_loader_builds_the_xtok_loss_inputs():
    from stages.lib.loader import xtok_batch

    seqs = [
        {"xtok_chunk": np.array([0, 0, 1]), "xtok_mapped_k": np.array([2, 0, 1]),
         "xtok_chunk_logprob": np.array([-1.0, -1.0, -0.5]),
         "xtok_sorted_probs": np.arange(6, dtype=np.float32) / 10},
        {"xtok_chunk": np.array([-1, -1]), "xtok_mapped_k": np.array([0, 0]),
         "xtok_chunk_logprob": np.zeros(2), "xtok_sorted_probs": np.zeros(4, np.float32)},
    ]  # fmt: skip
    ids = torch.arange(10).reshape(5, 2)
    out = xtok_batch(seqs, {"teacher_topk_ids": ids, "teacher_topk_logprobs": -torch.ones(5, 2)}, 2)
    c = out["chunk_index"].tolist()
    assert c[0] == c[1] != c[2] and len(set(c)) == 4  # refused tokens: chunks of their own
    assert out["teacher_mapped_ids"].tolist() == [[0, 1], [-1, -1], [4, -1], [-1, -1], [-1, -1]]
    assert out["teacher_sorted_probs"].shape == (5, 2)


def test_rollout_then_score_with_a_teacher_of_another_tokenizer(tmp_path, pair):
    """The rollout stage accepts the teacher under align (and refuses it by default); its
    rollouts score through the aligned path, every rollout counted."""
    from stages import rollout as rollout_stage

    student, teacher, _ = pair
    prompts = write_prompts(tmp_path / "prompts.parquet", n=4)
    common = [
        f"run_dir={tmp_path / 'run'}", f"student.path={student}", f"teacher.path={teacher}",
        f"data.prompts={prompts}", "rollout.backend=hf", "rollout.max_new_tokens=6",
        "rollout.guided_fraction=0.5",
    ]  # fmt: skip
    with pytest.raises(UserError, match="tokenizers differ"):
        rollout_stage.run(compose("rollout", common))
    rollout_stage.run(compose("rollout", [*common, "score.cross_tokenizer=align"]))
    out = run(compose("score", [*common, "score.backend=hf", "score.cross_tokenizer=align"]))
    assert out["committed"]
    x = manifest.read(tmp_path / "run" / "tokens")["extra"]["cross_tokenizer"]
    assert x["rows"] == 8 and x["rows"] >= x["refused_rows"]  # rollout.n = 2 per prompt


def test_a_teacher_folder_without_a_tokenizer_is_one_error(tmp_path, pair):
    """transformers builds an empty tokenizer from config.json's model type alone: the rollout
    and score stages stop on it before any output instead of refusing every response."""
    from stages import rollout as rollout_stage

    student, teacher, _ = pair
    bare = tmp_path / "teacher"
    shutil.copytree(teacher, bare)
    for f in bare.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            f.unlink()
    cfg = __import__("json").loads((bare / "config.json").read_text())
    (bare / "config.json").write_text(__import__("json").dumps(cfg | {"model_type": "qwen2"}))
    prompts = write_prompts(tmp_path / "prompts.parquet", n=2)
    run_dir = tmp_path / "run"
    common = [
        f"run_dir={run_dir}", f"student.path={student}", f"teacher.path={bare}",
        f"data.prompts={prompts}", "rollout.backend=hf", "score.cross_tokenizer=align",
    ]  # fmt: skip
    with pytest.raises(UserError, match="teacher folder has no usable tokenizer"):
        rollout_stage.run(compose("rollout", common))
    assert not (run_dir / "rollouts").exists()
    write_run(run_dir, student, [[5, 6]])
    with pytest.raises(UserError, match="teacher folder has no usable tokenizer"):
        run(compose("score", [*common, "score.backend=hf"]))
    assert not (run_dir / "tokens").exists()


def test_eval_skips_the_kl_to_a_teacher_of_another_tokenizer(tmp_path, pair):
    from stages import eval as eval_stage

    student, teacher, _ = pair
    p = write_prompts(tmp_path / "ev.parquet", n=4)
    ov = [
        f"run_dir={tmp_path / 'run'}", f"student.path={student}", f"teacher.path={teacher}",
        f"+data.eval_sets={{a: {p}}}", "eval.max_new_tokens=3", "eval.kl_prompts=2",
    ]  # fmt: skip
    with pytest.raises(UserError, match="tokenizers differ"):
        eval_stage.run(compose("eval", ov))
    res = eval_stage.run(compose("eval", [*ov, "score.cross_tokenizer=align"]))
    assert res["base"]["a"]["n"] == 4 and res["base"].get("rkl_to_teacher") is None


def test_a_response_too_long_for_the_teacher_is_refused_not_fatal(tmp_path):
    """The teacher splits w34 in two: 20 of them fit the student's context but not the teacher's."""
    base = SPECIALS + [w for w in WORDS if w not in ("w12", "w34")] + ["##2", "##4"]
    s_tok = word_tokenizer({t: i for i, t in enumerate(base + ["w34"])}, wordpiece=True)
    t_tok = word_tokenizer({t: i for i, t in enumerate(["w12"] + base)}, wordpiece=True)
    student = save_lm(tmp_path / "student", s_tok)
    teacher = save_lm(tmp_path / "teacher", t_tok, seed=1, ctx=48)
    responses = [ids_of(s_tok, "w5 w6"), ids_of(s_tok, " ".join(["w34"] * 20))]
    run_dir = tmp_path / "run"
    prompts = write_run(run_dir, student, responses)
    score(run_dir, student, teacher, prompts, "score.cross_tokenizer=align", "score.topk=4")
    t = tokens_of(run_dir)
    chunk = t["xtok_chunk"].to_pylist()
    assert chunk[:2] == [0, 1] and set(chunk[2:]) == {-6}
    x = manifest.read(run_dir / "tokens")["extra"]["cross_tokenizer"]
    assert x["refused"]["too_long"] == 1 and x["refused_tokens"] == 20


def test_same_tokenizer_views_show_the_xtok_columns_as_null(tmp_path, pair):
    """Policies can name the xtok columns on any run: null on a same-tokenizer one."""
    from stages.lib import views
    from stages.lib.layout import RunLayout

    student, _, _ = pair
    prompts = write_run(tmp_path, student, [[5, 6, 7]])
    score(tmp_path, student, student, prompts)
    rv = views.open_run(RunLayout.of(tmp_path), datasets=("tokens",))
    got = rv.con.execute("SELECT count(*), count(xtok_chunk), count(xtok_sorted_probs) FROM tokens")
    assert got.fetchone() == (3, 0, 0)


@pytest.mark.parametrize("k_t, k", [(6, 6), (8, 5), (3, 6)])
def test_mapped_topk_against_a_loop(k_t, k):
    """The vectorised mapping: mapped entries first in the teacher's order, then the lowest
    student ids not in the row, at the filler log-prob; distinct ids in every row."""
    from stages.lib import xtok

    rng = np.random.default_rng(k_t * 10 + k)
    v_t, v_s = 30, 12
    table = np.where(rng.random(v_t) < 0.5, rng.permutation(v_t) % v_s, -1)
    table = np.array([t if t not in table[:i] else -1 for i, t in enumerate(table)])  # 1:1
    v = xtok.Vocabs(None, None, table, {}, frozenset(), v_s)
    ids = np.stack([rng.permutation(v_t)[:k_t] for _ in range(20)])  # [20, K_T]
    ids[3] = -1  # a row with nothing comparable
    lps = -np.sort(rng.random((20, k_t)) * 5, axis=1)
    got_ids, got_lps, mk = xtok.mapped_topk(v, ids, lps, k)
    for r in range(20):
        pairs = [
            (table[i], lp) for i, lp in zip(ids[r], lps[r], strict=True) if i >= 0 and table[i] >= 0
        ][:k]
        want = [i for i, _ in pairs] + [i for i in range(v_s) if i not in [p[0] for p in pairs]]
        assert got_ids[r].tolist() == want[:k] and mk[r] == len(pairs)
        np.testing.assert_allclose(got_lps[r, : len(pairs)], [lp for _, lp in pairs], rtol=1e-6)
        assert (got_lps[r, len(pairs) :] == xtok.FILL).all()
        assert len(set(got_ids[r].tolist())) == k


def test_loader_refuses_bad_xtok_values():
    """A selected row group with a positive chunk log-prob or a short xtok list is refused."""
    from stages.lib.loader import check_row_group

    def table(chunk_lp, chunks):
        t, k = 2, 1
        f32 = lambda v: pa.array([v], pa.list_(pa.float32()))  # noqa: E731
        return pa.table({
            "sample_id": ["s"], "topk_k": [k], "behavior_topk_k": [0],
            "train_prompt_ids": pa.array([[1]], pa.list_(pa.int32())),
            "response_ids": pa.array([[5, 6]], pa.list_(pa.int32())),
            "weights": f32([1.0] * t), "segments": pa.array([[0, 0]], pa.list_(pa.uint8())),
            "teacher_logprob": f32([-1.0] * t), "behavior_logprob": f32([-1.0] * t),
            "ref_logprob": pa.nulls(1, pa.list_(pa.float32())),
            "teacher_topk_ids": pa.array([[5, 6]], pa.list_(pa.int32())),
            "teacher_topk_logprobs": f32([-1.0] * t), "teacher_topk_logmass": f32([-1.0] * t),
            "behavior_topk_ids": pa.nulls(1, pa.list_(pa.int32())),
            "teacher_logprobs_on_behavior_topk": pa.nulls(1, pa.list_(pa.float16())),
            "xtok_chunk": pa.array([chunks], pa.list_(pa.int32())),
            "xtok_chunk_logprob": f32(chunk_lp),
        })  # fmt: skip

    assert check_row_group(table([-1.0, -1.0], [0, 1]), 10, 10.0) is None
    assert "xtok_chunk_logprob" in check_row_group(table([-1.0, 0.5], [0, 1]), 10, 10.0)
    assert "xtok_chunk has 1 values" in check_row_group(table([-1.0, -1.0], [0]), 10, 10.0)
