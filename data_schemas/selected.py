"""The selected (train-ready) table: one row per sequence, written by ``stages.select``.

The trainer streams these rows and reads contiguous arrays: per-token columns are lists of length
``response_len`` (T); top-K columns are flattened row-major to length T*K (``topk_k`` gives K) so
one ``np.frombuffer``-style reshape recovers ``[T, K]``. ``weights`` is the selection weight per
token (0 = excluded); a sequence whose weights are all 0 is kept (and counted in the summary), so
nothing is dropped silently.
"""

from __future__ import annotations

import pyarrow as pa

from data_schemas.common import TableSpec, check_table

NAME = "selected"
VERSION = 1
IDS = pa.list_(pa.int32())
F32 = pa.list_(pa.float32())
F16 = pa.list_(pa.float16())

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
        pa.field("teacher_topk_logprobs", F16, nullable=False),  # [T*K]
        pa.field("teacher_topk_logmass", F32, nullable=False),  # [T]
        pa.field("behavior_topk_k", pa.int32(), nullable=False),  # Kb (0 = not stored)
        pa.field("behavior_topk_ids", IDS, nullable=True),  # [T*Kb] or null
        pa.field("teacher_logprobs_on_behavior_topk", F16, nullable=True),  # [T*Kb] or null
    ]
)

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


def validate(
    table: pa.Table, *, where: str = "selected", vocab_size: int | None = None
) -> pa.Table:
    """Check the table (common rules) plus T*K lengths of the flattened top-K columns."""
    import pyarrow.compute as pc

    from data_schemas.common import SchemaError

    table = check_table(table, SPEC, where=where, vocab_size=vocab_size)
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
