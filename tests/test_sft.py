"""SFT stage end to end: the teacher answers, the student learns its answers by cross-entropy."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import torch
from transformers import AutoModelForCausalLM

from stages import sft
from stages.lib import models, store
from stages.lib.config import compose
from tests.conftest import write_prompts


def answer_logprob(model_dir, rows) -> float:
    """Mean log-prob per token of the teacher's answers after the closed-book prompt."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    total, n = 0.0, 0
    with torch.inference_mode():
        for r in rows:
            ids = torch.tensor([r["train_prompt_ids"] + r["response_ids"]])  # [1, L]
            logp = model(input_ids=ids).logits[0, :-1].float().log_softmax(-1)  # [L-1, V]
            p = len(r["train_prompt_ids"])
            tgt = ids[0, p:]  # [T]
            total += logp[p - 1 :].gather(-1, tgt[:, None]).sum().item()
            n += len(tgt)
    return total / n


def test_sft_trains_the_student_on_the_teachers_answers(tmp_path, tiny_lm, tiny_teacher, capsys):
    prompts = write_prompts(tmp_path / "prompts.parquet", n=16)
    run_dir = tmp_path / "run"
    cfg = compose(
        "sft",
        [
            f"run_dir={run_dir}",
            f"student.path={tiny_lm}",
            f"teacher.path={tiny_teacher}",
            f"data.prompts={prompts}",
            "sft.enabled=true",
            "sft.epochs=6",
            "sft.lr=3e-3",
            "rollout.max_new_tokens=6",
            "rollout.backend=hf",
        ],
    )
    sft.run(cfg)
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("sft: wrote ") and str(run_dir / "checkpoints" / "sft" / "final") in last
    # the answers are the teacher's, and the manifest says which teacher gave them
    data = store.open_committed(run_dir / "sft_data", sft.rollouts_schema)
    assert data["fingerprints"]["teacher"] == models.model_fingerprint(str(tiny_teacher))
    rows = [
        r
        for p in store.shard_paths(run_dir / "sft_data", data)
        for r in pq.read_table(p).to_pylist()
    ]
    assert len(rows) == 16 and all(r["response_ids"] for r in rows)
    sel = json.loads((run_dir / "selected" / "sft" / "_manifest.json").read_text())
    assert sel["rows"] == 16
    ckpt = run_dir / "checkpoints" / "sft" / "final"
    assert (ckpt / "config.json").exists()
    # the SFT student puts more mass on the teacher's answers than the base student
    before, after = answer_logprob(tiny_lm, rows), answer_logprob(ckpt, rows)
    assert after > before + 0.5, (before, after)
