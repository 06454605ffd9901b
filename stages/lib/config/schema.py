"""The config groups of the data stages (model, data, worker, launcher, rollout, score, select, eval,
report; the training groups: training.py): one dataclass each, a comment on every key, values checked in ``__post_init__``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stages.lib.config.checks import (
    _check,
    _check_device,
    _check_finite,
    _check_tensor_parallel,
    _closest,
    _finite_value,
)
from stages.lib.errors import UserError
from stages.lib.layout import check_name
from stages.lib.selection.policies import POLICY_DIR


def conf_dir() -> Path:
    """The config tree: the copy an installed package carries (``stages/conf``, mapped from the
    repository's ``conf/`` at build time: pyproject.toml), else the repository's ``conf/``."""
    here = Path(__file__).resolve()
    packaged = here.parents[2] / "conf"  # stages/conf: only in an installed wheel
    return packaged if (packaged / "base.yaml").is_file() else here.parents[3] / "conf"


CONF_DIR = conf_dir()
STAGES = ("sft", "rollout", "score", "select", "train", "eval", "report")


@dataclass
class ModelConfig:
    # Local Hugging Face model directory (save_pretrained format); null when the role is unused.
    path: str | None = None
    # Weights dtype for inference passes (rollout/score): float32 | bfloat16 | float16.
    dtype: str = "float32"
    # Short label used in reports; defaults to the directory name.
    name: str | None = None

    def __post_init__(self) -> None:
        _check(
            self.dtype in ("float32", "bfloat16", "float16"),
            "model dtype",
            f"must be float32|bfloat16|float16 (got {self.dtype!r})",
        )
        _check(self.path is None or self.path.strip() != "", "model path", "must not be empty")


@dataclass
class DataConfig:
    # Prompts: a JSONL or Parquet file, or a `datasets` save_to_disk folder; columns id and
    # prompt (text) or messages (a chat: [{role, content}]), optional context, answer, kind.
    prompts: str | None = None
    # Split read from a save_to_disk DatasetDict (prompts and eval sets).
    split: str = "train"
    # Eval sets: name -> prompts file with verifiable answers (used by the eval stage).
    eval_sets: dict[str, str] = field(default_factory=dict)
    # Use only the first N prompts (smoke runs); null = all.
    max_prompts: int | None = None

    def __post_init__(self) -> None:
        _check(self.max_prompts is None or self.max_prompts > 0, "data.max_prompts", "must be > 0")
        for name in self.eval_sets:  # eval set names label results and may name files
            check_name(name, "data.eval_sets key")


@dataclass
class WorkerConfig:
    # This worker's index in 0..count-1: it writes shards s with s % count == index.
    index: int = 0
    # Number of workers splitting rollout/score shards (across processes or machines).
    count: int = 1

    def __post_init__(self) -> None:
        _check(self.count >= 1, "worker.count", "must be >= 1")
        _check(0 <= self.index < self.count, "worker.index", "must be in 0..worker.count-1")


LAUNCHERS = ("local", "ray")
PLACEMENTS = ("default", "spread")


@dataclass
class LauncherConfig:
    # How rollout and score run their shard plan: local = in this process (split by hand with
    # worker.index/worker.count); ray = Ray actors take the shards (docs/CLUSTER.md; needs the
    # `ray` extra).
    kind: str = "local"
    # The Ray cluster: null = start a local one in this process; "auto" = the cluster that
    # `ray start` runs on this machine; "host:6379" or "ray://host:10001" = that cluster.
    address: str | None = None
    # Ray actors; each loads one engine (HF model or vLLM) once and takes shards one at a time.
    actors: int = 2
    # CPUs Ray reserves per actor (Ray gives the actor as many OpenMP threads unless the
    # environment sets OMP_NUM_THREADS).
    num_cpus: float = 1.0
    # GPUs Ray reserves per actor (1 for an engine on one GPU; 0 = CPU). A vLLM engine with
    # rollout/score.tensor_parallel_size = T needs T here (Ray hands the actor T GPUs).
    num_gpus: float = 0.0
    # Custom Ray resources per actor, name -> amount: actors start only on nodes that declare
    # them (`ray start --resources='{"h100": 8}'`), e.g. {h100: 1} keeps engines off CPU nodes.
    resources: dict[str, float] = field(default_factory=dict)
    # Where Ray puts the actors: default (Ray's own choice, which favours the nodes already in
    # use) | spread (across the nodes first: engines spread over their network links and disks).
    placement: str = "default"
    # How often an actor whose process dies (killed, out of memory, node lost) is replaced; its
    # shard is redone. One more death fails the stage.
    max_restarts: int = 3
    # Ray's dashboard for a local cluster: null = Ray's default (on when its packages are
    # installed: pip install 'ray[default]'), true, false. A cluster from `ray start` has its own.
    dashboard: bool | None = None
    # Extra environment variables for the actors (e.g. HF_HOME), name -> value.
    env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check(self.kind in LAUNCHERS, "launcher.kind", f"must be local|ray (got {self.kind!r})")
        _check(
            self.address is None or self.address.strip() != "",
            "launcher.address",
            "must be null (a local cluster), auto, host:port or ray://host:port",
        )
        _check(self.actors >= 1, "launcher.actors", "must be >= 1")
        _check(self.num_cpus > 0, "launcher.num_cpus", "must be > 0")
        _check(self.num_gpus >= 0, "launcher.num_gpus", "must be >= 0")
        _check(self.max_restarts >= 0, "launcher.max_restarts", "must be >= 0")
        _check(self.placement in PLACEMENTS, "launcher.placement", "must be default|spread")
        for k, v in self.resources.items():
            ok = isinstance(v, int | float) and not isinstance(v, bool) and v > 0
            _check(ok, f"launcher.resources.{k}", f"must be a number > 0 (got {v!r})")
            _check(k not in ("CPU", "GPU"), f"launcher.resources.{k}", "use num_cpus / num_gpus")
        _check_finite(self, "launcher")


@dataclass
class RolloutConfig:
    # hf | vllm | auto (auto = vllm where CUDA is present, else hf).
    backend: str = "auto"
    # Samples per prompt.
    n: int = 2
    # Sampling temperature (> 0) and nucleus top-p in (0, 1].
    temperature: float = 1.0
    top_p: float = 1.0
    # Maximum response length in tokens (the EOS token counts).
    max_new_tokens: int = 32
    # Fraction of prompts (those with a context) whose rollouts are guided (EDGE-OPD).
    guided_fraction: float = 0.0
    # Text the student is trained on ({prompt}; never the context).
    prompt_template: str = "{prompt}"
    # Text a guided rollout is generated from.
    guided_template: str = "{context} {prompt}"
    # Prefix the teacher scores the response after ("{prompt}" = no privileged context).
    teacher_template: str = "{context} {prompt}"
    # Longest prompt (tokens) accepted; null = the model's context length minus max_new_tokens.
    max_prompt_tokens: int | None = None
    # What to do with a longer prompt: error (default) | skip (listed in the manifest, not written).
    too_long: str = "error"
    # Prompts per shard (a shard is the unit of resume and of worker splitting).
    prompts_per_shard: int = 256
    # Prompts per generation batch (HF backend).
    batch_size: int = 64
    # Where the policy generates (HF backend): auto (cuda when present, else cpu) | cpu | cuda |
    # cuda:N. The vLLM backend ignores it: vLLM places its engine itself (CUDA_VISIBLE_DEVICES).
    device: str = "auto"
    # vLLM: fraction of memory for the KV cache (on CPU, of system RAM).
    vllm_memory_fraction: float = 0.25
    # vLLM: GPUs one engine spans (tensor parallelism; a policy too large for one GPU). With
    # launcher.kind=ray each actor needs that many: launcher.num_gpus >= this. HF: must be 1.
    tensor_parallel_size: int = 1
    # Chat rows (`messages`): a Jinja chat template file replacing the tokenizers' own (null =
    # each tokenizer's chat_template; the teacher prefix uses the teacher tokenizer's).
    chat_template: str | None = None
    # Keyword arguments of apply_chat_template for the student's prefixes (train and rollout).
    template_kwargs: dict[str, Any] = field(default_factory=dict)
    # The same for the teacher's prefix only (e.g. {enable_thinking: true} for a thinking teacher).
    teacher_template_kwargs: dict[str, Any] = field(default_factory=dict)
    # Where a chat row's privileged context goes in the teacher (and guided) prefix: system
    # (appended to the system message, created when absent) | user (before the last user message).
    context_placement: str = "system"
    # Wording of the context block ({context}); joined to the message text by context_separator.
    context_template: str = "{context}"
    context_separator: str = "\n\n"
    # Chat rows with earlier assistant turns: one sample per assistant turn (the student regenerates
    # each, after the turns before it) instead of one sample after the whole conversation.
    expand_turns: bool = False
    # A conversation ending with an assistant message (without expand_turns): continue (a
    # prefill: the student continues that message) | regenerate (the student writes that turn
    # anew; the message becomes the turn's reference answer unless the row has an answer).
    final_assistant: str = "continue"
    # Extra stop token ids and stop strings (besides the tokenizer EOS and every id of the model's
    # generation_config.eos_token_id); the stop token is kept in the response.
    stop_token_ids: list[int] = field(default_factory=list)
    stop_strings: list[str] = field(default_factory=list)
    # How a response is graded against the prompt's answer (the `correct` column):
    # words | exact | contains | normalised | regex (stages/lib/grading.py).
    match: str = "words"

    def __post_init__(self) -> None:
        from stages.lib.grading import MODES

        _check_finite(self, "rollout")
        _check(self.backend in ("hf", "vllm", "auto"), "rollout.backend", "must be hf|vllm|auto")
        _check_device(self.device, "rollout.device")
        _check(
            self.context_placement in ("system", "user"),
            "rollout.context_placement",
            "must be system|user",
        )
        _check(
            self.final_assistant in ("continue", "regenerate"),
            "rollout.final_assistant",
            "must be continue|regenerate",
        )
        _check("{context}" in self.context_template, "rollout.context_template", "needs {context}")
        _check(all(s for s in self.stop_strings), "rollout.stop_strings", "must be non-empty")
        _check(all(i >= 0 for i in self.stop_token_ids), "rollout.stop_token_ids", "must be >= 0")
        _check(self.match in MODES, "rollout.match", f"must be one of {'|'.join(MODES)}")
        _check(self.n >= 1, "rollout.n", "must be >= 1")
        _check(self.temperature > 0, "rollout.temperature", "must be > 0")
        _check(0 < self.top_p <= 1, "rollout.top_p", "must be in (0, 1]")
        _check(self.max_new_tokens >= 1, "rollout.max_new_tokens", "must be >= 1")
        _check(
            self.max_prompt_tokens is None or self.max_prompt_tokens >= 1,
            "rollout.max_prompt_tokens",
            "must be >= 1 (or null: the context length minus max_new_tokens)",
        )
        _check(0 <= self.guided_fraction <= 1, "rollout.guided_fraction", "must be in [0, 1]")
        _check(self.too_long in ("error", "skip"), "rollout.too_long", "must be error|skip")
        _check(self.prompts_per_shard >= 1, "rollout.prompts_per_shard", "must be >= 1")
        _check(self.batch_size >= 1, "rollout.batch_size", "must be >= 1")
        _check(
            0 < self.vllm_memory_fraction <= 1, "rollout.vllm_memory_fraction", "must be in (0, 1]"
        )
        _check_tensor_parallel(self.tensor_parallel_size, self.backend, "rollout")


# Rollouts columns a teacher route can read (the prompt's columns the rollout stage carries).
ROUTE_COLUMNS = ("kind", "prompt_id", "answer")


@dataclass
class RouteBy:
    # Which teacher (a name of `teachers`) scores each rollout, by the value of one rollouts
    # column: kind (the prompt's kind/domain) | prompt_id | answer. null = no routing.
    column: str | None = None
    # Column value -> teacher name.
    map: dict[str, str] = field(default_factory=dict)
    # The teacher of a value not in `map` (null: such a value is an error before any model loads).
    # With `sql`: the teacher of a prompt whose expression is NULL.
    default: str | None = None
    # Instead of `column`: a DuckDB SQL expression over the prompts (id, prompt, context, answer,
    # kind, messages) whose value is the teacher name, e.g.
    # "CASE WHEN kind = 'math' THEN 'a' ELSE 'b' END" (stages/lib/routing.py). null = off.
    sql: str | None = None

    def __post_init__(self) -> None:
        _check(
            self.column is None or self.column in ROUTE_COLUMNS,
            "score.route_by.column",
            f"must be one of {'|'.join(ROUTE_COLUMNS)} (got {self.column!r})",
        )
        if self.sql is None:
            return
        _check(
            self.column is None, "score.route_by.sql", "replaces score.route_by.column (set one)"
        )
        _check(not self.map, "score.route_by.map", "is for column routes (the sql gives names)")
        from stages.lib import routing

        routing.check_expression(self.sql)

    @property
    def enabled(self) -> bool:
        return self.column is not None or self.sql is not None


@dataclass
class ScoreConfig:
    # hf | vllm | auto (as in rollout).
    backend: str = "auto"
    # Teacher top-K ids/log-probs stored per token (must be <= the vocabulary size).
    topk: int = 32
    # Also score the behaviour policy (full-vocab entropy and log-prob after the rollout prompt).
    behavior: bool = True
    # Behaviour top-K ids with the teacher's log-probs on them (vOPD student support); 0 = off.
    behavior_topk: int = 0
    # Compute full-vocabulary entropies (teacher and behaviour).
    entropy: bool = True
    # Token budget per forward batch (sequences are length-bucketed to fill it).
    batch_tokens: int = 8192
    # Positions per chunk of the fp32 LM head (bounds memory; 128-256 keeps [chunk, V] in cache).
    chunk_positions: int = 256
    # HF backend: compile each scoring model's decoder with TorchInductor (frozen weights, oneDNN
    # GEMMs, fused elementwise work) and run the head's GEMM through oneDNN on CPU. Faster once
    # the compile (tens of seconds per model, once per run) is paid; costs a second copy of the
    # weights in memory; stored floats differ from the eager path by GEMM rounding (~1e-5 in
    # log-probs). Needs a C++ compiler on CPU (triton on CUDA). docs/BENCHMARKS.md, score.
    compile: bool = False
    # HF backend: run each distinct (model, prefix) once and score all of its responses against
    # its KV cache (the rollout.n samples of a prompt; roles of one model reading one prefix).
    # Stored floats equal the unshared path's to GEMM rounding (<= 1e-5 in log-probs); false runs
    # every prefix ⊕ response row whole. docs/BENCHMARKS.md, prefix-shared scoring.
    share_prefix: bool = True
    # With share_prefix: each layer's attention reads a prefix's keys once for all its responses
    # (split into the prefix part and each row's own, one softmax) instead of a copy per row;
    # the same floats to GEMM rounding. false: the copied cache (the numerics the demo's
    # documented runs were measured with).
    split_attention: bool = True
    # HF backend: models loaded at once. one = a model is dropped before the next one loads (GPU
    # memory: the largest model, not their sum; each shard loads each model once) | all = every
    # model stays loaded (no reloads) | auto = one when a role runs on CUDA, else all (on CPU
    # the fp32 weights are mmapped from their safetensors file: one lowered no peak there).
    resident: str = "auto"
    # Allow an OPD teacher that differs from the SFT teacher (Lightning OPD teacher consistency).
    allow_teacher_mismatch: bool = False
    # Where the HF backend runs the behaviour model: auto (cuda when present, else cpu) | cpu |
    # cuda | cuda:N. The teacher and the reference go to their own keys below (null = this one),
    # e.g. teacher_device=cuda:1 keeps a large teacher off the student's GPU. Two roles naming
    # the same model and prefix share one pass, on the device of the first (teacher, behaviour,
    # ref). The vLLM backend ignores these keys (vLLM places its engines itself); its extra HF
    # passes (entropy, behaviour top-K gathers) do use them.
    device: str = "auto"
    teacher_device: str | None = None
    ref_device: str | None = None
    # Several teachers (`teachers`): which one scores each rollout.
    route_by: RouteBy = field(default_factory=RouteBy)
    # A teacher whose tokenizer differs from the student's: refuse (the default) | align (score
    # it on its own tokenization, aligned by character offsets; docs/CROSS_TOKENIZER.md).
    cross_tokenizer: str = "refuse"
    # vLLM: GPUs each scoring engine spans (tensor parallelism: a teacher too large for one
    # GPU). With launcher.kind=ray each actor needs that many: launcher.num_gpus >= this.
    tensor_parallel_size: int = 1

    def __post_init__(self) -> None:
        _check(self.backend in ("hf", "vllm", "auto"), "score.backend", "must be hf|vllm|auto")
        _check_tensor_parallel(self.tensor_parallel_size, self.backend, "score")
        _check(
            self.cross_tokenizer in ("refuse", "align"),
            "score.cross_tokenizer",
            "must be refuse|align",
        )
        _check_device(self.device, "score.device")
        _check_device(self.teacher_device, "score.teacher_device", nullable=True)
        _check_device(self.ref_device, "score.ref_device", nullable=True)
        _check(self.topk >= 1, "score.topk", "must be >= 1")
        _check(self.behavior_topk >= 0, "score.behavior_topk", "must be >= 0")
        _check(self.batch_tokens >= 1, "score.batch_tokens", "must be >= 1")
        _check(self.chunk_positions >= 1, "score.chunk_positions", "must be >= 1")
        _check(isinstance(self.compile, bool), "score.compile", "must be true|false")
        _check(isinstance(self.share_prefix, bool), "score.share_prefix", "must be true|false")
        _check(
            isinstance(self.split_attention, bool), "score.split_attention", "must be true|false"
        )
        _check(self.resident in ("one", "all", "auto"), "score.resident", "must be one|all|auto")


@dataclass
class SelectRule:
    # A policy: the name of a SQL file in stages/sql_policies/ (all, entropy, tip_q3, ...).
    policy: str = "all"
    # Its parameters (bound into the SQL); see the header of the SQL file.
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # The select stage checks each policy's own parameters; here what holds for every policy:
        # the policy exists, parameters are finite scalars (they are bound into the SQL).
        if not self.policy.endswith(".sql"):  # a user's own SQL file is checked by select
            known = sorted(p.stem for p in POLICY_DIR.glob("*.sql") if p.stem != "examples")
            if self.policy not in known:
                raise UserError(
                    f"unknown selection policy {self.policy!r}",
                    "select.rules[].policy",
                    f"use one of {known}{_closest(self.policy, known)} or a path to a .sql file",
                )
        for k, v in self.params.items():
            _check(
                v is None or isinstance(v, bool | int | float | str),
                f"select.rules[].params.{k}",
                f"must be a number, string, boolean or null (got {v!r})",
            )
            _check(_finite_value(v), f"select.rules[].params.{k}", f"must be finite (got {v!r})")


@dataclass
class SelectConfig:
    # Output name: selected/<name>/. Several selections of one run coexist.
    name: str = "all"
    # Policies composed by the product of their weights (a mask is a 0/1 weight).
    rules: list[SelectRule] = field(default_factory=lambda: [SelectRule()])
    # Rows per output shard.
    rows_per_shard: int = 4096
    # Rows per Parquet row group: the unit the trainer shuffles and strides over ranks (small =
    # better mixing of neighbouring prompts; each row is one sequence).
    row_group_rows: int = 64
    # DuckDB memory limit (it spills to disk beyond it) and threads. 1GB keeps the stage's peak
    # RSS under 2 GiB on 50M tokens (scripts/bench_select_scale.py; 4GB peaked above 4 GiB).
    memory_limit: str = "1GB"
    threads: int = 2

    def __post_init__(self) -> None:
        check_name(self.name, "select.name")
        _check(len(self.rules) >= 1, "select.rules", "needs at least one rule")
        _check(self.rows_per_shard >= 1, "select.rows_per_shard", "must be >= 1")
        _check(self.row_group_rows >= 1, "select.row_group_rows", "must be >= 1")
        _check(self.threads >= 1, "select.threads", "must be >= 1")


@dataclass
class EvalConfig:
    # Eval set names from data.eval_sets (empty = all).
    sets: list[str] = field(default_factory=list)
    # Checkpoints to evaluate: names under checkpoints/ or paths (empty = base + every trained one).
    checkpoints: list[str] = field(default_factory=list)
    # Greedy decoding length and batch size.
    max_new_tokens: int = 32
    batch_size: int = 128
    # Sampled pass@k (0 = off) at this temperature.
    pass_k: int = 0
    temperature: float = 1.0
    # Held-out prompts for mean per-token reverse KL to the teacher (first eval set if null).
    kl_set: str | None = None
    # Prompts used for the KL estimate.
    kl_prompts: int = 64
    # How an answer is graded: words | exact | contains | normalised | regex (stages/lib/grading.py).
    match: str = "words"
    # Save every greedy generation (text and ids) under eval/generations/<checkpoint>/<set>.parquet.
    save_generations: bool = True

    def __post_init__(self) -> None:
        from stages.lib.grading import MODES

        _check_finite(self, "eval")
        _check(self.match in MODES, "eval.match", f"must be one of {'|'.join(MODES)}")
        _check(self.max_new_tokens >= 1, "eval.max_new_tokens", "must be >= 1")
        _check(self.batch_size >= 1, "eval.batch_size", "must be >= 1")
        _check(self.pass_k >= 0, "eval.pass_k", "must be >= 0 (0 = off)")
        _check(self.temperature > 0, "eval.temperature", "must be > 0")
        _check(self.kl_prompts >= 1, "eval.kl_prompts", "must be >= 1")


@dataclass
class ReportConfig:
    # Rollouts sampled into the HTML token browser.
    max_rollouts: int = 200
    # Teacher top-k entries shown per token.
    show_topk: int = 8

    def __post_init__(self) -> None:
        _check(self.max_rollouts >= 0, "report.max_rollouts", "must be >= 0")
        _check(self.show_topk >= 0, "report.show_topk", "must be >= 0")
