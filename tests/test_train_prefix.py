"""Prefix-shared training (``train.share_prefix``, stages/lib/logprobs.py ``response_hidden``):
rows of a micro-batch with the same train prompt run it once through the student. The loss and
every parameter's gradient equal the unshared forward's to fp32 rounding, on a random model with
groups of 1-4 rows per prompt, prompts of 1-40 tokens and ragged responses."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

from stages.lib import logprobs as lp
from stages.lib import models
from stages.lib.config import compose
from stages.lib.errors import UserError
from stages.lib.logprobs import response_positions
from stages.lib.scoring.hf import pad_right
from stages.lib.training.objective import ResponseLoss

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def batch_of(vocab: int, seed: int, lens=(1, 6, 23, 40)):
    """Rows grouped by prompt (as the rollout writes a prompt's n samples), right-padded."""
    rng = np.random.default_rng(seed)
    prefixes, responses = [], []
    for p in lens:
        prefix = rng.integers(4, vocab, p).tolist()
        for _ in range(int(rng.integers(1, 5))):
            prefixes.append(prefix)
            responses.append(rng.integers(4, vocab, int(rng.integers(1, 15))).tolist())
    ids, mask = pad_right([p + r for p, r in zip(prefixes, responses)], 0)  # [B, L]
    pos = response_positions([len(p) for p in prefixes], [len(r) for r in responses], ids.shape[1])
    return ids, mask, pos, prefixes, responses


@contextlib.contextmanager
def decoder_widths(model):
    """The token width of each decoder call made inside the block, in order."""
    widths: list[int] = []
    hook = model.get_decoder().register_forward_pre_hook(
        lambda _m, _a, kw: widths.append(kw["input_ids"].shape[1]), with_kwargs=True
    )
    try:
        yield widths
    finally:
        hook.remove()


def loss_and_grads(model, ids, mask, pos, responses, share: bool):
    model.zero_grad()
    targets = torch.tensor([t for r in responses for t in r])  # [M]
    h = lp.response_hidden(model, ids, mask, pos, share)  # [M, H]
    logp = torch.log_softmax(lp.model_head(model)(h), -1)  # [M, V]
    loss = -logp.gather(1, targets[:, None]).sum()
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("lens", [(1, 6, 23, 40), (2, 6, 23, 40)])
def test_shared_training_forward_and_gradients_equal_unshared(tiny_lm, seed, lens):
    """With every prompt >= 2 tokens, a prompt's last token is fed with each of its rows (the
    prompt pass has no read output, so no backward through its last layer); a 1-token prompt
    keeps the prompt whole (its pass would be empty)."""
    model = models.load_model(str(tiny_lm), "student")
    model.train()
    vocab = model.config.vocab_size
    ids, mask, pos, prefixes, responses = batch_of(vocab, seed, lens)
    groups = lp.prefix_groups(ids, mask, pos)
    assert groups is not None and len(groups[0]) == 4 < len(prefixes)  # 4 prompts, more rows
    assert groups[1] == responses
    a, ga = loss_and_grads(model, ids, mask, pos, responses, share=False)
    with decoder_widths(model) as widths:  # the prompt pass first
        b, gb = loss_and_grads(model, ids, mask, pos, responses, share=True)
    assert widths[0] == max(lens) - (min(lens) >= 2)
    assert abs(a - b) <= 1e-5 * abs(a)
    for name, g in ga.items():
        scale = float(g.abs().max()) + 1e-12
        assert float((g - gb[name]).abs().max()) <= 1e-4 * scale, name


def test_unsplit_sharing_runs_the_whole_prompt(tiny_lm):
    """``split=False`` (the arithmetic the demo pins) keeps each prompt whole in its pass."""
    model = models.load_model(str(tiny_lm), "student")
    ids, mask, pos, _, _ = batch_of(model.config.vocab_size, 0, (2, 6, 23, 40))
    with decoder_widths(model) as widths:
        lp.response_hidden(model, ids, mask, pos, share_prefix=True, split=False)
        lp.response_hidden(model, ids, mask, pos, share_prefix=True, split=True)
    assert widths[0] == 40 and widths[2] == 39


def test_prefix_groups_is_none_when_nothing_repeats(tiny_lm):
    ids, mask = pad_right([[5, 6, 7], [5, 6, 8], [9]], 0)  # [3, 3]
    pos = response_positions([2, 2, 1], [1, 1, 0], 3)
    assert lp.prefix_groups(ids, mask, pos) is None  # a row that scores nothing
    pos = response_positions([2, 1], [1, 2], 3)
    ids, mask = pad_right([[5, 6, 7], [5, 6, 8]], 0)
    assert lp.prefix_groups(ids, mask, pos) is None  # prefixes [5, 6] and [5]: no repeat
    pos = response_positions([2, 2], [1, 1], 3)
    assert lp.prefix_groups(ids, mask, pos) == ([[5, 6]], [[7], [8]], [0, 0])


def test_response_loss_shares_only_when_asked(tiny_lm):
    """ResponseLoss with share_prefix gives the unshared loss; the decoder runs on fewer tokens."""
    model = models.load_model(str(tiny_lm), "student")
    vocab = model.config.vocab_size
    ids, mask, pos, _, responses = batch_of(vocab, 2)
    m = len(pos)
    batch = {"token_id": torch.tensor([t for r in responses for t in r]),
             "weight": torch.ones(m), "segment": torch.zeros(m, dtype=torch.uint8)}  # fmt: skip
    seen = []
    hook = model.get_input_embeddings().register_forward_hook(
        lambda mod, args, out: seen.append(args[0].numel())
    )
    try:
        out = {}
        for share in (False, True):
            seen.clear()
            wrapped = ResponseLoss(model, [("sft", 1.0, {})], vocab, 1.0, 16, share)
            loss, _ = wrapped(ids, mask, pos, dict(batch))
            out[share] = (loss.item(), sum(seen))
    finally:
        hook.remove()
    assert abs(out[True][0] - out[False][0]) <= 1e-5 * abs(out[False][0])
    assert out[True][1] < out[False][1]


def test_train_share_prefix_key(tmp_path):
    cfg = compose("train", [f"run_dir={tmp_path}"])
    assert cfg.train.share_prefix is True
    with pytest.raises(UserError) as e:
        compose("train", [f"run_dir={tmp_path}", "train.share_prefix=sometimes"])
    assert "train.share_prefix" in str(e.value)
