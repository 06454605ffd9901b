"""DuckDB views over a run: the one way select, report and ``distillery-sql`` open a run's data.

``open_run(layout)`` returns an in-memory DuckDB connection with one view per committed dataset:

- ``rollouts``: the rollouts table as stored;
- ``tokens``: the tokens table with the top-K log-probs decoded (``data_schemas.codec``);
- ``"selected/<name>"``: one selection; ``selected``: all of them, with a ``selection`` column.

Only committed datasets get a view, and only after ``store.open_committed`` has checked their
manifests against the files (sizes, footers, row counts, unlisted files; sha256 when asked). The
views read exactly the shard files the manifests list, in place: nothing is copied. Datasets that
are missing or not committed yet are left out with a note (``RunViews.notes``). Folder names
read from disk (selections) are checked by the config name rule (``stages.lib.safety``) and
quoted as identifiers: a name is never SQL.

``lock_read_only(con, files)`` (``open_run(read_only=True)``: before the first view is created)
turns the connection read-only: DuckDB may open only those shard files (``allowed_paths``), has
no other file, network or extension access (``enable_external_access = false``, no
auto-install/-load), and the settings cannot be changed back (``lock_configuration``). ``allowed_paths`` alone would still let ``COPY ... TO`` overwrite a
listed shard, so ``stages.sql`` also admits only read statements (docs/RELIABILITY.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import duckdb
import pyarrow.parquet as pq

from data_schemas import codec, rollouts, selected, tokens
from data_schemas import manifest as manifest_mod
from stages.lib import store
from stages.lib.errors import UserError
from stages.lib.layout import RunLayout
from stages.lib.safety import check_disk_name, quote_ident

TABLES: dict[str, ModuleType] = {"rollouts": rollouts, "tokens": tokens}
WRITERS = {
    "rollouts": "python -m stages.rollout",
    "tokens": "python -m stages.score",
    "selected": "python -m stages.select",
}
# the shard number and row of every row, for stages that join results back to shards (select)
ROW_ID_COLS = (
    "CAST(regexp_extract(filename, 'shard-(\\d+)\\.parquet$', 1) AS BIGINT) AS _shard, "
    "file_row_number AS _row"
)


@dataclass
class RunViews:
    """An open run: the connection, the manifests behind its views, and what was left out."""

    con: duckdb.DuckDBPyConnection
    manifests: dict[str, dict] = field(default_factory=dict)  # "rollouts"/"tokens" -> manifest
    selections: dict[str, dict] = field(default_factory=dict)  # selection name -> manifest
    views: dict[str, str] = field(default_factory=dict)  # dataset -> quoted view name
    files: list[Path] = field(default_factory=list)  # every shard file the views read
    notes: list[str] = field(default_factory=list)  # datasets left out, and why

    def close(self) -> None:
        self.con.close()


def sql_str(s: str | Path) -> str:
    """A SQL string literal."""
    return "'" + str(s).replace("'", "''") + "'"


def connect(
    *, threads: int | None = None, memory_limit: str | None = None, temp_dir: Path | None = None
) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB session that never installs or loads an extension by itself."""
    config: dict = {"autoinstall_known_extensions": False, "autoload_known_extensions": False}
    if threads is not None:
        config["threads"] = int(threads)
    if memory_limit is not None:
        config["memory_limit"] = memory_limit
    if temp_dir is not None:
        config["temp_directory"] = str(temp_dir)
        config["preserve_insertion_order"] = False
    try:
        con = duckdb.connect(":memory:", config=config)
    except duckdb.Error as e:
        raise UserError(
            f"cannot start DuckDB ({' '.join(str(e).split())})",
            "select.memory_limit / select.threads",
            "fix them",
        ) from None
    con.execute("SET enable_progress_bar = false")
    return con


def lock_read_only(con: duckdb.DuckDBPyConnection, files: list[Path]) -> None:
    """From now on DuckDB may read ``files`` and nothing else, and cannot change that."""
    con.execute(f"SET allowed_paths = [{', '.join(sql_str(p.resolve()) for p in files)}]")
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")


def create_view(
    con: duckdb.DuckDBPyConnection,
    name: str,
    files: list[Path],
    table: ModuleType,
    *,
    row_ids: bool = False,
) -> None:
    """View ``name`` over Parquet ``files`` of ``table`` (decoded; with ``_shard``/``_row``)."""
    excl = [codec.PHYSICAL] if hasattr(table, "DUCKDB_SELECT") else []
    extra = [f"{codec.DUCKDB_DECODE} AS {codec.LOGICAL}"] if excl else []
    view = quote_ident(name)
    if not files:  # a committed dataset with zero shards: an empty view with the right columns
        con.register(f"_empty_{name}", table.SCHEMA.empty_table())
        ids = ["NULL::BIGINT AS _shard", "NULL::BIGINT AS _row"] if row_ids else []
        cols = ", ".join(["*", *ids])
        empty = quote_ident(f"_empty_{name}")
        con.execute(f"CREATE OR REPLACE VIEW {view} AS SELECT {cols} FROM {empty}")
        return
    opts = ", filename = true, file_row_number = true" if row_ids else ""
    if row_ids:
        excl, extra = [*excl, "filename", "file_row_number"], [*extra, ROW_ID_COLS]
    star = f"* EXCLUDE ({', '.join(excl)})" if excl else "*"
    have = pq.read_schema(files[0]).names  # optional columns a dataset's shards left out: null
    extra += [f"NULL::{t} AS {c}" for c, t in getattr(table, "OPTIONAL_COLUMNS", {}).items()
              if c not in have]  # fmt: skip
    src = f"read_parquet([{', '.join(sql_str(p) for p in files)}], hive_partitioning = false{opts})"
    con.execute(f"CREATE OR REPLACE VIEW {view} AS SELECT {', '.join([star, *extra])} FROM {src}")


def _committed(directory: Path, table: ModuleType, what: str, notes: list[str], verify: bool):
    """The verified manifest of a committed dataset, or None with a note when it is not."""
    if manifest_mod.path_of(directory) is None:
        partial = any(directory.glob("bucket=*/shard-*.parquet"))
        state = "incomplete (no manifest yet)" if partial else "missing"
        notes.append(f"{directory.name}: {state}; run {WRITERS[what]} to add it")
        return None
    return store.open_committed(
        directory, table, verify_checksums=verify, what_writes_it=WRITERS[what]
    )


def selection_dirs(layout: RunLayout) -> list[Path]:
    """The selection folders of a run (hidden names skipped), by name; a folder whose name is not
    a safe name (it becomes a SQL view and a label) is refused before any view exists."""
    root = layout.selected_root
    if not root.is_dir():
        return []
    dirs = sorted(d for d in root.iterdir() if d.is_dir() and not store.hidden(d.name))
    for d in dirs:
        check_disk_name(d.name, d, "selection folder")
    return dirs


def open_run(
    layout: RunLayout,
    *,
    datasets: tuple[str, ...] = ("rollouts", "tokens", "selected"),
    manifests: dict[str, dict] | None = None,
    verify_checksums: bool = False,
    row_ids: bool = False,
    read_only: bool = False,
    con: duckdb.DuckDBPyConnection | None = None,
) -> RunViews:
    """Views over the committed datasets of a run (see the module docstring).

    ``manifests`` are already verified manifests to use as they are (select passes the ones it
    checked); other datasets are verified here. ``row_ids`` adds ``_shard``/``_row`` columns to
    the rollouts and tokens views. ``read_only`` locks the connection (``lock_read_only``) before
    the first view is created: every manifest and folder name is checked first, then the lock,
    then the views.
    """
    if not layout.root.is_dir():
        raise UserError("run dir not found", str(layout.root), "pass the run_dir of a pipeline run")
    rv = RunViews(con=con if con is not None else connect())
    todo: list[tuple[str, Path, dict, ModuleType, bool]] = []  # (view, folder, manifest, ...)
    for name in (d for d in datasets if d in TABLES):
        directory = getattr(layout, name)
        m = (manifests or {}).get(name)
        if m is None:
            m = _committed(directory, TABLES[name], name, rv.notes, verify_checksums)
        if m is not None:
            rv.manifests[name] = m
            todo.append((name, directory, m, TABLES[name], row_ids))
    if "selected" in datasets:
        for d in selection_dirs(layout):
            m = _committed(d, selected, "selected", rv.notes, verify_checksums)
            if m is not None:
                rv.selections[d.name] = m
                todo.append((f"selected/{d.name}", d, m, selected, False))
    for _, directory, m, _, _ in todo:
        rv.files += store.shard_paths(directory, m)
    if read_only:
        lock_read_only(rv.con, rv.files)
    for view, directory, m, table, ids in todo:
        create_view(rv.con, view, store.shard_paths(directory, m), table, row_ids=ids)
        rv.views[view] = quote_ident(view)
    _union_selected(rv)
    return rv


def _union_selected(rv: RunViews) -> None:
    """View ``selected``: every selection, with its name in the ``selection`` column."""
    if not rv.selections:
        return
    parts = [
        f"SELECT {sql_str(n)} AS selection, * FROM {quote_ident('selected/' + n)}"
        for n in rv.selections
    ]
    rv.con.execute("CREATE OR REPLACE VIEW selected AS " + " UNION ALL BY NAME ".join(parts))
    rv.views["selected"] = "selected"
