"""Cross-tokenizer alignment (stages/lib/align.py) on real tokenizers and on hand-built spans.

- Identity: a teacher tokenizer that is the student's with its vocabulary permuted gives one-token
  chunks, its own log-probs back, the student's own top-K after mapping, and the same losses as
  the same-tokenizer path.
- Hand-built splits: chunk boundaries and chunk log-probs against a hand computation.
- Two byte-level BPE tokenizers trained on one corpus with different vocabulary sizes: every chunk
  decodes to the same text on both sides, and the chunks tile the text.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from stages.lib import align
from stages.lib.losses import chunk_opd, mapped_topk_fkl, opd_k1, topk_fkl, uld

WORDS = [f"w{i}" for i in range(40)] + ["question", "answer", ":", "?", "."]
SPECIALS = ["<pad>", "<unk>", "<bos>", "<eos>"]


def word_tokenizer(order: list[str]):
    """A word-level tokenizer whose ids follow ``order`` (any permutation of SPECIALS + WORDS)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(order)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
    )


def bpe_tokenizer(corpus: list[str], vocab_size: int):
    """A byte-level BPE tokenizer trained on ``corpus`` (every text round-trips)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>")


# ------------------------------------------------------------------------------ identity


def test_permuted_vocabulary_is_the_identity():
    order = SPECIALS + WORDS
    perm = list(range(len(order)))
    random.Random(0).shuffle(perm)  # student id i -> teacher id perm[i]
    t_order = [None] * len(order)
    for i, p in enumerate(perm):
        t_order[p] = order[i]
    tok_s, tok_t = word_tokenizer(order), word_tokenizer(t_order)
    v = len(order)
    g = torch.Generator().manual_seed(0)
    s_ids = torch.randint(len(SPECIALS), v, (15,), generator=g).tolist()

    bm_s, bm_t = align.byte_map(tok_s), align.byte_map(tok_t)
    data, s_off = bm_s.spans(s_ids)
    t_ids = align.encode_bytes(tok_t, bm_t, data)
    assert t_ids == [perm[i] for i in s_ids]
    chunks = align.align_spans(s_off, bm_t.spans(t_ids)[1])
    assert chunks.student_range == chunks.teacher_range == [(i, i + 1) for i in range(15)]
    assert b"".join(data[a:b] for a, b in chunks.spans) == data

    # the same teacher distribution in both id spaces (the permuted teacher's logits are permuted)
    lp = torch.log_softmax(torch.randn(15, v, generator=g) * 2, -1)  # [n, V] student ids
    lp_t = torch.empty_like(lp)
    lp_t[:, perm] = lp  # [n, V] teacher ids
    t_tok = lp_t[torch.arange(15), torch.tensor(t_ids)]  # [n] teacher-side token log-probs
    chunk_lp = align.chunk_logprobs(t_tok, chunks)
    same_path = lp[torch.arange(15), torch.tensor(s_ids)]
    assert torch.equal(align.per_student_token(chunk_lp, chunks), same_path)

    k = 8
    vals_t, ids_t = lp_t.topk(k, -1)  # [n, K] in teacher ids
    ids, lps, logmass = align.map_topk(
        ids_t, vals_t, align.surface_keys(tok_t, bm_t), align.surface_keys(tok_s, bm_s)
    )
    vals_s, ids_s = lp.topk(k, -1)
    assert torch.equal(ids, ids_s) and torch.equal(lps, vals_s)
    assert torch.equal(logmass, torch.logsumexp(vals_s, -1))

    # the losses on the aligned columns are the same-tokenizer losses exactly
    logits = torch.randn(15, v, generator=g)
    plain = {
        "token_id": torch.tensor(s_ids),
        "teacher_logprob": same_path,
        "teacher_topk_ids": ids_s,
        "teacher_topk_logprobs": vals_s,
        "teacher_topk_logmass": torch.logsumexp(vals_s, -1),
    }
    aligned = {
        "token_id": torch.tensor(s_ids),
        "chunk_index": torch.tensor(chunks.student_chunk),
        "teacher_chunk_logprob": align.per_student_token(chunk_lp, chunks),
        "teacher_mapped_ids": ids,
        "teacher_mapped_logprobs": lps,
        "teacher_mapped_logmass": logmass,
    }
    assert torch.equal(chunk_opd(logits, aligned)[0], opd_k1(logits, plain)[0])
    assert torch.equal(mapped_topk_fkl(logits, aligned)[0], topk_fkl(logits, plain)[0])


def test_special_tokens_map_by_role_only():
    order = SPECIALS + WORDS
    tok = word_tokenizer(order)
    strings = align.surface_keys(tok, align.byte_map(tok))
    assert strings[order.index("<eos>")] == ("role", "eos_token")
    assert strings[order.index("w3")] == b"w3"
    table = align.vocab_table(strings, strings)
    assert torch.equal(table, torch.arange(len(order)))


# ------------------------------------------------------------------------- hand-built splits


def test_hand_built_splits_and_chunk_logprobs():
    # text "abcdefgh"; student: ab|c|de|f|g|h   teacher: a|bc|d|e|fg|h
    s_off = [(0, 2), (2, 3), (3, 5), (5, 6), (6, 7), (7, 8)]
    t_off = [(0, 1), (1, 3), (3, 4), (4, 5), (5, 7), (7, 8)]
    ch = align.align_spans(s_off, t_off)
    # common ends {3, 5, 7, 8}: "abc" crosses (2 vs 2 tokens), "de" is one student token and two
    # teacher tokens, "fg" two student tokens and one teacher token, "h" one-to-one
    assert ch.spans == [(0, 3), (3, 5), (5, 7), (7, 8)]
    assert ch.student_range == [(0, 2), (2, 3), (3, 5), (5, 6)]
    assert ch.teacher_range == [(0, 2), (2, 4), (4, 5), (5, 6)]
    assert ch.student_chunk == [0, 0, 1, 2, 2, 3]
    assert ch.teacher_chunk == [0, 0, 1, 1, 2, 3]
    t_lp = torch.tensor([-0.5, -1.0, -0.25, -2.0, -0.125, -3.0])
    s_lp = torch.tensor([-1.5, -0.5, -0.75, -0.25, -1.0, -0.5])
    expect_t = torch.tensor([-0.5 - 1.0, -0.25 - 2.0, -0.125, -3.0])
    expect_s = torch.tensor([-1.5 - 0.5, -0.75, -0.25 - 1.0, -0.5])
    assert torch.equal(align.chunk_logprobs(t_lp, ch), expect_t)
    assert torch.equal(align.chunk_logprobs(s_lp, ch, side="student"), expect_s)
    per_tok = align.per_student_token(expect_t, ch)
    assert per_tok.tolist() == [-1.5, -1.5, -2.25, -0.125, -0.125, -3.0]


def test_empty_spans_join_the_chunk_they_start():
    # a zero-width student token (a special token, or the first byte of a character) at 2
    s_off = [(0, 2), (2, 2), (2, 4)]
    t_off = [(0, 2), (2, 3), (3, 4)]
    ch = align.align_spans(s_off, t_off)
    assert ch.spans == [(0, 2), (2, 4)]
    assert ch.student_chunk == [0, 1, 1] and ch.teacher_chunk == [0, 1, 1]


def test_mismatched_offsets_are_refused():
    with pytest.raises(ValueError, match="different lengths"):
        align.align_spans([(0, 3)], [(0, 2)])
    with pytest.raises(ValueError, match="not contiguous"):
        align.align_spans([(0, 1), (2, 3)], [(0, 3)])


def test_map_topk_unmapped_goes_to_tail():
    teacher = ["a", "b", None, "zz", "c"]  # id 2: special/ambiguous, id 3: no student string
    student = ["c", "b", "a"]
    ids = torch.tensor([[0, 3, 1, 2], [3, 2, -1, -1]])
    lps = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.05], [0.5, 0.2, 0.0, 0.0]]))
    m_ids, m_lp, logmass = align.map_topk(ids, lps, teacher, student)
    assert m_ids.tolist() == [[2, -1, 1, -1], [-1, -1, -1, -1]]
    assert torch.isneginf(m_lp[0, 1]) and torch.isneginf(m_lp[1]).all()
    torch.testing.assert_close(logmass[0].exp(), torch.tensor(0.6))
    assert torch.isneginf(logmass[1])


def test_sorted_probs():
    lp = torch.log(torch.tensor([[0.1, 0.6, 0.3], [0.2, 0.0, 0.8]]))
    torch.testing.assert_close(
        align.sorted_probs(lp), torch.tensor([[0.6, 0.3, 0.1], [0.8, 0.2, 0.0]])
    )


# ------------------------------------------------------------------- two real BPE tokenizers

CORPUS = [
    "the quick brown fox jumps over the lazy dog.",
    "question: what is the capital of the kingdom? answer: the river city.",
    "a café serves crème brûlée; the naïve fox orders two.",
    "distillation moves a teacher's knowledge into a smaller student model.",
    "numbers like 12345 and 3.14159 are split in many ways.",
] * 20
SENTENCES = [
    "the lazy fox asks a question: what is the answer?",
    "a smaller café, crème fraîche and 42 brûlées.",
    "teacher and student disagree on merges, not on text.",
    "unseen words: zyxwv qqq ññ.",
]


@pytest.fixture(scope="module")
def bpe_pair():
    return bpe_tokenizer(CORPUS, 300), bpe_tokenizer(CORPUS, 600)


@pytest.fixture(scope="module")
def byte_teacher():
    """No merges at all: one token per byte (a multi-byte character is two teacher tokens)."""
    return bpe_tokenizer(CORPUS, 1)


@pytest.mark.parametrize("teacher", ["bpe", "bytes"])
@pytest.mark.parametrize("sentence", SENTENCES)
def test_bpe_pair_chunks_agree_on_bytes(bpe_pair, byte_teacher, sentence, teacher):
    tok_s, tok_t = bpe_pair[0], bpe_pair[1] if teacher == "bpe" else byte_teacher
    bm_s, bm_t = align.byte_map(tok_s), align.byte_map(tok_t)
    s_ids = tok_s.encode(sentence, add_special_tokens=False)
    data, s_off = bm_s.spans(s_ids)
    assert data == sentence.encode()
    t_ids = align.encode_bytes(tok_t, bm_t, data)
    assert t_ids is not None and t_ids != s_ids  # different merges
    ch = align.align_spans(s_off, bm_t.spans(t_ids)[1])
    assert b"".join(data[a:b] for a, b in ch.spans) == data
    multi = 0
    for (a, b), (sa, sb), (ta, tb) in zip(
        ch.spans, ch.student_range, ch.teacher_range, strict=True
    ):
        # each side's tokens of the chunk spell the chunk's bytes
        assert bm_s.bytes_of(s_ids[sa:sb], sa == 0) == data[a:b]
        assert bm_t.bytes_of(t_ids[ta:tb], ta == 0) == data[a:b]
        multi += (sb - sa > 1) or (tb - ta > 1)
    assert len(ch.spans) <= min(len(s_ids), len(t_ids)) and multi > 0  # tokens really merged
    assert ch.student_chunk == sorted(ch.student_chunk)


def test_byte_spans_split_characters(bpe_pair):
    """Sampled ids that split a multi-byte character: each byte token gets its own byte, and
    a teacher with one token per byte spells them exactly (no U+FFFD anywhere)."""
    tok_s, _ = bpe_pair
    bm = align.byte_map(tok_s)
    byte_ids = [tok_s.convert_tokens_to_ids(c) for c in "Ã©"]  # "é" as its two byte tokens
    ids = tok_s.encode("caf", add_special_tokens=False) + byte_ids
    data, off = bm.spans(ids)
    assert data == "café".encode() and off[-2] == (3, 4) and off[-1] == (4, 5)
    lone = bm.spans(byte_ids[:1])[0]  # the first byte alone: not UTF-8, still exact
    assert lone == b"\xc3" and align.encode_bytes(tok_s, bm, lone) == byte_ids[:1]


def test_encode_bytes_refuses_what_it_cannot_spell():
    tok = word_tokenizer(SPECIALS + WORDS)
    bm = align.byte_map(tok)
    assert bm.kind == "text"
    assert align.encode_bytes(tok, bm, b"w1 w2 ?") is not None
    assert align.encode_bytes(tok, bm, b"w1 unknownword") is None  # <unk> has no bytes
    assert align.encode_bytes(tok, bm, b"w1  w2") is None  # the double space is lost
    assert align.encode_bytes(tok, bm, b"w1 \xc3") is None  # no byte alphabet


def test_aligned_losses_run_on_bpe_pair(bpe_pair):
    """The columns from a real alignment feed the losses (finite values, student-side grads)."""
    tok_s, tok_t = bpe_pair
    s_ids = tok_s.encode(SENTENCES[1], add_special_tokens=False)
    bm_s, bm_t = align.byte_map(tok_s), align.byte_map(tok_t)
    data, s_off = bm_s.spans(s_ids)
    t_ids = align.encode_bytes(tok_t, bm_t, data)
    ch = align.align_spans(s_off, bm_t.spans(t_ids)[1])
    g = torch.Generator().manual_seed(1)
    t_lp = torch.log_softmax(torch.randn(len(t_ids), len(tok_t), generator=g), -1)
    t_tok = t_lp[torch.arange(len(t_ids)), torch.tensor(t_ids)]
    vals, ids_t = t_lp.topk(16, -1)
    m_ids, m_lp, _ = align.map_topk(
        ids_t, vals, align.surface_keys(tok_t, bm_t), align.surface_keys(tok_s, bm_s)
    )
    rows = align.teacher_rows(ch)  # top-K only where both sides have read the same text
    assert all(r == ch.teacher_range[c][0] for r, c in zip(rows, ch.student_chunk) if r >= 0)
    assert sum(r >= 0 for r in rows) == len(ch.spans)
    first = torch.tensor(rows) >= 0
    last_t = torch.tensor(rows).clamp(min=0)
    m_ids = torch.where(first[:, None], m_ids[last_t], -1)
    m_lp, vals = m_lp[last_t], vals[last_t]
    batch = {
        "token_id": torch.tensor(s_ids),
        "chunk_index": torch.tensor(ch.student_chunk),
        "teacher_chunk_logprob": align.per_student_token(align.chunk_logprobs(t_tok, ch), ch),
        "teacher_mapped_ids": m_ids,
        "teacher_mapped_logprobs": m_lp,
        "teacher_sorted_probs": align.sorted_probs(vals),
    }
    assert (m_ids >= 0).any() and (m_ids < 0).any()  # partly shared vocabularies
    logits = torch.randn(len(s_ids), len(tok_s), generator=g, requires_grad=True)
    at_starts = dict(batch, weight=first.float())  # top-K losses only at comparable positions
    for fn, b in ((chunk_opd, batch), (mapped_topk_fkl, at_starts), (uld, at_starts)):
        loss, _ = fn(logits, b)
        (grad,) = torch.autograd.grad(loss, logits)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()


def metaspace_tokenizer(corpus: list[str], vocab_size: int):
    """A sentencepiece-style BPE (Metaspace: '▁' for spaces, the first token's stripped)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(byte_fallback=False, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Metaspace()
    tk.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<unk>", "<eos>"], show_progress=False
    )
    tk.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", unk_token="<unk>")


@pytest.mark.parametrize("kind", ["bpe", "bytes", "metaspace", "words", "wordpiece"])
def test_byte_spans_equal_the_decoders_text(bpe_pair, byte_teacher, kind):
    """On encoded text the byte spans spell what the tokenizer's decode gives; on random id
    sequences they are contiguous and each token's span is its bytes."""
    tok = {
        "bpe": lambda: bpe_pair[0],
        "bytes": lambda: byte_teacher,
        "metaspace": lambda: metaspace_tokenizer(CORPUS, 200),
        "words": lambda: word_tokenizer(SPECIALS + WORDS),
        "wordpiece": lambda: word_tokenizer(SPECIALS + WORDS),
    }[kind]()
    if kind == "wordpiece":  # the decoder's clean-up joins " ." to the word before
        from tokenizers import decoders

        tok.backend_tokenizer.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    bm = align.byte_map(tok)
    text = " ".join(SENTENCES + SENTENCES[::-1])
    ids = tok.encode(text, add_special_tokens=False)
    if tok.unk_token_id not in ids:  # (an unknown word is <unk>, which has no bytes)
        assert bm.spans(ids)[0] == tok.decode(ids).encode()
    g = random.Random(1)
    special = set(tok.all_special_ids)
    plain = [i for i in range(len(tok)) if i not in special]
    for _ in range(30):
        ids = [g.choice(plain) for _ in range(g.randrange(1, 80))]
        data, off = bm.spans(ids)
        assert off[0][0] == 0 and off[-1][1] == len(data)
        assert all(a[1] == b[0] for a, b in zip(off, off[1:]))
        assert all(data[a:b] == (bm.start if k == 0 else bm.mid)[i]
                   for k, ((a, b), i) in enumerate(zip(off, ids)))  # fmt: skip


# ------------------------------------------------------------------- in-context strings
def test_in_context_strings_map_word_level_to_byte_level(bpe_pair):
    """A word-level ``fox`` and a byte-level ``Ġfox`` add the same text after a word (`` fox``),
    though alone they decode to ``fox`` and `` fox``: the start table cannot map them, the
    in-context one does, and continuation pieces (no space) never map to whole words."""
    from stages.lib import xtok

    words = ["the", "fox", "lazy", "dog", "quick"]
    s_tok = word_tokenizer(SPECIALS + words)
    t_tok = bpe_pair[1]
    g_fox = t_tok.convert_tokens_to_ids("Ġfox")
    assert g_fox is not None and g_fox != t_tok.unk_token_id
    s_bm, t_bm = align.byte_map(s_tok), align.byte_map(t_tok)
    s_mid = align.surface_keys(s_tok, s_bm, "mid")
    t_mid = align.surface_keys(t_tok, t_bm, "mid")
    fox = s_tok.convert_tokens_to_ids("fox")
    assert s_mid[fox] == b" fox" and t_mid[g_fox] == b" fox"
    assert align.surface_keys(s_tok, s_bm)[fox] == b"fox"  # alone: no space
    v = xtok.Vocabs.of(s_tok, t_tok)
    assert v.table[g_fox] == -1 and v.table_mid[g_fox] == fox
    # the teacher's top-2 [Ġfox, fox-without-space or another piece] after a word: only Ġfox maps
    other = next(i for i, s in enumerate(t_mid) if isinstance(s, bytes) and s.isalpha())
    ids, lps, mk = xtok.mapped_topk(
        v, np.array([[g_fox, other]]), np.log(np.array([[0.7, 0.2]])), 3, np.array([True])
    )
    assert mk.tolist() == [1] and ids[0, 0] == fox
    # at the response's start the start table applies: nothing maps
    _, _, mk0 = xtok.mapped_topk(
        v, np.array([[g_fox, other]]), np.log(np.array([[0.7, 0.2]])), 3, np.array([False])
    )
    assert mk0.tolist() == [0]
