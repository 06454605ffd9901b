"""Reading committed datasets: :func:`open_committed` checks the manifest against the files
(its checksum, every listed shard with its size, sha256, dataset id and footer row count, no
unlisted file) before anything is read; :func:`read_table` reads a small dataset whole."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import pyarrow as pa
import pyarrow.parquet as pq

from data_schemas import manifest as manifest_mod
from data_schemas.common import META_DATASET, META_TABLE
from stages.lib.errors import UserError
from stages.lib.store.files import _plain_relpath, _shard_size, file_sha256, hidden, open_shard


def open_committed(
    directory: str | Path,
    table: ModuleType,
    *,
    verify_checksums: bool = True,
    what_writes_it: str = "the stage that writes it",
) -> dict:
    """The manifest of a committed dataset after checking it against the files; a UserError
    otherwise: every listed shard present with its size, sha256 (``verify_checksums``), dataset
    id and footer row count, and no file in the folder that the manifest does not list."""
    directory = Path(directory)
    m = manifest_mod.read(directory)
    if m is None:
        partial = any(directory.glob("bucket=*/shard-*.parquet"))
        raise UserError(
            f"{table.NAME} dataset is {'incomplete (no manifest yet)' if partial else 'missing'}",
            str(directory),
            f"run {what_writes_it} first (a re-run resumes where it stopped)",
        )
    where = str(manifest_mod.path_of(directory))
    if m["table"] != table.NAME:
        raise UserError(
            f"manifest is for table '{m['table']}', expected '{table.NAME}'", where, None
        )
    if m["schema_version"] != table.VERSION:
        raise UserError(
            f"{table.NAME} schema version {m['schema_version']} (this code reads {table.VERSION})",
            where,
            f"re-run {what_writes_it} with this version of distillery",
        )
    fix = f"re-run {what_writes_it} with overwrite=true"
    for s in m["shards"]:
        _check_shard(directory, s, m["dataset_id"], table.NAME, verify_checksums, where, fix)
    _check_unlisted(directory, m, where, fix)
    return m


def _check_shard(
    directory: Path, s: dict, dataset_id: str, name: str, checksums: bool, where: str, fix: str
) -> None:
    """One manifest shard entry against its file: presence, size, sha256, footer id and rows."""
    p = directory / s["path"]
    size = _shard_size(p) if s["path"] == _plain_relpath(s["path"]) else None
    if size is None:
        raise UserError(
            f"shard listed in the manifest is missing: {s['path']}", where, f"restore it or {fix}"
        )
    # (a streamed shard is checked by size, footer and rows: its sha256 would read it all)
    checksums = checksums and p.is_file()
    if size != s["bytes"] or (checksums and file_sha256(p) != s["sha256"]):
        raise UserError(
            f"shard {s['path']} does not match its manifest checksum (modified, truncated or "
            "from another run)",
            str(p),
            fix,
        )
    try:
        pf = open_shard(p)
        meta, rows = dict(pf.schema_arrow.metadata or {}), pf.metadata.num_rows
    except (pa.ArrowInvalid, OSError) as e:
        raise UserError(f"corrupt or truncated Parquet shard ({e})", str(p), fix) from None
    if meta.get(META_DATASET, b"").decode() != dataset_id or meta.get(META_TABLE) != name.encode():
        raise UserError(f"shard {s['path']} belongs to another dataset", str(p), fix)
    if rows != s["rows"]:
        raise UserError(
            f"shard {s['path']} holds {rows} rows but the manifest says {s['rows']}", where, fix
        )


def _check_unlisted(directory: Path, m: dict, where: str, fix: str) -> None:
    """Refuse files a reader of the folder would also read but the manifest does not list."""
    listed = {s["path"] for s in m["shards"]}
    for p in sorted(directory.rglob("*")):
        rel = p.relative_to(directory)
        if any(hidden(part) for part in rel.parts) or p.is_dir():
            continue
        if rel.as_posix() not in listed and rel.as_posix() != manifest_mod.LEGACY_FILENAME:
            raise UserError(
                f"file {rel.as_posix()} is in the committed {m['table']} dataset but not in its "
                "manifest (Parquet readers of the folder would read it)",
                str(p),
                f"remove it (metadata files must start with '_' or '.'), or {fix}",
            )


def shard_paths(directory: str | Path, m: dict) -> list[Path]:
    return [Path(directory) / s["path"] for s in m["shards"]]


def read_table(
    directory: str | Path,
    table: ModuleType,
    *,
    columns: list[str] | None = None,
    verify_checksums: bool = True,
) -> pa.Table:
    """Read a whole (small) committed dataset into memory, in shard order."""
    m = open_committed(directory, table, verify_checksums=verify_checksums)
    parts = [
        _decoded(table, pq.read_table(p, columns=_physical(table, columns)))
        for p in shard_paths(directory, m)
    ]
    if not parts:
        return (
            table.SCHEMA.empty_table()
            if columns is None
            else table.SCHEMA.empty_table().select(columns)
        )
    return pa.concat_tables(parts)


def _physical(table: ModuleType | None, columns: list[str] | None) -> list[str] | None:
    """Stored column names for logical ones (a table module with a codec maps them)."""
    return table.physical_columns(columns) if hasattr(table, "physical_columns") else columns


def _decoded(table: ModuleType, tbl: pa.Table) -> pa.Table:
    """A stored shard's table as its logical columns (identity without a codec)."""
    return table.decode(tbl) if hasattr(table, "decode") else tbl
