"""The prompts table: what the user gives the pipeline (``data.prompts``, Parquet or JSONL).

Columns (DESIGN.md): ``id`` (str, unique), ``prompt`` (str), optional ``context`` (str, the
privileged information a guided rollout or a self-teacher reads), optional ``answer`` (str, a
verifiable reference answer). Extra columns are kept as strings when present (``kind``: a free
label such as ``private`` or ``public`` that reports can group by).
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

NAME = "prompts"
VERSION = 1

SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("prompt", pa.string(), nullable=False),
        pa.field("context", pa.string(), nullable=True),
        pa.field("answer", pa.string(), nullable=True),
        pa.field("kind", pa.string(), nullable=True),
    ]
)

from data_schemas.common import SchemaError, TableSpec, check_table  # noqa: E402

SPEC = TableSpec(name=NAME, schema=SCHEMA, keys=("id",))


def validate(table: pa.Table, *, where: str = "prompts") -> pa.Table:
    """Check the table and return it with the schema's column order and types."""
    for col in ("context", "answer", "kind"):  # optional columns: add them as nulls
        if col not in table.column_names:
            table = table.append_column(col, pa.nulls(len(table), pa.string()))
    table = check_table(table, SPEC, where=where)
    empty = pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(table["prompt"])), 0).to_numpy(
        zero_copy_only=False
    )
    if empty.any():
        raise SchemaError(
            f"prompts: empty prompt text at row {int(empty.argmax())}",
            where,
            "every row needs a non-empty 'prompt'",
        )
    return table


def read(path: str | None, *, max_prompts: int | None = None) -> pa.Table:
    """Read and validate a prompts file (Parquet or JSONL), with one clear error per problem."""
    import json
    from pathlib import Path

    import pyarrow.parquet as pq

    fix = "a Parquet or JSONL file with columns id, prompt (and optional context, answer)"
    if not path:
        raise SchemaError(
            "no prompts file configured", "data.prompts", f"set data.prompts to {fix}"
        )
    p = Path(path)
    if not p.is_file():
        raise SchemaError(f"prompts file not found: {path}", "data.prompts", f"point it at {fix}")
    if p.suffix in (".jsonl", ".json"):
        rows = []
        with open(p, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise SchemaError(
                        f"malformed JSON on line {n} ({e.msg})", str(p), fix
                    ) from None
                if not isinstance(row, dict):
                    raise SchemaError(f"line {n} is not a JSON object", str(p), fix)
                rows.append({k: (None if v is None else str(v)) for k, v in row.items()})
        if not rows:
            raise SchemaError("prompts file is empty", str(p), fix)
        names = sorted({k for r in rows for k in r})
        table = pa.Table.from_pylist(rows, schema=pa.schema([(k, pa.string()) for k in names]))
    else:
        try:
            table = pq.read_table(p)
        except (pa.ArrowInvalid, OSError) as e:
            raise SchemaError(f"cannot read prompts as Parquet ({e})", str(p), fix) from None
    if table.num_rows == 0:
        raise SchemaError("prompts file is empty", str(p), fix)
    if max_prompts is not None:
        table = table.slice(0, max_prompts)
    return validate(table, where=str(p))
