"""The tokens table of one scored shard: the per-token columns (``data_schemas/tokens.py``) from the
results of a shard's passes."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from data_schemas import tokens as tokens_table
from stages.lib.scoring.hf import topk_logmass
from stages.lib.scoring.plan import ShardPlan


def build_tokens_table(
    rows: list[dict],
    plan: ShardPlan,
    sc,
    vocab_size: int,
    behavior: bool,
    has_ref: bool,
    teacher_ids: list[str] | None = None,
) -> pa.Table:
    """Assemble the shard's tokens table from the pass results (``teacher_ids``: each row's
    routed teacher, several teachers only; else the table has no teacher_id column)."""
    K, Kb = sc.topk, sc.behavior_topk
    schema = tokens_table.SCHEMA if teacher_ids else tokens_table.SCHEMA_ONE_TEACHER
    cols: dict[str, list] = {n: [] for n in schema.names}
    for i, (row, keys) in enumerate(zip(rows, plan.of, strict=True)):
        r = len(row["response_ids"])
        if teacher_ids:
            cols["teacher_id"].append(np.full(r, teacher_ids[i], dtype=object))
        t = plan.jobs[keys["teacher"]].result
        cols["sample_id"].append(np.full(r, row["sample_id"], dtype=object))
        cols["pos"].append(np.arange(r, dtype=np.int32))
        cols["token_id"].append(np.asarray(row["response_ids"], dtype=np.int32))
        cols["segment"].append(np.zeros(r, dtype=np.uint8))
        cols["is_guided"].append(np.full(r, bool(row["is_guided"])))
        cols["teacher_logprob"].append(t["logprob"])
        cols["teacher_topk_ids"].append(t["topk_ids"][:, :K].astype(np.int32))  # [r, K]
        # fp32 in: the store's codec quantises to a 2**-10-nat bound (data_schemas/codec.py)
        cols["teacher_topk_logprobs"].append(t["topk_logprobs"][:, :K].astype(np.float32))
        cols["teacher_topk_logmass"].append(
            t["topk_logmass"]
            if t["topk_ids"].shape[1] == K
            else topk_logmass(t["topk_logprobs"], K, vocab_size)
        )
        cols["teacher_entropy"].append(_entropy(t, sc.entropy, r))
        if behavior:
            b = plan.jobs[keys["behavior"]].result
            cols["behavior_logprob"].append(b["logprob"])
            cols["behavior_entropy"].append(_entropy(b, sc.entropy, r))
        else:  # the engine's own log-prob of the sampled token, stored at rollout time
            cols["behavior_logprob"].append(np.asarray(row["behavior_logprobs"], np.float32))
            cols["behavior_entropy"].append(np.full(r, None, dtype=object))
        cols["ref_logprob"].append(
            plan.jobs[keys["ref"]].result["logprob"] if has_ref else np.full(r, None, dtype=object)
        )
        if Kb:
            bjob = plan.jobs[keys["behavior"]]
            cols["behavior_topk_ids"].append(bjob.result["topk_ids"][:, :Kb].astype(np.int32))
            if keys["teacher"] == keys["behavior"]:  # same distribution: its own top-Kb
                on = bjob.result["topk_logprobs"][:, :Kb]
            else:
                on = plan.jobs[keys["teacher"]].gathered[keys["behavior"]]
            cols["teacher_logprobs_on_behavior_topk"].append(on.astype(np.float16))  # [r, Kb]
    n = sum(len(row["response_ids"]) for row in rows)
    arrays = []
    for f in schema:
        parts = cols[f.name]
        if pa.types.is_list(f.type):
            if not parts:  # behaviour top-K off
                arrays.append(pa.nulls(n, f.type))
                continue
            # [N, K] values + fixed offsets: no per-token Python lists (K x tokens objects)
            vals = np.concatenate(parts)  # [N, K], K >= 1
            width = vals.shape[1]
            offsets = pa.array(np.arange(0, n * width + 1, width), pa.int32())  # [N + 1]
            arrays.append(
                pa.ListArray.from_arrays(offsets, pa.array(vals.reshape(-1))).cast(f.type)
            )
            continue
        flat = [x for p in parts for x in p] if parts else []
        if parts and all(isinstance(p, np.ndarray) and p.dtype != object for p in parts):
            arrays.append(pa.array(np.concatenate(parts)).cast(f.type))
        else:
            if pa.types.is_floating(f.type):  # numbers and nulls mixed (cross-tokenizer refusals)
                flat = [x.item() if isinstance(x, np.generic) else x for x in flat]
            arrays.append(pa.array(flat, type=f.type, from_pandas=True))
    return pa.Table.from_arrays(arrays, schema=schema)


def _entropy(res: dict, wanted: bool, r: int) -> np.ndarray:
    if wanted and "entropy" in res and not np.isnan(res["entropy"]).any():
        return res["entropy"].astype(np.float32)
    return np.full(r, None, dtype=object)
