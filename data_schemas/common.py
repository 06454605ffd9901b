"""Validation shared by the table modules: what pyarrow lets through, caught before it spreads.

pyarrow accepts nulls in non-nullable fields until a write or cast, does not check list lengths,
and happily stores NaN log-probs; ``check_table`` counts these itself and raises a ``SchemaError``
(a ``UserError``) that names the table, the column, the first bad row and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from data_schemas.errors import UserError

# Keys of the Parquet key-value metadata every shard carries (no timestamps: shards written twice
# from the same inputs must be byte-identical).
META_TABLE = b"distillery.table"
META_VERSION = b"distillery.schema_version"
META_DATASET = b"distillery.dataset_id"
META_SHARD = b"distillery.shard"

LOGPROB_TOL = 1e-4  # log-probs may exceed 0 by rounding only


class SchemaError(UserError):
    """A table that does not satisfy its schema's rules."""


@dataclass(frozen=True)
class TableSpec:
    """What ``check_table`` checks for one table, beyond the pyarrow schema itself."""

    name: str
    schema: pa.Schema
    keys: tuple[str, ...] = ()  # together unique per row
    logprob_cols: tuple[str, ...] = ()  # finite and <= 0 (lists: every element)
    finite_cols: tuple[str, ...] = ()  # finite only (entropies, weights)
    id_cols: tuple[str, ...] = ()  # token ids: 0 <= id < vocab_size (lists: every element)
    # groups of list columns that must have equal lengths row by row (ids with their log-probs)
    same_length: tuple[tuple[str, ...], ...] = ()
    # list columns whose length must be one constant across the table (top-K lists)
    fixed_length: tuple[str, ...] = ()
    nonneg_cols: tuple[str, ...] = field(default=())


def _flat(col: pa.ChunkedArray) -> pa.Array:
    """Values of a (possibly nested) list column as one flat array."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    while pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type):
        arr = pc.list_flatten(arr)
    return arr


def _first_bad_row(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


def _row_of_flat(col: pa.ChunkedArray, flat_index: int) -> int:
    """The row holding element ``flat_index`` of a one-level list column."""
    arr = col.combine_chunks()
    if not (pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type)):
        return flat_index
    lengths = pc.fill_null(pc.list_value_length(arr), 0).to_numpy()
    return int(np.searchsorted(np.cumsum(lengths), flat_index, side="right"))


def _conform_types(table: pa.Table, spec: TableSpec, fail, vocab_size: int | None) -> pa.Table:
    """Columns present with the right types (extra columns are allowed and kept)."""
    missing = [f.name for f in spec.schema if f.name not in table.column_names]
    if missing:
        raise fail(
            f"missing column(s) {missing}", f"write them with data_schemas.{spec.name}.SCHEMA"
        )
    for f in spec.schema:
        have = table.schema.field(f.name).type
        if have != f.type:
            try:
                table = table.set_column(
                    table.column_names.index(f.name), f.name, table.column(f.name).cast(f.type)
                )
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
                raise fail(
                    f"column '{f.name}' has type {have}, expected {f.type} ({e})",
                    "cast the column to the schema type",
                ) from None
    return table


def _check_nulls(table: pa.Table, spec: TableSpec, fail, vocab_size: int | None) -> None:
    """Nulls where the schema says none (pyarrow only complains on cast/write)."""
    for f in spec.schema:
        col = table.column(f.name)
        if not f.nullable and col.null_count:
            row = _first_bad_row(col.is_null().to_numpy(zero_copy_only=False))
            raise fail(
                f"{col.null_count} null(s) in non-nullable column '{f.name}' (first at row {row})",
                "fill the column or drop those rows",
            )
        if (pa.types.is_list(f.type) or pa.types.is_large_list(f.type)) and len(col):
            inner = _flat(col)
            if inner.null_count:
                raise fail(f"null element(s) inside list column '{f.name}'", "fill or drop them")


def _check_lengths(table: pa.Table, spec: TableSpec, fail, vocab_size: int | None) -> None:
    """List lengths: paired columns equal per row, top-K columns one constant K."""
    for group in spec.same_length:
        present = [c for c in group if table.column(c).null_count < len(table)]
        lens = [pc.fill_null(pc.list_value_length(table.column(c)), -1).to_numpy() for c in present]
        for c, ln in zip(present[1:], lens[1:], strict=True):
            valid = (ln >= 0) & (lens[0] >= 0)
            bad = valid & (ln != lens[0])
            if bad.any():
                raise fail(
                    f"ragged lists: '{c}' and '{present[0]}' differ in length at row {_first_bad_row(bad)}",
                    "each id list needs its log-prob list of the same length",
                )
    for c in spec.fixed_length:
        lens = pc.list_value_length(table.column(c)).drop_null().to_numpy()
        if len(lens) and (lens != lens[0]).any():
            raise fail(
                f"ragged top-K lists in '{c}': lengths {sorted(set(lens.tolist()))[:5]}",
                "store exactly K entries per token",
            )


def _check_numbers(table: pa.Table, spec: TableSpec, fail, vocab_size: int | None) -> None:
    """Numerics: NaN/inf log-probs, positive log-probs."""
    for c in spec.logprob_cols + spec.finite_cols:
        if c not in table.column_names:
            continue
        vals = _flat(table.column(c)).drop_null().to_numpy(zero_copy_only=False).astype(np.float64)
        bad = ~np.isfinite(vals)
        if c in spec.logprob_cols:
            bad |= vals > LOGPROB_TOL
        if bad.any():
            i = _first_bad_row(bad)
            raise fail(
                f"invalid value {vals[i]!r} in '{c}' (row {_row_of_flat(table.column(c), i)}): "
                + (
                    "log-probs must be finite and <= 0"
                    if c in spec.logprob_cols
                    else "must be finite"
                ),
                "re-run the stage that produced it; check the model for NaN weights or logits",
            )
    for c in spec.nonneg_cols:
        vals = _flat(table.column(c)).drop_null().to_numpy(zero_copy_only=False)
        if len(vals) and (vals < 0).any():
            raise fail(f"negative value in '{c}'", "weights must be >= 0")


def _check_ids(table: pa.Table, spec: TableSpec, fail, vocab_size: int | None) -> None:
    """Token ids inside the vocabulary."""
    if vocab_size is not None:
        for c in spec.id_cols:
            if c not in table.column_names:
                continue
            vals = _flat(table.column(c)).drop_null().to_numpy(zero_copy_only=False)
            bad = (vals < 0) | (vals >= vocab_size)
            if bad.any():
                i = _first_bad_row(bad)
                raise fail(
                    f"token id {int(vals[i])} in '{c}' (row {_row_of_flat(table.column(c), i)}) is outside "
                    f"the vocabulary [0, {vocab_size})",
                    "use the tokenizer that produced the data (compare tokenizer fingerprints)",
                )


def _check_keys(table: pa.Table, spec: TableSpec, fail, vocab_size: int | None) -> None:
    """Unique keys."""
    if spec.keys and len(table):
        keys = table.select(list(spec.keys))
        n_unique = keys.group_by(list(spec.keys)).aggregate([]).num_rows
        if n_unique != len(table):
            counts = keys.group_by(list(spec.keys)).aggregate([([], "count_all")])
            dup = counts.filter(pc.greater(counts["count_all"], 1)).slice(0, 1).to_pylist()[0]
            dup.pop("count_all", None)
            raise fail(
                f"{len(table) - n_unique} duplicated key(s) {list(spec.keys)}, e.g. {dup}",
                "keys must be unique; a re-run must not append rows twice",
            )


def check_table(table: pa.Table, spec: TableSpec, *, where: str, vocab_size: int | None = None):
    """Raise SchemaError naming the first problem found; return the table conformed to the schema."""
    fail = lambda what, fix: SchemaError(f"{spec.name}: {what}", where, fix)  # noqa: E731
    table = _conform_types(table, spec, fail, vocab_size)
    for step in (_check_nulls, _check_lengths, _check_numbers, _check_ids, _check_keys):
        step(table, spec, fail, vocab_size)
    return table.select(
        [f.name for f in spec.schema]
        + [c for c in table.column_names if c not in spec.schema.names]
    )
