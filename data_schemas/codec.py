"""The tokens table's storage codec: small shards, the same logical columns for every reader.

Teacher top-K log-probs dominate the cache (K per token). On disk they are stored as
``teacher_topk_logprobs_q`` (list<int32>): fixed point ``q = round(-logprob / STEP)`` with
``STEP = 2**-9`` nats, delta-coded along the list (``d_0 = q_0``, ``d_i = q_i - q_(i-1)``). The
lists are sorted by descending probability, so the deltas are small non-negative integers; the
deltas are signed, so an unsorted list still round-trips (it only compresses worse).
Decoding is ``logprob_i = -STEP * sum(d_0..d_i)``, exact in float32.

Error bound: ``|decoded - original| <= STEP / 2 = 2**-10 ~ 9.77e-4`` nats for every top-K entry
(round to nearest on the fp32 input; STEP is a power of two, so the decoded value is exact). The
previous fp16 column was off by up to 2**-6 nats at log-probs around -20 (fp16's step grows with
magnitude). Every other column keeps its logical type and is lossless: the sampled-token
``teacher_logprob`` stays exact fp32.

Writer options (``parquet_options``), codec version 3 (the default): BYTE_STREAM_SPLIT for 32-bit
numbers (ids, deltas, fp32 scalars: it splits values into byte planes so zstd sees the low-entropy
high bytes together), no dictionary for them (a 152k-id dictionary costs 17-18 bits per id); fp16
plain without a dictionary (a dictionary of ~10^4 distinct halves costs more than the 2 bytes it
replaces; DuckDB cannot read BYTE_STREAM_SPLIT fp16); dictionary for strings, bools and small ints;
zstd level 17. Version 2 (shards written before) differs only in the writer options: fp16 with a
dictionary and zstd level 9. Parquet records its encodings in the file, so every reader reads both
versions the same way; the version is marked in each shard's footer (``META_CODEC``, absent = 2),
and ``parquet_options(schema, version=2)`` still writes the old layout (tests read both).

Readers never see the encoding: ``decode_table`` (pyarrow; ``stages.lib.store.read_table`` / ``stream``
call it) and ``DUCKDB_SELECT`` (the select list that the DuckDB ``tokens`` views use). Anyone else
reads a tokens folder with any Parquet reader and decodes it with ``decode`` (docs/DATA.md)::

    from data_schemas.codec import decode
    df = decode(pd.read_parquet("runs/demo/tokens"))          # pandas
    df = decode(pl.read_parquet("runs/demo/tokens/**/*.parquet"))  # polars
    t = decode(pyarrow.dataset.dataset("runs/demo/tokens", partitioning="hive").to_table())
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

STEP_BITS = 9
STEP = 2.0**-STEP_BITS  # nats per fixed-point unit
MAX_ABS_ERROR = STEP / 2  # the stated bound on the decoded top-K log-probs
CODEC_VERSION = 3  # what encode_table / parquet_options write by default
ZSTD_LEVEL = {2: 9, 3: 17}  # per codec version: 17 is ~6x the write CPU of 9 (~30 us/token)
META_CODEC = b"distillery.tokens_codec"  # footer key: the codec version (absent = 2)

LOGICAL = "teacher_topk_logprobs"  # list<float32> as readers see it
PHYSICAL = "teacher_topk_logprobs_q"  # list<int32> delta-coded fixed point, as stored

# DuckDB expression decoding PHYSICAL (prefix sums of the deltas; O(K^2) per row, K is small)
DUCKDB_DECODE = (
    f"list_transform(range(1, len({PHYSICAL}) + 1), "
    f"lambda i: (-list_sum({PHYSICAL}[1:i]) * {STEP!r})::FLOAT)"
)
# what a DuckDB view over tokens shards selects: every stored column, decoded
DUCKDB_SELECT = f"* EXCLUDE ({PHYSICAL}), {DUCKDB_DECODE} AS {LOGICAL}"


# ----------------------------------------------------------------------------- pure math
def encode_logprobs(values: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Flat log-probs [M] of lists with ``lengths`` [N] -> flat int32 deltas [M]."""
    q = np.rint(-values.astype(np.float64) / STEP).astype(np.int64)  # [M]
    d = np.empty_like(q)
    d[1:] = q[1:] - q[:-1]
    starts = np.cumsum(lengths)[:-1]  # first element of lists 1..N-1
    starts = starts[lengths[1:] > 0]
    d[starts] = q[starts]
    if len(q):
        d[0] = q[0]
    if len(d) and (d.max() > np.iinfo(np.int32).max or d.min() < np.iinfo(np.int32).min):
        raise ValueError("log-prob out of the codec's range (|logprob| > 4e6 nats)")
    return d.astype(np.int32)


def decode_logprobs(deltas: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Flat int32 deltas [M] of lists with ``lengths`` [N] -> flat float32 log-probs [M]."""
    c = np.cumsum(deltas.astype(np.int64))  # [M] running sum across list boundaries
    before = np.concatenate([[0], c])[np.cumsum(lengths) - lengths]  # [N] sum before each list
    q = c - np.repeat(before, lengths)  # [M] per-list prefix sums
    return (-q * STEP).astype(np.float32)


# ----------------------------------------------------------------------------- tables
def _list_parts(col: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray, pa.Array]:
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    lengths = pc.fill_null(pc.list_value_length(arr), 0).to_numpy().astype(np.int64)  # [N]
    values = pc.list_flatten(arr).to_numpy(zero_copy_only=False)  # [M]
    return values, lengths, arr


def _lists(values: pa.Array, lengths: np.ndarray, like: pa.Array) -> pa.Array:
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)  # [N + 1]
    mask = like.is_null() if like.null_count else None
    return pa.ListArray.from_arrays(pa.array(offsets), values, mask=mask)


def encode_table(table: pa.Table, version: int = CODEC_VERSION) -> pa.Table:
    """Logical tokens table -> the table as stored (LOGICAL replaced in place by PHYSICAL), its
    schema marked with the codec version (version 2 wrote no marker)."""
    if LOGICAL not in table.column_names:
        return table
    values, lengths, arr = _list_parts(table.column(LOGICAL))
    d = pa.array(encode_logprobs(values, lengths), pa.int32())
    i = table.column_names.index(LOGICAL)
    out = table.set_column(i, PHYSICAL, _lists(d, lengths, arr))
    if version >= 3:
        meta = {**(out.schema.metadata or {}), META_CODEC: str(version).encode()}
        out = out.replace_schema_metadata(meta)
    return out


def shard_version(metadata: dict | None) -> int:
    """The codec version of a stored shard from its footer's key-value metadata."""
    return int((metadata or {}).get(META_CODEC, b"2"))


def decode_table(table: pa.Table) -> pa.Table:
    """Stored tokens table -> logical (PHYSICAL replaced in place by LOGICAL); no-op without it."""
    if PHYSICAL not in table.column_names:
        return table
    values, lengths, arr = _list_parts(table.column(PHYSICAL))
    lp = pa.array(decode_logprobs(values, lengths), pa.float32())
    i = table.column_names.index(PHYSICAL)
    return table.set_column(i, LOGICAL, _lists(lp, lengths, arr))


def decode(data):
    """A tokens table read by any reader, with the top-K log-probs decoded: takes and returns a
    pyarrow Table, a pandas DataFrame or a polars DataFrame (a no-op without the coded column)."""
    if isinstance(data, pa.Table):
        return decode_table(data)
    module = type(data).__module__.split(".")[0]
    if module == "pandas":
        if PHYSICAL not in data.columns:
            return data
        return decode_table(pa.Table.from_pandas(data, preserve_index=False)).to_pandas()
    if module == "polars":
        import polars as pl  # only when the caller already uses polars

        return pl.from_arrow(decode_table(data.to_arrow()))
    raise TypeError(f"decode takes a pyarrow Table or a pandas/polars DataFrame, not {type(data)}")


def physical_columns(columns: list[str] | None) -> list[str] | None:
    """The stored columns to read for these logical ones (None = all)."""
    if columns is None:
        return None
    return [PHYSICAL if c == LOGICAL else c for c in columns]


def parquet_options(schema: pa.Schema, version: int = CODEC_VERSION) -> dict:
    """pyarrow ParquetWriter options for a stored tokens table (see the module docstring)."""
    split, dictionary = {}, []
    for f in schema:
        t = f.type.value_type if pa.types.is_list(f.type) else f.type
        path = f"{f.name}.list.element" if pa.types.is_list(f.type) else f.name
        # DuckDB reads BYTE_STREAM_SPLIT for 32/64-bit numbers only (not fp16)
        if (pa.types.is_floating(t) or pa.types.is_integer(t)) and t.bit_width >= 32:
            split[path] = "BYTE_STREAM_SPLIT"
        elif version >= 3 and pa.types.is_float16(t):
            pass  # plain: ~1.8 bytes per value after zstd, vs ~2.9 with a dictionary
        else:
            dictionary.append(f.name)  # strings, bools, uint8 (and fp16 in version 2)
    return {
        "compression_level": ZSTD_LEVEL[version],
        "use_dictionary": dictionary,
        "column_encoding": split,
    }
