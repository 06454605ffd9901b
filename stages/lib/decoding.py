"""The one decoder: sampling and greedy decoding from token-id prefixes, for every stage.

Used by the rollout and SFT stages (through ``stages.lib.generation``), the eval stage and the demo
world. One contract everywhere:

- the checkpoint's ``generation_config.json`` is replaced by a plain one (it could add top-k,
  repetition penalties or stop ids behind the caller's back); our arguments are the only contract;
- padded vocabulary rows (output rows past the tokenizer) are never sampled;
- stopping (:class:`Stops`): the tokenizer EOS and every id of the model's
  ``generation_config.eos_token_id`` end a response with ``finish_reason="eos"``; configured stop
  ids and stop strings end it with ``"stop"``; otherwise ``"length"``. The stop token is part of
  the response. The vLLM backend cuts with the same function, so both agree;
- ``temperature == 0`` is greedy.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


@dataclass(frozen=True)
class Sampling:
    """How responses are sampled. ``temperature == 0`` means greedy."""

    n: int
    temperature: float
    top_p: float
    max_new_tokens: int

    @staticmethod
    def of(r: Any) -> Sampling:
        """From a RolloutConfig (or anything with n, temperature, top_p, max_new_tokens)."""
        return Sampling(r.n, r.temperature, r.top_p, r.max_new_tokens)

    @staticmethod
    def greedy(max_new_tokens: int) -> Sampling:
        return Sampling(1, 0.0, 1.0, max_new_tokens)


@dataclass
class Sample:
    """One sampled response, identical in shape for both backends."""

    response_ids: list[int]
    logprobs: list[float]  # raw-distribution (temperature 1) log-prob of each token ([] if off)
    finish_reason: str  # eos | stop | length


@dataclass(frozen=True)
class Stops:
    """What ends a response: EOS ids (``eos``), configured ids and strings (``stop``)."""

    eos_ids: frozenset[int]
    stop_ids: frozenset[int] = frozenset()
    strings: tuple[str, ...] = ()

    @property
    def all_ids(self) -> list[int]:
        return sorted(self.eos_ids | self.stop_ids)


def generation_eos_ids(model_path: str | Path | None) -> set[int]:
    """Every id of the checkpoint's ``generation_config.eos_token_id`` (an int or a list), or of
    ``config.json``'s when it has no generation config."""
    if model_path is None:
        return set()
    for name in ("generation_config.json", "config.json"):
        p = Path(model_path) / name
        if p.is_file():
            try:
                v = json.loads(p.read_text()).get("eos_token_id")
            except (ValueError, AttributeError):
                continue
            if v is not None:
                return {int(v)} if isinstance(v, int) else {int(x) for x in v}
    return set()


def stops_for(
    tok: Any,
    model_path: str | Path | None,
    stop_ids: list[int] | tuple[int, ...] = (),
    strings: list[str] | tuple[str, ...] = (),
) -> Stops:
    eos = {int(tok.eos_token_id)} | generation_eos_ids(model_path)
    return Stops(frozenset(eos), frozenset(int(i) for i in stop_ids) - eos, tuple(strings))


def cut(ids: list[int], stops: Stops, max_new_tokens: int, tok: Any = None) -> tuple[int, str]:
    """Length of the response inside a generated row (stop token included), and why it ended."""
    ids = ids[:max_new_tokens]
    text_hit = None
    if stops.strings and tok is not None:
        full = tok.decode(ids, skip_special_tokens=False)
        if any(s in full for s in stops.strings):  # find the first token completing one
            for i in range(len(ids)):
                text = tok.decode(ids[: i + 1], skip_special_tokens=False)
                if any(s in text for s in stops.strings):
                    text_hit = i
                    break
    for i, t in enumerate(ids):
        if text_hit is not None and i == text_hit and t not in stops.eos_ids:
            return i + 1, "stop"
        if t in stops.eos_ids:
            return i + 1, "eos"
        if t in stops.stop_ids:
            return i + 1, "stop"
    return len(ids), "length"


# ----------------------------------------------------------------------------- HF backend
def pad_id(tok: Any) -> int:
    """The pad id, or EOS for pad-less tokenizers (pads are masked out and cut off anyway)."""
    return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id


def plain_generation_config(model: Any, tok: Any) -> None:
    """Forget the checkpoint's generation_config.json (see the module docstring)."""
    from transformers import GenerationConfig

    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=pad_id(tok)
    )


class _MaskRows:
    """Logits processor: never sample ids past the tokenizer (padded embedding rows)."""

    def __init__(self, n_ids: int):
        self.n_ids = n_ids

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores[:, self.n_ids :] = -math.inf  # [B, V_model]
        return scores


def left_pad(prompts: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and attention mask, both ``[B, L]``."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)  # [B, L]
    mask = torch.zeros((len(prompts), width), dtype=torch.long)  # [B, L]
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p) :] = 1
    return ids, mask


def sampled_logprobs(logits: tuple[torch.Tensor, ...], gen: torch.Tensor) -> torch.Tensor:
    """fp32 full-vocabulary log-softmax of the raw logits, gathered at the sampled ids: ``[B, T]``."""
    out = torch.empty(gen.shape, dtype=torch.float32)  # [B, T]
    for t, step in enumerate(logits):  # step: [B, V] raw (unprocessed) logits of position t
        lsm = torch.log_softmax(step.float(), dim=-1)  # [B, V]
        out[:, t] = lsm.gather(1, gen[:, t : t + 1].to(lsm.device)).squeeze(1).cpu()
    return out


@torch.no_grad()
def hf_generate(
    model: Any,
    prompt_ids: list[list[int]],
    s: Sampling,
    *,
    stops: Stops,
    pad: int,
    n_ids: int,
    batch_size: int,
    seed: int,
    tok: Any = None,
    logprobs: bool = True,
) -> list[list[Sample]]:
    """``s.n`` samples per prompt with ``model.generate`` (left padding, batches of prompts).

    ``torch.manual_seed(seed)`` once, then batches in order: the same inputs, seed and batch size
    give the same samples. ``output_logits`` returns the raw logits (``output_scores`` would be
    the temperature/top-p processed ones), from which the behaviour log-probs are computed.
    Memory: with ``logprobs`` generate keeps ``[batch_size * n, V]`` fp32 logits per step until it
    returns, i.e. ``4 * batch_size * n * max_new_tokens * V`` bytes; lower the batch for big vocabs.
    ``tok`` is needed only for stop strings.
    """
    from transformers import LogitsProcessorList

    torch.manual_seed(seed)
    device = next(model.parameters()).device
    rows = model.get_output_embeddings().weight.shape[0]
    procs = LogitsProcessorList([_MaskRows(n_ids)] if rows > n_ids else [])
    greedy = s.temperature == 0
    results: list[list[Sample]] = []
    for b in range(0, len(prompt_ids), batch_size):
        batch = prompt_ids[b : b + batch_size]
        ids, mask = left_pad(batch, pad)  # [B, L]
        out = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            do_sample=not greedy,
            temperature=None if greedy else s.temperature,
            top_p=None if greedy else s.top_p,
            top_k=None if greedy else 0,
            max_new_tokens=s.max_new_tokens,
            num_return_sequences=s.n,
            eos_token_id=stops.all_ids,
            pad_token_id=pad,
            logits_processor=procs,
            output_logits=logprobs,
            return_dict_in_generate=True,
        )
        gen = out.sequences[:, ids.shape[1] :].cpu()  # [B*n, T]
        gen_l = gen.tolist()
        lps_l = sampled_logprobs(out.logits, gen).tolist() if logprobs else None  # [B*n, T]
        for i in range(len(batch)):
            samples = []
            for j in range(s.n):
                r = i * s.n + j  # num_return_sequences repeats each prompt n times in a row
                length, reason = cut(gen_l[r], stops, s.max_new_tokens, tok)
                lps = lps_l[r][:length] if lps_l is not None else []
                samples.append(Sample(gen_l[r][:length], lps, reason))
            results.append(samples)
    return results


def greedy(
    model: Any,
    tok: Any,
    prompt_ids: list[list[int]],
    *,
    max_new_tokens: int,
    batch_size: int,
    stops: Stops | None = None,
) -> list[Sample]:
    """Greedy decoding (temperature 0) under the rollout's contract; one ``Sample`` per prompt
    (no log-probs). Resets the model's generation config (see the module docstring)."""
    from stages.lib import models

    plain_generation_config(model, tok)
    out = hf_generate(
        model,
        prompt_ids,
        Sampling.greedy(max_new_tokens),
        stops=stops or stops_for(tok, None),
        pad=pad_id(tok),
        n_ids=models.vocab_size(tok),
        batch_size=batch_size,
        seed=0,
        tok=tok,
        logprobs=False,
    )
    return [per[0] for per in out]


def sample_many(
    model: Any,
    tok: Any,
    prompt_ids: list[list[int]],
    s: Sampling,
    *,
    batch_size: int,
    seed: int = 0,
    stops: Stops | None = None,
) -> list[list[Sample]]:
    """Sampled decoding (e.g. pass@k) under the same contract: ``s.n`` Samples per prompt, no
    log-probs."""
    from stages.lib import models

    plain_generation_config(model, tok)
    return hf_generate(
        model,
        prompt_ids,
        s,
        stops=stops or stops_for(tok, None),
        pad=pad_id(tok),
        n_ids=models.vocab_size(tok),
        batch_size=batch_size,
        seed=seed,
        tok=tok,
        logprobs=False,
    )
