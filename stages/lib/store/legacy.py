"""Runs written before the sealed ``_manifest.json``: :func:`migrate` checks a legacy
``manifest.json`` against its shards and seals it."""

from __future__ import annotations

import json
from pathlib import Path

from data_schemas import manifest as manifest_mod
from stages.lib.errors import UserError
from stages.lib.layout import RunLayout
from stages.lib.store.files import _flock, atomic_write_text, hidden
from stages.lib.store.reader import _check_shard

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
