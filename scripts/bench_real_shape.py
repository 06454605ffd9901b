"""Benchmark: the stages at the shapes users run (a 151,936-token vocabulary, long responses),
memory first.

Builds random-weight Qwen3 models from configs in a temp folder (no downloads): a student of the
0.6B shape (28 layers, hidden 1,024, 16 query / 8 KV heads of 128, MLP 3,072, tied embeddings;
``--student-layers 8`` for the 8-layer variant of the same width) and an 8-layer teacher of the same
width, both with the real vocabulary of 151,936 rows and a word-level tokenizer that fills it.
Then runs, each stage in a child process of its own:

* rollout (HF backend): ``--prompts`` prompts x ``rollout.n=2`` samples in one batch
  (batch x n = 16 by default), ``--new-tokens`` new tokens (512 by default);
* score (HF backend, ``score.topk=32``): the teacher, the behaviour model (the student) and no
  reference model;
* select (every token) and train: three optimizer steps of ``topk_fkl`` (the top-K forward KL with
  its tail term: the heaviest loss path) with whole-model gradient checkpointing, a step
  checkpoint after step 2 (weights, trainer state, optimizer moments) and ``final/`` (weights
  only); their sizes are ``checkpoint_dirs_bytes``.

For each stage the JSON holds the child's peak RSS (``VmHWM``, its own high-water mark) minus its
RSS after the imports (``peak_mib``), beside an analytic floor (``floor_mib``, its parts listed):
the weights it holds, the optimizer state, and one working block: rollout the KV cache and one
``[batch x n, V]`` fp32 block per decode step; score both models (on CUDA the larger one:
``score.resident=auto``) and one ``[score.chunk_positions, V]`` fp32 block;
train the loss's working set (one ``[chunk, V]`` fp32 block and its row-block scratch) and the
checkpointed layer inputs. Also bytes per response token on disk (rollouts, tokens) and tokens/s.
``ratio = peak_mib / floor_mib``.
``peak_anon_mib``: the peak of the child's own allocations (``RssAnon``, sampled every 20 ms)
above their level after the imports; ``VmHWM`` also counts the pages of a model file mmapped while
the model loads (page cache), so ``peak_mib`` can exceed the floor by up to one model's size.

``--quick`` (the test suite runs it, tests/test_real_shape.py): a 2-layer model of width 64 and a
32,768-token vocabulary, 4 prompts x 2 samples of 128 new tokens; the test asserts each stage's
peak stays within a fixed margin of its floor, so a regression to ``O(T x V)`` memory (e.g. keeping
every step's logits in the rollout, or a loss that holds two ``[chunk, V]`` blocks) fails. Every
loss in ``LOSSES`` runs through the loss probe (its working set alone: ``loss_working_set``).

fp32 throughout: on this CPU (no native bf16) bf16 matmuls run at about 1/20 of fp32.

Run: ``python scripts/bench_real_shape.py --out runs/bench/real_shape.json
[--student-layers 28|8] [--new-tokens 512] [--prompts 8] [--quick] [--device cpu|cuda]
[--work DIR [--stages train]]`` (``--stages``: run only these stages, the others' results read
from an earlier run's ``--work`` dir: e.g. the train stage again on the same rollouts)
(``--device cuda``: the stages on the GPU, train in its default precision, and each stage's
``torch.cuda.max_memory_allocated`` as ``gpu_peak_mib``; scripts/gpu_check.py runs it).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MIB = 2**20
STAGES = ("rollout", "score", "select", "train")


@dataclass(frozen=True)
class Shape:
    """One benchmark shape: the models and the work."""

    vocab: int = 151_936
    hidden: int = 1024
    intermediate: int = 3072
    heads: int = 16
    kv_heads: int = 8
    head_dim: int = 128
    student_layers: int = 28
    teacher_layers: int = 8
    prompts: int = 8  # x rollout.n = 2 samples, all in one batch
    n: int = 2
    prompt_words: int = 32
    new_tokens: int = 512
    topk: int = 32
    score_chunk: int = 256  # score.chunk_positions (the default)
    loss_memory_mib: int = 512  # train.loss_memory_mib (the default)
    micro_batch_tokens: int = 2048


QUICK = Shape(
    vocab=32_768,
    hidden=64,
    intermediate=128,
    heads=1,
    kv_heads=1,
    head_dim=64,
    student_layers=2,
    teacher_layers=2,
    prompts=4,
    new_tokens=128,
    loss_memory_mib=128,  # chunk 768: [768, V] (96 MiB) and 32 MiB reserved for scratch
    micro_batch_tokens=1024,
)


# ----------------------------------------------------------------------------- building
def build_tokenizer(vocab: int):
    """A word-level tokenizer whose ids fill ``vocab`` exactly (4 specials + words)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<bos>", "<eos>"]
    words = {t: i for i, t in enumerate(specials + [f"w{i}" for i in range(vocab - 4)])}
    tk = Tokenizer(models.WordLevel(vocab=words, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", 2)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>"
    )


def build_model(out: Path, sh: Shape, layers: int, seed: int, tok) -> Path:
    """A random-weight Qwen3 of shape ``sh`` with ``layers`` layers, saved with ``tok``."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen3Config(
        vocab_size=sh.vocab,
        hidden_size=sh.hidden,
        intermediate_size=sh.intermediate,
        num_hidden_layers=layers,
        num_attention_heads=sh.heads,
        num_key_value_heads=sh.kv_heads,
        head_dim=sh.head_dim,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        bos_token_id=2,
        eos_token_id=3,
        pad_token_id=0,
    )
    Qwen3ForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def write_prompts(path: Path, sh: Shape) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from data_schemas import prompts

    rows = []
    for i in range(sh.prompts):
        words = " ".join(
            f"w{(i * 7919 + j * 104729) % (sh.vocab - 4)}" for j in range(sh.prompt_words)
        )
        rows.append(
            {"id": f"p{i:03d}", "prompt": words, "context": None, "answer": None, "kind": None}
        )
    pq.write_table(pa.Table.from_pylist(rows, schema=prompts.SCHEMA), path)
    return path


def params_of(sh: Shape, layers: int) -> int:
    """Parameter count of the Qwen3 shape (tied embeddings, q/k norms)."""
    q, kv = sh.heads * sh.head_dim, sh.kv_heads * sh.head_dim
    attn = sh.hidden * q + 2 * sh.hidden * kv + q * sh.hidden + 2 * sh.head_dim
    mlp = 3 * sh.hidden * sh.intermediate
    return sh.vocab * sh.hidden + layers * (attn + mlp + 2 * sh.hidden) + sh.hidden


# ----------------------------------------------------------------------------- floors
def floors(
    sh: Shape, response_tokens: int, chunk: int, one_model: bool
) -> dict[str, dict[str, float]]:
    """Analytic floors in MiB, per stage, by part (fp32 everywhere); ``one_model``: the score
    stage holds one model at a time (``score.resident=auto`` on CUDA), else both."""
    from stages.lib.losses import ROW_ELEMS, SCRATCH_BUFFERS

    student = params_of(sh, sh.student_layers) * 4 / MIB
    teacher = params_of(sh, sh.teacher_layers) * 4 / MIB
    rows = sh.prompts * sh.n
    seq = sh.prompt_words + 2 + sh.new_tokens
    kv = 2 * sh.student_layers * sh.kv_heads * sh.head_dim * seq * rows * 4 / MIB
    tokens = min(sh.micro_batch_tokens, rows * seq)  # positions in one micro-batch
    return {
        "rollout": {"weights": student, "kv_cache": kv, "step_block": rows * sh.vocab * 4 / MIB},
        "score": {
            "weights": max(teacher, student) if one_model else teacher + student,
            "chunk_block": sh.score_chunk * sh.vocab * 4 / MIB,
        },
        "train": {
            "weights_grads_adam": 4 * student,
            # one [chunk, V] fp32 block (logits -> log-softmax -> gradient) and row-block scratch
            "loss_block": min(chunk, response_tokens) * sh.vocab * 4 / MIB
            + SCRATCH_BUFFERS * ROW_ELEMS * 4 / MIB,
            "checkpointed_layer_inputs": sh.student_layers * tokens * sh.hidden * 4 / MIB,
        },
    }


# ----------------------------------------------------------------------------- the child
def _status(key: str) -> float:
    line = next(ln for ln in open("/proc/self/status") if ln.startswith(key + ":"))
    return int(line.split()[1]) / 1024  # kB -> MiB


def reset_peak() -> None:
    """Set ``VmHWM`` to the current RSS (Linux: ``5`` to clear_refs), so the peak read later is
    the measured part's, not the imports' or the setup's (building a probe's inputs peaks at two
    ``[chunk, V]`` blocks of its own)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


class AnonPeak:
    """The peak of ``RssAnon`` (this process's own allocations, not file pages), sampled every
    20 ms on a thread. ``VmHWM`` also counts file-backed pages: while a model loads, its mmapped
    safetensors file and the model's own copy are both resident, and the file's pages are page
    cache the kernel can drop."""

    def __init__(self) -> None:
        import threading

        self.peak, self._stop = _status("RssAnon"), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, _status("RssAnon"))

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return max(self.peak, _status("RssAnon"))


def warm_up() -> None:
    """Load what every stage loads lazily (model code, generation, Parquet, DuckDB, safetensors)
    and run one small matmul (the BLAS's own buffers), so the baseline holds the code and the
    peak above it is the stage's data."""
    import duckdb  # noqa: F401
    import pyarrow.parquet  # noqa: F401
    import safetensors.torch  # noqa: F401
    import torch
    import transformers.generation.utils  # noqa: F401
    from transformers import AutoTokenizer, Qwen3ForCausalLM  # noqa: F401

    x = torch.randn(64, 64, requires_grad=True)
    (x @ x).sum().backward()


def child(stage: str, overrides: list[str]) -> None:
    """Run one stage in this process; print its memory and time as one JSON line."""
    import importlib

    import torch

    from stages.lib.config import compose

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    mod = importlib.import_module(f"stages.{stage}")
    cfg = compose(stage, overrides)
    warm_up()
    reset_peak()
    base, base_anon = _status("VmRSS"), _status("RssAnon")
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    anon = AnonPeak()
    t0 = time.perf_counter()
    summary = mod.run(cfg)
    seconds = time.perf_counter() - t0
    got = {
        "base_mib": round(base, 1),
        "hwm_mib": round(_status("VmHWM"), 1),
        "peak_anon_mib": round(anon.stop() - base_anon, 1),
        "seconds": round(seconds, 2),
        "summary": summary if isinstance(summary, dict) else {},
    }
    if cuda:  # on a GPU the floor is about device memory: the allocator's own peak
        got["gpu_peak_mib"] = round(torch.cuda.max_memory_allocated() / MIB, 1)
    print("BENCH " + json.dumps(got, default=str), flush=True)


def probe_batch(vocab: int, chunk: int, topk: int = 32) -> dict:
    """Every stored column any loss reads, for ``chunk`` positions (random, consistent shapes)."""
    import torch

    t = torch.log_softmax(torch.randn(chunk, vocab), -1)  # [N, V] a teacher, dropped here
    vals, ids = t.topk(topk, -1)  # [N, K]
    y = torch.randint(0, vocab, (chunk,))  # [N]
    b_ids = torch.randint(0, vocab, (chunk, topk))  # [N, K] a behaviour top-K
    mapped = torch.where(torch.rand(chunk, topk) < 0.8, ids, -1)  # [N, K] some unmapped
    return {
        "token_id": y,
        "weight": torch.ones(chunk),
        "segment": (torch.rand(chunk) < 0.2).to(torch.uint8),  # some teacher-prefix tokens
        "teacher_logprob": t.gather(1, y[:, None])[:, 0],
        "teacher_topk_ids": ids,
        "teacher_topk_logprobs": vals,
        "teacher_topk_logmass": torch.logsumexp(vals, -1),
        "behavior_logprob": t.gather(1, y[:, None])[:, 0] + 0.1,
        "ref_logprob": t.gather(1, y[:, None])[:, 0] - 0.1,
        "behavior_topk_ids": b_ids,
        "teacher_logprobs_on_behavior_topk": t.gather(1, b_ids),
        "chunk_index": torch.arange(chunk) // 2,  # two-token aligned chunks
        "teacher_chunk_logprob": torch.full((chunk,), -3.0),
        "teacher_mapped_ids": mapped,
        "teacher_mapped_logprobs": vals,
        "teacher_sorted_probs": vals.exp(),
    }


def loss_probe(vocab: int, chunk: int, hidden: int, loss: str, budget_mib: float) -> None:
    """The loss's working set alone: one ``[chunk, V]`` chunk through an fp32 head, the loss
    (``inplace``, as the trainer calls it) and backward; peak above the inputs, in blocks and
    against the budget the chunk came from. The head's weight takes no gradient here: its
    ``[V, H]`` gradient is the model's, not the loss's."""
    import torch

    from stages.lib.losses import combined_loss

    torch.manual_seed(0)
    h = torch.randn(chunk, hidden, requires_grad=True)  # [N, H]
    w = torch.randn(vocab, hidden)  # [V, H] the head (frozen: see above)
    batch = probe_batch(vocab, chunk)
    warm_up()
    reset_peak()
    base = _status("VmRSS")
    logits = h @ w.T  # [N, V] fp32
    out, _ = combined_loss(logits, batch, [(loss, 1.0, {})], vocab, 0.7, inplace=True)
    del logits
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(h.grad).all(), loss
    block = chunk * vocab * 4 / MIB
    peak = _status("VmHWM") - base
    got = {"loss": loss, "chunk": chunk, "block_mib": round(block, 1), "peak_mib": round(peak, 1)}
    got |= {"blocks": round(peak / block, 2), "budget_mib": budget_mib}
    got["peak_over_budget"] = round(peak / budget_mib, 3)
    print("BENCH " + json.dumps(got), flush=True)


def run_child(stage: str, overrides: list[str], log: Path) -> dict:
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"),
    }
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", stage, "--", *overrides]
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    log.write_text(p.stdout + p.stderr)
    if p.returncode != 0:
        raise SystemExit(f"{stage} failed (exit {p.returncode}); log: {log}\n{p.stderr[-2000:]}")
    got = json.loads(next(ln for ln in p.stdout.splitlines() if ln.startswith("BENCH "))[6:])
    if "hwm_mib" in got:
        got["peak_mib"] = round(got["hwm_mib"] - got["base_mib"], 1)
    return got


def bf16_speed(sh: Shape, reps: int = 5) -> dict:
    """bf16 over fp32 matmul rate on this machine at the model's MLP shape (why fp32 is the CPU
    default): best of ``reps`` for each dtype, same process."""
    import torch

    out = {}
    for dt in (torch.float32, torch.bfloat16):
        a = torch.randn(256, sh.hidden, dtype=dt)
        b = torch.randn(sh.hidden, sh.intermediate, dtype=dt)
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t0)
        out[str(dt).removeprefix("torch.")] = 2 * 256 * sh.hidden * sh.intermediate / best / 1e9
    return {
        "gflops": {k: round(v, 2) for k, v in out.items()},
        "bf16_over_fp32": round(out["bfloat16"] / out["float32"], 3),
    }


def disk_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# ----------------------------------------------------------------------------- the run
def bench(sh: Shape, work: Path, device: str = "cpu", only: tuple[str, ...] = STAGES) -> dict:
    from stages.lib.losses import LOSSES, chunk_for_budget

    tok = build_tokenizer(sh.vocab)
    student, teacher = work / "student", work / "teacher"
    if not (student / "config.json").exists():  # a --work dir from an earlier run keeps them
        build_model(student, sh, sh.student_layers, 0, tok)
        build_model(teacher, sh, sh.teacher_layers, 1, tok)
    prompts = write_prompts(work / "prompts.parquet", sh)
    run_dir = work / "run"
    common = [
        f"run_dir={run_dir}",
        f"student.path={student}",
        f"teacher.path={teacher}",
        f"data.prompts={prompts}",
        "student.dtype=float32",
        "teacher.dtype=float32",
        f"rollout.device={device}",
        f"score.device={device}",
        f"train.device={device}",
    ]
    rollout = [
        "rollout.backend=hf",
        f"rollout.n={sh.n}",
        "rollout.temperature=1.0",
        f"rollout.max_new_tokens={sh.new_tokens}",
        f"rollout.batch_size={sh.prompts}",
        f"rollout.prompts_per_shard={sh.prompts}",
    ]
    score = ["score.backend=hf", f"score.topk={sh.topk}", f"score.chunk_positions={sh.score_chunk}"]
    train = [
        "loss=topk_fkl",
        "train.max_steps=3",
        "train.save_every=2",  # one step checkpoint (with the optimizer) beside final/
        # fp32 on CPU (no native bf16 here: bf16 matmuls ran at ~1/20 of fp32); the default
        # (bf16 autocast, fp32 weights and head) on CUDA
        f"train.precision={'fp32' if device == 'cpu' else 'auto'}",
        "train.gradient_checkpointing=true",
        f"train.loss_memory_mib={sh.loss_memory_mib}",
        f"train.micro_batch_tokens={sh.micro_batch_tokens}",
        "train.trackers=[]",
    ]
    overrides = common + rollout + score + train
    out: dict = {"shape": asdict(sh), "device": device}
    out["student_params"] = params_of(sh, sh.student_layers)
    out["teacher_params"] = params_of(sh, sh.teacher_layers)
    stages = {}
    if "train" in only:  # a re-run trains afresh (train.resume would find the last run's steps)
        for d in ("checkpoints", "train"):
            shutil.rmtree(run_dir / d, ignore_errors=True)
    for stage in STAGES:
        saved = work / f"{stage}.json"  # a stage not re-run keeps its result from the --work dir
        if stage not in only:
            stages[stage] = json.loads(saved.read_text())
            continue
        stages[stage] = run_child(stage, overrides, work / f"{stage}.log")
        saved.write_text(json.dumps(stages[stage]))
        print(
            f"[bench_real_shape] {stage}: peak {stages[stage]['peak_mib']} MiB, "
            f"{stages[stage]['seconds']} s",
            flush=True,
        )
    r = stages["rollout"]["summary"]
    tokens = int(r.get("tokens", 0))
    chunk = chunk_for_budget(sh.loss_memory_mib, sh.vocab)
    fl = floors(sh, tokens, chunk, one_model=device != "cpu")
    for stage, parts in fl.items():
        s = stages[stage]
        s["floor_mib"] = round(sum(parts.values()), 1)
        s["floor_parts_mib"] = {k: round(v, 1) for k, v in parts.items()}
        s["ratio"] = round(s["peak_mib"] / s["floor_mib"], 3)
        s["anon_ratio"] = round(s["peak_anon_mib"] / s["floor_mib"], 3)
    stages["rollout"]["tok_per_s"] = r.get("tok_per_s")
    stages["rollout"]["mean_response_len"] = r.get("mean_response_len")
    stages["rollout"]["bytes_per_token"] = round(
        disk_bytes(run_dir / "rollouts") / max(tokens, 1), 1
    )
    stages["score"]["tok_per_s"] = round(tokens / stages["score"]["seconds"], 1)
    stages["score"]["bytes_per_token"] = round(disk_bytes(run_dir / "tokens") / max(tokens, 1), 1)
    steps = stages["train"]["summary"].get("steps", 2)
    stages["train"]["seconds_per_step"] = round(stages["train"]["seconds"] / max(steps, 1), 2)
    stages["train"]["loss_chunk"] = chunk
    ckpt = run_dir / "checkpoints"
    stages["train"]["checkpoint_bytes"] = disk_bytes(ckpt) if ckpt.exists() else 0
    # final/ (weights only) beside a step checkpoint (weights, trainer state, optimizer moments)
    stages["train"]["checkpoint_dirs_bytes"] = {
        d.name: disk_bytes(d) for d in sorted(ckpt.glob("*/*")) if d.is_dir()
    }
    for s in stages.values():
        s.pop("summary", None)
    out["response_tokens"] = tokens
    out["stages"] = stages
    out["matmul_bf16_vs_fp32"] = bf16_speed(sh)
    # every loss's working set alone, at the chunk the budget gives (one block + scratch)
    probe = [str(sh.vocab), str(chunk), str(sh.hidden)]
    out["loss_working_set"] = [
        run_child("loss", [*probe, name, str(sh.loss_memory_mib)], work / f"loss_{name}.log")
        for name in LOSSES
    ]
    probes = out["loss_working_set"]
    out["real_shape"] = {  # the headline figures (docs/benchmarks.json; goal: <= 2 blocks)
        "loss_blocks_max": max(p["blocks"] for p in probes),
        "loss_peak_over_budget_max": max(p["peak_over_budget"] for p in probes),
    }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, help="JSON to write")
    ap.add_argument("--quick", action="store_true", help="the small shape the test suite runs")
    ap.add_argument("--student-layers", type=int, default=28, help="28 (0.6B shape) or 8")
    ap.add_argument("--new-tokens", type=int, default=512)
    ap.add_argument("--prompts", type=int, default=8, help="prompts (x 2 samples, one batch)")
    ap.add_argument("--device", default="cpu", help="cpu (fp32) or cuda (scripts/gpu_check.py)")
    ap.add_argument(
        "--work", type=Path, help="keep the models and the run here (default: a temp dir)"
    )
    ap.add_argument(
        "--stages",
        default=",".join(STAGES),
        help="stages to run (comma-separated); the others' results are read from --work",
    )
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if set(a.stages.split(",")) != set(STAGES) and not a.work:
        ap.error("--stages needs --work (the stages not run are read from there)")
    if a.child:
        sys.path.insert(0, str(REPO))
        if a.child == "loss":
            vocab, chunk, hidden = (int(x) for x in a.rest[:3])
            loss_probe(vocab, chunk, hidden, a.rest[3], float(a.rest[4]))
        else:
            child(a.child, a.rest)
        return
    sys.path.insert(0, str(REPO))
    sh = (
        QUICK
        if a.quick
        else Shape(student_layers=a.student_layers, new_tokens=a.new_tokens, prompts=a.prompts)
    )
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_real_shape_") as tmp:
        work = a.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        res = bench(sh, work, a.device, tuple(a.stages.split(",")))
    res["wall_seconds"] = round(time.perf_counter() - t0, 1)
    res["command"] = "python scripts/bench_real_shape.py " + " ".join(sys.argv[1:])
    text = json.dumps(res, indent=2)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
