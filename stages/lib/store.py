"""The shard store: how every stage writes and reads its Parquet datasets.

Layout of one dataset directory (``run_dir/rollouts``, ``run_dir/tokens``, ``run_dir/selected/x``)::

    bucket=000/shard-00000.parquet   # hive-style partition folders, 256 shards per bucket
    bucket=000/shard-00001.parquet
    manifest.json                    # written LAST: the commit marker (data_schemas.manifest)

Writing: a shard is validated against its table schema, written to a hidden temp name with
fixed-size row groups and zstd, fsynced, then renamed into place, so a reader never sees half a
shard and a shard that exists is complete. Resume = skip shards that exist (their footer must
carry the same ``dataset_id``). Shard ``s`` belongs to worker ``s % count``; every worker commits
at the end and the last one to finish (all shards present) writes the manifest.
Locks (``fcntl.flock``, released by the kernel if the process dies): one per worker while writing,
one per dataset around open/commit; a second writer gets a clear error instead of racing.

Reading: only committed datasets (manifest present, sizes and checksums verified, footers checked)
are read; ``stream`` yields row groups strided by ``(rank, world_size)`` with a resumable state.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data_schemas import manifest as manifest_mod
from data_schemas.common import META_DATASET, META_SHARD, META_TABLE, META_VERSION
from stages.lib.errors import UserError, fault_point

SHARDS_PER_BUCKET = 256
TMP_PREFIX = ".tmp-"


# ----------------------------------------------------------------------------- small helpers
def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def content_id(obj: Any) -> str:
    """A short stable hash of a JSON-able object (configs, fingerprints, input ids)."""
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()[:20]


def file_sha256(path: str | Path, bufsize: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(bufsize):
            h.update(chunk)
    return h.hexdigest()


def shard_relpath(shard: int) -> str:
    return f"bucket={shard // SHARDS_PER_BUCKET:03d}/shard-{shard:05d}.parquet"


def shards_of_worker(n_shards: int, index: int, count: int) -> list[int]:
    """Shards a worker owns: disjoint across workers, their union is everything."""
    if count < 1 or not 0 <= index < count:
        raise UserError(
            f"worker.index={index} is outside 0..worker.count-1 (count={count})",
            "config worker",
            "set 0 <= worker.index < worker.count",
        )
    return [s for s in range(n_shards) if s % count == index]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}.{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    fault_point("mid_manifest")
    os.replace(tmp, path)
    _fsync_dir(path.parent)


@contextlib.contextmanager
def _flock(path: Path, what: str, *, blocking: bool) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            holder = ""
            with contextlib.suppress(OSError):
                holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
            raise UserError(
                f"{what} is locked by another writer{f' ({holder})' if holder else ''}",
                str(path.parent),
                "wait for the other process to finish (or stop it); two writers never share a "
                "dataset. Parallel workers need distinct worker.index values",
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {os.uname().nodename}".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing releases the flock


def disk_error(e: OSError, where: str) -> UserError:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return UserError(
            "disk full while writing",
            where,
            "free space or point run_dir elsewhere, then re-run: finished shards are kept",
        )
    return UserError(
        f"cannot write ({e.strerror})", where, "check the path and its permissions, then re-run"
    )


# ----------------------------------------------------------------------------- writing
@dataclass
class DatasetWriter:
    """Writes the shards of one dataset directory for one worker; see the module docstring."""

    directory: Path
    table: ModuleType  # a data_schemas table module (NAME, VERSION, SCHEMA, validate)
    dataset_id: str
    stage: str
    row_group_rows: int = 4096
    vocab_size: int | None = None
    worker_index: int = 0
    worker_count: int = 1
    complete: bool = False  # the manifest exists with this dataset_id: nothing to do
    _stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack, repr=False)

    def shard_path(self, shard: int) -> Path:
        return self.directory / shard_relpath(shard)

    def is_done(self, shard: int) -> bool:
        """The shard exists (renamed into place = complete) and belongs to this dataset."""
        path = self.shard_path(shard)
        if not path.exists():
            return False
        meta = _footer_meta(path)
        if meta.get(META_DATASET) != self.dataset_id.encode():
            raise UserError(
                f"shard {path.name} was written by a different run or config "
                f"(dataset_id {meta.get(META_DATASET, b'?').decode()} != {self.dataset_id})",
                str(path),
                "re-run with overwrite=true to replace the old data, or use another run_dir",
            )
        return True

    def write_shard(self, shard: int, table: pa.Table) -> None:
        """Validate and atomically write one shard (temp file, fsync, rename)."""
        where = f"{self.table.NAME} shard {shard} in {self.directory}"
        table = self.table.validate(table, where=where, vocab_size=self.vocab_size)
        if hasattr(self.table, "encode"):  # a storage codec (data_schemas/codec.py)
            table = self.table.encode(table)
        table = table.cast(_with_meta(table.schema, self, shard))
        path = self.shard_path(shard)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{TMP_PREFIX}{path.name}.{os.getpid()}")
        opts = {"compression_level": 3}  # per-table writer options override these
        if hasattr(self.table, "parquet_options"):
            opts.update(self.table.parquet_options(table.schema))
        try:
            with pq.ParquetWriter(
                tmp,
                table.schema,
                compression="zstd",
                write_statistics=True,
                write_page_checksum=True,
                **opts,
            ) as w:
                w.write_table(table, row_group_size=self.row_group_rows)
                fault_point("mid_shard")  # the temp file has no footer yet
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            fault_point("before_rename")
            os.replace(tmp, path)
            _fsync_dir(path.parent)
            fault_point("after_shard")
        except OSError as e:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise disk_error(e, where) from None

    def commit(
        self,
        n_shards: int,
        *,
        config: dict,
        fingerprints: dict,
        inputs: dict,
        extra: dict | None = None,
    ) -> bool:
        """Write the manifest if all ``n_shards`` shards exist; return whether the dataset is
        committed (by this call, or by a concurrent worker that got there first: the manifest is
        written exactly once)."""
        with _flock(self.directory / ".lock", f"{self.table.NAME} dataset", blocking=True):
            done = manifest_mod.read(self.directory)
            if done is not None and done["dataset_id"] == self.dataset_id:
                self.complete = True
                return True
            paths = [self.shard_path(s) for s in range(n_shards)]
            if not all(p.exists() for p in paths):
                return False  # other workers are still writing; the last one commits
            shards = []
            for s, p in enumerate(paths):
                if not self.is_done(s):
                    return False
                shards.append(
                    {
                        "path": shard_relpath(s),
                        "rows": pq.ParquetFile(p).metadata.num_rows,
                        "bytes": p.stat().st_size,
                        "sha256": file_sha256(p),
                    }
                )
            m = {
                "format": manifest_mod.FORMAT,
                "format_version": manifest_mod.FORMAT_VERSION,
                "table": self.table.NAME,
                "schema_version": self.table.VERSION,
                "dataset_id": self.dataset_id,
                "stage": self.stage,
                "rows": sum(s["rows"] for s in shards),
                "bytes": sum(s["bytes"] for s in shards),
                "shards": shards,
                "fingerprints": fingerprints,
                "inputs": inputs,
                "config": config,
                "extra": extra or {},
            }
            fault_point("before_manifest")
            try:
                atomic_write_text(
                    self.directory / manifest_mod.FILENAME, json.dumps(m, indent=1, default=str)
                )
            except OSError as e:
                raise disk_error(e, str(self.directory)) from None
            self.complete = True
            return True

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> DatasetWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _with_meta(schema: pa.Schema, w: DatasetWriter, shard: int) -> pa.Schema:
    meta = dict(schema.metadata or {})
    meta.update(
        {
            META_TABLE: w.table.NAME.encode(),
            META_VERSION: str(w.table.VERSION).encode(),
            META_DATASET: w.dataset_id.encode(),
            META_SHARD: str(shard).encode(),
        }
    )
    return schema.with_metadata(meta)


def _footer_meta(path: Path) -> dict:
    try:
        return dict(pq.ParquetFile(path).schema_arrow.metadata or {})
    except (pa.ArrowInvalid, OSError) as e:
        raise UserError(
            f"corrupt or truncated Parquet shard ({e})",
            str(path),
            "delete the file and re-run the stage that wrote it",
        ) from None


def open_writer(
    directory: str | Path,
    table: ModuleType,
    *,
    dataset_id: str,
    stage: str,
    overwrite: bool = False,
    worker_index: int = 0,
    worker_count: int = 1,
    row_group_rows: int = 4096,
    vocab_size: int | None = None,
) -> DatasetWriter:
    """Lock a dataset directory for writing (per worker) and prepare resume.

    * manifest with this dataset_id: ``complete=True`` (the stage has nothing to do);
    * manifest or shards from another dataset_id: refused unless ``overwrite`` (then removed);
    * partial shards of this dataset_id: kept, ``is_done`` lets the stage skip them;
    * temp files left by a killed writer of this worker's shards: removed.
    """
    directory = Path(directory)
    w = DatasetWriter(
        directory=directory,
        table=table,
        dataset_id=dataset_id,
        stage=stage,
        row_group_rows=row_group_rows,
        vocab_size=vocab_size,
        worker_index=worker_index,
        worker_count=worker_count,
    )
    shards_of_worker(1, worker_index, worker_count)  # validates the worker range
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise disk_error(e, str(directory)) from None
    w._stack.enter_context(
        _flock(
            directory / f".lock-worker-{worker_index}-of-{worker_count}",
            f"{table.NAME} (worker {worker_index}/{worker_count})",
            blocking=False,
        )
    )
    try:
        with _flock(directory / ".lock", f"{table.NAME} dataset", blocking=True):
            m = manifest_mod.read(directory)
            existing = sorted(directory.glob("bucket=*/shard-*.parquet"))
            other = None
            if m is not None and m["dataset_id"] != dataset_id:
                other = m["dataset_id"]
            elif existing:
                got = _footer_meta(existing[0]).get(META_DATASET, b"").decode()
                if got != dataset_id:
                    other = got or "unknown"
            if other is not None:
                if not overwrite:
                    raise UserError(
                        f"{directory} already holds {table.NAME} from a different run or config "
                        f"(dataset_id {other}, this run {dataset_id})",
                        str(directory),
                        "pass overwrite=true to replace it, or choose another run_dir",
                    )
                for p in directory.iterdir():
                    if p.name.startswith(".lock"):
                        continue
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
                m = None
            w.complete = m is not None
            mine = (
                set(shards_of_worker(10**6, worker_index, worker_count))
                if worker_count > 1
                else None
            )
            for tmp in directory.glob(f"bucket=*/{TMP_PREFIX}shard-*"):
                shard = int(tmp.name[len(TMP_PREFIX) :].split(".")[0].split("-")[1])
                if mine is None or shard in mine:
                    tmp.unlink(missing_ok=True)
            # a manifest temp of a killed commit (we hold the dataset lock: nobody is committing)
            for tmp in directory.glob(f"{TMP_PREFIX}{manifest_mod.FILENAME}.*"):
                tmp.unlink(missing_ok=True)
    except BaseException:
        w.close()
        raise
    return w


# ----------------------------------------------------------------------------- reading
def open_committed(
    directory: str | Path,
    table: ModuleType,
    *,
    verify_checksums: bool = True,
    what_writes_it: str = "the stage that writes it",
) -> dict:
    """The manifest of a committed dataset after verifying its shards; a UserError otherwise."""
    directory = Path(directory)
    m = manifest_mod.read(directory)
    if m is None:
        partial = any(directory.glob("bucket=*/shard-*.parquet"))
        raise UserError(
            f"{table.NAME} dataset is {'incomplete (no manifest yet)' if partial else 'missing'}",
            str(directory),
            f"run {what_writes_it} first (a re-run resumes where it stopped)",
        )
    where = str(directory / manifest_mod.FILENAME)
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
    for s in m["shards"]:
        p = directory / s["path"]
        if not p.exists():
            raise UserError(
                f"shard listed in the manifest is missing: {s['path']}",
                where,
                f"restore it or re-run {what_writes_it} with overwrite=true",
            )
        if p.stat().st_size != s["bytes"] or (verify_checksums and file_sha256(p) != s["sha256"]):
            raise UserError(
                f"shard {s['path']} does not match its manifest checksum (modified, truncated or "
                "from another run)",
                str(p),
                f"re-run {what_writes_it} with overwrite=true",
            )
        meta = _footer_meta(p)
        if (
            meta.get(META_DATASET, b"").decode() != m["dataset_id"]
            or meta.get(META_TABLE) != table.NAME.encode()
        ):
            raise UserError(
                f"shard {s['path']} belongs to another dataset",
                str(p),
                f"re-run {what_writes_it} with overwrite=true",
            )
    return m


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


def row_group_units(directory: str | Path, m: dict) -> list[tuple[int, int, int]]:
    """All (shard, row_group, rows) of a committed dataset, in storage order."""
    units = []
    for i, p in enumerate(shard_paths(directory, m)):
        md = pq.ParquetFile(p).metadata
        units += [(i, g, md.row_group(g).num_rows) for g in range(md.num_row_groups)]
    return units


def rank_units(
    units: list[tuple[int, int, int]],
    *,
    rank: int,
    world_size: int,
    epoch: int,
    shuffle_seed: int | None,
) -> list[tuple[int, int, int]]:
    """The row groups one rank reads in one epoch: a (seeded, per-epoch) order strided by rank."""
    order = list(range(len(units)))
    if shuffle_seed is not None:
        order = np.random.default_rng([shuffle_seed, epoch]).permutation(len(units)).tolist()
    return [units[i] for i in order[rank::world_size]]


def stream(
    directory: str | Path,
    m: dict,
    *,
    rank: int = 0,
    world_size: int = 1,
    state: dict | None = None,
    epochs: int = 1,
    shuffle_seed: int | None = None,
    columns: list[str] | None = None,
    table: ModuleType | None = None,  # the table module, to decode a codec layout (tokens)
) -> Iterator[tuple[pa.Table, dict]]:
    """Yield ``(row_group_table, state_after)``; pass ``state_after`` back to resume after it.

    The state is ``{"epoch": e, "shard": s, "row_group": g, "index": i}``: the next row group to
    read is number ``i`` of this rank's order in epoch ``e`` (``shard``/``row_group`` name it, for
    people reading checkpoints). Ranks read disjoint row groups whose union is the whole dataset.
    With ``shuffle_seed`` the row groups AND the rows inside each are permuted per epoch (seeded).
    """
    paths = shard_paths(directory, m)
    units = row_group_units(directory, m)
    epoch, index = (state or {}).get("epoch", 0), (state or {}).get("index", 0)
    files: dict[int, pq.ParquetFile] = {}
    while epoch < epochs:
        mine = rank_units(
            units, rank=rank, world_size=world_size, epoch=epoch, shuffle_seed=shuffle_seed
        )
        while index < len(mine):
            shard, group, _ = mine[index]
            if shard not in files:
                files[shard] = pq.ParquetFile(paths[shard])
            tbl = files[shard].read_row_group(group, columns=_physical(table, columns))
            if table is not None:  # decode a stored codec layout to the logical columns
                tbl = _decoded(table, tbl)
            if (
                shuffle_seed is not None
            ):  # rows too, not only row groups: mixes neighbouring prompts
                rng = np.random.default_rng([shuffle_seed, epoch, shard, group])
                tbl = tbl.take(rng.permutation(tbl.num_rows))
            index += 1
            if index < len(mine):
                nxt = {"epoch": epoch, "shard": mine[index][0], "row_group": mine[index][1]}
            else:
                nxt = {"epoch": epoch + 1, "shard": None, "row_group": None}
            yield tbl, {**nxt, "index": index if index < len(mine) else 0}
        epoch, index = epoch + 1, 0
