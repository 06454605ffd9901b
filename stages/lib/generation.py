"""Sampling responses into a rollouts table: shared by the rollout stage and the SFT stage.

``generate_rollouts(cfg, policy_path, prompts_table, out_dir, stage_name)`` renders every prompt
into train / rollout / teacher prefixes (stages/lib/chat.py: chat templates, context placement,
EDGE-OPD guided rollouts, multi-turn expansion), checks the teacher tokenizer and the lengths before
anything is written, then samples ``n`` responses per generation point shard by shard with the HF
or the vLLM backend (stages/lib/decoding.py: one stop rule for both) and writes each shard
atomically through the shard store (resumable per shard, workers over disjoint shard ranges). Both
backends return, per sample, the token ids exactly as sampled (the stop token included when the
sample stopped on one) and the log-prob of each sampled token under the RAW model distribution
(temperature 1, before temperature / top-p), computed in fp32 over the full vocabulary.

Determinism: shard ``s`` is sampled from a seed derived from ``(seed, s)`` only, so the output does
not depend on the worker layout or on resume. For a given backend the same seed gives the same rows
(HF: also the same ``batch_size``, which fixes how the RNG stream is consumed).
"""

from __future__ import annotations

import hashlib
import math
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pyarrow as pa
import torch

from data_schemas import rollouts as rollouts_schema
from stages.lib import chat, decoding, input_limits, models, remote, safety, store, vllm_backend
from stages.lib.config import Config, RolloutConfig, as_dict
from stages.lib.decoding import Sample, Sampling
from stages.lib.errors import UserError
from stages.lib.grading import answer_matches
from stages.lib.layout import RunLayout
from stages.lib.progress import QUIET, Progress, log

# Rollout keys that change speed, memory or placement but not what is sampled (left out of the
# dataset id).
# The backend is one of them: both backends sample the same distribution into the same schema,
# so a run may resume on another machine with another backend (the manifest records which ran).
BACKEND_ONLY_KEYS = (
    "backend",
    "batch_size",
    "vllm_memory_fraction",
    "device",
    "tensor_parallel_size",
)
VLLM_MAX_LOGPROBS = 20  # vLLM's default; sharing one value lets the stages share cached engines


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


@dataclass
class Stats:
    """What one process generated (the one-line summary)."""

    samples: int = 0
    tokens: int = 0
    guided: int = 0
    seconds: float = 0.0  # inside the engine (generation), for tok/s
    seconds_total: float = 0.0  # the whole call, loading and writing included
    shards_written: int = 0
    shards_resumed: int = 0
    finish: Counter = field(default_factory=Counter)

    def summary(self) -> dict:
        return {
            "samples": self.samples,
            "tokens": self.tokens,
            "seconds": round(self.seconds, 3),
            "tok_per_s": round(self.tokens / self.seconds, 1) if self.seconds > 0 else 0.0,
            "guided_fraction": round(self.guided / self.samples, 4) if self.samples else 0.0,
            "mean_response_len": round(self.tokens / self.samples, 2) if self.samples else 0.0,
            "finish_reasons": dict(sorted(self.finish.items())),
            "shards_written": self.shards_written,
            "shards_resumed": self.shards_resumed,
        }


# ----------------------------------------------------------------------------- small pure helpers
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


# ----------------------------------------------------------------------------- the engine seam
@dataclass
class Engine:
    """A loaded policy: ``sample(prompt_ids, seed) -> per prompt list of Sample``."""

    backend: str
    sample: Any
    info: dict = field(default_factory=dict)


def load_engine(
    backend: str,
    policy_path: str,
    tok: Any,
    s: Sampling,
    r: RolloutConfig,
    *,
    dtype: str,
    ctx_len: int,
    device: torch.device | None = None,
) -> Engine:
    """The policy behind one ``sample`` call; ``device`` (HF only; None = auto) holds the model,
    inputs move to it and samples come back to the CPU (stages/lib/decoding.py)."""
    stops = decoding.stops_for(tok, policy_path, r.stop_token_ids, r.stop_strings)
    if backend == "vllm":
        # seed=0: every request carries its own seed, so the engine seed changes nothing, and a
        # constant keeps one cached engine across runs with different seeds.
        llm = vllm_backend.get_llm(
            policy_path,
            seed=0,
            max_model_len=ctx_len,
            max_logprobs=VLLM_MAX_LOGPROBS,
            dtype=dtype,
            gpu_memory_utilization=r.vllm_memory_fraction,
            tensor_parallel_size=r.tensor_parallel_size,
            tokenizer=tok.name_or_path if stops.strings else None,
        )

        def sample_vllm(prompt_ids: list[list[int]], seed: int) -> list[list[Sample]]:
            out = vllm_backend.generate(
                llm,
                prompt_ids,
                n=s.n,
                temperature=s.temperature,
                top_p=s.top_p,
                max_new_tokens=s.max_new_tokens,
                seed=seed,
                eos_id=stops.all_ids,
                stop=stops.strings,
            )
            return [[_vllm_sample(d, stops, s) for d in per] for per in out]

        return Engine("vllm", sample_vllm, {"stops": stops})

    device = device or models.pick_device("auto")
    model = models.load_model(policy_path, "policy", dtype=dtype, device=device)
    models.check_embedding_rows(model, tok, "policy")
    decoding.plain_generation_config(model, tok)
    n_ids = models.vocab_size(tok)

    def sample_hf(prompt_ids: list[list[int]], seed: int) -> list[list[Sample]]:
        return decoding.hf_generate(
            model,
            prompt_ids,
            s,
            stops=stops,
            pad=decoding.pad_id(tok),
            n_ids=n_ids,
            batch_size=r.batch_size,
            seed=seed,
            tok=tok,
        )

    return Engine("hf", sample_hf, {"device": str(device), "stops": stops})


def _vllm_sample(d: dict, stops: decoding.Stops, s: Sampling) -> Sample:
    """A vLLM sample cut and labelled by the same rule as the HF backend (stop strings too)."""
    length, reason = decoding.cut(d["response_ids"], stops, s.max_new_tokens)
    return Sample(d["response_ids"][:length], d["logprobs"][:length], reason)


def policy_context_length(path: str) -> int:
    """The policy's context length from its config (without loading the weights)."""
    from transformers import AutoConfig

    return models.context_length(SimpleNamespace(config=AutoConfig.from_pretrained(path)))


# ----------------------------------------------------------------------------- rows
def shard_table(
    prompts: list[PromptIds],
    samples: list[list[Sample]],
    s: Sampling,
    tok: Any,
    match: str = "words",
) -> pa.Table:
    cols: dict[str, list] = {f.name: [] for f in rollouts_schema.SCHEMA}
    for p, per in zip(prompts, samples, strict=True):
        for j, smp in enumerate(per):
            correct = None
            if p.answer is not None:
                text = tok.decode(smp.response_ids, skip_special_tokens=True)
                correct = answer_matches(text, p.answer, match)
            row = {
                "sample_id": f"{p.prompt_id}#{j}",
                "prompt_id": p.prompt_id,
                "sample_idx": j,
                "train_prompt_ids": p.train_ids,
                "rollout_prompt_ids": p.rollout_ids,
                "teacher_prompt_ids": p.teacher_ids,
                "response_ids": smp.response_ids,
                "behavior_logprobs": smp.logprobs,
                "response_len": len(smp.response_ids),
                "is_guided": p.is_guided,
                "finish_reason": smp.finish_reason,
                "temperature": s.temperature,
                "top_p": s.top_p,
                "answer": p.answer,
                "kind": p.kind,
                "correct": correct,
                "turn": p.turn,
            }
            for k, v in row.items():
                cols[k].append(v)
    return pa.Table.from_pydict(cols, schema=rollouts_schema.SCHEMA)


# ----------------------------------------------------------------------------- the driver
def tokenizer_dir(policy_path: str, fallback: str | None) -> str:
    """The policy's own tokenizer when saved next to it, else ``fallback`` (e.g. the student)."""
    p = Path(policy_path)
    has_tok = any((p / f).exists() for f in ("tokenizer.json", "tokenizer_config.json"))
    return policy_path if has_tok or not fallback else fallback


def generate_rollouts(
    cfg: Config,
    policy_path: str,
    prompts_table: pa.Table,
    out_dir: str | Path,
    stage_name: str,
    *,
    rollout: RolloutConfig | None = None,
    sampling: Sampling | None = None,
    dtype: str | None = None,
    tokenizer_path: str | None = None,
    teacher_path: str | None = None,
    fingerprints: dict | None = None,
    inputs: dict | None = None,
    extra: dict | None = None,
) -> dict:
    """Sample ``sampling.n`` responses per prompt from ``policy_path`` into a rollouts table.

    ``rollout`` (templates, guided fraction, lengths, shards, backend) defaults to ``cfg.rollout``
    and ``sampling`` to its n / temperature / top_p / max_new_tokens (temperature 0 = greedy).
    ``inputs`` must identify the prompts (e.g. ``{"prompts": sha256}``): it enters the dataset id.
    ``teacher_path``: the teacher whose tokenizer renders ``teacher_prompt_ids`` (checked against
    the policy's id -> token map first); None = the policy's tokenizer.
    Returns the summary dict (also printed as one line).
    """
    t_start = time.perf_counter()
    safety.check_output(out_dir, RunLayout.of(cfg.run_dir).root, f"the {stage_name} dataset")
    r = rollout or cfg.rollout
    s = sampling or Sampling.of(r)
    dtype = dtype or cfg.student.dtype
    plan = plan_rollouts(cfg, policy_path, prompts_table, r, s, tokenizer_path, teacher_path)
    fps = {
        "policy": models.model_fingerprint(policy_path, "policy"),
        "tokenizer": models.tokenizer_fingerprint(plan.tok),
        **(fingerprints or {}),
    }
    dataset_id = rollouts_dataset_id(stage_name, r, s, dtype, cfg.seed, fps, inputs or {})
    backend = vllm_backend.resolve_backend(r.backend, "rollout.backend")
    # checked before the writer opens: a missing GPU is a config error, not a half-run
    device = models.pick_device(r.device, "rollout.device") if backend == "hf" else None
    commit = {
        "config": as_dict(cfg),
        "fingerprints": fps,
        "inputs": inputs or {},
        "models": {"policy": policy_path},  # in the run (an SFT checkpoint): run-relative
        "extra": {
            "policy_path": store.shown_path(policy_path, store.run_root_of(out_dir), cfg.run_dir),
            "backend": backend,
            "n_prompts": prompts_table.num_rows,
            "skipped_too_long": plan.skipped,
            "max_prompt_tokens": plan.limit,
            # one per prompt, or more when rollout.expand_turns expanded conversations
            "n_generation_points": plan.n_items,
            **({"tokenizers": plan.compat} if plan.compat else {}),
            **(extra or {}),
        },
    }

    tok, ctx_len = plan.tok, plan.ctx_len  # (not `plan`: a Ray actor gets engine, not the plan)

    def engine(on_actor: bool = False) -> Engine:
        dev, path = device, policy_path
        if on_actor:  # a Ray actor: the device of its own machine; the policy fetched there
            dev = models.pick_device(r.device, "rollout.device") if backend == "hf" else None
            path = remote.localize(policy_path)  # (a run in a bucket: an SFT checkpoint in it)
        return load_engine(backend, path, tok, s, r, dtype=dtype, ctx_len=ctx_len, device=dev)

    stats = Stats()
    complete = _write_rollouts(
        cfg, out_dir, stage_name, dataset_id, plan, s, r.match, engine, stats, commit
    )
    stats.seconds_total = time.perf_counter() - t_start
    summary = {
        "stage": stage_name,
        "backend": backend,
        "policy_path": str(policy_path),
        "dataset_id": dataset_id,
        "complete": complete,
        "skipped_too_long": len(plan.skipped),
        **stats.summary(),
        "wall_seconds": round(stats.seconds_total, 3),
    }
    log.info(summary_line(summary, stats, stage_name, out_dir))
    return summary


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


def _write_rollouts(
    cfg: Config,
    out_dir: str | Path,
    stage_name: str,
    dataset_id: str,
    plan: RolloutPlan,
    s: Sampling,
    match: str,
    engine: Any,
    stats: Stats,
    commit: dict,
) -> bool:
    """Sample and write this worker's missing shards (``engine()`` loads the policy only when
    one is missing), then commit when every shard exists; returns whether the dataset is complete.
    ``commit``: the manifest's config / fingerprints / inputs / extra."""
    mine = store.shards_of_worker(plan.n_shards, cfg.worker.index, cfg.worker.count)
    with store.open_writer(
        out_dir,
        rollouts_schema,
        dataset_id=dataset_id,
        stage=stage_name,
        overwrite=cfg.overwrite,
        worker_index=cfg.worker.index,
        worker_count=cfg.worker.count,
        vocab_size=models.vocab_size(plan.tok),
    ) as w:
        todo = [] if w.complete else [sh for sh in mine if not w.is_done(sh)]
        stats.shards_resumed = 0 if w.complete else len(mine) - len(todo)
        if todo and cfg.launcher.kind == "ray":
            _sample_on_ray(cfg, w, engine, todo, plan, s, stats, stage_name, match)
        elif todo:
            _sample_shards(
                w, engine(), todo, plan.by_shard, s, plan.tok, stats, stage_name, cfg.seed, match
            )
        if not w.complete:
            w.commit(plan.n_shards, **commit)
        return w.complete


def shard_groups(items: list[PromptIds], per_shard: int) -> dict[int, list[PromptIds]]:
    """Shard s holds generation points [s*P, (s+1)*P) (too-long ones already dropped)."""
    by_shard: dict[int, list[PromptIds]] = {}
    for p in items:
        by_shard.setdefault(p.index // per_shard, []).append(p)
    return by_shard


def rollouts_dataset_id(
    stage: str, r: RolloutConfig, s: Sampling, dtype: str, seed: int, fps: dict, inputs: dict
) -> str:
    """Everything that decides what is sampled (not the backend or batch sizes)."""
    rollout_key = {k: v for k, v in asdict(r).items() if k not in BACKEND_ONLY_KEYS}
    return store.content_id(
        {
            "stage": stage,
            "rollout": rollout_key,
            "sampling": asdict(s),
            "dtype": dtype,
            "seed": seed,
            "fingerprints": fps,
            "inputs": inputs,
        }
    )


def summary_line(summary: dict, stats: Stats, stage_name: str, out_dir: str | Path) -> str:
    """The stage's last line: what it generated and where it wrote."""
    if summary["complete"] and not stats.shards_written:
        return f"[{stage_name}] already complete ({out_dir}, dataset {summary['dataset_id']})"
    where = f"wrote {out_dir}" if summary["complete"] else f"wrote shards to {out_dir}"
    skipped = summary["skipped_too_long"]
    return (
        f"[{stage_name}] {summary['samples']} samples, {summary['tokens']} tokens, "
        f"{summary['tok_per_s']} tok/s ({summary['backend']}), "
        f"guided {summary['guided_fraction']:.2f}, mean len {summary['mean_response_len']}, "
        f"finish {summary['finish_reasons']}, "
        f"shards {stats.shards_written} written / {stats.shards_resumed} resumed"
        + (f", {skipped} too-long prompts skipped" if skipped else "")
        + ("" if summary["complete"] else " (other workers still running)")
        + f"; {where}"
    )


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


def _sample_shards(
    w: store.DatasetWriter,
    engine: Engine,
    todo: list[int],
    by_shard: dict[int, list[PromptIds]],
    s: Sampling,
    tok: Any,
    stats: Stats,
    stage_name: str,
    seed: int,
    match: str = "words",
    progress: Any = None,
) -> None:
    """Generate and write shards one at a time: memory holds one shard, a kill loses one shard.
    ``progress``: where to count prompts (None = a bar of this call's own)."""
    bar = progress or Progress(sum(len(by_shard.get(sh, [])) for sh in todo), stage_name)
    try:
        for sh in todo:
            prompts = by_shard.get(sh, [])
            t0 = time.perf_counter()
            samples = (
                engine.sample([p.rollout_ids for p in prompts], shard_seed(seed, sh))
                if prompts
                else []
            )
            stats.seconds += time.perf_counter() - t0
            w.write_shard(sh, shard_table(prompts, samples, s, tok, match))
            stats.shards_written += 1
            for p, per in zip(prompts, samples, strict=True):
                for smp in per:
                    stats.samples += 1
                    stats.tokens += len(smp.response_ids)
                    stats.guided += p.is_guided
                    stats.finish[smp.finish_reason] += 1
            bar.update(len(prompts))
    finally:
        bar.close()


def _sample_on_ray(
    cfg: Config,
    w: store.DatasetWriter,
    engine: Any,
    todo: list[int],
    plan: RolloutPlan,
    s: Sampling,
    stats: Stats,
    stage_name: str,
    match: str,
) -> None:
    """``launcher.kind=ray``: Ray actors sample the shards ``todo`` (one engine each, loaded once,
    on the device ``rollout.device`` picks on the actor's machine); stats merged here."""
    from stages.lib import raylaunch

    by_shard, tok, seed = plan.by_shard, plan.tok, cfg.seed

    def make(aw: store.DatasetWriter):  # runs on each actor, once
        eng = engine(on_actor=True)

        def one(sh: int, prompts: list[PromptIds]) -> Stats:  # the shard's prompts come with it
            got = Stats()
            args = ({sh: prompts}, s, tok, got, stage_name, seed, match)
            _sample_shards(aw, eng, [sh], *args, progress=QUIET)
            return got

        return one

    def merge(sh: int, got: Stats | None) -> None:
        if got is None:  # committed by an attempt that died after its rename
            return
        stats.samples += got.samples
        stats.tokens += got.tokens
        stats.guided += got.guided
        stats.seconds += got.seconds
        stats.shards_written += got.shards_written
        stats.finish.update(got.finish)

    units = {sh: len(by_shard.get(sh, [])) for sh in todo}
    raylaunch.run_shards(
        cfg.launcher,
        w,
        todo,
        make,
        units=units,
        on_result=merge,
        desc=stage_name,
        unit="prompts",
        inputs=lambda sh: by_shard.get(sh, []),
        run_dir=cfg.run_dir,
    )
