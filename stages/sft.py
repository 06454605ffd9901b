"""SFT stage: the teacher answers the prompts, the student is trained with cross-entropy on them.

Lightning OPD's recipe starts OPD from a student SFT-ed on the OPD teacher's own answers (teacher
consistency). Reads ``data.prompts``, ``teacher.path`` (the policy that answers; it sees
``rollout.teacher_template``, so a self-teacher may read the context) and ``student.path``.
Writes ``run_dir/sft_data/`` (the teacher's answers: a rollouts table whose manifest records the
SFT teacher's fingerprint, which the score stage checks against the OPD teacher),
``run_dir/selected/sft/`` (the answers as a train-ready table: weight 1 on every answer token, the
teacher's own log-prob as ``teacher_logprob``, no top-K) and ``run_dir/checkpoints/sft/final``
(the SFT student, trained by stages/train.py with ``loss=sft``). The rollout stage then samples
from this checkpoint and the trainer starts from it.

Run: ``python -m stages.sft experiment=demo_lightning`` (the pipeline runs it when sft.enabled).
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from data_schemas import prompts as prompts_schema
from data_schemas import rollouts as rollouts_schema
from data_schemas import selected as selected_schema
from stages.lib import models, store
from stages.lib.config import Config, sft_config
from stages.lib.entry import hydra_entry
from stages.lib.generation import Sampling, generate_rollouts
from stages.lib.layout import RunLayout


def sft_data_dir(cfg: Config) -> Path:
    return RunLayout.of(cfg.run_dir).sft_data


def to_selected(rollouts: pa.Table) -> pa.Table:
    """Teacher answers -> train-ready rows: every answer token weighted 1, no top-K (K = 0)."""
    n = rollouts.num_rows
    lens = rollouts["response_len"]
    ones = pa.array([[1.0] * t for t in lens.to_pylist()], pa.list_(pa.float32()))
    zeros_u8 = pa.array([[0] * t for t in lens.to_pylist()], pa.list_(pa.uint8()))
    zeros_f = pa.array([[0.0] * t for t in lens.to_pylist()], pa.list_(pa.float32()))
    empty_i = pa.array([[] for _ in range(n)], pa.list_(pa.int32()))
    types = {f.name: f.type for f in selected_schema.SCHEMA}
    empty_f = pa.array([[] for _ in range(n)], types["teacher_topk_logprobs"])
    cols = {
        "sample_id": rollouts["sample_id"],
        "prompt_id": rollouts["prompt_id"],
        "is_guided": rollouts["is_guided"],
        "train_prompt_ids": rollouts["train_prompt_ids"],
        "response_ids": rollouts["response_ids"],
        "response_len": lens,
        "n_kept": lens,
        "weights": ones,
        "segments": zeros_u8,
        # the teacher sampled these tokens: its own log-prob is the teacher log-prob
        "teacher_logprob": rollouts["behavior_logprobs"],
        "behavior_logprob": rollouts["behavior_logprobs"],
        "ref_logprob": pa.nulls(n, pa.list_(pa.float32())),
        "topk_k": pa.array([0] * n, pa.int32()),
        "teacher_topk_ids": empty_i,
        "teacher_topk_logprobs": empty_f,
        "teacher_topk_logmass": zeros_f,
        "behavior_topk_k": pa.array([0] * n, pa.int32()),
        "behavior_topk_ids": pa.nulls(n, pa.list_(pa.int32())),
        "teacher_logprobs_on_behavior_topk": pa.nulls(
            n, types["teacher_logprobs_on_behavior_topk"]
        ),
    }
    return pa.Table.from_pydict(cols, schema=selected_schema.SCHEMA)


def write_selected(cfg: Config, sft_manifest: dict, tok_vocab: int) -> dict:
    src = sft_data_dir(cfg)
    out = RunLayout.of(cfg.run_dir).sft_selected
    did = store.content_id({"sft_data": sft_manifest["dataset_id"]})
    with store.open_writer(
        out,
        selected_schema,
        dataset_id=did,
        stage="sft",
        overwrite=cfg.overwrite,
        vocab_size=tok_vocab,
    ) as w:
        if not w.complete:
            paths = store.shard_paths(src, sft_manifest)
            for s, p in enumerate(paths):
                if not w.is_done(s):
                    t = rollouts_schema.validate(pq.read_table(p), where=str(p))
                    w.write_shard(s, to_selected(t))
            w.commit(
                len(paths),
                config={},
                fingerprints=sft_manifest["fingerprints"],
                inputs={"sft_data": sft_manifest["dataset_id"]},
                extra={"summary": {"sequences": sft_manifest["rows"]}},
            )
    return store.open_committed(out, selected_schema, what_writes_it="python -m stages.sft")


def run(cfg: Config) -> dict:
    from stages import train

    # One derived config for the whole stage (stages.lib.config.SFT_OVERRIDES): the teacher
    # answers from its own view (teacher_template, every prompt with a context), and the student
    # trains on the answers with loss=sft under train.name=sft.
    scfg = sft_config(cfg)
    prompts = prompts_schema.read(scfg.data.prompts, max_prompts=scfg.data.max_prompts)
    tok_s = models.load_tokenizer(scfg.student.path, "student")
    tok_t = models.load_tokenizer(scfg.teacher.path, "teacher")
    models.check_same_tokenizer(
        models.tokenizer_fingerprint(tok_s),
        models.tokenizer_fingerprint(tok_t),
        "student",
        "teacher",
    )
    s = Sampling(
        n=scfg.sft.n,
        temperature=scfg.sft.temperature,
        top_p=1.0,
        max_new_tokens=scfg.rollout.max_new_tokens,
    )
    summary = generate_rollouts(
        scfg,
        scfg.teacher.path,
        prompts,
        sft_data_dir(scfg),
        "sft",
        rollout=scfg.rollout,
        sampling=s,
        dtype=scfg.teacher.dtype,
        tokenizer_path=scfg.teacher.path,
        fingerprints={"teacher": models.model_fingerprint(scfg.teacher.path, "teacher")},
        inputs={
            "prompts": store.file_sha256(scfg.data.prompts),
            "max_prompts": scfg.data.max_prompts,
        },
    )
    m = store.open_committed(
        sft_data_dir(scfg), rollouts_schema, what_writes_it="python -m stages.sft"
    )
    write_selected(scfg, m, models.vocab_size(tok_s))
    summary["train"] = train.run(scfg)
    lay = RunLayout.of(scfg.run_dir)
    print(f"sft: wrote {lay.sft_data}, {lay.sft_selected}, {lay.sft_final}", flush=True)
    return summary


main = hydra_entry("sft")(run)

if __name__ == "__main__":
    main()
