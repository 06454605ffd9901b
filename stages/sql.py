"""SQL over a run: DuckDB views ``rollouts``, ``tokens`` and ``selected`` on the run's Parquet shards.

Reads the committed datasets of ``RUN_DIR`` in place (nothing is copied or written) and prints the
result of a query as a table; without a query it starts a small interactive shell (statements end
with ``;``, ``.tables``, ``.examples``, ``.quit``).

    distillery-sql runs/demo "SELECT count(*) FROM tokens"
    python -m stages.sql runs/demo "SELECT selection, sum(n_kept) FROM selected GROUP BY 1"
    python -m stages.sql runs/demo            # interactive
    distillery-sql --examples                 # the example queries (stages/sql_policies/examples.sql)

``selected`` holds every committed selection of the run, with a ``selection`` column (the folder
name under ``selected/``). Plain ``duckdb`` works on the same files:

    CREATE VIEW tokens AS SELECT * EXCLUDE (teacher_topk_logprobs_q),
        list_transform(range(1, len(teacher_topk_logprobs_q) + 1), lambda i:
            (-list_sum(teacher_topk_logprobs_q[1:i]) * 0.001953125)::FLOAT) AS teacher_topk_logprobs
        FROM read_parquet('runs/demo/tokens/bucket=*/*.parquet', hive_partitioning = true);

(top-K log-probs are stored delta-coded in fixed point, see data_schemas/codec.py; the view
decodes them.)
    CREATE VIEW selected AS SELECT regexp_extract(filename, 'selected/([^/]+)/bucket=', 1)
        AS selection, * EXCLUDE (filename)
        FROM read_parquet('runs/demo/selected/*/bucket=*/*.parquet', hive_partitioning = true,
                          filename = true, union_by_name = true);

Errors (a bad query, a missing run dir) print one line and exit non-zero.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import duckdb

from data_schemas import manifest as manifest_mod
from data_schemas import tokens
from stages.lib.errors import UserError, user_errors_exit

EXAMPLES_FILE = Path(__file__).resolve().parent / "sql_policies" / "examples.sql"
MAX_CELL = 60  # characters shown per cell (long lists are cut)


def _q(s: str | Path) -> str:
    return "'" + str(s).replace("'", "''") + "'"


def examples() -> list[tuple[str, str]]:
    """(title, query) pairs from examples.sql."""
    out: list[tuple[str, str]] = []
    for block in re.split(r"^-- example: ", EXAMPLES_FILE.read_text(), flags=re.M)[1:]:
        title, _, body = block.partition("\n")
        out.append((title.strip(), body.strip()))
    return out


def connect(run_dir: str | Path) -> tuple[duckdb.DuckDBPyConnection, list[str]]:
    """An in-memory DuckDB with views over the committed datasets of ``run_dir``."""
    run = Path(run_dir)
    if not run.is_dir():
        raise UserError(f"run dir {run} not found", str(run), "pass the run_dir of a pipeline run")
    con = duckdb.connect(":memory:")
    con.execute("SET enable_progress_bar = false")
    views = []
    for name in ("rollouts", "tokens"):
        if manifest_mod.read(run / name) is not None:
            glob = run / name / "bucket=*" / "*.parquet"
            cols = tokens.DUCKDB_SELECT if name == "tokens" else "*"  # decodes the codec
            con.execute(
                f"CREATE VIEW {name} AS SELECT {cols} FROM read_parquet({_q(glob)}, "
                "hive_partitioning = true)"
            )
            views.append(name)
    sels = sorted(
        p for p in (run / "selected").glob("*") if manifest_mod.read(p) is not None
    )  # committed selections only
    if sels:
        globs = "[" + ", ".join(_q(p / "bucket=*" / "*.parquet") for p in sels) + "]"
        con.execute(
            "CREATE VIEW selected AS SELECT "
            "regexp_extract(filename, 'selected/([^/]+)/bucket=', 1) AS selection, "
            f"* EXCLUDE (filename) FROM read_parquet({globs}, hive_partitioning = true, "
            "filename = true, union_by_name = true)"
        )
        views.append("selected")
    if not views:
        raise UserError(
            "no committed rollouts/, tokens/ or selected/ datasets",
            str(run),
            "run the pipeline (python -m stages.pipeline ...) first",
        )
    return con, views


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


def query(con: duckdb.DuckDBPyConnection, sql: str, max_rows: int = 50) -> str:
    """Run one statement; return its result as a table (or 'ok' for statements without rows)."""
    try:
        rel = con.execute(sql)
        if rel is None or rel.description is None:
            return "ok"
        columns = [d[0] for d in rel.description]
        rows = rel.fetchmany(max_rows + 1)  # one more tells whether there are more
    except duckdb.Error as e:
        raise UserError(f"SQL error: {' '.join(str(e).split())}", "query", None) from None
    return format_table(columns, rows[:max_rows], more=len(rows) > max_rows)


def shell(con: duckdb.DuckDBPyConnection, views: list[str], max_rows: int) -> None:
    """A read-eval-print loop on stdin: statements end with ';'; .tables, .examples, .quit."""
    tty = sys.stdin.isatty()
    if tty:
        print(f"views: {', '.join(views)}. End statements with ';'. .tables .examples .quit")
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
                print("\n".join(views))
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
                print(query(con, sql, max_rows))
            except UserError as err:
                print(f"error: {err.line()}", flush=True)
    if "".join(buf).strip():  # a last statement without ';'
        print(query(con, "".join(buf), max_rows))


@user_errors_exit
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="distillery-sql", description="SQL over a run: views rollouts, tokens, selected"
    )
    ap.add_argument("run_dir", nargs="?", help="the run directory (run_dir of the pipeline)")
    ap.add_argument("query", nargs="?", help="one SQL statement; none = interactive shell")
    ap.add_argument("--max-rows", type=int, default=50, help="rows printed (default 50)")
    ap.add_argument("--examples", action="store_true", help="print the example queries")
    args = ap.parse_args(argv)
    if args.examples:
        for title, q in examples():
            print(f"-- {title}\n{q}\n")
        return
    if args.run_dir is None:
        raise UserError("no run dir given", "command line", "distillery-sql RUN_DIR [QUERY]")
    con, views = connect(args.run_dir)
    if args.query is None:
        shell(con, views, args.max_rows)
    else:
        print(query(con, args.query, args.max_rows))


if __name__ == "__main__":
    main()
