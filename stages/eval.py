"""Eval stage: greedy accuracy of checkpoints on eval sets, and reverse KL to the teacher.

Reads: ``data.eval_sets`` (prompts files with verifiable ``answer``s), the checkpoints to evaluate
(``eval.checkpoints``: names under ``run_dir/checkpoints/<name>/final`` or model paths; empty = the
base student, the SFT checkpoint if any, every trained ``checkpoints/*/final`` and those of later
rounds, ``round<r>/checkpoints/*/final``), and the
teacher (``teacher.path``) for the KL column.
Writes: ``run_dir/eval/results.json`` (atomically), every greedy generation (text and ids) in
``run_dir/eval/generations/<checkpoint>/<set>.parquet`` (``GENERATIONS_SCHEMA``; off with
``eval.save_generations=false``) and a table on stdout. Results are cached per (checkpoint
fingerprint, eval set, settings), so re-running after one more training only evaluates the new
checkpoint. An adapter-only checkpoint (``train.lora.save_merged=false``) is applied to its base
through peft; a tokenizer without a pad token pads with EOS.

Accuracy: greedy decoding (stages/lib/decoding.py, the rollout's decoder and stop rule) of the
prompt rendered as the student's training prefix (stages/lib/chat.py; closed-book: no context),
graded by ``eval.match`` (``stages.lib.grading.answer_matches``); optional sampled pass@k.
KL: the checkpoint answers ``eval.kl_prompts`` prompts of ``eval.kl_set`` greedily; the mean over
response tokens of the exact full-vocabulary KL(pi_theta || pi_T), the teacher reading the
response after its own prefix (the context in the configured place, so a self-teacher sees the
evidence).

Run: ``python -m stages.eval experiment=demo [eval.checkpoints=[base,topk_fkl-evidence]]``
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from data_schemas import prompts as prompts_schema
from stages.lib import adapters, chat, decoding, models, safety
from stages.lib.adapters import adapter_base, is_adapter_dir
from stages.lib.config import Config, EvalConfig, as_dict
from stages.lib.entry import hydra_entry
from stages.lib.errors import UserError
from stages.lib.grading import answer_matches
from stages.lib.layout import RunLayout, check_name
from stages.lib.progress import Progress, log
from stages.lib.spec import StageSpec
from stages.lib.store import atomic_write_text, content_id


def checkpoint_paths(cfg: Config) -> dict[str, str]:
    """Name -> model directory of every checkpoint to evaluate (base first)."""
    layout = RunLayout.of(cfg.run_dir)
    later = round_checkpoints(layout)
    if cfg.eval.checkpoints:
        out = {}
        for c in cfg.eval.checkpoints:
            if c == "base":
                out["base"] = cfg.student.path
            elif _is_name(c) and layout.final(c).is_dir():
                out[c] = str(layout.final(c))
            elif c in later:
                out[c] = str(later[c])
            elif Path(c).is_dir():
                out[Path(c).name] = c
            else:
                raise UserError(
                    f"checkpoint '{c}' not found",
                    f"{layout.checkpoints_root} or a path",
                    "train it first, or list names from run_dir/checkpoints/",
                )
        return out
    out = {"base": cfg.student.path}
    if layout.sft_final.is_dir():
        out["sft"] = str(layout.sft_final)
    root = layout.checkpoints_root
    for d in sorted(root.glob("*/final")) if root.is_dir() else []:
        if d.parent.name != "sft":  # a name read from disk: it becomes a path and a label
            out[safety.check_disk_name(d.parent.name, d.parent, "checkpoint folder")] = str(d)
    out.update({name: str(d) for name, d in later.items()})
    return out


def _is_name(c: str) -> bool:
    try:
        check_name(c, "eval.checkpoints")
    except UserError:
        return False
    return True


def round_checkpoints(layout: RunLayout) -> dict[str, Path]:
    """Later rounds of fresh rollouts (``pipeline.rounds``), in round order:
    ``run_dir/round<r>/checkpoints/<name>-r<r>/final``."""
    found = []
    for r, rl in layout.rounds().items():
        if r >= 2 and rl.checkpoints_root.is_dir():
            for d in sorted(rl.checkpoints_root.glob("*/final")):
                found.append((r, safety.check_disk_name(d.parent.name, d.parent, "checkpoint"), d))
    return {name: d for _, name, d in sorted(found)}


@torch.inference_mode()
def reverse_kl_per_token(
    student,
    teacher,
    s_prefix: list[list[int]],
    t_prefix: list[list[int]],
    responses: list[list[int]],
    vocab_size: int,
) -> float:
    """Mean over response tokens of the exact KL(pi_student || pi_teacher), full vocabulary."""
    total, count = 0.0, 0
    for sp, tp, resp in zip(s_prefix, t_prefix, responses, strict=True):
        if not resp:
            continue
        logps = []
        for model, prefix in ((student, sp), (teacher, tp)):
            ids = torch.tensor([prefix + resp])
            logits = model(input_ids=ids).logits[0, len(prefix) - 1 : -1, :vocab_size].float()
            logps.append(torch.log_softmax(logits, -1))  # [T, V]
        ls, lt = logps
        total += (ls.exp() * (ls - lt)).sum().item()
        count += len(resp)
    return total / max(count, 1)


def load_checkpoint(cfg: Config, name: str, path: str):
    """A model to evaluate; adapter-only checkpoints are applied to their base through peft and
    merged."""
    if not is_adapter_dir(path):
        return models.load_model(path, f"checkpoint {name}")
    base = models.load_model(adapter_base(path, cfg.student.path), f"base of checkpoint {name}")
    return adapters.merged(base, path, f"checkpoint {name} (a LoRA adapter only)")


def checkpoint_fingerprint(cfg: Config, name: str, path: str) -> str:
    """The model fingerprint, or for an adapter its files' hash with its base's fingerprint."""
    if not is_adapter_dir(path):
        return models.model_fingerprint(path, name)
    h = hashlib.sha256(
        models.model_fingerprint(adapter_base(path, cfg.student.path), "base").encode()
    )
    for f in sorted(Path(path).iterdir()):
        if f.is_file() and f.name.startswith("adapter_"):
            h.update(f.name.encode() + f.read_bytes())
    return "adapter-" + h.hexdigest()[:16]


def checkpoint_tokenizer(cfg: Config, name: str, path: str):
    has_tok = any((Path(path) / f).exists() for f in ("tokenizer.json", "tokenizer_config.json"))
    if is_adapter_dir(path) and not has_tok:
        return models.load_tokenizer(cfg.student.path, "student")
    if is_adapter_dir(path):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path)
    return models.load_tokenizer(path, name)


def accuracy_entry(
    cfg: Config, model, tok, stops, rows: list[dict], prefixes: list[list[int]]
) -> tuple[dict, list[dict]]:
    """Greedy accuracy on one set (plus sampled pass@k), and the per-prompt generations."""
    e = cfg.eval
    outs = decoding.greedy(
        model, tok, prefixes, max_new_tokens=e.max_new_tokens, batch_size=e.batch_size, stops=stops
    )
    texts = tok.batch_decode([o.response_ids for o in outs], skip_special_tokens=True)
    correct = [answer_matches(t, r["answer"], e.match) for t, r in zip(texts, rows, strict=True)]
    entry = {"accuracy": sum(correct) / len(rows), "n": len(rows), "correct": sum(correct)}
    gens = [
        {
            "prompt_id": r["id"],
            "prompt_ids": p,
            "response_ids": o.response_ids,
            "response": t,
            "finish_reason": o.finish_reason,
            "answer": r["answer"],
            "correct": c,
        }
        for r, p, o, t, c in zip(rows, prefixes, outs, texts, correct, strict=True)
    ]
    if e.pass_k > 0:
        hit = [False] * len(rows)
        for k in range(e.pass_k):
            s = decoding.Sampling(1, e.temperature, 1.0, e.max_new_tokens)
            per = decoding.sample_many(
                model, tok, prefixes, s, batch_size=e.batch_size, seed=cfg.seed + k, stops=stops
            )
            for i, smp in enumerate(per):
                t = tok.decode(smp[0].response_ids, skip_special_tokens=True)
                hit[i] |= answer_matches(t, rows[i]["answer"], e.match)
        entry[f"pass@{e.pass_k}"] = sum(hit) / len(rows)
    return entry, gens


def evaluate_one(
    cfg: Config, name: str, path: str, sets: dict[str, list[dict]], teacher, tok, teacher_tok
) -> tuple[dict, dict[str, list[dict]]]:
    """Scores of one checkpoint on every set, and its generations per set."""
    model = load_checkpoint(cfg, name, path)
    chat.check_compatible(
        {"student": tok, f"checkpoint {name}": checkpoint_tokenizer(cfg, name, path)},
        f"{path} / student.path",
    )
    r, e = cfg.rollout, cfg.eval
    render = chat.Renderer.of(r, tok, teacher_tok)
    stops = decoding.stops_for(tok, path, r.stop_token_ids, r.stop_strings)
    limit = prompt_limit(cfg, models.context_length(model), path)
    res: dict = {"path": path}
    generations: dict[str, list[dict]] = {}
    for set_name, rows in sets.items():
        turns = [chat.turns(row, False, r.final_assistant)[0] for row in rows]
        rows = [row | {"answer": t.answer} for row, t in zip(rows, turns, strict=True)]
        prefixes = [render.train_ids(t, row) for t, row in zip(turns, rows, strict=True)]
        check_prompt_lengths(rows, prefixes, limit, set_name)
        res[set_name], generations[set_name] = accuracy_entry(
            cfg, model, tok, stops, rows, prefixes
        )
    if teacher is not None:
        kl_set = e.kl_set or next(iter(sets))
        rows = sets[kl_set][: e.kl_prompts]
        turns = [chat.turns(row, False, r.final_assistant)[0] for row in rows]
        sp = [render.train_ids(t, row) for t, row in zip(turns, rows, strict=True)]
        tp = [render.teacher_ids(t, row) for t, row in zip(turns, rows, strict=True)]
        t_limit = prompt_limit(cfg, models.context_length(teacher), cfg.teacher.path)
        check_prompt_lengths(rows, tp, t_limit, f"{kl_set} (teacher prefix)")
        outs = decoding.greedy(
            model, tok, sp, max_new_tokens=e.max_new_tokens, batch_size=e.batch_size, stops=stops
        )
        res["rkl_to_teacher"] = reverse_kl_per_token(
            model, teacher, sp, tp, [o.response_ids for o in outs], models.vocab_size(tok)
        )
        res["rkl_set"] = kl_set
    return res, generations


def prompt_limit(cfg: Config, ctx_len: int, path: str) -> int:
    """The longest prefix a model of context ``ctx_len`` decodes ``eval.max_new_tokens`` after
    (``rollout.max_prompt_tokens`` lowers it), as in the rollout stage."""
    limit = ctx_len - cfg.eval.max_new_tokens
    if cfg.rollout.max_prompt_tokens is not None:
        limit = min(limit, cfg.rollout.max_prompt_tokens)
    if limit < 1:
        raise UserError(
            f"eval.max_new_tokens={cfg.eval.max_new_tokens} leaves no room for a prompt in the "
            f"context of {ctx_len} positions",
            f"eval.max_new_tokens ({path})",
            f"set eval.max_new_tokens below {ctx_len}",
        )
    return limit


def check_prompt_lengths(rows: list[dict], prefixes: list[list[int]], limit: int, where: str):
    """One error for the first prefix over ``limit`` (the model would read past its context)."""
    for row, p in zip(rows, prefixes, strict=True):
        if len(p) > limit:
            raise UserError(
                f"eval prompt {row['id']!r} is {len(p)} tokens long, over the limit of {limit} "
                "(context length minus eval.max_new_tokens, or rollout.max_prompt_tokens)",
                f"eval set {where}",
                "shorten it or drop it from the set, or lower eval.max_new_tokens",
            )


def load_sets(cfg: Config) -> dict[str, list[dict]]:
    names = cfg.eval.sets or list(cfg.data.eval_sets)
    if not names:
        raise UserError(
            "no eval sets configured",
            "data.eval_sets",
            "set data.eval_sets={name: prompts file with answers}",
        )
    sets = {}
    for n in names:
        if n not in cfg.data.eval_sets:
            raise UserError(
                f"eval set '{n}' is not in data.eval_sets",
                "eval.sets",
                f"choose from {sorted(cfg.data.eval_sets)}",
            )
        rows = prompts_schema.read(cfg.data.eval_sets[n], split=cfg.data.split).to_pylist()
        if any(r["answer"] is None for r in rows):
            raise UserError(
                f"eval set '{n}' has rows without an answer",
                cfg.data.eval_sets[n],
                "every eval prompt needs a verifiable 'answer'",
            )
        sets[n] = rows
    return sets


def format_table(results: dict, set_names: list[str]) -> str:
    cols = set_names + ["rkl_to_teacher"]
    width = max(12, *(len(n) for n in results))
    lines = [f"{'checkpoint':<{width}} " + " ".join(f"{c:>18}" for c in cols)]
    for name, r in results.items():
        cells = []
        for c in set_names:
            cells.append(f"{100 * r[c]['accuracy']:>17.1f}%" if c in r else f"{'-':>18}")
        kl = r.get("rkl_to_teacher")
        cells.append(
            f"{kl:>18.4f}" if isinstance(kl, float) and math.isfinite(kl) else f"{'-':>18}"
        )
        lines.append(f"{name:<{width}} " + " ".join(cells))
    return "\n".join(lines)


# eval/generations/<checkpoint>/<set>.parquet: one row per eval prompt (greedy decoding).
GENERATIONS_SCHEMA = pa.schema(
    [
        pa.field("prompt_id", pa.string(), nullable=False),  # the eval row's id
        pa.field("prompt_ids", pa.list_(pa.int32()), nullable=False),  # the rendered prefix
        pa.field("response_ids", pa.list_(pa.int32()), nullable=False),  # stop token included
        pa.field("response", pa.string(), nullable=False),  # decoded, special tokens skipped
        pa.field("finish_reason", pa.string(), nullable=False),  # eos | stop | length
        pa.field("answer", pa.string(), nullable=False),  # the reference answer
        pa.field("correct", pa.bool_(), nullable=False),  # graded by eval.match
    ]
)


def write_generations(root: Path, name: str, generations: dict[str, list[dict]]) -> list[Path]:
    """One Parquet file per eval set under ``root/<checkpoint>/`` (each written atomically)."""
    written = []
    for set_name, rows in generations.items():
        path = root / check_name(name, "checkpoint name") / f"{set_name}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        pq.write_table(pa.Table.from_pylist(rows, schema=GENERATIONS_SCHEMA), tmp)
        os.replace(tmp, path)
        written.append(path)
    return written


def run(cfg: Config) -> dict:
    torch.manual_seed(cfg.seed)
    layout = RunLayout.of(cfg.run_dir)
    safety.check_output(layout.eval, layout.root, "eval results")
    ckpts = checkpoint_paths(cfg)  # names read from disk are checked before any model loads
    sets = load_sets(cfg)
    tok = models.load_tokenizer(cfg.student.path, "student")
    teacher = models.load_model(cfg.teacher.path, "teacher") if cfg.teacher.path else None
    teacher_tok = models.load_tokenizer(cfg.teacher.path, "teacher") if teacher else None
    if teacher_tok is not None and cfg.score.cross_tokenizer == "align":
        if chat.id_map_fingerprint(tok) != chat.id_map_fingerprint(teacher_tok):
            # a teacher of another tokenizer: no token-level KL to it (docs/CROSS_TOKENIZER.md)
            log.info("[eval] the teacher's tokenizer differs (score.cross_tokenizer=align): no KL")
            teacher = teacher_tok = None
    if teacher_tok is not None:
        chat.check_compatible(
            {"student": tok, "teacher": teacher_tok}, "student.path / teacher.path"
        )
    out_dir = RunLayout.of(cfg.run_dir).eval
    out_dir.mkdir(parents=True, exist_ok=True)
    path = RunLayout.of(cfg.run_dir).eval_results
    cache = _read_cache(path)
    settings = {k: v for k, v in as_dict(cfg)["eval"].items() if k != "checkpoints"}
    settings |= {
        "rollout": {k: v for k, v in as_dict(cfg)["rollout"].items() if k in RENDER_KEYS},
        "teacher": models.model_fingerprint(cfg.teacher.path) if teacher else None,
        "sets": {n: prompts_schema.source_sha256(cfg.data.eval_sets[n]) for n in sets},
    }
    results, t0, gen_root = {}, time.time(), out_dir / "generations"
    bar = Progress(len(ckpts), "eval", unit="checkpoints")  # cached ones count as done
    try:
        for name, ckpt in ckpts.items():
            key = content_id([checkpoint_fingerprint(cfg, name, ckpt), settings])
            if key not in cache:
                cache[key], gens = evaluate_one(cfg, name, ckpt, sets, teacher, tok, teacher_tok)
                if cfg.eval.save_generations:
                    write_generations(gen_root, name, gens)
            results[name] = cache[key]
            bar.update(1)
    finally:
        bar.close()
    doc = {
        "results": results,
        "sets": list(sets),
        "seconds": round(time.time() - t0, 1),
        "cache": cache,
    }
    atomic_write_text(path, json.dumps(doc, indent=1))
    log.info(format_table(results, list(sets)))
    gen_note = (
        f", generations in {gen_root}/<checkpoint>/<set>.parquet"
        if cfg.eval.save_generations
        else ""
    )
    log.info(f"[eval] wrote {path}{gen_note}")
    return results


# Rollout keys that change how an eval prompt is rendered or when decoding stops.
RENDER_KEYS = (
    "prompt_template",
    "teacher_template",
    "chat_template",
    "template_kwargs",
    "teacher_template_kwargs",
    "context_placement",
    "context_template",
    "context_separator",
    "stop_token_ids",
    "stop_strings",
)


def _read_cache(path: Path) -> dict:
    """The cached results of earlier runs (an unreadable file is one clear error)."""
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text()).get("cache", {})
    except (ValueError, AttributeError):
        raise UserError(
            "eval/results.json is not valid JSON (truncated?)",
            str(path),
            "delete it; the eval stage recomputes every result",
        ) from None


SPEC = StageSpec(
    name="eval",
    run=run,
    config=EvalConfig,
    uses=("data", "student", "teacher", "rollout", "score"),
    reads=("checkpoints/", "data.eval_sets", "teacher.path"),
    writes=("eval/",),
    dataset_id=("per entry: checkpoint fingerprint", "eval set", "settings"),
    extras=("dev", "s3"),
)

main = hydra_entry("eval")(run)

if __name__ == "__main__":
    main()
