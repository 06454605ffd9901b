"""The one decoder: sampling and greedy decoding from token-id prefixes, for every stage.

Used by the rollout and SFT stages (through ``stages.lib.generation``), the eval stage and the demo
world. One contract everywhere:

- the checkpoint's ``generation_config.json`` is replaced by a plain one (it could add top-k,
  repetition penalties or stop ids behind the caller's back); our arguments are the only contract;
- padded vocabulary rows (output rows past the tokenizer) are never sampled;
- stopping (:class:`Stops`): the tokenizer EOS and every id of the model's
  ``generation_config.eos_token_id`` end a response with ``finish_reason="eos"``; configured stop
  ids and stop strings end it with ``"stop"``; otherwise ``"length"``. The stop token is part of
  the response. Stop strings are matched on the response's bytes (each token's bytes from the
  tokenizer's byte map, special tokens none) and stop generation itself: a stopping criterion in
  HF ``generate``, vLLM's ``stop``; both backends' samples are then cut by the same function;
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
    # per id, the bytes the token adds to a response (stages.lib.align's byte map; b"" for
    # special tokens): stop strings are matched on these, never on decoded text
    token_bytes: tuple[bytes, ...] = ()

    @property
    def all_ids(self) -> list[int]:
        return sorted(self.eos_ids | self.stop_ids)


class StringMatcher:
    """Finds the first token after which a response's bytes hold a stop string, one token at a
    time (the bytes kept are the last ``longest - 1`` and the new token's: O(1) per token)."""

    def __init__(self, stops: Stops):
        self.pats = [x.encode() for x in stops.strings]
        self.keep = max(map(len, self.pats)) - 1
        self.bytes = stops.token_bytes
        self.tail = b""

    def push(self, token: int) -> bool:
        """Add one token; True when a stop string ends inside it."""
        piece = self.bytes[token] if 0 <= token < len(self.bytes) else b""
        buf = self.tail + piece
        self.tail = buf[max(0, len(buf) - self.keep) :] if self.keep else b""
        return bool(piece) and any(p in buf for p in self.pats)


class StopStringCriteria:
    """``model.generate`` stopping criterion: a row is done at the token that completes a stop
    string (the same rule as ``cut``, so generation stops where the response is cut)."""

    def __init__(self, stops: Stops):
        self.stops = stops
        self.rows: list[StringMatcher] | None = None
        self.done: list[bool] = []

    def __call__(self, input_ids: torch.Tensor, scores: Any = None, **kw: Any) -> torch.Tensor:
        last = input_ids[:, -1].tolist()  # [B] the newest token of each row
        if self.rows is None:
            self.rows = [StringMatcher(self.stops) for _ in last]
            self.done = [False] * len(last)
        for r, t in enumerate(last):
            self.done[r] = self.done[r] or self.rows[r].push(int(t))
        return torch.tensor(self.done, dtype=torch.bool, device=input_ids.device)  # [B]


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
    """The stop rule of a policy; stop strings are matched on the response's bytes."""
    from stages.lib import align
    from stages.lib.errors import UserError

    eos = {int(tok.eos_token_id)} | generation_eos_ids(model_path)
    token_bytes: tuple[bytes, ...] = ()
    if strings:
        specials = set(tok.convert_ids_to_tokens(sorted(align.special_ids(tok))))
        for x in strings:
            if x in specials:
                raise UserError(
                    f"stop string {x!r} is a special token: special tokens are not part of the "
                    "response's text",
                    "rollout.stop_strings",
                    f"give its id in rollout.stop_token_ids ({tok.convert_tokens_to_ids(x)})",
                )
        token_bytes = tuple(b or b"" for b in align.byte_map(tok).mid)
    stop = frozenset(int(i) for i in stop_ids) - eos
    return Stops(frozenset(eos), stop, tuple(strings), token_bytes)


def cut(ids: list[int], stops: Stops, max_new_tokens: int) -> tuple[int, str]:
    """Length of the response inside a generated row (stop token included), and why it ended:
    the first EOS id (``eos``), configured stop id or token completing a stop string
    (``stop``), else ``length``. O(n)."""
    ids = ids[:max_new_tokens]
    match = StringMatcher(stops) if stops.strings else None
    for i, t in enumerate(ids):
        if t in stops.eos_ids:
            return i + 1, "eos"
        if match is not None and match.push(t):
            return i + 1, "stop"
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


class _StepLogprobs:
    """Logits processor placed before temperature / top-p: it sees each step's raw fp32 logits
    (padded vocabulary rows already masked by ``_MaskRows``), keeps that ONE step's log-softmax
    and gathers it at the token sampled from it when the next step (or ``finish``) reveals that
    token. Memory: one ``[rows, V]`` block, whatever the number of steps (``output_logits`` kept
    all T of them), and a ``[rows, max_new_tokens]`` result allocated once (growing it step by
    step left small blocks between the big ones and the heap grew with T)."""

    def __init__(self, max_new_tokens: int) -> None:
        self.max_new_tokens = max_new_tokens
        self.pending: torch.Tensor | None = None  # [rows, V] log-softmax of the newest step
        self.out: torch.Tensor | None = None  # [rows, max_new_tokens] fp32, on the CPU
        self.t = 0  # steps gathered so far

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.out is None:
            self.out = torch.zeros(scores.shape[0], self.max_new_tokens, dtype=torch.float32)
        if self.pending is not None:  # input_ids[:, -1] was sampled from the pending step
            self._take(input_ids[:, -1])
        self.pending = torch.log_softmax(scores.float(), dim=-1)  # [rows, V] raw, temperature 1
        return scores

    def _take(self, tokens: torch.Tensor) -> None:
        idx = tokens.to(self.pending.device)[:, None]  # [rows, 1]
        self.out[:, self.t] = self.pending.gather(1, idx).squeeze(1).cpu()  # [rows]
        self.t += 1
        self.pending = None

    def finish(self, gen: torch.Tensor) -> torch.Tensor:
        """The log-probs of the generated ids ``gen`` [rows, T] -> [rows, T] fp32."""
        if self.pending is not None and gen.shape[1] > self.t:
            self._take(gen[:, self.t])
        self.pending = None
        if self.out is None:
            return torch.zeros(gen.shape, dtype=torch.float32)
        return self.out[:, : gen.shape[1]]  # [rows, T]


def prefill_shared(
    model: Any, ids: torch.Tensor, mask: torch.Tensor, n: int, new_tokens: int = 0
) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """Run each prompt's prefix ONCE and repeat its KV cache for its ``n`` samples.

    ``ids`` / ``mask`` ``[B, L]`` left-padded. The first ``L - 1`` positions go through the model
    at batch ``B`` (``generate`` with ``num_return_sequences=n`` would run them at ``B * n``); the
    cache is then repeated to ``B * n`` rows and ``generate`` continues from it with the last
    prompt token. Returns the ``[B * n, L]`` ids and mask to pass with the cache. Positions follow
    ``generate``'s own rule for left padding (cumulative sum of the mask, minus one). With
    ``new_tokens``, the cache is preallocated for them (``preallocated``).
    """
    pos = (mask.cumsum(-1) - 1).clamp(min=0)  # [B, L]
    out = model(
        input_ids=ids[:, :-1],
        attention_mask=mask[:, :-1],
        position_ids=pos[:, :-1],
        use_cache=True,
        logits_to_keep=1,  # the prefix's logits are not needed: no [B, L, V] block
    )
    cache = out.past_key_values
    cache.batch_repeat_interleave(n)
    if new_tokens:
        cache = preallocated(model, cache, ids.shape[1] + new_tokens)
    return ids.repeat_interleave(n, dim=0), mask.repeat_interleave(n, dim=0), cache


def preallocated(model: Any, cache: Any, length: int) -> Any:
    """A prefilled ``DynamicCache`` copied into a ``StaticCache`` of ``length`` positions, which
    each decoding step writes in place. The dynamic cache concatenates every layer's keys and
    values at every step, a copy of the whole cache per token: with 256-token prompts and 32 rows
    that copy was most of the decoding time, and the static cache sampled the same tokens at 0.64x
    the CPU seconds (``scripts/bench_kv_cache.py``). The cache is returned as it was when a layer
    is not plain full attention (a sliding window keeps the dynamic cache's rule)."""
    from transformers import StaticCache
    from transformers.cache_utils import StaticLayer

    pre = StaticCache(config=model.config, max_cache_len=length)
    if len(pre.layers) != len(cache.layers) or any(type(x) is not StaticLayer for x in pre.layers):
        return cache
    for i, layer in enumerate(cache.layers):  # the prefix, written once: [B*n, heads, L - 1, d]
        pre.update(layer.keys, layer.values, i)
    return pre


def split_decode(
    model: Any,
    ids: torch.Tensor,
    mask: torch.Tensor,
    s: Sampling,
    procs: Any,
    stops: Stops,
    pad: int,
    criteria: list,
) -> torch.Tensor | None:
    """``s.n`` samples per prompt with each prompt's prefix kept ONCE for the whole decoding: its
    keys and values stay one tensor per prompt that every step's attention reads in one batched
    matmul for the prompt's ``n`` rows (``stages.lib.prefix_attention``), while each row's own
    tokens go into a ``[rows, max_new_tokens]`` static cache. The repeated-cache path reads the
    prompt ``n`` times per step and copies it ``n`` times before decoding.

    The loop is ``generate``'s sampling loop: the same logits processors (``procs``, then
    temperature and top-p), one ``torch.multinomial`` draw per step, finished rows padded, EOS
    and ``criteria`` stopping a row, the loop ending when every row is done; so the same seed
    draws the same random numbers, and the tokens equal ``generate``'s wherever the fp32 logits
    do not round across a sampling boundary. Returns the generated ids ``[B * n, T']``, or None
    where the split attention does not suit the model (the caller then uses ``generate``).
    """
    from transformers import StaticCache, TemperatureLogitsWarper, TopPLogitsWarper

    from stages.lib import prefix_attention as pa

    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if decoder is None or decoder is model or not pa.fits(decoder, 1):
        return None
    b, n, steps = ids.shape[0], s.n, s.max_new_tokens
    pos = (mask.cumsum(-1) - 1).clamp(min=0)  # [B, L] generate's rule for left padding
    pre = decoder(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], position_ids=pos[:, :-1],
                  use_cache=True).past_key_values  # fmt: skip
    layers = getattr(pre, "layers", None)
    if not layers:
        return None
    device = ids.device
    # step t's query sees own positions 0..t: row t of the causal mask over the T own positions
    causal = pa.causal_bias(steps, layers[0].keys.dtype, device)  # [1, 1, T, T]
    ctx = pa.context(layers, mask[:, :-1], [i // n for i in range(b * n)], causal[:, :, :1])
    greedy = s.temperature == 0
    warpers = [] if greedy else [
        *([TemperatureLogitsWarper(s.temperature)] if s.temperature != 1.0 else []),
        *([TopPLogitsWarper(s.top_p)] if s.top_p < 1.0 else []),
    ]  # fmt: skip
    own = StaticCache(config=model.config, max_cache_len=steps)
    seq = ids.repeat_interleave(n, dim=0)  # [R, L] the rows so far, as generate keeps them
    cur, start = seq[:, -1:], pos[:, -1].repeat_interleave(n)[:, None]  # [R, 1] each
    alive = torch.ones(seq.shape[0], dtype=torch.bool, device=device)  # [R]
    eos = torch.tensor(stops.all_ids, dtype=torch.long, device=device)
    for t in range(steps):
        ctx.own_bias = causal[:, :, t : t + 1]  # [1, 1, 1, T]
        ctx.calls = 0
        with pa.active(decoder, ctx):
            out = model(input_ids=cur, position_ids=start + t, past_key_values=own, use_cache=True)
        if ctx.calls != len(layers):  # attention outside transformers' interface: not split
            if t == 0:  # nothing drawn or recorded yet: generate can take over
                return None
            raise RuntimeError("split decoding: a layer left the split attention mid-decode")
        scores = procs(seq, out.logits[:, -1, :].to(dtype=torch.float32, copy=True))  # [R, V]
        for w in warpers:
            scores = w(seq, scores)
        if greedy:
            nxt = scores.argmax(-1)  # [R]
        else:
            nxt = torch.multinomial(torch.softmax(scores, -1), num_samples=1).squeeze(1)  # [R]
        nxt = torch.where(alive, nxt, torch.full_like(nxt, pad))
        seq = torch.cat([seq, nxt[:, None]], dim=-1)  # [R, L + t + 1]
        done = torch.isin(nxt, eos)
        for c in criteria:
            done = done | c(seq, scores)
        alive = alive & ~done
        if not bool(alive.any()):
            break
        cur = nxt[:, None]
    return seq[:, ids.shape[1] :]  # [R, T']


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
    share_prefix: bool = True,
) -> list[list[Sample]]:
    """``s.n`` samples per prompt with ``model.generate`` (left padding, batches of prompts).

    ``torch.manual_seed(seed)`` once, then batches in order: the same inputs, seed and batch size
    give the same samples. The behaviour log-probs are the raw (temperature 1) full-vocabulary
    fp32 log-softmax at each sampled token, computed step by step by a logits processor
    (``_StepLogprobs``), so memory is ``O(batch_size * n * V)`` plus the KV cache, independent of
    ``max_new_tokens``. ``share_prefix`` (with ``n > 1``): each prompt's prefix is computed once
    and its cache repeated for the ``n`` samples (``prefill_shared``); the samples follow the
    same distribution, and their log-probs agree with the unshared path within fp32 rounding.
    Stop strings stop each row's generation (``StopStringCriteria``) at the token ``cut`` cuts at.
    """
    from transformers import LogitsProcessorList, StoppingCriteriaList

    torch.manual_seed(seed)
    device = next(model.parameters()).device
    rows = model.get_output_embeddings().weight.shape[0]
    greedy = s.temperature == 0
    results: list[list[Sample]] = []
    for b in range(0, len(prompt_ids), batch_size):
        batch = prompt_ids[b : b + batch_size]
        ids, mask = left_pad(batch, pad)  # [B, L]
        ids, mask = ids.to(device), mask.to(device)
        record = _StepLogprobs(s.max_new_tokens) if logprobs else None
        # custom processors run before generate's temperature / top-p: the recorder sees the raw
        # logits with the padded rows masked (the distribution sampled from at temperature 1)
        procs = LogitsProcessorList(
            ([_MaskRows(n_ids)] if rows > n_ids else []) + ([record] if record else [])
        )
        # generation stops at a stop string, where ``cut`` cuts (split_decode returns None
        # before its first call, so generate can take the same criterion over)
        crit = [StopStringCriteria(stops)] if stops.strings else []
        extra: dict[str, Any] = {"stopping_criteria": StoppingCriteriaList(crit)} if crit else {}
        shared = share_prefix and s.n > 1 and ids.shape[1] > 1
        gen = split_decode(model, ids, mask, s, procs, stops, pad, crit) if shared else None
        if gen is None and shared:  # the prefix's cache copied per sample
            ids, mask, cache = prefill_shared(model, ids, mask, s.n, s.max_new_tokens)  # [B*n, L]
            # a static cache would turn on compiling on CUDA
            extra |= {"past_key_values": cache, "disable_compile": True}
        elif gen is None:
            extra["num_return_sequences"] = s.n
        if gen is None:
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                do_sample=not greedy,
                temperature=None if greedy else s.temperature,
                top_p=None if greedy else s.top_p,
                top_k=None if greedy else 0,
                max_new_tokens=s.max_new_tokens,
                eos_token_id=stops.all_ids,
                pad_token_id=pad,
                logits_processor=procs,
                return_dict_in_generate=True,
                **extra,
            )
            gen = out.sequences[:, ids.shape[1] :]  # [B*n, T]
        gen = gen.cpu()
        gen_l = gen.tolist()
        lps_l = record.finish(gen).tolist() if record else None  # [B*n, T]
        del extra
        for i in range(len(batch)):
            samples = []
            for j in range(s.n):
                r = i * s.n + j  # each prompt's n samples are consecutive rows
                length, reason = cut(gen_l[r], stops, s.max_new_tokens)
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
