"""What a rollout run will sample, checked before anything is written.

:func:`plan_rollouts` loads the policy's tokenizer, renders every prompt into train / rollout /
teacher prefixes (stages/lib/chat.py), applies the length limit and groups the generation points
into shards; the seeds are per shard (:func:`shard_seed`) and the EDGE-OPD guided choice per prompt
(:func:`is_guided`), both pure functions of the config's seed. The sampling itself is
stages/lib/generation.py."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pyarrow as pa

from stages.lib import chat, input_limits, models
from stages.lib.config import Config, RolloutConfig
from stages.lib.decoding import Sampling
from stages.lib.errors import UserError


@dataclass
class PromptIds:
    """One prompt turned into the three token-id prefixes the pipeline stores."""

    index: int  # row in the prompts table (shard s holds indices [s*P, (s+1)*P))
    prompt_id: str
    train_ids: list[int]  # what the student is trained on: never the context
    rollout_ids: list[int]  # what the policy is given (context included when guided)
    teacher_ids: list[int]  # the prefix the teacher scores the response after
    is_guided: bool
    answer: str | None
    kind: str | None
    turn: int = 0  # index of the generated assistant turn (0 for plain prompts)


def unit_hash(*parts: object) -> float:
    """A deterministic number in [0, 1) from ``parts`` (same on every machine and Python run)."""
    h = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64


def is_guided(seed: int, prompt_id: str, has_context: bool, fraction: float) -> bool:
    """EDGE-OPD guided rollout: a prompt with a context, selected by a hash of (seed, id)."""
    return has_context and unit_hash("guided", seed, prompt_id) < fraction


def shard_seed(seed: int, shard: int) -> int:
    """The RNG seed of one shard: depends on (seed, shard) only, never on workers or resume."""
    return int(unit_hash("shard", seed, shard) * (2**31 - 1))


def n_shards_for(n_prompts: int, prompts_per_shard: int) -> int:
    return max(1, math.ceil(n_prompts / prompts_per_shard))


def build_prompt_ids(
    tok: Any, table: pa.Table, r: RolloutConfig, seed: int, teacher_tok: Any = None
) -> list[PromptIds]:
    """Every generation point of every prompts row (one per row; one per assistant turn with
    ``rollout.expand_turns``) as train / rollout / teacher prefixes, rendered by stages.lib.chat."""
    render = chat.Renderer.of(r, tok, teacher_tok)
    out: list[PromptIds] = []
    for row in table.to_pylist():
        for t in chat.turns(row, r.expand_turns, r.final_assistant):
            g = is_guided(seed, t.prompt_id, row.get("context") is not None, r.guided_fraction)
            train = render.train_ids(t, row)
            out.append(
                PromptIds(
                    index=len(out),
                    prompt_id=t.prompt_id,
                    train_ids=train,
                    rollout_ids=render.guided_ids(t, row) if g else train,
                    teacher_ids=render.teacher_ids(t, row),
                    is_guided=g,
                    answer=t.answer,
                    kind=row.get("kind"),
                    turn=t.turn,
                )
            )
    return out


def check_lengths(
    items: list[PromptIds], limit: int, too_long: str, where: str
) -> tuple[list[PromptIds], list[dict]]:
    """Apply ``rollout.max_prompt_tokens``: raise on the first too-long prompt, or skip them.

    The rollout prefix and the teacher prefix must both fit (the teacher scores after its own).
    Returns (kept prompts, skipped [{id, tokens}]).
    """
    kept, skipped = [], []
    for p in items:
        n = max(len(p.rollout_ids), len(p.teacher_ids))
        if n <= limit:
            kept.append(p)
        elif too_long == "skip":
            skipped.append({"id": p.prompt_id, "tokens": n})
        else:
            raise UserError(
                f"prompt {p.prompt_id!r} is {n} tokens long, over the limit of {limit} "
                "(rollout/teacher prefix incl. template and context)",
                where,
                "shorten it, raise rollout.max_prompt_tokens (within the model's context "
                "length minus rollout.max_new_tokens), or set rollout.too_long=skip",
            )
    return kept, skipped


def policy_context_length(path: str) -> int:
    """The policy's context length from its config (without loading the weights)."""
    from transformers import AutoConfig

    return models.context_length(SimpleNamespace(config=AutoConfig.from_pretrained(path)))


def tokenizer_dir(policy_path: str, fallback: str | None) -> str:
    """The policy's own tokenizer when saved next to it, else ``fallback`` (e.g. the student)."""
    p = Path(policy_path)
    has_tok = any((p / f).exists() for f in ("tokenizer.json", "tokenizer_config.json"))
    return policy_path if has_tok or not fallback else fallback


@dataclass
class RolloutPlan:
    """The checked inputs of one rollout run: what will be sampled, shard by shard."""

    tok: Any  # the policy's tokenizer
    ctx_len: int  # the policy's context length
    limit: int  # longest prompt accepted (tokens)
    compat: dict | None  # the student/teacher tokenizer check (None without a teacher)
    n_items: int  # generation points before the too-long ones were dropped
    skipped: list[dict]  # too-long prompts skipped: [{id, tokens}]
    by_shard: dict[int, list[PromptIds]]
    n_shards: int


def plan_rollouts(
    cfg: Config,
    policy_path: str,
    prompts_table: pa.Table,
    r: RolloutConfig,
    s: Sampling,
    tokenizer_path: str | None,
    teacher_path: str | None,
) -> RolloutPlan:
    """Everything that can be wrong with the inputs is checked here, before any output exists."""
    models._check_dir(policy_path, "policy")
    tok = models.load_tokenizer(tokenizer_dir(policy_path, tokenizer_path), "policy")
    ctx_len = policy_context_length(policy_path)
    limit = prompt_limit(r, s, ctx_len)
    teacher_tok, compat = None, None
    if teacher_path:
        teacher_tok = models.load_tokenizer(teacher_path, "teacher")
        if cfg.score.cross_tokenizer == "align" and chat.id_map_fingerprint(
            tok
        ) != chat.id_map_fingerprint(teacher_tok):
            teacher_tok = None  # another tokenizer: score renders the teacher's own prefix
        else:
            compat = chat.check_compatible(
                {"student": tok, "teacher": teacher_tok}, "student.path / teacher.path"
            )
    where = "rollout.max_prompt_tokens"  # a huge prompt is refused before it is tokenized
    prompts_table, huge = input_limits.precheck(prompts_table, tok, limit, r.too_long, where)
    items = build_prompt_ids(tok, prompts_table, r, cfg.seed, teacher_tok)
    n_items = len(items) + len(huge)
    items, skipped = check_lengths(items, limit, r.too_long, where)
    skipped = huge + skipped
    by_shard = shard_groups(items, r.prompts_per_shard)
    n_shards = n_shards_for(n_items, r.prompts_per_shard)
    return RolloutPlan(tok, ctx_len, limit, compat, n_items, skipped, by_shard, n_shards)


def shard_groups(items: list[PromptIds], per_shard: int) -> dict[int, list[PromptIds]]:
    """Shard s holds generation points [s*P, (s+1)*P) (too-long ones already dropped)."""
    by_shard: dict[int, list[PromptIds]] = {}
    for p in items:
        by_shard.setdefault(p.index // per_shard, []).append(p)
    return by_shard


def prompt_limit(r: RolloutConfig, s: Sampling, ctx_len: int) -> int:
    """``rollout.max_prompt_tokens`` (null = what the context leaves after the response)."""
    limit = r.max_prompt_tokens if r.max_prompt_tokens is not None else ctx_len - s.max_new_tokens
    if limit + s.max_new_tokens > ctx_len:
        raise UserError(
            f"rollout.max_prompt_tokens={limit} + max_new_tokens={s.max_new_tokens} exceeds the "
            f"policy's context length {ctx_len}",
            "rollout.max_prompt_tokens",
            f"set it to at most {ctx_len - s.max_new_tokens} (or null for exactly that)",
        )
    if limit < 1:
        raise UserError(
            f"no room for a prompt: limit {limit} tokens (context {ctx_len}, "
            f"max_new_tokens {s.max_new_tokens})",
            "rollout.max_prompt_tokens / rollout.max_new_tokens",
            "lower rollout.max_new_tokens or set rollout.max_prompt_tokens >= 1",
        )
    return limit
