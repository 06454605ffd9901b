"""Eval stage: greedy accuracy of checkpoints on eval sets, and reverse KL to the teacher.

Reads: ``data.eval_sets`` (prompts files with verifiable ``answer``s), the checkpoints to evaluate
(``eval.checkpoints``: names under ``run_dir/checkpoints/<name>/final`` or model paths; empty = the
base student, the SFT checkpoint if any, every trained ``checkpoints/*/final`` and those of later
rounds, ``round<r>/checkpoints/*/final``), and the
teacher (``teacher.path``) for the KL column.
Writes: ``run_dir/eval/results.json`` (atomically) and a table on stdout. Results are cached per
(checkpoint fingerprint, eval set, settings), so re-running after one more training only evaluates
the new checkpoint.

Accuracy: greedy decoding of ``rollout.prompt_template`` (closed-book: no context), correct when the
answer's words occur in the response (``stages.lib.grading.answer_matches``); optional sampled pass@k.
KL: the checkpoint answers ``eval.kl_prompts`` prompts of ``eval.kl_set`` greedily; the mean over
response tokens of the exact full-vocabulary KL(pi_theta || pi_T), the teacher reading the
response after ``rollout.teacher_template`` (so a self-teacher sees the evidence).

Run: ``python -m stages.eval experiment=demo [eval.checkpoints=[base,topk_fkl-evidence]]``
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import torch

from data_schemas import prompts as prompts_schema
from stages.lib import models
from stages.lib.config import Config, as_dict, hydra_entry
from stages.lib.errors import UserError
from stages.lib.grading import answer_matches
from stages.lib.store import atomic_write_text, content_id


def checkpoint_paths(cfg: Config) -> dict[str, str]:
    """Name -> model directory of every checkpoint to evaluate (base first)."""
    ckpt_root = Path(cfg.run_dir) / "checkpoints"
    if cfg.eval.checkpoints:
        out = {}
        for c in cfg.eval.checkpoints:
            if c == "base":
                out["base"] = cfg.student.path
            elif (ckpt_root / c / "final").is_dir():
                out[c] = str(ckpt_root / c / "final")
            elif c in (later := round_checkpoints(Path(cfg.run_dir))):
                out[c] = str(later[c])
            elif Path(c).is_dir():
                out[Path(c).name] = c
            else:
                raise UserError(
                    f"checkpoint '{c}' not found",
                    f"{ckpt_root} or a path",
                    "train it first, or list names from run_dir/checkpoints/",
                )
        return out
    out = {"base": cfg.student.path}
    if (ckpt_root / "sft" / "final").is_dir():
        out["sft"] = str(ckpt_root / "sft" / "final")
    for d in sorted(ckpt_root.glob("*/final")) if ckpt_root.is_dir() else []:
        if d.parent.name != "sft":
            out[d.parent.name] = str(d)
    for name, d in round_checkpoints(Path(cfg.run_dir)).items():
        out[name] = str(d)
    return out


def round_checkpoints(run_dir: Path) -> dict[str, Path]:
    """Later rounds of fresh rollouts (``pipeline.rounds``), in round order:
    ``run_dir/round<r>/checkpoints/<name>-r<r>/final``."""
    found = []
    for d in run_dir.glob("round*/checkpoints/*/final"):
        r = d.parts[-4][len("round") :]
        if r.isdigit():
            found.append((int(r), d.parent.name, d))
    return {name: d for _, name, d in sorted(found)}


@torch.inference_mode()
def generate(
    model,
    tok,
    prefixes: list[list[int]],
    *,
    max_new_tokens: int,
    batch_size: int,
    sample: bool = False,
    temperature: float = 1.0,
    seed: int = 0,
) -> list[list[int]]:
    """Batched decoding from token-id prefixes (left padded); returns response ids without EOS."""
    out: list[list[int]] = []
    torch.manual_seed(seed)
    for i in range(0, len(prefixes), batch_size):
        chunk = prefixes[i : i + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, p in enumerate(chunk):
            ids[r, width - len(p) :] = torch.tensor(p)
            mask[r, width - len(p) :] = 1
        gen = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=sample,
            temperature=temperature if sample else None,
            top_p=None,
            top_k=None,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )[:, width:]
        for row in gen.tolist():
            out.append(row[: row.index(tok.eos_token_id)] if tok.eos_token_id in row else row)
    return out


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


def evaluate_one(
    cfg: Config, name: str, path: str, sets: dict[str, list[dict]], teacher, tok
) -> dict:
    model = models.load_model(path, f"checkpoint {name}")
    models.check_same_tokenizer(
        models.tokenizer_fingerprint(models.load_tokenizer(path, name)),
        models.tokenizer_fingerprint(tok),
        f"checkpoint {name}",
        "student",
    )
    res: dict = {"path": path}
    e = cfg.eval
    for set_name, rows in sets.items():
        prefixes = [
            tok(cfg.rollout.prompt_template.format(prompt=r["prompt"]))["input_ids"] for r in rows
        ]
        outs = generate(
            model, tok, prefixes, max_new_tokens=e.max_new_tokens, batch_size=e.batch_size
        )
        texts = tok.batch_decode(outs, skip_special_tokens=True)
        correct = [answer_matches(t, r["answer"]) for t, r in zip(texts, rows, strict=True)]
        entry = {"accuracy": sum(correct) / len(rows), "n": len(rows), "correct": sum(correct)}
        if e.pass_k > 0:
            hit = [False] * len(rows)
            for k in range(e.pass_k):
                outs = generate(
                    model,
                    tok,
                    prefixes,
                    max_new_tokens=e.max_new_tokens,
                    batch_size=e.batch_size,
                    sample=True,
                    temperature=e.temperature,
                    seed=cfg.seed + k,
                )
                for i, t in enumerate(tok.batch_decode(outs, skip_special_tokens=True)):
                    hit[i] |= answer_matches(t, rows[i]["answer"])
            entry[f"pass@{e.pass_k}"] = sum(hit) / len(rows)
        res[set_name] = entry
    if teacher is not None:
        kl_set = e.kl_set or next(iter(sets))
        rows = sets[kl_set][: e.kl_prompts]
        sp = [
            tok(cfg.rollout.prompt_template.format(prompt=r["prompt"]))["input_ids"] for r in rows
        ]
        tp = [
            tok(
                cfg.rollout.teacher_template.format(prompt=r["prompt"], context=r["context"])
                if r.get("context")
                else cfg.rollout.prompt_template.format(prompt=r["prompt"])
            )["input_ids"]
            for r in rows
        ]
        outs = generate(model, tok, sp, max_new_tokens=e.max_new_tokens, batch_size=e.batch_size)
        outs = [o + [tok.eos_token_id] if len(o) < e.max_new_tokens else o for o in outs]
        res["rkl_to_teacher"] = reverse_kl_per_token(
            model, teacher, sp, tp, outs, models.vocab_size(tok)
        )
        res["rkl_set"] = kl_set
    return res


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
        rows = prompts_schema.read(cfg.data.eval_sets[n]).to_pylist()
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


def run(cfg: Config) -> dict:
    torch.manual_seed(cfg.seed)
    sets = load_sets(cfg)
    tok = models.load_tokenizer(cfg.student.path, "student")
    teacher = models.load_model(cfg.teacher.path, "teacher") if cfg.teacher.path else None
    out_dir = Path(cfg.run_dir) / "eval"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "results.json"
    cache = json.loads(path.read_text()).get("cache", {}) if path.exists() else {}
    settings = {k: v for k, v in as_dict(cfg)["eval"].items() if k != "checkpoints"}
    settings |= {
        "prompt_template": cfg.rollout.prompt_template,
        "teacher_template": cfg.rollout.teacher_template,
        "teacher": models.model_fingerprint(cfg.teacher.path) if teacher else None,
        "sets": {n: os.path.getsize(cfg.data.eval_sets[n]) for n in sets},
    }
    results, t0 = {}, time.time()
    for name, ckpt in checkpoint_paths(cfg).items():
        key = content_id([models.model_fingerprint(ckpt, name), settings])
        if key not in cache:
            cache[key] = evaluate_one(cfg, name, ckpt, sets, teacher, tok)
        results[name] = cache[key]
    doc = {
        "results": results,
        "sets": list(sets),
        "seconds": round(time.time() - t0, 1),
        "cache": cache,
    }
    atomic_write_text(path, json.dumps(doc, indent=1))
    print(format_table(results, list(sets)), flush=True)
    return results


main = hydra_entry("eval")(run)

if __name__ == "__main__":
    main()
