"""Side by side against a peer: our offline pipeline vs TRL's online distillation and SFT trainers.

    python scripts/bench_peer.py --out runs/bench_peer.json [--quick] [--threads N] [--work DIR]
        [--teacher-scale S] [--response-tokens T] [--prompts N] [--samples n] [--prompt-tokens L]
        [--core-only] [--repeats K]
    python scripts/bench_peer.py --rescore runs/bench_peer.json  # ratios again from its runs

(``--prompts N`` / ``--response-tokens T`` override the mode's sizes; ``--samples n`` samples each
prompt n times on both sides (ours: ``rollout.n``; TRL, which has no per-prompt repeat in its
distillation trainer: each prompt n times in its dataset); ``--prompt-tokens L`` makes every
prompt L tokens long (BOS + L - 1 words); ``--teacher-scale S`` swaps
the default teacher (4.6x the student's per-token matmul weights) for one of ~S times them: same
tokenizer and depth, the width chosen to match S; ``--work DIR`` keeps the world and both sides'
outputs.)

Needs the ``bench`` extra (``pip install -e .[bench]``: ``trl==1.16.0``). One world, built here
from configs (no downloads): a word-level tokenizer, a random Llama student and a teacher >= 4x
its parameters, and N prompts of equal length. Every measured run is its own child process
(``--child NAME``), so its peak RSS is its own; both sides get the same torch thread count.

(a) one epoch of on-policy distillation over the N prompts, T response tokens each:
    ours = ``stages.rollout`` + ``stages.score`` (the teacher scores once) + ``stages.select`` +
    ``stages.train`` with ``loss=topk_fkl``, run in-process one after the other;
    TRL = ``trl.DistillationTrainer`` (the student samples each batch, the live teacher scores it,
    then one optimizer step) with ``beta=0`` (forward KL, the nearest to ``topk_fkl``).
    Then a second loss on the same data: ours re-trains from the cache (``stages.train`` with
    ``loss=topk_rkl``); TRL has no cache, so it runs again (``beta=1``, reverse KL, its default).
(b) trainer throughput on the same stored sequences (the prompts and responses of (a)'s
    selection): ``stages.train`` with ``loss=sft`` vs ``trl.SFTTrainer`` (completion-only loss),
    response tokens per second of the whole trainer call (load, train, save) and of the loop.
(c) peak RSS of each child (``VmHWM``, its own high-water mark), and its RSS after the imports.
Full mode adds ``trl_epoch_gc``: TRL's epoch with gradient checkpointing on, its documented
default (the headline TRL runs turn it off, which only makes TRL faster). Both modes add
``ours_epoch_lean``: our epoch again, in its own run dir, with the documented keys that skip work
no configured loss or selection reads here (``score.behavior=false``: the behaviour log-prob comes
from the rollout's own record; ``score.entropy=false``; ``train.trackers=[]``, as TRL's
``report_to=none``). The defaults stay the headline row.

The children run interleaved (ours, TRL, ours, TRL, ...): a burst of load from other processes
hits a pair, not a side. Ratios are ours / TRL; every setting, version, command and every
difference in what the two sides compute is written into the JSON (``differences``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# Sizes: a student of ~24M parameters and a teacher of ~4.2x (full); tiny models in quick mode.
SIZES = {
    "full": {
        "vocab_words": 8188, "student_arch": {"hidden": 512, "layers": 6},
        "teacher_arch": {"hidden": 1024, "layers": 8}, "n_prompts": 64, "prompt_words": 15,
        "tokens": 64, "batch": 8, "samples": 1,
    },
    "quick": {
        "vocab_words": 1020, "student_arch": {"hidden": 128, "layers": 2},
        "teacher_arch": {"hidden": 256, "layers": 4}, "n_prompts": 16, "prompt_words": 7,
        "tokens": 16, "batch": 8, "samples": 1,
    },
}  # fmt: skip
TOPK, LR, SEED = 32, 1e-5, 0
CHILDREN = ("ours_epoch", "trl_epoch", "ours_second", "trl_second", "ours_sft", "trl_sft")
# Full mode only: TRL's epoch again with gradient checkpointing on (its documented default).
EXTRA = "trl_epoch_gc"
# Both modes: our epoch with the work nothing here reads switched off by documented keys.
LEAN = "ours_epoch_lean"
LEAN_OVERRIDES = ["score.behavior=false", "score.entropy=false", "train.trackers=[]"]
GOALS = {
    "epoch_wall_ours_over_trl": "<= 0.5",
    "second_loss_wall_ours_over_trl": "<= 0.15",
    "trainer_tokens_per_s_ours_over_trl": ">= 1.0",
}
DIFFERENCES = [
    "Loss, (a): ours is topk_fkl (forward KL on the teacher's top-32 ids plus one tail bucket, "
    "K+1 classes, from cached teacher log-probs); TRL's DistillationTrainer beta=0 is the forward "
    "KL over the full vocabulary, with both heads projected in chunks inside the step.",
    "Loss, second: ours topk_rkl (reverse KL on the teacher's top-32 + tail bucket); TRL beta=1 "
    "(reverse KL over the full vocabulary, its documented default).",
    "Teacher passes: ours scores each sequence once (score stage, top-32 stored, also the "
    "student's behaviour log-prob and both full-vocabulary entropies, the score defaults) and every "
    "further loss reads the cache; TRL runs the teacher forward inside every step of every run.",
    "Sampling: both sample from the student at temperature 1, top_p 1, no top-k, T new tokens; "
    "ours samples every prompt before training (rollout.batch_size 64, one pass, the student "
    "stays at its initial weights: offline), TRL samples each batch of 8 with the current "
    "weights (fully on-policy, lmbda=1 in GKD terms). Different random samples. With n > 1 "
    "ours decodes into a preallocated KV cache (decoding.preallocated); TRL calls transformers' "
    "generate with its default dynamic cache, which grows by concatenation at every step.",
    "Batching: both 8 sequences per optimizer step, one epoch, AdamW, same lr; ours packs by a "
    "token budget (train.micro_batch_tokens = 8 * (prompt + T)), TRL batches 8 prompts. "
    "Schedules: ours cosine (its default), TRL linear (its default); grad clip 1.0 both.",
    "TRL settings off its documented defaults: bf16=False (its default is bf16 mixed precision; "
    "ours runs fp32 on CPU, so both run fp32), gradient_checkpointing=False (its default is True, "
    "which re-runs the student forward in backward: turning it off makes TRL faster, never "
    "slower; full mode also runs TRL's epoch with it on: trl_epoch_gc), report_to=none, "
    "save_strategy=no, use_cpu=True. Everything else is the default.",
    "Outputs: ours writes Parquet datasets (rollouts, tokens, selected), manifests, metrics and a "
    "checkpoint with optimizer state per training; TRL keeps data in memory and we call "
    "save_model() once at the end (weights + tokenizer, no optimizer state).",
    "SFT, (b): same sequences, same 8 per step, fp32 both, and both project only the labelled "
    "(response) positions through the LM head, in tiles: ours in fp32 chunks of "
    "train.chunk_positions, TRL through its fused LM head, which also computes its default "
    "per-token entropy and top-1 accuracy metrics. TRL shuffles rows (its default); ours "
    "shuffles row groups and, inside each, whole prompts (train.shuffle=prompts, its default: a "
    "prompt's n samples stay adjacent, so train.share_prefix runs the prompt once for them).",
    "Ours runs select with select.threads=1 (DuckDB) so both sides use one compute thread.",
    "Optimizer: AdamW both, same lr (betas: each side's default); TRL's kernel is transformers' "
    "default since torch 2.8 (optim=adamw_torch_fused: one fused pass per tensor), ours is "
    "torch's fused kernel too (train.fused_adamw=true, our default; the per-tensor kernel, "
    "which the demo experiments pin, differs by rounding).",
    "Samples per prompt (settings.samples = n, --samples): ours sets rollout.n = n, so the HF "
    "rollout prefills each prompt once for its n samples and the score stage runs each (model, "
    "prefix) once for them (score.share_prefix, its default); TRL's DistillationTrainer has no "
    "per-prompt repeat, so its dataset holds each prompt n times: each copy is sampled, scored "
    "by the teacher and trained on as its own row (as every online trainer re-encodes the prompt "
    "per sample). Both train on the same N * n sequences, 8 per step.",
    "Memory: our stages keep freed memory for reuse while they run (stages/lib/allocator.py "
    "sets glibc's mmap threshold to 32 MiB and its trim threshold to 1 GiB, and hands the memory "
    "back at the end), so a training step reuses the last step's pages; TRL runs with glibc's "
    "defaults, under which each step's activations are unmapped or trimmed and faulted in again.",
    "ours_epoch_lean (not a headline figure): our epoch with score.behavior=false (the behaviour "
    "log-prob is the rollout's own fp32 record, no student pass in score), score.entropy=false "
    "(no entropy columns) and train.trackers=[] (no TensorBoard, as TRL's report_to=none).",
]


# ----------------------------------------------------------------------------- the world
def build_world(work: Path, size: dict) -> dict:
    """Tokenizer, student, teacher (same tokenizer) and equal-length prompts, all local."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from data_schemas import prompts as prompts_schema
    from tests.conftest import build_tiny_lm

    words = [f"w{i}" for i in range(size["vocab_words"])]
    student = build_tiny_lm(work / "student", seed=0, words=words, **size["student_arch"])
    teacher = build_tiny_lm(work / "teacher", seed=1, words=words, **size["teacher_arch"])
    positions = 1 + size["prompt_words"] + size["tokens"]  # bos + prompt + T
    for path in (student, teacher):
        _fit_positions(path, positions)
    _never_stop(student)  # every sampled response is T tokens long on both sides
    g = np.random.default_rng(SEED)
    ids = g.integers(0, len(words), (size["n_prompts"], size["prompt_words"]))  # [N, words]
    texts = [" ".join(words[j] for j in row) for row in ids]
    rows = [{"id": f"p{i:04d}", "prompt": t} for i, t in enumerate(texts)]
    path = work / "prompts.parquet"
    pq.write_table(prompts_schema.validate(pa.Table.from_pylist(rows)), path)
    return {
        "student": str(student), "teacher": str(teacher), "prompts": str(path), "texts": texts,
        "run_dir": str(work / "ours"), "trl_dir": str(work / "trl"), **size,
    }  # fmt: skip


def _fit_positions(path: Path, positions: int) -> None:
    """Raise ``max_position_embeddings`` (256 in the test models) when prompt + T needs more: RoPE
    has no learned positions, so only the config's limit changes."""
    cfg_path = path / "config.json"
    cfg = json.loads(cfg_path.read_text())
    if cfg["max_position_embeddings"] < positions:
        cfg["max_position_embeddings"] = positions
        cfg_path.write_text(json.dumps(cfg, indent=2))


def matmul_weights(arch: dict, vocab: int) -> int:
    """Per-token matmul weights of a ``build_tiny_lm`` Llama: per layer q, k, v, o (h x h each)
    and the MLP (3 x h x 2h), then the untied LM head (h x V)."""
    h = arch["hidden"]
    return arch["layers"] * 10 * h * h + h * vocab


def teacher_arch(scale: float, student: dict, layers: int, vocab: int) -> dict:
    """A teacher of ``layers`` layers whose width (a multiple of 64, one head per 64) gives the
    matmul-weight ratio to the student closest to ``scale`` (on a log scale)."""
    import math

    target = scale * matmul_weights(student, vocab)
    widths = range(64, 8193, 64)
    err = lambda h: abs(math.log(matmul_weights({"hidden": h, "layers": layers}, vocab) / target))  # noqa: E731
    return {"hidden": min(widths, key=err), "layers": layers}


def _never_stop(path: Path) -> None:
    """Zero the student's EOS output row: a logit of 0 among random ones over the whole vocabulary
    (probability < 1/V per step), so samples run to T tokens and both sides train on N * T."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        model.lm_head.weight[tok.eos_token_id].zero_()
    model.save_pretrained(path)


def n_params(path: str) -> tuple[int, int]:
    """(all parameters, those multiplied per token: all but the input embedding table)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path)
    total = sum(x.numel() for x in model.parameters())
    return total, total - model.get_input_embeddings().weight.numel()


# ----------------------------------------------------------------------------- measuring
def _usage() -> tuple[float, float]:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return time.perf_counter(), ru.ru_utime + ru.ru_stime


def measured(fn: Callable[[], dict]) -> dict:
    """Wall and CPU seconds (all threads) of ``fn()``, merged into what it returns."""
    w0, c0 = _usage()
    out = fn()
    w1, c1 = _usage()
    return {"wall_s": w1 - w0, "cpu_s": c1 - c0, **out}


def _rss_mb(key: str = "VmRSS") -> float:
    """This process's resident set (``VmRSS``) or its peak (``VmHWM``), in MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


# ----------------------------------------------------------------------------- our side
def ours_overrides(spec: dict, loss: str, name: str) -> list[str]:
    """Our stages' settings (hydra overrides); ``spec["extra_overrides"]`` appends the lean keys."""
    mb_tokens = spec["batch"] * (1 + spec["prompt_words"] + spec["tokens"])  # bos + words + T
    return [
        f"run_dir={spec['run_dir']}", f"student.path={spec['student']}",
        f"teacher.path={spec['teacher']}", f"data.prompts={spec['prompts']}", f"seed={SEED}",
        "rollout.backend=hf", f"rollout.n={spec['samples']}",
        f"rollout.max_new_tokens={spec['tokens']}",
        "rollout.temperature=1.0", "rollout.top_p=1.0", "score.backend=hf", f"score.topk={TOPK}",
        "select.threads=1", f"loss={loss}", f"train.name={name}", "train.epochs=1",
        f"train.micro_batch_tokens={mb_tokens}", f"train.lr={LR}", "train.log_every=1",
        "overwrite=true", *spec.get("extra_overrides", []),
    ]  # fmt: skip


def ours_train(spec: dict, loss: str, name: str) -> dict:
    """``stages.train`` on the cached selection; response tokens and the loop's own seconds."""
    from stages import train
    from stages.lib.config import compose
    from stages.lib.layout import RunLayout

    res = measured(
        lambda: {"steps": train.run(compose("train", ours_overrides(spec, loss, name)))["steps"]}
    )
    log = RunLayout.of(spec["run_dir"]).metrics(name)
    rows = [json.loads(r) for r in log.read_text().splitlines()]
    res["response_tokens"] = int(sum(r["tokens"] for r in rows))
    res["loop_s"] = sum(r["step_s"] for r in rows)
    return res


def ours_epoch(spec: dict) -> dict:
    """rollout + score + select + train(topk_fkl), each stage in this process, timed apart."""
    from stages import rollout, score, select
    from stages.lib.config import compose

    def stage(mod, name: str) -> dict:
        mod.run(compose(name, ours_overrides(spec, "topk_fkl", "topk_fkl")))
        return {}

    stages = {}
    for name, mod in (("rollout", rollout), ("score", score), ("select", select)):
        stages[name] = measured(lambda m=mod, n=name: stage(m, n))
    stages["train"] = ours_train(spec, "topk_fkl", "topk_fkl")
    return {
        "wall_s": sum(s["wall_s"] for s in stages.values()),
        "cpu_s": sum(s["cpu_s"] for s in stages.values()),
        "response_tokens": stages["train"]["response_tokens"],
        "stages": stages,
    }


# ----------------------------------------------------------------------------- TRL's side
def trl_common(spec: dict, out: str) -> dict:
    """TrainingArguments shared by both TRL trainers (documented defaults, except as listed)."""
    return {
        "output_dir": out, "per_device_train_batch_size": spec["batch"], "num_train_epochs": 1,
        "learning_rate": LR, "seed": SEED, "bf16": False, "gradient_checkpointing": False,
        "report_to": "none", "save_strategy": "no", "use_cpu": True, "logging_steps": 1,
    }  # fmt: skip


def trl_distill(spec: dict, beta: float, gradient_checkpointing: bool = False) -> dict:
    """``trl.DistillationTrainer`` for one epoch over the prompts: load, train, save."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DistillationConfig, DistillationTrainer

    out = str(Path(spec["trl_dir"]) / f"distill_beta{beta:g}_gc{int(gradient_checkpointing)}")
    # n samples per prompt: the prompt n times (DistillationTrainer samples one completion per row)
    data = Dataset.from_list([{"prompt": t} for t in spec["texts"] for _ in range(spec["samples"])])
    counts: list[int] = []
    gen_s: list[float] = []  # seconds inside TRL's sampling (student generate), per batch
    gen_cpu: list[float] = []  # and CPU seconds of this process meanwhile (its torch threads)

    def go() -> dict:
        tok = AutoTokenizer.from_pretrained(spec["student"], padding_side="left")
        student = AutoModelForCausalLM.from_pretrained(spec["student"])
        teacher = AutoModelForCausalLM.from_pretrained(spec["teacher"])
        common = trl_common(spec, out) | {"gradient_checkpointing": gradient_checkpointing}
        args = DistillationConfig(
            **common, beta=beta, max_completion_length=spec["tokens"],
            temperature=1.0, top_p=1.0, top_k=0,
        )  # fmt: skip
        trainer = DistillationTrainer(
            model=student, teacher_model=teacher, args=args, train_dataset=data,
            processing_class=tok,
        )  # fmt: skip
        generate = trainer._generate  # counts the response tokens each batch trains on

        def counting(prompts):
            t0, c0 = time.perf_counter(), time.process_time()
            res = generate(prompts)
            gen_s.append(time.perf_counter() - t0)
            gen_cpu.append(time.process_time() - c0)
            counts.append(sum(len(c) for c in res[1]))
            return res

        trainer._generate = counting
        result = trainer.train()
        trainer.save_model(out)
        return {"steps": result.global_step, "loop_s": result.metrics["train_runtime"]}

    res = measured(go)
    res["response_tokens"] = sum(counts)
    res["generate_s"] = sum(gen_s)
    res["generate_cpu_s"] = sum(gen_cpu)
    return res


def stored_sequences(spec: dict) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, response ids) of every row of our selection: what both SFT trainers read."""
    import pyarrow.parquet as pq

    from stages.lib.layout import RunLayout

    sel = RunLayout.of(spec["run_dir"]).selected("all")
    files = sorted(p for p in sel.rglob("*.parquet") if not p.name.startswith("_"))
    out = []
    for f in files:
        t = pq.read_table(f, columns=["train_prompt_ids", "response_ids", "n_kept"])
        out += list(zip(t["train_prompt_ids"].to_pylist(), t["response_ids"].to_pylist()))
    return out


def trl_sft(spec: dict) -> dict:
    """``trl.SFTTrainer`` on our stored sequences (completion-only loss): load, train, save."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    seqs = stored_sequences(spec)
    rows = [{"input_ids": p + r, "completion_mask": [0] * len(p) + [1] * len(r)} for p, r in seqs]
    data = Dataset.from_list(rows)
    out = str(Path(spec["trl_dir"]) / "sft")

    def go() -> dict:
        tok = AutoTokenizer.from_pretrained(spec["student"])
        student = AutoModelForCausalLM.from_pretrained(spec["student"])
        args = SFTConfig(**trl_common(spec, out), completion_only_loss=True)
        trainer = SFTTrainer(model=student, args=args, train_dataset=data, processing_class=tok)
        result = trainer.train()
        trainer.save_model(out)
        return {"steps": result.global_step, "loop_s": result.metrics["train_runtime"]}

    res = measured(go)
    res["response_tokens"] = sum(len(r) for _, r in seqs)
    return res


# ----------------------------------------------------------------------------- children
def preload(side: str) -> None:
    """Import, before the timed region, every module the side's run would import lazily: imports
    are a fixed cost per process (reported as ``import_s``), not part of the work measured."""
    import importlib

    import transformers

    for name in ("AutoTokenizer", "AutoModelForCausalLM", "LlamaForCausalLM", "GenerationConfig"):
        getattr(transformers, name)
    importlib.import_module("transformers.generation.utils")
    if side == "trl":
        import datasets  # noqa: F401
        import trl

        for name in ("DistillationConfig", "DistillationTrainer", "SFTConfig", "SFTTrainer"):
            getattr(trl, name)
    else:
        for name in ("rollout", "score", "select", "train"):
            importlib.import_module(f"stages.{name}")
        importlib.import_module("torch.utils.tensorboard")  # train.tensorboard=true (default)
        warm_first_use_imports()


def warm_first_use_imports() -> None:
    """The imports our stages trigger at first use rather than at import, ~0.12 CPU s that the
    timed region held until now: pyarrow imports pandas (when installed) at its first conversion
    to numpy, and Hydra its plugin modules at its first compose. TRL's side has pandas loaded
    before its timed region (``datasets`` imports it) and imports nothing more inside it (a
    handful of numpy/torch submodules: ``sys.modules`` before and after ``trl_distill``)."""
    import pyarrow as pa
    from hydra.core.plugins import Plugins

    pa.array([0]).to_numpy()
    Plugins.instance()


def run_child(name: str, spec_path: str, threads: int) -> None:
    """One measured run in this process; prints ``RESULT <json>`` as its last line."""
    t0 = time.perf_counter()
    import torch

    torch.set_num_threads(threads)
    spec = json.loads(Path(spec_path).read_text())
    preload(name.split("_")[0])
    import_s, rss_after_imports = time.perf_counter() - t0, _rss_mb()
    runs = {
        "ours_epoch": lambda: ours_epoch(spec),
        LEAN: lambda: ours_epoch(
            spec | {"run_dir": spec["run_dir"] + "_lean", "extra_overrides": LEAN_OVERRIDES}
        ),
        "ours_second": lambda: ours_train(spec, "topk_rkl", "topk_rkl"),
        "ours_sft": lambda: ours_train(spec, "sft", "peer_sft"),
        "trl_epoch": lambda: trl_distill(spec, 0.0),
        "trl_second": lambda: trl_distill(spec, 1.0),
        "trl_sft": lambda: trl_sft(spec),
        EXTRA: lambda: trl_distill(spec, 0.0, gradient_checkpointing=True),
    }
    res = runs[name]()
    res["import_s"] = import_s
    res["rss_after_imports_mb"] = rss_after_imports
    # The peak of this process's own memory. Not ru_maxrss: on Linux that keeps the parent's peak
    # across the spawn (a 16x teacher built by the parent set every small child's to 1.7 GB).
    res["peak_rss_mb"] = _rss_mb("VmHWM")
    res["ru_maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    res["torch_threads"] = torch.get_num_threads()
    print("RESULT " + json.dumps(res), flush=True)


def child_command(name: str, spec_path: Path, threads: int) -> list[str]:
    return [sys.executable, __file__, "--child", name, "--spec", str(spec_path), "--threads", str(threads)]  # fmt: skip


def spawn(name: str, spec_path: Path, threads: int, timeout: float) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    env.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "scripts"), env.get("PYTHONPATH", "")])  # fmt: skip
    cmd = child_command(name, spec_path, threads)
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if p.returncode != 0 or not lines:
        tail = (p.stderr or p.stdout)[-3000:]
        raise RuntimeError(f"child {name} failed (exit {p.returncode}):\n{tail}")
    res = json.loads(lines[-1][len("RESULT ") :])
    res["process_wall_s"] = time.perf_counter() - t0
    return res


# ----------------------------------------------------------------------------- the suite
def versions() -> dict:
    from importlib.metadata import version

    pkgs = ("torch", "transformers", "trl", "accelerate", "datasets", "pyarrow", "duckdb")
    return {p: version(p) for p in pkgs} | {"python": platform.python_version()}


def ratios(r: dict) -> dict:
    tps = lambda k, t: r[k]["response_tokens"] / r[k][t]  # noqa: E731
    extra = {}
    if "wall_s" in r.get(LEAN, {}):
        extra["epoch_lean_wall_ours_over_trl"] = r[LEAN]["wall_s"] / r["trl_epoch"]["wall_s"]
        extra["epoch_lean_cpu_ours_over_trl"] = r[LEAN]["cpu_s"] / r["trl_epoch"]["cpu_s"]
    if "wall_s" in r.get(EXTRA, {}):
        extra["epoch_wall_ours_over_trl_gc"] = r["ours_epoch"]["wall_s"] / r[EXTRA]["wall_s"]
        extra["epoch_cpu_ours_over_trl_gc"] = r["ours_epoch"]["cpu_s"] / r[EXTRA]["cpu_s"]
    return extra | {
        "epoch_wall_ours_over_trl": r["ours_epoch"]["wall_s"] / r["trl_epoch"]["wall_s"],
        "epoch_cpu_ours_over_trl": r["ours_epoch"]["cpu_s"] / r["trl_epoch"]["cpu_s"],
        "second_loss_wall_ours_over_trl": r["ours_second"]["wall_s"] / r["trl_second"]["wall_s"],
        "second_loss_cpu_ours_over_trl": r["ours_second"]["cpu_s"] / r["trl_second"]["cpu_s"],
        "epoch_process_wall_ours_over_trl": r["ours_epoch"]["process_wall_s"]
        / r["trl_epoch"]["process_wall_s"],  # whole child process: interpreter, imports, exit
        "two_losses_wall_ours_over_trl": (r["ours_epoch"]["wall_s"] + r["ours_second"]["wall_s"])
        / (r["trl_epoch"]["wall_s"] + r["trl_second"]["wall_s"]),
        "trainer_tokens_per_s_ours_over_trl": tps("ours_sft", "wall_s") / tps("trl_sft", "wall_s"),
        # per CPU second: the figure that holds on a loaded machine (same tokens both sides)
        "trainer_tokens_per_cpu_s_ours_over_trl": tps("ours_sft", "cpu_s")
        / tps("trl_sft", "cpu_s"),
        "trainer_loop_tokens_per_s_ours_over_trl": tps("ours_sft", "loop_s")
        / tps("trl_sft", "loop_s"),
        "sft_tokens_per_s": {"ours": tps("ours_sft", "wall_s"), "trl": tps("trl_sft", "wall_s")},
        "peak_rss_ours_over_trl": {
            k: r[f"ours_{k}"]["peak_rss_mb"] / r[f"trl_{k}"]["peak_rss_mb"]
            for k in ("epoch", "second", "sft")
        },
        "response_tokens": {k: v.get("response_tokens") for k, v in r.items()},
    }


def figures(out: dict) -> dict:
    """The headline CPU-second ratios under a key naming the setting, for docs/benchmarks.json
    (``scripts/docs_tables.py --record``): ``peer.n<samples>_p<prompt tokens>_t<teacher>x.*``,
    e.g. ``peer.n4_p256_t4.6x.epoch_cpu_ours_over_trl``; with repeats, each median and its worst
    repeat (``..._worst``)."""
    s, r = out["settings"], out["ratios"]
    prompt = s["prompt_words"] + 1  # BOS + words
    tag = f"n{s['samples']}_p{prompt}_t{out['models']['teacher_over_student_matmul_params']:.1f}x"
    fig = {k: round(r[k], 3) for k in WORST}
    if len(out.get("ratios_per_repeat", [])) > 1:  # the median above, the worst repeat here
        fig |= {f"{k}_worst": round(v, 3) for k, v in out["ratios_worst"].items()}
    return {"peer": {tag: fig}}


def rescore(path: Path) -> dict:
    """Recompute a finished JSON's ratios and figures from its runs (after a change to them)."""
    out = json.loads(path.read_text())
    out |= summarize(out)
    path.write_text(json.dumps(out, indent=1))
    return out


def sizes_for(
    quick: bool,
    prompts: int | None,
    tokens: int | None,
    scale: float | None,
    samples: int | None = None,
    prompt_tokens: int | None = None,
) -> dict:
    """The mode's sizes with the command line's overrides (the defaults when none is given)."""
    size = dict(SIZES["quick" if quick else "full"])
    size["n_prompts"] = prompts or size["n_prompts"]
    size["tokens"] = tokens or size["tokens"]
    size["samples"] = samples or size["samples"]
    if prompt_tokens is not None:
        size["prompt_words"] = prompt_tokens - 1  # BOS + words
    if scale is not None:
        layers = size["teacher_arch"]["layers"]
        size["teacher_arch"] = teacher_arch(scale, size["student_arch"], layers, _vocab(size))
    size["teacher_scale"] = scale  # null: the mode's default teacher
    return size


def _vocab(size: dict) -> int:
    """Vocabulary of the world's tokenizer: the words plus its four special tokens."""
    return size["vocab_words"] + 4


def setup(quick: bool, threads: int, work: Path, prompts: int | None, tokens: int | None,
          scale: float | None = None, samples: int | None = None,
          prompt_tokens: int | None = None, core_only: bool = False):  # fmt: skip
    """Build the world; the JSON's header (versions, settings, models, commands)."""
    size = sizes_for(quick, prompts, tokens, scale, samples, prompt_tokens)
    t0 = time.perf_counter()
    spec = build_world(work, size)
    spec_path = work / "spec.json"
    spec_path.write_text(json.dumps(spec))
    (s_all, s_mm), (t_all, t_mm) = n_params(spec["student"]), n_params(spec["teacher"])
    children = (*CHILDREN, LEAN) if quick else (*CHILDREN, EXTRA, LEAN)
    if core_only:  # the six headline runs only (a loaded machine, a time limit)
        children = CHILDREN
    header = {
        "quick": quick,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {
            "nproc": os.cpu_count(),
            "loadavg_1m_at_start": os.getloadavg()[0],
            "loadavg_1_5_15m_at_start": os.getloadavg(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "nice": os.nice(0),
        },  # fmt: skip
        "versions": versions(),
        "settings": {
            **size,
            "topk": TOPK,
            "lr": LR,
            "seed": SEED,
            "threads": threads,
            "core_only": core_only,
        },  # fmt: skip
        "models": {
            "student_params": s_all,
            "teacher_params": t_all,
            "teacher_over_student_params": t_all / s_all,
            "teacher_over_student_matmul_params": t_mm / s_mm,
        },
        "commands": {n: " ".join(child_command(n, spec_path, threads)) for n in children},
        "lean_overrides": LEAN_OVERRIDES,
        "goals": GOALS,
        "differences": DIFFERENCES,
        "world_s": time.perf_counter() - t0,
    }
    return header, spec_path, children


def bench(quick: bool, threads: int, work: Path, out_path: Path, repeats: int = 1, **sizes) -> dict:
    """Every child in order (ours, TRL, ours, TRL, ...), the whole sequence ``repeats`` times;
    the JSON is rewritten after each child, so a run stopped by a timeout still leaves what it
    measured. ``runs`` is the first repeat; ``repeats`` holds them all, ``ratios`` is each
    ratio's median over the complete repeats and ``ratios_worst`` the worst of each headline."""
    t0 = time.perf_counter()
    out, spec_path, children = setup(quick, threads, work, **sizes)
    out["settings"]["repeats"] = repeats
    out["repeats"] = []
    timeout = 600 if quick else 1800
    spec = json.loads(spec_path.read_text())
    for _ in range(repeats):
        # every repeat (and a re-run over the same --work) starts without our cached stages:
        # a completed rollout or score would be skipped, not measured
        for d in (spec["run_dir"], spec["run_dir"] + "_lean", spec["trl_dir"]):
            shutil.rmtree(d, ignore_errors=True)
        runs: dict = {}
        out["repeats"].append(runs)
        out["runs"] = out["repeats"][0]
        for name in children:
            try:
                runs[name] = spawn(name, spec_path, threads, timeout)
            except (RuntimeError, subprocess.TimeoutExpired) as e:
                if name not in (EXTRA, LEAN):
                    raise
                runs[name] = {"error": str(e)[-2000:]}
            out["machine"]["loadavg_1m_at_end"] = os.getloadavg()[0]
            out["machine"]["loadavg_1_5_15m_at_end"] = os.getloadavg()
            out["machine"]["parent_peak_rss_mb"] = _rss_mb("VmHWM")  # the floor of ru_maxrss
            out["seconds"] = time.perf_counter() - t0
            out |= summarize(out)
            out_path.write_text(json.dumps(out, indent=1))
    return out


# the headline ratios and which way is worse: CPU seconds ours / TRL (higher), tokens per CPU
# second ours / TRL (lower)
WORST = {"epoch_cpu_ours_over_trl": max, "second_loss_cpu_ours_over_trl": max,
         "trainer_tokens_per_cpu_s_ours_over_trl": min}  # fmt: skip


def summarize(out: dict) -> dict:
    """``ratios`` (each scalar's median over the complete repeats; nested ones from the first),
    ``ratios_per_repeat``, ``ratios_worst`` and the figures; {} before one repeat is complete."""
    done = [r for r in out.get("repeats") or [out["runs"]] if all(n in r for n in CHILDREN)]
    if not done:
        return {}
    per = [ratios(r) for r in done]
    med = {k: statistics.median(p[k] for p in per) if isinstance(v, int | float) else v
           for k, v in per[0].items()}  # fmt: skip
    res = {"ratios": med, "ratios_per_repeat": per,
           "ratios_worst": {k: f(p[k] for p in per) for k, f in WORST.items()}}  # fmt: skip
    return res | figures(out | res)


def _bad_size(a: argparse.Namespace) -> str | None:
    """The one-line complaint about an out-of-range size option, or None."""
    if a.teacher_scale is not None and not 1 <= a.teacher_scale <= 64:
        return (
            f"--teacher-scale {a.teacher_scale:g} is out of range (bench_peer). Fix: give 1 to 64"
        )
    if a.prompt_tokens is not None and a.prompt_tokens < 2:
        return f"--prompt-tokens {a.prompt_tokens} must be >= 2 (bench_peer). Fix: give 2 or more"
    for flag, v in (("--prompts", a.prompts), ("--response-tokens", a.tokens),
                    ("--samples", a.samples), ("--repeats", a.repeats)):  # fmt: skip
        if v is not None and v < 1:
            return f"{flag} {v} must be >= 1 (bench_peer). Fix: give a positive count"
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/bench_peer.json")
    ap.add_argument("--quick", action="store_true", help="tiny models, 16 prompts: ~2 minutes")
    ap.add_argument("--threads", type=int, default=1, help="torch threads, the same for both sides")
    ap.add_argument("--prompts", type=int, help="override the mode's number of prompts")
    ap.add_argument(
        "--response-tokens", "--tokens", dest="tokens", type=int,
        help="override the mode's response length T (sampled tokens per prompt)",
    )  # fmt: skip
    ap.add_argument(
        "--teacher-scale", type=float,
        help="a teacher of ~S times the student's per-token matmul weights (default: the mode's)",
    )  # fmt: skip
    ap.add_argument("--samples", type=int, help="samples per prompt, both sides (default 1)")
    ap.add_argument("--prompt-tokens", type=int, help="prompt length in tokens (BOS included)")
    ap.add_argument(
        "--core-only", action="store_true",
        help=f"only the six headline runs (no {EXTRA}, no {LEAN})",
    )  # fmt: skip
    ap.add_argument(
        "--repeats", type=int, default=1,
        help="run the whole interleaved sequence this many times: ratios are medians, with the "
        "worst repeat beside them (the machine's noise moves one pair's ratio by ~10 %%)",
    )  # fmt: skip
    ap.add_argument("--work", help="build the world here and keep it (default: a temp dir)")
    ap.add_argument("--child", choices=(*CHILDREN, EXTRA, LEAN), help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    ap.add_argument(
        "--rescore", help="recompute this finished JSON's ratios and figures, run nothing"
    )
    a = ap.parse_args()
    if a.rescore:
        print(json.dumps(figures(rescore(Path(a.rescore))), indent=1))
        return
    if a.child:
        run_child(a.child, a.spec, a.threads)
        return
    try:
        import trl  # noqa: F401
    except ImportError:
        print("error: trl is not installed (bench_peer). Fix: pip install -e .[bench]", file=sys.stderr)  # fmt: skip
        sys.exit(2)
    bad = _bad_size(a)
    if bad:
        print(f"error: {bad}", file=sys.stderr)
        sys.exit(2)
    out = Path(a.out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    sizes = {"prompts": a.prompts, "tokens": a.tokens, "scale": a.teacher_scale,
             "samples": a.samples, "prompt_tokens": a.prompt_tokens,
             "core_only": a.core_only, "repeats": a.repeats}  # fmt: skip
    if a.work:
        Path(a.work).mkdir(parents=True, exist_ok=True)
        result = bench(a.quick, a.threads, Path(a.work).resolve(), out, **sizes)
    else:
        with tempfile.TemporaryDirectory(prefix="bench_peer_") as d:
            result = bench(a.quick, a.threads, Path(d), out, **sizes)
    print(json.dumps({"ratios": result["ratios"], "seconds": result["seconds"]}, indent=1))


if __name__ == "__main__":
    main()
