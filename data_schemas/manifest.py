"""The manifest: one JSON file per dataset directory, written LAST, so it doubles as the commit marker.

```
{"format": "distillery.manifest", "format_version": 1,
 "table": "tokens", "schema_version": 1, "dataset_id": "<hex>", "stage": "score",
 "rows": 123, "bytes": 4567,
 "shards": [{"path": "part=00000/shard-00000.parquet", "rows": 10, "bytes": 999, "sha256": "..."}],
 "fingerprints": {"teacher": "...", "tokenizer": "..."},   # models and tokenizer that made it
 "inputs": {"rollouts": "<dataset_id>"},                   # datasets it was computed from
 "config": {...},                                          # the resolved stage config
 "extra": {...}}                                           # stage-specific (summaries, K, ...)
```
``dataset_id`` hashes everything that determines the content (config, inputs, fingerprints), so a
re-run with the same id resumes and a different id is refused instead of silently mixed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from data_schemas.common import SchemaError

FILENAME = "manifest.json"
FORMAT = "distillery.manifest"
FORMAT_VERSION = 1
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
SHARD_REQUIRED = {"path": str, "rows": int, "bytes": int, "sha256": str}


def validate(m: Any, *, where: str) -> dict:
    """Check a parsed manifest's structure and totals; return it."""
    fix = "delete the dataset directory and re-run the stage that writes it"
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise SchemaError("not a distillery manifest", where, fix)
    if m.get("format_version") != FORMAT_VERSION:
        raise SchemaError(
            f"manifest format version {m.get('format_version')} (this code reads {FORMAT_VERSION})",
            where,
            fix,
        )
    for key, typ in REQUIRED.items():
        if not isinstance(m.get(key), typ):
            raise SchemaError(f"manifest field '{key}' missing or not {typ.__name__}", where, fix)
    for i, s in enumerate(m["shards"]):
        for key, typ in SHARD_REQUIRED.items():
            if not isinstance(s.get(key), typ):
                raise SchemaError(f"manifest shard {i}: field '{key}' missing or bad", where, fix)
    if sum(s["rows"] for s in m["shards"]) != m["rows"]:
        raise SchemaError("manifest rows do not add up over its shards", where, fix)
    return m


def read(directory: str | Path) -> dict | None:
    """The dataset's manifest, or None when the dataset is not committed (no manifest yet)."""
    path = Path(directory) / FILENAME
    if not path.exists():
        return None
    try:
        m = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SchemaError(
            f"unreadable manifest ({e})", str(path), "delete it and re-run the stage"
        ) from None
    return validate(m, where=str(path))
