"""Scoring a teacher of another tokenizer (``score.cross_tokenizer=align``): the teacher reads its own
tokenization, aligned to the student's tokens by character offsets (``stages.lib.xtok``)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from data_schemas import tokens as tokens_table
from stages.lib import models, store, xtok
from stages.lib.config import Config, as_dict
from stages.lib.errors import UserError
from stages.lib.layout import RunLayout
from stages.lib.scoring.plan import Pass, Role, ShardPlan
from stages.lib.scoring.scorer import Scorer, role_devices


# ----------------------------------------------------------------------------- cross-tokenizer
@dataclass
class XtokTeacher:
    """A teacher of another tokenizer (score.cross_tokenizer=align; stages/lib/xtok.py)."""

    role: Role
    vocabs: xtok.Vocabs
    prefixes: dict[str, list[int]]  # prompt_id -> the teacher's own prefix ids
    scorer: Scorer  # runs the teacher on its ids (its vocabulary, its pad id)
    identity: dict  # what the tokens' dataset id adds for this path


def xtok_setup(cfg: Config, rm: dict, layout: RunLayout, s_tok, roles: list[Role]):
    """The cross-tokenizer teacher, or None when the teacher shares the student's tokenizer (the
    same-tokenizer path, unchanged) or score.cross_tokenizer=refuse (check_models refused)."""
    sc, first = cfg.score, roles[0]
    if sc.cross_tokenizer != "align":
        return None
    t_tok = models.load_tokenizer(first.path, "teacher")
    if not xtok.differ(s_tok, t_tok):
        return None
    where = "score.cross_tokenizer=align"
    for bad, what, fix in (
        (cfg.teachers, "several teachers (teachers)", "score one teacher per run"),
        (sc.behavior_topk, "score.behavior_topk", "set score.behavior_topk=0"),
    ):
        if bad:
            raise UserError(
                f"{what} with a teacher of another tokenizer is not supported", where, fix
            )
    prefixes = xtok.teacher_prefixes(cfg, rm, s_tok, t_tok, str(layout.rollouts))
    t_vocab = models.vocab_size(t_tok)
    pad = t_tok.pad_token_id if t_tok.pad_token_id is not None else t_tok.eos_token_id
    # the HF backend always: vLLM's prompt log-probs were wired for the student's vocabulary
    scorer = Scorer(cfg, "hf", t_vocab, pad, 1, role_devices(sc))
    identity = {
        "mode": "align",
        "version": tokens_table.XTOK_VERSION,
        "teacher_tokenizer": models.tokenizer_fingerprint(t_tok),
        "prompts": (rm.get("inputs") or {}).get("prompts"),
        "rollout": as_dict(cfg)["rollout"],  # the teacher prefix's rendering
    }
    return XtokTeacher(first, xtok.Vocabs.of(s_tok, t_tok), prefixes, scorer, identity)


def score_xtok_teacher(xt: XtokTeacher, rows: list[dict], plan: ShardPlan, sc) -> int:
    """Score one shard's rows with the cross-tokenizer teacher and put each row's aligned result
    in ``plan`` as its teacher pass; returns the number of teacher passes run."""
    k_t = min(sc.topk, xt.scorer.vocab)
    ctx = models.context_length(xt.scorer.hf_model(xt.role).model)  # loads the teacher once
    preps, jobs = [], {}
    for row in rows:
        prefix = xt.prefixes.get(row["prompt_id"])
        if prefix is None:
            raise UserError(
                f"rollout prompt {row['prompt_id']!r} is not in data.prompts",
                "data.prompts / score.cross_tokenizer=align",
                "set data.prompts to the prompts the rollout stage read",
            )
        prep = xtok.prepare(xt.vocabs, list(row["response_ids"]))
        if not prep.refused and not prefix:
            prep = xtok.Prepared(refused="no_prefix")
        if not prep.refused and len(prefix) + len(prep.response) > ctx:
            prep = xtok.Prepared(refused="too_long")  # on the teacher's tokenization
        preps.append(prep)
        key = (tuple(prefix), tuple(prep.response))
        if not prep.refused and key not in jobs:
            jobs[key] = Pass(key, xt.role, list(prefix), prep.response, k_t, sc.entropy)
    if jobs:
        xt.scorer.run(list(jobs.values()), {}, stats=True, gather=False, progress=None)
    for i, (row, prep) in enumerate(zip(rows, preps, strict=True)):
        b = plan.jobs[plan.of[i]["behavior"]].result if "behavior" in plan.of[i] else None
        fallback = b["logprob"] if b else np.asarray(row["behavior_logprobs"], np.float32)
        t = (
            None
            if prep.refused
            else jobs[(tuple(xt.prefixes[row["prompt_id"]]), tuple(prep.response))].result
        )
        key = ("xtok", i)
        plan.jobs[key] = Pass(key, xt.role, [], [])
        plan.jobs[key].result = xtok.student_columns(xt.vocabs, prep, t, sc.topk, fallback)
        plan.of[i]["teacher"] = key
    return len(jobs)


def with_xtok_columns(table: pa.Table, rows: list[dict], plan: ShardPlan) -> pa.Table:
    """The shard's tokens table with the xtok_* columns (from each row's aligned result)."""
    res = [plan.jobs[keys["teacher"]].result for keys in plan.of]
    for f in tokens_table.XTOK_FIELDS:
        vals = np.concatenate([r[f.name] for r in res])  # [N] or [N, K]
        if vals.ndim == 2:
            n, k = vals.shape
            offsets = pa.array(np.arange(0, n * k + 1, k, dtype=np.int32))  # [N + 1]
            arr = pa.ListArray.from_arrays(offsets, pa.array(vals.reshape(-1))).cast(f.type)
        else:
            arr = pa.array(vals).cast(f.type)
        table = table.append_column(f, arr)
    return table


def xtok_manifest(xt: XtokTeacher, w, n_shards: int) -> dict:
    """The manifest's ``extra.cross_tokenizer``: the path's identity and the refusals, counted
    from the written shards (every worker's, whatever was resumed; a shard a Ray actor published
    to the bucket is read there, these columns only)."""
    refused = dict.fromkeys(tokens_table.XTOK_REFUSED.values(), 0)
    tokens = rows = 0
    for s in range(n_shards):
        path = w.shard_path(s)
        if not path.exists() and s not in w.reported:
            return xt.identity  # other workers still writing: the last one counts
        t = store.open_shard(path).read(columns=["sample_id", "pos", "xtok_chunk"])
        first = t.filter(pc.equal(t["pos"], 0))
        rows += first.num_rows
        for code in first["xtok_chunk"].to_numpy():
            if code < 0:
                refused[tokens_table.XTOK_REFUSED[int(code)]] += 1
        tokens += int(pc.sum(pc.less(t["xtok_chunk"], 0)).as_py() or 0)
    return xt.identity | {
        "rows": rows,
        "refused_rows": sum(refused.values()),
        "refused_tokens": tokens,
        "refused": refused,
    }
