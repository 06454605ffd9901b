"""Scoring plan (pure): the roles of a score pass, the forward passes one shard needs, shared where
model and prefix agree, and the length buckets that batch them."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

PREFIX_COL = {
    "teacher": "teacher_prompt_ids",
    "behavior": "rollout_prompt_ids",
    "ref": "train_prompt_ids",
}


# ----------------------------------------------------------------------------- data classes
@dataclass(frozen=True)
class Role:
    """One scoring role: which model, after which prefix, and what it must produce."""

    name: str  # teacher | behavior | ref
    path: str
    dtype: str
    fingerprint: str
    k: int  # top-K ids this role needs (0 = none)
    entropy: bool  # needs the full-vocabulary entropy

    @property
    def model_key(self) -> tuple[str, str]:
        return (self.fingerprint, self.dtype)


# A pass key: (model key, prefix ids, response ids). Equal keys = identical numbers.
PassKey = tuple


@dataclass
class Pass:
    """One forward pass over prefix ⊕ response with one model, shared by every role that needs it."""

    key: PassKey
    role: Role  # the first role that asked for it (model path and dtype)
    prefix: list[int]
    response: list[int]
    k: int = 0
    entropy: bool = False
    # behaviour pass keys whose top-Kb ids this (teacher) pass must gather its log-probs at
    gathers: list[PassKey] = field(default_factory=list)
    result: dict[str, np.ndarray] | None = None
    gathered: dict[PassKey, np.ndarray] = field(default_factory=dict)  # key -> [R, Kb]


@dataclass
class ShardPlan:
    """The passes of one shard and which pass serves which (row, role)."""

    jobs: dict[PassKey, Pass]
    of: list[dict[str, PassKey]]  # per row: role -> pass key
    requests: int  # (row, role) pairs asked for; requests - len(jobs) were reused


# ----------------------------------------------------------------------------- planning (pure)
# What one more decoder forward costs beyond its tokens, in tokens of compute: every forward streams
# all weights from memory and runs ~30 kernels a layer, each a thread barrier (on a busy 2-core CPU,
# a fixed ~250 ms a forward for a 134M model: 8 tokens cost 450 ms, 64 tokens 440 ms). Trades
# padding against the number of forwards in ``length_buckets``.
FORWARD_COST_TOKENS = 256


def plan_shard(
    rows: list[dict], roles: list[Role], behavior_topk: int, teacher_of: list[Role] | None = None
) -> ShardPlan:
    """Group the (row, role) requests of a shard into distinct passes (pure, no model).
    ``teacher_of``: each row's routed teacher role (several teachers), replacing ``roles``' one."""
    jobs: dict[PassKey, Pass] = {}
    of: list[dict[str, PassKey]] = []
    for i, row in enumerate(rows):
        keys = {}
        for role in roles:
            if teacher_of is not None and role.name == "teacher":
                role = teacher_of[i]
            prefix = list(row[PREFIX_COL[role.name]])
            key = (role.model_key, tuple(prefix), tuple(row["response_ids"]))
            job = jobs.get(key)
            if job is None:
                job = jobs[key] = Pass(key, role, prefix, list(row["response_ids"]))
            job.k = max(job.k, role.k)
            job.entropy = job.entropy or role.entropy
            keys[role.name] = key
        if behavior_topk and keys["teacher"] != keys["behavior"]:
            # the teacher's log-probs on the behaviour's top-Kb ids need the teacher's full
            # distribution at those positions: gather them during the teacher pass
            t = jobs[keys["teacher"]]
            if keys["behavior"] not in t.gathers:
                t.gathers.append(keys["behavior"])
        of.append(keys)
    return ShardPlan(jobs, of, requests=len(rows) * len(roles))


def length_buckets(
    lengths: list[int], batch_tokens: int, forward_cost: int = FORWARD_COST_TOKENS
) -> list[list[int]]:
    """Indices grouped into batches of similar length with ``len(batch) * max_len <=
    batch_tokens`` (a longer sequence gets a batch of its own).

    The batches are runs of the length-sorted sequences, chosen (dynamic programming over the
    split points) to minimise ``padded tokens + forward_cost · batches``: one batch of every
    length pads short rows to the longest (29 % padding on the benchmark's 24 rollouts), one
    batch per sequence pays the per-forward cost each time.
    """
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    srt = np.array([lengths[i] for i in order], dtype=np.int64)  # [n] ascending
    n = len(order)
    best = np.zeros(n + 1, dtype=np.int64)  # best[i]: cost of the first i sorted sequences
    cut = np.zeros(n + 1, dtype=np.int64)  # cut[i]: where the last batch of those i starts
    for i in range(1, n + 1):  # the last batch is sorted[j:i], padded to srt[i - 1]
        first = max(0, i - max(1, batch_tokens // max(int(srt[i - 1]), 1)))
        j = np.arange(first, i)  # [c] candidate starts
        cost = best[first:i] + (i - j) * srt[i - 1] + forward_cost  # [c]
        pick = int(cost.argmin())
        best[i], cut[i] = cost[pick], first + pick
    batches: list[list[int]] = []
    i = n
    while i > 0:
        batches.append(order[int(cut[i]) : i])
        i = int(cut[i])
    return batches[::-1]
