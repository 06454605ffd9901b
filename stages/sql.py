"""SQL over a run: DuckDB views ``rollouts``, ``tokens`` and ``selected`` on the run's Parquet shards.

Reads the committed datasets of ``RUN_DIR`` in place (nothing is copied; an ``s3://``/``gs://``
run is first brought into its local mirror, manifests and the shards they list) and prints the result of
a query as a table; without a query it starts a small interactive shell (statements end with
``;``, ``.tables``, ``.examples``, ``.quit``).

    distillery-sql runs/demo "SELECT count(*) FROM tokens"
    python -m stages.sql runs/demo "SELECT selection, sum(n_kept) FROM selected GROUP BY 1"
    python -m stages.sql runs/demo            # interactive
    distillery-sql --examples                 # the example queries (stages/sql_policies/examples.sql)
    distillery-sql --migrate runs/old         # rename legacy manifest.json files to _manifest.json

``selected`` holds every committed selection of the run, with a ``selection`` column (the folder
name under ``selected/``); ``"selected/<name>"`` is one selection. The views come from
``stages.lib.views.open_run`` (the same views select and report use); plain DuckDB, pandas,
polars or pyarrow open the same folders directly (docs/DATA.md).

Read-only by default: the connection may read the listed shard files and nothing else (no other
file, no network, no extension install/load; settings locked), and every statement must be a
read statement (SELECT, EXPLAIN, PRAGMA): ``COPY``, ``ATTACH``, ``INSTALL``, ``LOAD``, ``SET``,
``CREATE``, ``EXPORT`` ... are refused before anything runs. Several statements in one query
string are checked first, all of them, then run in order, each result printed. ``--allow-writes``
lifts both limits (then DuckDB can write files: the caller takes responsibility).

Errors (a bad query, a refused statement, a missing run dir) print one line and exit 2.
"""

from __future__ import annotations

import argparse
import re
import sys
from importlib import resources
from pathlib import Path

import duckdb

from stages.lib import mirror, store, uri, views
from stages.lib.errors import UserError, user_errors_exit
from stages.lib.layout import RunLayout

MAX_CELL = 60  # characters shown per cell (long lists are cut)
# statement types a read-only session runs (SELECT covers DESCRIBE, SHOW, SUMMARIZE, VALUES, FROM)
READ_STATEMENTS = {"SELECT", "EXPLAIN", "PRAGMA"}


def examples() -> list[tuple[str, str]]:
    """(title, query) pairs from examples.sql."""
    text = resources.files("stages.sql_policies").joinpath("examples.sql").read_text()
    out: list[tuple[str, str]] = []
    for block in re.split(r"^-- example: ", text, flags=re.M)[1:]:
        title, _, body = block.partition("\n")
        out.append((title.strip(), body.strip()))
    return out


def connect(
    run_dir: str | Path, *, allow_writes: bool = False
) -> tuple[duckdb.DuckDBPyConnection, list[str]]:
    """An in-memory DuckDB with views over the committed datasets of ``run_dir`` (read-only
    unless ``allow_writes``) and the names of its views."""
    if uri.is_remote(run_dir):  # the committed datasets, fetched into the local mirror
        mirror.pull(mirror.open_remote(str(run_dir)), datasets_only=True)
    rv = views.open_run(RunLayout.of(run_dir), read_only=not allow_writes)
    if not rv.views:
        raise UserError(
            "no committed rollouts/, tokens/ or selected/ datasets",
            str(run_dir),
            "run the pipeline (python -m stages.pipeline ...) first",
        )
    names = [v for v in rv.views if "/" not in v]  # the per-selection views are listed by .tables
    return rv.con, names + [v for v in rv.views if "/" in v]


def statements(con: duckdb.DuckDBPyConnection, sql: str, *, allow_writes: bool) -> list[str]:
    """The statements of ``sql``, each checked before any runs (read statements only)."""
    try:
        parsed = con.extract_statements(sql)
    except duckdb.Error as e:
        raise UserError(f"SQL error: {' '.join(str(e).split())}", "query", None) from None
    for i, st in enumerate(parsed, 1):
        kind = str(st.type).rsplit(".", 1)[-1]
        if not allow_writes and kind not in READ_STATEMENTS:
            raise UserError(
                f"statement {i} of {len(parsed)} is {kind} ({' '.join(st.query.split())[:60]}): "
                "distillery-sql is read-only, nothing was run",
                "query",
                f"use {', '.join(sorted(READ_STATEMENTS))} statements, or pass --allow-writes",
            )
    return [st.query for st in parsed]


def _cell(v: object) -> str:
    if isinstance(v, float):
        s = f"{v:.6g}"
    elif isinstance(v, list) and len(v) > 8:
        s = "[" + ", ".join(_cell(x) for x in v[:8]) + f", ... ({len(v)})]"
    else:
        s = "NULL" if v is None else str(v)
    return s if len(s) <= MAX_CELL else s[: MAX_CELL - 3] + "..."


def format_table(columns: list[str], rows: list[tuple], *, more: bool = False) -> str:
    """Rows as an aligned text table (numbers right-aligned), with a row count line."""
    cells = [[_cell(v) for v in r] for r in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    numeric = [
        all(
            (isinstance(r[i], int | float) and not isinstance(r[i], bool)) or r[i] is None
            for r in rows
        )
        for i in range(len(columns))
    ]

    def line(vals: list[str]) -> str:
        return " | ".join(
            v.rjust(w) if num else v.ljust(w) for v, w, num in zip(vals, widths, numeric)
        ).rstrip()

    out = [line(columns), "-+-".join("-" * w for w in widths)]
    out += [line(r) for r in cells]
    n = len(rows)
    out.append(
        f"({n} row{'s' if n != 1 else ''}{'; more not shown, see --max-rows' if more else ''})"
    )
    return "\n".join(out)


def _run_one(con: duckdb.DuckDBPyConnection, sql: str, max_rows: int) -> str:
    try:
        rel = con.execute(sql)
        if rel is None or rel.description is None:
            return "ok"
        columns = [d[0] for d in rel.description]
        rows = rel.fetchmany(max_rows + 1)  # one more tells whether there are more
    except duckdb.Error as e:
        raise UserError(f"SQL error: {' '.join(str(e).split())}", "query", None) from None
    return format_table(columns, rows[:max_rows], more=len(rows) > max_rows)


def query(
    con: duckdb.DuckDBPyConnection, sql: str, max_rows: int = 50, *, allow_writes: bool = False
) -> str:
    """Check every statement of ``sql``, then run them in order; their results as tables ('ok'
    for statements without rows), separated by blank lines."""
    checked = statements(con, sql, allow_writes=allow_writes)
    if not checked:
        raise UserError("empty query", "query", "give one SQL statement")
    return "\n\n".join(_run_one(con, st, max_rows) for st in checked)


def shell(
    con: duckdb.DuckDBPyConnection, names: list[str], max_rows: int, allow_writes: bool
) -> None:
    """A read-eval-print loop on stdin: statements end with ';'; .tables, .examples, .quit."""
    tty = sys.stdin.isatty()
    if tty:
        print(f"views: {', '.join(names)}. End statements with ';'. .tables .examples .quit")
    buf: list[str] = []
    while True:
        if tty:
            print("sql> " if not buf else "...> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:
            break
        stripped = line.strip()
        if not buf and stripped.startswith("."):
            cmd = stripped.split()[0]
            if cmd in (".quit", ".exit"):
                break
            if cmd == ".tables":
                print("\n".join(names))
            elif cmd == ".examples":
                for title, q in examples():
                    print(f"-- {title}\n{q}\n")
            else:
                print(f"unknown command {cmd} (.tables .examples .quit)")
            continue
        buf.append(line)
        if stripped.endswith(";"):
            sql, buf = "".join(buf), []
            try:
                print(query(con, sql, max_rows, allow_writes=allow_writes))
            except UserError as err:
                print(f"error: {err.line()}", flush=True)
    if "".join(buf).strip():  # a last statement without ';'
        print(query(con, "".join(buf), max_rows, allow_writes=allow_writes))


@user_errors_exit
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="distillery-sql", description="SQL over a run: views rollouts, tokens, selected"
    )
    ap.add_argument("run_dir", nargs="?", help="the run directory (run_dir of the pipeline)")
    ap.add_argument("query", nargs="?", help="SQL statement(s); none = interactive shell")
    ap.add_argument("--max-rows", type=int, default=50, help="rows printed (default 50)")
    ap.add_argument("--examples", action="store_true", help="print the example queries")
    ap.add_argument(
        "--allow-writes",
        action="store_true",
        help="allow every statement and file access (COPY, ATTACH, INSTALL ...); off by default",
    )
    ap.add_argument(
        "--migrate", action="store_true", help="rename legacy manifest.json files to _manifest.json"
    )
    args = ap.parse_args(argv)
    if args.examples:
        for title, q in examples():
            print(f"-- {title}\n{q}\n")
        return
    if args.run_dir is None:
        raise UserError("no run dir given", "command line", "distillery-sql RUN_DIR [QUERY]")
    args.run_dir = mirror.adopt_credentials(args.run_dir)  # s3://KEY:SECRET@...: never printed
    if args.migrate:
        done = store.migrate_run(RunLayout.of(args.run_dir).root)
        print(f"sql: migrated {len(done)} dataset folder(s) under {args.run_dir} to _manifest.json")
        return
    con, names = connect(args.run_dir, allow_writes=args.allow_writes)
    if args.query is None:
        shell(con, names, args.max_rows, args.allow_writes)
    else:
        print(query(con, args.query, args.max_rows, allow_writes=args.allow_writes))
    mode = "writes allowed" if args.allow_writes else "read-only, nothing written"
    print(f"sql: queried {args.run_dir} ({mode})", file=sys.stderr)


if __name__ == "__main__":
    main()
