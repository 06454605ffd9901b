"""The shard store's files: shard names, hashes, durable writes (fsync + rename), locks, and
the hooks through which a run on object storage (``stages.lib.remote``) sees every commit."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from stages.lib.errors import UserError, fault_point

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


def _footer_meta(path: Path) -> dict:
    try:
        return dict(pq.ParquetFile(path).schema_arrow.metadata or {})
    except (pa.ArrowInvalid, OSError) as e:
        raise UserError(
            f"corrupt or truncated Parquet shard ({e})",
            str(path),
            "delete the file and re-run the stage that wrote it",
        ) from None


def _plain_relpath(rel: str) -> str:
    """``rel`` if it stays inside the dataset folder (no '..', not absolute), else ''."""
    parts = Path(rel).parts
    return rel if parts and not Path(rel).is_absolute() and ".." not in parts else ""


def hidden(name: str) -> bool:
    """A metadata name Parquet readers skip (locks, temps, manifests): starts with '_' or '.'."""
    return name.startswith(("_", "."))
