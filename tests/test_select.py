"""The select stage on small hand-built rollouts/tokens tables; expected weights computed in Python.

``write_run`` writes real, committed rollouts + tokens datasets through ``store.open_writer`` (two
shards, tokens rows stored out of order) and returns the per-token values, so every policy is
checked token by token against a plain-Python version of its formula.
"""

from __future__ import annotations

import hashlib
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_schemas import manifest, rollouts, selected, tokens
from stages.lib import store
from stages.lib.config import compose
from stages.lib.errors import UserError

ROOT = Path(__file__).resolve().parent.parent
V = 64  # vocabulary size
K = 4  # teacher top-K
LENS = [5, 9, 3, 7, 6, 8, 4]  # response lengths of the hand-built sequences
CONTEXT = [40, 41, 42]  # privileged context ids (in the teacher prefix only)


def write_run(
    run_dir: Path,
    *,
    seed: int = 0,
    with_ref: bool = True,
    with_entropy: bool = True,
    lens: list[int] = LENS,
    n_shards: int = 2,
    shuffle: bool = True,
    entropy_step: float | None = None,
    no_context: tuple[int, ...] = (),
) -> list[dict]:
    """Write committed rollouts/ and tokens/ under ``run_dir``; return the sequences (ground truth)."""
    rng = np.random.default_rng(seed)
    seqs = []
    for i, t in enumerate(lens):
        prompt = [int(x) for x in rng.integers(4, 30, size=4)]
        resp = rng.integers(4, 50, size=t).astype(np.int32)
        resp[0] = CONTEXT[i % 3]  # a context token in every response
        resp[-1] = prompt[0]  # a prompt token (not evidence)
        seg = np.zeros(t, np.uint8)
        if i == 1:
            seg[:2] = 1  # teacher-prefix guidance tokens: never selected
        seqs.append(
            {
                "sample_id": f"s{i:02d}",
                "prompt_id": f"p{i // 2}",
                "is_guided": i % 2 == 1,
                "train_prompt_ids": prompt,
                # sequences in no_context: the teacher reads the student's own prefix
                "teacher_prompt_ids": prompt if i in no_context else CONTEXT + prompt,
                "response_ids": resp,
                "segment": seg,
                "teacher_lp": -rng.uniform(0.01, 4.0, t).astype(np.float32),
                "behavior_lp": -rng.uniform(0.01, 4.0, t).astype(np.float32),
                "ref_lp": -rng.uniform(0.01, 4.0, t).astype(np.float32),
                # fp16 on disk: keep the fp16 value as the truth
                "entropy": _steps(rng.uniform(0.0, 3.0, t), entropy_step).astype(np.float16),
                "topk_ids": rng.integers(0, V, size=(t, K)).astype(np.int32),
                "topk_lp": -np.sort(rng.uniform(2.0, 6.0, size=(t, K))).astype(np.float16),
            }
        )
    shards = [seqs[s::n_shards] for s in range(n_shards)]
    ro_id = store.content_id({"test-rollouts": seed, "lens": lens})
    with store.open_writer(run_dir / "rollouts", rollouts, dataset_id=ro_id, stage="rollout") as w:
        for s, part in enumerate(shards):
            w.write_shard(s, rollouts_table(part))
        w.commit(
            n_shards, config={}, fingerprints={"tokenizer": "t"}, inputs={}, extra={"vocab_size": V}
        )
    tk_id = store.content_id({"test-tokens": seed, "ref": with_ref, "ent": with_entropy})
    with store.open_writer(run_dir / "tokens", tokens, dataset_id=tk_id, stage="score") as w:
        for s, part in enumerate(shards):
            tbl = tokens_table(part, with_ref=with_ref, with_entropy=with_entropy)
            if shuffle:  # rows out of order on disk (the score stage writes them in order)
                tbl = tbl.take(np.random.default_rng(s).permutation(tbl.num_rows))
            w.write_shard(s, tbl)
        w.commit(
            n_shards,
            config={},
            fingerprints={"teacher": "T"},
            inputs={"rollouts": ro_id},
            extra={"vocab_size": V},
        )
    return seqs


def _steps(x: np.ndarray, step: float | None) -> np.ndarray:
    """Round to multiples of ``step`` (many exact ties), or leave as is."""
    return x if step is None else np.round(x / step) * step


def rollouts_table(seqs: list[dict]) -> pa.Table:
    n = len(seqs)
    return pa.table(
        {
            "sample_id": [q["sample_id"] for q in seqs],
            "prompt_id": [q["prompt_id"] for q in seqs],
            # sample j of its prompt (write_run: s<i> is sample i % 2 of prompt p<i // 2>)
            "sample_idx": pa.array([int(q["sample_id"][1:]) % 2 for q in seqs], pa.int32()),
            "train_prompt_ids": [q["train_prompt_ids"] for q in seqs],
            "rollout_prompt_ids": [q["teacher_prompt_ids"] for q in seqs],
            "teacher_prompt_ids": [q["teacher_prompt_ids"] for q in seqs],
            "response_ids": [q["response_ids"].tolist() for q in seqs],
            "behavior_logprobs": [q["behavior_lp"].tolist() for q in seqs],
            "response_len": pa.array([len(q["response_ids"]) for q in seqs], pa.int32()),
            "is_guided": [q["is_guided"] for q in seqs],
            "finish_reason": ["eos"] * n,
            "temperature": pa.array([1.0] * n, pa.float32()),
            "top_p": pa.array([1.0] * n, pa.float32()),
            "answer": pa.nulls(n, pa.string()),
            "kind": pa.nulls(n, pa.string()),
            "correct": pa.nulls(n, pa.bool_()),
        }
    )


def tokens_table(seqs: list[dict], *, with_ref: bool, with_entropy: bool) -> pa.Table:
    cat = lambda key: np.concatenate([q[key] for q in seqs])  # noqa: E731
    n = sum(len(q["response_ids"]) for q in seqs)
    topk_lp = cat("topk_lp")
    return pa.table(
        {
            "sample_id": [q["sample_id"] for q in seqs for _ in q["response_ids"]],
            "pos": pa.array(
                np.concatenate([np.arange(len(q["response_ids"])) for q in seqs]), pa.int32()
            ),
            "token_id": pa.array(cat("response_ids")),
            "segment": pa.array(cat("segment")),
            "is_guided": [q["is_guided"] for q in seqs for _ in q["response_ids"]],
            "teacher_logprob": pa.array(cat("teacher_lp")),
            "teacher_topk_ids": pa.array(list(cat("topk_ids")), pa.list_(pa.int32())),
            "teacher_topk_logprobs": pa.array(list(topk_lp), pa.list_(pa.float16())),
            "teacher_topk_logmass": pa.array(
                np.log(np.exp(topk_lp.astype(np.float64)).sum(1)).astype(np.float32)
            ),
            "teacher_entropy": pa.array(cat("entropy")),
            "behavior_logprob": pa.array(cat("behavior_lp")),
            "behavior_entropy": pa.array(cat("entropy"))
            if with_entropy
            else pa.nulls(n, pa.float16()),
            "ref_logprob": pa.array(cat("ref_lp")) if with_ref else pa.nulls(n, pa.float32()),
            "behavior_topk_ids": pa.nulls(n, pa.list_(pa.int32())),
            "teacher_logprobs_on_behavior_topk": pa.nulls(n, pa.list_(pa.float16())),
        }
    )


def run_select(run_dir: Path, select: str, *extra: str) -> tuple[dict, dict[str, dict]]:
    """Run the stage; return its result and the selected rows by sample_id."""
    from stages import select as stage

    res = stage.run(compose("select", [f"run_dir={run_dir}", f"select={select}", *extra]))
    tbl = store.read_table(Path(res["dir"]), selected)
    selected.validate(tbl, vocab_size=V)
    return res, {r["sample_id"]: r for r in tbl.to_pylist()}


def got_weights(rows: dict[str, dict], seqs: list[dict]) -> np.ndarray:
    return np.concatenate([np.array(rows[q["sample_id"]]["weights"]) for q in seqs])


def flat(seqs: list[dict], key: str) -> np.ndarray:
    return np.concatenate([q[key] for q in seqs])


def student(seqs):
    return flat(seqs, "segment") == 0


def md5_u(seed: int, sid: str, pos: int) -> float:
    """The sampler's uniform: top 53 bits of md5 read little-endian (DuckDB's md5_number)."""
    n = int.from_bytes(hashlib.md5(f"{seed}:{sid}:{pos}".encode()).digest(), "little")
    return ((n >> 75) + 0.5) / 2**53


def keep_smallest(keys: np.ndarray, mask: np.ndarray, rho: float, ties: list) -> np.ndarray:
    """0/1 weights keeping round(rho * N) smallest keys among ``mask`` (ties by (sample, pos))."""
    idx = [i for i in np.flatnonzero(mask)]
    idx.sort(key=lambda i: (keys[i], ties[i]))
    k = math.floor(rho * mask.sum() + 0.5)
    w = np.zeros(len(keys))
    w[idx[:k]] = 1.0
    return w


def span_mask(seqs) -> np.ndarray:
    """The evidence-span rule: a response token that occurs in the context, not in the question."""
    return np.concatenate(
        [
            [
                (t in q["teacher_prompt_ids"]) and (t not in q["train_prompt_ids"])
                for t in q["response_ids"]
            ]
            for q in seqs
        ]
    )


def ties_of(seqs):
    return [(q["sample_id"], p) for q in seqs for p in range(len(q["response_ids"]))]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> tuple[Path, list[dict]]:
    d = tmp_path_factory.mktemp("sel")
    return d, write_run(d)


# ----------------------------------------------------------------------------- each policy
def test_all_keeps_student_tokens_and_carries_columns(run_dir):
    d, seqs = run_dir
    res, rows = run_select(d, "all")
    np.testing.assert_array_equal(got_weights(rows, seqs), student(seqs).astype(float))
    q = seqs[1]
    r = rows[q["sample_id"]]
    assert r["response_ids"] == q["response_ids"].tolist()
    assert r["segments"] == q["segment"].tolist()
    assert r["n_kept"] == int((q["segment"] == 0).sum())
    np.testing.assert_array_equal(np.array(r["teacher_logprob"], np.float32), q["teacher_lp"])
    np.testing.assert_array_equal(np.array(r["ref_logprob"], np.float32), q["ref_lp"])
    assert r["topk_k"] == K
    assert r["teacher_topk_ids"] == q["topk_ids"].ravel().tolist()  # [T*K] row-major
    # float32, exactly the tokens table's (codec-decoded) values: no fp16 rounding on top
    tk = store.read_table(d / "tokens", tokens).to_pylist()
    want = [
        t["teacher_topk_logprobs"]
        for t in sorted(tk, key=lambda t: t["pos"])
        if t["sample_id"] == q["sample_id"]
    ]
    assert r["teacher_topk_logprobs"] == [v for row in want for v in row]
    np.testing.assert_array_equal(
        np.array(r["teacher_topk_logprobs"], np.float16), q["topk_lp"].ravel()
    )
    s = res["summary"]
    assert s["tokens_total"] == sum(LENS) and s["student_tokens"] == sum(LENS) - 2
    assert s["tokens_kept"] == s["student_tokens"] and s["sequences_no_kept"] == 0
    assert sum(v["tokens"] for v in s["by_position"].values()) == s["student_tokens"]
    assert s["by_position"]["8-15"]["tokens"] == 1  # only the length-9 sequence reaches pos 8


def test_entropy_top_keeps_highest_entropy(run_dir):
    d, seqs = run_dir
    _, rows = run_select(d, "entropy_half", "select.rules.0.params.mode=top", "select.name=etop")
    h = flat(seqs, "entropy").astype(np.float64)
    want = keep_smallest(-h, student(seqs), 0.5, ties_of(seqs))
    np.testing.assert_array_equal(got_weights(rows, seqs), want)


def test_entropy_top_breaks_ties_by_sample_and_position(tmp_path):
    seqs = write_run(tmp_path, entropy_step=0.5)  # 7 distinct entropies for ~40 tokens
    h = flat(seqs, "entropy").astype(np.float64)
    for rho in (0.3, 0.5, 0.9):
        _, rows = run_select(
            tmp_path,
            "entropy_half",
            "select.rules.0.params.mode=top",
            f"select.rules.0.params.rho={rho}",
            f"select.name=ties{rho}",
        )
        want = keep_smallest(-h, student(seqs), rho, ties_of(seqs))
        np.testing.assert_array_equal(got_weights(rows, seqs), want)


def test_entropy_sample_matches_formula_and_seed(run_dir):
    d, seqs = run_dir
    h = flat(seqs, "entropy").astype(np.float64)
    ties = ties_of(seqs)
    picks = {}
    for seed in (0, 1):
        _, rows = run_select(d, "entropy_half", f"seed={seed}", f"select.name=es{seed}")
        u = np.array([md5_u(seed, sid, p) for sid, p in ties])
        key = -np.log(u) / np.maximum(h / math.log(V), 1e-8) ** 1.0
        want = keep_smallest(key, student(seqs), 0.5, ties)
        got = got_weights(rows, seqs)
        np.testing.assert_array_equal(got, want)
        assert abs(got.sum() - 0.5 * student(seqs).sum()) <= 1  # the fraction, +-1 token
        picks[seed] = got
    assert not np.array_equal(picks[0], picks[1])  # another seed, another sample
    _, again = run_select(d, "entropy_half", "seed=1", "select.name=es1b")
    np.testing.assert_array_equal(got_weights(again, seqs), picks[1])  # reproducible


def test_tip_q3_and_type_aware(run_dir):
    d, seqs = run_dir
    st = student(seqs)
    h = flat(seqs, "entropy").astype(np.float64)
    div = (flat(seqs, "behavior_lp") - flat(seqs, "teacher_lp")).astype(np.float64)
    hq, dq = np.quantile(h[st], 0.5), np.quantile(div[st], 0.7)
    q3 = (st & (h < hq) & (div >= dq)).astype(float)
    _, rows = run_select(d, "tip_q3", "select.rules.0.params.divergence_quantile=0.7")
    np.testing.assert_array_equal(got_weights(rows, seqs), q3)
    assert 0 < q3.sum() < st.sum()
    adiv = np.abs(div)
    q3abs = (st & (h < hq) & (adiv >= np.quantile(adiv[st], 0.7))).astype(float)
    _, rows = run_select(
        d,
        "tip_q3",
        "select.rules.0.params.divergence_quantile=0.7",
        "select.rules.0.params.divergence=abs",
        "select.name=q3abs",
    )
    np.testing.assert_array_equal(got_weights(rows, seqs), q3abs)
    _, rows = run_select(
        d,
        "tip_type_aware",
        "select.rules.0.params.mode=top",
        "select.rules.0.params.divergence_quantile=0.7",
    )
    ent = keep_smallest(-h, st, 0.5, ties_of(seqs))
    np.testing.assert_array_equal(got_weights(rows, seqs), np.maximum(ent, q3))


def test_evidence_threshold_span_keep_rest(run_dir):
    d, seqs = run_dir
    e = flat(seqs, "teacher_lp") - flat(seqs, "ref_lp")  # float32, as DuckDB computes it
    span = span_mask(seqs)
    st = student(seqs)
    want = np.where(st, np.where((e >= 0.5) | span, 1.0, 0.25), 0.0)
    _, rows = run_select(
        d,
        "evidence",
        "select.rules.0.params.threshold=0.5",
        "select.rules.0.params.keep_rest=0.25",
    )
    np.testing.assert_allclose(got_weights(rows, seqs), want)
    assert span[st].sum() >= len(seqs) - 1  # the context token planted in each response
    # span rule only (no reference model needed)
    _, rows = run_select(
        d, "evidence", "select.rules.0.params.threshold=null", "select.name=span_only"
    )
    np.testing.assert_array_equal(got_weights(rows, seqs), (st & span).astype(float))


def test_evidence_retain_weighs_sequences_without_context(tmp_path):
    seqs = write_run(tmp_path, no_context=(2, 5))
    e = flat(seqs, "teacher_lp") - flat(seqs, "ref_lp")
    own = np.concatenate(
        [[q["teacher_prompt_ids"] == q["train_prompt_ids"]] * len(q["response_ids"]) for q in seqs]
    )
    span = span_mask(seqs)
    st = student(seqs)
    soft = np.where(st, np.where((e >= 1.0) | span, 1.0, 0.3), 0.0)
    want = soft * np.where(own, 10.0, 1.0)
    assert own.sum() > 0 and (want > 1).sum() > 0
    _, rows = run_select(tmp_path, "evidence_retain")
    np.testing.assert_allclose(got_weights(rows, seqs), want, rtol=1e-6)
    _, rows = run_select(
        tmp_path, "evidence_retain", "select.rules.1.params.weight=0", "select.name=drop_own"
    )
    np.testing.assert_allclose(got_weights(rows, seqs), np.where(own, 0.0, soft), rtol=1e-6)


def test_trust_region_and_iw_position(run_dir):
    d, seqs = run_dir
    st = student(seqs)
    gap = flat(seqs, "teacher_lp") - flat(seqs, "behavior_lp")
    _, rows = run_select(d, "trust_region")
    np.testing.assert_array_equal(
        got_weights(rows, seqs), (st & (gap >= math.log(0.5))).astype(float)
    )
    _, rows = run_select(d, "iw_position")
    for q in seqs:
        a = np.where(
            q["segment"] == 0, np.abs(q["teacher_lp"] - q["behavior_lp"]).astype(np.float64), 0
        )
        before = np.concatenate([[0.0], np.cumsum(a)[:-1]])
        want = np.where(q["segment"] == 0, 1 + 0.5 * np.clip(1 - before / a.sum(), 0, 1), 0)
        np.testing.assert_allclose(rows[q["sample_id"]]["weights"], want, rtol=1e-6)


def test_composition_is_the_product(run_dir):
    d, seqs = run_dir
    _, ev = run_select(d, "evidence", "select.name=ev_default")
    _, iw = run_select(d, "iw_position", "select.name=iw_default")
    _, both = run_select(d, "evidence_iw")
    np.testing.assert_allclose(
        got_weights(both, seqs), got_weights(ev, seqs) * got_weights(iw, seqs), rtol=1e-6
    )


# ----------------------------------------------------------------------------- edge cases
def test_sequence_with_nothing_kept_stays(tmp_path):
    seqs = write_run(tmp_path, lens=[4, 5, 6])
    # tau so strict only tokens with teacher_lp >= behavior_lp - small survive
    gaps = [q["teacher_lp"] - q["behavior_lp"] for q in seqs]
    res, rows = run_select(tmp_path, "trust_region", "select.rules.0.params.tau=1.0")
    want_zero = [q["sample_id"] for q, g in zip(seqs, gaps) if (g < 0).all()]
    assert len(rows) == 3  # no sequence dropped
    assert [s for s, r in rows.items() if r["n_kept"] == 0] == want_zero
    assert res["summary"]["sequences_no_kept"] == len(want_zero)
    for q, g in zip(seqs, gaps):
        assert rows[q["sample_id"]]["n_kept"] == int((g >= 0).sum())


def test_zero_kept_overall_is_an_error_and_writes_nothing(run_dir):
    d, _ = run_dir
    with pytest.raises(UserError, match="keeps 0 of .*tip_q3"):
        run_select(d, "tip_q3", "select.rules.0.params.entropy_quantile=1e-9", "select.name=none")
    assert not (d / "selected" / "none").exists()


def test_missing_column_names_policy_and_fix(tmp_path):
    write_run(tmp_path, with_ref=False, with_entropy=False)
    with pytest.raises(UserError, match="'evidence' needs ref_logprob.*ref.path"):
        run_select(tmp_path, "evidence")
    with pytest.raises(UserError, match="'entropy' needs behavior_entropy"):
        run_select(tmp_path, "entropy_half")
    _, rows = run_select(tmp_path, "all")  # the null columns are carried as null
    assert all(r["ref_logprob"] is None for r in rows.values())


def test_bad_params_are_refused(run_dir):
    d, _ = run_dir
    with pytest.raises(UserError, match="rho=1.5 .*must be a number in"):
        run_select(d, "entropy_half", "select.rules.0.params.rho=1.5")
    with pytest.raises(UserError, match="unknown parameter"):
        run_select(d, "trust_region", "+select.rules.0.params.bogus=1")
    with pytest.raises(UserError, match="unknown selection policy"):
        run_select(d, "all", "select.rules.0.policy=nope")


def test_rerun_is_idempotent_and_other_config_refused(tmp_path, capsys):
    write_run(tmp_path, lens=[3, 4])
    res1, _ = run_select(tmp_path, "all")
    mtime = (Path(res1["dir"]) / manifest.FILENAME).stat().st_mtime_ns
    res2, _ = run_select(tmp_path, "all")
    assert res2["dataset_id"] == res1["dataset_id"]
    assert (Path(res1["dir"]) / manifest.FILENAME).stat().st_mtime_ns == mtime
    assert "up to date" in capsys.readouterr().out
    with pytest.raises(UserError, match="different run or config.*overwrite=true"):
        run_select(tmp_path, "trust_region", "select.name=all")
    run_select(tmp_path, "trust_region", "select.name=all", "overwrite=true")


def test_resume_after_a_killed_run(tmp_path):
    write_run(tmp_path, lens=[3, 4, 5, 6], n_shards=2)
    res, rows = run_select(tmp_path, "all", "select.rows_per_shard=1")
    out = Path(res["dir"])
    (out / manifest.FILENAME).unlink()  # as if killed before the commit ...
    victim = next(out.glob("bucket=*/shard-00003.parquet"))
    victim.unlink()  # ... and before one shard
    res2, rows2 = run_select(tmp_path, "all", "select.rows_per_shard=1")
    assert rows2.keys() == rows.keys() and res2["dataset_id"] == res["dataset_id"]
    assert res2["summary"]["sequences_no_kept"] == 0


# ----------------------------------------------------------------------------- the Arrow pass
def test_rows_in_score_order_give_the_same_selection(tmp_path):
    """The fast path (tokens rows already in sequence order) equals the gather path."""
    tables = []
    for shuffle in (True, False):
        d = tmp_path / f"shuffle{shuffle}"
        write_run(d, shuffle=shuffle)
        res, _ = run_select(d, "entropy_half")
        tables.append(store.read_table(Path(res["dir"]), selected))
    assert tables[0].equals(tables[1])


@pytest.mark.parametrize("scale", [1, 100_000])  # -3e6 nats: the int64 path
def test_decode_topk_matches_the_codec(scale):
    from data_schemas import codec
    from stages.lib.selection.assemble import decode_topk

    rng = np.random.default_rng(0)
    lp = -np.sort(rng.uniform(0, 30, (500, 32)) * scale, axis=1).astype(np.float32)  # [N, K]
    lens = np.full(500, 32)
    d = codec.encode_logprobs(lp.ravel(), lens)
    got = decode_topk(d, 32)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, codec.decode_logprobs(d, lens))


def test_policy_with_a_duplicated_and_a_missing_rid_is_refused(run_dir, tmp_path):
    d, _ = run_dir
    sql = tmp_path / "bad.sql"  # one row per token, but the first rid is replaced by the last
    sql.write_text(
        "SELECT CASE WHEN rid = (SELECT min(rid) FROM tok) THEN (SELECT max(rid) FROM tok) "
        "ELSE rid END AS rid, 1.0 AS weight FROM tok"
    )
    with pytest.raises(UserError, match="1 duplicated rid, 1 missing"):
        run_select(d, "all", f"select.rules.0.policy={sql}", "select.name=bad")


@pytest.mark.parametrize(
    "col,value,match",
    [
        (
            "teacher_topk_logprobs",
            [-1.0, math.nan] * K,
            r"invalid value \S*nan\S* in 'teacher_topk_logprobs'",
        ),
        ("teacher_topk_logprobs", [-1.0, 0.5] * K, "finite and <= 0"),
        ("teacher_logprob", [-1.0, math.inf], r"invalid value \S*inf\S* in 'teacher_logprob'"),
        ("ref_logprob", [-math.inf, -1.0], r"invalid value \S*-inf\S* in 'ref_logprob'"),
        ("weights", [1.0, -1.0], "negative value in 'weights'"),
        ("weights", [math.nan, 1.0], r"invalid value \S*nan\S* in 'weights'"),
    ],
)
def test_selected_validate_rejects_bad_floats(col, value, match):
    """The min/max check of the float lists refuses what check_table refuses, same message."""
    from data_schemas.common import SchemaError
    from tests.test_schemas import selected_rows

    rows = selected_rows()
    rows[0][col] = value
    if col == "teacher_topk_logprobs":
        rows[0]["teacher_topk_ids"] = list(range(len(value)))
        rows[0]["topk_k"] = len(value) // 2
    table = pa.Table.from_pylist(rows, schema=selected.SCHEMA)
    with pytest.raises(SchemaError, match=match):
        selected.validate(table)
    selected.validate(pa.Table.from_pylist(selected_rows(), schema=selected.SCHEMA))


# ----------------------------------------------------------------------------- what select reads (#16)
def tamper_tokens(run_dir: Path, shard: int, col: str, row: int, value: float) -> None:
    """Put ``value`` into one cell of a committed tokens shard, bypassing the writer's checks,
    and re-seal the manifest (sizes and checksums patched): only the values are wrong."""
    import json

    p = run_dir / "tokens" / store.shard_relpath(shard)
    t = pq.read_table(p)
    vals = t[col].to_pylist()
    vals[row] = value
    t = t.set_column(t.column_names.index(col), col, pa.array(vals, t.schema.field(col).type))
    pq.write_table(t, p)  # the schema (with the dataset id in its metadata) is kept
    mp = run_dir / "tokens" / manifest.FILENAME
    m = json.loads(mp.read_text())
    entry = m["shards"][shard]
    entry["bytes"], entry["sha256"] = p.stat().st_size, store.file_sha256(p)
    m["bytes"] = sum(s["bytes"] for s in m["shards"])
    mp.write_text(json.dumps(manifest.seal(m)))


def snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.mark.parametrize(
    "col,value",
    [("behavior_entropy", math.nan), ("teacher_logprob", -math.inf), ("ref_logprob", 0.5)],
)
def test_non_finite_values_are_refused_naming_column_and_row(tmp_path, col, value):
    write_run(tmp_path)
    tamper_tokens(tmp_path, 1, col, 3, value)
    before = snapshot(tmp_path)
    with pytest.raises(UserError) as e:
        run_select(tmp_path, "all")
    line = e.value.line()
    assert f"tokens column '{col}'" in line and "row 3 of shard 1" in line, line
    assert "shard-00001.parquet" in line and "Fix:" in line
    assert snapshot(tmp_path) == before  # no selection, no temp dir left behind


def test_non_finite_value_cli_exit_2(tmp_path):
    write_run(tmp_path)
    tamper_tokens(tmp_path, 0, "behavior_entropy", 1, math.nan)
    before = snapshot(tmp_path)
    r = subprocess.run(
        [sys.executable, "-m", "stages.select", f"run_dir={tmp_path}", "select=all"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: tokens column 'behavior_entropy'")
    assert snapshot(tmp_path) == before


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv to drop root's override")
def test_read_only_run_dir_is_one_line(tmp_path):
    """A run dir the process may not write (root's permission override dropped): exit 2."""
    write_run(tmp_path)
    before = snapshot(tmp_path)
    modes = {p: p.stat().st_mode for p in [tmp_path, *tmp_path.rglob("*")]}
    for p in modes:
        p.chmod(p.stat().st_mode & ~0o222)
    try:
        r = subprocess.run(
            ["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner",
             sys.executable, "-m", "stages.select", f"run_dir={tmp_path}", "select=all"],
            cwd=ROOT, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    finally:
        for p, mode in modes.items():
            p.chmod(mode)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot write (Permission denied)" in lines[0], r.stderr
    assert snapshot(tmp_path) == before


def _lie(run_dir: Path, case: str) -> None:
    """Make the tokens manifest disagree with its shards (#16: manifests that lie)."""
    import json

    mp = run_dir / "tokens" / manifest.FILENAME
    m = json.loads(mp.read_text())
    if case == "edited_not_resealed":
        m["stage"] = "forged"
        mp.write_text(json.dumps(m))
        return
    if case == "rows_inflated":
        m["shards"][0]["rows"] += 7
        m["rows"] += 7
    elif case == "shard_entry_dropped":
        m["rows"] -= m["shards"].pop()["rows"]
    mp.write_text(json.dumps(manifest.seal(m)))


@pytest.mark.parametrize(
    "case,message",
    [
        ("edited_not_resealed", "manifest checksum mismatch"),
        ("rows_inflated", "rows but the manifest says"),
        ("shard_entry_dropped", "is in the committed tokens dataset but not in its manifest"),
    ],
)
def test_lying_tokens_manifest_cli_exit_2(tmp_path, case, message):
    write_run(tmp_path)
    _lie(tmp_path, case)
    before = snapshot(tmp_path)
    r = subprocess.run(
        [sys.executable, "-m", "stages.select", f"run_dir={tmp_path}", "select=all"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.stderr
    assert snapshot(tmp_path) == before
