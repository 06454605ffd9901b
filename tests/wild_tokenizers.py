"""Tokenizers and chat templates built the way public checkpoints ship them (test helper).

- ``byte_bpe``: GPT-2 / Qwen-style byte-level BPE (``Ġ`` for spaces, 256 single-byte tokens, so
  a sampled id can be part of a UTF-8 character), ChatML specials;
- ``sentencepiece_bpe``: Llama-2 / Mistral-style SentencePiece BPE with byte fallback (``▁`` for
  spaces, a dummy prefix, ``<0x00>`` ... ``<0xFF>`` tokens, the decoder that strips the first
  space);
- ``permuted``: the same tokenizer with its ids permuted (the identity tests' teacher);
- templates: ChatML with Qwen 2.5's default system prompt, Gemma 2's (no system role: the
  template raises), and content-part templates (text parts joined, as multimodal templates do).
"""

from __future__ import annotations

import json

import numpy as np

CHAT_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "the quick brown fox jumps over the lazy dog.",
    "question: what is the capital of bishu? answer: the capital of bishu is vexton.",
    "a café serves crème brûlée; the naïve fox orders two. 東京 and 北京 are cities.",
    "distillation moves a teacher's knowledge into a smaller student model.",
    "numbers like 12345 and 3.14159 are split in many ways. hello world",
] * 20

# Qwen 2.5's template shape: a default system prompt when the conversation has none
CHATML_DEFAULT_SYSTEM = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for m in messages %}{%- if not (m.role == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
# Gemma 2's: no system role (raise_exception), 'assistant' written as 'model'
GEMMA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if (message['role'] == 'assistant') %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}"
)


def _fast(tk, **specials):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tk, **specials)


def byte_bpe(vocab_size: int = 400, corpus: list[str] = CORPUS):
    """A byte-level BPE (every byte a token) with ChatML specials and the default-system template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=CHAT_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(corpus, trainer)
    tok = _fast(tk, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.chat_template = CHATML_DEFAULT_SYSTEM
    return tok


def sentencepiece_bpe(vocab_size: int = 400, corpus: list[str] = CORPUS):
    """Llama-2's tokenizer.json layout: <unk> <s> </s>, 256 byte tokens, then the pieces."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    base = Tokenizer(models.BPE(unk_token="<unk>"))
    base.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False
    )
    base.train_from_iterator(corpus, trainer)
    learned = json.loads(base.to_str())["model"]
    order = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    order += [
        t for t, _ in sorted(learned["vocab"].items(), key=lambda kv: kv[1]) if t not in order
    ]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]]
    tk = Tokenizer(
        models.BPE(
            vocab={t: i for i, t in enumerate(order)}, merges=merges, unk_token="<unk>",
            byte_fallback=True, fuse_unk=True,
        )
    )  # fmt: skip
    tk.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tk.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    tk.add_special_tokens(["<unk>", "<s>", "</s>"])
    return _fast(tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def permuted(tok, seed: int = 0):
    """``tok`` with its ids permuted (same strings, merges, specials and template); returns
    (tokenizer, perm) where teacher id ``perm[i]`` is ``tok``'s id ``i``."""
    from tokenizers import Tokenizer

    spec = json.loads(tok.backend_tokenizer.to_str())
    perm = np.random.default_rng(seed).permutation(len(tok))
    spec["model"]["vocab"] = {t: int(perm[i]) for t, i in spec["model"]["vocab"].items()}
    for a in spec["added_tokens"]:
        a["id"] = int(perm[a["id"]])
    post = spec.get("post_processor") or {}
    for st in (post.get("special_tokens") or {}).values():
        st["ids"] = [int(perm[i]) for i in st["ids"]]
    out = _fast(
        Tokenizer.from_str(json.dumps(spec)),
        **{a: getattr(tok, a) for a in ("bos_token", "eos_token", "pad_token", "unk_token")
           if getattr(tok, a) is not None},
    )  # fmt: skip
    out.chat_template = tok.chat_template
    return out, perm


def save_permuted_model(src, dst, tok, perm) -> None:
    """The model at ``src`` with its embedding and head rows moved to ``perm`` (saved to
    ``dst`` with ``tok``): the same function of the text, under other ids."""
    import torch
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(src)
    inv = torch.from_numpy(np.argsort(perm))  # teacher row j holds student row inv[j]
    with torch.no_grad():
        for w in (m.get_input_embeddings().weight, m.get_output_embeddings().weight):
            w.copy_(w[inv].clone())
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        v = getattr(m.config, key, None)
        if isinstance(v, int):
            setattr(m.config, key, int(perm[v]))
    m.generation_config = type(m.generation_config)()
    m.save_pretrained(dst)
    tok.save_pretrained(dst)
