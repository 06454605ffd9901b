"""Teacher routing by a SQL expression over the prompts (``score.route_by.sql``).

The expression is evaluated by DuckDB once per prompt, as

    SELECT id, CAST((<expression>) AS VARCHAR) FROM prompts

over the prompts table as the pipeline reads it (``data_schemas.prompts``: ``id``, ``prompt``,
``context``, ``answer``, ``kind``, ``messages``), e.g.
``CASE WHEN kind = 'math' THEN 'a' WHEN length(context) > 200 THEN 'b' ELSE 'c' END``. Its value is
the name of the teacher (a key of ``teachers``); NULL takes ``score.route_by.default``. Each
rollout then goes to the teacher of its ``prompt_id``. Pure functions: no config, no files.
"""

from __future__ import annotations

import duckdb
import pyarrow as pa

from data_schemas import prompts as prompts_schema
from stages.lib.errors import UserError

WHERE = "score.route_by.sql"
COLUMNS = ", ".join(prompts_schema.SCHEMA.names)


def _select(expr: str) -> str:
    return f"SELECT id, CAST(({expr}) AS VARCHAR) AS teacher FROM prompts"


def _run(prompts: pa.Table, expr: str) -> list[tuple[str, str | None]]:
    """The (prompt id, value) pairs; a DuckDB failure is one UserError quoting its first line."""
    if ";" in expr:
        raise UserError(
            "score.route_by.sql must be one expression, not statements (it contains ';')",
            WHERE,
            "write a single SQL expression, e.g. CASE WHEN kind = 'x' THEN 'a' ELSE 'b' END",
        )
    con = duckdb.connect(":memory:")
    try:
        con.register("prompts", prompts)
        return con.execute(_select(expr)).fetchall()
    except duckdb.Error as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"the route expression {expr!r} fails in DuckDB: {first}",
            WHERE,
            f"write an expression over the prompts columns ({COLUMNS}) giving a teacher name",
        ) from None
    finally:
        con.close()


def check_expression(expr: str) -> None:
    """Compile ``expr`` against an empty prompts table (unknown columns, syntax, types)."""
    _run(prompts_schema.SCHEMA.empty_table(), expr)


def routes(
    prompts: pa.Table, expr: str, teachers: list[str], default: str | None
) -> dict[str, str]:
    """prompt id -> teacher name for every prompt; a value that is not a teacher name (or NULL
    without a default) is one UserError naming the value, a prompt that yields it and the count."""
    out: dict[str, str] = {}
    bad: dict[str | None, list[str]] = {}
    for pid, value in _run(prompts, expr):
        name = default if value is None else value
        if name in teachers:
            out[pid] = name
        else:
            bad.setdefault(value, []).append(pid)
    if bad:
        value, ids = next(iter(bad.items()))
        what = (
            "NULL (and score.route_by.default is not set)"
            if value is None
            else f"{value!r}, which is not a teacher name"
        )
        raise UserError(
            f"the route expression gives {what} for {len(ids)} prompt(s), e.g. {ids[0]!r}",
            WHERE,
            f"make it give one of {sorted(teachers)}"
            + ("" if default else ", or set score.route_by.default"),
        )
    return out


# ----------------------------------------------------------------------------- routing (pure)
def route(values: list, rb, where: str) -> list[str]:
    """The teacher name of each rollout from its ``score.route_by.column`` value (``rb``: the
    RouteBy config). A value with no route and no default is a UserError naming it."""
    out = []
    for v in values:
        name = rb.map.get(str(v), rb.default) if v is not None else rb.default
        if name is None:
            raise UserError(
                f"rollouts with {rb.column}={v!r} have no teacher (no score.route_by.map entry "
                "and no score.route_by.default)",
                where,
                f"add '{v}: <teacher>' to score.route_by.map or set score.route_by.default",
            )
        out.append(name)
    return out
