"""The KV cache's share of HF sampling: transformers' growing cache vs a preallocated one.

    python scripts/bench_kv_cache.py --student runs/w/student [--prompts 8] [--samples 4]
        [--prompt-tokens 256] [--tokens 64] [--repeats 2] [--out runs/bench_kv_cache.json]

(``--student``: any local causal LM folder, e.g. the student ``scripts/bench_peer.py --work DIR``
builds.) Samples ``--samples`` rows for each of ``--prompts`` random prompts, ``--tokens`` new
tokens each (no early stop), the way the HF rollout does with ``rollout.n > 1``: each prompt's
prefix prefilled once (``stages.lib.decoding.prefill_shared``), then ``model.generate`` from that
cache. Two variants, interleaved, each ``--repeats`` times, CPU seconds of the process: ``dynamic``
(transformers' default ``DynamicCache``, which concatenates every layer's keys and values at each
step: the rollout before 2026-12-07) and ``static`` (the prefilled cache copied into a
``transformers.StaticCache`` of prompt + tokens positions, written in place:
``decoding.preallocated``, what the rollout does now). Writes the times, their ratio, and whether both variants sampled
the same tokens from the same seed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def sample(model, ids, mask, samples: int, tokens: int, static: bool):
    """(CPU seconds, generated ids [prompts * samples, tokens]) of one variant, seed 0."""
    import torch

    from stages.lib.decoding import prefill_shared

    torch.manual_seed(0)
    c0 = time.process_time()
    with torch.no_grad():  # static: the cache preallocated for the new tokens (the rollout's)
        rows, rmask, cache = prefill_shared(model, ids, mask, samples, tokens if static else 0)
        out = model.generate(
            input_ids=rows, attention_mask=rmask, past_key_values=cache, do_sample=True,
            top_k=0, max_new_tokens=tokens, min_new_tokens=tokens, pad_token_id=0,
            disable_compile=True,
        )  # fmt: skip
    return time.process_time() - c0, out[:, ids.shape[1] :]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--student", required=True, help="a local causal LM folder")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default="runs/bench_kv_cache.json")
    a = ap.parse_args()
    if not (Path(a.student) / "config.json").is_file():
        print(f"error: no model at {a.student} (bench_kv_cache). Fix: give a model folder, e.g. "
              "the student of scripts/bench_peer.py --work DIR", file=sys.stderr)  # fmt: skip
        sys.exit(2)
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(a.student).eval()
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab, (a.prompts, a.prompt_tokens), generator=g)  # [B, L]
    mask = torch.ones_like(ids)  # [B, L]
    cpu: dict[str, list[float]] = {"dynamic": [], "static": []}
    gen = {}
    for _ in range(a.repeats):
        for name in cpu:  # interleaved: a burst of load hits both variants
            t, gen[name] = sample(model, ids, mask, a.samples, a.tokens, name == "static")
            cpu[name].append(t)
    res = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "settings": vars(a),
        "cpu_s": cpu,
        "static_over_dynamic_cpu": min(cpu["static"]) / min(cpu["dynamic"]),
        "same_tokens": bool(torch.equal(gen["dynamic"], gen["static"])),
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
