"""Benchmark: the rollout stage vs the bare engine call on the same prompts (overhead ratio).

Timings are the minimum over interleaved repeats (bare, stage, bare, stage, ...): on a shared
machine the load drifts, and the minimum is the least disturbed run of each.

For each backend (HF always; vLLM when it is usable here and not in quick mode unless asked), the
same prompt ids are generated twice in one process, after a warm-up:

* bare  -- ``model.generate`` (HF; same batch size, seeds, max_new_tokens, no log-probs) or
  ``llm.generate`` (vLLM; one call per shard, as the stage does, no log-probs), timed around the
  engine calls only;
* stage -- ``stages.rollout.run`` end to end (model load, fingerprints, tokenization, behaviour
  log-probs, Parquet writes, manifest), wall time.

``rollout.<backend>_stage_overhead = stage_time / bare_time - 1`` (goal <= 0.15). The HF bare run
reuses the stage's per-shard seeds, so it samples the very same tokens (``hf_same_samples``).
The model is a random Llama (hidden 384, 4 layers, vocab 4096) so that generation dominates.

Run: ``python scripts/bench_rollout.py --out runs/bench/rollout.json [--quick] [--vllm]``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from stages.lib import decoding, engine, rollout_plan, store  # noqa: E402
from stages.lib.config import compose  # noqa: E402

N_WORDS = 4092  # + 4 specials = vocab 4096


def build_model(out: Path, hidden: int = 384, layers: int = 4) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<bos>", "<eos>"]
    vocab = {t: i for i, t in enumerate(specials + [f"w{i}" for i in range(N_WORDS)])}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", 2)]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>"
    )
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=hidden,
        intermediate_size=3 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64,
        head_dim=64,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=2,
        eos_token_id=3,
        pad_token_id=0,
    )
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def write_prompts(path: Path, n: int) -> Path:
    g = torch.Generator().manual_seed(1)
    rows = []
    for i in range(n):
        length = int(torch.randint(8, 25, (1,), generator=g))
        words = torch.randint(0, N_WORDS, (length,), generator=g).tolist()
        rows.append({"id": f"b{i:05d}", "prompt": " ".join(f"w{w}" for w in words)})
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def stage_prompt_ids(run_dir: Path) -> dict[int, list[list[int]]]:
    """Prompt ids per shard, as the stage stored them (one entry per prompt, sample 0)."""
    from data_schemas import rollouts

    m = store.open_committed(run_dir / "rollouts", rollouts)
    out = {}
    for sh, p in enumerate(store.shard_paths(run_dir / "rollouts", m)):
        t = pq.read_table(p, columns=["sample_idx", "rollout_prompt_ids"]).to_pylist()
        out[sh] = [r["rollout_prompt_ids"] for r in t if r["sample_idx"] == 0]
    return out


def response_ids(run_dir: Path) -> list[list[int]]:
    from data_schemas import rollouts

    t = store.read_table(run_dir / "rollouts", rollouts, columns=["sample_id", "response_ids"])
    return [r["response_ids"] for r in sorted(t.to_pylist(), key=lambda r: r["sample_id"])]


def bare_hf(model_dir: Path, shards: dict, cfg, s: decoding.Sampling) -> tuple[float, int, list]:
    """Plain ``model.generate`` over the same batches and per-shard seeds as the stage."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    decoding.plain_generation_config(model, tok)
    eos, pad = tok.eos_token_id, tok.pad_token_id
    seconds, tokens, samples = 0.0, 0, {}
    for sh, prompts in shards.items():
        torch.manual_seed(rollout_plan.shard_seed(cfg.seed, sh))
        for b in range(0, len(prompts), cfg.rollout.batch_size):
            batch = prompts[b : b + cfg.rollout.batch_size]
            ids, mask = decoding.left_pad(batch, pad)  # [B, L]
            t0 = time.perf_counter()
            with torch.no_grad():
                out = model.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    do_sample=True,
                    temperature=s.temperature,
                    top_p=s.top_p,
                    top_k=0,
                    max_new_tokens=s.max_new_tokens,
                    num_return_sequences=s.n,
                    eos_token_id=eos,
                    pad_token_id=pad,
                )
            seconds += time.perf_counter() - t0
            for r, row in enumerate(out[:, ids.shape[1] :].tolist()):
                n, _ = decoding.cut(row, decoding.Stops(frozenset({eos})), s.max_new_tokens)
                tokens += n
                samples[(sh, b + r // s.n, r % s.n)] = row[:n]
    return seconds, tokens, [samples[k] for k in sorted(samples)]


def bare_vllm(llm, shards: dict, cfg, s: decoding.Sampling, eos: int) -> tuple[float, int]:
    """Plain ``llm.generate`` (token ids in, no log-probs), one call per shard like the stage."""
    from vllm import SamplingParams

    seconds, tokens = 0.0, 0
    for sh, prompts in shards.items():
        params = [
            SamplingParams(
                n=s.n,
                temperature=s.temperature,
                top_p=s.top_p,
                max_tokens=s.max_new_tokens,
                seed=rollout_plan.shard_seed(cfg.seed, sh) + i * s.n,
                stop_token_ids=[eos],
                detokenize=False,
            )
            for i in range(len(prompts))
        ]
        t0 = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        seconds += time.perf_counter() - t0
        tokens += sum(len(c.token_ids) for o in outs for c in o.outputs)
    return seconds, tokens


def run_stage(run_dir: Path, overrides: list[str]) -> tuple[float, dict]:
    from stages.rollout import run

    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run each time (no resume shortcut)
    cfg = compose("rollout", [f"run_dir={run_dir}", *overrides])
    t0 = time.perf_counter()
    summary = run(cfg)
    return time.perf_counter() - t0, summary


def _bench_hf(
    work: Path, model_dir: Path, common: list[str], repeats: int
) -> tuple[dict, dict, decoding.Sampling]:
    """HF: warm-up (the first generate call pays one-off costs), then bare and stage, interleaved.
    Returns (results, the stage's prompt ids per shard, the sampling both used)."""
    hf = [*common, "rollout.backend=hf"]
    run_stage(work / "warm", [*hf, "data.max_prompts=2"])
    stage_s, summary = run_stage(work / "hf", hf)
    cfg = compose("rollout", hf)
    s = decoding.Sampling.of(cfg.rollout)
    shards = stage_prompt_ids(work / "hf")
    bare_s, bare_tokens, bare_samples = bare_hf(model_dir, shards, cfg, s)
    for _ in range(repeats - 1):  # interleaved repeats: the machine's load drifts
        stage_s = min(stage_s, run_stage(work / "hf", hf)[0])
        bare_s = min(bare_s, bare_hf(model_dir, shards, cfg, s)[0])
    res = {
        "rollout.hf_stage_overhead": stage_s / bare_s - 1,
        "rollout.hf_stage_tok_per_s": summary["tokens"] / stage_s,
        "rollout.hf_stage_engine_tok_per_s": summary["tok_per_s"],
        "rollout.hf_bare_tok_per_s": bare_tokens / bare_s,
        "hf_stage_seconds": stage_s,
        "hf_bare_seconds": bare_s,
        "hf_tokens": summary["tokens"],
        "hf_same_samples": bare_samples == response_ids(work / "hf"),
    }
    return res, shards, s


def _bench_vllm(
    work: Path,
    model_dir: Path,
    common: list[str],
    repeats: int,
    shards: dict,
    s: decoding.Sampling,
) -> dict:
    """vLLM: start the engine the stage will reuse (cached per settings), then bare and stage."""
    from stages.lib import vllm_backend

    vl = [*common, "rollout.backend=vllm"]
    cfg = compose("rollout", vl)
    t0 = time.perf_counter()
    llm = vllm_backend.get_llm(
        str(model_dir),
        seed=0,
        max_model_len=rollout_plan.policy_context_length(str(model_dir)),
        max_logprobs=engine.VLLM_MAX_LOGPROBS,
        dtype=cfg.student.dtype,
        gpu_memory_utilization=cfg.rollout.vllm_memory_fraction,
    )
    start_s = time.perf_counter() - t0
    bare_vllm(llm, {0: shards[0][:2]}, cfg, s, 3)  # warm-up
    bare_s, bare_tokens = bare_vllm(llm, shards, cfg, s, 3)
    stage_s, summary = run_stage(work / "vllm", vl)
    for _ in range(repeats - 1):
        bare_s = min(bare_s, bare_vllm(llm, shards, cfg, s, 3)[0])
        stage_s = min(stage_s, run_stage(work / "vllm", vl)[0])
    return {
        "vllm_engine_start_seconds": start_s,
        "rollout.vllm_stage_overhead": stage_s / bare_s - 1,
        "rollout.vllm_stage_tok_per_s": summary["tokens"] / stage_s,
        "rollout.vllm_bare_tok_per_s": bare_tokens / bare_s,
        "vllm_stage_seconds": stage_s,
        "vllm_bare_seconds": bare_s,
        "vllm_tokens": summary["tokens"],
    }


def bench(quick: bool, vllm: bool | None = None, threads: int | None = 1) -> dict:
    """Stage vs bare engine throughput; ``vllm=None`` = when usable and not ``quick``.

    ``threads`` sets torch's intra-op threads (None = leave it): on a shared 2-core machine two
    spinning OpenMP threads made ``generate`` ~10x slower than one thread under load (measured),
    which buries the overhead under noise.
    """
    from stages.lib import vllm_backend

    if threads:
        torch.set_num_threads(threads)
    n_prompts, max_new, batch, hidden, repeats = (
        (16, 32, 16, 256, 2) if quick else (128, 64, 32, 384, 3)
    )
    work = Path(tempfile.mkdtemp(prefix="bench_rollout_"))
    model_dir = build_model(work / "model", hidden=hidden)
    prompts = write_prompts(work / "prompts.parquet", n_prompts)
    common = [
        f"student.path={model_dir}",
        f"data.prompts={prompts}",
        "rollout.n=2",
        f"rollout.max_new_tokens={max_new}",
        f"rollout.batch_size={batch}",
        f"rollout.prompts_per_shard={2 * batch}",
        "rollout.temperature=1.0",
        "rollout.top_p=0.95",
    ]
    res: dict = {
        "quick": quick,
        "model": f"random Llama hidden {hidden}, 4 layers, vocab 4096, fp32",
        "repeats": repeats,
        "timing": "min over repeats of interleaved bare/stage runs",
        "prompts": n_prompts,
        "n": 2,
        "max_new_tokens": max_new,
        "batch_size": batch,
        "torch_threads": torch.get_num_threads(),
    }

    hf, shards, s = _bench_hf(work, model_dir, common, repeats)
    res.update(hf)
    ok, why = vllm_backend.vllm_available()
    want = (not quick) if vllm is None else vllm
    if ok and want:
        res.update(_bench_vllm(work, model_dir, common, repeats, shards, s))
    else:
        res["rollout.vllm_stage_overhead"] = None
        res["vllm_skipped"] = why if not ok else "quick mode (pass --vllm to include it)"
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--quick", action="store_true", help="small workload (< 60 s, HF only)")
    ap.add_argument("--vllm", action="store_true", default=None, help="include vLLM")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0 = leave as is)")
    args = ap.parse_args()
    res = bench(args.quick, args.vllm, args.threads or None)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
