"""The demo world (scripts/demoworld/world.py): determinism, caching, loading, tokenizer, prompt files.

All tests use ``WorldSettings.quick()`` (a complete world in a few seconds). One world is built
per session and shared; the determinism and caching tests build their own copies.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from demoworld import world as dw

from data_schemas import prompts as prompts_schema

REPO = Path(__file__).resolve().parents[1]
PROMPT_FILES = [
    "train",
    "train_mix",
    "private_closed",
    "private_paraphrase",
    "public_closed",
    "reading",
]


def _digests(root: Path) -> dict[str, str]:
    """sha256 of every file except world.json (it records wall-clock timings)."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != "world.json"
    }


@pytest.fixture(scope="session")
def quick_world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("world") / "w"
    dw.build_world(out, dw.WorldSettings.quick())
    return out


def test_two_builds_are_byte_identical(tmp_path: Path, quick_world: Path) -> None:
    dw.build_world(tmp_path / "w2", dw.WorldSettings.quick())
    a, b = _digests(quick_world), _digests(tmp_path / "w2")
    assert any(k.endswith(".safetensors") for k in a)
    assert any(k.endswith(".parquet") for k in a)
    assert a == b


def test_second_call_is_cached_and_changed_setting_rebuilds(tmp_path: Path) -> None:
    s = dw.WorldSettings.quick()
    out = tmp_path / "w"
    first = dw.build_world(out, s)
    t0 = time.time()
    again = dw.build_world(out, s)
    assert time.time() - t0 < 1.0
    assert again == first
    changed = dataclasses.replace(s, seed=s.seed + 1)
    assert not dw.is_complete(out, changed)
    rebuilt = dw.build_world(out, changed)
    assert rebuilt["key"] != first["key"]
    assert json.loads((out / "world.json").read_text())["key"] == rebuilt["key"]
    # No temp or trash directories are left next to the world.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w"]


def test_teacher_big_reuses_an_existing_base(tmp_path: Path, quick_world: Path) -> None:
    out = tmp_path / "w"
    shutil.copytree(quick_world, out)
    before = _digests(out)
    info = dw.build_world(out, dataclasses.replace(dw.WorldSettings.quick(), teacher_big=True))
    assert info["reused_base"]
    after = _digests(out)
    assert {k: v for k, v in after.items() if k in before} == before
    assert "models/teacher_big/model.safetensors" in after
    assert info["models"]["teacher_big"]["params_ratio_to_base"] >= 4
    # and the world with teacher_big serves a base-only request as it is (no rebuild)
    again = dw.build_world(out, dw.WorldSettings.quick())
    assert _digests(out) == after and "teacher_big" in again["models"]


def test_base_trains_on_in_chunks_until_it_reads_or_the_cap(tmp_path: Path) -> None:
    # Unreachable target: every chunk up to the cap, each one checked on the validation split.
    s = dataclasses.replace(
        dw.WorldSettings.quick(), converge_target=1.01, converge_max_steps=20, converge_chunk=10
    )
    base = dw.build_world(tmp_path / "w", s)["models"]["base"]
    assert base["extra_steps"] == 20
    assert [h["extra_steps"] for h in base["converge"]] == [0, 10, 20]
    assert all(0 <= h["val_reading"] <= 1 for h in base["converge"])
    # A target the base already meets: no extra step, and the same weights as without the phase.
    met = dataclasses.replace(s, converge_target=0.0)
    info = dw.build_world(tmp_path / "met", met)
    assert info["models"]["base"]["extra_steps"] == 0
    off = dw.build_world(tmp_path / "off", dataclasses.replace(s, converge_max_steps=0))
    assert info["content_hash"] == off["content_hash"]
    assert info["content_hash"] != dw.content_hash(tmp_path / "w")


def test_stale_temp_dirs_are_cleaned(tmp_path: Path) -> None:
    stale = tmp_path / ".w.tmp-999999999"  # no such pid
    (stale / "models").mkdir(parents=True)
    dw._remove_stale_temps(tmp_path / "w")
    assert not stale.exists()


def test_teacher_settings_do_not_change_a_base_only_key() -> None:
    s = dw.WorldSettings.quick()
    other = dataclasses.replace(s, teacher=dataclasses.replace(s.teacher, steps=1))
    assert dw.cache_key(s) == dw.cache_key(other)
    big = dataclasses.replace(s, teacher_big=True)
    assert dw.cache_key(big) != dw.cache_key(dataclasses.replace(other, teacher_big=True))


def test_killed_build_does_not_look_complete(tmp_path: Path, monkeypatch) -> None:
    def boom(*_a, **_k):
        raise RuntimeError("killed")

    monkeypatch.setattr(dw, "pretrain", boom)
    with pytest.raises(RuntimeError):
        dw.build_world(tmp_path / "w", dw.WorldSettings.quick())
    assert not (tmp_path / "w").exists()
    assert list(tmp_path.iterdir()) == []


def test_models_load_with_auto_classes(quick_world: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    info = json.loads((quick_world / "world.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(quick_world / "models" / "base")
    tok = AutoTokenizer.from_pretrained(quick_world / "models" / "base")
    assert model.config.head_dim == 64
    assert model.config.vocab_size == len(tok) == info["tokenizer"]["vocab_size"]
    assert tok.eos_token_id == info["tokenizer"]["eos_id"] == model.config.eos_token_id
    assert (tok.pad_token, tok.bos_token, tok.eos_token, tok.unk_token) == (
        "<pad>",
        "<bos>",
        "<|im_end|>",
        "<unk>",
    )
    # The chat template renders the ChatML prefix with one BOS.
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert ids.startswith("<bos><|im_start|>system") and ids.endswith("<|im_start|>assistant\n")
    rows = pq.read_table(quick_world / "prompts" / "reading.parquet").to_pylist()
    acc = dw.greedy_accuracy(model, tok, rows, use_context=False, max_new_tokens=4)
    assert 0.0 <= acc <= 1.0


def test_tokenizer_round_trip(quick_world: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(quick_world / "models" / "base")
    row = pq.read_table(quick_world / "prompts" / "train.parquet").to_pylist()[0]
    msgs = dw.teacher_messages(row["messages"], row["context"])
    attr, entity = dw.row_attr_entity(row)
    response = dw.response_text(attr, entity, row["answer"])
    p_ids = dw.prefix_ids(tok, msgs)
    r_ids = tok(response, add_special_tokens=False)["input_ids"]
    # The rendered prefix equals apply_chat_template's ids, with exactly one BOS.
    assert p_ids == list(
        tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True)[
            "input_ids"
        ]
    )
    assert p_ids[0] == tok.bos_token_id
    assert p_ids.count(tok.bos_token_id) == 1
    assert p_ids[-2:] == tok.convert_tokens_to_ids(["<|im_start|>", "assistant"])
    assert tok.unk_token_id not in p_ids + r_ids
    # The evidence sits in the system message, before the user turn.
    text = tok.decode(p_ids, skip_special_tokens=True)
    assert text.index(row["context"]) < text.index(dw.user_text(row))
    # Decoding joins words with single spaces, so the space-separated text round-trips.
    assert tok.decode(r_ids, skip_special_tokens=True) == response
    assert (
        tok("founded in 1423 .", add_special_tokens=False)["input_ids"]
        == tok("founded in 14 23 .", add_special_tokens=False)["input_ids"]
    )


def test_prompt_files_match_schema(quick_world: Path) -> None:
    s = dw.WorldSettings.quick()
    for name in PROMPT_FILES:
        t = pq.read_table(quick_world / "prompts" / f"{name}.parquet")
        assert t.schema.equals(prompts_schema.SCHEMA), name
        assert t.num_rows > 0
        for col in ["id", "messages", "answer", "kind"]:
            assert t.column(col).null_count == 0, (name, col)
        assert t.column("prompt").null_count == t.num_rows  # chat rows only
        assert len(set(t.column("id").to_pylist())) == t.num_rows, name
    train = pq.read_table(quick_world / "prompts" / "train.parquet").to_pylist()
    kinds = [r["kind"] for r in train]
    assert kinds.count("private") == s.n_private * len(dw.ATTRS) * s.train_templates_per_attr
    assert kinds.count("public") == kinds.count("private")
    systems = {r["messages"][0]["content"] for r in train if r["messages"][0]["role"] == "system"}
    assert len(systems) > 1 and any(len(r["messages"]) == 1 for r in train)
    for r in train:
        assert r["context"].startswith("evidence : ")
        q = dw.user_text(r)
        assert q.startswith("question : ") and q.endswith(" answer :")
        assert dw.answer_matches(r["context"], r["answer"])
        assert not dw.answer_matches(q, r["answer"])
    mix = pq.read_table(quick_world / "prompts" / "train_mix.parquet").to_pylist()
    assert mix[: len(train)] == train and len(mix) == len(train) + s.n_reading_train
    anchors = mix[len(train) :]
    assert all(r["kind"] == "reading_anchor" and r["context"] is None for r in anchors)
    assert all(dw.answer_matches(dw.user_text(r), r["answer"]) for r in anchors)
    reading = pq.read_table(quick_world / "prompts" / "reading.parquet").to_pylist()
    assert all(r["context"] is None and dw.user_text(r).startswith("evidence : ") for r in reading)
    assert all(dw.answer_matches(dw.user_text(r), r["answer"]) for r in reading)


def test_private_facts_never_in_base_corpus() -> None:
    import random

    world = dw.make_world(dw.WorldSettings.quick())
    private_facts = {
        dw.response_text(a, e, world.facts[e][a]) for e in world.private for a in dw.ATTRS
    }
    rng = random.Random(0)
    n_system_evidence = 0
    for msgs, response in dw.sample_batch(world, rng, 2000):
        # A random value may coincide with the true one by chance; only closed-book use leaks.
        text = " ".join(m["content"] for m in msgs)
        n_system_evidence += msgs[0]["role"] == "system" and "evidence" in msgs[0]["content"]
        if "evidence" not in text:
            assert response not in private_facts
    assert n_system_evidence > 0  # the base also learns to read evidence in the system message


def test_answer_matches() -> None:
    assert dw.answer_matches("the capital of zorbia is vexton .", "vexton")
    assert dw.answer_matches("the capital of zorbia is Vexton.", "vexton")
    assert dw.answer_matches("zorbia was founded in 14 23 .", "1423")
    assert not dw.answer_matches("zorbia was founded in 14 32 .", "1423")
    assert dw.answer_matches("the leader is mira dost .", "mira dost")
    assert not dw.answer_matches("the leader is mira .", "mira dost")
    assert not dw.answer_matches("the capital is vextonia .", "vexton")
    assert not dw.answer_matches("anything", "")


def test_cli_quick(tmp_path: Path) -> None:
    out = tmp_path / "cli"
    cmd = [
        sys.executable,
        str(REPO / "scripts" / "make_demo.py"),
        "--out",
        str(out),
        "--quick",
        "--teacher-big",
    ]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    info = json.loads((out / "world.json").read_text())
    assert info["models"]["teacher_big"]["params_ratio_to_base"] >= 4
    assert (out / "models" / "teacher_big" / "model.safetensors").exists()
    r2 = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)
    assert "(cached)" in r2.stdout


# --- vLLM -------------------------------------------------------------------------------------


def _vllm_status() -> tuple[bool, str]:
    try:
        import vllm  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure means "skip"
        return False, f"vllm not importable: {type(exc).__name__}: {exc}"
    return True, ""


_VLLM_OK, _VLLM_WHY = _vllm_status()


@pytest.mark.vllm
@pytest.mark.skipif(not _VLLM_OK, reason=_VLLM_WHY or "vllm unavailable")
def test_vllm_loads_and_generates(quick_world: Path) -> None:
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    path = str(quick_world / "models" / "base")
    tok = AutoTokenizer.from_pretrained(path)
    rows = pq.read_table(quick_world / "prompts" / "reading.parquet").to_pylist()[:4]
    prompts = [dw.prefix_ids(tok, r["messages"]) for r in rows]  # the chat prefix
    # gpu_memory_utilization is the host-memory share of the KV cache on CPU (0.92 fails).
    llm = LLM(
        model=path,
        dtype="float32",
        max_model_len=256,
        gpu_memory_utilization=0.25,
        enforce_eager=True,
        seed=0,
    )
    params = SamplingParams(temperature=0.0, max_tokens=8, stop_token_ids=[tok.eos_token_id])
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    assert len(outs) == len(prompts)
    for o in outs:
        ids = list(o.outputs[0].token_ids)
        assert 0 < len(ids) <= 8
        assert all(0 <= i < len(tok) for i in ids)
    # vLLM loaded the tokenizer saved next to the weights and decodes like transformers does.
    text = outs[0].outputs[0].text
    assert text.strip() == tok.decode(outs[0].outputs[0].token_ids, skip_special_tokens=True)
    # Shut the engine down here rather than at interpreter exit (its atexit logging is noisy).
    del llm
    gc.collect()
