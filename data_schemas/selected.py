"""The selected (train-ready) table: one row per sequence, written by ``stages.select``.

The trainer streams these rows and reads contiguous arrays: per-token columns are lists of length
``response_len`` (T); top-K columns are flattened row-major to length T*K (``topk_k`` gives K) so
one ``np.frombuffer``-style reshape recovers ``[T, K]``. ``weights`` is the selection weight per
token (0 = excluded); a sequence whose weights are all 0 is kept (and counted in the summary), so
nothing is dropped silently.

``teacher_topk_logprobs`` is float32: the decoded codec values of the tokens table (multiples of
2**-9 nats), exactly, so the selected data keeps the codec's 2**-10 error bound (fp16, stored
before, rounds by up to 2**-5 nats near -64). Shards written before still hold float16; every
reader widens to float32 (the loader does), so the schema version stays 1.

Writer options (``parquet_options``): BYTE_STREAM_SPLIT and no dictionary for the 32-bit lists
(fixed-point log-probs have zero low mantissa bytes, which zstd then removes: float32 ends up
smaller than fp16 with a dictionary was, and ~2x faster to write), dictionary for strings and
small ints, zstd level 1 (this table is a per-policy derivative of ``tokens``, written often).
"""

from __future__ import annotations

import math
from dataclasses import replace

import pyarrow as pa

from data_schemas.common import LOGPROB_TOL, TableSpec, check_table

NAME = "selected"
VERSION = 1
IDS = pa.list_(pa.int32())
F32 = pa.list_(pa.float32())
F16 = pa.list_(pa.float16())
ZSTD_LEVEL = 1  # within 1 % of level 3's size on this data, writes ~1.4x faster

SCHEMA = pa.schema(
    [
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("prompt_id", pa.string(), nullable=False),
        pa.field("is_guided", pa.bool_(), nullable=False),
        pa.field("train_prompt_ids", IDS, nullable=False),
        pa.field("response_ids", IDS, nullable=False),
        pa.field("response_len", pa.int32(), nullable=False),
        pa.field("n_kept", pa.int32(), nullable=False),  # tokens with weight > 0
        pa.field("weights", F32, nullable=False),  # [T]
        pa.field("segments", pa.list_(pa.uint8()), nullable=False),  # [T]
        pa.field("teacher_logprob", F32, nullable=False),  # [T]
        pa.field("behavior_logprob", F32, nullable=False),  # [T]
        pa.field("ref_logprob", F32, nullable=True),  # [T] or null
        pa.field("topk_k", pa.int32(), nullable=False),  # K
        pa.field("teacher_topk_ids", IDS, nullable=False),  # [T*K]
        pa.field("teacher_topk_logprobs", F32, nullable=False),  # [T*K]
        pa.field("teacher_topk_logmass", F32, nullable=False),  # [T]
        pa.field("behavior_topk_k", pa.int32(), nullable=False),  # Kb (0 = not stored)
        pa.field("behavior_topk_ids", IDS, nullable=True),  # [T*Kb] or null
        pa.field("teacher_logprobs_on_behavior_topk", F16, nullable=True),  # [T*Kb] or null
    ]
)

# Cross-tokenizer columns, present when the tokens have them (data_schemas/tokens.py, xtok_*):
# per token [T], and the teacher's sorted top-K probabilities flattened [T*K]. Absent otherwise,
# so same-tokenizer selections are what they were (additive; the version stays 1).
XTOK_FIELDS = [
    pa.field("xtok_chunk", IDS, nullable=True),  # [T] chunk id in the sample; < 0 not scored
    pa.field("xtok_chunk_logprob", F32, nullable=True),  # [T] teacher log-prob of the chunk
    pa.field("xtok_mapped_k", pa.list_(pa.int16()), nullable=True),  # [T] real top-K entries
    pa.field("xtok_mapped_frac", F32, nullable=True),  # [T] mapped share of the top-K mass
    pa.field("xtok_sorted_probs", F16, nullable=True),  # [T*K] teacher probabilities, sorted
]

SPEC = TableSpec(
    name=NAME,
    schema=SCHEMA,
    keys=("sample_id",),
    logprob_cols=(
        "teacher_logprob",
        "behavior_logprob",
        "ref_logprob",
        "teacher_topk_logprobs",
        "teacher_topk_logmass",
        "teacher_logprobs_on_behavior_topk",
    ),
    finite_cols=("weights",),
    nonneg_cols=("weights",),
    id_cols=("train_prompt_ids", "response_ids", "teacher_topk_ids", "behavior_topk_ids"),
    same_length=(
        (
            "response_ids",
            "weights",
            "segments",
            "teacher_logprob",
            "behavior_logprob",
            "teacher_topk_logmass",
        ),
        ("teacher_topk_ids", "teacher_topk_logprobs"),
        ("behavior_topk_ids", "teacher_logprobs_on_behavior_topk"),
    ),
)


# The float list columns are checked by their min and max instead (see _values_ok).
_FLOAT_LISTS = tuple(
    f.name for f in SCHEMA if pa.types.is_list(f.type) and pa.types.is_floating(f.type.value_type)
)
_LIST_SPEC = replace(
    SPEC,
    logprob_cols=tuple(c for c in SPEC.logprob_cols if c not in _FLOAT_LISTS),
    finite_cols=tuple(c for c in SPEC.finite_cols if c not in _FLOAT_LISTS),
    nonneg_cols=tuple(c for c in SPEC.nonneg_cols if c not in _FLOAT_LISTS),
)


def _values_ok(table: pa.Table, col: str) -> bool:
    """The rule check_table applies to a float list column (finite; log-probs <= LOGPROB_TOL;
    weights >= 0), from two reductions: NaN propagates to min/max and +-inf shows in one of
    them. check_table converts every value to float64 first: ~5x slower on T*K top-K lists."""
    arr = table.column(col).combine_chunks().flatten()
    if len(arr) == 0 or arr.null_count == len(arr):
        return True
    v = arr.drop_null().to_numpy(zero_copy_only=False)
    lo, hi = float(v.min()), float(v.max())
    ok = math.isfinite(lo) and math.isfinite(hi)
    if col in SPEC.logprob_cols:
        ok = ok and hi <= LOGPROB_TOL
    if col in SPEC.nonneg_cols:
        ok = ok and lo >= 0
    return ok


def validate(
    table: pa.Table, *, where: str = "selected", vocab_size: int | None = None
) -> pa.Table:
    """Check the table (common rules) plus T*K lengths of the flattened top-K columns."""
    import pyarrow.compute as pc

    from data_schemas.common import SchemaError

    table = check_table(table, _LIST_SPEC, where=where, vocab_size=vocab_size)
    if not all(_values_ok(table, c) for c in _FLOAT_LISTS):
        check_table(table, SPEC, where=where, vocab_size=vocab_size)  # names the first bad value
    t = table["response_len"].to_numpy()
    k = table["topk_k"].to_numpy()
    n = pc.list_value_length(table["teacher_topk_ids"]).to_numpy()
    if (n != t * k).any():
        i = int((n != t * k).argmax())
        raise SchemaError(
            f"selected: teacher_topk_ids has {n[i]} entries at row {i}, expected T*K = {t[i] * k[i]}",
            where,
            "re-run the select stage",
        )
    return table


def parquet_options(schema: pa.Schema) -> dict:
    """pyarrow ParquetWriter options for a selected shard (see the module docstring)."""
    split, dictionary = {}, []
    for f in schema:
        t = f.type.value_type if pa.types.is_list(f.type) else f.type
        path = f"{f.name}.list.element" if pa.types.is_list(f.type) else f.name
        # DuckDB reads BYTE_STREAM_SPLIT for 32/64-bit numbers only (not fp16)
        if pa.types.is_list(f.type) and t.bit_width >= 32:
            split[path] = "BYTE_STREAM_SPLIT"
        else:
            dictionary.append(f.name)
    return {"compression_level": ZSTD_LEVEL, "use_dictionary": dictionary, "column_encoding": split}
