"""A demo-world teacher with ANOTHER tokenizer (the cross-tokenizer experiment, issue 18).

The world's models share one word-level tokenizer (every name is one token). This builds
``teacher_bpe``: a byte-level BPE tokenizer trained on the same corpus with a smaller vocabulary
(so invented names split into several pieces), the same special tokens and ChatML template, and a
Llama trained from zero exactly like ``teacher_big`` (the world's ``teacher`` model settings, seed
and private-fact fraction: it knows the private facts closed-book). Responses are trained in the
form the student's tokenizer decodes them to (years as "14 23"), which is the text the score stage
re-tokenizes.

It reads a built world (``runs/world``, never modified) and writes ``<out>/models/teacher_bpe``
and ``<out>/teacher_bpe.json`` (settings, vocabulary size, accuracies, seconds). Separate from
``world.py`` on purpose: that file's source is part of the world's cache key.

    python scripts/demoworld/xtok_teacher.py --world runs/world --out runs/world_xtok [--vocab 600]
    python scripts/demoworld/xtok_teacher.py --world runs/world --measure 10   # seconds per step
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
if str(REPO / "scripts") not in sys.path:
    sys.path.insert(0, str(REPO / "scripts"))

from demoworld import world as W  # noqa: E402


def student_form(s_tok: Any):
    """text -> the text the student's tokenizer decodes its encoding to (the scored form)."""

    def norm(text: str) -> str:
        ids = s_tok(text, add_special_tokens=False)["input_ids"]
        return s_tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    return norm


def corpus(world: W.World, sets: dict, norm, n: int, seed: int) -> list[str]:
    """Rendered training examples (prefix text + response) and every prompt set's messages."""
    from stages.lib import chat

    rng = random.Random(seed)
    s_tok = W.make_tokenizer(W.vocabulary(world))
    out = []
    for msgs, resp in W.sample_batch(world, rng, n, world.settings.teacher_private_frac):
        out.append(chat.render_text(s_tok, msgs, None, {}) + norm(resp))
    for rows in sets.values():
        for r in rows:
            out += [m["content"] for m in r["messages"]] + (
                [r["context"]] if r.get("context") else []
            )
    return out


def make_bpe_tokenizer(texts: list[str], vocab_size: int) -> Any:
    """Byte-level BPE over ``texts`` with the world's special tokens, BOS rule and template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(W.SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(texts, trainer=trainer)
    bos = tk.token_to_id(W.BOS)
    tk.post_processor = processors.TemplateProcessing(
        single=f"{W.BOS} $A", pair=f"{W.BOS} $A $B", special_tokens=[(W.BOS, bos)]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token=W.BOS, eos_token=W.EOS, pad_token=W.PAD, unk_token=W.UNK,
        padding_side="left", clean_up_tokenization_spaces=False, model_max_length=512,
        additional_special_tokens=[W.IM_START, W.OLD_EOS],
    )  # fmt: skip
    tok.chat_template = W.CHAT_TEMPLATE
    return tok


def encode(tok: Any, pairs: list, norm) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids [B, T] and labels [B, T] (-100 except on response tokens + EOS)."""
    pre = [W.prefix_ids(tok, m) for m, _ in pairs]
    res = tok([norm(r) for _, r in pairs], add_special_tokens=False)["input_ids"]
    seqs = [p + r + [tok.eos_token_id] for p, r in zip(pre, res, strict=True)]
    width = max(len(x) for x in seqs)
    ids = torch.full((len(seqs), width), tok.pad_token_id, dtype=torch.long)  # [B, T]
    labels = torch.full((len(seqs), width), -100, dtype=torch.long)  # [B, T]
    for i, (p, x) in enumerate(zip(pre, seqs, strict=True)):
        ids[i, : len(x)] = torch.tensor(x)
        labels[i, len(p) : len(x)] = ids[i, len(p) : len(x)]
    return ids, labels


def train(model: Any, tok: Any, world: W.World, ms: W.ModelSettings, seed: int, norm, steps: int):
    """world.pretrain's recipe (AdamW, warmup + cosine, clip 1.0) on the normalised responses."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(
        model.parameters(), lr=ms.lr, betas=(0.9, 0.98), weight_decay=ms.weight_decay
    )
    model.train()
    ema, t0 = None, time.time()
    for step in range(steps):
        pairs = W.sample_batch(world, rng, ms.batch, world.settings.teacher_private_frac)
        ids, labels = encode(tok, pairs, norm)
        p = (step - ms.warmup) / max(1, ms.steps - ms.warmup)
        cos = ms.min_lr_ratio + (1 - ms.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p))
        for g in opt.param_groups:
            g["lr"] = ms.lr * ((step + 1) / ms.warmup if step < ms.warmup else cos)
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if step % 50 == 0:
            print(
                f"teacher_bpe step {step}/{steps} loss {ema:.3f} {time.time() - t0:.0f} s",
                flush=True,
            )
    model.eval()
    return {
        "final_loss_ema": round(float(ema or 0.0), 4),
        "train_seconds": round(time.time() - t0, 1),
    }


def build(world_dir: Path, out: Path | None, vocab: int, measure: int = 0) -> dict:
    info = json.loads((world_dir / "world.json").read_text())
    s = dataclasses.replace(W.settings_from_dict(info["settings"]), teacher_big=True)
    torch.set_num_threads(s.threads)
    world = W.make_world(s)
    s_tok = W.make_tokenizer(W.vocabulary(world))
    sets = W.make_prompt_sets(world)
    norm = student_form(s_tok)
    tok = make_bpe_tokenizer(corpus(world, sets, norm, 4000, s.seed + 300), vocab)
    model = W.make_model(s.teacher, tok, s.seed + 200)
    steps = measure or s.teacher.steps
    res = train(model, tok, world, s.teacher, s.seed + 200, norm, steps)
    res |= {"params": W.n_params(model), "vocab_size": len(tok), "steps": steps}
    if measure:
        res["seconds_per_step"] = round(res["train_seconds"] / steps, 3)
        res["estimated_seconds"] = round(res["seconds_per_step"] * s.teacher.steps, 0)
        return res
    res["accuracy"] = W._evaluate(model, tok, sets, s, W._TEACHER_EVALS)
    dest = out / "models" / "teacher_bpe"
    model.save_pretrained(dest, safe_serialization=True)
    tok.save_pretrained(dest)
    (out / "teacher_bpe.json").write_text(json.dumps(res | {"world": info["key"]}, indent=1) + "\n")
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--world", default="runs/world", help="a built world (read only)")
    ap.add_argument("--out", default="runs/world_xtok", help="where models/teacher_bpe goes")
    ap.add_argument("--vocab", type=int, default=600, help="BPE vocabulary size (< the world's)")
    ap.add_argument("--measure", type=int, default=0, help="train N steps only; print s/step")
    args = ap.parse_args(argv)
    res = build(Path(args.world), Path(args.out), args.vocab, args.measure)
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
