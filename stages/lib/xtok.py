"""The score stage's cross-tokenizer path: a teacher whose tokenizer differs from the student's.

With ``score.cross_tokenizer=align`` (docs/CROSS_TOKENIZER.md) the score stage, for each rollout:

1. renders the teacher's prefix with the **teacher's** tokenizer and chat template from the prompts
   row (``teacher_prefixes``; the context placement as configured for the rollout);
2. decodes the student's sampled ids (the stored truth) and re-tokenizes that text with the teacher
   tokenizer (``prepare``); a response whose text the teacher's decode does not give back exactly,
   or that holds a special token other than a final stop token, is **refused** (its tokens are
   written with a negative ``xtok_chunk``, its code, and get selection weight 0) and counted;
3. after the teacher's own pass (full-vocabulary fp32 log-softmax, as for any teacher), moves the
   teacher's numbers onto the student's tokens (``student_columns``) through the alignment of
   ``stages.lib.align``: chunks of tokens whose character boundaries agree on both sides.

A final stop token (EOS or another special) is aligned to the teacher's stop token of the same role
or string as a one-token chunk of its own (one virtual character past the text), so the teacher's
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
    """The student/teacher pair: the id table and the stop-token map, computed once per run."""

    s_tok: Any
    t_tok: Any
    table: np.ndarray  # [V_T] teacher id -> student id with the same string, -1 where none
    stop: dict[int, int]  # student special id -> the teacher's id of the same role/string
    s_special: frozenset[int]
    s_vocab: int

    @staticmethod
    def of(s_tok: Any, t_tok: Any) -> Vocabs:
        s_str, t_str = align.surface_strings(s_tok), align.surface_strings(t_tok)
        table = align.vocab_table(t_str, s_str).numpy()  # [V_T]
        stop = {}
        t_vocab = t_tok.get_vocab()
        for i in s_tok.all_special_ids:
            key = s_str[i] if i < len(s_str) else None
            if key is not None and key.startswith("\x00"):  # a role (EOS, BOS, pad, unk)
                j = getattr(t_tok, f"{key[1:]}_id", None)
            else:  # another special token: the teacher's token of the same string
                j = t_vocab.get(s_tok.convert_ids_to_tokens(i))
            if j is not None:
                stop[i] = int(j)
        return Vocabs(s_tok, t_tok, table, stop, frozenset(s_tok.all_special_ids), len(s_tok))


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


def prepare(v: Vocabs, response_ids: list[int]) -> Prepared:
    """Re-tokenize a student response with the teacher tokenizer and align the two."""
    body, stop = list(response_ids), None
    if body and body[-1] in v.s_special:
        stop = v.stop.get(body[-1])
        if stop is None:
            return Prepared(refused="no_stop_match")
        body = body[:-1]
    if any(i in v.s_special for i in body):
        return Prepared(refused="special_token")
    text = align.decode(v.s_tok, body)
    t_body = align.reencode(v.t_tok, text)
    if t_body is None:
        return Prepared(refused="roundtrip")
    s_off = align.char_offsets(v.s_tok, body)
    t_off = align.char_offsets(v.t_tok, t_body)
    if stop is not None:  # the stop tokens: one virtual character past the text, on both sides
        n = len(text)
        s_off, t_off, t_body = [*s_off, (n, n + 1)], [*t_off, (n, n + 1)], [*t_body, stop]
    if not t_body or (not text and stop is None):
        return Prepared(refused="empty")
    return Prepared(response=t_body, chunks=align.align_spans(s_off, t_off))


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
        for t in chat.turns(row, cfg.rollout.expand_turns):
            out[t.prompt_id] = render.teacher_ids(t, row)
    return out


# ----------------------------------------------------------------------------- student columns
def _fillers(mapped: np.ndarray, k: int, v_s: int) -> np.ndarray:
    """K - m distinct student ids not among the row's ``mapped`` ids (lowest first)."""
    taken = set(mapped.tolist())
    out = [i for i in range(min(v_s, 2 * k + len(taken))) if i not in taken]
    return np.asarray(out[: k - len(mapped)], dtype=np.int64)


def _mapped_topk(
    v: Vocabs, ids: np.ndarray, lps: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray, int]:
    """One teacher top-K row [K_T] in student ids: mapped entries first (in their order), then
    fillers at FILL up to ``k``; returns (ids [k], log-probs [k], how many are mapped)."""
    valid = (ids >= 0) & (ids < len(v.table))
    mapped = np.where(valid, v.table[np.clip(ids, 0, len(v.table) - 1)], -1)  # [K_T]
    ok = mapped >= 0
    m_ids, m_lps = mapped[ok][:k], lps[ok][:k]
    fill = _fillers(m_ids, k, v.s_vocab)
    out_ids = np.concatenate([m_ids, fill]).astype(np.int32)  # [k]
    out_lps = np.concatenate([m_lps, np.full(len(fill), FILL)]).astype(np.float32)  # [k]
    return out_ids, out_lps, len(m_ids)


def student_columns(
    v: Vocabs, prep: Prepared, t: dict[str, np.ndarray], k: int, fallback: np.ndarray
) -> dict[str, np.ndarray]:
    """The teacher pass result ``t`` (per teacher token) moved onto the student's tokens.

    Returns the standard teacher columns (``logprob``, ``topk_ids`` [n, k], ``topk_logprobs``,
    ``topk_logmass``, ``entropy``; the keys of a pass result) and the ``xtok_*`` columns:

    - ``logprob``: the chunk's teacher log-prob shared equally by its student tokens (a one-to-one
      chunk: the teacher's log-prob of that token, exactly);
    - top-K: at a chunk's first student token (both models have read the same text there) the
      teacher's top-K at the chunk's first teacher token, mapped into student ids; elsewhere
      (inside a chunk) nothing is mapped: ``xtok_mapped_k = 0``, only fillers;
    - ``entropy``: the teacher's entropy at the chunk's first teacher token.

    ``prep.refused``: every token gets ``xtok_chunk`` = the reason's negative code, ``logprob = fallback`` (the behaviour's
    log-prob: reward 0), fillers, no entropy; the selection gives these tokens weight 0.
    """
    n = len(fallback)
    if prep.refused:
        ids = np.stack([_fillers(np.zeros(0, np.int64), k, v.s_vocab)] * n).astype(np.int32)
        lps = np.full((n, k), FILL, np.float32)
        return _columns(
            np.asarray(fallback, np.float32), ids, lps, np.full(n, np.nan, np.float32), n, k
        ) | {"xtok_chunk": np.full(n, CODE[prep.refused], np.int32)}
    ch = prep.chunks
    t_chunk = np.asarray(ch.teacher_chunk)  # [n_t]
    s_chunk = np.asarray(ch.student_chunk)  # [n]
    c_lp = np.zeros(len(ch.spans), np.float64)  # [C]
    np.add.at(c_lp, t_chunk, t["logprob"].astype(np.float64))
    n_s = np.bincount(s_chunk, minlength=len(ch.spans))  # [C] student tokens per chunk
    first_t = np.asarray([a for a, _ in ch.teacher_range])  # [C]
    ids = np.empty((n, k), np.int32)
    lps = np.empty((n, k), np.float32)
    mk = np.zeros(n, np.int16)
    frac = np.zeros(n, np.float32)
    probs = np.zeros((n, k), np.float32)
    k_t = t["topk_ids"].shape[1]
    for i, r in enumerate(align.teacher_rows(ch)):
        if r < 0:
            ids[i], lps[i], _ = _mapped_topk(v, np.zeros(0, np.int64), np.zeros(0), k)
            continue
        ids[i], lps[i], mk[i] = _mapped_topk(v, t["topk_ids"][r], t["topk_logprobs"][r], k)
        p = np.exp(t["topk_logprobs"][r].astype(np.float64))  # [K_T]
        probs[i, : min(k, k_t)] = np.sort(p)[::-1][:k]
        frac[i] = np.exp(lps[i, : mk[i]].astype(np.float64)).sum() / max(p.sum(), 1e-300)
    out = _columns(
        (c_lp / n_s)[s_chunk].astype(np.float32),
        ids,
        lps,
        t["entropy"][first_t[s_chunk]] if "entropy" in t else np.full(n, np.nan, np.float32),
        n,
        k,
        t["topk_logmass"][first_t[s_chunk]] if k_t == k else None,
        mk,
    )
    out.update(
        xtok_chunk=s_chunk.astype(np.int32),
        xtok_chunk_logprob=c_lp[s_chunk].astype(np.float32),
        xtok_mapped_k=mk,
        xtok_mapped_frac=np.minimum(frac, 1.0),
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
