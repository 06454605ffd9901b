"""The resume/refuse rule of every dataset a stage writes, in one place: a folder holding this
dataset id is resumed (or already complete); other data is refused unless ``overwrite``."""

from __future__ import annotations

from pathlib import Path

from data_schemas import manifest as manifest_mod
from data_schemas.common import META_DATASET
from stages.lib.errors import UserError
from stages.lib.store.files import _footer_meta


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
