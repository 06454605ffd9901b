"""The trainer's streaming loader: selected shards -> packed, padded micro-batches, resumably.

Reads ``run_dir/selected/<name>/`` row group by row group (``store.stream``: row groups strided by
rank, a seeded shuffle per epoch; ``shuffle_order`` turns ``train.shuffle`` into its arguments),
converts each row group to per-sequence numpy arrays in a
background thread (a bounded queue of ``prefetch`` row groups; pyarrow releases the GIL), and packs
sequences greedily, in stream order, into micro-batches whose *padded* size
``n_seqs * max(prompt + response length)`` stays under ``micro_batch_tokens`` (a sequence longer
than the budget gets a micro-batch of its own). The whole dataset is never in memory.

Row order (``train.shuffle``): ``prompts`` (the default) shuffles the row groups and, inside each,
the blocks of rows with the same train prompt (the ``rollout.n`` samples of a prompt), keeping a
prompt's rows adjacent so they share micro-batches and ``train.share_prefix`` runs the prompt once
for them; ``rows`` (also ``true``) shuffles single rows inside each row group, which scatters a
prompt's samples over micro-batches; ``false`` reads the storage order.

Position (saved in checkpoints): ``{"store": <stream state before the row group being consumed>,
"skip": <rows of it already packed>, "order": [shuffle_seed, group_by]}``. Checkpoints are taken
at step boundaries, so a resumed loader yields exactly the micro-batches an uninterrupted run
would have; a resume under another row order is refused (it would train other batches).

Validation: every row group is checked as it is read (``check_row_group``), like the select stage
checks what it writes: finite log-probs (<= 0 up to rounding), weights in ``[0, max_weight]``,
ids inside the vocabulary, per-token and top-K list lengths consistent. A bad value is one
UserError naming the shard, row group, sample, column and token; nothing is trained on it.

Equal steps on every rank (DDP/FSDP collectives would hang otherwise): ``plan_steps`` replays the
packing on the two length columns only (``response_len``, ``train_prompt_ids``) for every rank
before training, and every rank runs ``min_r(micro_batches_r // grad_accum)`` steps. The ragged
tail (at most ``grad_accum`` - 1 micro-batches per rank, plus a rank's surplus over the smallest
rank) is dropped: it is reported, never silently mixed into a partial step.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from data_schemas import selected as selected_table
from data_schemas.common import LOGPROB_TOL
from stages.lib import integrity, store
from stages.lib.errors import UserError

# Columns the trainer reads (sample_id/prompt_id identify sequences for the online teacher).
LIST_COLUMNS = (
    "train_prompt_ids",
    "response_ids",
    "weights",
    "segments",
    "teacher_logprob",
    "behavior_logprob",
    "ref_logprob",
    "teacher_topk_ids",
    "teacher_topk_logprobs",
    "teacher_topk_logmass",
    "behavior_topk_ids",
    "teacher_logprobs_on_behavior_topk",
)
SCALAR_COLUMNS = ("sample_id", "topk_k", "behavior_topk_k")
COLUMNS = list(SCALAR_COLUMNS + LIST_COLUMNS)
# Cross-tokenizer columns (selected.XTOK_FIELDS): read when the selection has them.
XTOK_COLUMNS = tuple(f.name for f in selected_table.XTOK_FIELDS)


def columns_of(directory: Path, m: dict) -> list[str]:
    """COLUMNS, plus the cross-tokenizer ones when the selection's shards hold them."""
    paths = store.shard_paths(directory, m)
    if not paths:
        return COLUMNS
    have = set(store.open_shard(paths[0]).schema_arrow.names)  # streamed on object storage
    return COLUMNS + [c for c in XTOK_COLUMNS if c in have]


Seq = dict  # one sequence: column name -> numpy array (lists) or scalar; None for null lists

# The column whose equal values (one train prompt) move as one block under train.shuffle=prompts:
# the key train.share_prefix groups rows by, so a block is exactly what it can share.
PROMPT_KEY = "train_prompt_ids"


def shuffle_order(shuffle: bool | str, seed: int) -> dict:
    """``train.shuffle`` (prompts | rows | true = rows | false) as ``store.stream``'s
    ``shuffle_seed`` and ``group_by`` arguments."""
    if shuffle is False:
        return {"shuffle_seed": None, "group_by": None}
    return {"shuffle_seed": seed, "group_by": PROMPT_KEY if shuffle == "prompts" else None}


# ----------------------------------------------------------------------------- packing rule
def fits(n: int, max_len: int, new_len: int, budget: int) -> bool:
    """Can a sequence of ``new_len`` join ``n`` sequences padded to ``max_len`` under ``budget``?"""
    return n == 0 or (n + 1) * max(max_len, new_len) <= budget


def count_micro_batches(lengths: Iterator[int], budget: int) -> int:
    """Micro-batches the greedy packer makes from a stream of sequence lengths."""
    count, n, max_len = 0, 0, 0
    for ln in lengths:
        if not fits(n, max_len, ln, budget):
            count, n, max_len = count + 1, 0, 0
        n, max_len = n + 1, max(max_len, ln)
    return count + (n > 0)


def _rank_lengths(
    directory: Path,
    m: dict,
    rank: int,
    world_size: int,
    epochs: int,
    seed: int | None,
    group_by: str | None = None,
) -> Iterator[int]:
    cols = ["train_prompt_ids", "response_len"]
    for tbl, _ in store.stream(
        directory,
        m,
        rank=rank,
        world_size=world_size,
        epochs=epochs,
        shuffle_seed=seed,
        columns=cols,
        group_by=group_by,
    ):
        import pyarrow.compute as pc

        p = pc.list_value_length(tbl["train_prompt_ids"]).to_numpy(zero_copy_only=False)
        yield from (p + tbl["response_len"].to_numpy()).tolist()


@dataclass
class StepPlan:
    """How many optimizer steps every rank runs, and what is dropped to keep ranks in step."""

    steps: int
    micro_per_rank: list[int]
    dropped_micro_batches: int  # summed over ranks


def plan_steps(
    directory: Path,
    m: dict,
    *,
    world_size: int,
    epochs: int,
    shuffle_seed: int | None,
    budget: int,
    grad_accum: int,
    max_steps: int | None,
    group_by: str | None = None,
) -> StepPlan:
    """Replay the packing for every rank (lengths only) and fix the common number of steps."""
    micro = [
        count_micro_batches(
            _rank_lengths(directory, m, r, world_size, epochs, shuffle_seed, group_by), budget
        )
        for r in range(world_size)
    ]
    steps = min(micro) // grad_accum
    if max_steps is not None:
        steps = min(steps, max_steps)
    return StepPlan(steps, micro, sum(micro) - steps * grad_accum * world_size)


# ----------------------------------------------------------------------------- row groups
def _list_values(arr: pa.Array) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(offsets [R+1], flat values, valid [R]) of a list column chunk."""
    arr = arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr
    offsets = arr.offsets.to_numpy()
    values = arr.values.to_numpy(zero_copy_only=False)
    valid = ~arr.is_null().to_numpy(zero_copy_only=False)
    return offsets, values, valid


def table_to_seqs(tbl: pa.Table) -> list[Seq]:
    """Per-sequence numpy views of a row group (no per-element Python objects)."""
    n = tbl.num_rows
    seqs: list[Seq] = [{} for _ in range(n)]
    for c in SCALAR_COLUMNS:
        vals = tbl[c].to_pylist()
        for i in range(n):
            seqs[i][c] = vals[i]
    for c in LIST_COLUMNS + tuple(c for c in XTOK_COLUMNS if c in tbl.column_names):
        # a sliced list array's offsets index its parent's values, which .values returns whole:
        # use them as they are (subtracting offsets[0] read the wrong elements of a slice)
        offsets, values, valid = _list_values(tbl[c])
        for i in range(n):
            seqs[i][c] = values[offsets[i] : offsets[i + 1]] if valid[i] else None
    return seqs


def seq_len(s: Seq) -> int:
    return len(s["train_prompt_ids"]) + len(s["response_ids"])


# ----------------------------------------------------------------------------- validation
# Float list columns holding log-probs (finite, <= LOGPROB_TOL) and id columns (0 <= id < V).
LOGPROB_COLUMNS = selected_table.SPEC.logprob_cols  # the contract's list, checked here too
ID_COLUMNS = ("train_prompt_ids", "response_ids", "teacher_topk_ids", "behavior_topk_ids")
PER_TOKEN = ("weights", "segments", "teacher_logprob", "behavior_logprob", "teacher_topk_logmass")


def _first_bad(tbl: pa.Table, col: str, bad: np.ndarray, offsets: np.ndarray, vals) -> str:
    """'sample s, token t: value' of the first True in ``bad`` (flat list values)."""
    i = int(bad.argmax())
    row = int(np.searchsorted(offsets, i, side="right") - 1)
    sid = tbl["sample_id"][row].as_py()
    return f"sample {sid!r}, element {i - int(offsets[row])}: {vals[i].item()!r}"


def _check_lengths(tbl: pa.Table) -> str | None:
    """Per-token lists of length T, top-K lists of T*K (T*Kb): else what is wrong."""
    import pyarrow.compute as pc

    n = lambda c: pc.fill_null(pc.list_value_length(tbl[c]), -1).to_numpy()  # noqa: E731
    t = n("response_ids")
    wants = {c: t for c in PER_TOKEN + ("ref_logprob",)}
    tk = t * tbl["topk_k"].to_numpy()
    wants.update(teacher_topk_ids=tk, teacher_topk_logprobs=tk)
    tkb = t * tbl["behavior_topk_k"].to_numpy()
    wants.update(behavior_topk_ids=tkb, teacher_logprobs_on_behavior_topk=tkb)
    for c in XTOK_COLUMNS:  # cross-tokenizer selections: [T] each, the sorted probs [T*K]
        if c in tbl.column_names:
            wants[c] = tk if c == "xtok_sorted_probs" else t
    for c, want in wants.items():
        have = n(c)
        bad = (have != want) & (have >= 0)  # null optional lists are fine
        if bad.any():
            r = int(bad.argmax())
            return (
                f"sample {tbl['sample_id'][r].as_py()!r}: column {c} has {have[r]} values, "
                f"expected {want[r]}"
            )
    return None


def check_row_group(tbl: pa.Table, vocab_size: int | None, max_weight: float) -> str | None:
    """The first problem of a row group the trainer is about to read, or None (vectorised)."""
    if (msg := _check_lengths(tbl)) is not None:
        return msg
    xtok_lp = ("xtok_chunk_logprob",) if "xtok_chunk_logprob" in tbl.column_names else ()
    for col in ("weights",) + LOGPROB_COLUMNS + xtok_lp + ID_COLUMNS:
        offsets, vals, valid = _list_values(tbl[col])
        if not valid.any() or len(vals) == 0:
            continue
        if col in ID_COLUMNS:
            if vocab_size is None:
                continue
            bad, why = (
                (vals < 0) | (vals >= vocab_size),
                f"outside the vocabulary [0, {vocab_size})",
            )
        elif col == "weights":
            v = vals.astype(np.float64)
            bad = ~np.isfinite(v) | (v < 0) | (v > max_weight)
            why = f"not a weight in [0, train.max_weight={max_weight:g}]"
        else:
            v = vals.astype(np.float64)
            bad, why = ~np.isfinite(v) | (v > LOGPROB_TOL), "not a finite log-prob <= 0"
        # only this table's values (a sliced list array's .values is its parent's, whole)
        bad[: offsets[0]] = False
        bad[offsets[-1] :] = False
        if bad.any():
            return f"column {col}, {_first_bad(tbl, col, bad, offsets, vals)} is {why}"
    return integrity.topk_order_problem(tbl)  # after the values: NaN/inf named as such


# ----------------------------------------------------------------------------- the stream
_END = object()


@dataclass
class MicroBatchStream:
    """Yields packed micro-batches (lists of sequences) for one rank; ``position()`` resumes it."""

    directory: Path
    manifest: dict
    budget: int
    rank: int = 0
    world_size: int = 1
    epochs: int = 1
    shuffle_seed: int | None = None
    group_by: str | None = None  # with shuffle_seed: rows equal in this column stay adjacent
    prefetch: int = 2
    start: dict | None = None  # a ``position()`` from a checkpoint
    vocab_size: int | None = None  # ids must be < vocab_size (None: not checked)
    max_weight: float = float("inf")  # token weights must lie in [0, max_weight]
    _rows: list[Seq] = field(default_factory=list)
    _i: int = 0
    _rg_state: dict = field(default_factory=lambda: {"epoch": 0, "index": 0})
    _done: bool = False

    def __post_init__(self) -> None:
        start = self.start or {"store": {"epoch": 0, "index": 0}, "skip": 0}
        self._check_order(start)
        self._next_state = dict(start["store"])
        self._skip = int(start["skip"])
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, self.prefetch))
        self._stop = threading.Event()
        self._columns = columns_of(self.directory, self.manifest)
        self._check_unique()
        self._thread = threading.Thread(target=self._produce, name="selected-prefetch", daemon=True)
        self._thread.start()

    def _check_order(self, start: dict) -> None:
        """A position saved under another row order resumes into other batches: refuse it
        (positions saved before the order was recorded carry none and are taken as they are)."""
        saved = start.get("order")
        if saved is None or list(saved) == [self.shuffle_seed, self.group_by]:
            return
        raise UserError(
            f"the checkpoint's loader read the selection in another order (seed, grouping "
            f"{saved}; now {[self.shuffle_seed, self.group_by]}): resuming would train other "
            "batches than the run it continues",
            str(self.directory),
            "resume with the train.shuffle and seed the run started with, or train.resume=false",
        )

    def _check_unique(self) -> None:
        """One row per sample across the selection's shards (a sample trained twice per epoch
        would weigh double): read the sample_id column of every shard once."""
        paths = store.shard_paths(self.directory, self.manifest)
        ids = [store.open_shard(p).read(columns=["sample_id"])["sample_id"] for p in paths]
        dup = integrity.duplicate_sample_id([c for col in ids for c in col.chunks])
        if dup is not None:
            raise UserError(
                f"sample_id {dup[0]!r} appears {dup[1]} times in the selection (a sample in two "
                "shards, or copied rows)",
                str(self.directory),
                "re-run the select stage with overwrite=true (and rollout/score if they repeat it)",
            )

    # background thread: read + convert row groups, hand them over with the state *before* them
    def _produce(self) -> None:
        try:
            before = dict(self._next_state)
            for tbl, after in store.stream(
                self.directory,
                self.manifest,
                rank=self.rank,
                world_size=self.world_size,
                state=self._next_state,
                epochs=self.epochs,
                shuffle_seed=self.shuffle_seed,
                columns=self._columns,
                group_by=self.group_by,
            ):
                self._check(tbl, before)
                if not self._put((table_to_seqs(tbl), before)):
                    return
                before = after
            self._put(_END)
        except BaseException as e:  # surfaced in the consumer thread
            self._put(e)

    def _check(self, tbl: pa.Table, before: dict) -> None:
        problem = check_row_group(tbl, self.vocab_size, self.max_weight)
        if problem is None:
            return
        units = store.rank_units(
            store.row_group_units(self.directory, self.manifest),
            rank=self.rank,
            world_size=self.world_size,
            epoch=before["epoch"],
            shuffle_seed=self.shuffle_seed,
        )
        shard, group, _ = units[before["index"]]
        where = f"{self.directory}/{self.manifest['shards'][shard]['path']} row group {group}"
        raise UserError(
            f"bad value in the selection: {problem}",
            where,
            "re-run the select stage (and score, if the teacher columns are wrong) on intact data",
        )

    def _put(self, item: object) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _peek(self) -> Seq | None:
        while self._i >= len(self._rows):
            if self._done:
                return None
            item = self._queue.get()
            if item is _END:
                self._done = True
                return None
            if isinstance(item, BaseException):
                raise item
            self._rows, self._rg_state = item
            self._i, self._skip = self._skip, 0  # resume inside the first row group
        return self._rows[self._i]

    def next_micro_batch(self) -> list[Seq] | None:
        """The next packed micro-batch, or None when the data is exhausted."""
        out: list[Seq] = []
        max_len = 0
        while (s := self._peek()) is not None:
            ln = seq_len(s)
            if not fits(len(out), max_len, ln, self.budget):
                break
            out.append(s)
            max_len = max(max_len, ln)
            self._i += 1
        return out or None

    def position(self) -> dict:
        """Where the next micro-batch starts (call at a step boundary)."""
        return {
            "store": dict(self._rg_state),
            "skip": self._i,
            "order": [self.shuffle_seed, self.group_by],
        }

    def close(self) -> None:
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._queue.get_nowait()
            except queue.Empty:
                self._thread.join(timeout=0.05)


# ----------------------------------------------------------------------------- collation
@dataclass
class MicroBatch:
    """One padded micro-batch: model inputs plus the per-response-token loss batch."""

    input_ids: torch.Tensor  # [B, L] right-padded
    attention_mask: torch.Tensor  # [B, L]
    positions: torch.Tensor  # [M] flat indices into [B*L] of the positions predicting responses
    batch: dict[str, torch.Tensor]  # per response token, [M] or [M, K]
    prefix_ids: list[list[int]]  # for the online teacher
    response_ids: list[list[int]]
    sample_ids: list[str]
    n_tokens: int  # response tokens (M)
    n_kept: int  # tokens with weight > 0

    def to(self, device: torch.device) -> MicroBatch:
        def move(t: torch.Tensor) -> torch.Tensor:
            if device.type == "cuda":  # pinned host memory makes the copy asynchronous
                return t.pin_memory().to(device, non_blocking=True)
            return t

        self.input_ids = move(self.input_ids)
        self.attention_mask = move(self.attention_mask)
        self.positions = move(self.positions)
        self.batch = {k: move(v) for k, v in self.batch.items()}
        return self


def _cat(seqs: list[Seq], col: str, dtype: np.dtype) -> np.ndarray:
    return np.concatenate([np.asarray(s[col], dtype=dtype) for s in seqs])


def collate(seqs: list[Seq], pad_id: int, where: str = "selected") -> MicroBatch:
    """Pad ``train_prompt_ids + response_ids`` rows and concatenate the per-token columns."""
    from stages.lib.logprobs import response_positions

    p_lens = [len(s["train_prompt_ids"]) for s in seqs]
    r_lens = [len(s["response_ids"]) for s in seqs]
    if min(p_lens) < 1:
        raise UserError(
            "a selected sequence has an empty train prompt: nothing predicts its first token",
            where,
            "re-run rollout/select; every prompt needs at least one token (e.g. BOS)",
        )
    width = max(p + r for p, r in zip(p_lens, r_lens))
    ids = np.full((len(seqs), width), pad_id, dtype=np.int64)  # [B, L]
    mask = np.zeros((len(seqs), width), dtype=np.int64)  # [B, L]
    for b, s in enumerate(seqs):
        row = np.concatenate([s["train_prompt_ids"], s["response_ids"]])
        ids[b, : len(row)] = row
        mask[b, : len(row)] = 1
    ks = {s["topk_k"] for s in seqs}
    if len(ks) != 1:
        raise UserError(f"mixed top-K sizes {sorted(ks)} in one selection", where, "re-run select")
    k = ks.pop()
    m = sum(r_lens)  # response tokens in the micro-batch (K may be 0: SFT data has no teacher)
    batch = {
        "token_id": torch.from_numpy(_cat(seqs, "response_ids", np.int64)),  # [M]
        "weight": torch.from_numpy(_cat(seqs, "weights", np.float32)),  # [M]
        "segment": torch.from_numpy(_cat(seqs, "segments", np.uint8)),  # [M]
        "teacher_logprob": torch.from_numpy(_cat(seqs, "teacher_logprob", np.float32)),
        "behavior_logprob": torch.from_numpy(_cat(seqs, "behavior_logprob", np.float32)),
        "teacher_topk_ids": torch.from_numpy(
            _cat(seqs, "teacher_topk_ids", np.int64).reshape(m, k)
        ),  # [M, K]
        "teacher_topk_logprobs": torch.from_numpy(
            _cat(seqs, "teacher_topk_logprobs", np.float32).reshape(m, k)
        ),  # [M, K]
        "teacher_topk_logmass": torch.from_numpy(_cat(seqs, "teacher_topk_logmass", np.float32)),
    }
    # Optional columns enter the batch only when every sequence has them: a loss that needs a
    # missing one fails loudly instead of reading zeros.
    if all(s["ref_logprob"] is not None for s in seqs):
        batch["ref_logprob"] = torch.from_numpy(_cat(seqs, "ref_logprob", np.float32))
    kb = {s["behavior_topk_k"] for s in seqs}
    if (
        len(kb) == 1
        and (kb_ := kb.pop()) > 0
        and all(s["behavior_topk_ids"] is not None for s in seqs)
    ):
        batch["behavior_topk_ids"] = torch.from_numpy(
            _cat(seqs, "behavior_topk_ids", np.int64).reshape(-1, kb_)
        )  # [M, Kb]
        batch["teacher_logprobs_on_behavior_topk"] = torch.from_numpy(
            _cat(seqs, "teacher_logprobs_on_behavior_topk", np.float32).reshape(-1, kb_)
        )  # [M, Kb]
    if all(s.get("xtok_chunk") is not None for s in seqs):
        batch.update(xtok_batch(seqs, batch, k))
    pos = response_positions(p_lens, r_lens, width)  # [M]
    return MicroBatch(
        input_ids=torch.from_numpy(ids),
        attention_mask=torch.from_numpy(mask),
        positions=pos,
        batch=batch,
        prefix_ids=[s["train_prompt_ids"].tolist() for s in seqs],
        response_ids=[s["response_ids"].tolist() for s in seqs],
        sample_ids=[s["sample_id"] for s in seqs],
        n_tokens=int(sum(r_lens)),
        n_kept=int((batch["weight"] > 0).sum()),
    )


def xtok_batch(seqs: list[Seq], batch: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """The cross-tokenizer loss inputs (stages/lib/losses/xtok.py: chunk_opd, mapped_topk_fkl, uld).

    ``chunk_index`` [M]: the aligned chunk ids made unique across the micro-batch (a token the
    teacher did not score, chunk < 0, is a chunk of its own; its weight is 0 anyway);
    ``teacher_mapped_ids`` [M, K]: the top-K ids with -1 past each token's ``xtok_mapped_k`` (the
    filler entries), next to ``teacher_topk_logprobs`` as ``teacher_mapped_logprobs``.
    """
    parts, base = [], 0
    for s in seqs:
        c = np.asarray(s["xtok_chunk"], np.int64)  # [T]
        solo = c < 0
        c = np.where(solo, c.max(initial=-1) + 1 + np.cumsum(solo), c)  # [T] own chunks
        parts.append(c + base)
        base += int(c.max(initial=-1)) + 1
    mapped_k = torch.from_numpy(_cat(seqs, "xtok_mapped_k", np.int64))  # [M]
    ids = batch["teacher_topk_ids"]  # [M, K]
    slots = torch.arange(k)[None, :]  # [1, K]
    return {
        "chunk_index": torch.from_numpy(np.concatenate(parts)),  # [M]
        "teacher_chunk_logprob": torch.from_numpy(_cat(seqs, "xtok_chunk_logprob", np.float32)),
        "teacher_mapped_ids": torch.where(slots < mapped_k[:, None], ids, -1),  # [M, K]
        "teacher_mapped_logprobs": batch["teacher_topk_logprobs"],  # [M, K]
        "teacher_sorted_probs": torch.from_numpy(
            _cat(seqs, "xtok_sorted_probs", np.float32).reshape(-1, k)
        ),  # [M, K]
    }
