"""Shared fixtures: tiny models built from a config in a temp dir (no downloads), tiny prompts.

``tiny_lm`` is a 2-layer Llama (head_dim 64, as vLLM's CPU kernels need) with a word-level
tokenizer saved next to it; its init is scaled so that distributions are peaked, not uniform.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

WORDS = [f"w{i}" for i in range(90)] + ["question", "answer", "evidence", ":", "?", "."]


def build_tokenizer(words: list[str] = WORDS):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<bos>", "<eos>"]
    vocab = {t: i for i, t in enumerate(specials + words)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    from tokenizers import decoders

    tk.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
    )


def build_tiny_lm(
    out: Path,
    *,
    seed: int = 0,
    hidden: int = 128,
    layers: int = 2,
    words: list[str] = WORDS,
    scale: float = 4.0,
    pad_vocab_to: int | None = None,
) -> Path:
    """Save a random tiny Llama + tokenizer to ``out`` and return it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_tokenizer(words)
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=pad_vocab_to or len(tok),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64,
        head_dim=64,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # peaked distributions, so top-K and entropies are not degenerate
        model.lm_head.weight.mul_(scale)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory) -> Path:
    return build_tiny_lm(tmp_path_factory.mktemp("tiny_lm"))


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory) -> Path:
    """Same tokenizer, different weights: a teacher for the student ``tiny_lm``."""
    return build_tiny_lm(tmp_path_factory.mktemp("tiny_teacher"), seed=1)


def write_prompts(path: Path, n: int = 12, *, with_context: bool = True) -> Path:
    from data_schemas import prompts

    rows = []
    for i in range(n):
        rows.append(
            {
                "id": f"p{i:03d}",
                "prompt": f"question : w{i % 90} w{(i * 7) % 90} ? answer :",
                "context": f"evidence : w{(i * 3) % 90} w{(i * 5) % 90} ."
                if with_context
                else None,
                "answer": f"w{(i * 3) % 90}",
                "kind": "private" if i % 2 == 0 else "public",
            }
        )
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        pq.write_table(pa.Table.from_pylist(rows, schema=prompts.SCHEMA), path)
    return path


@pytest.fixture()
def tiny_prompts(tmp_path) -> Path:
    return write_prompts(tmp_path / "prompts.parquet")


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module's tests (restored after): exact comparisons between two
    code paths should not depend on how a reduction was split across threads."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
