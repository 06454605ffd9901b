"""The rollout stage (stages/rollout.py, stages/lib/generation.py) on a real tiny Llama.

Checks the rollouts table (schema, n samples per prompt, guided rollouts by token content), the
stored behaviour log-probs against a transformers forward pass, determinism, resume after SIGKILL,
worker splitting, and one-line user errors from the CLI with no shard written.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from data_schemas import rollouts
from stages.lib import rollout_plan, store
from stages.lib.config import compose
from stages.rollout import run
from tests.conftest import write_prompts

REPO = Path(__file__).resolve().parent.parent
TOL = 1e-3
# The reference run: 3 samples per prompt, half the prompts with a context guided, temperature 0.8
REF_EXTRA = ("rollout.n=3", "rollout.guided_fraction=0.5", "rollout.temperature=0.8")


def overrides(run_dir: Path, lm: Path, prompts: Path, *extra: str) -> list[str]:
    """Small, fast settings; ``extra`` replaces keys given twice (Hydra refuses duplicates)."""
    base = [
        f"run_dir={run_dir}",
        f"student.path={lm}",
        f"data.prompts={prompts}",
        "rollout.backend=hf",
        "rollout.max_new_tokens=8",
        "rollout.prompts_per_shard=4",
        "rollout.batch_size=4",
        *extra,
    ]
    return list({o.split("=", 1)[0]: o for o in base}.values())


def rollout(run_dir: Path, lm: Path, prompts: Path, *extra: str) -> pa.Table:
    run(compose("rollout", overrides(run_dir, lm, prompts, *extra)))
    return store.read_table(run_dir / "rollouts", rollouts)


def by_sample(t: pa.Table) -> list[dict]:
    return sorted(t.to_pylist(), key=lambda r: r["sample_id"])


def contains(seq: list[int], sub: list[int]) -> bool:
    return any(seq[i : i + len(sub)] == sub for i in range(len(seq) - len(sub) + 1))


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """One intra-op thread here and in the CLI subprocesses: on a busy 2-core machine two spinning
    OpenMP threads made generate ~10x slower (measured); also keeps the in-process and
    subprocess runs on the same thread count, so their samples are bitwise comparable."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory) -> Path:
    """12 prompts, 10 with a context and 2 without."""
    path = write_prompts(tmp_path_factory.mktemp("prompts") / "prompts.parquet", 12)
    t = pq.read_table(path)
    ctx = t["context"].to_pylist()
    ctx[10] = ctx[11] = None
    t = t.set_column(t.column_names.index("context"), "context", pa.array(ctx, pa.string()))
    pq.write_table(t, path)
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_lm, prompts_file) -> tuple[Path, pa.Table]:
    """One uninterrupted single-worker run the determinism / resume / worker tests compare with."""
    run_dir = tmp_path_factory.mktemp("reference")
    return run_dir, rollout(run_dir, tiny_lm, prompts_file, *REF_EXTRA)


# ----------------------------------------------------------------------------- content
def test_rows_samples_and_guided_prefixes(reference, tiny_lm, prompts_file):
    from transformers import AutoTokenizer

    from stages.lib.grading import answer_matches

    _, t = reference
    tok = AutoTokenizer.from_pretrained(tiny_lm)
    prompts = {r["id"]: r for r in pq.read_table(prompts_file).to_pylist()}
    rows = t.to_pylist()
    assert len(rows) == 3 * len(prompts)
    assert {r["sample_id"] for r in rows} == {f"{p}#{j}" for p in prompts for j in range(3)}
    guided = set()
    for r in rows:
        p = prompts[r["prompt_id"]]
        assert r["train_prompt_ids"] == tok(p["prompt"])["input_ids"]
        assert r["train_prompt_ids"][0] == tok.bos_token_id
        if p["context"] is None:
            assert not r["is_guided"]
            assert r["rollout_prompt_ids"] == r["teacher_prompt_ids"] == r["train_prompt_ids"]
        else:
            ctx = tok(p["context"], add_special_tokens=False)["input_ids"]
            # the context never reaches the training prefix; the teacher always reads it
            assert not contains(r["train_prompt_ids"], ctx)
            assert contains(r["teacher_prompt_ids"], ctx)
            assert contains(r["rollout_prompt_ids"], ctx) == r["is_guided"]
            if not r["is_guided"]:
                assert r["rollout_prompt_ids"] == r["train_prompt_ids"]
        assert r["is_guided"] == rollout_plan.is_guided(0, p["id"], p["context"] is not None, 0.5)
        if r["is_guided"]:
            guided.add(p["id"])
        assert r["answer"] == p["answer"] and r["kind"] == p["kind"]
        text = tok.decode(r["response_ids"], skip_special_tokens=True)
        assert r["correct"] == answer_matches(text, p["answer"])
        assert r["temperature"] == pytest.approx(0.8)
        if r["finish_reason"] == "eos":
            assert r["response_ids"][-1] == tok.eos_token_id
            assert tok.eos_token_id not in r["response_ids"][:-1]
        else:
            assert len(r["response_ids"]) == 8 and tok.eos_token_id not in r["response_ids"]
    assert 0 < len(guided) < 10  # some, not all, of the 10 prompts with a context


def test_guided_fraction_matches_config():
    """The hash selection hits the configured fraction (2000 prompt ids, sd ~0.01)."""
    for frac in (0.0, 0.3, 1.0):
        got = sum(rollout_plan.is_guided(7, f"q{i}", True, frac) for i in range(2000)) / 2000
        assert abs(got - frac) < 0.04
    assert not rollout_plan.is_guided(7, "q1", False, 1.0)  # no context: never guided


# ----------------------------------------------------------------------------- log-probs
def forward_logprobs(model, prefix: list[int], response: list[int]) -> torch.Tensor:
    ids = torch.tensor([prefix + response])  # [1, L]
    with torch.no_grad():
        logits = model(ids).logits[0].float()  # [L, V]
    lsm = torch.log_softmax(logits[len(prefix) - 1 : -1], dim=-1)  # [T, V]
    return lsm.gather(1, torch.tensor(response)[:, None]).squeeze(1)  # [T]


def assert_logprobs_match(t: pa.Table, lm: Path) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(lm, dtype=torch.float32).eval()
    worst = 0.0
    for r in t.to_pylist():
        ref = forward_logprobs(model, r["rollout_prompt_ids"], r["response_ids"])
        got = torch.tensor(r["behavior_logprobs"])
        worst = max(worst, (ref - got).abs().max().item())
    assert worst < TOL, f"behaviour log-probs differ from a forward pass by {worst}"
    return worst


def test_behavior_logprobs_are_raw_model_logprobs(reference, tiny_lm):
    """Sampled at temperature 0.8 with left padding: stored log-probs are the raw (T=1) ones."""
    assert_logprobs_match(reference[1], tiny_lm)


# ----------------------------------------------------------------------------- determinism
def test_same_seed_same_rows_other_seed_differs(reference, tmp_path, tiny_lm, prompts_file):
    again = rollout(tmp_path / "a", tiny_lm, prompts_file, *REF_EXTRA)
    assert by_sample(again) == by_sample(reference[1])
    # a re-run of a committed dataset does nothing
    summary = run(compose("rollout", overrides(reference[0], tiny_lm, prompts_file, *REF_EXTRA)))
    assert summary["complete"] and summary["shards_written"] == 0
    other = rollout(tmp_path / "b", tiny_lm, prompts_file, *REF_EXTRA, "seed=1")
    assert [r["response_ids"] for r in by_sample(other)] != [
        r["response_ids"] for r in by_sample(reference[1])
    ]


def parquet_bytes(run_dir: Path) -> dict[str, bytes]:
    root = run_dir / "rollouts"
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.parquet"))}


def test_device_cpu_equals_auto_byte_for_byte(reference, tmp_path, tiny_lm, prompts_file):
    """rollout.device is placement only: not in the dataset id, and on a CPU machine auto is the
    CPU, so the Parquet shards are the same bytes."""
    if torch.cuda.is_available():
        pytest.skip("auto is a GPU here: sampling may differ from cpu in the last bit")
    rollout(tmp_path, tiny_lm, prompts_file, *REF_EXTRA, "rollout.device=cpu")
    ref = parquet_bytes(reference[0])
    assert ref and parquet_bytes(tmp_path) == ref


@pytest.mark.parametrize("value", ["gpu", "cuda:", "cuda:-1", "CUDA", "cpu:0"])
def test_bad_device_string_fails_at_compose(tmp_path, tiny_lm, prompts_file, value):
    from stages.lib.errors import UserError

    with pytest.raises(UserError, match="rollout.device"):
        compose("rollout", overrides(tmp_path, tiny_lm, prompts_file, f"rollout.device={value}"))


def test_two_workers_union_equals_one_worker(reference, tmp_path, tiny_lm, prompts_file):
    w = ("worker.count=2",)
    run(
        compose(
            "rollout", overrides(tmp_path, tiny_lm, prompts_file, *REF_EXTRA, *w, "worker.index=0")
        )
    )
    assert not (tmp_path / "rollouts" / "_manifest.json").exists()  # worker 1 still to run
    t = rollout(tmp_path, tiny_lm, prompts_file, *REF_EXTRA, *w, "worker.index=1")
    assert by_sample(t) == by_sample(reference[1])


def cli(run_dir: Path, lm: Path | str, prompts: Path | str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "stages.rollout", f"teacher.path={lm}"] + overrides(
        run_dir, Path(lm), Path(prompts), *extra
    )


def test_sigkill_then_rerun_equals_uninterrupted(reference, tmp_path, tiny_lm, prompts_file):
    """Kill the CLI once shard 0 of 3 is committed; the re-run fills in the rest, no duplicates."""
    run_dir = tmp_path / "killed"
    first = run_dir / "rollouts" / store.shard_relpath(0)
    proc = subprocess.Popen(cli(run_dir, tiny_lm, prompts_file, *REF_EXTRA), cwd=REPO, env=env())
    deadline = time.time() + 120
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the stage finished before it could be killed"
    done = sorted((run_dir / "rollouts").glob("bucket=*/shard-*.parquet"))
    assert 1 <= len(done) < 3 and not (run_dir / "rollouts" / "_manifest.json").exists()
    summary = run(compose("rollout", overrides(run_dir, tiny_lm, prompts_file, *REF_EXTRA)))
    assert summary["shards_resumed"] == len(done)
    t = store.read_table(run_dir / "rollouts", rollouts)
    assert by_sample(t) == by_sample(reference[1])
    assert len({r["sample_id"] for r in t.to_pylist()}) == t.num_rows == 36


# ----------------------------------------------------------------------------- errors
def test_too_long_skip_lists_ids_and_sft_checkpoint_is_the_policy(tmp_path, tiny_lm):
    prompts = write_prompts(tmp_path / "p.jsonl", 4)
    lines = prompts.read_text().splitlines()
    lines[2] = lines[2].replace('"prompt": "', '"prompt": "' + "w1 " * 60)
    prompts.write_text("\n".join(lines) + "\n")
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_lm, run_dir / "checkpoints" / "sft" / "final")
    extra = ("rollout.max_prompt_tokens=40", "rollout.too_long=skip", "sft.enabled=true")
    summary = run(compose("rollout", overrides(run_dir, tiny_lm, prompts, *extra)))
    m = store.open_committed(run_dir / "rollouts", rollouts)
    assert [s["id"] for s in m["extra"]["skipped_too_long"]] == ["p002"]
    assert m["extra"]["policy_path"] == str(run_dir / "checkpoints" / "sft" / "final")
    assert summary["skipped_too_long"] == 1
    got = store.read_table(run_dir / "rollouts", rollouts)
    assert sorted(set(got["prompt_id"].to_pylist())) == ["p000", "p001", "p003"]


def test_cli_errors_are_one_line_and_write_nothing(tmp_path, tiny_lm, prompts_file):
    from transformers import AutoTokenizer

    long_prompts = write_prompts(tmp_path / "long.jsonl", 3)
    lines = long_prompts.read_text().splitlines()
    lines[1] = lines[1].replace('"prompt": "', '"prompt": "' + "w2 " * 300)
    long_prompts.write_text("\n".join(lines) + "\n")
    row = json.loads(lines[1])
    n_tokens = len(
        AutoTokenizer.from_pretrained(tiny_lm)(f"{row['context']} {row['prompt']}")["input_ids"]
    )
    limit = 256 - 8  # context length - max_new_tokens
    cases = {
        "too_long": (
            cli(tmp_path / "a", tiny_lm, long_prompts),
            ["'p001'", f"{n_tokens} tokens", f"limit of {limit}"],
        ),
        "no_model": (cli(tmp_path / "b", tmp_path / "nope", prompts_file), ["nope", "student"]),
        "no_prompts": (cli(tmp_path / "c", tiny_lm, tmp_path / "none.jsonl"), ["none.jsonl"]),
    }
    if not torch.cuda.is_available():  # checked before the writer opens: no rollouts/ at all
        cases["no_cuda"] = (
            cli(tmp_path / "d", tiny_lm, prompts_file, "rollout.device=cuda"),
            ["rollout.device=cuda", "CUDA is not available"],
        )
    procs = {
        k: subprocess.Popen(
            c, cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for k, (c, _) in cases.items()
    }
    for k, p in procs.items():
        _, err = p.communicate(timeout=120)
        assert p.returncode == 2, (k, err)
        lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
        assert len(lines) == 1 and "Traceback" not in err, (k, err)
        for word in cases[k][1]:
            assert word in lines[0], (k, word, lines[0])
    for d in ("a", "b", "c"):
        assert not list((tmp_path / d).glob("rollouts/bucket=*/*.parquet"))
    assert not (tmp_path / "d" / "rollouts").exists()


def test_log_progress_and_final_line(tmp_path, tiny_lm, prompts_file):
    """stdout is a pipe (a log): periodic progress lines instead of a bar, and a last line that
    says what was written where."""
    p = subprocess.run(
        cli(tmp_path / "run", tiny_lm, prompts_file),
        cwd=REPO,
        env=env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr
    out = [ln for ln in p.stdout.splitlines() if ln.startswith("[rollout]")]
    assert any(ln.startswith("[rollout] 12/12 prompts (100%)") for ln in out), p.stdout
    assert out[-1].endswith(f"wrote {tmp_path / 'run' / 'rollouts'}"), out[-1]
    assert "\r" not in p.stdout and "\r" not in p.stderr  # no bar redrawn into the log


# ----------------------------------------------------------------------------- the HF loop
@pytest.fixture(scope="module")
def padded_lm(tmp_path_factory) -> Path:
    """Another seed, and 20 padded embedding rows past the tokenizer (never sampled, masked out
    of the stored log-probs)."""
    from tests.conftest import WORDS, build_tiny_lm

    return build_tiny_lm(
        tmp_path_factory.mktemp("padded_lm"), seed=3, pad_vocab_to=len(WORDS) + 4 + 20
    )


def sample_hf(lm: Path, prompts: list[list[int]], s, share: bool, seed: int, batch: int):
    """``decoding.hf_generate`` on ``lm``, plus the number of token positions its forwards ran."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stages.lib import decoding

    model = AutoModelForCausalLM.from_pretrained(lm, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(lm)
    decoding.plain_generation_config(model, tok)
    positions = []
    model.model.register_forward_hook(
        lambda m, a, kw, out: positions.append(kw["input_ids"].numel()), with_kwargs=True
    )
    out = decoding.hf_generate(
        model,
        prompts,
        s,
        stops=decoding.stops_for(tok, lm),
        pad=decoding.pad_id(tok),
        n_ids=len(tok),
        batch_size=batch,
        seed=seed,
        tok=tok,
        share_prefix=share,
    )
    return out, sum(positions)


RAGGED = [
    [2] + [5 + (i * 7 + j) % 80 for j in range(k)] for i, k in enumerate((0, 3, 14, 7, 1, 22))
]


@pytest.mark.parametrize("seed,batch,temperature", [(0, 4, 0.8), (1, 3, 1.0), (2, 6, 0.5)])
def test_prefill_once_for_n_samples_same_rows(padded_lm, seed, batch, temperature):
    """Each prompt's prefix runs once for its n samples: the same tokens (the RNG stream is
    consumed the same way) and log-probs equal to the per-sample prefill within fp32 rounding;
    fewer positions through the model. Ragged prompts, a one-token prompt, padded vocabulary."""
    from stages.lib.decoding import Sampling

    s = Sampling(4, temperature, 0.9, 10)
    shared, n_shared = sample_hf(padded_lm, RAGGED, s, True, seed, batch)
    plain, n_plain = sample_hf(padded_lm, RAGGED, s, False, seed, batch)
    worst = 0.0
    for a, b in zip(shared, plain, strict=True):
        for x, y in zip(a, b, strict=True):
            assert (x.response_ids, x.finish_reason) == (y.response_ids, y.finish_reason)
            worst = max([worst] + [abs(u - v) for u, v in zip(x.logprobs, y.logprobs, strict=True)])
    assert worst <= 1e-5, worst
    assert n_shared < n_plain
    # sampled: the n samples of a prompt are not all the same
    assert any(len({tuple(x.response_ids) for x in per}) > 1 for per in shared)


@pytest.mark.parametrize("strings", [(), ("w1",)])
def test_split_decoding_runs_and_equals_the_repeated_cache(padded_lm, monkeypatch, strings):
    """With n > 1 the HF loop keeps each prefix once (decoding.split_decode: every layer's
    attention split into prefix and own keys) and samples what the repeated-cache ``generate``
    samples: the same tokens, finish reasons (stop strings too) and log-probs within 1e-5."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stages.lib import decoding
    from stages.lib import prefix_attention as pa

    model = AutoModelForCausalLM.from_pretrained(padded_lm, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(padded_lm)
    decoding.plain_generation_config(model, tok)
    s = decoding.Sampling(3, 0.9, 0.95, 12)
    kw = dict(stops=decoding.stops_for(tok, padded_lm, strings=strings), pad=decoding.pad_id(tok),
              n_ids=len(tok), batch_size=4, seed=5, tok=tok, share_prefix=True)  # fmt: skip
    calls = []
    real = pa.split_attention
    monkeypatch.setattr(pa, "split_attention", lambda *a: calls.append(1) or real(*a))
    split = decoding.hf_generate(model, RAGGED, s, **kw)
    assert calls, "the split decoding did not run"
    monkeypatch.setattr(pa, "fits", lambda *a: False)
    repeated = decoding.hf_generate(model, RAGGED, s, **kw)
    worst, reasons = 0.0, set()
    for a, b in zip(split, repeated, strict=True):
        for x, y in zip(a, b, strict=True):
            assert (x.response_ids, x.finish_reason) == (y.response_ids, y.finish_reason)
            reasons.add(x.finish_reason)
            worst = max([worst] + [abs(u - v) for u, v in zip(x.logprobs, y.logprobs, strict=True)])
    assert worst <= 1e-5, worst
    assert ("stop" in reasons) == bool(strings)


def test_prefilled_cache_is_preallocated_for_full_attention_only(padded_lm):
    """The shared prefill's cache becomes a StaticCache of prompt + new-token positions holding
    the prefix (what generate then writes in place); a model with sliding-window layers keeps the
    dynamic cache (a window has its own rule)."""
    from transformers import AutoModelForCausalLM, MistralConfig, MistralForCausalLM, StaticCache

    from stages.lib import decoding

    model = AutoModelForCausalLM.from_pretrained(padded_lm, dtype=torch.float32).eval()
    ids, mask = decoding.left_pad(RAGGED[:3], 0)  # [3, L]
    with torch.no_grad():
        _, _, dyn = decoding.prefill_shared(model, ids, mask, 2)
        rows, _, pre = decoding.prefill_shared(model, ids, mask, 2, new_tokens=5)
    assert isinstance(pre, StaticCache) and rows.shape[0] == 6
    for a, b in zip(dyn.layers, pre.layers, strict=True):
        p = a.keys.shape[2]  # the prefix's L - 1 positions, then zeros for the new tokens
        assert b.keys.shape[2] == ids.shape[1] + 5 and torch.equal(b.keys[:, :, :p], a.keys)
        assert torch.equal(b.values[:, :, :p], a.values) and not b.keys[:, :, p:].any()
    cfg = MistralConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=1, sliding_window=4)  # fmt: skip
    windowed = MistralForCausalLM(cfg).eval()
    with torch.no_grad():
        _, _, cache = decoding.prefill_shared(windowed, ids % 64, mask, 2, new_tokens=5)
    assert not isinstance(cache, StaticCache)


def test_step_logprobs_are_the_masked_raw_distribution(padded_lm):
    """The log-prob recorded each step is the fp32 log-softmax of the raw logits over the
    tokenizer's rows (padded rows excluded, as sampled at temperature 1), at the sampled token."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stages.lib.decoding import Sampling

    out, _ = sample_hf(padded_lm, RAGGED, Sampling(3, 0.7, 1.0, 12), True, 5, 4)
    model = AutoModelForCausalLM.from_pretrained(padded_lm, dtype=torch.float32).eval()
    n_ids = len(AutoTokenizer.from_pretrained(padded_lm))
    worst = 0.0
    for prefix, per in zip(RAGGED, out, strict=True):
        for smp in per:
            ids = torch.tensor([prefix + smp.response_ids])  # [1, L]
            with torch.no_grad():
                logits = model(ids).logits[0, len(prefix) - 1 : -1, :n_ids].float()  # [T, V]
            ref = torch.log_softmax(logits, -1).gather(1, ids[0, len(prefix) :, None])[:, 0]
            worst = max(worst, (ref - torch.tensor(smp.logprobs)).abs().max().item())
    assert worst < 1e-4, worst


# ----------------------------------------------------------------------------- vLLM
@pytest.mark.vllm
def test_vllm_backend_logprobs_and_schema(tmp_path, tiny_lm, prompts_file):
    from stages.lib import vllm_backend

    ok, why = vllm_backend.vllm_available()
    if not ok:
        pytest.skip(f"vLLM not usable here: {why}")
    t = rollout(
        tmp_path, tiny_lm, prompts_file, *REF_EXTRA, "rollout.backend=vllm", "rollout.top_p=0.9"
    )
    assert t.num_rows == 36
    assert store.open_committed(tmp_path / "rollouts", rollouts)["extra"]["backend"] == "vllm"
    assert_logprobs_match(t, tiny_lm)
    # shut the engine down while pytest's streams are still open (quiet exit)
    vllm_backend.clear_llm_cache()
    gc.collect()
