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
# Columns a shard may leave out (absent = null), with their DuckDB type for the views.
OPTIONAL_COLUMNS = {"teacher_id": "VARCHAR"}
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


def validate(table: pa.Table, *, where: str = "tokens", vocab_size: int | None = None) -> pa.Table:
    """Check the table: nulls, NaN/inf or positive log-probs, ragged top-K, ids, unique keys.
    A table without ``teacher_id`` (one teacher) is checked, and kept, without it."""
    spec = SPEC if "teacher_id" in table.column_names else SPEC_ONE_TEACHER
    return check_table(table, spec, where=where, vocab_size=vocab_size)


# The storage codec: stages.lib.store calls these hooks of a table module when they exist.
encode = codec.encode_table  # logical -> stored table (after validate)
decode = codec.decode_table  # stored -> logical table (after read)
physical_columns = codec.physical_columns  # logical column names -> stored ones
parquet_options = codec.parquet_options  # writer options for the stored schema
DUCKDB_SELECT = codec.DUCKDB_SELECT  # select list of a DuckDB view over the stored shards
