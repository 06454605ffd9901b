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

# The package's public names: import them from ``stages.lib.store``. Where each lives: files.py
# (shard names, hashes, durable writes, locks, the object-storage hooks), writer.py (writing and
# committing a dataset), resume.py (the resume/refuse rule), reader.py (verified reads),
# streaming.py (rank-strided row groups), model_refs.py (the models a manifest names),
# legacy.py (migrating pre-seal manifests).
from stages.lib.store.files import (
    HOOKS,
    SHARDS_PER_BUCKET,
    TMP_PREFIX,
    Hooks,
    atomic_write_text,
    canonical_json,
    content_id,
    disk_error,
    file_lock,
    file_sha256,
    hidden,
    open_shard,
    shard_relpath,
    shards_of_worker,
)
from stages.lib.store.legacy import migrate, migrate_run
from stages.lib.store.model_refs import model_entries, model_path, run_root_of, shown_path
from stages.lib.store.reader import open_committed, read_table, shard_paths
from stages.lib.store.resume import up_to_date
from stages.lib.store.streaming import grouped_permutation, rank_units, row_group_units, stream
from stages.lib.store.writer import DatasetWriter, open_writer, shard_entry

__all__ = [
    "HOOKS",
    "SHARDS_PER_BUCKET",
    "TMP_PREFIX",
    "DatasetWriter",
    "Hooks",
    "atomic_write_text",
    "canonical_json",
    "content_id",
    "disk_error",
    "file_lock",
    "file_sha256",
    "grouped_permutation",
    "hidden",
    "migrate",
    "migrate_run",
    "model_entries",
    "model_path",
    "open_committed",
    "open_shard",
    "open_writer",
    "rank_units",
    "read_table",
    "row_group_units",
    "run_root_of",
    "shard_entry",
    "shard_paths",
    "shard_relpath",
    "shards_of_worker",
    "shown_path",
    "stream",
    "up_to_date",
]
