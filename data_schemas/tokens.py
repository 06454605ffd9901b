"""The tokens table: one row per response token, written by ``stages.score``.

This is the table people query. Names fixed by the data contract (docs/DATA.md):
``sample_id``, ``pos`` (0 = first response token), ``token_id``, ``segment`` (0 = student token,
1 = teacher-prefix / off-policy guidance token), ``teacher_logprob`` (fp32, log pi_T(token_id)),
``teacher_topk_ids`` / ``teacher_topk_logprobs`` (K per row, sorted by descending probability;
full-vocabulary log-softmax gathered, never renormalised over K), ``teacher_topk_logmass`` (log of
the summed top-K probability; the tail mass is 1 - exp of it), ``teacher_entropy``,
``behavior_logprob`` / ``behavior_entropy`` (the model that sampled, after the rollout prompt),
``ref_logprob`` (optional reference model after the train prompt), and optionally the behaviour's
top-K ids with the teacher's log-probs on them (vOPD student-support baseline).
fp16 is used where ~1e-3 relative precision is enough (entropies), fp32 for the scalars the
advantage is built from. ``teacher_topk_logprobs`` is float32 as read; on disk it is fixed point
with a stated error bound (data_schemas/codec.py: <= 2**-10 nats), which ``stages.lib.store`` encodes on
write and decodes on read (``encode``/``decode`` below), and DuckDB views decode with
``DUCKDB_SELECT``. Version 2: the codec layout (version 1 stored fp16 top-K log-probs).

``teacher_id`` (nullable, additive) names the teacher that scored the row when the score stage
routes rollouts to several teachers (config ``teachers`` + ``score.route_by``). A single-teacher
run does not write the column at all, so its shards stay byte for byte what they were before the
column existed; the DuckDB views (select, sql) show it as null there (``OPTIONAL_COLUMNS``),
a plain Parquet reader sees no such column. The schema version is therefore unchanged: every
version-2 shard, with or without the column, reads the same way.

The ``xtok_*`` columns (cross-tokenizer alignment, ``XTOK_VERSION``; docs/CROSS_TOKENIZER.md) are
additive the same way: written only by ``score.cross_tokenizer=align`` for a teacher whose tokenizer
differs from the student's, absent (null in the views) otherwise. Per student token: ``xtok_chunk``
(the aligned chunk's id in its sample, 0-based in text order; negative on every token of a
response the teacher did not score, the reason's code in ``XTOK_REFUSED``: selection weight 0),
``xtok_chunk_logprob`` (the teacher's log-prob of the whole chunk, GOLD's merged span, on each of
its tokens),
``xtok_mapped_k`` (how many leading entries of ``teacher_topk_ids`` are teacher top-K entries
mapped into student ids where the tokens stand for the same text in context; the remaining entries are filler with
``XTOK_FILL_LOGPROB``), ``xtok_mapped_frac`` (the mapped share of the teacher's top-K mass, 0 where
no teacher position is comparable) and ``xtok_sorted_probs`` (the teacher's own top-K probabilities
in decreasing order, for ULD; zeros where no teacher position is comparable).
"""

from __future__ import annotations

import dataclasses

import pyarrow as pa

from data_schemas import codec
from data_schemas.common import TableSpec, check_table

NAME = "tokens"
VERSION = 2  # 2: top-K log-probs stored with data_schemas.codec

SCHEMA = pa.schema(
    [
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("pos", pa.int32(), nullable=False),
        pa.field("token_id", pa.int32(), nullable=False),
        pa.field("segment", pa.uint8(), nullable=False),
        pa.field("is_guided", pa.bool_(), nullable=False),
        pa.field("teacher_logprob", pa.float32(), nullable=False),
        pa.field("teacher_topk_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("teacher_topk_logprobs", pa.list_(pa.float32()), nullable=False),
        pa.field("teacher_topk_logmass", pa.float32(), nullable=False),
        pa.field("teacher_entropy", pa.float16(), nullable=True),  # null when not computed
        pa.field("behavior_logprob", pa.float32(), nullable=False),
        pa.field("behavior_entropy", pa.float16(), nullable=True),  # null when not computed
        pa.field("ref_logprob", pa.float32(), nullable=True),  # null without a reference model
        pa.field("behavior_topk_ids", pa.list_(pa.int32()), nullable=True),
        pa.field("teacher_logprobs_on_behavior_topk", pa.list_(pa.float16()), nullable=True),
        pa.field("teacher_id", pa.string(), nullable=True),  # routed teacher (several teachers)
    ]
)
# Cross-tokenizer columns (score.cross_tokenizer=align with a teacher of another tokenizer).
XTOK_VERSION = 3  # version of the xtok_* columns' meaning (recorded in the manifest's extra)
# 3: byte spans from each tokenizer's byte mapping and the student's ids as sampled (2: text)
XTOK_FILL_LOGPROB = -1.0e4  # top-K filler entries past xtok_mapped_k: no teacher number
# xtok_chunk of a response the teacher did not score -> why (counted in the tokens manifest)
XTOK_REFUSED = {
    -1: "roundtrip",  # the teacher cannot spell the response's bytes exactly
    -2: "special_token",  # a special token inside the response (only a final stop is aligned)
    -3: "no_stop_match",  # a final special token the teacher's vocabulary has no match for
    -4: "empty",  # nothing to score on the teacher's side
    -5: "no_prefix",  # the teacher's prefix is empty
    -6: "too_long",  # prefix + response, on the teacher's tokenization, exceed its context
    -7: "invalid_utf8",  # bytes that are not UTF-8 text (refused by the SFT text path only)
}
XTOK_FIELDS = [
    pa.field("xtok_chunk", pa.int32(), nullable=True),  # chunk id in the sample; -1 not scored
    pa.field("xtok_chunk_logprob", pa.float32(), nullable=True),  # teacher log-prob of the chunk
    pa.field("xtok_mapped_k", pa.int16(), nullable=True),  # real entries of the top-K columns
    pa.field("xtok_mapped_frac", pa.float32(), nullable=True),  # mapped share of top-K mass
    pa.field("xtok_sorted_probs", pa.list_(pa.float16()), nullable=True),  # [K] decreasing
]
XTOK_COLUMNS = tuple(f.name for f in XTOK_FIELDS)
# Columns a shard may leave out (absent = null), with their DuckDB type for the views.
OPTIONAL_COLUMNS = {
    "teacher_id": "VARCHAR",
    "xtok_chunk": "INTEGER",
    "xtok_chunk_logprob": "FLOAT",
    "xtok_mapped_k": "SMALLINT",
    "xtok_mapped_frac": "FLOAT",
    "xtok_sorted_probs": "FLOAT[]",
}
# The schema of a single-teacher shard: every column but teacher_id.
SCHEMA_ONE_TEACHER = SCHEMA.remove(SCHEMA.get_field_index("teacher_id"))

SPEC = TableSpec(
    name=NAME,
    schema=SCHEMA,
    keys=("sample_id", "pos"),
    logprob_cols=(
        "teacher_logprob",
        "teacher_topk_logprobs",
        "teacher_topk_logmass",
        "behavior_logprob",
        "ref_logprob",
        "teacher_logprobs_on_behavior_topk",
    ),
    finite_cols=("teacher_entropy", "behavior_entropy"),
    id_cols=("token_id", "teacher_topk_ids", "behavior_topk_ids"),
    same_length=(
        ("teacher_topk_ids", "teacher_topk_logprobs"),
        ("behavior_topk_ids", "teacher_logprobs_on_behavior_topk"),
    ),
    fixed_length=("teacher_topk_ids", "behavior_topk_ids"),
)
SPEC_ONE_TEACHER = dataclasses.replace(SPEC, schema=SCHEMA_ONE_TEACHER)
# A cross-tokenizer shard (one teacher): the one-teacher columns, then the xtok columns.
SCHEMA_XTOK = pa.schema([*SCHEMA_ONE_TEACHER, *XTOK_FIELDS])
SPEC_XTOK = dataclasses.replace(
    SPEC_ONE_TEACHER,
    schema=SCHEMA_XTOK,
    logprob_cols=(*SPEC.logprob_cols, "xtok_chunk_logprob"),
    finite_cols=(*SPEC.finite_cols, "xtok_mapped_frac", "xtok_sorted_probs"),
    nonneg_cols=("xtok_mapped_k", "xtok_mapped_frac", "xtok_sorted_probs"),
    fixed_length=(*SPEC.fixed_length, "xtok_sorted_probs"),
)


def validate(table: pa.Table, *, where: str = "tokens", vocab_size: int | None = None) -> pa.Table:
    """Check the table: nulls, NaN/inf or positive log-probs, ragged top-K, ids, unique keys.
    A table without ``teacher_id`` (one teacher) is checked, and kept, without it; one with the
    ``xtok_*`` columns is checked with them (values in range, fixed-length sorted probabilities)."""
    if "xtok_chunk" in table.column_names:
        return check_table(table, SPEC_XTOK, where=where, vocab_size=vocab_size)
    spec = SPEC if "teacher_id" in table.column_names else SPEC_ONE_TEACHER
    return check_table(table, spec, where=where, vocab_size=vocab_size)


# The storage codec: stages.lib.store calls these hooks of a table module when they exist.
encode = codec.encode_table  # logical -> stored table (after validate)
decode = codec.decode_table  # stored -> logical table (after read)
physical_columns = codec.physical_columns  # logical column names -> stored ones
parquet_options = codec.parquet_options  # writer options for the stored schema
DUCKDB_SELECT = codec.DUCKDB_SELECT  # select list of a DuckDB view over the stored shards
