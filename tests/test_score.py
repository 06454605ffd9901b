"""The score stage (stages/score.py) against a plain transformers recomputation.

Rollouts are written directly through the shard store (ids from the ``tiny_lm`` tokenizer, random
responses), so these tests do not depend on the rollout stage. The reference for every stored
number is ``log_softmax(model(prefix + response).logits.float())`` at the response positions.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from data_schemas import manifest
from data_schemas import rollouts as rollouts_table
from data_schemas import tokens as tokens_table
from stages.lib import models, store
from stages.lib.config import compose
from stages.lib.errors import UserError
from stages.lib.scoring.hf import pad_right
from stages.lib.scoring.plan import length_buckets, plan_shard
from stages.score import run
from tests.conftest import WORDS, build_tiny_lm

ROOT = Path(__file__).resolve().parent.parent
TOL = 1e-4  # nats, fp32 HF backend vs the plain recomputation
FP16_TOL = 2e-3  # stored fp16 columns (relative ~1e-3)


# ----------------------------------------------------------------------------- helpers
@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one intra-op thread. With two, every 20-token matmul pays an OpenMP barrier
    that costs milliseconds on a busy 2-core CI machine (30x slower, measured)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def write_rollouts(
    run_dir: Path,
    policy: Path,
    *,
    n_rows: int = 12,
    rows_per_shard: int = 4,
    seed: int = 0,
    max_resp: int = 12,
    kinds: tuple[str, ...] = (),
    samples: int = 1,
) -> Path:
    """A committed rollouts table: half the rows guided (rollout prefix = teacher prefix).
    ``samples`` > 1: that many consecutive rows per prompt (rollout.n), guided per prompt."""
    tok = models.load_tokenizer(str(policy))
    v = len(tok)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_rows):
        q = i // samples  # the prompt's index (i itself when one sample per prompt)
        prompt = tok(f"question : w{q % 90} w{(q * 7) % 90} ? answer :").input_ids
        context = tok(f"evidence : w{(q * 3) % 90} .", add_special_tokens=False).input_ids
        teacher = prompt[:1] + context + prompt[1:]
        guided = q % 2 == 0
        resp = rng.integers(4, v, size=int(rng.integers(1, max_resp + 1))).tolist()
        if i % 3 == 0:  # a few identical responses in a row: must not confuse the pass planner
            resp = [5, 6, 7]
        rows.append(
            {
                "sample_id": f"s{i:04d}",
                "prompt_id": f"p{i // 2:03d}" if samples == 1 else f"p{q:03d}",
                "sample_idx": i % 2 if samples == 1 else i % samples,
                "train_prompt_ids": prompt,
                "rollout_prompt_ids": teacher if guided else prompt,
                "teacher_prompt_ids": teacher,
                "response_ids": resp,
                "behavior_logprobs": [-1.0] * len(resp),
                "response_len": len(resp),
                "is_guided": guided,
                "finish_reason": "length",
                "temperature": 1.0,
                "top_p": 1.0,
                "answer": None,
                "kind": kinds[i % len(kinds)] if kinds else None,
                "correct": None,
            }
        )
    rdir = run_dir / "rollouts"
    shards = [rows[s : s + rows_per_shard] for s in range(0, n_rows, rows_per_shard)]
    with store.open_writer(
        rdir, rollouts_table, dataset_id=f"test-rollouts-{seed}", stage="rollout", vocab_size=v
    ) as w:
        for s, part in enumerate(shards):
            w.write_shard(s, pa.Table.from_pylist(part, schema=rollouts_table.SCHEMA))
        assert w.commit(
            len(shards),
            config={},
            fingerprints={
                "student": models.model_fingerprint(str(policy)),
                "tokenizer": models.tokenizer_fingerprint(tok),
            },
            inputs={},
            extra={"policy_path": str(policy)},
        )
    return rdir


def cfg_for(run_dir: Path, student: Path, teacher: Path, *extra: str):
    return compose(
        "score",
        [
            f"run_dir={run_dir}",
            f"student.path={student}",
            f"teacher.path={teacher}",
            "score.backend=hf",
            *extra,
        ],
    )


@functools.cache
def _model(path: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def dense(path: Path, prefix: list[int], response: list[int], vocab: int) -> np.ndarray:
    """[R, V] fp32 log-probs of each response token's position, straight from transformers."""
    ids = torch.tensor([list(prefix) + list(response)])
    with torch.no_grad():
        logits = _model(str(path))(ids).logits[0].float()[:, :vocab]  # [L, V] (padding dropped)
    lsm = torch.log_softmax(logits, dim=-1)
    return lsm[len(prefix) - 1 : len(prefix) + len(response) - 1].numpy()  # [R, V]


def entropy_of(lsm: np.ndarray) -> np.ndarray:
    return -(np.exp(lsm) * lsm).sum(-1)


def read_tokens(run_dir: Path) -> pa.Table:
    return store.read_table(run_dir / "tokens", tokens_table).sort_by(
        [("sample_id", "ascending"), ("pos", "ascending")]
    )


def rollouts_rows(run_dir: Path) -> dict[str, dict]:
    return {
        r["sample_id"]: r
        for r in store.read_table(run_dir / "rollouts", rollouts_table).to_pylist()
    }


# ----------------------------------------------------------------------------- pure pieces
def test_length_buckets_respect_budget_and_cover_all():
    lengths = [5, 30, 7, 7, 100, 12, 3]
    batches = length_buckets(lengths, 32)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 32


def test_length_buckets_trade_padding_for_forwards():
    lengths = [100, 10, 100, 10, 12, 100]  # two length groups, everything fits in one batch
    split = length_buckets(lengths, 10_000, forward_cost=50)
    assert split == [[1, 3, 4], [0, 2, 5]]  # 336 padded tokens + 2 forwards < 600 + 1
    assert length_buckets(lengths, 10_000, forward_cost=1_000) == [[1, 3, 4, 0, 2, 5]]
    assert length_buckets([], 100) == []


def test_pad_right():
    ids, mask = pad_right([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0]]


# ----------------------------------------------------------------------------- numbers
def test_hf_matches_transformers_recomputation(tmp_path, tiny_lm, tiny_teacher):
    """Teacher, behaviour (after the rollout prompt), ref (after the train prompt) and the vOPD
    behaviour-support columns equal a dense recomputation; small batches and chunks exercised."""
    write_rollouts(tmp_path, tiny_lm)
    k, kb = 8, 4
    out = run(
        cfg_for(
            tmp_path,
            tiny_lm,
            tiny_teacher,
            f"ref.path={tiny_lm}",
            f"score.topk={k}",
            f"score.behavior_topk={kb}",
            "score.batch_tokens=40",
            "score.chunk_positions=5",
        )
    )
    assert out["committed"] and out["tokens"] > 0
    vocab = len(models.load_tokenizer(str(tiny_lm)))
    t = read_tokens(tmp_path).to_pylist()
    rows = rollouts_rows(tmp_path)
    assert len(t) == sum(len(r["response_ids"]) for r in rows.values())
    by_sample: dict[str, list[dict]] = {}
    for r in t:
        by_sample.setdefault(r["sample_id"], []).append(r)
    for sid, toks in by_sample.items():
        ro = rows[sid]
        resp = ro["response_ids"]
        assert [x["pos"] for x in toks] == list(range(len(resp)))
        assert [x["token_id"] for x in toks] == resp
        assert all(x["segment"] == 0 and x["is_guided"] == ro["is_guided"] for x in toks)
        d_t = dense(tiny_teacher, ro["teacher_prompt_ids"], resp, vocab)  # [R, V]
        d_b = dense(tiny_lm, ro["rollout_prompt_ids"], resp, vocab)
        d_r = dense(tiny_lm, ro["train_prompt_ids"], resp, vocab)
        for j, x in enumerate(toks):
            assert abs(x["teacher_logprob"] - d_t[j, resp[j]]) < TOL
            true_top = np.argsort(-d_t[j], kind="stable")[:k]
            assert x["teacher_topk_ids"] == true_top.tolist()
            np.testing.assert_allclose(x["teacher_topk_logprobs"], d_t[j, true_top], atol=FP16_TOL)
            mass = np.log(np.exp(d_t[j, true_top].astype(np.float64)).sum())
            assert abs(x["teacher_topk_logmass"] - mass) < TOL
            assert abs(x["teacher_entropy"] - entropy_of(d_t[j])) < FP16_TOL * 3
            assert abs(x["behavior_logprob"] - d_b[j, resp[j]]) < TOL
            assert abs(x["behavior_entropy"] - entropy_of(d_b[j])) < FP16_TOL * 3
            assert abs(x["ref_logprob"] - d_r[j, resp[j]]) < TOL
            b_top = np.argsort(-d_b[j], kind="stable")[:kb]
            assert x["behavior_topk_ids"] == b_top.tolist()
            np.testing.assert_allclose(
                x["teacher_logprobs_on_behavior_topk"], d_t[j, b_top], atol=FP16_TOL
            )
    m = json.loads((tmp_path / "tokens" / manifest.FILENAME).read_text())
    assert m["fingerprints"]["teacher"] == models.model_fingerprint(str(tiny_teacher))
    assert m["fingerprints"]["behavior"] == models.model_fingerprint(str(tiny_lm))
    assert m["fingerprints"]["ref"] == models.model_fingerprint(str(tiny_lm))
    assert m["inputs"]["rollouts"] == "test-rollouts-0"
    assert m["extra"]["entropy_source"] == "hf"


def test_reuse_equals_separate_passes(tmp_path, tiny_lm):
    """Teacher = behaviour = ref = one model (the demo's shape): 2 passes per row, not 3, and the
    same numbers as scoring every role with its own pass (a copy with another fingerprint)."""
    shared, separate = tmp_path / "shared", tmp_path / "separate"
    write_rollouts(shared, tiny_lm, n_rows=8)
    write_rollouts(separate, tiny_lm, n_rows=8)
    # same weights, different fingerprint: forces one pass per role
    t_copy, r_copy = tmp_path / "teacher_copy", tmp_path / "ref_copy"
    for c, tag in ((t_copy, "t"), (r_copy, "r")):
        shutil.copytree(tiny_lm, c)
        conf = json.loads((c / "config.json").read_text())
        conf["_distillery_test_copy"] = tag
        (c / "config.json").write_text(json.dumps(conf))
    kb = "score.behavior_topk=4"
    a = run(cfg_for(shared, tiny_lm, tiny_lm, f"ref.path={tiny_lm}", kb))
    b = run(cfg_for(separate, tiny_lm, t_copy, f"ref.path={r_copy}", kb))
    rows = rollouts_rows(shared)
    distinct = sum(
        len(
            {
                tuple(r["teacher_prompt_ids"]),
                tuple(r["rollout_prompt_ids"]),
                tuple(r["train_prompt_ids"]),
            }
        )
        for r in rows.values()
    )
    assert distinct == 2 * len(rows)
    assert a["passes_run"] == distinct and a["passes_reused"] == len(rows)
    assert b["passes_run"] == 3 * len(rows) and b["passes_reused"] == 0
    ta, tb = read_tokens(shared), read_tokens(separate)
    assert ta.num_rows == tb.num_rows
    for c in tokens_table.SCHEMA_ONE_TEACHER.names:  # one teacher: no teacher_id
        x, y = ta[c].to_pylist(), tb[c].to_pylist()
        if c in ("teacher_logprob", "behavior_logprob", "ref_logprob", "teacher_topk_logmass"):
            np.testing.assert_allclose(x, y, atol=1e-5, err_msg=c)
        elif c in ("teacher_entropy", "behavior_entropy"):
            np.testing.assert_allclose(x, y, atol=2e-3, err_msg=c)
        elif c in ("teacher_topk_logprobs", "teacher_logprobs_on_behavior_topk"):
            np.testing.assert_allclose(np.array(x), np.array(y), atol=2e-3, err_msg=c)
        else:
            assert x == y, c


@pytest.mark.parametrize("pad", [0, 13])
def test_k_equals_vocab_and_padded_vocab(tmp_path, pad):
    """K = V: log-mass exactly 0 and the entropy is the dense one; padded rows never appear."""
    base = build_tiny_lm(
        tmp_path / "m", seed=3, pad_vocab_to=(len(WORDS) + 4 + pad) if pad else None
    )
    write_rollouts(tmp_path / "run", base, n_rows=4)
    vocab = len(WORDS) + 4
    run(cfg_for(tmp_path / "run", base, base, f"score.topk={vocab}", "score.behavior_topk=5"))
    t = read_tokens(tmp_path / "run").to_pylist()
    rows = rollouts_rows(tmp_path / "run")
    for x in t:
        ro = rows[x["sample_id"]]
        d = dense(base, ro["teacher_prompt_ids"], ro["response_ids"], vocab)[x["pos"]]
        assert x["teacher_topk_logmass"] == 0.0
        assert sorted(x["teacher_topk_ids"]) == list(range(vocab))
        assert max(x["behavior_topk_ids"]) < vocab
        assert abs(x["teacher_entropy"] - entropy_of(d)) < FP16_TOL * 3
        assert abs(x["teacher_logprob"] - d[x["token_id"]]) < TOL


# ----------------------------------------------------------------------------- refusals
def test_refuses_teacher_with_other_tokenizer(tmp_path, tiny_lm):
    other = build_tiny_lm(tmp_path / "other", words=[f"v{i}" for i in range(96)])
    write_rollouts(tmp_path / "run", tiny_lm, n_rows=2)
    with pytest.raises(UserError, match="tokenizers differ"):
        run(cfg_for(tmp_path / "run", tiny_lm, other))
    assert not (tmp_path / "run" / "tokens" / manifest.FILENAME).exists()


def test_refuses_teacher_other_than_sft_teacher_unless_allowed(tmp_path, tiny_lm, tiny_teacher):
    run_dir = tmp_path / "run"
    write_rollouts(run_dir, tiny_lm, n_rows=2)
    sft_fp = models.model_fingerprint(str(tiny_lm))
    with store.open_writer(
        run_dir / "sft_data", rollouts_table, dataset_id="sft1", stage="sft"
    ) as w:  # a committed (empty) SFT dataset written by another teacher
        assert w.commit(0, config={}, fingerprints={"teacher": sft_fp}, inputs={})
    with pytest.raises(UserError, match="teacher consistency") as e:
        run(cfg_for(run_dir, tiny_lm, tiny_teacher))
    assert sft_fp in str(e.value) and models.model_fingerprint(str(tiny_teacher)) in str(e.value)
    out = run(cfg_for(run_dir, tiny_lm, tiny_teacher, "score.allow_teacher_mismatch=true"))
    assert out["committed"]
    m = manifest.read(run_dir / "tokens")  # the checked SFT data is a typed input
    assert m["inputs"]["sft_data"] == "sft1" and m["teacher_temperature"] == 1.0
    assert Path(m["models"]["teacher"]["path"]) == Path(tiny_teacher).resolve()
    assert m["models"]["teacher"]["fingerprint"] == m["fingerprints"]["teacher"]


def test_refuses_topk_above_vocab(tmp_path, tiny_lm):
    write_rollouts(tmp_path, tiny_lm, n_rows=2)
    vocab = len(WORDS) + 4
    with pytest.raises(
        UserError, match=f"score.topk={vocab + 1} exceeds the vocabulary size {vocab}"
    ):
        run(cfg_for(tmp_path, tiny_lm, tiny_lm, f"score.topk={vocab + 1}"))


@pytest.mark.slow  # a subprocess pays the import of torch + transformers + hydra (~10 s)
def test_cli_user_error_exits_2(tmp_path, tiny_lm):
    write_rollouts(tmp_path, tiny_lm, n_rows=2)
    p = subprocess.run(
        [sys.executable, "-m", "stages.score", f"run_dir={tmp_path}", f"student.path={tiny_lm}",
         f"teacher.path={tiny_lm}", "score.topk=100000", "score.backend=hf"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert p.returncode == 2 and "score.topk" in p.stderr, p.stderr


# ----------------------------------------------------------------------------- resume, workers
def test_two_workers_equal_one(tmp_path, tiny_lm, tiny_teacher):
    one, two = tmp_path / "one", tmp_path / "two"
    write_rollouts(one, tiny_lm, n_rows=10, rows_per_shard=3)
    write_rollouts(two, tiny_lm, n_rows=10, rows_per_shard=3)
    run(cfg_for(one, tiny_lm, tiny_teacher))
    a = run(cfg_for(two, tiny_lm, tiny_teacher, "worker.index=1", "worker.count=2"))
    assert not a["committed"] and not (two / "tokens" / manifest.FILENAME).exists()
    b = run(cfg_for(two, tiny_lm, tiny_teacher, "worker.index=0", "worker.count=2"))
    assert b["committed"]
    assert read_tokens(one).equals(read_tokens(two))


def test_killed_run_resumes_identically(tmp_path, tiny_lm, tiny_teacher):
    """SIGKILL the CLI after its first token shard lands; a re-run finishes with no duplicates and
    the same table as an uninterrupted run."""
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    kw = dict(n_rows=80, rows_per_shard=2, max_resp=24)  # 40 shards, ~30 ms each
    write_rollouts(killed, tiny_lm, **kw)
    write_rollouts(clean, tiny_lm, **kw)
    args = ["score.batch_tokens=8", f"ref.path={tiny_lm}"]  # one sequence per forward
    proc = subprocess.Popen(
        [sys.executable, "-m", "stages.score", f"run_dir={killed}", f"student.path={tiny_lm}",
         f"teacher.path={tiny_teacher}", "score.backend=hf", *args],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    first = killed / "tokens" / store.shard_relpath(0)
    deadline = time.time() + 120
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert first.exists(), "the first token shard never appeared"
    assert not (killed / "tokens" / manifest.FILENAME).exists(), "finished before the kill"
    written = len(list((killed / "tokens").glob("bucket=*/shard-*.parquet")))
    out = run(cfg_for(killed, tiny_lm, tiny_teacher, *args))
    assert out["committed"] and out["shards_written"] == 40 - written
    run(cfg_for(clean, tiny_lm, tiny_teacher, *args))
    a, b = read_tokens(killed), read_tokens(clean)
    assert a.num_rows == len(set(zip(a["sample_id"].to_pylist(), a["pos"].to_pylist())))
    assert a.equals(b)


def test_plan_reuses_shared_prefixes(tiny_lm):
    """Pure planner check: guided rows share teacher+behaviour, unguided share behaviour+ref."""
    from stages.lib.scoring.plan import Role

    roles = [
        Role("teacher", "m", "float32", "fp", 4, True),
        Role("behavior", "m", "float32", "fp", 0, True),
        Role("ref", "m", "float32", "fp", 0, False),
    ]
    rows = [
        {"teacher_prompt_ids": [1, 9, 2], "rollout_prompt_ids": [1, 9, 2],
         "train_prompt_ids": [1, 2], "response_ids": [5]},
        {"teacher_prompt_ids": [1, 9, 3], "rollout_prompt_ids": [1, 3],
         "train_prompt_ids": [1, 3], "response_ids": [6]},
    ]  # fmt: skip
    plan = plan_shard(rows, roles, behavior_topk=2)
    assert len(plan.jobs) == 4 and plan.requests == 6
    assert plan.of[0]["teacher"] == plan.of[0]["behavior"] != plan.of[0]["ref"]
    assert plan.of[1]["behavior"] == plan.of[1]["ref"] != plan.of[1]["teacher"]
    # the unguided row's teacher pass gathers at its behaviour pass's top-Kb ids
    assert plan.jobs[plan.of[1]["teacher"]].gathers == [plan.of[1]["behavior"]]
    assert plan.jobs[plan.of[0]["teacher"]].gathers == []
    assert plan.jobs[plan.of[0]["teacher"]].k == 4


# ----------------------------------------------------------------------------- vLLM parity
@pytest.mark.vllm
def test_vllm_backend_matches_transformers(tmp_path, tiny_lm):
    """One engine (teacher = behaviour = ref = tiny_lm, the demo's shape) to keep start-up to one;
    log-probs and top-K from vLLM, entropies from the HF pass (recorded in the manifest)."""
    from stages.lib import vllm_backend as vb

    ok, why = vb.vllm_available()
    if not ok:
        pytest.skip(f"vLLM not usable here: {why}")
    write_rollouts(tmp_path, tiny_lm, n_rows=6)
    cfg = cfg_for(tmp_path, tiny_lm, tiny_lm, "score.topk=8", f"ref.path={tiny_lm}")
    cfg.score.backend = "vllm"
    try:
        out = run(cfg)
    finally:
        vb.clear_llm_cache()
    assert out["backend"] == "vllm"
    vocab = len(WORDS) + 4
    rows = rollouts_rows(tmp_path)
    for x in read_tokens(tmp_path).to_pylist():
        ro = rows[x["sample_id"]]
        d_t = dense(tiny_lm, ro["teacher_prompt_ids"], ro["response_ids"], vocab)[x["pos"]]
        d_b = dense(tiny_lm, ro["rollout_prompt_ids"], ro["response_ids"], vocab)[x["pos"]]
        d_r = dense(tiny_lm, ro["train_prompt_ids"], ro["response_ids"], vocab)[x["pos"]]
        assert abs(x["teacher_logprob"] - d_t[x["token_id"]]) < 1e-3
        assert abs(x["behavior_logprob"] - d_b[x["token_id"]]) < 1e-3
        assert abs(x["ref_logprob"] - d_r[x["token_id"]]) < 1e-3
        assert x["teacher_topk_ids"] == np.argsort(-d_t, kind="stable")[:8].tolist()
        assert abs(x["teacher_entropy"] - entropy_of(d_t)) < FP16_TOL * 3  # from the HF pass
        assert abs(x["behavior_entropy"] - entropy_of(d_b)) < FP16_TOL * 3
    m = json.loads((tmp_path / "tokens" / manifest.FILENAME).read_text())
    assert m["extra"]["backend"] == "vllm" and m["extra"]["entropy_source"] == "hf"


# ----------------------------------------------------------------------------- several teachers
def two_teachers(*extra: str) -> list[str]:
    return ["score.route_by.column=kind", *extra]


def test_routes_each_rollout_to_its_teacher(tmp_path, tiny_lm, tiny_teacher):
    """kind=fact -> teacher a (tiny_teacher), others -> the default b (tiny_lm, also the
    behaviour model): each row's teacher log-probs are its own teacher's; teacher_id is a column
    of the tokens table and of the DuckDB tokens view; the manifest has both fingerprints."""
    from stages.lib import views
    from stages.lib.layout import RunLayout

    write_rollouts(tmp_path, tiny_lm, n_rows=8, kinds=("fact", "chat", "code"))
    teachers = f"+teachers={{a: {{path: {tiny_teacher}}}, b: {{path: {tiny_lm}}}}}"
    cfg = cfg_for(
        tmp_path, tiny_lm, tiny_lm, teachers,
        *two_teachers("+score.route_by.map={fact: a}", "score.route_by.default=b"),
        "score.topk=4",
    )  # fmt: skip
    assert run(cfg)["committed"]
    vocab = len(models.load_tokenizer(str(tiny_lm)))
    rows = rollouts_rows(tmp_path)
    t = read_tokens(tmp_path).to_pylist()
    seen = set()
    for x in t:
        ro = rows[x["sample_id"]]
        want = "a" if ro["kind"] == "fact" else "b"
        assert x["teacher_id"] == want
        seen.add(want)
        path = tiny_teacher if want == "a" else tiny_lm
        d = dense(path, ro["teacher_prompt_ids"], ro["response_ids"], vocab)  # [R, V]
        assert abs(x["teacher_logprob"] - d[x["pos"], x["token_id"]]) < TOL
    assert seen == {"a", "b"}
    m = manifest.read(tmp_path / "tokens")
    fa, fb = (models.model_fingerprint(str(p)) for p in (tiny_teacher, tiny_lm))
    assert (m["fingerprints"]["teacher.a"], m["fingerprints"]["teacher.b"]) == (fa, fb)
    assert "teacher" not in m["fingerprints"]
    assert m["extra"]["teachers"]["a"]["fingerprint"] == fa
    assert m["models"]["teacher.a"]["fingerprint"] == fa
    rv = views.open_run(RunLayout.of(tmp_path), datasets=("tokens",))
    got = dict(rv.con.execute("SELECT teacher_id, count(*) FROM tokens GROUP BY 1").fetchall())
    assert got == {"a": sum(x["teacher_id"] == "a" for x in t), "b": len(t) - got["a"]}

    # a selection policy filters by teacher: only teacher a's tokens carry weight
    from data_schemas import selected
    from stages import select

    sql = tmp_path / "only_a.sql"
    sql.write_text(
        "SELECT rid, CASE WHEN teacher_id = 'a' THEN 1.0 ELSE 0.0 END AS weight FROM tok"
    )
    res = select.run(compose("select", [f"run_dir={tmp_path}", f"select.rules.0.policy={sql}"]))
    kept = store.read_table(Path(res["dir"]), selected).to_pylist()
    w = {r["sample_id"]: sum(r["weights"]) for r in kept}
    for sid, ro in rows.items():
        assert w.get(sid, 0) == (len(ro["response_ids"]) if ro["kind"] == "fact" else 0), sid


def test_one_teacher_writes_no_teacher_id_and_the_view_shows_null(tmp_path, tiny_lm, tiny_teacher):
    from stages.lib import views
    from stages.lib.layout import RunLayout

    write_rollouts(tmp_path, tiny_lm, n_rows=4)
    run(cfg_for(tmp_path, tiny_lm, tiny_teacher, "score.topk=4"))
    assert "teacher_id" not in read_tokens(tmp_path).column_names  # the shards are as before
    rv = views.open_run(RunLayout.of(tmp_path), datasets=("tokens",))
    assert rv.con.execute(
        "SELECT count(*) FILTER (WHERE teacher_id IS NOT NULL) FROM tokens"
    ).fetchone() == (0,)


def test_a_route_value_without_teacher_fails_before_any_model_loads(
    tmp_path, tiny_lm, tiny_teacher, monkeypatch
):
    write_rollouts(tmp_path, tiny_lm, n_rows=4, kinds=("fact", "chat"))
    teachers = f"+teachers={{a: {{path: {tiny_teacher}}}}}"
    cfg = cfg_for(
        tmp_path, tiny_lm, tiny_lm, teachers, *two_teachers("+score.route_by.map={fact: a}")
    )
    loaded = []
    monkeypatch.setattr(models, "load_model", lambda *a, **k: loaded.append(a))
    monkeypatch.setattr(models, "load_tokenizer", lambda *a, **k: loaded.append(a))
    with pytest.raises(UserError, match=r"kind='chat' have no teacher.*Fix: add 'chat: <teacher>'"):
        run(cfg)
    assert loaded == [] and not (tmp_path / "tokens").exists()


def test_teachers_config_checks():
    with pytest.raises(UserError, match="sends 'fact' to teacher 'zz'"):
        compose(
            "score", ["+teachers={a: {path: /x}}", *two_teachers("+score.route_by.map={fact: zz}")]
        )
    with pytest.raises(UserError, match="score.route_by.column must be set"):
        compose("score", ["+teachers={a: {path: /x}}"])
    with pytest.raises(UserError, match="score.route_by.column needs teachers"):
        compose("score", two_teachers())
    with pytest.raises(UserError, match="score.route_by.column must be one of"):
        compose("score", ["score.route_by.column=domain"])


def write_prompts_file(path: Path, n: int) -> Path:
    """Prompts p000..: the even ones carry a long context (a column the rollouts do not have)."""
    rows = [
        {"id": f"p{i:03d}", "prompt": "q", "context": "x" * (20 if i % 2 == 0 else 2)}
        for i in range(n)
    ]
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def test_routes_by_a_sql_expression_over_the_prompts(tmp_path, tiny_lm, tiny_teacher):
    """score.route_by.sql is evaluated over data.prompts: each rollout goes to the teacher its
    prompt's expression names (here by the prompt's context length), written as teacher_id."""
    write_rollouts(tmp_path, tiny_lm, n_rows=8)  # prompt ids p000..p003
    prompts = write_prompts_file(tmp_path / "prompts.parquet", 4)
    both = f"+teachers={{a: {{path: {tiny_teacher}}}, b: {{path: {tiny_lm}}}}}"
    sql = "score.route_by.sql=\"CASE WHEN length(context) > 5 THEN 'a' ELSE 'b' END\""
    cfg = cfg_for(tmp_path, tiny_lm, tiny_lm, both, sql, f"data.prompts={prompts}", "score.topk=4")
    assert run(cfg)["committed"]
    vocab = len(models.load_tokenizer(str(tiny_lm)))
    rows = rollouts_rows(tmp_path)
    for x in read_tokens(tmp_path).to_pylist():
        ro = rows[x["sample_id"]]
        want = "a" if int(ro["prompt_id"][1:]) % 2 == 0 else "b"
        assert x["teacher_id"] == want, ro["prompt_id"]
        d = dense(tiny_teacher if want == "a" else tiny_lm, ro["teacher_prompt_ids"],
                  ro["response_ids"], vocab)  # fmt: skip
        assert abs(x["teacher_logprob"] - d[x["pos"], x["token_id"]]) < TOL
    m = manifest.read(tmp_path / "tokens")
    assert m["extra"]["route_by"]["sql"].startswith("CASE WHEN length(context)")

    # the built-in `teacher` policy weighs by teacher_id: teacher b's tokens at half weight
    from data_schemas import selected
    from stages import select

    res = select.run(compose("select", [f"run_dir={tmp_path}", "select=teacher_half_b"]))
    kept = store.read_table(Path(res["dir"]), selected).to_pylist()
    w = {r["sample_id"]: r["weights"] for r in kept}
    for sid, ro in rows.items():
        want = 1.0 if int(ro["prompt_id"][1:]) % 2 == 0 else 0.5
        assert w[sid] == [want] * len(ro["response_ids"]), sid


def test_route_sql_mistakes_are_one_error_each(tmp_path, tiny_lm, tiny_teacher, monkeypatch):
    both = f"+teachers={{a: {{path: {tiny_teacher}}}, b: {{path: {tiny_lm}}}}}"
    with pytest.raises(UserError, match=r"fails in DuckDB: .*domain.*Fix: write an expression"):
        compose("score", [both, "score.route_by.sql=\"CASE WHEN domain = 'x' THEN 'a' END\""])
    with pytest.raises(UserError, match="score.route_by.sql replaces score.route_by.column"):
        compose("score", [both, "score.route_by.column=kind", "score.route_by.sql='a'"])
    with pytest.raises(UserError, match="score.route_by.sql needs teachers"):
        compose("score", ["score.route_by.sql=\"'a'\""])
    # a name that is not a teacher: refused before any model loads, naming a prompt
    write_rollouts(tmp_path, tiny_lm, n_rows=4)
    prompts = write_prompts_file(tmp_path / "prompts.parquet", 2)
    sql = "score.route_by.sql=\"CASE WHEN length(context) > 5 THEN 'a' ELSE 'c' END\""
    cfg = cfg_for(tmp_path, tiny_lm, tiny_lm, both, sql, f"data.prompts={prompts}")
    loaded = []
    monkeypatch.setattr(models, "load_model", lambda *a, **k: loaded.append(a))
    monkeypatch.setattr(models, "load_tokenizer", lambda *a, **k: loaded.append(a))
    with pytest.raises(UserError, match=r"gives 'c', which is not a teacher name for 1 .*'p001'"):
        run(cfg)
    assert loaded == [] and not (tmp_path / "tokens").exists()


def test_routing_sql_is_pure():
    """routing.routes: NULL takes the default; without one it is refused."""
    from stages.lib import routing

    t = pa.table({"id": ["x", "y"], "kind": ["k", None]})
    assert routing.routes(t, "kind", ["k", "d"], "d") == {"x": "k", "y": "d"}
    with pytest.raises(UserError, match="NULL .*default is not set.*'y'"):
        routing.routes(t, "kind", ["k"], None)
    with pytest.raises(UserError, match="one expression"):
        routing.routes(t, "'k'; DROP TABLE prompts", ["k"], None)


def test_a_routed_teacher_other_than_the_sft_teacher_is_refused(tmp_path, tiny_lm, tiny_teacher):
    run_dir = tmp_path / "run"
    write_rollouts(run_dir, tiny_lm, n_rows=2, kinds=("fact",))
    with store.open_writer(run_dir / "sft_data", rollouts_table, dataset_id="s", stage="sft") as w:
        fp = models.model_fingerprint(str(tiny_lm))
        assert w.commit(0, config={}, fingerprints={"teacher": fp}, inputs={})
    route = two_teachers("score.route_by.default=a")
    with pytest.raises(UserError, match="OPD teacher 'a' .* is not the SFT teacher .*teachers.a"):
        run(
            cfg_for(run_dir, tiny_lm, tiny_lm, f"+teachers={{a: {{path: {tiny_teacher}}}}}", *route)
        )
    both = f"+teachers={{a: {{path: {tiny_teacher}}}, b: {{path: {tiny_lm}}}}}"
    # b is the SFT teacher, but every rollout goes to a: refused per teacher, naming a
    with pytest.raises(UserError, match="OPD teacher 'a' .* scores rollouts but is not the SFT"):
        run(cfg_for(run_dir, tiny_lm, tiny_lm, both, *route))
    to_b = two_teachers("+score.route_by.map={fact: b}", "score.route_by.default=a")
    assert run(cfg_for(run_dir, tiny_lm, tiny_lm, both, *to_b))["committed"]  # b scores all


# ----------------------------------------------------------------------------- devices, progress
def _shard_bytes(run_dir: Path) -> dict[str, bytes]:
    tokens = run_dir / "tokens"
    return {str(p.relative_to(tokens)): p.read_bytes() for p in sorted(tokens.rglob("*.parquet"))}


def test_cpu_devices_equal_auto_byte_for_byte(tmp_path, tiny_lm, tiny_teacher):
    """score.device / teacher_device / ref_device = cpu give the Parquet shards of auto (the
    devices are placement only: not in the dataset id, not in the numbers on one machine)."""
    if torch.cuda.is_available():
        pytest.skip("auto is a GPU here: the shards may differ from cpu in the last bit")
    auto, cpu = tmp_path / "auto", tmp_path / "cpu"
    for d in (auto, cpu):
        write_rollouts(d, tiny_lm)
    ref = f"ref.path={tiny_lm}"
    run(cfg_for(auto, tiny_lm, tiny_teacher, ref))
    run(
        cfg_for(
            cpu,
            tiny_lm,
            tiny_teacher,
            ref,
            "score.device=cpu",
            "score.teacher_device=cpu",
            "score.ref_device=cpu",
        )
    )
    a, c = _shard_bytes(auto), _shard_bytes(cpu)
    assert a and a == c


@pytest.mark.parametrize("key", ["score.device", "score.teacher_device", "score.ref_device"])
def test_cuda_without_cuda_is_one_error_before_any_work(tmp_path, tiny_lm, tiny_teacher, key):
    if torch.cuda.is_available():
        pytest.skip("CUDA is present")
    write_rollouts(tmp_path, tiny_lm, n_rows=2)
    with pytest.raises(UserError) as e:
        run(cfg_for(tmp_path, tiny_lm, tiny_teacher, f"ref.path={tiny_lm}", f"{key}=cuda"))
    assert key in str(e.value) and "CUDA is not available" in str(e.value)
    assert not (tmp_path / "tokens").exists()


@pytest.mark.parametrize(
    "override", ["score.device=gpu", "score.teacher_device=cuda:x", "score.ref_device=CPU"]
)
def test_bad_device_string_fails_at_compose(tmp_path, tiny_lm, tiny_teacher, override):
    with pytest.raises(UserError) as e:
        cfg_for(tmp_path, tiny_lm, tiny_teacher, override)
    assert override.split("=")[0] in str(e.value)


def test_progress_lines_when_stdout_is_not_a_tty(tmp_path, tiny_lm, tiny_teacher, capsys):
    """Under capsys stdout is no TTY: the score loop prints plain progress lines (one at least:
    the last), then its 'wrote ... to ...' line."""
    write_rollouts(tmp_path, tiny_lm)
    run(cfg_for(tmp_path, tiny_lm, tiny_teacher))
    out = capsys.readouterr().out.splitlines()
    progress = [i for i, line in enumerate(out) if line.startswith("[score 12 rollouts] ")]
    wrote = [i for i, line in enumerate(out) if line.startswith("score: wrote 3 shard(s) to ")]
    assert progress and wrote and progress[-1] < wrote[0], out
    assert "(100%)" in out[progress[-1]] and "response tokens" in out[progress[-1]]


# ----------------------------------------------------------------------------- residency
def test_one_model_resident_at_a_time_same_shards(tmp_path, tiny_lm, tiny_teacher):
    """score.resident=one drops a model before the next loads (its memory is freed: no reference
    survives), and writes the very shards resident=all writes; auto on CPU keeps them all."""
    import gc
    import weakref

    from stages.lib.scoring.plan import Role
    from stages.lib.scoring.scorer import Scorer

    cfg = cfg_for(tmp_path / "unit", tiny_lm, tiny_teacher, "score.resident=one")
    dev = torch.device("cpu")
    scorer = Scorer(cfg, "hf", 100, 0, 64, {"teacher": dev, "behavior": dev, "ref": dev})
    teacher = Role("teacher", str(tiny_teacher), "float32", "fp-teacher", 4, False)
    student = Role("behavior", str(tiny_lm), "float32", "fp-student", 0, False)
    first = weakref.ref(scorer.hf_model(teacher).model)
    assert scorer.hf_model(student) is not None and len(scorer.hf) == 1
    gc.collect()
    assert first() is None  # the teacher's weights are gone, not merely unlisted
    cfg_all = cfg_for(tmp_path / "unit", tiny_lm, tiny_teacher, "score.resident=all")
    keep_all = Scorer(cfg_all, "hf", 100, 0, 64, {"teacher": dev, "behavior": dev, "ref": dev})
    keep_all.hf_model(teacher), keep_all.hf_model(student)
    assert len(keep_all.hf) == 2
    cfg_auto = cfg_for(tmp_path / "unit", tiny_lm, tiny_teacher)  # auto: all on a CPU
    assert not Scorer(cfg_auto, "hf", 100, 0, 64, {"teacher": dev, "behavior": dev}).one_model

    one, every = tmp_path / "one", tmp_path / "all"
    for d in (one, every):
        write_rollouts(d, tiny_lm)
    ref = f"ref.path={tiny_teacher}"  # a third pass on the teacher model after the train prompt
    run(cfg_for(one, tiny_lm, tiny_teacher, ref, "score.topk=4", "score.behavior_topk=3",
                "score.resident=one"))  # fmt: skip
    run(cfg_for(every, tiny_lm, tiny_teacher, ref, "score.topk=4", "score.behavior_topk=3",
                "score.resident=all"))  # fmt: skip
    a, b = _shard_bytes(one), _shard_bytes(every)
    assert a and a == b


def test_bf16_teacher_scores_close_to_the_fp32_teacher(tmp_path, tiny_lm, tiny_teacher):
    """teacher.dtype=bfloat16 (the body in bf16; the head from an fp32 copy of its weight, tested
    in tests/test_logprobs.py): the stage runs and its log-probs stay within bf16 rounding of the
    fp32 teacher's, with the same top-1 id wherever the fp32 top-2 gap is clear."""
    f32, b16 = tmp_path / "f32", tmp_path / "b16"
    for d in (f32, b16):
        write_rollouts(d, tiny_lm)
    run(cfg_for(f32, tiny_lm, tiny_teacher, "score.topk=2"))
    run(cfg_for(b16, tiny_lm, tiny_teacher, "score.topk=2", "teacher.dtype=bfloat16"))
    a, b = read_tokens(f32).to_pylist(), read_tokens(b16).to_pylist()
    diff = [abs(x["teacher_logprob"] - y["teacher_logprob"]) for x, y in zip(a, b, strict=True)]
    assert 0 < max(diff) < 0.1, max(diff)  # bf16 did run, and stayed close
    gap = lambda r: r["teacher_topk_logprobs"][0] - r["teacher_topk_logprobs"][1]  # noqa: E731
    clear = [(x, y) for x, y in zip(a, b) if gap(x) > 0.2]
    assert clear and all(x["teacher_topk_ids"][0] == y["teacher_topk_ids"][0] for x, y in clear)
