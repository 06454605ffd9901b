"""GPU check: one command on one CUDA GPU (minutes; part 4 longer), every figure in one JSON file.

    python scripts/gpu_check.py --out runs/gpu_check.json [--steps 40]

1. ``matmul``: the GPU's measured bf16 matmul rate (square GEMMs timed with CUDA events), the
   denominator of every utilisation figure below (not a datasheet number).
2. ``train``: a ~100M-parameter Llama built from a config (12 layers x 768, V = 8192, untied head)
   trained by the real stage, ``torchrun --nproc_per_node=1 -m stages.train train.fsdp=true
   train.precision=bf16_params`` (FSDP2 with bf16 parameters and fp32 reduction/masters on one GPU),
   on a selection scored here by a second random ~100M model (top-32, on the GPU). Reported: the
   median tokens/s after warm-up, model FLOP/s (6·N per token plus attention; recomputation not
   counted) and their fraction of (1), and whether the loss went down.
3. ``vllm``: the trained checkpoint in vLLM on CUDA (bf16): generation tokens/s, then parity with
   a Hugging Face bf16 forward on the same GPU: the sampled tokens' log-probs from generation and
   teacher-forced scoring (``stages.lib.vllm_backend.score``), mean and max |Δ| in nats (goal: mean
   <= 1e-2) and the top-32 id overlap.

4. ``real_shape``: ``scripts/bench_real_shape.py --device cuda`` at the shapes users run (a
   random-weight Qwen3 of the 0.6B shape, 28 layers, V = 151,936; an 8-layer teacher of the same
   width) with 1,024 and 2,048 new tokens, 16 prompts x 2 samples: per stage the host peak, the
   GPU allocator's peak (``gpu_peak_mib``) beside the analytic floor, bytes per token on disk and
   tokens/s; and the loss's working set in ``[chunk, V]`` blocks.

Without CUDA it stops at once with one ``error:`` line (exit 2). Nothing outside ``--work`` (a temp
folder by default) and ``--out`` is written.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

HIDDEN, LAYERS, HEADS, FFN, VOCAB = 768, 12, 12, 2048, 8192
PROMPT, RESP, N_SEQ, K, MB_TOKENS = 64, 192, 512, 32, 8192
DEVICE = "cuda"


def smoke_sizes() -> None:
    """``--cpu-smoke``: the training part only, tiny, on CPU/gloo (checks the script itself)."""
    global HIDDEN, LAYERS, HEADS, FFN, VOCAB, PROMPT, RESP, N_SEQ, MB_TOKENS, DEVICE
    HIDDEN, LAYERS, HEADS, FFN, VOCAB = 128, 2, 2, 256, 512
    PROMPT, RESP, N_SEQ, MB_TOKENS, DEVICE = 8, 24, 32, 256, "cpu"


def fail(what: str, fix: str) -> None:
    print(f"error: {what} (scripts/gpu_check.py). Fix: {fix}", file=sys.stderr)
    sys.exit(2)


def matmul_tflops(torch, n: int = 8192, reps: int = 50) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(5):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 2 * n**3 * reps / (start.elapsed_time(end) / 1e3) / 1e12


def build_llama(out: Path, seed: int) -> tuple[Path, int]:
    """A ~100M Llama from a config with a word-level tokenizer; (path, parameter count)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.conftest import build_tokenizer

    tok = build_tokenizer([f"w{i}" for i in range(VOCAB - 4)])
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=HEADS, max_position_embeddings=1024,
        tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        model.lm_head.weight.mul_(4.0)  # peaked distributions, as the test models
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out, sum(p.numel() for p in model.parameters())


def write_selection(run_dir: Path, student: Path, teacher: Path) -> None:
    """Random prompts/responses scored on the GPU: teacher top-K, student behaviour log-probs."""
    import numpy as np
    import pyarrow as pa
    from bench_train import pair_stats, selected_rows

    from data_schemas import selected
    from stages.lib import models, store
    from stages.lib.layout import RunLayout

    tok = models.load_tokenizer(str(student))
    g = np.random.default_rng(0)
    prompts = [[tok.bos_token_id, *g.integers(4, VOCAB, PROMPT - 1).tolist()] for _ in range(N_SEQ)]
    resps = [g.integers(4, VOCAB, RESP).tolist() for _ in range(N_SEQ)]
    t_model = models.load_model(str(teacher), device=DEVICE)
    s_model = models.load_model(str(student), device=DEVICE)
    t, b = pair_stats(t_model, s_model, prompts, resps, K, VOCAB, batch=64)
    del t_model, s_model
    rows = selected_rows(prompts, resps, t, b, K)
    fps = {"tokenizer": models.tokenizer_fingerprint(tok)}
    with store.open_writer(
        RunLayout(run_dir).selected("all"), selected, dataset_id="gpu-check", stage="select",
        row_group_rows=64, vocab_size=VOCAB, overwrite=True,
    ) as w:  # fmt: skip
        w.write_shard(0, pa.Table.from_pylist(rows, schema=selected.SCHEMA))
        w.commit(1, config={}, fingerprints=fps, inputs={})


def train(work: Path, student: Path, steps: int, n_params: int, peak: float) -> dict:
    rd = work / "run"
    epochs = steps // (N_SEQ * (PROMPT + RESP) // MB_TOKENS) + 1
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
        "-m", "stages.train", f"run_dir={rd}", f"student.path={student}", "loss=topk_fkl",
        "train.selection=all", "train.name=gpu_check", "train.fsdp=true",
        "train.precision=bf16_params", f"train.max_steps={steps}", f"train.epochs={epochs}",
        f"train.micro_batch_tokens={MB_TOKENS}", "train.log_every=1", "train.trackers=[]",
        "train.shuffle=false", "train.lr=3e-4", "train.chunk_positions=4096",
        f"train.device={DEVICE}",
    ]  # fmt: skip
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                       capture_output=True, text=True, timeout=900)  # fmt: skip
    if p.returncode != 0:
        return {"ok": False, "rc": p.returncode, "stderr": p.stderr[-3000:]}
    from stages.lib.layout import RunLayout

    lay = RunLayout(rd)
    rows = [json.loads(x) for x in lay.metrics("gpu_check").read_text().splitlines()]
    warm = rows[min(5, len(rows) - 1) :]
    tps = statistics.median(r["tokens_per_s"] for r in warm)
    # training FLOPs per token: 6·N (the input embedding is a lookup) + attention 12·L·H·T
    n_mm = n_params - VOCAB * HIDDEN
    flops = tps * (6 * n_mm + 12 * LAYERS * HIDDEN * (PROMPT + RESP))
    return {
        "ok": True, "steps": len(rows), "wall_s": time.perf_counter() - t0,
        "tokens_per_s": tps, "step_s": statistics.median(r["step_s"] for r in warm),
        "model_tflops": flops / 1e12, "fraction_of_measured_bf16_matmul": flops / 1e12 / peak,
        "loss_first": rows[0]["loss"], "loss_last": rows[-1]["loss"],
        "loss_went_down": rows[-1]["loss"] < rows[0]["loss"],
        "final": str(lay.final("gpu_check")),
    }  # fmt: skip


def vllm_parity(final: str) -> dict:
    import numpy as np
    import torch

    from stages.lib import models, vllm_backend
    from stages.lib.logprobs import sequence_stats

    tok = models.load_tokenizer(final)
    g = np.random.default_rng(1)
    prompts = [[tok.bos_token_id, *g.integers(4, VOCAB, PROMPT - 1).tolist()] for _ in range(64)]
    llm = vllm_backend.get_llm(final, seed=0, max_model_len=512, max_logprobs=K,
                               dtype="bfloat16", gpu_memory_utilization=0.5)  # fmt: skip
    gen = lambda: vllm_backend.generate(  # noqa: E731
        llm, prompts, n=1, temperature=1.0, top_p=1.0, max_new_tokens=128, seed=0,
        eos_id=tok.eos_token_id,
    )  # fmt: skip
    gen()  # warm-up
    t0 = time.perf_counter()
    outs = [o[0] for o in gen()]
    secs = time.perf_counter() - t0
    resps = [o["response_ids"] for o in outs]
    scored = vllm_backend.score(llm, prompts, resps, k=K)
    hf = models.load_model(final, dtype="bfloat16", device="cuda")
    with torch.inference_mode():
        ref = sequence_stats(hf, prompts, resps, K, VOCAB, want_entropy=False)
    cat = lambda xs: np.concatenate([np.asarray(x, dtype=np.float64) for x in xs])  # noqa: E731
    hf_lp = cat([r["logprob"] for r in ref])
    d_gen = np.abs(cat([o["logprobs"] for o in outs]) - hf_lp)
    d_score = np.abs(cat([s["logprob"] for s in scored]) - hf_lp)
    overlap = np.mean([
        len(set(a.tolist()) & set(b.tolist())) / K
        for s, r in zip(scored, ref) for a, b in zip(s["topk_ids"], r["topk_ids"])
    ])  # fmt: skip
    return {
        "generated_tokens": int(sum(len(r) for r in resps)),
        "generate_tokens_per_s": sum(len(r) for r in resps) / secs,
        "gen_logprob_abs_diff_mean": float(d_gen.mean()),
        "gen_logprob_abs_diff_max": float(d_gen.max()),
        "score_logprob_abs_diff_mean": float(d_score.mean()),
        "score_logprob_abs_diff_max": float(d_score.max()),
        "topk_id_overlap": float(overlap),
        "parity_ok": bool(max(d_gen.mean(), d_score.mean()) <= 1e-2),
    }


def real_shape(work: Path, new_tokens: int) -> dict:
    """scripts/bench_real_shape.py on the GPU at one response length (its JSON, or the error)."""
    out = work / f"real_shape_{new_tokens}.json"
    cmd = [
        sys.executable, str(ROOT / "scripts" / "bench_real_shape.py"), "--device", "cuda",
        "--student-layers", "28", "--new-tokens", str(new_tokens), "--prompts", "16",
        "--work", str(work / f"real_shape_{new_tokens}"), "--out", str(out),
    ]  # fmt: skip
    p = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                       capture_output=True, text=True, timeout=1800)  # fmt: skip
    if p.returncode != 0:
        return {"ok": False, "rc": p.returncode, "stderr": p.stderr[-3000:]}
    return {"ok": True, **json.loads(out.read_text())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/gpu_check.json")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--work", default=None, help="work folder (default: a temp folder)")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny training part on CPU only")
    ap.add_argument("--no-real-shape", action="store_true", help="skip part 4 (real shapes)")
    a = ap.parse_args()
    import torch

    if a.cpu_smoke:
        smoke_sizes()
        with tempfile.TemporaryDirectory() as tmp:
            student, n = build_llama(Path(tmp) / "student", seed=0)
            teacher, _ = build_llama(Path(tmp) / "teacher", seed=1)
            write_selection(Path(tmp) / "run", student, teacher)
            print(json.dumps(train(Path(tmp), student, a.steps, n, float("nan")), indent=1))
        return
    if not torch.cuda.is_available():
        fail("no CUDA device visible", "run it on a machine with an NVIDIA GPU and CUDA builds of "
             "torch and vllm (pip install 'distillery[vllm]')")  # fmt: skip
    out = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    t0 = time.perf_counter()
    out["matmul_bf16_tflops"] = matmul_tflops(torch)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(a.work or tmp)
        student, n_params = build_llama(work / "student", seed=0)
        teacher, _ = build_llama(work / "teacher", seed=1)
        out["params"] = n_params
        write_selection(work / "run", student, teacher)
        out["train"] = train(work, student, a.steps, n_params, out["matmul_bf16_tflops"])
        if out["train"]["ok"]:
            try:
                out["vllm"] = vllm_parity(out["train"]["final"])
            except Exception as e:  # noqa: BLE001 - reported in the JSON, the rest stays
                out["vllm"] = {"ok": False, "error": f"{type(e).__name__}: {e}"[:2000]}
        if not a.no_real_shape:
            out["real_shape"] = {str(t): real_shape(work, t) for t in (1024, 2048)}
    out["seconds"] = time.perf_counter() - t0
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
