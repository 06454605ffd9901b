"""The shard store: how every stage writes and reads its Parquet datasets.

Layout of one dataset directory (``run_dir/rollouts``, ``run_dir/tokens``, ``run_dir/selected/x``)::

    bucket=000/shard-00000.parquet   # hive-style partition folders, 256 shards per bucket
    bucket=000/shard-00001.parquet
    _manifest.json                   # written LAST: the commit marker (data_schemas.manifest)
    .lock, .lock-worker-*, .tmp-*    # locks and temp files

Every file that is not a shard starts with ``_`` or ``.``, the names Parquet readers skip, so
``pd.read_parquet(folder)``, ``pyarrow.dataset.dataset(folder, partitioning="hive")`` and DuckDB
open a dataset folder as it is (docs/DATA.md).

Writing: a shard is validated against its table schema, written to a hidden temp name with
fixed-size row groups and zstd, fsynced, then renamed into place, so a reader never sees half a
shard and a shard that exists is complete. Resume = skip shards that exist (their footer must
carry the same ``dataset_id``). Shard ``s`` belongs to worker ``s % count``; every worker commits
at the end and the last one to finish (all shards present) writes the manifest.
Locks (``fcntl.flock``, released by the kernel if the process dies): one per worker while writing,
one per dataset around open/commit; a second writer gets a clear error instead of racing.

Reading: only committed datasets are read, after checking the manifest against the files: its own
checksum, every listed shard present with its size, sha256 (optional), dataset id and row count
(Parquet footer), and no unlisted file in the folder; ``stream`` yields row groups strided by ``(rank, world_size)`` with a resumable state.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
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
from stages.lib.layout import RunLayout
from stages.lib.safety import redact

SHARDS_PER_BUCKET = 256
TMP_PREFIX = ".tmp-"


@dataclass
class Hooks:
    """Seams for a run on object storage (``stages.lib.remote`` sets them for a remote run_dir;
    None for a local one, where nothing changes)."""

    published: Callable[[Path], None] | None = None  # a file was just committed under its name
    refresh: Callable[[Path], None] | None = None  # before a commit checks that all shards exist
    # a shard the mirror does not hold, read in place: (size, open random-access file) or None
    streamed: Callable[[Path], tuple[int, Any] | None] | None = None
    # the trainer renamed a checkpoint into place: (temp folder, folder, its Dist)
    checkpoint: Callable[[Path, Path, Any], None] | None = None


HOOKS = Hooks()


def open_shard(path: Path) -> pq.ParquetFile:
    """A shard's Parquet file: the local file, or (object storage) the object itself, read by
    byte ranges (footer, then the column chunks of each row group asked for)."""
    if HOOKS.streamed is not None and not path.exists():
        found = HOOKS.streamed(path)
        if found is not None:
            return pq.ParquetFile(found[1])
    return pq.ParquetFile(path)


def _shard_size(path: Path) -> int | None:
    """Bytes of a shard file (or of the object streamed in its place); None if there is none."""
    if path.is_file():
        return path.stat().st_size
    found = HOOKS.streamed(path) if HOOKS.streamed is not None else None
    return None if found is None else found[0]


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
    if HOOKS.published is not None:  # object storage: the same file under its final key
        HOOKS.published(path)


DATASET_LOCK_FIX = (
    "wait for the other process to finish (or stop it); two writers never share a "
    "dataset. Parallel workers need distinct worker.index values"
)


@contextlib.contextmanager
def _flock(
    path: Path,
    what: str,
    *,
    blocking: bool,
    holder: str = "another writer",
    where: str | None = None,
    fix: str = DATASET_LOCK_FIX,
) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            pid = ""
            with contextlib.suppress(OSError):
                pid = os.pread(fd, 200, 0).decode(errors="replace").strip()
            raise UserError(
                f"{what} is locked by {holder}{f' ({pid})' if pid else ''}",
                where or str(path.parent),
                fix,
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {os.uname().nodename}".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing releases the flock


def file_lock(
    path: Path, what: str, *, blocking: bool = True, **message: str
) -> contextlib.AbstractContextManager[None]:
    """An exclusive lock on ``path`` (created if needed; released when the process dies). Not
    blocking: a held lock is a UserError at once (``message``: holder/where/fix wording)."""
    return _flock(path, what, blocking=blocking, **message)


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
    # shard -> manifest entry, for shards written and published by another machine (a Ray actor
    # on a run in object storage): commit lists them without fetching their bytes
    reported: dict[int, dict] = field(default_factory=dict)
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
            if HOOKS.published is not None:  # object storage: upload under its final key
                HOOKS.published(path)
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
        models: dict[str, str | Path] | None = None,
        teacher_temperature: float | None = None,
    ) -> bool:
        """Write the manifest if all ``n_shards`` shards exist; return whether the dataset is
        committed (by this call, or by a concurrent worker that got there first: the manifest is
        written exactly once). ``models`` (role -> model folder) are recorded with the role's
        fingerprint: relative to the run when inside it, else as absolute paths
        (:func:`model_entries`), so the run resolves from any working directory or machine."""
        published = None  # object storage: rel -> size of the shards in the bucket
        if HOOKS.refresh is not None:  # (and those other machines published, fetched)
            published = HOOKS.refresh(self.directory, {shard_relpath(s) for s in self.reported})
        with _flock(self.directory / ".lock", f"{self.table.NAME} dataset", blocking=True):
            done = manifest_mod.read(self.directory)
            if done is not None and done["dataset_id"] == self.dataset_id:
                self.complete = True
                return True
            here = [self.shard_path(s).exists() or s in self.reported for s in range(n_shards)]
            if not all(here):
                return False  # other workers are still writing; the last one commits
            shards = [self._entry(s, published) for s in range(n_shards)]
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
                "config": json.loads(redact(json.dumps(config))),  # no credentials in a URI
                "extra": extra or {},
            }
            if models:
                m["models"] = model_entries(models, fingerprints, run_root_of(self.directory))
            if teacher_temperature is not None:
                m["teacher_temperature"] = float(teacher_temperature)
            fault_point("before_manifest")
            text = json.dumps(manifest_mod.seal(m), indent=1)
            try:
                atomic_write_text(self.directory / manifest_mod.FILENAME, text)
                (self.directory / manifest_mod.LEGACY_FILENAME).unlink(missing_ok=True)
            except OSError as e:
                raise disk_error(e, str(self.directory)) from None
            self.complete = True
            return True

    def _entry(self, shard: int, published: dict[str, int] | None) -> dict:
        """The manifest entry of a written ``shard``: from its file here, else from what the
        machine that wrote it reported (its object in the bucket must have the reported size)."""
        path = self.shard_path(shard)
        if path.exists():
            self.is_done(shard)  # (refuses a shard of another dataset)
            return shard_entry(shard, path)
        e, rel = self.reported[shard], shard_relpath(shard)
        size = (published or {}).get(rel)
        if size != e["bytes"]:
            raise UserError(
                f"shard {rel} was reported written ({e['bytes']} bytes) but the bucket holds "
                f"{'no such object' if size is None else f'{size} bytes'}",
                str(self.directory),
                "re-run the stage: it resumes and writes the missing shard again",
            )
        return e

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


def shard_entry(shard: int, path: Path) -> dict:
    """A shard's manifest entry, from its file."""
    return {
        "path": shard_relpath(shard),
        "rows": pq.ParquetFile(path).metadata.num_rows,
        "bytes": path.stat().st_size,
        "sha256": file_sha256(path),
    }


def run_root_of(directory: str | Path) -> Path:
    """The run (or round) folder holding a dataset folder: ``<run>/tokens`` or
    ``<run>/selected/<name>``."""
    d = Path(directory)
    return d.parent.parent if d.parent.name == "selected" else d.parent


def model_entries(models: dict[str, str | Path], fingerprints: dict, run_root: Path) -> dict:
    """role -> {"run_path": folder inside the run | "path": absolute folder elsewhere,
    "fingerprint": the role's fingerprint (if known)}. A model inside the run (an SFT checkpoint)
    is named relative to it, not by this machine's path (a mirror, a mount): the run still
    resolves after a move to another folder, machine or bucket, and the fingerprint (content)
    says whether it is still the same model."""
    out = {}
    for role, path in models.items():
        if not path:
            continue
        p = Path(path).resolve()
        try:
            where = {"run_path": p.relative_to(Path(run_root).resolve()).as_posix()}
        except ValueError:
            where = {"path": str(p)}
        out[role] = {**where, "fingerprint": fingerprints.get(role)}
    return out


def shown_path(path: str | Path, run_root: Path, run_dir: str) -> str:
    """A model folder as a manifest's ``extra`` shows it: inside the run as ``<run_dir>/<rel>``
    (``run_dir`` as the user gave it: a folder or an ``s3://`` URI), else the folder itself."""
    try:
        rel = Path(path).resolve().relative_to(Path(run_root).resolve()).as_posix()
    except ValueError:
        return str(path)
    return f"{str(run_dir).rstrip('/')}/{rel}"


def model_path(
    m: dict, role: str, legacy: str | None = None, directory: str | Path | None = None
) -> str | None:
    """A model folder a manifest names: ``models.<role>`` (``run_path`` resolved against the run
    holding ``directory``, the manifest's dataset folder; else the absolute ``path``), else the
    legacy ``extra[legacy]`` value (relative to the directory the stage ran in), else None."""
    entry = (m.get("models") or {}).get(role)
    if entry and "run_path" in entry:
        if directory is None:
            raise ValueError(f"models.{role} is inside the run: pass the dataset folder")
        return str(run_root_of(directory) / entry["run_path"])
    if entry:
        return entry["path"]
    return (m.get("extra") or {}).get(legacy) if legacy else None


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
            _prepare(w, overwrite=overwrite)
    except BaseException:
        w.close()
        raise
    return w


def _other_dataset(directory: Path, dataset_id: str, overwrite: bool) -> tuple[dict | None, str]:
    """(this dataset's manifest or None, the id of other data in the folder or '')."""
    try:
        m = manifest_mod.read(directory)
    except UserError:
        if not overwrite:
            raise
        return None, "unreadable manifest"
    if m is not None and m["dataset_id"] != dataset_id:
        return None, m["dataset_id"]
    existing = sorted(directory.glob("bucket=*/shard-*.parquet"))
    if m is None and existing:
        got = _footer_meta(existing[0]).get(META_DATASET, b"").decode()
        if got != dataset_id:
            return None, got or "unknown"
    return m, ""


def up_to_date(
    directory: Path, dataset_id: str, *, overwrite: bool, what: str, fix: str
) -> dict | None:
    """The resume/refuse rule of every dataset a stage writes, in one place: the manifest when
    ``directory`` holds dataset ``dataset_id`` (the stage has nothing to do); None when it holds
    no other data, or other data that ``overwrite`` lets the stage replace; other data without
    ``overwrite`` is one UserError, raised before the stage does any work. ``what`` names the
    data in the error, ``fix`` says how to get past it."""
    m, other = _other_dataset(directory, dataset_id, overwrite)
    _refuse_other(directory, other, dataset_id, overwrite, what, fix)
    return m


def _refuse_other(
    directory: Path, other: str, dataset_id: str, overwrite: bool, what: str, fix: str
) -> None:
    if other and not overwrite:
        raise UserError(
            f"{directory} already holds {what} from a different run or config "
            f"(dataset_id {other}, this run {dataset_id})",
            str(directory),
            fix,
        )


def _prepare(w: DatasetWriter, *, overwrite: bool) -> None:
    """Under the dataset lock: refuse or clear other data, mark complete, remove stale temps."""
    directory = w.directory
    m, other = _other_dataset(directory, w.dataset_id, overwrite)
    fix = "pass overwrite=true to replace it, or choose another run_dir"
    _refuse_other(directory, other, w.dataset_id, overwrite, w.table.NAME, fix)
    if other:  # overwrite=true: clear the other data
        for p in directory.iterdir():
            if p.name.startswith(".lock"):
                continue
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    w.complete = m is not None
    mine = None
    if w.worker_count > 1:
        mine = set(shards_of_worker(10**6, w.worker_index, w.worker_count))
    for tmp in directory.glob(f"bucket=*/{TMP_PREFIX}shard-*"):
        shard = int(tmp.name[len(TMP_PREFIX) :].split(".")[0].split("-")[1])
        if mine is None or shard in mine:
            tmp.unlink(missing_ok=True)
    # a manifest temp of a killed commit (we hold the dataset lock: nobody is committing)
    for fname in (manifest_mod.FILENAME, manifest_mod.LEGACY_FILENAME):
        for tmp in directory.glob(f"{TMP_PREFIX}{fname}.*"):
            tmp.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- reading
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


def _plain_relpath(rel: str) -> str:
    """``rel`` if it stays inside the dataset folder (no '..', not absolute), else ''."""
    parts = Path(rel).parts
    return rel if parts and not Path(rel).is_absolute() and ".." not in parts else ""


def hidden(name: str) -> bool:
    """A metadata name Parquet readers skip (locks, temps, manifests): starts with '_' or '.'."""
    return name.startswith(("_", "."))


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


def row_group_units(directory: str | Path, m: dict) -> list[tuple[int, int, int]]:
    """All (shard, row_group, rows) of a committed dataset, in storage order."""
    units = []
    for i, p in enumerate(shard_paths(directory, m)):
        md = open_shard(p).metadata
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


def grouped_permutation(column: pa.ChunkedArray | pa.Array, rng: np.random.Generator) -> np.ndarray:
    """Row indices ``[N]`` that shuffle the groups of rows with equal values in ``column`` (a
    scalar or a list column, e.g. a train prompt's token ids): each group's rows stay adjacent,
    in storage order, wherever they stood; the groups (in order of first appearance) are
    permuted by ``rng``."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type):
        # offsets index the values as .values returns them (a slice's parent, whole)
        offsets, values = arr.offsets.to_numpy(), arr.values.to_numpy(zero_copy_only=False)
        keys = [values[offsets[i] : offsets[i + 1]].tobytes() for i in range(len(arr))]
    else:
        keys = arr.to_pylist()
    groups: dict = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    blocks = list(groups.values())
    order = rng.permutation(len(blocks))
    return np.array([i for g in order for i in blocks[g]], dtype=np.int64)


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
    group_by: str | None = None,  # with shuffle_seed: rows equal in this column stay together
) -> Iterator[tuple[pa.Table, dict]]:
    """Yield ``(row_group_table, state_after)``; pass ``state_after`` back to resume after it.

    The state is ``{"epoch": e, "shard": s, "row_group": g, "index": i}``: the next row group to
    read is number ``i`` of this rank's order in epoch ``e`` (``shard``/``row_group`` name it, for
    people reading checkpoints). Ranks read disjoint row groups whose union is the whole dataset.
    With ``shuffle_seed`` the row groups AND the rows inside each are permuted per epoch (seeded);
    with ``group_by`` too, the rows of a row group that are equal in that column move as one
    block (``grouped_permutation``): the order of the blocks is shuffled, not the rows.
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
                files[shard] = open_shard(paths[shard])
            tbl = files[shard].read_row_group(group, columns=_physical(table, columns))
            if table is not None:  # decode a stored codec layout to the logical columns
                tbl = _decoded(table, tbl)
            if shuffle_seed is not None:  # rows too, not only row groups: mixes neighbours
                rng = np.random.default_rng([shuffle_seed, epoch, shard, group])
                if group_by is None:
                    tbl = tbl.take(rng.permutation(tbl.num_rows))
                else:
                    tbl = tbl.take(grouped_permutation(tbl[group_by], rng))
            index += 1
            if index < len(mine):
                nxt = {"epoch": epoch, "shard": mine[index][0], "row_group": mine[index][1]}
            else:
                nxt = {"epoch": epoch + 1, "shard": None, "row_group": None}
            yield tbl, {**nxt, "index": index if index < len(mine) else 0}
        epoch, index = epoch + 1, 0


# ----------------------------------------------------------------------------- legacy runs
_REDO = "re-run the stage that wrote the dataset with overwrite=true"


def migrate(directory: str | Path) -> bool:
    """Rename a legacy ``manifest.json`` to a sealed ``_manifest.json``; True if it did.

    The legacy manifest is checked against the shards first (sizes, sha256, footers, unlisted
    files), so a migrated manifest is never more trusted than the data it describes.
    """
    directory = Path(directory)
    legacy = directory / manifest_mod.LEGACY_FILENAME
    if not legacy.is_file():
        return False
    if manifest_mod.path_of(directory).name == manifest_mod.FILENAME:
        manifest_mod.read(directory)  # a sealed manifest is there (a killed migration): keep it
        legacy.unlink()
        return True
    with _flock(directory / ".lock", "dataset", blocking=True):
        m = manifest_mod.read(directory)
        listed = {s["path"] for s in m["shards"]}
        for s in m["shards"]:
            _check_shard(directory, s, m["dataset_id"], m["table"], True, str(legacy), _REDO)
        for p in directory.rglob("*.parquet"):
            rel = p.relative_to(directory).as_posix()
            if rel not in listed and not any(hidden(x) for x in Path(rel).parts):
                raise UserError(f"unlisted shard {rel}", str(p), "remove it, then migrate again")
        atomic_write_text(
            directory / manifest_mod.FILENAME, json.dumps(manifest_mod.seal(m), indent=1)
        )
        legacy.unlink()
    return True


def migrate_run(root: str | Path) -> list[Path]:
    """Migrate every dataset folder of a run (rounds included); the folders migrated."""
    done = []
    for lay in RunLayout.of(root).rounds().values():
        sels = sorted(lay.selected_root.iterdir()) if lay.selected_root.is_dir() else []
        for d in [lay.rollouts, lay.tokens, lay.sft_data, *sels]:
            if d.is_dir() and not hidden(d.name) and migrate(d):
                done.append(d)
    return done
