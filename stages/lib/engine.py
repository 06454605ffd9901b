"""The loaded policy behind one ``sample`` call: the HF backend (stages/lib/decoding.py) or
vLLM (stages/lib/vllm_backend.py), cut and labelled by the same stop rule."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from stages.lib import decoding, models, vllm_backend
from stages.lib.config import RolloutConfig
from stages.lib.decoding import Sample, Sampling

VLLM_MAX_LOGPROBS = 20  # vLLM's default; sharing one value lets the stages share cached engines


@dataclass
class Engine:
    """A loaded policy: ``sample(prompt_ids, seed) -> per prompt list of Sample``."""

    backend: str
    sample: Any
    info: dict = field(default_factory=dict)


def load_engine(
    backend: str,
    policy_path: str,
    tok: Any,
    s: Sampling,
    r: RolloutConfig,
    *,
    dtype: str,
    ctx_len: int,
    device: torch.device | None = None,
) -> Engine:
    """The policy behind one ``sample`` call; ``device`` (HF only; None = auto) holds the model,
    inputs move to it and samples come back to the CPU (stages/lib/decoding.py)."""
    stops = decoding.stops_for(tok, policy_path, r.stop_token_ids, r.stop_strings)
    if backend == "vllm":
        # seed=0: every request carries its own seed, so the engine seed changes nothing, and a
        # constant keeps one cached engine across runs with different seeds.
        llm = vllm_backend.get_llm(
            policy_path,
            seed=0,
            max_model_len=ctx_len,
            max_logprobs=VLLM_MAX_LOGPROBS,
            dtype=dtype,
            gpu_memory_utilization=r.vllm_memory_fraction,
            tensor_parallel_size=r.tensor_parallel_size,
            tokenizer=tok.name_or_path if stops.strings else None,
        )

        def sample_vllm(prompt_ids: list[list[int]], seed: int) -> list[list[Sample]]:
            out = vllm_backend.generate(
                llm,
                prompt_ids,
                n=s.n,
                temperature=s.temperature,
                top_p=s.top_p,
                max_new_tokens=s.max_new_tokens,
                seed=seed,
                eos_id=stops.all_ids,
                stop=stops.strings,
            )
            return [[_vllm_sample(d, stops, s) for d in per] for per in out]

        return Engine("vllm", sample_vllm, {"stops": stops})

    device = device or models.pick_device("auto")
    model = models.load_model(policy_path, "policy", dtype=dtype, device=device)
    models.check_embedding_rows(model, tok, "policy")
    decoding.plain_generation_config(model, tok)
    n_ids = models.vocab_size(tok)

    def sample_hf(prompt_ids: list[list[int]], seed: int) -> list[list[Sample]]:
        return decoding.hf_generate(
            model,
            prompt_ids,
            s,
            stops=stops,
            pad=decoding.pad_id(tok),
            n_ids=n_ids,
            batch_size=r.batch_size,
            seed=seed,
            tok=tok,
        )

    return Engine("hf", sample_hf, {"device": str(device), "stops": stops})


def _vllm_sample(d: dict, stops: decoding.Stops, s: Sampling) -> Sample:
    """A vLLM sample cut and labelled by the same rule as the HF backend (stop strings too)."""
    length, reason = decoding.cut(d["response_ids"], stops, s.max_new_tokens)
    return Sample(d["response_ids"][:length], d["logprobs"][:length], reason)
