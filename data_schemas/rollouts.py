"""The rollouts table: one row per student sample (written by ``stages.rollout``).

Names fixed by the data contract (docs/DATA.md): ``sample_id`` (unique in the run), ``prompt_id``, ``train_prompt_ids`` (what
the student is trained on; never contains the privileged context), ``rollout_prompt_ids`` (what the
student was actually given; includes the context when guided), ``teacher_prompt_ids`` (the exact
prefix the teacher scores the response after), ``response_ids`` (as sampled by the engine, never
re-encoded), ``is_guided``, ``finish_reason`` (``eos``: a tokenizer / generation-config EOS id;
``stop``: a configured stop id or string; ``length``), ``turn`` (the index of the generated
assistant turn in its conversation, 0 for plain prompts; added in version 2: null in a table
written before it or by a writer that does not set it). The stop token, when there is one, is the last response id.
``behavior_logprobs`` is the engine's log-prob of each sampled token (temperature 1, raw model
distribution): the trainer measures staleness against it.
"""

from __future__ import annotations

import pyarrow as pa

from data_schemas.common import TableSpec, check_table

NAME = "rollouts"
VERSION = 2  # 2: the `turn` column and finish_reason "stop" (additive)
IDS = pa.list_(pa.int32())

SCHEMA = pa.schema(
    [
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("prompt_id", pa.string(), nullable=False),
        pa.field("sample_idx", pa.int32(), nullable=False),  # j in 0..n-1 for this prompt
        pa.field("train_prompt_ids", IDS, nullable=False),
        pa.field("rollout_prompt_ids", IDS, nullable=False),
        pa.field("teacher_prompt_ids", IDS, nullable=False),
        pa.field("response_ids", IDS, nullable=False),
        pa.field("behavior_logprobs", pa.list_(pa.float32()), nullable=False),
        pa.field("response_len", pa.int32(), nullable=False),
        pa.field("is_guided", pa.bool_(), nullable=False),
        pa.field("finish_reason", pa.string(), nullable=False),
        pa.field("temperature", pa.float32(), nullable=False),
        pa.field("top_p", pa.float32(), nullable=False),
        pa.field("answer", pa.string(), nullable=True),  # carried from the prompt, for rewards
        pa.field("kind", pa.string(), nullable=True),  # carried from the prompt, for reports
        pa.field("correct", pa.bool_(), nullable=True),  # answer found in response (if answer)
        pa.field("turn", pa.int32(), nullable=True),  # generated assistant turn (0 = first)
    ]
)

SPEC = TableSpec(
    name=NAME,
    schema=SCHEMA,
    keys=("sample_id",),
    logprob_cols=("behavior_logprobs",),
    id_cols=("train_prompt_ids", "rollout_prompt_ids", "teacher_prompt_ids", "response_ids"),
    same_length=(("response_ids", "behavior_logprobs"),),
)

FINISH_REASONS = ("eos", "stop", "length")


def validate(
    table: pa.Table, *, where: str = "rollouts", vocab_size: int | None = None
) -> pa.Table:
    """Check the table (see data_schemas.common.check_table) plus rollout-specific rules."""
    import pyarrow.compute as pc

    from data_schemas.common import SchemaError

    if "turn" not in table.column_names:  # written before version 2: turn unknown (null)
        table = table.append_column("turn", pa.nulls(len(table), pa.int32()))
    table = check_table(table, SPEC, where=where, vocab_size=vocab_size)
    lens = pc.list_value_length(table["response_ids"]).to_numpy()
    if (lens == 0).any():
        i = int((lens == 0).argmax())
        raise SchemaError(
            f"rollouts: empty response at row {i} (sample_id={table['sample_id'][i]})",
            where,
            "raise rollout.max_new_tokens or drop empty samples before scoring",
        )
    if (table["response_len"].to_numpy() != lens).any():
        raise SchemaError("rollouts: response_len disagrees with len(response_ids)", where, None)
    bad = ~pc.is_in(table["finish_reason"], pa.array(FINISH_REASONS)).to_numpy(zero_copy_only=False)
    if bad.any():
        raise SchemaError(
            f"rollouts: finish_reason {table['finish_reason'][int(bad.argmax())]} not in {FINISH_REASONS}",
            where,
            None,
        )
    return table
