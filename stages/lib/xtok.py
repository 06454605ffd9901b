"""The score stage's cross-tokenizer path: a teacher whose tokenizer differs from the student's.

With ``score.cross_tokenizer=align`` (docs/CROSS_TOKENIZER.md) the score stage, for each rollout:

1. renders the teacher's prefix with the **teacher's** tokenizer and chat template from the prompts
   row (``teacher_prefixes``; the context placement as configured for the rollout);
2. reads the bytes of the student's sampled ids (the stored truth, as they are) from the
   student tokenizer's byte mapping and spells them with the teacher's tokenizer (``prepare``;
   never through decoded text); a response whose bytes the teacher cannot spell exactly,
   or that holds a special token other than a final stop token, is **refused** (its tokens are
   written with a negative ``xtok_chunk``, its code, and get selection weight 0) and counted;
3. after the teacher's own pass (full-vocabulary fp32 log-softmax, as for any teacher), moves the
   teacher's numbers onto the student's tokens (``student_columns``) through the alignment of
   ``stages.lib.align``: chunks of tokens whose byte boundaries agree on both sides.

A final stop token (EOS or another special) is aligned to the teacher's stop token of the same role
or string as a one-token chunk of its own (one virtual byte past the response), so the teacher's
log-prob of stopping counts.

Pure functions plus ``teacher_prefixes`` (which reads the prompts); no model is loaded here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from data_schemas import prompts as prompts_schema
from data_schemas import tokens as tokens_table
from stages.lib import align, chat
from stages.lib.errors import UserError

FILL = tokens_table.XTOK_FILL_LOGPROB
CODE = {reason: code for code, reason in tokens_table.XTOK_REFUSED.items()}  # reason -> code


# ----------------------------------------------------------------------------- the two vocabularies
@dataclass
class Vocabs:
    """The student/teacher pair: byte maps, id tables and the stop-token map, computed once."""

    s_tok: Any
    t_tok: Any
    table: np.ndarray  # [V_T] teacher id -> student id of the same bytes, as a first token
    stop: dict[int, int]  # student special id -> the teacher's id of the same role/string
    s_special: frozenset[int]
    s_vocab: int
    # [V_T] the same after another token (the bytes each adds after a word: `` the`` for a
    # word-level ``the`` and a byte-level ``Ġthe`` alike); None: use ``table`` everywhere
    table_mid: np.ndarray | None = None
    s_bytes: align.ByteMap | None = None
    t_bytes: align.ByteMap | None = None
    # [V_S] student id -> teacher id of the same bytes (first token / after another), -1 none
    s2t: np.ndarray | None = None
    s2t_mid: np.ndarray | None = None

    @staticmethod
    def of(s_tok: Any, t_tok: Any) -> Vocabs:
        s_bm, t_bm = align.byte_map(s_tok), align.byte_map(t_tok)
        table = align.vocab_table(
            align.surface_keys(t_tok, t_bm), align.surface_keys(s_tok, s_bm)
        ).numpy()  # [V_T]
        mid = align.vocab_table(
            align.surface_keys(t_tok, t_bm, "mid"), align.surface_keys(s_tok, s_bm, "mid")
        ).numpy()  # [V_T]
        stop = {}
        t_vocab = t_tok.get_vocab()
        specials = frozenset(align.special_ids(s_tok))
        for i in sorted(specials):
            role = next((r for r in align.ROLES if getattr(s_tok, f"{r}_id", None) == i), None)
            if role is not None:  # a role (EOS, BOS, pad, unk): the teacher's of the same role
                j = getattr(t_tok, f"{role}_id", None)
            else:  # another special token: the teacher's token of the same string
                j = t_vocab.get(s_tok.convert_ids_to_tokens(i))
            if j is not None:
                stop[i] = int(j)
        return Vocabs(
            s_tok, t_tok, table, stop, specials, len(s_tok), mid, s_bm, t_bm,
            _inverse(table, len(s_tok)), _inverse(mid, len(s_tok)),
        )  # fmt: skip


def _inverse(table: np.ndarray, n: int) -> np.ndarray:
    """[V_T] teacher -> student (one-to-one where >= 0) as [V_S] student -> teacher."""
    out = np.full(n, -1, np.int64)  # [V_S]
    t = np.flatnonzero(table >= 0)
    out[table[t]] = t
    return out


def differ(s_tok: Any, t_tok: Any) -> bool:
    """Do the two tokenizers map ids to different tokens (the cross-tokenizer case)?"""
    return chat.id_map_fingerprint(s_tok) != chat.id_map_fingerprint(t_tok)


# ----------------------------------------------------------------------------- one response
@dataclass
class Prepared:
    """One rollout's teacher side: its ids and the alignment, or why it was refused."""

    response: list[int] = field(default_factory=list)  # the teacher's response ids
    chunks: align.Chunks | None = None
    refused: str | None = None  # a tokens_table.XTOK_REFUSED reason, or None when aligned


def prepare(v: Vocabs, response_ids: list[int], utf8_only: bool = False) -> Prepared:
    """The teacher's ids for the bytes of a student response, aligned to the student's ids.

    The student's sampled ids are kept as they are and give the bytes (``ByteMap.spans``). The
    teacher reads those bytes as it would write them (its own encoding) where the student's
    split is its tokenizer's own; where the student sampled another split (``Bi`` + ``shu`` for
    ``B`` ``is`` ``h`` ``u``, a character as its byte tokens) the teacher reads the student's
    tokens when its vocabulary has the same bytes. ``utf8_only``: refuse bytes that are not
    valid UTF-8 (the SFT text path)."""
    body, stop = list(response_ids), None
    if body and body[-1] in v.s_special:
        stop = v.stop.get(body[-1])
        if stop is None:
            return Prepared(refused="no_stop_match")
        body = body[:-1]
    if any(i in v.s_special for i in body):
        return Prepared(refused="special_token")
    got = v.s_bytes.spans(body) if body else (b"", [])
    if got is None:
        return Prepared(refused="roundtrip")
    data, s_off = got
    if utf8_only and not align.is_utf8(data):
        return Prepared(refused="invalid_utf8")
    t_body = teacher_ids(v, body, data, s_off) if body else []
    if t_body is None:
        return Prepared(refused="roundtrip")
    t_got = v.t_bytes.spans(t_body) if t_body else (b"", [])
    if t_got is None or t_got[0] != data:
        return Prepared(refused="roundtrip")
    t_off = t_got[1]
    if stop is not None:  # the stop tokens: one virtual byte past the text, on both sides
        n = len(data)
        s_off, t_off, t_body = [*s_off, (n, n + 1)], [*t_off, (n, n + 1)], [*t_body, stop]
    if not t_body or (not data and stop is None):
        return Prepared(refused="empty")
    return Prepared(response=t_body, chunks=align.align_spans(s_off, t_off))


def _same_token(v: Vocabs, i: int, first: bool) -> int:
    """The teacher's id of student token ``i``'s bytes in its place (a response's first token:
    as a first token), or -1."""
    if not first:
        return int(v.s2t_mid[i])
    for j in (int(v.s2t[i]), int(v.s2t_mid[i])):
        if j >= 0 and v.t_bytes.start[j] == v.s_bytes.start[i]:
            return j
    return -1


def teacher_ids(v: Vocabs, body: list[int], data: bytes, s_off: list) -> list[int] | None:
    """The teacher's ids for ``data`` (see ``prepare``), or None when it cannot spell them."""
    t_canon = align.encode_bytes(v.t_tok, v.t_bytes, data)  # the teacher's own encoding
    canon = align.encode_bytes(v.s_tok, v.s_bytes, data)
    if canon == body:  # the student's own split everywhere
        return t_canon
    c_got = v.s_bytes.spans(canon) if canon else None
    if c_got is None:  # the student's tokenizer cannot spell its own bytes: token by token
        regions = [(a, b, [i], False) for (a, b), i in zip(s_off, body, strict=True)]
    else:
        ch = align.align_spans(s_off, c_got[1])
        regions = []
        for span, (sa, sb), (ca, cb) in zip(
            ch.spans, ch.student_range, ch.teacher_range, strict=True
        ):
            own = body[sa:sb] == canon[ca:cb]
            if own and regions and regions[-1][3]:  # merge runs of the student's own split
                a, _, ids, _ = regions[-1]
                regions[-1] = (a, span[1], ids + body[sa:sb], True)
            else:
                regions.append((span[0], span[1], body[sa:sb], own))
    t_at: dict[int, int] = {}  # byte offset -> index of the teacher's own token starting there
    if t_canon is not None:
        for k, (a, _) in enumerate(v.t_bytes.spans(t_canon)[1]):
            t_at.setdefault(a, k)
        t_at[len(data)] = len(t_canon)
    out: list[int] = []
    for a, b, ids, own in regions:
        mapped = [_same_token(v, i, a == 0 and k == 0) for k, i in enumerate(ids)]
        if not own and min(mapped) >= 0:  # the student's tokens, where the teacher has them
            out += mapped
        elif own and a in t_at and b in t_at:  # the teacher's own tokens of the whole response
            out += t_canon[t_at[a] : t_at[b]]
        else:
            got = align.encode_bytes(v.t_tok, v.t_bytes, data[a:b], at_start=a == 0)
            if got is None:
                return None
            out += got
    return out


# ----------------------------------------------------------------------------- teacher prefixes
def teacher_prefixes(cfg, rm: dict, s_tok: Any, t_tok: Any, where: str) -> dict[str, list[int]]:
    """prompt_id -> the teacher's prefix ids, rendered with the teacher's tokenizer and template
    from ``data.prompts`` (which must be the prompts the rollouts were sampled from)."""
    want = (rm.get("inputs") or {}).get("prompts")
    fix = "set data.prompts (and data.max_prompts, data.split) to what the rollout stage read"
    if not cfg.data.prompts:
        raise UserError(
            "score.cross_tokenizer=align renders the teacher's prefix from the prompts, and "
            "data.prompts is not set",
            "data.prompts",
            fix,
        )
    table = prompts_schema.read(
        cfg.data.prompts, max_prompts=cfg.data.max_prompts, split=cfg.data.split
    )
    have = prompts_schema.source_sha256(cfg.data.prompts, cfg.data.split)
    if want is not None and want != have:
        raise UserError(
            f"data.prompts ({have[:12]}) is not the prompts file the rollouts were sampled from "
            f"({want[:12]})",
            f"data.prompts / {where}",
            fix,
        )
    render = chat.Renderer.of(cfg.rollout, s_tok, t_tok)
    out = {}
    for row in table.to_pylist():
        for t in chat.turns(row, cfg.rollout.expand_turns, cfg.rollout.final_assistant):
            out[t.prompt_id] = render.teacher_ids(t, row)
    return out


# ----------------------------------------------------------------------------- student columns
def mapped_topk(
    v: Vocabs, ids: np.ndarray, lps: np.ndarray, k: int, mid: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Teacher top-K rows [m, K_T] in student ids, vectorised: per row the mapped entries first
    (in the teacher's order), then filler ids (the lowest student ids not in the row) at FILL, up
    to ``k``. ``mid`` [m] bool: rows after another token of the response (in-context strings,
    ``Vocabs.table_mid``); the others, and all when None, use the start table.
    Returns (ids [m, k] int32, log-probs [m, k] float32, mapped count [m])."""
    m, k_t = ids.shape
    valid = (ids >= 0) & (ids < len(v.table))  # [m, K_T]
    safe = np.clip(ids, 0, len(v.table) - 1)  # [m, K_T]
    mapped = np.where(valid, v.table[safe], -1)  # [m, K_T]
    if mid is not None and v.table_mid is not None:
        mapped = np.where(valid & mid[:, None], v.table_mid[safe], mapped)  # [m, K_T]
    ok = mapped >= 0  # [m, K_T]
    order = np.argsort(~ok, axis=1, kind="stable")  # [m, K_T] mapped first, order kept
    m_ids = np.take_along_axis(mapped, order, 1)[:, :k]  # [m, min(K_T, k)]
    m_lps = np.take_along_axis(lps, order, 1)[:, :k]
    mk = np.minimum(ok.sum(1), k)  # [m]
    cand = np.arange(min(v.s_vocab, 2 * k))  # [C] >= k - mk free ids in every row
    taken = (mapped[:, :, None] == cand[None, None, :]).any(1)  # [m, C]
    free = cand[np.argsort(taken, axis=1, kind="stable")]  # [m, C] free ids first
    slot = np.arange(k)[None, :]  # [1, k]
    pad = np.full((m, max(0, k - m_ids.shape[1])), -1)  # K_T < k: widen
    head_ids = np.concatenate([m_ids, pad], 1)  # [m, k]
    head_lps = np.concatenate([m_lps, np.full(pad.shape, FILL)], 1)
    fill = np.take_along_axis(free, np.clip(slot - mk[:, None], 0, cand.size - 1), 1)  # [m, k]
    is_head = slot < mk[:, None]  # [m, k]
    out_ids = np.where(is_head, head_ids, fill).astype(np.int32)
    out_lps = np.where(is_head, head_lps, FILL).astype(np.float32)
    return out_ids, out_lps, mk


def student_columns(
    v: Vocabs, prep: Prepared, t: dict[str, np.ndarray] | None, k: int, fallback: np.ndarray
) -> dict[str, np.ndarray]:
    """The teacher pass result ``t`` (per teacher token) moved onto the student's tokens.

    Returns the standard teacher columns (``logprob``, ``topk_ids`` [n, k], ``topk_logprobs``,
    ``topk_logmass``, ``entropy``; the keys of a pass result) and the ``xtok_*`` columns:

    - ``logprob``: the chunk's teacher log-prob shared equally by its student tokens (a one-to-one
      chunk: the teacher's log-prob of that token, exactly);
    - top-K: at a chunk's first student token (both models have read the same text there) the
      teacher's top-K at the chunk's first teacher token, mapped into student ids by the text
      each token adds there (after the first token: in context, ``Vocabs.table_mid``); elsewhere
      (inside a chunk) nothing is mapped: ``xtok_mapped_k = 0``, only fillers;
    - ``entropy``: the teacher's entropy at the chunk's first teacher token.

    ``prep.refused``: every token gets ``xtok_chunk`` = the reason's negative code,
    ``logprob = fallback`` (the behaviour's log-prob: reward 0), fillers, no entropy; the
    selection gives these tokens weight 0.
    """
    n = len(fallback)
    if prep.refused:
        ids, lps, _ = mapped_topk(v, np.full((n, 1), -1), np.zeros((n, 1)), k)
        return _columns(
            np.asarray(fallback, np.float32), ids, lps, np.full(n, np.nan, np.float32), n, k
        ) | {"xtok_chunk": np.full(n, CODE[prep.refused], np.int32)}
    ch = prep.chunks
    s_chunk = np.asarray(ch.student_chunk)  # [n]
    c_lp = np.zeros(len(ch.spans), np.float64)  # [C]
    np.add.at(c_lp, np.asarray(ch.teacher_chunk), t["logprob"].astype(np.float64))
    n_s = np.bincount(s_chunk, minlength=len(ch.spans))  # [C] student tokens per chunk
    first_t = np.asarray([a for a, _ in ch.teacher_range])[s_chunk]  # [n] teacher row
    rows = np.asarray(align.teacher_rows(ch))  # [n] comparable teacher row, -1 inside a chunk
    at = rows >= 0
    t_ids = np.where(at[:, None], t["topk_ids"][np.maximum(rows, 0)], -1)  # [n, K_T]
    t_lps = t["topk_logprobs"][np.maximum(rows, 0)].astype(np.float64)  # [n, K_T]
    mid = np.arange(n) > 0  # [n] after another student token: in-context strings
    ids, lps, mk = mapped_topk(v, t_ids, t_lps, k, mid)
    p = np.where(at[:, None], np.exp(t_lps), 0.0)  # [n, K_T] teacher top-K probabilities
    mass = np.where(np.arange(k)[None, :] < mk[:, None], np.exp(lps.astype(np.float64)), 0.0)
    frac = mass.sum(1) / np.maximum(p.sum(1), 1e-300)  # [n]
    probs = np.zeros((n, k), np.float32)
    k_t = p.shape[1]
    probs[:, : min(k, k_t)] = -np.sort(-p, axis=1)[:, :k]  # [n, k] decreasing
    out = _columns(
        (c_lp / n_s)[s_chunk].astype(np.float32),
        ids,
        lps,
        t["entropy"][first_t] if "entropy" in t else np.full(n, np.nan, np.float32),
        n,
        k,
        t["topk_logmass"][first_t] if k_t == k else None,
        mk,
    )
    out.update(
        xtok_chunk=s_chunk.astype(np.int32),
        xtok_chunk_logprob=c_lp[s_chunk].astype(np.float32),
        xtok_mapped_k=mk.astype(np.int16),
        xtok_mapped_frac=np.minimum(frac, 1.0).astype(np.float32),
        xtok_sorted_probs=probs.astype(np.float16),
    )
    return out


def _columns(logprob, ids, lps, entropy, n, k, own_logmass=None, mk=None) -> dict:
    """Assemble the per-student-token dict; ``topk_logmass`` is the log of the listed mass
    (fillers add nothing), the teacher's own value where every entry of the row mapped."""
    lm = torch.logsumexp(torch.from_numpy(lps.astype(np.float64)), dim=-1).numpy()  # [n]
    lm = lm.astype(np.float32)
    if own_logmass is not None and mk is not None:
        full = mk == k
        lm[full] = own_logmass[full]
    zeros = np.zeros(n, np.float32)
    return {
        "logprob": logprob,
        "topk_ids": ids,
        "topk_logprobs": lps,
        "topk_logmass": np.minimum(lm, 0.0),
        "entropy": entropy,
        "xtok_chunk_logprob": zeros,
        "xtok_mapped_k": np.zeros(n, np.int16),
        "xtok_mapped_frac": zeros,
        "xtok_sorted_probs": np.zeros((n, k), np.float16),
    }
