"""Benchmark the cross-tokenizer score path against the same-tokenizer path on the same rollouts.

Two byte-level BPE tokenizers are trained on one synthetic corpus (made-up words from a syllable
list, so merges exist and the two vocabularies split words differently): the student's with
``vocab_s`` ids, the teacher's with fewer (``vocab_t``), so many student tokens become several
teacher tokens. Three random Llamas of one size: the student (samples nothing here: the rollouts
are corpus sentences encoded by the student tokenizer), a teacher on the student's tokenizer
(the same-tokenizer path) and a teacher on its own tokenizer (``score.cross_tokenizer=align``).

Both runs score the same committed rollouts (teacher only: ``score.behavior=false``, K = 32,
entropy on, HF backend, one thread) and report wall seconds, student tokens per second and bytes
per student token of the written tokens shards. For the cross run it also reports the teacher
tokens per student token, the chunk sizes, the refusals, and the seconds of the alignment itself
(``xtok.prepare``: decode, re-encode, character offsets, chunking) and of moving the teacher's
numbers onto the student's tokens (``student_columns``), measured apart on the same rows.

Run: ``python scripts/bench_xtok.py --out bench_xtok.json [--quick]`` (quick: < 2 minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

FULL = dict(hidden=512, layers=8, vocab_s=4000, vocab_t=2500, n=48, words=60, corpus=6000)
QUICK = dict(hidden=128, layers=2, vocab_s=1500, vocab_t=900, n=24, words=40, corpus=2000)
K = 32
SYLLABLES = (
    "ka lo mi ter on ex pre dis ing tion ra ve su pol an ti mo re ul sa ne qui bo da".split()
)


def corpus(n: int, words: int, seed: int = 0) -> list[str]:
    """``n`` sentences of about ``words`` made-up words (1-4 syllables), with punctuation."""
    rng = np.random.default_rng(seed)
    lexicon = ["".join(rng.choice(SYLLABLES, size=rng.integers(1, 5))) for _ in range(3000)]
    zipf = 1.0 / np.arange(1, len(lexicon) + 1)
    zipf /= zipf.sum()
    out = []
    for _ in range(n):
        ws = rng.choice(lexicon, size=int(rng.integers(words // 2, words + 1)), p=zipf).tolist()
        out.append(" ".join(ws) + rng.choice([".", "?", "!"]))
    return out


def bpe(texts: list[str], vocab: int, out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<unk>", "<bos>", "<eos>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(texts, trainer=trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
        unk_token="<unk>",
    )  # fmt: skip
    tok.save_pretrained(out)
    return tok


def llama(out: Path, tok, spec: dict, seed: int) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    h = spec["hidden"]
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=h, intermediate_size=4 * h,
        num_hidden_layers=spec["layers"], num_attention_heads=max(1, h // 64),
        num_key_value_heads=max(1, h // 64), head_dim=64, max_position_embeddings=2048,
        tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def write_rollouts(run_dir: Path, student: Path, prompts: Path, responses: list[str]) -> None:
    import pyarrow as pa

    from data_schemas import prompts as prompts_schema
    from data_schemas import rollouts as rollouts_table
    from stages.lib import models, rollout_plan, store
    from stages.lib.config import compose

    cfg = compose("score", [f"run_dir={run_dir}", f"student.path={student}"])
    tok = models.load_tokenizer(str(student))
    items = rollout_plan.build_prompt_ids(tok, prompts_schema.read(str(prompts)), cfg.rollout, 0)
    rows = []
    for i, (p, text) in enumerate(zip(items, responses, strict=True)):
        r = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        rows.append({
            "sample_id": f"s{i:04d}", "prompt_id": p.prompt_id, "sample_idx": 0,
            "train_prompt_ids": p.train_ids, "rollout_prompt_ids": p.rollout_ids,
            "teacher_prompt_ids": p.teacher_ids, "response_ids": r,
            "behavior_logprobs": [-1.0] * len(r), "response_len": len(r), "is_guided": False,
            "finish_reason": "eos", "temperature": 1.0, "top_p": 1.0, "answer": None,
            "kind": None, "correct": None,
        })  # fmt: skip
    with store.open_writer(
        run_dir / "rollouts", rollouts_table, dataset_id="bench-xtok", stage="rollout",
        vocab_size=len(tok),
    ) as w:  # fmt: skip
        for s in range(0, len(rows), 8):
            w.write_shard(
                s // 8, pa.Table.from_pylist(rows[s : s + 8], schema=rollouts_table.SCHEMA)
            )
        w.commit(
            (len(rows) + 7) // 8,
            config={},
            fingerprints={
                "student": models.model_fingerprint(str(student)),
                "tokenizer": models.tokenizer_fingerprint(tok),
            },
            inputs={"prompts": prompts_schema.source_sha256(str(prompts))},
            extra={"policy_path": str(student)},
        )


def score(run_dir: Path, student: Path, teacher: Path, prompts: Path, *extra: str) -> dict:
    from stages.lib.config import compose
    from stages.score import run

    cfg = compose("score", [
        f"run_dir={run_dir}", f"student.path={student}", f"teacher.path={teacher}",
        f"data.prompts={prompts}", "score.backend=hf", f"score.topk={K}", "score.behavior=false",
        "score.device=cpu", *extra,
    ])  # fmt: skip
    t0 = time.perf_counter()
    out = run(cfg)
    secs = time.perf_counter() - t0
    files = list((run_dir / "tokens").rglob("*.parquet"))
    size = sum(f.stat().st_size for f in files)
    return {
        "seconds": round(secs, 3),
        "student_tokens": out["tokens"],
        "tokens_per_s": round(out["tokens"] / secs, 1),
        "bytes_per_token": round(size / out["tokens"], 2),
    }


def alignment_costs(student: Path, teacher: Path, run_dir: Path) -> dict:
    """Seconds of xtok.prepare and student_columns on the run's rows, and the chunk shapes."""
    from data_schemas import rollouts as rollouts_table
    from stages.lib import align, models, store, xtok

    s_tok, t_tok = models.load_tokenizer(str(student)), models.load_tokenizer(str(teacher))
    v = xtok.Vocabs.of(s_tok, t_tok)
    rows = store.read_table(run_dir / "rollouts", rollouts_table).to_pylist()
    t0 = time.perf_counter()
    preps = [xtok.prepare(v, r["response_ids"]) for r in rows]
    t_prepare = time.perf_counter() - t0
    t0 = time.perf_counter()
    bm = align.byte_map(s_tok)
    for r in rows:
        bm.spans([i for i in r["response_ids"] if i not in v.s_special] or [0])
    t_offsets = time.perf_counter() - t0
    ok = [p for p in preps if not p.refused]
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    for p, r in zip(preps, rows, strict=True):
        if p.refused:
            continue
        n_t = len(p.response)
        fake = {  # the shapes of a teacher pass result (values do not change the cost)
            "logprob": -rng.random(n_t).astype(np.float32),
            "topk_ids": rng.integers(0, len(t_tok), (n_t, K)).astype(np.int32),
            "topk_logprobs": np.sort(-rng.random((n_t, K)) * 10)[:, ::-1].astype(np.float32),
            "topk_logmass": np.zeros(n_t, np.float32),
            "entropy": np.ones(n_t, np.float32),
        }
        xtok.student_columns(v, p, fake, K, np.zeros(len(r["response_ids"]), np.float32))
    t_columns = time.perf_counter() - t0
    n_s = sum(len(r["response_ids"]) for r in rows)
    n_t = sum(len(p.response) for p in ok)
    chunks = [len(p.chunks.spans) for p in ok]
    return {
        "rows": len(rows),
        "refused_rows": len(rows) - len(ok),
        "teacher_tokens_per_student_token": round(n_t / max(n_s, 1), 3),
        "student_tokens_per_chunk": round(n_s / max(sum(chunks), 1), 3),
        "prepare_seconds": round(t_prepare, 3),
        "byte_spans_student_seconds": round(t_offsets, 3),
        "student_columns_seconds": round(t_columns, 3),
        "mean_response_tokens": round(n_s / len(rows), 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench_xtok.json")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    spec = QUICK if args.quick else FULL
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        texts = corpus(spec["corpus"], spec["words"])
        s_tok = bpe(texts, spec["vocab_s"], root / "s_tok")
        t_tok = bpe(texts, spec["vocab_t"], root / "t_tok")
        student = llama(root / "student", s_tok, spec, 0)
        same = llama(root / "teacher_same", s_tok, spec, 1)
        cross = llama(root / "teacher_cross", t_tok, spec, 1)
        prompts_rows = corpus(spec["n"], 12, seed=1)
        responses = corpus(spec["n"], spec["words"], seed=2)
        prompts = root / "prompts.jsonl"
        prompts.write_text(
            "".join(
                json.dumps({"id": f"p{i:04d}", "prompt": p}) + "\n"
                for i, p in enumerate(prompts_rows)
            )  # fmt: skip
        )
        runs = {}
        for name in ("same", "cross"):
            write_rollouts(root / name, student, prompts, responses)
        runs["same_tokenizer"] = score(root / "same", student, same, prompts)
        runs["cross_tokenizer"] = score(
            root / "cross", student, cross, prompts, "score.cross_tokenizer=align"
        )
        result = {
            "bench": "xtok",
            "quick": args.quick,
            "spec": spec | {"topk": K, "threads": 1},
            "load_avg_1m": os.getloadavg()[0],
            **runs,
            "cross_over_same_seconds": round(
                runs["cross_tokenizer"]["seconds"] / runs["same_tokenizer"]["seconds"], 3
            ),
            "cross_over_same_bytes": round(
                runs["cross_tokenizer"]["bytes_per_token"]
                / runs["same_tokenizer"]["bytes_per_token"],
                3,
            ),
            "alignment": alignment_costs(student, cross, root / "cross"),
        }
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
