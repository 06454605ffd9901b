"""Writing one dataset folder: :func:`open_writer` locks it per worker and prepares resume,
``DatasetWriter.write_shard`` writes one validated shard atomically, ``commit`` writes the
manifest once every shard exists (see the package docstring)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import pyarrow as pa
import pyarrow.parquet as pq

from data_schemas import manifest as manifest_mod
from data_schemas.common import META_DATASET, META_SHARD, META_TABLE, META_VERSION
from stages.lib.errors import UserError, fault_point
from stages.lib.safety import redact
from stages.lib.store.files import (
    HOOKS,
    TMP_PREFIX,
    _flock,
    _footer_meta,
    _fsync_dir,
    atomic_write_text,
    disk_error,
    file_sha256,
    shard_relpath,
    shards_of_worker,
)
from stages.lib.store.model_refs import model_entries, run_root_of
from stages.lib.store.resume import _other_dataset, _refuse_other


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
