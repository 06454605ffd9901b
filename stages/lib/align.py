"""Cross-tokenizer alignment: a teacher whose tokenizer differs from the student's.

Pure functions, no model loading. The score stage (not yet wired) uses them in this order:

1. ``text = tok_s.decode(student_ids)`` and ``char_offsets(tok_s, student_ids)``: the student's
   sampled ids stay the stored truth; each token gets its exact character span in that text.
2. ``reencode(tok_t, text)``: the teacher's ids for the same text, or None when the teacher's
   decode of them does not give the text back exactly (the caller counts and refuses the row).
3. ``char_offsets(tok_t, teacher_ids)`` and ``align_spans``: tokens merged into the smallest chunks
   whose character boundaries agree on both sides (GOLD's sequence alignment).
4. ``chunk_logprobs``: the teacher's (and, in the loss, the student's) log-prob of each chunk, the
   sum over its tokens; ``map_topk``: the teacher's top-K moved into student ids where the token
   strings are equal, the rest of the mass left to the tail; ``sorted_probs`` for ULD.

Spans come from **incremental decoding**: the boundary after token ``i`` is the length of
``decode(ids[:i+1])`` (its common prefix with the full text, kept monotone). Unlike a fast
tokenizer's offset mapping (which trims whitespace for byte-level BPE and is only defined for the
tokenizer's own encoding of a text), this works for any sampled id sequence, and the spans
partition the text exactly. A token after which the decoded prefix is not a prefix of the text (it
ends inside a multi-byte character) gets an empty span at its start, and the token that completes
the character carries the text, so no chunk boundary ever falls inside a character. Cost: one
decode of a bounded window per token (O(n), ``char_offsets``), the whole prefix only where a
window cannot decide; ``char_offsets_exact`` is the plain O(n²) rule, kept as the reference.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

Span = tuple[int, int]


# ----------------------------------------------------------------------------- decoding
def decode(tokenizer: Any, ids: Sequence[int]) -> str:
    """The text of ``ids`` exactly as the stages see it (no special tokens, no space clean-up)."""
    return tokenizer.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False)


WINDOW = 16  # tokens of left context per boundary decode (decoders look back a few tokens at most)


def _batch(tokenizer: Any, seqs: list[list[int]]) -> list[str]:
    return tokenizer.batch_decode(
        seqs, skip_special_tokens=True, clean_up_tokenization_spaces=False
    )


def char_offsets(tokenizer: Any, ids: Sequence[int], window: int = WINDOW) -> list[Span]:
    """Character span ``(start, end)`` of each token in ``decode(tokenizer, ids)``.

    The spans are contiguous and cover the text: ``spans[0][0] == 0``, ``spans[i][1] ==
    spans[i+1][0]``, ``spans[-1][1] == len(text)``. Special tokens (skipped by the decode) and
    tokens ending inside a character get an empty span at their start (module docstring).

    Cost O(n · window): token ``i``'s text is what it adds to the decode of the ``window - 1``
    tokens before it (both decodes start at the same token, so a decoder's start-of-sequence
    rule, e.g. a stripped leading space, cancels out), placed after token ``i - 1``'s end when
    that end was clean and the text there agrees. Otherwise (a window inside a character, a
    decoder that rewrites earlier text) the exact rule decides that boundary: the length of
    ``decode(ids[:i+1])`` when it is a prefix of the text (``char_offsets_exact``).
    """
    ids = list(ids)
    if not ids:
        return []
    text = decode(tokenizer, ids)
    n, window = len(ids), max(2, window)
    if n == 1:
        return [(0, len(text))]
    starts = [max(0, i + 1 - window) for i in range(n - 1)]  # window of boundary i: [a, i]
    cur = _batch(tokenizer, [ids[a : i + 1] for i, a in enumerate(starts)])
    prev = _batch(tokenizer, [ids[a:i] for i, a in enumerate(starts)])
    ends: list[int] = []
    last, clean = 0, True  # clean: ``last`` is the true end of the previous token
    for i, a in enumerate(starts):
        end = None
        if i > a and clean and "\ufffd" not in cur[i] and cur[i].startswith(prev[i]):
            piece = cur[i][len(prev[i]) :]
            end = last + len(piece) if text.startswith(piece, last) else None
        elif i == a:  # the first token: its window is the prefix itself
            end = len(cur[i]) if text.startswith(cur[i]) else None
        if end is None:  # the exact rule (O(i)), for this boundary only
            prefix = decode(tokenizer, ids[: i + 1])
            end = len(prefix) if text.startswith(prefix) else None
        # A clean boundary moves forward; otherwise (the token ends inside a character, or the
        # decoder rewrites a tail) it stays where it was: the token gets an empty span at its
        # start and is merged with what completes it.
        clean = end is not None and end >= last
        if end is not None:
            last = max(last, end)
        ends.append(last)
    ends.append(len(text))
    return list(zip([0, *ends[:-1]], ends, strict=True))


def char_offsets_exact(tokenizer: Any, ids: Sequence[int]) -> list[Span]:
    """``char_offsets`` by the O(n²) rule alone (one decode per prefix): the reference."""
    ids = list(ids)
    if not ids:
        return []
    text = decode(tokenizer, ids)
    if len(ids) == 1:  # (batch_decode of no sequences is not an empty list)
        return [(0, len(text))]
    ends, last = [], 0
    for prefix in _batch(tokenizer, [ids[: i + 1] for i in range(len(ids) - 1)]):
        if text.startswith(prefix):
            last = max(last, len(prefix))
        ends.append(last)
    ends.append(len(text))
    return list(zip([0, *ends[:-1]], ends, strict=True))


def reencode(tokenizer: Any, text: str) -> list[int] | None:
    """The teacher's ids for ``text``, or None when decoding them does not give ``text`` back."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    return ids if decode(tokenizer, ids) == text else None


def roundtrip_ok(tokenizer: Any, text: str) -> bool:
    """Does ``text`` survive encode -> decode by this tokenizer exactly (the refusal test)?"""
    return reencode(tokenizer, text) is not None


# ---------------------------------------------------------------------------- alignment
@dataclass(frozen=True)
class Chunks:
    """The alignment of two tokenizations of one text into chunks with agreeing boundaries."""

    spans: list[Span]  # per chunk: its character span in the text
    student_range: list[Span]  # per chunk: student tokens [a, b)
    teacher_range: list[Span]  # per chunk: teacher tokens [a, b)
    student_chunk: list[int]  # per student token: its chunk id (0-based, in text order)
    teacher_chunk: list[int]  # per teacher token: its chunk id


def _check_partition(offsets: Sequence[Span], side: str) -> int:
    pos = 0
    for i, (a, b) in enumerate(offsets):
        if a != pos or b < a:
            raise ValueError(
                f"{side} offsets are not contiguous at token {i}: {(a, b)} after {pos}"
            )
        pos = b
    return pos


def _chunk_of(offsets: Sequence[Span], cuts: list[int]) -> list[int]:
    """Chunk id per token: the chunk its span lies in (an empty span: the chunk starting there)."""
    out, j = [], 0
    last = max(len(cuts) - 2, 0)
    for a, _ in offsets:
        while j < last and cuts[j + 1] <= a:
            j += 1
        out.append(j)
    return out


def _ranges(chunk_ids: list[int], n_chunks: int) -> list[Span]:
    first = [-1] * n_chunks
    end = [0] * n_chunks
    for i, c in enumerate(chunk_ids):
        if first[c] < 0:
            first[c] = i
        end[c] = i + 1
    return list(zip(first, end, strict=True))


def align_spans(student_offsets: Sequence[Span], teacher_offsets: Sequence[Span]) -> Chunks:
    """Merge tokens into the smallest chunks whose character boundaries agree on both sides.

    A cut is a character position that ends a token on both sides (plus 0); chunks are the text
    between consecutive cuts. No token crosses a cut (its own side's tokens partition the text), so
    each chunk is a contiguous run of tokens on each side, and one-to-one spans give one-token
    chunks. Both offset lists must partition the same text (``char_offsets`` output).
    """
    n_s = _check_partition(student_offsets, "student")
    n_t = _check_partition(teacher_offsets, "teacher")
    if n_s != n_t:
        raise ValueError(f"the two sides cover different lengths: {n_s} vs {n_t} characters")
    if not student_offsets or not teacher_offsets or n_s == 0:
        raise ValueError("cannot align an empty text")
    ends_t = {b for _, b in teacher_offsets}
    cuts = [0] + sorted({b for _, b in student_offsets if b in ends_t and b > 0})
    spans = list(zip(cuts[:-1], cuts[1:], strict=True))
    s_chunk = _chunk_of(student_offsets, cuts)
    t_chunk = _chunk_of(teacher_offsets, cuts)
    return Chunks(
        spans=spans,
        student_range=_ranges(s_chunk, len(spans)),
        teacher_range=_ranges(t_chunk, len(spans)),
        student_chunk=s_chunk,
        teacher_chunk=t_chunk,
    )


def chunk_logprobs(token_logprobs: Tensor, chunks: Chunks, side: str = "teacher") -> Tensor:
    """Per-chunk log-prob [C]: the sum of the side's token log-probs [n] over each chunk."""
    if side not in ("teacher", "student"):
        raise ValueError(f"side must be 'teacher' or 'student', got {side!r}")
    index = chunks.teacher_chunk if side == "teacher" else chunks.student_chunk
    if len(index) != token_logprobs.shape[0]:
        raise ValueError(f"{len(index)} {side} tokens aligned, {token_logprobs.shape[0]} log-probs")
    idx = torch.as_tensor(index, dtype=torch.long, device=token_logprobs.device)  # [n]
    out = token_logprobs.new_zeros(len(chunks.spans))  # [C]
    return out.index_add(0, idx, token_logprobs)  # [C]


def per_student_token(chunk_values: Tensor, chunks: Chunks) -> Tensor:
    """Broadcast per-chunk values [C] onto the student's tokens [n_s] (the stored columns)."""
    idx = torch.as_tensor(chunks.student_chunk, dtype=torch.long, device=chunk_values.device)
    return chunk_values[idx]  # [n_s]


def teacher_rows(chunks: Chunks) -> list[int]:
    """Per student token, the teacher position whose distribution is comparable, or -1.

    At the first token of a chunk both models have read the same text, so the teacher's
    distribution at its chunk's first token and the student's are over the same continuation
    (the top-K columns are taken there). Inside a chunk the prefixes differ: -1 (nothing mapped).
    """
    return [
        chunks.teacher_range[c][0] if chunks.student_range[c][0] == i else -1
        for i, c in enumerate(chunks.student_chunk)
    ]


# --------------------------------------------------------------------------- vocabularies
def surface_strings(tokenizer: Any, after: int | None = None) -> list[str | None]:
    """Per id, the text the token stands for, by the tokenizer's own decoder, or None.

    ``after=None``: the token on its own, ``convert_tokens_to_string([token])``, which undoes each
    tokenizer's own encoding of the token string (byte-level ``Ġ`` -> space, ``##`` continuation).
    ``after=x`` (an ordinary token, ``context_id``): the text the token adds *after* ``x``,
    ``decode([x, j])`` minus ``decode([x])``. That is the string to compare inside a text: a
    word-level or SentencePiece token that decodes to ``the`` alone adds `` the`` after a word,
    as a byte-level ``Ġthe`` does, while ``##the`` or a byte-level ``the`` adds ``the``.
    The EOS, BOS, pad and unk tokens get a key for their role (NUL + ``"eos_token"``), so the stop
    action maps to the other side's. None (never mapped): other special tokens, tokens that are
    not whole characters (a partial UTF-8 byte decodes to U+FFFD), and strings two ids share (the
    mapping would be ambiguous).
    """
    n = len(tokenizer)
    special = set(tokenizer.all_special_ids)
    if after is None:
        tokens = tokenizer.convert_ids_to_tokens(list(range(n)))
        raw = [
            None if t is None or i in special else tokenizer.convert_tokens_to_string([t])
            for i, t in enumerate(tokens)
        ]
    else:
        head = decode(tokenizer, [after])
        pairs = _batch(tokenizer, [[after, j] for j in range(n)])
        raw = [
            None if i in special or not t.startswith(head) else t[len(head) :]
            for i, t in enumerate(pairs)
        ]
    out: list[str | None] = [None if not s or "\ufffd" in s else s for s in raw]
    seen: dict[str, int] = {}
    for s in out:
        if s is not None:
            seen[s] = seen.get(s, 0) + 1
    out = [s if s is not None and seen[s] == 1 else None for s in out]
    for role in ("eos_token", "bos_token", "pad_token", "unk_token"):
        i = getattr(tokenizer, f"{role}_id", None)
        if i is not None and 0 <= i < n and out[i] is None and i in special:
            out[i] = f"\x00{role}"  # matched by role (EOS to EOS), never by text
    return out


def context_id(tokenizer: Any) -> int | None:
    """An ordinary token to read other tokens after: the first id that decodes, on its own and
    after itself, to letters only (a whole word or word-start, not a continuation piece)."""
    special = set(tokenizer.all_special_ids)
    for i in range(len(tokenizer)):
        if i in special:
            continue
        one = decode(tokenizer, [i])
        if one.isalpha() and decode(tokenizer, [i, i]).startswith(one):
            return i
    return None


def vocab_table(
    teacher_vocab: Sequence[str | None], student_vocab: Sequence[str | None] | Mapping[str, int]
) -> Tensor:
    """Teacher id -> student id with the same string, -1 where none [V_T] int64."""
    if not isinstance(student_vocab, Mapping):
        student_vocab = {s: i for i, s in enumerate(student_vocab) if s is not None}
    table = [student_vocab.get(s, -1) if s is not None else -1 for s in teacher_vocab]
    return torch.tensor(table, dtype=torch.long)  # [V_T]


def map_topk_table(ids: Tensor, logprobs: Tensor, table: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``map_topk`` with a precomputed ``vocab_table`` (one lookup per entry)."""
    table = table.to(ids.device)
    valid_in = (ids >= 0) & (ids < table.shape[0])  # [N, K] padding ids (-1) stay unmapped
    mapped = torch.where(valid_in, table[ids.clamp(0, table.shape[0] - 1)], -1)  # [N, K]
    ok = mapped >= 0  # [N, K]
    lp = torch.where(ok, logprobs.float(), float("-inf"))  # [N, K]
    return mapped, lp, torch.logsumexp(lp, dim=-1)  # [N, K], [N, K], [N]


def map_topk(
    teacher_topk_ids: Tensor,
    teacher_topk_logprobs: Tensor,
    teacher_vocab: Sequence[str | None],
    student_vocab: Sequence[str | None] | Mapping[str, int],
) -> tuple[Tensor, Tensor, Tensor]:
    """The teacher's top-K [N, K] in student ids: (ids, log-probs, log of the mapped mass [N]).

    Vocabularies are ``surface_strings`` lists (or, for the student, string -> id). An entry whose
    string has no student id gets id -1 and log-prob -inf; its mass (with the mass beyond the
    teacher's K) is the tail bucket of ``mapped_topk_fkl``. Distinct teacher strings map to
    distinct student ids, so the mapped ids of a row never repeat.
    """
    table = vocab_table(teacher_vocab, student_vocab)  # [V_T]
    return map_topk_table(teacher_topk_ids, teacher_topk_logprobs, table)


def sorted_probs(topk_logprobs: Tensor) -> Tensor:
    """Probabilities sorted in decreasing order [N, K] (ULD's teacher column; no ids needed)."""
    p = torch.nan_to_num(topk_logprobs.float(), nan=float("-inf")).exp()  # [N, K]
    return p.sort(dim=-1, descending=True).values  # [N, K]
