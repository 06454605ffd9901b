"""The manifest: one JSON file per dataset folder, written LAST, so it doubles as the commit marker.

```
{"format": "distillery.manifest", "format_version": 1,
 "table": "tokens", "schema_version": 2, "dataset_id": "<hex>", "stage": "score",
 "rows": 123, "bytes": 4567,
 "shards": [{"path": "bucket=000/shard-00000.parquet", "rows": 10, "bytes": 999, "sha256": "..."}],
 "fingerprints": {"teacher": "...", "tokenizer": "..."},   # models and tokenizer that made it
 "inputs": {"rollouts": "<dataset_id>"},                   # datasets it was computed from
 "models": {"teacher": {"path": "/abs/dir", "fingerprint": "..."},   # optional: a model folder,
            "policy": {"run_path": "checkpoints/sft/final", ...}},  # absolute, or inside the run
 "teacher_temperature": 1.0,                               # optional: tokens / selected only
 "config": {...},                                          # the resolved stage config
 "extra": {...},                                           # stage-specific (summaries, K, ...)
 "manifest_sha256": "<hex>"}                               # checksum of everything above
```
``dataset_id`` hashes everything that determines the content (config, inputs, fingerprints), so a
re-run with the same id resumes and a different id is refused instead of silently mixed.

The file is ``_manifest.json``: names starting with ``_`` or ``.`` are skipped by Parquet readers
(the Hive/Spark convention), so pandas, pyarrow, polars, Spark and DuckDB open a dataset folder as
it is. Runs written before this convention have ``manifest.json``; it is still read (without the
checksum, which it predates) and ``stages.lib.store.migrate`` renames it. See docs/DATA.md.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from data_schemas.common import SchemaError

FILENAME = "_manifest.json"
LEGACY_FILENAME = "manifest.json"  # runs written before the '_' convention
FORMAT = "distillery.manifest"
FORMAT_VERSION = 1
CHECKSUM = "manifest_sha256"
REQUIRED = {
    "format": str,
    "format_version": int,
    "table": str,
    "schema_version": int,
    "dataset_id": str,
    "stage": str,
    "rows": int,
    "bytes": int,
    "shards": list,
    "fingerprints": dict,
    "inputs": dict,
    "config": dict,
    "extra": dict,
}
# typed fields a manifest may carry (checked when present)
OPTIONAL = {"models": dict, "teacher_temperature": (int, float), CHECKSUM: str}
SHARD_REQUIRED = {"path": str, "rows": int, "bytes": int, "sha256": str}
_FIX = "delete the dataset folder and re-run the stage that writes it"


def checksum(m: dict) -> str:
    """sha256 of the manifest's canonical JSON without its own checksum field."""
    body = {k: v for k, v in m.items() if k != CHECKSUM}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def seal(m: dict) -> dict:
    """The manifest as JSON will read it back, with its checksum added."""
    body = json.loads(json.dumps(m, default=str))
    body.pop(CHECKSUM, None)
    return {**body, CHECKSUM: checksum(body)}


def _check_models(models: dict, where: str) -> None:
    """Each entry names its folder by an absolute ``path`` or by a ``run_path`` inside the run
    (relative, no '..')."""
    for role, entry in models.items():
        entry = entry if isinstance(entry, dict) else {}
        path, run_path = entry.get("path"), entry.get("run_path")
        ok_abs = isinstance(path, str) and Path(path).is_absolute()
        ok_run = (
            isinstance(run_path, str)
            and run_path != ""
            and not Path(run_path).is_absolute()
            and ".." not in Path(run_path).parts
        )
        if ok_abs == ok_run:  # exactly one of them
            raise SchemaError(
                f"manifest models.{role}: needs an absolute 'path' or a 'run_path' inside the run",
                where,
                _FIX,
            )


def validate(m: Any, *, where: str, sealed: bool = True) -> dict:
    """Check a parsed manifest's structure, totals and (``sealed``) checksum; return it."""
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise SchemaError("not a distillery manifest", where, _FIX)
    if m.get("format_version") != FORMAT_VERSION:
        raise SchemaError(
            f"manifest format version {m.get('format_version')} (this code reads {FORMAT_VERSION})",
            where,
            _FIX,
        )
    for key, typ in REQUIRED.items():
        if not isinstance(m.get(key), typ):
            raise SchemaError(f"manifest field '{key}' missing or not {typ.__name__}", where, _FIX)
    for key, typ in OPTIONAL.items():
        if key in m and (not isinstance(m[key], typ) or isinstance(m[key], bool)):
            raise SchemaError(f"manifest field '{key}' has the wrong type", where, _FIX)
    _check_models(m.get("models", {}), where)
    for i, s in enumerate(m["shards"]):
        for key, typ in SHARD_REQUIRED.items():
            if not isinstance(s, dict) or not isinstance(s.get(key), typ):
                raise SchemaError(f"manifest shard {i}: field '{key}' missing or bad", where, _FIX)
    if sum(s["rows"] for s in m["shards"]) != m["rows"]:
        raise SchemaError("manifest rows do not add up over its shards", where, _FIX)
    if sealed and m.get(CHECKSUM) != checksum(m):
        raise SchemaError(
            "manifest checksum mismatch (the file was edited or damaged after its commit)",
            where,
            _FIX,
        )
    return m


def path_of(directory: str | Path) -> Path | None:
    """The manifest file of a dataset folder (the legacy name as a fallback), None if absent."""
    for name in (FILENAME, LEGACY_FILENAME):
        p = Path(directory) / name
        if p.exists() or p.is_symlink():
            return p
    return None


def read(directory: str | Path) -> dict | None:
    """The dataset's manifest, or None when the dataset is not committed (no manifest yet)."""
    path = path_of(directory)
    if path is None:
        return None
    fix = "delete it and re-run the stage that writes the dataset"
    if not path.is_file():
        raise SchemaError("the manifest is not a regular file", str(path), fix)
    try:
        m = json.loads(path.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SchemaError(f"unreadable manifest ({e})", str(path), fix) from None
    except OSError as e:
        raise SchemaError(f"cannot read the manifest ({e.strerror})", str(path), fix) from None
    return validate(m, where=str(path), sealed=path.name == FILENAME)
