"""Selection pass 2 (Arrow): the train-ready table, one row per sequence with per-token weights and
the teacher/behaviour/reference columns, top-K lists decoded and flattened."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from data_schemas import codec, selected, tokens
from stages.lib.errors import UserError

# ----------------------------------------------------------------------------- Arrow pass
# What pass 2 reads of a tokens shard, as stored: the top-K log-probs stay in the codec's
# fixed-point deltas (data_schemas/codec.py) and are decoded here with the fixed-K fast path.
TOKEN_COLUMNS = (
    "sample_id",
    "pos",
    "token_id",
    "segment",
    "teacher_logprob",
    "behavior_logprob",
    "ref_logprob",
    "teacher_topk_ids",
    codec.PHYSICAL,
    "teacher_topk_logmass",
    "behavior_topk_ids",
    "teacher_logprobs_on_behavior_topk",
    *tokens.XTOK_COLUMNS,  # cross-tokenizer shards only (read when present)
)


ROLLOUT_COLUMNS = (
    "sample_id",
    "prompt_id",
    "is_guided",
    "train_prompt_ids",
    "response_ids",
    "response_len",
)


def read_tokens_shard(path: Path) -> pa.Table:
    """The columns pass 2 needs of one tokens shard, top-K log-probs still codec-encoded.

    A shard in the logical layout (``teacher_topk_logprobs`` as floats) is read as it is.
    """
    names = set(pq.read_schema(path).names)
    cols = [c for c in TOKEN_COLUMNS if c in names]
    if codec.PHYSICAL not in names:
        cols.append(codec.LOGICAL)
    return pq.read_table(path, columns=cols)


def decode_topk(deltas: np.ndarray, k: int) -> np.ndarray:
    """Flat codec deltas [N*K] of fixed-K lists -> flat float32 log-probs [N*K].

    Equal to ``codec.decode_logprobs`` (tested) but a row-wise cumsum on the [N, K] view instead
    of a global cumsum plus per-list corrections: ~8x faster on millions of tokens. int32 sums
    are exact when no prefix sum can overflow (|d| * K < 2^31, true for any log-prob above
    -2^22 / K nats); otherwise int64. int -> float32 then * -STEP (a power of two) rounds exactly
    like the codec's float64 product cast to float32.
    """
    d = deltas.reshape(-1, k)  # [N, K]
    big = len(deltas) and max(int(deltas.max()), -int(deltas.min())) * k >= 2**31
    q = np.cumsum(d, axis=1, dtype=np.int64 if big else np.int32)  # [N, K] fixed-point, >= 0
    out = q.astype(np.float32)
    out *= np.float32(-codec.STEP)
    return out.reshape(-1)


def _flat_values(col: pa.ChunkedArray) -> pa.Array:
    """The values of a list column as one array (zero copy for a single chunk)."""
    arr = col.combine_chunks()
    return arr.flatten()


def sequence_order(ro: pa.Table, tk: pa.Table, where: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Sequence offsets [S+1] and the token row for every flat (sequence, pos) slot.

    Proves that every response position has exactly one token row and that the tokens match
    ``response_ids``. The order is None when the rows are already in sequence order (what the
    score stage writes), so the columns can be used without a gather.
    """
    fix = "re-run python -m stages.score with overwrite=true (tokens must match the rollouts)"
    n_seq = ro.num_rows
    lens = ro["response_len"].to_numpy().astype(np.int64)  # [S]
    offsets = np.zeros(n_seq + 1, np.int64)
    np.cumsum(lens, out=offsets[1:])
    n_tok = int(offsets[-1])
    row = pc.fill_null(pc.index_in(tk["sample_id"], value_set=ro["sample_id"]), -1).to_numpy()
    pos = tk["pos"].to_numpy().astype(np.int64)  # [N]
    if (row < 0).any():
        sid = tk["sample_id"][int(np.flatnonzero(row < 0)[0])]
        raise UserError(
            f"token rows for sample {sid} which is not in the rollouts shard", where, fix
        )
    if (pos < 0).any() or (pos >= lens[row]).any():
        raise UserError("token positions outside the response length", where, fix)
    dest = offsets[row] + pos  # [N] flat index of each token row in sequence order
    hits = np.bincount(dest, minlength=n_tok)
    if len(dest) != n_tok or (hits != 1).any():
        raise UserError(
            f"{int((hits == 0).sum())} response positions missing and "
            f"{int((hits > 1).sum())} duplicated in the tokens table",
            where,
            fix,
        )
    order = None
    if not np.array_equal(dest, np.arange(n_tok)):
        order = np.empty(n_tok, np.int64)
        order[dest] = np.arange(n_tok)  # order[j] = token row that goes to flat position j
    token_id = tk["token_id"].to_numpy()
    if order is not None:
        token_id = token_id[order]
    if not np.array_equal(token_id, pc.list_flatten(ro["response_ids"]).to_numpy()):
        raise UserError("tokens.token_id differs from rollouts.response_ids", where, fix)
    return offsets, order


def topk_lists(
    tk: pa.Table, ids: str, lps: str, offsets: np.ndarray, order: np.ndarray | None, where: str
) -> tuple[int, pa.Array | None, pa.Array | None]:
    """K and the per-sequence [T*K] lists of one top-K pair (None, None when not stored).

    The flat values are reused as they are (sequence order) or gathered row-wise; only the
    list offsets change (offsets * K). Codec-encoded log-probs are decoded to float32.
    """
    fix = "re-run python -m stages.score with overwrite=true"
    n_tok = int(offsets[-1])
    nulls = tk[ids].null_count
    if nulls == n_tok:
        return 0, None, None
    if nulls:
        raise UserError(f"{ids} is null for some tokens only", where, fix)
    flat_ids = _flat_values(tk[ids])
    k = len(flat_ids) // n_tok if n_tok else 0
    lens = pc.list_value_length(tk[ids])
    if n_tok and (len(flat_ids) != n_tok * k or pc.min_max(lens).as_py() != {"min": k, "max": k}):
        raise UserError(f"{ids} lists are not all of one length K", where, fix)
    flat_lps = _flat_values(tk[lps])
    if len(flat_lps) != len(flat_ids):
        raise UserError(f"{lps} and {ids} differ in length", where, fix)
    if order is not None:
        flat_ids = pa.array(flat_ids.to_numpy().reshape(n_tok, k)[order].ravel())  # [N*K]
        flat_lps = pa.array(
            flat_lps.to_numpy(zero_copy_only=False).reshape(n_tok, k)[order].ravel()
        )
    if lps == codec.PHYSICAL:
        flat_lps = pa.array(decode_topk(flat_lps.to_numpy(), k))
    offk = pa.array((offsets * k).astype(np.int32))
    return k, pa.ListArray.from_arrays(offk, flat_ids), pa.ListArray.from_arrays(offk, flat_lps)


def assemble(ro: pa.Table, tk: pa.Table, weight: np.ndarray, where: str) -> pa.Table:
    """Per-sequence rows (rollouts order) from one rollouts shard and its tokens shard.

    ``tk`` is a shard as ``read_tokens_shard`` returns it (or in the logical layout); ``weight``
    is aligned with its rows. Everything is columnar: a list column is its flat values in
    sequence order plus the response offsets, so no Python loop runs per sequence or token.
    """
    offsets, order = sequence_order(ro, tk, where)
    n_seq, n_tok = ro.num_rows, int(offsets[-1])
    off32 = pa.array(offsets.astype(np.int32))

    def per_token(name: str) -> pa.Array:
        values = tk[name].combine_chunks()
        if order is not None:
            values = values.take(pa.array(order))
        return pa.ListArray.from_arrays(off32, values)

    lps = codec.PHYSICAL if codec.PHYSICAL in tk.column_names else codec.LOGICAL
    k, t_ids, t_lps = topk_lists(tk, "teacher_topk_ids", lps, offsets, order, where)
    kb, b_ids, b_lps = topk_lists(
        tk, "behavior_topk_ids", "teacher_logprobs_on_behavior_topk", offsets, order, where
    )
    ref_nulls = tk["ref_logprob"].null_count
    if 0 < ref_nulls < n_tok:
        raise UserError(
            "ref_logprob is null for some tokens only",
            where,
            "re-run python -m stages.score with overwrite=true",
        )
    w = weight if order is None else weight[order]
    w = w.astype(np.float32)  # [N]
    kept = np.concatenate([[0], np.cumsum(w > 0)])  # [N+1] (reduceat mishandles empty rows)
    n_kept = kept[offsets[1:]] - kept[offsets[:-1]]  # [S]
    empty_lists = lambda typ: pa.nulls(n_seq, pa.list_(typ))  # noqa: E731
    table = pa.table(
        {
            "sample_id": ro["sample_id"],
            "prompt_id": ro["prompt_id"],
            "is_guided": ro["is_guided"],
            "train_prompt_ids": ro["train_prompt_ids"],
            "response_ids": ro["response_ids"],
            "response_len": ro["response_len"],
            "n_kept": pa.array(n_kept.astype(np.int32)),
            "weights": pa.ListArray.from_arrays(off32, pa.array(w)),
            "segments": per_token("segment"),
            "teacher_logprob": per_token("teacher_logprob"),
            "behavior_logprob": per_token("behavior_logprob"),
            "ref_logprob": empty_lists(pa.float32()) if ref_nulls else per_token("ref_logprob"),
            "topk_k": pa.array(np.full(n_seq, k, np.int32)),
            "teacher_topk_ids": t_ids,
            "teacher_topk_logprobs": t_lps,
            "teacher_topk_logmass": per_token("teacher_topk_logmass"),
            "behavior_topk_k": pa.array(np.full(n_seq, kb, np.int32)),
            "behavior_topk_ids": b_ids if kb else empty_lists(pa.int32()),
            "teacher_logprobs_on_behavior_topk": b_lps if kb else empty_lists(pa.float16()),
        },
        schema=selected.SCHEMA,
    )
    if "xtok_chunk" in tk.column_names:
        table = _with_xtok(table, tk, per_token, offsets, order, k)
    return table


def _with_xtok(table: pa.Table, tk: pa.Table, per_token, offsets, order, k: int) -> pa.Table:
    """The cross-tokenizer columns (``selected.XTOK_FIELDS``), per sequence like the others."""
    for f in selected.XTOK_FIELDS[:-1]:  # per token [T]
        table = table.append_column(f, per_token(f.name).cast(f.type))
    n_tok = int(offsets[-1])
    probs = _flat_values(tk["xtok_sorted_probs"]).to_numpy(zero_copy_only=False)  # [N*K]
    probs = probs.reshape(n_tok, k)
    if order is not None:
        probs = probs[order]
    offk = pa.array((offsets * k).astype(np.int32))  # [S + 1]
    f = selected.XTOK_FIELDS[-1]  # [T*K]
    return table.append_column(f, pa.ListArray.from_arrays(offk, pa.array(probs.reshape(-1))))
