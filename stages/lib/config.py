"""Typed configs: dataclasses registered in Hydra's ConfigStore, composed from ``conf/``.

Every stage composes the same tree (``conf/base.yaml``): ``student``/``teacher``/``ref`` (one
``model`` group in three roles), ``data``, ``rollout``, ``score``, ``select``, ``loss``, ``train``,
``eval``, ``sft``, ``report``, ``pipeline`` and ``experiment`` files that pin whole runs. The
config is closed: an unknown key fails at compose time in every form (``key=``, ``+key=``,
``++key=``), and every group checks its values in ``__post_init__`` (finite numbers, known loss
names and loss arguments, safe names for everything that becomes a path), so a bad value is one
``error:`` line before any model loads. Library code receives the typed ``Config``
(``OmegaConf.to_object``), never a raw dict, so it does not need ``cfg.get("k", default)``.

There is one way to build a config: :func:`compose` (what the command line does, see
``stages/lib/entry.py``). Configs the pipeline derives (variants, rounds, the SFT training) are
composed again from the same primary config and overrides plus a few more (:func:`derive`), so
they follow exactly the command line's rules; their names are computed here, in one place.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import math
import re
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf

from stages.lib.errors import UserError
from stages.lib.layout import RunLayout, check_name

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
POLICY_DIR = Path(__file__).resolve().parents[1] / "sql_policies"  # the selection SQL files
STAGES = ("sft", "rollout", "score", "select", "train", "eval", "report")


def _check(ok: bool, key: str, what: str) -> None:
    if not ok:
        raise UserError(f"impossible config value: {key} {what}", "config", f"fix {key}")


DEVICE_RE = re.compile(r"auto|cpu|cuda(:\d+)?")


def _check_device(value: str | None, key: str, nullable: bool = False) -> None:
    """A device key: auto | cpu | cuda | cuda:N (null too where ``nullable``)."""
    if value is None and nullable:
        return
    ok = isinstance(value, str) and DEVICE_RE.fullmatch(value) is not None
    _check(ok, key, f"must be auto|cpu|cuda|cuda:N{'|null' if nullable else ''} (got {value!r})")


def _closest(word: str, options: Sequence[str], n: int = 3) -> str:
    """``" (closest: a, b)"`` for the options nearest ``word``, or "" when none is near."""
    near = difflib.get_close_matches(word, list(options), n=n, cutoff=0.5)
    return f" (closest: {', '.join(near)})" if near else ""


def _interpolation(v: Any) -> bool:
    """An unresolved ``${...}`` default (the schema's own defaults, before composition)."""
    return isinstance(v, str) and v.startswith("${") and v.endswith("}")


def _finite_value(v: Any) -> bool:
    """False for a NaN/inf float anywhere inside ``v`` (lists and dicts included)."""
    if isinstance(v, float):
        return math.isfinite(v)
    if isinstance(v, list | tuple):
        return all(_finite_value(x) for x in v)
    if isinstance(v, dict):
        return all(_finite_value(x) for x in v.values())
    return True


def _check_finite(obj: Any, group: str) -> None:
    """Every number of a config group is finite (lr=inf or nan would train into NaN weights)."""
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if not dataclasses.is_dataclass(v):  # nested groups check themselves
            _check(_finite_value(v), f"{group}.{f.name}", f"must be finite (got {v!r})")


def _check_tensor_parallel(size: Any, backend: str, group: str) -> None:
    """A vLLM engine spans ``size`` GPUs (an int >= 1); the HF backend runs on one device."""
    key = f"{group}.tensor_parallel_size"
    _check(isinstance(size, int) and not isinstance(size, bool) and size >= 1, key, "must be >= 1")
    _check(size == 1 or backend != "hf", key, f"is vLLM's: set {group}.backend=vllm, or 1")


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


# The loss functions' own signatures are the schema of a loss term: the keyword arguments after
# the ones every loss takes (the trainer passes vocab_size and temperature itself).
_LOSS_COMMON_ARGS = ("vocab_size", "temperature")


def loss_arguments(name: str) -> dict[str, inspect.Parameter]:
    """The keyword arguments ``loss=<name>`` accepts, from ``stages.lib.losses.LOSSES``."""
    from stages.lib import losses  # torch: imported when a loss is actually configured

    sig = inspect.signature(losses.LOSSES[name], eval_str=True)
    return {
        k: p
        for k, p in sig.parameters.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY and k not in _LOSS_COMMON_ARGS
    }


def _fits(value: Any, annotation: Any) -> bool:
    """Does ``value`` (from YAML) fit a loss argument's annotation (bool/int/float/str/None,
    unions, Literal)? Unknown annotations accept anything."""
    if annotation is inspect.Parameter.empty or annotation is Any:
        return True
    origin = typing.get_origin(annotation)
    if origin is typing.Union or isinstance(annotation, types.UnionType):
        return any(_fits(value, a) for a in typing.get_args(annotation))
    if origin is typing.Literal:
        return value in typing.get_args(annotation)
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if annotation in (int, str):
        return isinstance(value, annotation) and not isinstance(value, bool)
    return True


def check_loss_term(name: str, kwargs: dict[str, Any]) -> None:
    """A UserError for an unknown loss name, an unknown keyword or a value of the wrong type."""
    from stages.lib import losses

    where = f"loss.terms (loss {name!r})"
    if name not in losses.LOSSES:
        known = sorted(losses.LOSSES)
        raise UserError(
            f"unknown loss {name!r}",
            where,
            f"use one of {known}{_closest(name, known)} (stages/lib/losses.py)",
        )
    params = loss_arguments(name)
    for k, v in kwargs.items():
        if k not in params:
            raise UserError(
                f"unknown argument {k!r} for loss {name!r}",
                where,
                f"its arguments are {sorted(params)}{_closest(k, list(params))}",
            )
        ann = params[k].annotation
        _check(_fits(v, ann), f"loss.terms[].kwargs.{k}", f"must be {_ann_str(ann)} (got {v!r})")
        _check(_finite_value(v), f"loss.terms[].kwargs.{k}", f"must be finite (got {v!r})")


def _ann_str(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


@dataclass
class LossTerm:
    # Loss name: opd_k1 | vopd | exopd | topk_fkl | topk_rkl | gkd_jsd | tropd | sft.
    name: str = "opd_k1"
    # Weight of this term in the sum.
    weight: float = 1.0
    # Loss-specific arguments (is_clip, support, lam, tail_bucket, form, beta, tau, outlier).
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check(math.isfinite(self.weight), "loss.terms[].weight", "must be finite")
        check_loss_term(self.name, self.kwargs)


@dataclass
class LossConfig:
    # Label used in run names and reports.
    name: str = "opd_k1"
    # Terms summed with their weights (composition of losses).
    terms: list[LossTerm] = field(default_factory=lambda: [LossTerm()])
    # Temperature of the student/teacher distributions inside the loss.
    temperature: float = 1.0

    def __post_init__(self) -> None:
        _check_finite(self, "loss")
        _check(self.temperature > 0, "loss.temperature", "must be > 0")
        _check(len(self.terms) >= 1, "loss.terms", "needs at least one term")


@dataclass
class LoraConfig:
    # LoRA rank; 0 = full fine-tuning.
    r: int = 0
    # LoRA alpha and dropout.
    alpha: int = 16
    dropout: float = 0.0
    # Module names to adapt.
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"]
    )
    # Save merged weights (a plain HF checkpoint) or the adapter only.
    save_merged: bool = True

    def __post_init__(self) -> None:
        _check(self.r >= 0, "train.lora.r", "must be >= 0")
        _check(self.alpha > 0, "train.lora.alpha", "must be > 0")
        _check(0 <= self.dropout < 1, "train.lora.dropout", "must be in [0, 1)")


@dataclass
class TrainConfig:
    # Run name: checkpoints/<name>/ and metrics; several trainings of one run dir coexist.
    name: str = "${loss.name}-${select.name}"
    # Selection to train on: selected/<selection>/ (default: the current select.name).
    selection: str = "${select.name}"
    # Initial weights: null = student.path (or the SFT checkpoint when the run has one).
    init: str | None = None
    # Passes over the selected shards; max_steps caps optimizer steps (null = no cap).
    epochs: int = 1
    max_steps: int | None = None
    # Token budget of one micro-batch (prompt + response tokens, padded), and micro-batches per step.
    micro_batch_tokens: int = 4096
    grad_accum: int = 1
    # AdamW.
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    # Schedule: warmup steps then cosine (to min_lr_ratio * lr) or constant.
    warmup_steps: int = 0
    schedule: str = "cosine"
    min_lr_ratio: float = 0.1
    # Gradient clipping by global norm (0 = off).
    grad_clip: float = 1.0
    # Shuffle row groups per epoch (seeded).
    shuffle: bool = True
    # Log metrics every N steps; save a resumable checkpoint every N steps (null = end only).
    log_every: int = 10
    save_every: int | None = None
    # Continue from the latest checkpoint of this run name when one exists.
    resume: bool = True
    # Standard (online) OPD baseline: live teacher forward pass in the loop instead of cached values.
    online: bool = False
    # auto | cpu | cuda.
    device: str = "auto"
    # Shard the model with FSDP2 under torchrun (else DDP when world size > 1).
    fsdp: bool = False
    # Positions per chunk of the student's LM head inside the loss; null = the most that fit
    # train.loss_memory_mib (the loss's working set is 2 x [chunk, V] fp32).
    chunk_positions: int | None = None
    # Memory budget of the loss's [chunk, V] working set, in MiB (used when chunk_positions is
    # null): at V = 151,936 the default 512 gives 441 positions per chunk.
    loss_memory_mib: int = 512
    # Row groups prefetched by the background loader thread.
    prefetch: int = 2
    # Experiment trackers, each fed the metrics.jsonl rows and the resolved config:
    # tensorboard (events in train/<name>/tb), wandb, mlflow (extras: pip install distillery[trackers]).
    trackers: list[str] = field(default_factory=lambda: ["tensorboard"])
    # W&B mode (offline writes train/<name>/wandb, `wandb sync` uploads it later; online needs a login)
    # and the W&B project / MLflow experiment name.
    wandb_mode: str = "offline"
    tracker_project: str = "distillery"
    # MLflow tracking URI; null = a file store in train/<name>/mlruns.
    mlflow_tracking_uri: str | None = None
    # Whole-model activation checkpointing: recompute each decoder layer in backward (less memory,
    # ~1 more forward of compute).
    gradient_checkpointing: bool = False
    # auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16 (autocast on CPU and CUDA) |
    # bf16_params (bf16 parameters, fp32 master weights in the optimizer). The LM head, the
    # log-softmax and the loss are fp32 in every mode.
    precision: str = "auto"
    # Keep the newest N step checkpoints (older step-* folders are deleted; null = keep all).
    keep_last: int | None = 3
    # Token weights read from the selection must lie in [0, max_weight] (else the run stops).
    max_weight: float = 1e3
    # Micro-batches with a non-finite loss that may be skipped (and counted) before the run stops;
    # 0 = stop at the first one. Single process only.
    max_bad_micro_batches: int = 0
    # Load pickled weights (pytorch_model.bin) for init/teacher: a pickle can run code on load.
    allow_pickled_weights: bool = False
    # Optional LoRA adapters.
    lora: LoraConfig = field(default_factory=LoraConfig)

    def __post_init__(self) -> None:
        _check_finite(self, "train")  # first: lr=nan fails every comparison below
        _check(self.epochs >= 1, "train.epochs", "must be >= 1")
        _check(self.grad_accum >= 1, "train.grad_accum", "must be >= 1")
        _check(self.micro_batch_tokens >= 1, "train.micro_batch_tokens", "must be >= 1")
        _check(self.lr > 0 and math.isfinite(self.lr), "train.lr", "must be finite and > 0")
        _check(self.schedule in ("cosine", "constant"), "train.schedule", "must be cosine|constant")
        if not _interpolation(self.name):  # the schema's default, resolved at compose
            check_name(self.name, "train.name")  # checkpoints/<name>/: overwrite deletes it
        if not _interpolation(self.selection):
            check_name(self.selection, "train.selection")
        _check(self.max_steps is None or self.max_steps >= 1, "train.max_steps", "must be >= 1")
        _check(self.weight_decay >= 0, "train.weight_decay", "must be >= 0")
        _check(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            "train.betas",
            "must be two numbers in [0, 1)",
        )
        _check(self.warmup_steps >= 0, "train.warmup_steps", "must be >= 0")
        _check(0 <= self.min_lr_ratio <= 1, "train.min_lr_ratio", "must be in [0, 1]")
        _check(self.grad_clip >= 0, "train.grad_clip", "must be >= 0 (0 = off)")
        _check(self.log_every >= 1, "train.log_every", "must be >= 1")
        _check(self.save_every is None or self.save_every >= 1, "train.save_every", "must be >= 1")
        _check(
            self.chunk_positions is None or self.chunk_positions >= 1,
            "train.chunk_positions",
            "must be >= 1 (or null: from train.loss_memory_mib)",
        )
        _check(self.loss_memory_mib >= 1, "train.loss_memory_mib", "must be >= 1 (MiB)")
        _check(self.prefetch >= 0, "train.prefetch", "must be >= 0")
        for t in self.trackers:
            _check(t in TRACKERS, "train.trackers", f"entries must be among {list(TRACKERS)}")
        _check(
            self.wandb_mode in ("offline", "online"), "train.wandb_mode", "must be offline|online"
        )
        _check(self.precision in PRECISIONS, "train.precision", f"must be one of {PRECISIONS}")
        _check(
            not (self.precision == "bf16_params" and self.lora.r > 0),
            "train.precision=bf16_params",
            "is for full fine-tuning (LoRA keeps the base frozen; use precision=bf16)",
        )
        _check(self.keep_last is None or self.keep_last >= 1, "train.keep_last", "must be >= 1")
        _check(self.max_weight > 0, "train.max_weight", "must be > 0")
        _check(self.max_bad_micro_batches >= 0, "train.max_bad_micro_batches", "must be >= 0")


TRACKERS = ("tensorboard", "wandb", "mlflow")
PRECISIONS = ("auto", "fp32", "bf16", "bf16_params")


@dataclass
class SftConfig:
    # Run the SFT stage (teacher answers the prompts, student trained with cross-entropy).
    enabled: bool = False
    # Teacher responses per prompt, and their sampling temperature (0 = greedy).
    n: int = 1
    temperature: float = 0.0
    # SFT optimisation (the rest of the train group applies).
    epochs: int = 3
    lr: float = 1e-3

    def __post_init__(self) -> None:
        _check_finite(self, "sft")
        _check(self.n >= 1, "sft.n", "must be >= 1")
        _check(self.temperature >= 0, "sft.temperature", "must be >= 0 (0 = greedy)")
        _check(self.epochs >= 1, "sft.epochs", "must be >= 1")
        _check(self.lr > 0, "sft.lr", "must be > 0")


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


@dataclass
class TrainVariant:
    # A training run of the pipeline on the cached shards: loss, select and train overrides.
    name: str = MISSING
    overrides: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        check_name(self.name, "pipeline.variants[].name")  # it becomes the variant's train.name
        for ov in self.overrides:
            _check(
                "=" in ov,
                f"pipeline.variants[{self.name}].overrides",
                f"entries are key=value or group=option (got {ov!r})",
            )


ADAPTIVE_METRICS = ("staleness", "rkl_k1")  # trainer metrics a round decision can read


@dataclass
class AdaptiveConfig:
    # Rounds of fresh rollouts started on demand: after a round's training, the pipeline reads the
    # trainer's metric from that round's metrics.jsonl and starts the next round (rollout from the
    # round's final checkpoint -> score -> select -> train) when |value| >= threshold.
    # The metric: staleness (mean log pi_theta - log pi_b on the trained tokens: how far the
    # student has moved from the policy that sampled its data) | rkl_k1 (the k1 estimate of
    # KL(pi_theta || teacher) on those tokens).
    metric: str = "staleness"
    # Start a new round when |metric| >= threshold (in nats per token; >= 0).
    threshold: float = 0.05
    # Most rounds in all, round 1 included; 1 = off (no adaptive rounds; pipeline.rounds applies).
    max_rounds: int = 1
    # The value is the mean over the last `window` logged rows of the round's training.
    window: int = 4

    def __post_init__(self) -> None:
        _check_finite(self, "pipeline.adaptive")
        _check(
            self.metric in ADAPTIVE_METRICS,
            "pipeline.adaptive.metric",
            f"must be {'|'.join(ADAPTIVE_METRICS)} (got {self.metric!r})",
        )
        _check(self.threshold >= 0, "pipeline.adaptive.threshold", "must be >= 0")
        _check(self.max_rounds >= 1, "pipeline.adaptive.max_rounds", "must be >= 1")
        _check(self.window >= 1, "pipeline.adaptive.window", "must be >= 1")

    @property
    def enabled(self) -> bool:
        return self.max_rounds > 1


@dataclass
class PipelineConfig:
    # Stages in order (sft runs only when sft.enabled).
    stages: list[str] = field(
        default_factory=lambda: ["sft", "rollout", "score", "select", "train", "eval", "report"]
    )
    # Extra training runs on the same cached log-probs (ablations), each "key=value" overrides.
    variants: list[TrainVariant] = field(default_factory=list)
    # Rounds of fresh rollouts: round r >= 2 samples with round r-1's final checkpoint, scores with
    # the same teacher and reference, and trains on from it, all under run_dir/round<r>/ (its
    # checkpoint is checkpoints/<train.name>-r<r>). 1 = one offline pass (Lightning OPD).
    rounds: int = 1
    # Rounds started when the trainer's staleness (or KL) passes a threshold, instead of a fixed
    # number (pipeline.adaptive.max_rounds > 1 turns it on; then pipeline.rounds must stay 1).
    adaptive: AdaptiveConfig = field(default_factory=AdaptiveConfig)

    def __post_init__(self) -> None:
        _check(self.rounds >= 1, "pipeline.rounds", "must be >= 1")
        _check(
            self.rounds == 1 or not self.adaptive.enabled,
            "pipeline.rounds",
            "must be 1 when pipeline.adaptive.max_rounds > 1 (one round schedule: fixed or adaptive)",
        )
        for st in self.stages:
            if st not in STAGES:
                raise UserError(
                    f"unknown stage {st!r} in pipeline.stages",
                    "config",
                    f"use stages from {list(STAGES)}{_closest(st, STAGES)}",
                )
        _check(len(set(self.stages)) == len(self.stages), "pipeline.stages", "lists a stage twice")
        names = [v.name for v in self.variants]
        _check(len(set(names)) == len(names), "pipeline.variants", "names must be unique")


@dataclass
class Source:
    # How a config was composed (filled in by compose(); a value set by hand is replaced).
    # Primary config: conf/<stage>.yaml, or --config-name.
    config_name: str = ""
    # The overrides, in order.
    overrides: list[str] = field(default_factory=list)
    # Extra config folders (--config-dir), absolute; searched after conf/.
    config_dirs: list[str] = field(default_factory=list)


@dataclass
class Config:
    # Which stage this config is for (set by each primary config file).
    stage: str = "pipeline"
    # Every output of the run lives under this directory (rollouts/, tokens/, selected/, ...).
    run_dir: str = "runs/default"
    # Global seed (sampling, selection, shuffling, init).
    seed: int = 0
    # Replace outputs written by a different config instead of refusing.
    overwrite: bool = False
    # Show tracebacks for user errors.
    debug: bool = False
    # The model being trained, the teacher, and an optional reference model.
    student: ModelConfig = field(default_factory=ModelConfig)
    teacher: ModelConfig = field(default_factory=ModelConfig)
    # Several teachers for the score stage, by name (each scores the rollouts score.route_by
    # sends to it; one model resident at a time). Empty = `teacher` alone scores everything.
    # (Typed as plain mappings so that `teachers={a: {path: ...}}` works on the command line;
    # __post_init__ turns each into a checked ModelConfig.)
    teachers: dict[str, Any] = field(default_factory=dict)
    ref: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    # Where rollout and score run their shards: this process, or Ray actors.
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    select: SelectConfig = field(default_factory=SelectConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sft: SftConfig = field(default_factory=SftConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    # How this config was composed: derived configs (pipeline variants and rounds, the SFT
    # training) are composed again from it; manifests keep it as provenance.
    source: Source = field(default_factory=Source)

    def __post_init__(self) -> None:
        RunLayout.of(self.run_dir)  # not empty (an empty run_dir writes into the cwd)
        self._check_teachers()
        _check(
            self.launcher.kind == "local" or self.worker.count == 1,
            "launcher.kind=ray",
            "takes the whole shard plan: leave worker.index/worker.count at 0/1",
        )
        for group in ("rollout", "score"):  # a Ray actor holds one engine and its GPUs
            tp = getattr(self, group).tensor_parallel_size
            _check(
                self.launcher.kind == "local" or tp <= max(self.launcher.num_gpus, 1),
                f"{group}.tensor_parallel_size={tp}",
                f"needs launcher.num_gpus >= {tp} (each Ray actor's engine spans {tp} GPUs)",
            )
        ad = self.pipeline.adaptive
        _check(
            not (ad.enabled and ad.metric == "staleness" and not self.score.behavior),
            "pipeline.adaptive.metric=staleness",
            "needs score.behavior=true (staleness is measured against the behaviour log-prob)",
        )
        self._check_eval_sets()
        for v in self.pipeline.variants:
            _check(
                v.name != self.train.name,
                "pipeline.variants[].name",
                f"{v.name!r} is the main training's train.name (its checkpoints would collide)",
            )

    def _check_teachers(self) -> None:
        """`teachers` and `score.route_by` go together, and every route names a teacher."""
        rb, names = self.score.route_by, sorted(self.teachers)
        keys = [f.name for f in dataclasses.fields(ModelConfig)]
        for name, m in list(self.teachers.items()):
            check_name(name, "teachers key")  # it becomes the tokens' teacher_id
            if not isinstance(m, ModelConfig):
                bad = [k for k in (m or {}) if k not in keys] if isinstance(m, dict) else [m]
                _check(not bad, f"teachers.{name}", f"takes keys {keys} (got {bad})")
                self.teachers[name] = m = ModelConfig(**m)
            _check(m.path is not None, f"teachers.{name}.path", "must be set")
        if not self.teachers:
            _check(rb.column is None, "score.route_by.column", "needs teachers (several models)")
            _check(rb.sql is None, "score.route_by.sql", "needs teachers (several models)")
            return
        _check(rb.enabled, "score.route_by.column", "must be set with teachers (or route_by.sql)")
        for value, name in [*rb.map.items(), ("(default)", rb.default)]:
            if name is not None and name not in self.teachers:
                raise UserError(
                    f"score.route_by sends {value!r} to teacher {name!r}, which is not in teachers",
                    "score.route_by",
                    f"use one of {names}{_closest(str(name), names)}",
                )

    def _check_eval_sets(self) -> None:
        """eval.sets and eval.kl_set name data.eval_sets (checkable once eval sets are given)."""
        known = list(self.data.eval_sets)
        if not known:
            return  # the eval stage says that there is nothing to evaluate
        for n in self.eval.sets:
            if n not in known:
                raise UserError(
                    f"eval set {n!r} is not in data.eval_sets",
                    "eval.sets",
                    f"choose from {sorted(known)}{_closest(n, known)}",
                )
        pool = self.eval.sets or known
        if self.eval.kl_set is not None and self.eval.kl_set not in pool:
            raise UserError(
                f"eval.kl_set={self.eval.kl_set!r} is not among the eval sets",
                "eval.kl_set",
                f"set eval.kl_set to one of {sorted(pool)}{_closest(self.eval.kl_set, pool)} "
                "or null (the first eval set)",
            )


def register() -> None:
    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)


register()


# ------------------------------------------------------------------------- the closed schema
def _unwrap(t: Any) -> Any:
    """``X | None`` -> ``X``."""
    if typing.get_origin(t) is typing.Union or isinstance(t, types.UnionType):
        args = [a for a in typing.get_args(t) if a is not type(None)]
        return args[0] if len(args) == 1 else t
    return t


def _schema_miss(parts: list[str]) -> tuple[list[str], list[str]] | None:
    """None when the dotted key ``parts`` names a key of ``Config`` (anything below a dict-typed
    key is free), else (the valid prefix, the valid keys at the point where it left the schema)."""
    t: Any = Config
    for i, part in enumerate(parts):
        t = _unwrap(t)
        if dataclasses.is_dataclass(t):
            hints = typing.get_type_hints(t)
            if part not in hints:
                return parts[:i], list(hints)
            t = hints[part]
        elif typing.get_origin(t) is list:
            if not part.isdigit():
                return parts[:i], []
            t = typing.get_args(t)[0]
        elif typing.get_origin(t) is dict or t in (dict, Any):
            return None
        else:  # a scalar has no keys below it
            return parts[:i], []
    return None


def _all_keys(t: Any = Config, prefix: str = "") -> list[str]:
    out = []
    for name, ft in typing.get_type_hints(t).items():
        key = f"{prefix}{name}"
        out.append(key)
        if dataclasses.is_dataclass(_unwrap(ft)):
            out += _all_keys(_unwrap(ft), f"{key}.")
    return out


def unknown_key_error(key: str, where: str) -> UserError:
    """The one-line error for a key the schema does not have, with the closest valid keys."""
    miss = _schema_miss(key.split("."))
    prefix, siblings = miss if miss else ([], [])
    near = difflib.get_close_matches(key, _all_keys(), n=3, cutoff=0.6)
    if not near and siblings:  # the nearest keys of the same group, however far
        last = key.split(".")[len(prefix)]
        near = [".".join([*prefix, s]) for s in difflib.get_close_matches(last, siblings, 3, 0)]
    hint = f"closest valid keys: {', '.join(near)}; " if near else ""
    return UserError(
        f"unknown config key '{key}'",
        where,
        f"{hint}--cfg job prints every key (the config is closed: +key and ++key do not add keys)",
    )


def _unknown_in_tree(node: Any, prefix: str = "") -> str | None:
    """The first key of a composed tree that its dataclass does not have (+key/++key add them)."""
    if isinstance(node, DictConfig):
        t = OmegaConf.get_type(node)
        fields = {f.name for f in dataclasses.fields(t)} if dataclasses.is_dataclass(t) else None
        for k, v in node.items_ex(resolve=False):
            if fields is not None and k not in fields:
                return f"{prefix}{k}"
            bad = _unknown_in_tree(v, f"{prefix}{k}.")
            if bad:
                return bad
    elif isinstance(node, ListConfig):
        for j, v in enumerate(node._iter_ex(resolve=False)):
            bad = _unknown_in_tree(v, f"{prefix}{j}.")
            if bad:
                return bad
    return None


def is_config_group(key: str, search_dirs: Sequence[Path]) -> bool:
    """Is ``key`` a config group (a folder of option files) in one of the config folders?"""
    return any((Path(d) / key).is_dir() for d in search_dirs)


def _search_dirs(overrides: Sequence[str], config_dirs: Sequence[str]) -> list[Path]:
    """conf/, the extra config folders and the file:// folders of a hydra.searchpath override."""
    dirs = [CONF_DIR, *map(Path, config_dirs)]
    for ov in overrides:
        key, _, value = ov.lstrip("+").partition("=")
        if key == "hydra.searchpath":
            for entry in re.findall(r"file://([^,\]'\"]+)", value):
                dirs.append(Path(entry.strip()))
    return dirs


def _one_line(e: BaseException) -> str:
    """Hydra's and OmegaConf's multi-line messages as one line (option lists joined by commas,
    the config search path left out)."""
    parts: list[str] = []
    for msg in (str(e), str(e.__cause__ or "")):
        for raw in msg.splitlines():
            if raw.startswith("Config search path"):
                break
            line = raw.strip()
            if not line:
                continue
            if raw.startswith("\t") and parts:  # an option of the list above
                parts[-1] += (" " if parts[-1].endswith(":") else ", ") + line
            else:
                parts.append(line)
    return "; ".join(parts)[:500]


def check_override_keys(
    overrides: Sequence[str], config_dirs: Sequence[str] = (), where: str = "command line"
) -> None:
    """Refuse an override of a key the schema does not have, in every form (``key=``, ``+key=``,
    ``++key=``, ``~key``), before Hydra composes (which would add a ``+key`` silently)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except HydraException as e:
        raise UserError(
            f"malformed override: {_one_line(e)}",
            where,
            "write key=value or group=option (quote a value with spaces: key='a b')",
        ) from None
    dirs = _search_dirs(overrides, config_dirs)
    for o in parsed:
        key = o.key_or_group
        if key.split(".")[0] in ("hydra",) or key.startswith("hydra/"):
            continue  # Hydra's own settings
        if o.package is not None or is_config_group(key, dirs):
            continue  # group=option: Hydra says when the option does not exist
        if _schema_miss(key.split(".")) is not None:
            raise unknown_key_error(key, f"{where}: {o.input_line}")


# --------------------------------------------------------------------------------- composing
def to_config(cfg: DictConfig, where: str = "config") -> Config:
    """Resolve interpolations and turn a composed DictConfig into the typed ``Config`` (which
    runs every group's ``__post_init__`` checks)."""
    from omegaconf.errors import OmegaConfBaseException

    bad = _unknown_in_tree(cfg)
    if bad:
        raise unknown_key_error(bad, where)
    try:
        return OmegaConf.to_object(cfg)  # type: ignore[return-value]
    except OmegaConfBaseException as e:
        if isinstance(e.__cause__, UserError):
            raise e.__cause__ from None
        raise UserError(f"invalid config: {_one_line(e)}", where, "fix the value named") from None


def as_dict(cfg: Config) -> dict:
    """A plain, JSON-able dict of the resolved config (stored in manifests). Plain dataclass
    conversion: a value holding ``${`` (a path, a template) is text, not an interpolation."""
    return dataclasses.asdict(cfg)


def absolute_dirs(config_dirs: Sequence[str | Path], where: str = "--config-dir") -> list[str]:
    """Extra config folders as absolute paths (they must exist)."""
    out = []
    for d in config_dirs:
        p = Path(d).expanduser().resolve()
        if not p.is_dir():
            raise UserError(f"config folder {str(d)!r} not found", where, "give an existing folder")
        out.append(str(p))
    return out


def compose_dict(
    config_name: str,
    overrides: Sequence[str],
    config_dirs: Sequence[str] = (),
    where: str = "command line",
) -> DictConfig:
    """Hydra's composition of ``<config_name>.yaml`` + overrides, over ``conf/`` and the extra
    config folders (searched after ``conf/``, as ``--config-dir`` does); errors as one line."""
    from hydra import compose as hydra_compose
    from hydra import version
    from hydra._internal.hydra import Hydra
    from hydra._internal.utils import create_config_search_path
    from hydra.core.config_search_path import SearchPathQuery
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    gh = GlobalHydra.instance()
    outer = gh.hydra if gh.is_initialized() else None  # a running Hydra app keeps its own
    gh.clear()
    try:
        version.setbase("1.3")
        csp = create_config_search_path(str(CONF_DIR))
        for d in config_dirs:  # where Hydra's --config-dir puts a folder: before the schema
            csp.prepend("command-line", f"file://{d}", anchor=SearchPathQuery(provider="schema"))
        Hydra.create_main_hydra2(task_name="distillery", config_search_path=csp)
        return hydra_compose(config_name=config_name, overrides=list(overrides))
    except UserError:
        raise
    except (HydraException, OmegaConfBaseException, ValueError) as e:
        raise UserError(
            f"invalid config override: {_one_line(e)}",
            where,
            "check the key names and values (--cfg job prints the whole config)",
        ) from None
    finally:
        gh.clear()
        if outer is not None:
            gh.initialize(outer)


def compose(
    config_name: str,
    overrides: Sequence[str] | None = None,
    *,
    config_dirs: Sequence[str | Path] = (),
    where: str = "command line",
) -> Config:
    """Compose a config exactly as ``python -m stages.<config_name> <overrides>`` does (the
    entry points, tests, the pipeline, notebooks). ``config_dirs``: extra config folders, as
    ``--config-dir``. Every failure is a UserError."""
    ovs, dirs = list(overrides or []), absolute_dirs(config_dirs)
    check_override_keys(ovs, dirs, where)
    cfg = to_config(compose_dict(config_name, ovs, dirs, where), where)
    cfg.source = Source(config_name=config_name, overrides=ovs, config_dirs=dirs)
    return cfg


# ----------------------------------------------------------------------------- derived configs
_PLAIN = re.compile(r"^[A-Za-z0-9_./\-+:@]+$")


def quote(value: Any) -> str:
    """``value`` as an override value that Hydra reads back as the same string."""
    s = str(value)
    if _PLAIN.match(s):
        return s
    return "'" + s.replace("'", "\\'").replace("${", "\\${") + "'"


def derive(cfg: Config, overrides: Sequence[str], where: str) -> Config:
    """``cfg`` composed again with more overrides appended (later ones win), exactly as if they
    had been given on its command line: group options, interpolations such as ``train.name``'s
    default ``${loss.name}-${select.name}`` and every check apply as they do there."""
    if not cfg.source.config_name:
        raise UserError(
            "this config was not built by compose(), so nothing can be derived from it",
            where,
            "build it with stages.lib.config.compose(<stage>, [overrides])",
        )
    src = cfg.source
    _check_unchanged(
        cfg, compose(src.config_name, src.overrides, config_dirs=src.config_dirs), where
    )
    return compose(
        src.config_name, [*src.overrides, *overrides], config_dirs=src.config_dirs, where=where
    )


def _first_difference(a: Any, b: Any, prefix: str = "") -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            d = _first_difference(a.get(k), b.get(k), f"{prefix}{k}.")
            if d:
                return d
        return None
    return None if a == b else prefix.rstrip(".")


def _check_unchanged(cfg: Config, recomposed: Config, where: str) -> None:
    """A config edited after compose() (``cfg.x = ...``, ``dataclasses.replace``) would lose the
    edit in everything derived from it: refuse instead."""
    key = _first_difference(as_dict(cfg), as_dict(recomposed))
    if key is not None:
        raise UserError(
            f"the config was changed after compose() ({key}), so configs derived from it would "
            "not have the change",
            where,
            f"give the change as an override: compose(<stage>, [..., '{key}=...'])",
        )


def variant_config(cfg: Config, v: TrainVariant) -> Config:
    """A pipeline variant: another select + train on the same cached shards; ``train.name`` is
    the variant's name."""
    extra = [*v.overrides, f"train.name={quote(v.name)}", "pipeline.variants=[]"]
    return derive(cfg, extra, f"pipeline.variants[{v.name}]")


def round_name(name: str, r: int) -> str:
    """The training name of round ``r`` (round 1 is the run's own training)."""
    return name if r == 1 else f"{name}-r{r}"


def round_config(cfg: Config, r: int) -> Config:
    """Round ``r`` (>= 2) of fresh rollouts: the policy and the initial weights are round r-1's
    final checkpoint; teacher, reference, selection and loss stay; outputs go to run_dir/round<r>/.
    The seed moves on so that the samples (and which prompts are guided) are fresh."""
    lay = RunLayout.of(cfg.run_dir)
    prev = lay.round(r - 1).final(round_name(cfg.train.name, r - 1))
    extra = [
        f"run_dir={quote(RunLayout.round_dir(cfg.run_dir, r))}",
        f"student.path={quote(prev)}",
        f"seed={cfg.seed + r - 1}",
        f"train.name={quote(round_name(cfg.train.name, r))}",
        "train.init=null",
        "sft.enabled=false",  # the SFT warm start happened before round 1
        "pipeline.variants=[]",
    ]
    return derive(cfg, extra, f"pipeline round {r}")


# The SFT stage: the teacher answers every prompt from its own view (teacher_template, also for
# prompts with a context), then the student trains with cross-entropy on the answers. The names
# are the layout's (selected/sft, checkpoints/sft).
SFT_OVERRIDES = (
    "rollout.guided_fraction=1.0",
    "rollout.guided_template=${rollout.teacher_template}",
    "loss=sft",
    "train.name=sft",
    "train.selection=sft",
    "train.epochs=${sft.epochs}",
    "train.lr=${sft.lr}",
    "train.init=${student.path}",
)


def sft_config(cfg: Config) -> Config:
    """The config the SFT stage generates and trains with."""
    return derive(cfg, SFT_OVERRIDES, "sft")
