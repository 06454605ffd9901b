"""Streaming a committed dataset to training ranks: row groups strided by ``(rank, world_size)``,
a seeded per-epoch order, and a state that resumes after the last row group read."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from stages.lib.store.files import open_shard
from stages.lib.store.reader import _decoded, _physical, shard_paths


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
