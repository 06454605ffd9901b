"""Cross-tokenizer alignment: a teacher whose tokenizer differs from the student's.

Pure functions, no model loading. Everything works on **bytes**, never on decoded text: a decode
turns a token that is part of a UTF-8 character (a byte-level BPE byte, a SentencePiece
``<0xNN>`` byte-fallback token) into U+FFFD, and U+FFFD then "matches" U+FFFD.

1. ``byte_map(tok)``: each id's exact bytes, from the tokenizer's own byte mapping: byte-level BPE
   through the inverse of GPT-2's ``bytes_to_unicode`` table, SentencePiece through ``▁`` = space
   and ``<0xNN>`` = the byte NN, and for tokenizers without a byte alphabet (word-level, WordPiece,
   Unigram without byte fallback: every token is whole text) from the decoder, read once per
   vocabulary entry. Two forms per id: ``start`` (the token as a response's first token: a
   decoder that strips a leading space, SentencePiece's or a word-joining one, strips it) and
   ``mid`` (what it adds after another token).
2. ``byte_spans(bm, ids)``: the student's sampled ids as they are -> the response's bytes and each
   token's byte span (contiguous, covering the bytes).
3. ``encode_bytes(tok, bm, data)``: another tokenizer's ids for exactly these bytes (valid UTF-8
   runs through its encoder, special-token strings split as text; each byte that is not part of
   valid UTF-8 as its single-byte token), or None when its ids' bytes are not exactly ``data``.
4. ``align_spans``: tokens merged into the smallest chunks whose byte boundaries agree on both
   sides (GOLD's sequence alignment); ``chunk_logprobs``; ``map_topk`` by equal bytes.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

Span = tuple[int, int]
Key = bytes | tuple[str, str]  # bytes, ("role", "eos_token"), ("special", ...), ("byte", "50")
ROLES = ("eos_token", "bos_token", "pad_token", "unk_token")


# ----------------------------------------------------------------------------- byte maps
@functools.cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (byte-level BPE token strings use it)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    bs += range(ord("®"), ord("ÿ") + 1)
    cs, n = list(bs), 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


@dataclass(frozen=True)
class ByteMap:
    """One tokenizer's bytes per id (None: a special token, or no exact bytes)."""

    kind: str  # byte_level | sentencepiece | text
    start: list[bytes | None]  # [V] the token as a response's first token
    mid: list[bytes | None]  # [V] the bytes it adds after another token
    byte_ids: dict[int, int]  # byte value -> the id spelling that one byte (byte alphabets only)

    def spans(self, ids: Sequence[int]) -> tuple[bytes, list[Span]] | None:
        """The bytes of ``ids`` (a response: the first in ``start`` form) and each token's byte
        span; None when an id has no bytes (a special token)."""
        parts = [self.start[ids[0]] if k == 0 else self.mid[i] for k, i in enumerate(ids)]
        if any(p is None for p in parts):
            return None
        out, pos = [], 0
        for p in parts:
            out.append((pos, pos + len(p)))
            pos += len(p)
        return b"".join(parts), out

    def bytes_of(self, ids: Sequence[int], at_start: bool) -> bytes | None:
        parts = [self.start[i] if at_start and k == 0 else self.mid[i] for k, i in enumerate(ids)]
        return None if any(p is None for p in parts) else b"".join(parts)


def _decoder_types(tok: Any) -> tuple[set[str], dict]:
    """The decoder's component types (a Sequence's parts too) and the model's JSON."""
    try:
        spec = json.loads(tok.backend_tokenizer.to_str())
    except (AttributeError, ValueError):
        return set(), {}
    types, stack = set(), [spec.get("decoder") or {}]
    while stack:
        d = stack.pop()
        types.add(d.get("type"))
        if d.get("type") == "Replace" and (d.get("pattern") or {}).get("String") == "▁":
            types.add("Metaspace")
        stack.extend(d.get("decoders") or [])
    return types, spec.get("model") or {}


def _decode(tok: Any, ids: list[int]) -> str:
    return tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def special_ids(tok: Any) -> set[int]:
    """The ids of special tokens: the named ones and every added token marked special (a
    tokenizer trained with ``<|im_end|>`` as a special token need not name it)."""
    added = getattr(tok, "added_tokens_decoder", {}) or {}
    return set(tok.all_special_ids) | {i for i, t in added.items() if t.special}


def byte_map(tok: Any) -> ByteMap:
    """Each id's exact bytes by the tokenizer's own byte mapping (module docstring)."""
    n = len(tok)
    special = special_ids(tok)
    added = {i: t.content for i, t in tok.added_tokens_decoder.items() if i not in special}
    tokens = tok.convert_ids_to_tokens(list(range(n)))
    types, model = _decoder_types(tok)
    byte_ids: dict[int, int] = {}
    if "ByteLevel" in types:
        inv = {c: b for b, c in bytes_to_unicode().items()}
        mid: list[bytes | None] = []
        for i, t in enumerate(tokens):
            if i in special or t is None:
                mid.append(None)
            elif i in added:
                mid.append(added[i].encode())
            else:
                mid.append(bytes(inv[c] for c in t) if all(c in inv for c in t) else None)
        vocab = tok.get_vocab()
        byte_ids = {b: vocab[c] for b, c in bytes_to_unicode().items() if c in vocab}
        return ByteMap("byte_level", list(mid), mid, byte_ids)
    if "Metaspace" in types:
        fallback = "ByteFallback" in types or bool(model.get("byte_fallback"))
        mid = []
        for i, t in enumerate(tokens):
            if i in special or t is None:
                mid.append(None)
            elif i in added:
                mid.append(added[i].encode())
            elif fallback and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", t):
                byte_ids[int(t[3:5], 16)] = i
                mid.append(bytes([int(t[3:5], 16)]))
            else:
                mid.append(t.replace("▁", " ").encode())
        # does the decoder strip the leading space of a sequence's first token?
        probe = next(
            (i for i, t in enumerate(tokens) if i not in special and t and t[0] == "▁" and
             len(t) > 1 and i not in added), None,
        )  # fmt: skip
        strip = probe is not None and not _decode(tok, [probe]).startswith(" ")
        start = [m[1:] if strip and m is not None and m[:1] == b" " else m for m in mid]
        return ByteMap("sentencepiece", start, mid, byte_ids)
    # no byte alphabet: every token is whole text, read from the decoder once per entry
    ctx = _context_id(tok, special)
    alone = tok.batch_decode(
        [[i] for i in range(n)], skip_special_tokens=False, clean_up_tokenization_spaces=False
    )
    start = [None if i in special or "\ufffd" in s else s.encode() for i, s in enumerate(alone)]
    if ctx is None:
        return ByteMap("text", start, list(start), {})
    head = alone[ctx]
    pairs = tok.batch_decode(
        [[ctx, i] for i in range(n)], skip_special_tokens=False, clean_up_tokenization_spaces=False
    )
    mid = [
        None if i in special or "\ufffd" in s or not s.startswith(head) else s[len(head) :].encode()
        for i, s in enumerate(pairs)
    ]
    return ByteMap("text", start, mid, {})


def _context_id(tok: Any, special: set[int]) -> int | None:
    """An ordinary token to read other tokens after: the first id that decodes, on its own and
    after itself, to letters only (a whole word or word-start, not a continuation piece)."""
    for i in range(len(tok)):
        if i in special:
            continue
        one = _decode(tok, [i])
        if one.isalpha() and _decode(tok, [i, i]).startswith(one):
            return i
    return None


_ESCAPED = re.compile("([\udc80-\udcff])")  # bytes that are not valid UTF-8 (surrogateescape)


def _encode_text(tok: Any, text: str) -> list[int]:
    """The tokenizer's own ids for ``text``; a special token's string is text, not that token."""
    return list(tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])


def _encode_piece(tok: Any, bm: ByteMap, text: str, at_start: bool) -> list[int] | None:
    """Ids whose bytes are exactly ``text``'s, trying the encoder's output and, for an encoder
    that prepends a space marker to every text it encodes (SentencePiece's dummy prefix), the
    same without it."""
    want = text.encode()
    ids = _encode_text(tok, text)
    cands = [ids]
    if text.startswith(" "):
        cands.append(_encode_text(tok, text[1:]))
    if ids and bm.mid[ids[0]] == b" ":
        cands.append(ids[1:])
    if ids and bm.mid[ids[0]] is not None and bm.mid[ids[0]][:1] == b" ":
        bare = tok.convert_tokens_to_ids(tok.convert_ids_to_tokens(ids[0])[1:] or "\x00")
        if isinstance(bare, int) and bare != tok.unk_token_id:
            cands.append([bare, *ids[1:]])
    for c in cands:
        if c and bm.bytes_of(c, at_start) == want:
            return c
    return None


def encode_bytes(tok: Any, bm: ByteMap, data: bytes, at_start: bool = True) -> list[int] | None:
    """The tokenizer's ids spelling exactly ``data`` (the first id in ``start`` form when
    ``at_start``): valid UTF-8 runs by its encoder, every other byte as its single-byte token;
    None when it cannot (no byte alphabet, or an encoder that changes the text)."""
    ids: list[int] = []
    for piece in _ESCAPED.split(data.decode("utf-8", "surrogateescape")):
        if not piece:
            continue
        first = at_start and not ids
        if _ESCAPED.fullmatch(piece):
            i = bm.byte_ids.get(ord(piece) - 0xDC00)
            if i is None:
                return None
            ids.append(i)
            continue
        got = _encode_piece(tok, bm, piece, first)
        if got is None:
            return None
        ids += got
    return ids if bm.bytes_of(ids, at_start) == data else None


def is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


# ---------------------------------------------------------------------------- alignment
@dataclass(frozen=True)
class Chunks:
    """The alignment of two tokenizations of one text into chunks with agreeing boundaries."""

    spans: list[Span]  # per chunk: its byte span in the response
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

    A cut is a byte position that ends a token on both sides (plus 0); chunks are the text
    between consecutive cuts. No token crosses a cut (its own side's tokens partition the text), so
    each chunk is a contiguous run of tokens on each side, and one-to-one spans give one-token
    chunks. Both offset lists must partition the same bytes (``ByteMap.spans`` output).
    """
    n_s = _check_partition(student_offsets, "student")
    n_t = _check_partition(teacher_offsets, "teacher")
    if n_s != n_t:
        raise ValueError(f"the two sides cover different lengths: {n_s} vs {n_t} bytes")
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

    At the first token of a chunk both models have read the same bytes, so the teacher's
    distribution at its chunk's first token and the student's are over the same continuation
    (the top-K columns are taken there). Inside a chunk the prefixes differ: -1 (nothing mapped).
    """
    return [
        chunks.teacher_range[c][0] if chunks.student_range[c][0] == i else -1
        for i, c in enumerate(chunks.student_chunk)
    ]


# --------------------------------------------------------------------------- vocabularies
def surface_keys(tok: Any, bm: ByteMap, form: str = "start") -> list[Key | None]:
    """Per id, what the token stands for: its bytes in ``form`` (``start``: as a response's first
    token; ``mid``: after another token, where a word-level ``the`` and a byte-level ``Ġthe`` both
    add `` the``), or None (never mapped).

    EOS, BOS, pad and unk get a key for their role, so the stop action maps to the other side's;
    other special tokens one for their string (ChatML's ``<|im_start|>`` to ``<|im_start|>``). Bytes two ids share are ambiguous: the id that is not a
    byte-fallback token keeps them (SentencePiece's ``2`` over ``<0x32>``), else neither does;
    such a byte-fallback token gets ("byte", "50"), which only another byte-fallback token has,
    and first tokens that a decoder makes equal (``an`` and ``▁an`` after SentencePiece strips the
    first space) are told apart by what they add after another token.
    """
    vals = bm.start if form == "start" else bm.mid
    fallback = {i: b for b, i in bm.byte_ids.items()} if bm.kind == "sentencepiece" else {}
    owners: dict[bytes, list[int]] = {}
    for i, b in enumerate(vals):
        if b is not None:
            owners.setdefault(b, []).append(i)
    out: list[Key | None] = [None] * len(vals)
    for b, ids in owners.items():
        keep = [i for i in ids if i not in fallback] if len(ids) > 1 else ids
        if len(keep) == 1 and b:
            out[keep[0]] = b
        for i in ids:
            if out[i] is not None:
                continue
            if i in fallback:  # a byte-fallback token beside a token of its byte
                out[i] = ("byte", str(fallback[i]))
            elif form == "start" and bm.mid[i]:  # ``an`` and ``▁an`` as first tokens
                out[i] = ("mid", bm.mid[i].hex())
    special = special_ids(tok)
    names = tok.convert_ids_to_tokens(sorted(special))
    for i, name in zip(sorted(special), names, strict=True):
        if 0 <= i < len(out) and name:
            out[i] = ("special", name)  # another special token: the one of the same string
    for role in ROLES:
        i = getattr(tok, f"{role}_id", None)
        if i is not None and 0 <= i < len(out) and i in special:
            out[i] = ("role", role)  # matched by role (EOS to EOS), never by text
    return out


def vocab_table(
    teacher_vocab: Sequence[Key | None], student_vocab: Sequence[Key | None] | Mapping[Key, int]
) -> Tensor:
    """Teacher id -> student id with the same key, -1 where none [V_T] int64."""
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
    teacher_vocab: Sequence[Key | None],
    student_vocab: Sequence[Key | None] | Mapping[Key, int],
) -> tuple[Tensor, Tensor, Tensor]:
    """The teacher's top-K [N, K] in student ids: (ids, log-probs, log of the mapped mass [N]).

    Vocabularies are ``surface_keys`` lists (or, for the student, key -> id). An entry whose
    key has no student id gets id -1 and log-prob -inf; its mass (with the mass beyond the
    teacher's K) is the tail bucket of ``mapped_topk_fkl``. Distinct teacher keys map to
    distinct student ids, so the mapped ids of a row never repeat.
    """
    table = vocab_table(teacher_vocab, student_vocab)  # [V_T]
    return map_topk_table(teacher_topk_ids, teacher_topk_logprobs, table)


def sorted_probs(topk_logprobs: Tensor) -> Tensor:
    """Probabilities sorted in decreasing order [N, K] (ULD's teacher column; no ids needed)."""
    p = torch.nan_to_num(topk_logprobs.float(), nan=float("-inf")).exp()  # [N, K]
    return p.sort(dim=-1, descending=True).values  # [N, K]
