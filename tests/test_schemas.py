"""Each schema round-trips write -> read, and validate() rejects what pyarrow lets through."""

from __future__ import annotations

import json
import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_schemas import manifest, prompts, rollouts, selected, tokens
from data_schemas.common import SchemaError

K = 4


def rollout_rows(n=3):
    return [
        {
            "sample_id": f"p{i}#0",
            "prompt_id": f"p{i}",
            "sample_idx": 0,
            "train_prompt_ids": [2, 5, 6],
            "rollout_prompt_ids": [2, 9, 5, 6],
            "teacher_prompt_ids": [2, 9, 5, 6],
            "response_ids": [7, 8, 3],
            "behavior_logprobs": [-0.5, -1.0, -0.1],
            "response_len": 3,
            "is_guided": i % 2 == 0,
            "finish_reason": "eos",
            "temperature": 1.0,
            "top_p": 1.0,
            "answer": "w1",
            "kind": "private",
            "correct": None,
        }
        for i in range(n)
    ]


def token_rows(n=3):
    rows = []
    for s in range(n):
        for pos in range(2):
            rows.append(
                {
                    "sample_id": f"p{s}#0",
                    "pos": pos,
                    "token_id": 7 + pos,
                    "segment": 0,
                    "is_guided": False,
                    "teacher_logprob": -0.7,
                    "teacher_topk_ids": [7, 8, 9, 10],
                    "teacher_topk_logprobs": [-0.7, -1.2, -2.0, -3.0],
                    "teacher_topk_logmass": -0.05,
                    "teacher_entropy": 1.1,
                    "behavior_logprob": -0.9,
                    "behavior_entropy": 1.3,
                    "ref_logprob": -2.5,
                    "behavior_topk_ids": None,
                    "teacher_logprobs_on_behavior_topk": None,
                }
            )
    return rows


def selected_rows(n=2):
    return [
        {
            "sample_id": f"p{i}#0",
            "prompt_id": f"p{i}",
            "is_guided": False,
            "train_prompt_ids": [2, 5],
            "response_ids": [7, 3],
            "response_len": 2,
            "n_kept": 2,
            "weights": [1.0, 1.0],
            "segments": [0, 0],
            "teacher_logprob": [-0.1, -0.2],
            "behavior_logprob": [-0.3, -0.4],
            "ref_logprob": None,
            "topk_k": K,
            "teacher_topk_ids": list(range(2 * K)),
            "teacher_topk_logprobs": [-1.0] * (2 * K),
            "teacher_topk_logmass": [-0.01, -0.02],
            "behavior_topk_k": 0,
            "behavior_topk_ids": None,
            "teacher_logprobs_on_behavior_topk": None,
        }
        for i in range(n)
    ]


TABLES = {
    "rollouts": (rollouts, rollout_rows),
    "tokens": (tokens, token_rows),
    "selected": (selected, selected_rows),
    "prompts": (
        prompts,
        lambda: [{"id": "a", "prompt": "q", "context": None, "answer": "x", "kind": None}],
    ),
}


def table_of(mod, rows):
    return pa.Table.from_pylist(rows, schema=mod.SCHEMA)


@pytest.mark.parametrize("name", TABLES)
def test_round_trip(name, tmp_path):
    mod, make = TABLES[name]
    t = mod.validate(table_of(mod, make()))
    pq.write_table(t, tmp_path / "x.parquet", compression="zstd")
    back = pq.read_table(tmp_path / "x.parquet")
    assert back.schema.equals(mod.SCHEMA) and back.to_pylist() == t.to_pylist()


def _bad(mod, rows, col, value, row=0):
    rows[row][col] = value
    return pa.Table.from_pylist(rows, schema=mod.SCHEMA)


@pytest.mark.parametrize(
    "mod,make,col,value,match",
    [
        (tokens, token_rows, "teacher_logprob", math.nan, "teacher_logprob"),
        (tokens, token_rows, "teacher_logprob", math.inf, "teacher_logprob"),
        (tokens, token_rows, "behavior_logprob", 0.5, "log-probs must be finite and <= 0"),
        (
            tokens,
            token_rows,
            "teacher_topk_logprobs",
            [-0.7, math.nan, -2.0, -3.0],
            "teacher_topk_logprobs",
        ),
        (tokens, token_rows, "teacher_topk_ids", [7, 8, 9], "ragged"),
        (tokens, token_rows, "token_id", 5000, "outside the vocabulary"),
        (tokens, token_rows, "teacher_topk_ids", [7, 8, 9, -1], "outside the vocabulary"),
        (tokens, token_rows, "sample_id", None, "null"),
        (tokens, token_rows, "pos", 1, "duplicated key"),
        (rollouts, rollout_rows, "sample_id", "p1#0", "duplicated key"),
        (rollouts, rollout_rows, "response_ids", [], "empty response"),
        (rollouts, rollout_rows, "behavior_logprobs", [-0.5, -1.0], "ragged"),
        (rollouts, rollout_rows, "finish_reason", "abort", "finish_reason"),
        (rollouts, rollout_rows, "train_prompt_ids", [2, None], "null element"),
        (selected, selected_rows, "teacher_topk_ids", [1, 2, 3], "T\\*K"),
        (selected, selected_rows, "weights", [1.0, -1.0], "negative"),
        (prompts, TABLES["prompts"][1], "prompt", "   ", "empty prompt"),
    ],
)
def test_validate_rejects(mod, make, col, value, match):
    rows = make()
    if col == "response_ids" and value == []:
        rows[0]["behavior_logprobs"] = []
        rows[0]["response_len"] = 0
    if mod is selected and col == "teacher_topk_ids":  # consistent pair, wrong T*K length
        rows[0]["teacher_topk_logprobs"] = [-1.0] * len(value)
    if col == "pos":  # make row 0 collide with row 1 (same sample, same pos)
        rows[0]["pos"] = 1
        t = pa.Table.from_pylist(rows, schema=mod.SCHEMA)
    else:
        t = _bad(mod, rows, col, value)
    with pytest.raises(SchemaError, match=match):
        mod.validate(t, vocab_size=100) if mod is not prompts else mod.validate(t)


def test_missing_column_named():
    t = pa.Table.from_pylist(rollout_rows()).drop_columns(["teacher_prompt_ids"])
    with pytest.raises(SchemaError, match="teacher_prompt_ids"):
        rollouts.validate(t)


def test_prompts_read_jsonl_and_errors(tmp_path):
    good = tmp_path / "p.jsonl"
    good.write_text(json.dumps({"id": "a", "prompt": "hello"}) + "\n")
    t = prompts.read(str(good))
    assert (
        t.column_names[:4] == ["id", "prompt", "context", "answer"]
        and t["context"][0].as_py() is None
    )
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "prompt": "x"}\n{not json\n')
    with pytest.raises(SchemaError, match="line 2"):
        prompts.read(str(bad))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(SchemaError, match="empty"):
        prompts.read(str(empty))
    nocol = tmp_path / "nocol.jsonl"
    nocol.write_text(json.dumps({"id": "a", "text": "x"}) + "\n")
    with pytest.raises(SchemaError, match="prompt"):
        prompts.read(str(nocol))
    with pytest.raises(SchemaError, match="not found"):
        prompts.read(str(tmp_path / "nope.parquet"))
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(SchemaError, match="Parquet"):
        prompts.read(str(junk))


def test_manifest_validation(tmp_path):
    (tmp_path / manifest.FILENAME).write_text("{broken")
    with pytest.raises(SchemaError, match="unreadable"):
        manifest.read(tmp_path)
    (tmp_path / manifest.FILENAME).write_text(json.dumps({"format": "other"}))
    with pytest.raises(SchemaError, match="not a distillery manifest"):
        manifest.read(tmp_path)
    assert manifest.read(tmp_path / "nowhere") is None
