"""Select stage: decide, in SQL, which tokens carry the learning signal; write train-ready rows.

Reads ``run_dir/rollouts/`` and ``run_dir/tokens/`` (both verified with ``store.open_committed``,
then read in place by DuckDB) and writes ``run_dir/selected/<select.name>/`` (the ``selected``
table: one row per sequence with per-token ``weights``, the teacher/behaviour/reference columns and
the teacher top-K flattened to T*K) plus a summary in the manifest (``extra.summary``), printed as a
small table. Several selections of one run coexist; a re-run with the same inputs and config is a
no-op, a killed run resumes per shard, another config is refused unless ``overwrite=true``.

    python -m stages.select run_dir=runs/demo select=entropy_half
    python -m stages.select run_dir=runs/demo select=evidence 'select.rules.0.params.threshold=0.5'

How it works:

1. Pass 1 (DuckDB, CPU, memory-bounded: ``select.memory_limit``, spills to a per-process folder
   under ``run_dir/.duckdb_tmp/``; the views come from ``stages.lib.views``, the one way a run is
   opened): the token values it reads are checked first (NaN/inf, positive log-probs: an error
   naming the column, shard and row), then each rule of ``select.rules`` is one parameterised SQL file in
   ``stages/sql_policies/<policy>.sql`` (read the header of each for its formula, its paper and its
   parameters; parameters are DuckDB prepared parameters ``$name``, validated here first). A policy
   returns a weight for every token (0 = excluded); rules compose by the product of their weights.
   ``policy`` may also be a path to your own ``.sql`` file following the same contract (all.sql).
2. Pass 2 (per input shard, Arrow): the weights of a tokens shard are joined back by row number,
   tokens are put in sequence order, checked against the rollouts (ids, lengths, positions), and
   written as per-sequence rows (``select.rows_per_shard`` per output shard). A sequence whose
   tokens are all excluded stays (``n_kept = 0``) and is counted, never dropped silently.
   Columnar throughout: a per-sequence list column is the tokens' flat values plus new offsets
   (no copy when the rows are already in sequence order, as the score stage writes them); the
   codec's top-K deltas are decoded once, straight to float32; shard s is written by a
   background thread while shard s+1 is read and assembled.

Where the time goes (5M tokens, K = 32, 25 shards, 2 cores; ``scripts/bench_select.py``): Parquet
write of the output ~35 % of the CPU, Parquet read of the inputs ~25 %, DuckDB ~15 %, top-K decode
and assembly ~12 %, checksums of inputs and outputs ~7 %, output validation ~3 %.

Selections from rollout-time values (behaviour entropy/log-probs) are exact for one pass over fresh
rollouts and a proxy afterwards; the behaviour log-prob is kept so the trainer can measure staleness.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from data_schemas import manifest as manifest_mod
from data_schemas import rollouts, selected, tokens
from stages.lib import integrity, safety, store
from stages.lib.config import Config, SelectConfig, as_dict
from stages.lib.entry import hydra_entry
from stages.lib.errors import UserError
from stages.lib.layout import RunLayout
from stages.lib.progress import log
from stages.lib.selection.assemble import ROLLOUT_COLUMNS, assemble, read_tokens_shard
from stages.lib.selection.policies import Rule, resolve_rule
from stages.lib.selection.summary import print_summary, summarize
from stages.lib.selection.weights import (
    check_needs,
    check_values,
    compute_weights,
    open_pass1,
    shard_weights,
)
from stages.lib.spec import StageSpec


def output_plan(ro_manifest: dict, rows_per_shard: int) -> list[int]:
    """First output shard of each input shard (plus the total at the end): deterministic resume."""
    starts = [0]
    for s in ro_manifest["shards"]:
        starts.append(starts[-1] + math.ceil(s["rows"] / rows_per_shard))
    return starts


# ----------------------------------------------------------------------------- the stage
def dataset_id_of(ro_id: str, tk_id: str, sel: SelectConfig, seed: int) -> str:
    # memory_limit/threads change how, not what: they do not enter the id
    cfg = {k: v for k, v in as_dict_select(sel).items() if k not in ("memory_limit", "threads")}
    return store.content_id({"rollouts": ro_id, "tokens": tk_id, "select": cfg, "seed": seed})


def as_dict_select(sel: SelectConfig) -> dict:
    return {
        "name": sel.name,
        "rules": [{"policy": r.policy, "params": dict(r.params)} for r in sel.rules],
        "rows_per_shard": sel.rows_per_shard,
        "row_group_rows": sel.row_group_rows,
        "memory_limit": sel.memory_limit,
        "threads": sel.threads,
    }


def _vocab_ln(*manifests: dict) -> float:
    """ln V for the entropy normaliser H/ln V (it only scales the sampling keys and sets the floor)."""
    for m in manifests:
        for where in (m.get("extra", {}), m.get("extra", {}).get("tokenizer", {})):
            v = where.get("vocab_size") if isinstance(where, dict) else None
            if isinstance(v, int) and v > 1:
                return math.log(v)
    return 1.0


def _inputs(layout: RunLayout) -> tuple[dict, dict]:
    """The verified rollouts and tokens manifests, checked to belong together."""
    ro_m = store.open_committed(
        layout.rollouts, rollouts, what_writes_it="python -m stages.rollout"
    )
    tk_m = store.open_committed(layout.tokens, tokens, what_writes_it="python -m stages.score")
    fix = "re-run python -m stages.score with overwrite=true"
    if tk_m["inputs"].get("rollouts", ro_m["dataset_id"]) != ro_m["dataset_id"]:
        raise UserError(
            "the tokens were scored from other rollouts than the ones in this run",
            str(layout.tokens),
            fix,
        )
    if len(tk_m["shards"]) != len(ro_m["shards"]):
        raise UserError(
            f"tokens has {len(tk_m['shards'])} shards, rollouts {len(ro_m['shards'])} (must be 1:1)",
            str(layout.tokens),
            fix,
        )
    return ro_m, tk_m


def _check_config(sel: SelectConfig, layout: RunLayout) -> list[Rule]:
    layout.selected(sel.name)  # a safe folder name, or a UserError
    if sel.rows_per_shard < 1:
        raise UserError("select.rows_per_shard must be >= 1", "config", "fix select.rows_per_shard")
    if not sel.rules:
        raise UserError("select.rules is empty", "config", "give at least one rule (policy: all)")
    return [resolve_rule(r.policy, r.params) for r in sel.rules]


def _done(out_dir: Path, dataset_id: str, cfg: Config) -> dict | None:
    """The summary of an up-to-date selection; refuses another one unless ``overwrite``."""
    existing = store.up_to_date(  # refused before the expensive pass, not at the writer
        out_dir,
        dataset_id,
        overwrite=cfg.overwrite,
        what="a selection",
        fix="pass overwrite=true to replace it, or choose another select.name",
    )
    return None if existing is None else existing["extra"].get("summary", {})


def run(cfg: Config) -> dict:
    sel, layout = cfg.select, RunLayout.of(cfg.run_dir)
    rules = _check_config(sel, layout)
    out_dir = layout.selected(sel.name)
    for out in (out_dir, layout.duckdb_tmp):  # no write or delete through a symlink out of the run
        safety.check_output(out, layout.root, f"select.name={sel.name}")
    ro_m, tk_m = _inputs(layout)
    dataset_id = dataset_id_of(ro_m["dataset_id"], tk_m["dataset_id"], sel, cfg.seed)
    summary = _done(out_dir, dataset_id, cfg)
    if summary is not None:
        print_summary(summary, sel.name)
        log.info(f"select: {out_dir} is up to date (dataset {dataset_id}); nothing written")
        return {"dataset_id": dataset_id, "dir": str(out_dir), "summary": summary}
    tmp_dir = layout.duckdb_tmp / f"select-{sel.name}-{os.getpid()}"  # per process
    con = None
    try:
        con = open_pass1(layout, {"rollouts": ro_m, "tokens": tk_m}, tmp_dir, sel)
        check_values(con, layout.tokens)
        integrity.check_select_inputs(  # keys, ids against the vocabulary, top-K order
            con,
            layout.rollouts,
            layout.tokens,
            store.shard_paths(layout.tokens, tk_m),
            integrity.manifest_vocab_size(tk_m, ro_m),
        )
        check_needs(con, rules, str(layout.tokens))
        compute_weights(con, rules, seed=cfg.seed, ln_v=_vocab_ln(tk_m, ro_m))
        summary = summarize(con)
        _check_kept(summary, sel, rules)
        summary["sequences_no_kept"] = write_selected(
            con, cfg, dataset_id, out_dir, layout, ro_m, tk_m, rules, summary
        )
    finally:
        if con is not None:
            con.close()
        shutil.rmtree(tmp_dir, ignore_errors=True)
        with contextlib.suppress(OSError):  # the shared parent, once no select uses it
            tmp_dir.parent.rmdir()
    print_summary(summary, sel.name)
    m = manifest_mod.read(out_dir)
    log.info(
        f"select: wrote {m['rows']} sequences in {len(m['shards'])} shard(s) to {out_dir} "
        f"(dataset {dataset_id})"
    )
    return {"dataset_id": dataset_id, "dir": str(out_dir), "summary": summary}


def _check_kept(summary: dict, sel: SelectConfig, rules: list[Rule]) -> None:
    if summary["tokens_kept"] == 0:
        desc = "; ".join(f"{r.policy} {r.params}" for r in rules)
        raise UserError(
            f"selection '{sel.name}' keeps 0 of {summary['student_tokens']} student tokens "
            f"({desc}): nothing to train on",
            "select.rules",
            "loosen the policy parameters (e.g. a lower threshold) or choose another policy",
        )


def write_selected(con, cfg, dataset_id, out_dir, layout, ro_m, tk_m, rules, summary) -> int:
    """Pass 2: per input shard, assemble and write; commit the manifest. Returns #n_kept==0 rows.

    Writing (validation, zstd, fsync) runs in one background thread while the next shard is read
    and assembled: Parquet IO and numpy release the GIL, so the two overlap on a second core.
    At most one assembled shard waits to be written (memory stays bounded), and shards are
    written in order, one at a time, as before.
    """
    sel = cfg.select
    plan = output_plan(ro_m, sel.rows_per_shard)
    tk_dir = layout.tokens
    ro_paths, tk_paths = store.shard_paths(layout.rollouts, ro_m), store.shard_paths(tk_dir, tk_m)
    no_kept = 0

    def write(w: store.DatasetWriter, outs: range, table: pa.Table) -> None:
        for j, o in enumerate(outs):
            w.write_shard(o, table.slice(j * sel.rows_per_shard, sel.rows_per_shard))

    with (
        store.open_writer(
            out_dir,
            selected,
            dataset_id=dataset_id,
            stage="select",
            overwrite=cfg.overwrite,
            row_group_rows=min(sel.rows_per_shard, sel.row_group_rows),
        ) as w,
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="select-write") as writer,
    ):
        pending: Future | None = None
        for s in range(len(ro_paths)):
            outs = range(plan[s], plan[s + 1])
            if all(w.is_done(o) for o in outs):  # resume: already written
                for o in outs:
                    n_kept = pq.read_table(w.shard_path(o), columns=["n_kept"])["n_kept"]
                    no_kept += int((n_kept.to_numpy() == 0).sum())
                continue
            ro = pq.read_table(ro_paths[s], columns=list(ROLLOUT_COLUMNS))
            tk = read_tokens_shard(tk_paths[s])
            weight = shard_weights(con, s, tk.num_rows)  # [N] aligned with the tokens rows
            table = assemble(ro, tk, weight, f"shard {s} of {tk_dir}")
            no_kept += int((table["n_kept"].to_numpy() == 0).sum())
            if pending is not None:
                pending.result()  # raises the writer's error, if any
            pending = writer.submit(write, w, outs, table)
        if pending is not None:
            pending.result()
        summary["sequences_no_kept"] = no_kept
        models = {  # each manifest's model folders, resolved here (run-relative ones too)
            role: store.model_path(m, role, directory=d)
            for m, d in ((ro_m, layout.rollouts), (tk_m, tk_dir))
            for role in (m.get("models") or {})
        }
        w.commit(
            plan[-1],
            config=as_dict(cfg),
            fingerprints={**ro_m["fingerprints"], **tk_m["fingerprints"]},
            inputs={"rollouts": ro_m["dataset_id"], "tokens": tk_m["dataset_id"]},
            models=models,
            teacher_temperature=tk_m.get("teacher_temperature"),
            extra={
                "summary": summary,
                "rules": [{"policy": r.policy, "params": r.params} for r in rules],
            },
        )
    return no_kept


SPEC = StageSpec(
    name="select",
    run=run,
    config=SelectConfig,
    uses=(),
    reads=("rollouts/", "tokens/"),
    writes=("selected/<select.name>/",),
    dataset_id=("rollouts id", "tokens id", "select (not memory_limit, threads)", "seed"),
    extras=("s3",),
    rounds=True,
    variants=True,
)

main = hydra_entry("select")(run)

if __name__ == "__main__":
    main()
