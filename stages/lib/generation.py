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

import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from data_schemas import rollouts as rollouts_schema
from stages.lib import models, remote, safety, store, vllm_backend
from stages.lib.config import Config, RolloutConfig, as_dict
from stages.lib.decoding import Sample, Sampling
from stages.lib.engine import Engine, load_engine
from stages.lib.grading import answer_matches
from stages.lib.layout import RunLayout
from stages.lib.progress import QUIET, Progress, log
from stages.lib.rollout_plan import PromptIds, RolloutPlan, plan_rollouts, shard_seed

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
