"""The train stage on real tiny models and a real selected table (no mocks).

``make_selection`` hand-builds ``run_dir/selected/<name>/`` the way the pipeline would: responses
sampled from the tiny student, behaviour log-probs from the student, teacher log-prob / top-K /
log-mass from a tiny teacher through ``stages.lib.logprobs.sequence_stats``, written with
``store.open_writer`` and committed with a tokenizer fingerprint.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from data_schemas import selected
from stages.lib import models, store
from stages.lib.config import compose
from stages.lib.errors import UserError
from stages.lib.logprobs import sequence_stats
from stages.lib.losses import combined_loss
from stages.lib.training.objective import lr_factor
from stages.train import run
from tests.conftest import WORDS, build_tiny_lm


# ----------------------------------------------------------------------------- data builder
@torch.no_grad()
def sample_sequences(
    student: Path, n: int, prompt_len: int, resp_len: int, seed: int, samples: int = 1
):
    """(prompts, responses): random prompts after BOS, responses sampled from the student
    (``samples`` per prompt, next to each other, as the rollout writes them)."""
    model = models.load_model(str(student), "student")
    tok = models.load_tokenizer(str(student))
    v = models.vocab_size(tok)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, v, (n, prompt_len), generator=g)  # [B, P]
    ids = torch.cat([torch.full((n, 1), tok.bos_token_id), ids], 1).repeat_interleave(samples, 0)
    for _ in range(resp_len):
        logits = model(input_ids=ids).logits[:, -1, :v]  # [B, V]
        nxt = torch.multinomial(torch.softmax(logits.float(), -1), 1, generator=g)  # [B, 1]
        ids = torch.cat([ids, nxt], 1)
    return ids[:, : prompt_len + 1].tolist(), ids[:, prompt_len + 1 :].tolist()


def make_selection(
    run_dir: Path,
    student: Path,
    teacher: Path,
    *,
    name: str = "all",
    n: int = 16,
    prompt_len: int = 4,
    resp_len: int = 6,
    k: int = 8,
    row_group_rows: int = 4,
    seed: int = 0,
    weights=None,
    keep_first: int | None = None,
    tok_fp: str | None = None,
    samples: int = 1,
) -> Path:
    """Write and commit ``run_dir/selected/<name>`` (see the module docstring).

    ``weights(i, t)`` gives token weights; ``keep_first`` truncates every response to its first
    tokens AFTER scoring (the "only the kept tokens" table). ``samples``: responses per prompt
    (``n`` prompts, ``n * samples`` rows).
    """
    prompts, responses = sample_sequences(student, n, prompt_len, resp_len, seed, samples)
    tok = models.load_tokenizer(str(student))
    v = models.vocab_size(tok)
    t_model = models.load_model(str(teacher), "teacher")
    s_model = models.load_model(str(student), "student")
    t_stats = sequence_stats(t_model, prompts, responses, k, v)
    b_stats = sequence_stats(s_model, prompts, responses, 1, v, want_entropy=False)
    rows = []
    for i, (p, r) in enumerate(zip(prompts, responses)):
        t, b = t_stats[i], b_stats[i]
        w = [float(weights(i, j)) if weights else 1.0 for j in range(len(r))]
        cut = keep_first or len(r)
        rows.append(
            {
                "sample_id": f"p{i // samples}#{i % samples}",
                "prompt_id": f"p{i // samples}",
                "is_guided": False,
                "train_prompt_ids": p,
                "response_ids": r[:cut],
                "response_len": cut,
                "n_kept": int(sum(x > 0 for x in w[:cut])),
                "weights": w[:cut],
                "segments": [0] * cut,
                "teacher_logprob": t["logprob"][:cut].tolist(),
                "behavior_logprob": b["logprob"][:cut].tolist(),
                "ref_logprob": None,
                "topk_k": k,
                "teacher_topk_ids": t["topk_ids"][:cut].reshape(-1).tolist(),
                "teacher_topk_logprobs": t["topk_logprobs"][:cut].reshape(-1).tolist(),
                "teacher_topk_logmass": np.minimum(t["topk_logmass"][:cut], 0.0).tolist(),
                "behavior_topk_k": 0,
                "behavior_topk_ids": None,
                "teacher_logprobs_on_behavior_topk": None,
            }
        )
    out = run_dir / "selected" / name
    table = pa.Table.from_pylist(rows, schema=selected.SCHEMA)
    fps = {"tokenizer": tok_fp or models.tokenizer_fingerprint(tok)}
    with store.open_writer(
        out,
        selected,
        dataset_id=store.content_id(
            [name, seed, n, keep_first, str(run_dir)] + ([samples] if samples > 1 else [])
        ),
        stage="select",
        row_group_rows=row_group_rows,
        vocab_size=v,
        overwrite=True,
    ) as w:
        w.write_shard(0, table)
        assert w.commit(1, config={}, fingerprints=fps, inputs={})
    return out


def train_cfg(run_dir: Path, student: Path, *extra: str):
    return compose(
        "train",
        [
            f"run_dir={run_dir}",
            f"student.path={student}",
            "train.shuffle=false",
            "train.trackers=[]",
            "train.log_every=1",
            "train.schedule=constant",
            "train.lr=1e-2",
            "train.grad_clip=0",
            "train.chunk_positions=16",
            *extra,
        ],
    )


def params_of(path: str) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return {
        k: v.detach().clone()
        for k, v in AutoModelForCausalLM.from_pretrained(path).state_dict().items()
    }


def assert_params_close(a: dict, b: dict, atol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=1e-5, msg=k)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """One intra-op thread for these tiny models: faster alone, and ~10x faster on a loaded
    machine, where each op's barrier waits for a descheduled sibling thread. Restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_world")
    student = build_tiny_lm(root / "student", seed=0)
    teacher = build_tiny_lm(root / "teacher", seed=1)
    return root, student, teacher


# ----------------------------------------------------------------------------- unit math
def test_lr_schedule_warmup_then_cosine_to_min():
    f = lambda s: lr_factor(s, warmup=2, total=10, schedule="cosine", min_ratio=0.1)  # noqa: E731
    assert f(0) == 0.5 and f(1) == 1.0 and f(2) == 1.0
    assert f(9) > 0.1 and abs(f(10) - 0.1) < 1e-9
    assert all(f(s) >= f(s + 1) for s in range(2, 10))


# ----------------------------------------------------------------------------- normalisation
def _dense_grad_norm(student: Path, sel_dir: Path, vocab: int) -> float:
    """‖∇ Σ w L / Σ w‖ from one dense forward of all sequences (the reference)."""
    t = store.read_table(sel_dir, selected)
    model = models.load_model(str(student)).train()
    tot, wsum = 0.0, 0.0
    for row in t.to_pylist():
        p, r = row["train_prompt_ids"], row["response_ids"]
        ids = torch.tensor([p + r])
        logits = model(input_ids=ids).logits[0, len(p) - 1 : len(p) + len(r) - 1]  # [T, V]
        k = row["topk_k"]
        batch = {
            "token_id": torch.tensor(r),
            "weight": torch.tensor(row["weights"]),
            "teacher_logprob": torch.tensor(row["teacher_logprob"]),
            "behavior_logprob": torch.tensor(row["behavior_logprob"]),
            "teacher_topk_ids": torch.tensor(row["teacher_topk_ids"]).view(-1, k),
            "teacher_topk_logprobs": torch.tensor(row["teacher_topk_logprobs"]).view(-1, k),
            "teacher_topk_logmass": torch.tensor(row["teacher_topk_logmass"]),
        }
        loss, _ = combined_loss(logits, batch, [("topk_fkl", 1.0, {})], vocab)
        tot = tot + loss
        wsum += sum(row["weights"])
    (tot / wsum).backward()
    return float(torch.sqrt(sum((p.grad**2).sum() for p in model.parameters())))


def test_accumulation_split_does_not_change_the_update(world, tmp_path):
    root, student, teacher = world
    rd = tmp_path / "run"
    # uneven weights: a per-micro-batch mean would weight sequences differently than the global one
    sel = make_selection(rd, student, teacher, n=8, weights=lambda i, j: (i % 3) * 0.5 + (j % 2))
    seq = 5 + 6
    common = ["loss=topk_fkl", "train.max_steps=1"]
    one = run(
        train_cfg(rd, student, *common, f"train.micro_batch_tokens={8 * seq}", "train.name=one")
    )
    four = run(
        train_cfg(
            rd,
            student,
            *common,
            f"train.micro_batch_tokens={2 * seq}",
            "train.grad_accum=4",
            "train.name=four",
        )
    )
    assert one["plan"]["micro_per_rank"] == [1] and four["plan"]["micro_per_rank"] == [4]
    # Adam's first step is ~lr·sign(g): elements with |g| at float-noise level may differ by a
    # fraction of lr; 1e-4 = 1 % of lr still catches any change in how sequences are weighted.
    assert_params_close(params_of(one["final"]), params_of(four["final"]), atol=1e-4)
    # Adam's first step hides a global gradient scale: check the norm against a dense reference
    ref = _dense_grad_norm(student, sel, len(WORDS) + 4)
    assert one["metrics"]["grad_norm"] == pytest.approx(ref, rel=1e-4)
    assert four["metrics"]["grad_norm"] == pytest.approx(ref, rel=1e-4)
    assert one["history"][0] == pytest.approx(four["history"][0], rel=1e-5)


def test_zero_weights_equal_a_table_of_only_the_kept_tokens(world, tmp_path):
    root, student, teacher = world
    # second half of every response has weight 0 ...
    half = make_selection(tmp_path / "a", student, teacher, n=8, weights=lambda i, j: float(j < 3))
    # ... vs the same sequences cut to their first half (causal: earlier logits are unchanged)
    make_selection(tmp_path / "b", student, teacher, n=8, keep_first=3)
    assert store.read_table(half, selected)["n_kept"].to_pylist() == [3] * 8
    ra = run(
        train_cfg(
            tmp_path / "a",
            student,
            "loss=opd_k1",
            "train.max_steps=2",
            "train.micro_batch_tokens=44",
        )
    )
    rb = run(
        train_cfg(
            tmp_path / "b",
            student,
            "loss=opd_k1",
            "train.max_steps=2",
            "train.micro_batch_tokens=32",  # 4 sequences of 8 tokens, as 4 of 11 in a
        )
    )
    assert_params_close(params_of(ra["final"]), params_of(rb["final"]))
    assert ra["history"] == pytest.approx(rb["history"], rel=1e-5)
    assert ra["metrics"]["kept_fraction"] == pytest.approx(0.5)
    assert rb["metrics"]["kept_fraction"] == 1.0


# ----------------------------------------------------------------------------- resume
def test_resume_continues_bit_exactly(world, tmp_path):
    root, student, teacher = world
    rd = tmp_path / "run"
    make_selection(rd, student, teacher, n=12, row_group_rows=3)
    args = [
        "loss=vopd",
        "train.epochs=2",
        "train.micro_batch_tokens=33",
        "train.save_every=2",
        "train.shuffle=true",
    ]
    args += [
        "train.schedule=cosine",
        "train.warmup_steps=1",
        "train.grad_clip=1.0",
        "train.lr=3e-3",
    ]
    full = run(train_cfg(rd, student, *args))
    assert full["steps"] == 8
    ckpts = Path(full["final"]).parent
    ref = params_of(full["final"])
    # simulate a crash after the step-2 save, in the middle of writing step 4
    for p in ckpts.iterdir():
        if p.name not in ("step-000002",):
            shutil.rmtree(p)
    (ckpts / ".tmp-step-000004").mkdir()
    (ckpts / ".tmp-step-000004" / "junk").write_text("half-written")
    again = run(train_cfg(rd, student, *args))
    assert not again["skipped"]
    assert again["history"] == full["history"]  # bit-exact on CPU
    assert_params_close(ref, params_of(again["final"]), atol=0)
    lines = (
        (rd / "train" / Path(full["final"]).parent.name / "metrics.jsonl").read_text().splitlines()
    )
    assert [json.loads(x)["step"] for x in lines] == list(range(1, 9))
    # a finished run is not retrained
    assert run(train_cfg(rd, student, *args))["skipped"]


def test_resume_from_another_model_is_refused(world, tmp_path):
    root, student, teacher = world
    rd = tmp_path / "run"
    make_selection(rd, student, teacher, n=8)
    run(
        train_cfg(
            rd, student, "train.max_steps=2", "train.save_every=1", "train.micro_batch_tokens=22"
        )
    )
    shutil.rmtree(rd / "checkpoints" / "opd_k1-all" / "final")
    with pytest.raises(UserError, match="another init"):
        run(train_cfg(rd, teacher, "train.max_steps=2", "train.micro_batch_tokens=22"))
    with pytest.raises(UserError, match="already exist"):
        run(train_cfg(rd, student, "train.resume=false", "train.micro_batch_tokens=22"))


def test_tokenizer_mismatch_is_refused(world, tmp_path):
    root, student, teacher = world
    rd = tmp_path / "run"
    make_selection(rd, student, teacher, n=4, tok_fp="tok-someoneelse")
    with pytest.raises(UserError, match="tokenizers differ"):
        run(train_cfg(rd, student))


# ----------------------------------------------------------------------------- learning
@torch.no_grad()
def dense_reverse_kl(model_path: str, teacher: Path, prompts, responses) -> float:
    """Mean over held-out response positions of KL(π_θ‖π_T) over the full vocabulary."""
    s, t = models.load_model(model_path), models.load_model(str(teacher))
    kls = []
    for p, r in zip(prompts, responses):
        ids = torch.tensor([p + r])
        sl = torch.log_softmax(s(input_ids=ids).logits[0, len(p) - 1 : -1].float(), -1)  # [T, V]
        tl = torch.log_softmax(t(input_ids=ids).logits[0, len(p) - 1 : -1].float(), -1)  # [T, V]
        kls.append((sl.exp() * (sl - tl)).sum(-1))
    return float(torch.cat(kls).mean())


def test_training_lowers_the_kl_to_the_teacher_and_logs_metrics(world, tmp_path):
    root, student, teacher = world
    rd = tmp_path / "run"
    make_selection(rd, student, teacher, n=32, k=16, row_group_rows=8)
    held_p, held_r = sample_sequences(student, 16, 4, 6, seed=123)
    before = dense_reverse_kl(str(student), teacher, held_p, held_r)
    res = run(
        train_cfg(
            rd,
            student,
            "loss=topk_fkl",
            "train.epochs=4",
            "train.lr=2e-3",
            "train.trackers=[tensorboard]",
            "train.micro_batch_tokens=88",
        )
    )
    after = dense_reverse_kl(res["final"], teacher, held_p, held_r)
    assert after < 0.8 * before, (before, after)
    rows = [
        json.loads(x)
        for x in (rd / "train" / "topk_fkl-all" / "metrics.jsonl").read_text().splitlines()
    ]
    assert len(rows) == res["steps"] == 16
    for key in (
        "loss",
        "reward",
        "rkl_k1",
        "staleness",
        "tokens",
        "kept_fraction",
        "grad_norm",
        "lr",
        "tokens_per_s",
    ):
        assert key in rows[-1] and np.isfinite(rows[-1][key]), key
    assert rows[0]["staleness"] == pytest.approx(0.0, abs=1e-4)  # first step: π_θ = π_b
    assert rows[-1]["rkl_k1"] < rows[0]["rkl_k1"]
    assert list((rd / "train" / "topk_fkl-all" / "tb").glob("events.*"))


def test_online_teacher_matches_the_cached_teacher(world, tmp_path):
    root, student, teacher = world
    rd = tmp_path / "run"
    make_selection(rd, student, teacher, n=8)
    args = [
        "loss=opd_k1",  # the fp32 teacher log-prob only: cached top-K log-probs are fp16
        "train.max_steps=3",
        "train.micro_batch_tokens=22",
        f"teacher.path={teacher}",
    ]
    off = run(train_cfg(rd, student, *args, "train.name=off"))
    on = run(train_cfg(rd, student, *args, "train.name=on", "train.online=true"))
    assert on["history"] == pytest.approx(off["history"], rel=1e-4, abs=1e-5)


# ----------------------------------------------------------------------------- LoRA, checkpoints
def test_lora_trains_and_saves_merged_or_adapter(world, tmp_path):
    from transformers import AutoModelForCausalLM

    root, student, teacher = world
    rd = tmp_path / "run"
    make_selection(rd, student, teacher, n=8)
    base = params_of(str(student))
    res = run(
        train_cfg(
            rd,
            student,
            "train.lora.r=4",
            "train.max_steps=2",
            "train.micro_batch_tokens=44",
            "train.save_every=1",
        )
    )
    merged = params_of(res["final"])  # a plain HF checkpoint
    assert merged.keys() == base.keys()
    changed = [k for k in base if not torch.equal(base[k], merged[k])]
    assert changed and all("proj" in k for k in changed)
    assert (Path(res["final"]) / "tokenizer.json").exists()
    res2 = run(
        train_cfg(
            rd,
            student,
            "train.lora.r=4",
            "train.lora.save_merged=false",
            "train.max_steps=2",
            "train.micro_batch_tokens=44",
            "train.name=adapter",
        )
    )
    assert (Path(res2["final"]) / "adapter_config.json").exists()
    from peft import PeftModel

    m = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(student)), res2["final"])
    assert_params_close(
        {k: v for k, v in m.merge_and_unload().state_dict().items()}, merged, atol=1e-6
    )


def test_freeze_keeps_the_matched_parameters_bit_identical(world, tmp_path):
    root, student, teacher = world
    rd = tmp_path / "run"
    make_selection(rd, student, teacher, n=8)
    base = params_of(str(student))
    pats = "train.freeze=[self_attn,embed_tokens]"
    res = run(train_cfg(rd, student, pats, "train.max_steps=2", "train.micro_batch_tokens=44"))
    after = params_of(res["final"])
    frozen = [k for k in base if "self_attn" in k or "embed_tokens" in k]
    assert frozen and all(torch.equal(base[k], after[k]) for k in frozen)
    moved = [k for k in base if "mlp" in k and not torch.equal(base[k], after[k])]
    assert moved  # the MLPs trained


@pytest.mark.parametrize(
    "pats, what",
    [
        ("[no_such_module]", "matches no parameter"),
        ("[.]", "freezes every parameter"),
    ],
)
def test_freeze_that_matches_nothing_or_everything_is_one_line(world, tmp_path, pats, what):
    root, student, teacher = world
    rd = tmp_path / "run"
    make_selection(rd, student, teacher, n=8)
    with pytest.raises(UserError, match=what):
        run(train_cfg(rd, student, f"train.freeze={pats}", "train.max_steps=1"))
    assert not (rd / "checkpoints").exists() or not any((rd / "checkpoints").rglob("*.safetensors"))


@pytest.mark.slow
def test_sigkilled_training_resumes_with_the_same_losses(world, tmp_path):
    """A real crash: SIGKILL the CLI after its step-2 checkpoint, re-run, compare the curves."""
    import os
    import signal
    import subprocess
    import sys
    import time

    root, student, teacher = world
    # 4 micro-batches per epoch: 16 steps, so the run is still going when it is killed after
    # its step-2 checkpoint (7 more checkpoints to write); a finished run would skip the test
    args = ["loss=opd_k1", "train.max_steps=16", "train.micro_batch_tokens=22"]
    args += ["train.epochs=4", "train.lr=1e-3"]
    ref_dir, rd = tmp_path / "ref", tmp_path / "run"
    for d in (ref_dir, rd):
        make_selection(d, student, teacher, n=8)
    full = run(train_cfg(ref_dir, student, *args))  # uninterrupted, no checkpoint but the last
    assert full["steps"] == 16
    args.append("train.save_every=2")
    cmd = [sys.executable, "-m", "stages.train", f"run_dir={rd}", f"student.path={student}"]
    cmd += [
        "train.shuffle=false", "train.trackers=[]", "train.log_every=1",
        "train.schedule=constant", "train.grad_clip=0", "train.chunk_positions=16", "train.lr=1e-2",
        *args,
    ]  # fmt: skip
    # one thread like this process (one_torch_thread): the same float reductions, bit-exact losses
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpts = rd / "checkpoints" / "opd_k1-all"
    deadline = time.time() + 120
    while not (ckpts / "step-000002" / "trainer_state.json").exists() and proc.poll() is None:
        assert time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if (ckpts / "final").exists():
        pytest.skip("the run finished before it could be killed")
    again = run(train_cfg(rd, student, *args))
    assert again["history"] == full["history"]


# ----------------------------------------------------------------------------- checkpoints
def _dir_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def test_final_is_weights_only_in_its_dtype_steps_keep_the_optimizer(world, tmp_path):
    """final/ is what users ship: HF weights in train.final_dtype plus the tokenizer, and a
    trainer state without optimizer moments; step checkpoints keep the moments (exact resume)."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from stages.lib import trainer_state

    root, student, teacher = world
    rd = tmp_path / "run"
    make_selection(rd, student, teacher, n=8)
    args = ["train.max_steps=3", "train.save_every=1", "train.micro_batch_tokens=22"]
    res = run(train_cfg(rd, student, *args, "train.final_dtype=bfloat16"))
    final = Path(res["final"])
    with safe_open(str(final / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    assert "optimizer" not in trainer_state.load(final, 0)
    step = final.parent / "step-000002"
    assert "optimizer" in trainer_state.load(step, 0)
    assert _dir_bytes(final) < _dir_bytes(step) / 4  # bf16 weights only vs fp32 + Adam moments
    loaded = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32).state_dict()
    trained = params_of(str(step))  # fp32; final is one step further, so only the keys match
    assert loaded.keys() == trained.keys()
    # a finished run is not retrained (final's trainer state still marks it finished)
    assert run(train_cfg(rd, student, *args, "train.final_dtype=bfloat16"))["skipped"]


def test_without_optimizer_state_steps_are_smaller_and_resume(world, tmp_path):
    """train.save_optimizer=false: step checkpoints hold no moments; a resume from one runs to
    the end (the moments restart), and final/ is float32 on CPU (final_dtype=auto)."""
    from safetensors import safe_open

    from stages.lib import trainer_state

    root, student, teacher = world
    rd = tmp_path / "run"
    make_selection(rd, student, teacher, n=8)
    args = ["train.max_steps=3", "train.save_every=1", "train.micro_batch_tokens=22"]
    full = run(train_cfg(rd, student, *args, "train.save_optimizer=false"))
    ckpts = Path(full["final"]).parent
    assert "optimizer" not in trainer_state.load(ckpts / "step-000002", 0)
    with safe_open(str(Path(full["final"]) / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}
    shutil.rmtree(ckpts / "final")
    again = run(train_cfg(rd, student, *args, "train.save_optimizer=false"))
    assert not again["skipped"] and again["steps"] == 3
    assert again["history"][:2] == full["history"][:2]  # the steps before the resume point


def test_final_cast_keeps_tied_embeddings_written_once(tmp_path):
    """A tied head cast to bf16 for final/ is saved once and loads tied (as the fp32 save)."""
    from safetensors import safe_open
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from stages.lib.training.checkpoint import _cast

    cfg = Qwen3Config(
        vocab_size=100, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=1, num_key_value_heads=1, head_dim=64, tie_word_embeddings=True,
    )  # fmt: skip
    model = Qwen3ForCausalLM(cfg)
    model.save_pretrained(tmp_path, state_dict=_cast(model.state_dict(), torch.bfloat16))
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
        assert "lm_head.weight" not in keys and all(
            f.get_tensor(k).dtype == torch.bfloat16 for k in keys
        )
    back = Qwen3ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert back.lm_head.weight.data_ptr() == back.model.embed_tokens.weight.data_ptr()
    torch.testing.assert_close(back.lm_head.weight, model.lm_head.weight.bfloat16().float())
