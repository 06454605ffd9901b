"""Chat models as users have them (stages/lib/chat.py, stages/lib/decoding.py, the prompts reader).

Tiny Qwen2 / Qwen3 / Llama models built in a temp dir with a byte-level BPE tokenizer trained by
`tokenizers`, under a ChatML (Qwen-style, with a thinking switch) or a Llama-3-style template.
The "chain" models have their layers switched off and one-hot embeddings, so that the next token
is a fixed function of the current one: A -> B -> <|im_end|> -> A ... Every prompt is therefore
answered "A B <|im_end|>" and a decoder that misses the stop runs to the length limit.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from data_schemas import prompts as prompts_schema
from data_schemas import rollouts as rollouts_schema
from stages.lib import chat, decoding, rollout_plan, store
from stages.lib.config import RolloutConfig, compose
from stages.lib.errors import UserError
from stages.rollout import run as rollout_run

REPO = Path(__file__).resolve().parent.parent
SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<think>",
    "</think>",
    "<|begin_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
]
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n"
    "{% endif %}{% endif %}"
)
LLAMA3 = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>"
    "\n\n{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
CORPUS = [
    "you are a helpful assistant.",
    "question: what is the capital of zorbia? answer: the capital of zorbia is vexton.",
    "evidence: the leader of zorbia is mira dost. hello world, think about it.",
    "system user assistant tool the a of is in on at to hello world",
] * 20
MESSAGES = [
    {"role": "system", "content": "you are a helpful assistant."},
    {"role": "user", "content": "what is the capital of zorbia?"},
]


def train_tokenizer(flavor: str, eos: str | None = None):
    """A byte-level BPE tokenizer trained here, with a ChatML or a Llama-3-style template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tk.train_from_iterator(CORPUS, trainer)
    if flavor == "llama3":  # a BOS-adding tokenizer
        bos = tk.token_to_id("<|begin_of_text|>")
        tk.post_processor = processors.TemplateProcessing(
            single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", bos)]
        )
        tok = PreTrainedTokenizerFast(
            tokenizer_object=tk, bos_token="<|begin_of_text|>", eos_token=eos or "<|eot_id|>"
        )
        tok.chat_template = LLAMA3
    else:
        tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token=eos or "<|endoftext|>")
        tok.chat_template = CHATML
    return tok


def chain_ids(tok) -> tuple[int, int, int]:
    """A, B and the turn end of the chain."""
    a = tok("hello", add_special_tokens=False)["input_ids"][0]
    b = tok(" world", add_special_tokens=False)["input_ids"][0]
    end = tok.convert_tokens_to_ids("<|im_end|>")
    assert len({a, b, end}) == 3
    return a, b, end


def build_model(out: Path, arch: str, tok, *, gen_eos: list[int] | None = None) -> Path:
    """A tiny chain model (see the module docstring) with ``tok`` saved next to it;
    ``gen_eos`` writes generation_config.json with that eos_token_id list."""
    from transformers import (
        AutoModelForCausalLM,
        GenerationConfig,
        LlamaConfig,
        Qwen2Config,
        Qwen3Config,
    )

    v, hidden = len(tok), 320
    common = dict(
        vocab_size=v,
        hidden_size=hidden,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=hidden // 64,
        num_key_value_heads=1,
        head_dim=64,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
    )
    cfg = {"qwen2": Qwen2Config, "qwen3": Qwen3Config, "llama": LlamaConfig}[arch](**common)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    a, b, end = chain_ids(tok)
    nxt = {t: a for t in range(v)} | {a: b, b: end, end: a}
    with torch.no_grad():
        for name, p in model.named_parameters():  # layers off: the residual is the embedding
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                p.zero_()
        model.get_input_embeddings().weight.copy_(torch.eye(v, hidden))  # [V, H] one-hot
        head = torch.zeros(v, hidden)  # [V, H]: logit of next(t) is high after t
        for t, n in nxt.items():
            head[n, t] = 1.0
        model.get_output_embeddings().weight.copy_(head)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    if gen_eos is not None:
        GenerationConfig(eos_token_id=gen_eos, bos_token_id=tok.bos_token_id).save_pretrained(out)
    else:
        (out / "generation_config.json").unlink(missing_ok=True)
    return out


@pytest.fixture(scope="module")
def qwen_tok():
    return train_tokenizer("chatml")


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory, qwen_tok) -> Path:
    """Qwen-style pair: tokenizer EOS <|endoftext|>, generation_config EOS [<|im_end|>, EOS]."""
    _, _, end = chain_ids(qwen_tok)
    return build_model(
        tmp_path_factory.mktemp("qwen2"),
        "qwen2",
        qwen_tok,
        gen_eos=[end, qwen_tok.eos_token_id],
    )


def prompt_rows(n: int = 4) -> list[dict]:
    return [
        {
            "id": f"r{i}",
            "messages": MESSAGES[:1] * (i % 2) + MESSAGES[1:],
            "context": "evidence: the capital of zorbia is vexton." if i % 2 == 0 else None,
            "answer": "vexton",
        }
        for i in range(n)
    ]


def write_parquet(rows: list[dict], path: Path) -> Path:
    pq.write_table(prompts_schema.from_rows(rows, "test"), path)
    return path


def items_of(tok, rows, r: RolloutConfig | None = None, teacher_tok=None):
    table = prompts_schema.from_rows(rows, "test")
    return rollout_plan.build_prompt_ids(tok, table, r or RolloutConfig(), 0, teacher_tok)


def template_ids(tok, msgs, **kw) -> list[int]:
    out = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, **kw)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


# ----------------------------------------------------------------------------- rendering
@pytest.mark.parametrize("flavor", ["chatml", "llama3"])
def test_train_prefix_is_the_chat_template_and_context_stays_out(flavor):
    tok = train_tokenizer(flavor)
    rows = prompt_rows()
    for item, row in zip(items_of(tok, rows), rows, strict=True):
        assert item.train_ids == template_ids(tok, row["messages"])
        if flavor == "llama3":  # the template's BOS only, none added by the tokenizer
            assert (
                item.train_ids.count(tok.bos_token_id) == 1
                and item.train_ids[0] == tok.bos_token_id
            )
        student = tok.decode(item.train_ids)
        teacher = tok.decode(item.teacher_ids)
        assert "evidence" not in student
        if row["context"]:  # appended to the system message (created when absent)
            sys_part = teacher.split("user")[0]
            assert row["context"] in sys_part
            assert teacher.count("system") == 1
        else:
            assert item.teacher_ids == item.train_ids


def test_context_in_the_last_user_message_with_wording(qwen_tok):
    r = RolloutConfig(context_placement="user", context_template="Notes: {context}")
    rows = [
        {
            "id": "x",
            "messages": MESSAGES
            + [{"role": "assistant", "content": "hello"}, {"role": "user", "content": "again?"}],
            "context": "evidence: secret.",
        }
    ]
    (item,) = items_of(qwen_tok, rows, r)
    want = [dict(m) for m in rows[0]["messages"]]
    want[-1]["content"] = "Notes: evidence: secret.\n\nagain?"
    assert item.teacher_ids == template_ids(qwen_tok, want)
    assert "secret" not in qwen_tok.decode(item.train_ids)


def test_no_double_bos_for_pre_rendered_prompts():
    tok = train_tokenizer("llama3")
    text = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert text.startswith("<|begin_of_text|>")
    (item,) = items_of(tok, [{"id": "p", "prompt": text}])
    assert item.train_ids == template_ids(tok, MESSAGES)
    assert item.train_ids.count(tok.bos_token_id) == 1
    (plain,) = items_of(tok, [{"id": "q", "prompt": "hello world"}])
    assert plain.train_ids[0] == tok.bos_token_id and plain.train_ids.count(tok.bos_token_id) == 1


def test_thinking_kwargs_reach_the_teacher_only(qwen_tok):
    r = RolloutConfig(
        template_kwargs={"enable_thinking": False},
        teacher_template_kwargs={"enable_thinking": True},
    )
    (item,) = items_of(qwen_tok, [{"id": "t", "messages": MESSAGES}], r)
    think = qwen_tok.convert_tokens_to_ids("<think>")
    assert think in item.train_ids and think not in item.teacher_ids
    assert item.train_ids == template_ids(qwen_tok, MESSAGES, enable_thinking=False)


def test_teacher_prefix_uses_the_teacher_tokenizer_template(qwen_tok):
    teacher = train_tokenizer("chatml", eos="<|im_end|>")  # same ids, other EOS and template
    teacher.chat_template = CHATML.replace(
        "<|im_start|>{{ m['role'] }}", "<|im_start|>{{ m['role'] }}:"
    )
    (item,) = items_of(qwen_tok, [{"id": "t", "messages": MESSAGES}], None, teacher)
    assert item.teacher_ids == template_ids(teacher, MESSAGES)
    assert item.train_ids == template_ids(qwen_tok, MESSAGES) != item.teacher_ids
    rec = chat.check_compatible({"student": qwen_tok, "teacher": teacher}, "here")
    assert rec["special_differences"] == ["eos_token"]


def test_different_id_maps_are_refused(qwen_tok):
    other = train_tokenizer("chatml")
    other.add_tokens(["zzz-new"])
    chat.check_compatible({"a": qwen_tok, "b": train_tokenizer("chatml")}, "here")
    with pytest.raises(UserError, match="map ids to different tokens"):
        chat.check_compatible({"student": qwen_tok, "teacher": other}, "here")


def test_multi_turn_expansion(qwen_tok):
    conv = MESSAGES + [
        {"role": "assistant", "content": "the capital is vexton."},
        {"role": "user", "content": "and the leader?"},
        {"role": "assistant", "content": "mira dost."},
        {"role": "user", "content": "thanks"},
    ]
    rows = [{"id": "c", "messages": conv}]
    (whole,) = items_of(qwen_tok, rows)
    assert whole.turn == 2 and whole.train_ids == template_ids(qwen_tok, conv)
    items = items_of(qwen_tok, rows, RolloutConfig(expand_turns=True))
    assert [(i.prompt_id, i.turn) for i in items] == [("c@t0", 0), ("c@t1", 1), ("c@t2", 2)]
    assert [i.train_ids for i in items] == [
        template_ids(qwen_tok, conv[:2]),
        template_ids(qwen_tok, conv[:4]),
        template_ids(qwen_tok, conv),
    ]


# ----------------------------------------------------------------------------- inputs
def test_every_input_layout_gives_the_same_prefixes(tmp_path, qwen_tok):
    import datasets

    rows = prompt_rows()
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    trl = tmp_path / "trl.jsonl"  # TRL's conversational layout: prompt = the message list
    trl.write_text(
        "".join(
            json.dumps({**{k: v for k, v in r.items() if k != "messages"}, "prompt": r["messages"]})
            + "\n"
            for r in rows
        )
    )
    parquet = write_parquet(rows, tmp_path / "p.parquet")
    ds = datasets.Dataset.from_list([{**r, "context": r["context"] or None} for r in rows])
    ds.save_to_disk(str(tmp_path / "ds"))
    datasets.DatasetDict({"test": ds}).save_to_disk(str(tmp_path / "dsd"))
    tables = [
        prompts_schema.read(str(jsonl)),
        prompts_schema.read(str(trl)),
        prompts_schema.read(str(parquet)),
        prompts_schema.read(str(tmp_path / "ds")),
        prompts_schema.read(str(tmp_path / "dsd"), split="test"),
    ]
    ref = None
    for t in tables:
        got = [
            (i.prompt_id, i.train_ids, i.teacher_ids)
            for i in rollout_plan.build_prompt_ids(qwen_tok, t, RolloutConfig(), 0)
        ]
        assert ref is None or got == ref
        ref = got
    with pytest.raises(UserError, match="split 'train' not in"):
        prompts_schema.read(str(tmp_path / "dsd"))


BAD_ROWS = {
    "int id": ({"id": 1, "prompt": "hello"}, "'id' must be a non-empty string"),
    "object prompt": ({"id": "a", "prompt": {"x": 1}}, "'prompt' must be a non-empty string"),
    "number prompt": ({"id": "a", "prompt": 3}, "'prompt' must be a non-empty string"),
    "bad role": ({"id": "a", "messages": [{"role": "bot", "content": "x"}]}, "has role 'bot'"),
    "no content": ({"id": "a", "messages": [{"role": "user"}]}, "no string 'content'"),
    "message not object": ({"id": "a", "messages": ["hi"]}, "not an object"),
    "both": ({"id": "a", "prompt": "x", "messages": MESSAGES}, "exactly one of"),
    "neither": ({"id": "a", "answer": "x"}, "exactly one of"),
    "number answer": ({"id": "a", "prompt": "x", "answer": 1423}, "'answer' must be a string"),
}


@pytest.mark.parametrize("case", list(BAD_ROWS))
def test_malformed_rows_are_one_clear_error_naming_the_row(tmp_path, case):
    bad, msg = BAD_ROWS[case]
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"id": "ok", "prompt": "fine"}) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(UserError, match="row 2") as e:
        prompts_schema.read(str(path))
    assert msg in str(e.value)


def test_malformed_input_on_the_cli_writes_nothing(tmp_path, qwen_dir):
    path = tmp_path / "p.jsonl"
    path.write_bytes(b'{"id": "a", "prompt": "ok"}\n{"id": "b", "prompt": "caf\xe9"}\n')
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "stages.rollout", f"run_dir={run_dir}", f"student.path={qwen_dir}"]
    p = subprocess.run([*cmd, f"data.prompts={path}"], cwd=REPO, capture_output=True, text=True)
    assert p.returncode == 2, p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert lines == [lines[-1]] and lines[0].startswith("error: prompts: invalid UTF-8 on line 2")
    assert not run_dir.exists()


# ----------------------------------------------------------------------------- stopping
def _rollout_cfg(run_dir, model, prompts, *extra):
    return compose(
        "rollout",
        [
            f"run_dir={run_dir}",
            f"student.path={model}",
            f"data.prompts={prompts}",
            "rollout.n=2",
            "rollout.temperature=1.0",
            "rollout.max_new_tokens=7",
            *extra,
        ],
    )


def _responses(run_dir):
    t = store.read_table(run_dir / "rollouts", rollouts_schema)
    return sorted(
        zip(
            t["sample_id"].to_pylist(),
            t["response_ids"].to_pylist(),
            t["finish_reason"].to_pylist(),
            strict=True,
        )
    )


def test_generation_config_eos_list_stops_at_im_end_hf(tmp_path, qwen_dir, qwen_tok):
    a, b, end = chain_ids(qwen_tok)
    prompts = write_parquet(prompt_rows(), tmp_path / "p.parquet")
    rollout_run(_rollout_cfg(tmp_path / "r", qwen_dir, prompts, "rollout.backend=hf"))
    got = _responses(tmp_path / "r")
    assert got and all(ids == [a, b, end] and why == "eos" for _, ids, why in got)
    # Without the generation config the same model runs to the length limit.
    plain = build_model(tmp_path / "plain", "qwen2", qwen_tok)
    rollout_run(_rollout_cfg(tmp_path / "r2", plain, prompts, "rollout.backend=hf"))
    assert all(why == "length" and len(ids) == 7 for _, ids, why in _responses(tmp_path / "r2"))
    # Configured stop ids and stop strings end with "stop", the stop token kept.
    rollout_run(
        _rollout_cfg(
            tmp_path / "r3", plain, prompts, "rollout.backend=hf", f"rollout.stop_token_ids=[{b}]"
        )
    )
    assert all(ids == [a, b] and why == "stop" for _, ids, why in _responses(tmp_path / "r3"))
    rollout_run(
        _rollout_cfg(
            tmp_path / "r4",
            plain,
            prompts,
            "rollout.backend=hf",
            f"rollout.stop_strings=[{qwen_tok.decode([a])}]",
        )
    )
    assert all(ids == [a] and why == "stop" for _, ids, why in _responses(tmp_path / "r4"))


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_eos_list_stops_other_architectures(tmp_path, qwen_tok, arch):
    a, b, end = chain_ids(qwen_tok)
    model = build_model(tmp_path / arch, arch, qwen_tok, gen_eos=[end, qwen_tok.eos_token_id])
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(model)
    stops = decoding.stops_for(qwen_tok, model)
    outs = decoding.greedy(
        m, qwen_tok, [template_ids(qwen_tok, MESSAGES)], max_new_tokens=6, batch_size=1, stops=stops
    )
    assert outs[0].response_ids == [a, b, end] and outs[0].finish_reason == "eos"


@pytest.mark.vllm
def test_vllm_stops_like_hf(tmp_path, qwen_dir, qwen_tok):
    ok, why = __import__("stages.lib.vllm_backend", fromlist=["x"]).vllm_available()
    if not ok:
        pytest.skip(why)
    prompts = write_parquet(prompt_rows(), tmp_path / "p.parquet")
    rollout_run(_rollout_cfg(tmp_path / "hf", qwen_dir, prompts, "rollout.backend=hf"))
    rollout_run(_rollout_cfg(tmp_path / "vl", qwen_dir, prompts, "rollout.backend=vllm"))
    hf, vl = _responses(tmp_path / "hf"), _responses(tmp_path / "vl")
    assert [(s, i, w) for s, i, w in hf] == [(s, i, w) for s, i, w in vl]
    assert all(w == "eos" for *_, w in vl)
    # stop strings (vLLM's `stop`, an HF stopping criterion): the same cut on both backends,
    # for a string ending inside a token and one spanning two
    a, b, _ = chain_ids(qwen_tok)
    plain = build_model(tmp_path / "plain", "qwen2", qwen_tok)  # would run to the length limit
    for k, pat in enumerate((" ", "he w")):
        cut = [f"rollout.stop_strings=[{json.dumps(pat)}]"]
        rollout_run(_rollout_cfg(tmp_path / f"h{k}", plain, prompts, "rollout.backend=hf", *cut))
        rollout_run(_rollout_cfg(tmp_path / f"v{k}", plain, prompts, "rollout.backend=vllm", *cut))
        hf, vl = _responses(tmp_path / f"h{k}"), _responses(tmp_path / f"v{k}")
        assert hf == vl and all(i == [a, b] and w == "stop" for _, i, w in vl), (pat, vl)
    # the engine itself stopped there (its own finish reason), not only the cut after it
    from stages.lib import vllm_backend

    llm = next(v for k, v in vllm_backend._LLM_CACHE.items() if k[0] == str(plain) and k[-1])
    (raw,) = vllm_backend.generate(
        llm, [template_ids(qwen_tok, MESSAGES)], n=1, temperature=0.0, top_p=1.0,
        max_new_tokens=7, seed=0, eos_id=[qwen_tok.eos_token_id], stop=["he w"],
    )  # fmt: skip
    assert raw[0]["response_ids"] == [a, b] and raw[0]["finish_reason"] == "stop"
    import gc

    from stages.lib import vllm_backend

    vllm_backend.clear_llm_cache()  # shut the engine down while pytest's streams are open
    gc.collect()


def test_guided_chat_rollouts_read_the_context(qwen_tok):
    rows = prompt_rows()
    for item, row in zip(
        items_of(qwen_tok, rows, RolloutConfig(guided_fraction=1.0)), rows, strict=True
    ):
        assert item.is_guided == (row["context"] is not None)
        assert item.rollout_ids == (item.teacher_ids if item.is_guided else item.train_ids)


def test_rollout_checks_teacher_tokenizer_up_front(tmp_path, qwen_dir, qwen_tok):
    """Same ids, other EOS: allowed and recorded; another id map: refused, nothing written."""
    prompts = write_parquet(prompt_rows(), tmp_path / "p.parquet")
    teacher = build_model(tmp_path / "t", "qwen2", train_tokenizer("chatml", eos="<|im_end|>"))
    rollout_run(
        _rollout_cfg(
            tmp_path / "r", qwen_dir, prompts, "rollout.backend=hf", f"teacher.path={teacher}"
        )
    )
    m = store.open_committed(tmp_path / "r" / "rollouts", rollouts_schema)
    rec = m["extra"]["tokenizers"]
    assert rec["special_differences"] == ["eos_token"]
    assert rec["special_tokens"]["teacher"]["eos_token"] == "<|im_end|>"
    other_tok = train_tokenizer("chatml")
    other_tok.add_tokens(["zzz-new"])
    other = build_model(tmp_path / "o", "qwen2", other_tok)
    with pytest.raises(UserError, match="tokenizers differ"):
        rollout_run(
            _rollout_cfg(
                tmp_path / "r2", qwen_dir, prompts, "rollout.backend=hf", f"teacher.path={other}"
            )
        )
    assert not (tmp_path / "r2").exists()


def test_template_file_replaces_the_tokenizers(tmp_path, qwen_tok):
    f = tmp_path / "t.jinja"
    f.write_text(CHATML.replace("<|im_start|>assistant\n", "<|im_start|>assistant: "))
    (item,) = items_of(
        qwen_tok, [{"id": "t", "messages": MESSAGES}], RolloutConfig(chat_template=str(f))
    )
    assert item.train_ids == template_ids(qwen_tok, MESSAGES, chat_template=f.read_text())
    assert item.train_ids != template_ids(qwen_tok, MESSAGES)
    with pytest.raises(UserError, match="chat template file not found"):
        items_of(
            qwen_tok, [{"id": "t", "messages": MESSAGES}], RolloutConfig(chat_template="/nope")
        )


def test_expanded_turns_are_stored_per_rollout(tmp_path, qwen_dir):
    conv = MESSAGES + [
        {"role": "assistant", "content": "vexton."},
        {"role": "user", "content": "and the leader?"},
    ]
    prompts = write_parquet(
        [{"id": "c", "messages": conv}, {"id": "d", "messages": MESSAGES}], tmp_path / "p.parquet"
    )
    rollout_run(
        _rollout_cfg(
            tmp_path / "r", qwen_dir, prompts, "rollout.backend=hf", "rollout.expand_turns=true"
        )
    )
    t = store.read_table(tmp_path / "r" / "rollouts", rollouts_schema)
    got = sorted(set(zip(t["prompt_id"].to_pylist(), t["turn"].to_pylist(), strict=True)))
    assert got == [("c@t0", 0), ("c@t1", 1), ("d", 0)]
    assert t.num_rows == 6  # 3 generation points x rollout.n=2
    m = store.open_committed(tmp_path / "r" / "rollouts", rollouts_schema)
    assert m["extra"]["n_generation_points"] == 3 and m["extra"]["n_prompts"] == 2


# ----------------------------------------------------------------------------- data as it comes
def _ids(items):
    return [(i.prompt_id, i.train_ids, i.rollout_ids, i.teacher_ids, i.answer) for i in items]


def test_sharegpt_content_parts_and_trl_completions_read_as_messages(tmp_path, qwen_tok):
    """ShareGPT ``conversations`` (with a top-level ``system``), OpenAI content parts and TRL's
    prompt/completion give the same ids and answers as the equivalent ``messages`` rows."""
    import datasets

    rows = prompt_rows()
    who = {"system": "system", "user": "human", "assistant": "gpt"}
    share = [
        {"id": r["id"], "context": r["context"], "answer": r["answer"],
         "conversations": [{"from": who[m["role"]], "value": m["content"]}
                           for m in r["messages"] if m["role"] != "system"],
         **({"system": r["messages"][0]["content"]} if r["messages"][0]["role"] == "system" else {})}
        for r in rows
    ]  # fmt: skip
    parts = [
        {**r, "messages": [{"role": m["role"], "content": [
            {"type": "text", "text": m["content"][:7]}, {"type": "text", "text": m["content"][7:]}
        ]} for m in r["messages"]]}
        for r in rows
    ]  # fmt: skip
    trl = [
        {"id": r["id"], "context": r["context"], "prompt": r["messages"],
         "completion": [{"role": "assistant", "content": r["answer"]}]}
        for r in rows
    ]  # fmt: skip
    want = _ids(items_of(qwen_tok, rows))
    jsonl = tmp_path / "share.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in share))
    datasets.Dataset.from_list(parts).save_to_disk(str(tmp_path / "parts"))  # Arrow structs
    for table in (
        prompts_schema.read(str(jsonl)),
        prompts_schema.read(str(tmp_path / "parts")),
        prompts_schema.from_rows(trl, "trl"),
    ):
        got = _ids(rollout_plan.build_prompt_ids(qwen_tok, table, RolloutConfig(), 0))
        assert got == want


LAYOUT_ERRORS = {
    "image part": (
        {
            "id": "a",
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "what is this?"},
                        {"type": "image_url", "image_url": {}},
                    ],
                }
            ],
        },
        "content part 1 is a 'image_url' part; only text parts are read",
    ),  # fmt: skip
    "sharegpt speaker": (
        {"id": "a", "conversations": [{"from": "narrator", "value": "x"}]},
        "ShareGPT turn 0 is from 'narrator'",
    ),
    "text only": ({"id": "a", "text": "once upon a time"}, "is a language-modeling row"),
    "alpaca": ({"id": "a", "instruction": "add", "input": "1 2", "output": "3"}, "Alpaca row"),
    "implicit prompt": (
        {"id": "a", "chosen": MESSAGES, "rejected": MESSAGES},
        "preference row without a prompt",
    ),
    "completion list": (
        {"id": "a", "prompt": MESSAGES, "completion": MESSAGES},
        "'completion' must be a string or one assistant message",
    ),
}


@pytest.mark.parametrize("case", list(LAYOUT_ERRORS))
def test_layouts_without_a_prompt_are_one_error_naming_the_layout(tmp_path, case):
    bad, msg = LAYOUT_ERRORS[case]
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"id": "ok", "prompt": "fine"}) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(UserError, match="row 2") as e:
        prompts_schema.read(str(path))
    assert msg in str(e.value) and "Fix:" in e.value.line()


def test_a_lone_surrogate_is_one_error_on_the_cli(tmp_path, qwen_dir):
    path = tmp_path / "p.jsonl"
    path.write_text('{"id": "a", "prompt": "ok"}\n{"id": "b", "prompt": "bad \\ud800 here"}\n')
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "stages.rollout", f"run_dir={run_dir}", f"student.path={qwen_dir}"]
    p = subprocess.run([*cmd, f"data.prompts={path}"], cwd=REPO, capture_output=True, text=True)
    assert p.returncode == 2, p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "row 2 (id 'b'): a string holds a lone surrogate" in lines[0]
    assert not run_dir.exists()


def test_a_prefill_is_continued_not_closed(tmp_path, qwen_tok, qwen_dir):
    """A trailing assistant message is continued (continue_final_message): no end of turn and
    no second assistant header; the rollout stores it in the prefix and the continuation as the
    response. ``final_assistant=regenerate`` writes that turn anew, graded against it."""
    a, b, end = chain_ids(qwen_tok)
    conv = [*MESSAGES, {"role": "assistant", "content": "hello"}]
    (item,) = items_of(qwen_tok, [{"id": "p", "messages": conv, "context": "evidence: x."}])
    want = qwen_tok.apply_chat_template(conv, continue_final_message=True, tokenize=False)
    assert item.train_ids == qwen_tok(want, add_special_tokens=False)["input_ids"]
    assert item.train_ids.count(end) == 2  # system and user closed; the prefill open
    assert qwen_tok.decode(item.train_ids).endswith("<|im_start|>assistant\nhello")
    assert qwen_tok.decode(item.teacher_ids).endswith("assistant\nhello")
    assert item.turn == 0
    (regen,) = items_of(
        qwen_tok, [{"id": "p", "messages": conv}], RolloutConfig(final_assistant="regenerate")
    )
    assert regen.train_ids == template_ids(qwen_tok, MESSAGES) and regen.answer == "hello"
    prompts = write_parquet([{"id": "p", "messages": conv}], tmp_path / "p.parquet")
    rollout_run(_rollout_cfg(tmp_path / "r", qwen_dir, prompts, "rollout.backend=hf"))
    t = store.read_table(tmp_path / "r" / "rollouts", rollouts_schema).to_pylist()
    # the chain continues the prefill and ends the turn: the continuation is the response
    assert all(r["train_prompt_ids"] == item.train_ids and r["response_ids"] == [a, b, end]
               for r in t)  # fmt: skip


def test_a_template_without_a_system_role_gets_the_context_in_the_user_turn(qwen_tok):
    """Gemma's template raises on a system message: the context goes to the user turn; a row
    that has a system message of its own is one error naming the system role."""
    import copy

    from tests.wild_tokenizers import GEMMA

    tok = copy.deepcopy(qwen_tok)
    tok.chat_template = GEMMA
    user = MESSAGES[1:]
    (item,) = items_of(tok, [{"id": "g", "messages": user, "context": "evidence: x."}])
    want = [{"role": "user", "content": "evidence: x.\n\n" + user[0]["content"]}]
    assert item.teacher_ids == template_ids(tok, want)
    assert item.train_ids == template_ids(tok, user)
    with pytest.raises(UserError, match="the chat template has no system role") as e:
        items_of(tok, [{"id": "s", "messages": MESSAGES}])
    assert "Fix: drop the system message" in e.value.line()


def test_the_default_system_prompt_stays_beside_the_context(qwen_tok):
    """ChatML with a default system prompt (Qwen 2.5's): the teacher's prefix is the student's
    with the context added to that prompt, nothing dropped."""
    import copy

    from tests.wild_tokenizers import CHATML_DEFAULT_SYSTEM

    tok = copy.deepcopy(qwen_tok)
    tok.chat_template = CHATML_DEFAULT_SYSTEM
    user = MESSAGES[1:]
    (item,) = items_of(tok, [{"id": "d", "messages": user, "context": "evidence: x."}])
    student, teacher = tok.decode(item.train_ids), tok.decode(item.teacher_ids)
    assert "You are a helpful assistant." in student
    assert teacher == student.replace(
        "You are a helpful assistant.", "You are a helpful assistant.\n\nevidence: x."
    )


def test_expanded_turns_are_graded_against_their_own_replies(qwen_tok):
    conv = MESSAGES + [
        {"role": "assistant", "content": "vexton."},
        {"role": "user", "content": "and the leader?"},
        {"role": "assistant", "content": "mira dost."},
    ]
    items = items_of(qwen_tok, [{"id": "c", "messages": conv}], RolloutConfig(expand_turns=True))
    assert [(i.prompt_id, i.answer) for i in items] == [("c@t0", "vexton."), ("c@t1", "mira dost.")]
    rows = [{"id": "c", "messages": conv[:-1] + [conv[-1]], "answer": "mira"}]
    items = items_of(qwen_tok, rows, RolloutConfig(expand_turns=True))
    assert [i.answer for i in items] == ["vexton.", "mira"]  # the row's answer: its last turn


# ----------------------------------------------------------------------------- stop strings
@pytest.mark.parametrize("flavor", ["byte_bpe", "sentencepiece_bpe"])
def test_stop_strings_cut_at_the_first_token_completing_one(flavor):
    """``cut`` (one pass, bytes) against the plain rule: the first i whose ids[:i+1] bytes hold
    a stop string, on random ids that split characters, with stop strings taken from inside the
    responses (multi-byte characters included)."""
    import random

    from stages.lib import align
    from tests import wild_tokenizers as wt

    tok = getattr(wt, flavor)()
    bm = align.byte_map(tok)
    special = align.special_ids(tok)
    plain = [i for i in range(len(tok)) if i not in special]
    g = random.Random(0)
    hits = 0
    for _ in range(200):
        ids = [g.choice(plain) for _ in range(g.randrange(1, 40))]
        data = b"".join(bm.mid[i] for i in ids)
        a = g.randrange(len(data))
        pat = data[a : a + g.randrange(1, 6)].decode("utf-8", "ignore") or "東"
        stops = decoding.stops_for(tok, None, (), [pat])
        want = next(
            (
                i + 1
                for i in range(len(ids))
                if pat.encode() in b"".join(bm.mid[j] for j in ids[: i + 1])
            ),
            None,
        )
        got = decoding.cut(ids, stops, 64)
        assert got == ((want, "stop") if want else (len(ids), "length")), (ids, pat)
        hits += want is not None
    assert hits > 100


def test_stop_strings_stop_generation_itself(tmp_path, qwen_tok):
    """The stopping criterion ends generation at the token completing the string (inside a
    token, or across two): two forward passes, not max_new_tokens; the chain "he" " w" <end>
    would otherwise run 50 tokens."""
    from transformers import AutoModelForCausalLM

    a, b, _ = chain_ids(qwen_tok)
    model = build_model(tmp_path / "plain", "qwen2", qwen_tok)  # no EOS in its config: no end
    m = AutoModelForCausalLM.from_pretrained(model)
    calls = []
    m.register_forward_hook(lambda *args: calls.append(1))
    assert (qwen_tok.decode([a]), qwen_tok.decode([b])) == ("he", " w")
    for pat in (" ", "he w"):  # ends inside b (its first byte); spans a and b
        calls.clear()
        stops = decoding.stops_for(qwen_tok, model, (), [pat])
        (out,) = decoding.greedy(
            m, qwen_tok, [template_ids(qwen_tok, MESSAGES)], max_new_tokens=50, batch_size=1,
            stops=stops,
        )  # fmt: skip
        assert out.response_ids == [a, b] and out.finish_reason == "stop"
        assert len(calls) == 2, pat
    with pytest.raises(UserError, match="is a special token"):
        decoding.stops_for(qwen_tok, model, (), ["<|im_end|>"])
