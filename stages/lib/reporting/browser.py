"""The rollout browser's data: a seeded sample of rollouts with their decoded tokens and per-token
teacher/behaviour numbers, as the JSON the page's script renders."""

from __future__ import annotations

import math
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa

from stages.lib import store
from stages.lib.config import Config
from stages.lib.errors import UserError
from stages.lib.reporting.data import RunData

PAGE_SIZE = 40  # rollouts rendered per "show more" in the browser


# ----------------------------------------------------------------------------- token browser data
def load_decoder(data: RunData, cfg: Config, notes: list[str]):
    """The student tokenizer (the policy that sampled), or None: the browser then shows ids."""
    from stages.lib import models

    cands = [
        store.model_path(data.rollouts, "policy", "policy_path", data.layout.rollouts),
        ((data.rollouts.get("config") or {}).get("student") or {}).get("path"),
        cfg.student.path,
    ]
    for p in cands:
        if p and Path(p).is_dir():
            try:
                return models.load_tokenizer(p, "student")
            except UserError:
                continue
    notes.append(
        "no student tokenizer found (rollouts manifest extra.policy_path / config.student.path): "
        "the token browser shows token ids"
    )
    return None


def decode_vocab(tok, ids: set[int]) -> dict[str, str]:
    """id -> its text as one token (byte-level pieces that decode to U+FFFD keep the raw token)."""
    if tok is None:
        return {}
    out = {}
    for i in sorted(ids):
        s = tok.decode([i], skip_special_tokens=False)
        if not s or "\ufffd" in s:
            s = tok.convert_ids_to_tokens(i) or str(i)
        out[str(i)] = s
    return out


def _r(x: float | None, nd: int = 3) -> float | None:
    return None if x is None or not math.isfinite(x) else round(float(x), nd)


def sample_indices(total: int, k: int, seed: int) -> np.ndarray:
    """``min(k, total)`` distinct indices of ``range(total)``, seeded, in ascending order."""
    k = min(k, total)
    return np.sort(np.random.default_rng(seed).choice(total, size=k, replace=False))


def _chosen_rows(con: duckdb.DuckDBPyConnection, cfg: Config) -> tuple[int, list[dict]]:
    """(total rollouts, the seeded sample's rollouts rows); registers the sample as ``chosen``."""
    all_ids = [
        r[0]
        for r in con.execute(
            "SELECT sample_id FROM rollouts ORDER BY prompt_id, sample_idx, sample_id"
        ).fetchall()
    ]
    total = len(all_ids)
    chosen = [all_ids[i] for i in sample_indices(total, cfg.report.max_rollouts, cfg.seed)]
    con.register("chosen", pa.table({"sample_id": chosen, "ord": list(range(len(chosen)))}))
    rows = con.sql(
        "SELECT r.sample_id, prompt_id, kind, is_guided, finish_reason, correct, answer, "
        "train_prompt_ids, rollout_prompt_ids, response_ids, behavior_logprobs "
        "FROM rollouts r JOIN chosen USING (sample_id) ORDER BY ord"
    )
    return total, rows.to_arrow_table().to_pylist()


def _token_stats(con: duckdb.DuckDBPyConnection, k: int) -> dict[str, dict]:
    """sample_id -> its tokens' values as lists in position order (the chosen sample only)."""
    rel = con.sql(
        "SELECT sample_id, list(pos ORDER BY pos) AS pos, "
        "list(segment ORDER BY pos) AS seg, list(teacher_logprob ORDER BY pos) AS tlp, "
        "list(behavior_logprob ORDER BY pos) AS blp, "
        "list(behavior_entropy::FLOAT ORDER BY pos) AS ent, "
        "list(teacher_entropy::FLOAT ORDER BY pos) AS tent, "
        "list(teacher_topk_logmass ORDER BY pos) AS tm, "
        f"list(teacher_topk_ids[1:{k}] ORDER BY pos) AS kid, "
        f"list(teacher_topk_logprobs[1:{k}]::FLOAT[] ORDER BY pos) AS klp "
        "FROM tokens JOIN chosen USING (sample_id) GROUP BY sample_id"
    )
    return {s["sample_id"]: s for s in rel.to_arrow_table().to_pylist()}


def _rollout_entry(r: dict, st: dict | None, w: dict[str, list], tok, vocab_ids: set[int]):
    """One rollout of the browser: per-token values (None where the tokens table has none)."""
    resp = r["response_ids"]
    t = len(resp)
    tlp, blp, ent, tent = [None] * t, list(r["behavior_logprobs"]), [None] * t, [None] * t
    seg, topk, tm = [0] * t, [None] * t, [None] * t
    for j, p in enumerate(st["pos"] if st is not None else []):
        if 0 <= p < t:
            tlp[p], blp[p], ent[p], tent[p] = (
                st["tlp"][j],
                st["blp"][j],
                st["ent"][j],
                st["tent"][j],
            )
            seg[p], tm[p] = st["seg"][j], st["tm"][j]
            ids, lps = st["kid"][j], st["klp"][j]
            topk[p] = [ids, [_r(math.exp(x), 4) for x in lps]]
            vocab_ids.update(ids)
    vocab_ids.update(resp)
    gap = [_r(a - b) if a is not None and b is not None else None for a, b in zip(tlp, blp)]
    return {
        "sid": r["sample_id"],
        "pid": r["prompt_id"],
        "kind": r["kind"],
        "guided": bool(r["is_guided"]),
        "finish": r["finish_reason"],
        "correct": r["correct"],
        "answer": r["answer"],
        "prompt": _decode_text(tok, r["train_prompt_ids"]),
        "rprompt": _decode_text(tok, r["rollout_prompt_ids"]) if r["is_guided"] else None,
        "ids": resp,
        "seg": seg,
        "tlp": [_r(x) for x in tlp],
        "blp": [_r(x) for x in blp],
        "gap": gap,
        "ent": [_r(x) for x in ent],
        "tent": [_r(x) for x in tent],
        "tm": [_r(math.exp(x), 4) if x is not None else None for x in tm],
        "topk": topk,
        "w": {n: [_r(x) for x in ws] for n, ws in w.items()},
    }


def browser_data(
    con: duckdb.DuckDBPyConnection,
    data: RunData,
    sel_views: dict[str, str],
    tok,
    cfg: Config,
) -> dict:
    """The JSON blob the page renders: a seeded sample of rollouts with per-token values."""
    k = cfg.report.show_topk
    total, rows = _chosen_rows(con, cfg)
    stats = _token_stats(con, k) if data.tokens is not None else {}
    weights: dict[str, dict[str, list]] = {name: {} for name in sel_views}
    for name, v in sel_views.items():
        for sid, w in con.execute(
            f"SELECT sample_id, weights FROM {v} JOIN chosen USING (sample_id)"
        ).fetchall():
            weights[name][sid] = w
    vocab_ids: set[int] = set()
    out, gaps, wmax = [], [], 1.0
    for r in rows:
        sid = r["sample_id"]
        w = {n: weights[n][sid] for n in sel_views if sid in weights[n]}
        wmax = max([wmax, *(max(ws, default=0.0) for ws in w.values())])
        e = _rollout_entry(r, stats.get(sid), w, tok, vocab_ids)
        gaps += [abs(g) for g, s in zip(e["gap"], e["seg"]) if g is not None and s == 0]
        out.append(e)
    # colour scale of the gap: the 95th percentile of |gap| (at least 1 nat), so a few outliers
    # do not wash the rest out
    gapscale = max(1.0, float(np.quantile(gaps, 0.95))) if gaps else 1.0
    names = list(sel_views)
    return {
        "total": total,
        "shown": len(rows),
        "seed": cfg.seed,
        "show_topk": k,
        "has_tokens": data.tokens is not None,
        "decoded": tok is not None,
        "selections": names,
        "default_selection": cfg.select.name
        if cfg.select.name in names
        else next(iter(names), None),
        "wmax": _r(wmax),
        "gapscale": _r(gapscale),
        "page": PAGE_SIZE,
        "vocab": decode_vocab(tok, vocab_ids),
        "rollouts": out,
    }


def _decode_text(tok, ids: list[int]) -> str:
    if tok is None:
        return " ".join(map(str, ids))
    return tok.decode(ids, skip_special_tokens=False)
