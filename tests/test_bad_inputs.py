"""Bad input matrix: every case runs a stage through its CLI and must end with a non-zero exit,
ONE ``error: ...`` line on stderr naming the input and the fix (no traceback), and no partial
output (no new committed dataset, no new visible file in the run dir), and nothing changed in the
case's folders outside the run (``<case>-*``: prompts, models, symlink targets; files hashed,
symlinks compared) unless a case names its own output folder (``own_output``).

Besides the everyday mistakes, the hostile cases of docs/RELIABILITY.md ("A handed-over run, a
bucket or a model folder"): names on disk that are SQL, symlinks out of the run, data that breaks
the contract across rows and shards, config values with no meaning, model folders asking for
custom code or claiming ids past the embedding rows, pickled adapters, huge and deeply nested
prompts. Marker files prove that no payload ran (``pwned.*`` in the working directory, ``RAN`` in
a model folder). The bucket cases are in tests/test_hostile_bucket.py.

All cases run in one batch (two at a time) through the pre-imported zygote of
tests/reliability_harness.py, then each parametrised test checks its own case; one case also runs
as a plain ``python -m`` subprocess to show the zygote changes nothing a user would see.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_schemas import manifest
from stages.lib import store
from tests import reliability_harness as h
from tests.conftest import WORDS, build_tiny_lm, write_prompts


@dataclass
class Ctx:
    root: Path
    student: Path
    teacher: Path
    prompts: Path
    ref: Path  # a complete run: rollouts, tokens, selected/entropy_half, checkpoints
    other: Path  # rollouts of another run (seed=1)

    def ov(self, run_dir: Path, *extra: str) -> list[str]:
        return h.overrides_for(run_dir, self.student, self.teacher, self.prompts, *extra)

    def copy(self, run_dir: Path, *datasets: str) -> None:
        for d in datasets:
            shutil.copytree(self.ref / d, run_dir / d, ignore=shutil.ignore_patterns(".lock*"))


@dataclass
class Case:
    id: str
    stage: str
    # prepares run_dir (and any input files) and returns extra overrides
    setup: Callable[[Ctx, Path], list[str]]
    expect: str  # a phrase the error line must contain
    fault: str | None = None
    hold_lock: str | None = None  # a lock file (relative to run_dir) the test process holds
    notes: list[str] = field(default_factory=list)
    cli: bool = False  # setup returns the whole command line (distillery-sql), not overrides
    own_output: str | None = None  # the stage's own output (relative): it may change


# ----------------------------------------------------------------------------- case setups
def _none(ctx: Ctx, d: Path) -> list[str]:
    return []


def _prompts_file(name: str, content: bytes | None = None, rows: list | None = None):
    def setup(ctx: Ctx, d: Path) -> list[str]:
        d.mkdir(parents=True, exist_ok=True)
        p = d.parent / f"{d.name}-{name}"
        if rows is not None:
            pq.write_table(pa.Table.from_pylist(rows), p)
        else:
            p.write_bytes(content or b"")
        return [f"data.prompts={p}"]

    return setup


def _long_prompt(ctx: Ctx, d: Path) -> list[str]:
    rows = [{"id": "long", "prompt": " ".join(["w1"] * 400)}]  # the tiny LM's context is 256
    return _prompts_file("long.parquet", rows=rows)(ctx, d)


def _model_dir(kind: str):
    def setup(ctx: Ctx, d: Path) -> list[str]:
        m = d.parent / f"{d.name}-model"
        if kind == "missing":
            return [f"student.path={m}"]
        m.mkdir(parents=True)
        for f in ctx.student.glob("tokenizer*"):
            shutil.copy(f, m)
        if kind == "garbage_config":
            (m / "config.json").write_text("not json {")
        elif kind == "not_causal":
            from transformers import T5Config

            T5Config(
                d_model=64, num_layers=1, num_heads=1, d_ff=64, vocab_size=100
            ).save_pretrained(m)
        elif kind == "garbage_weights":
            shutil.copy(ctx.student / "config.json", m)
            (m / "model.safetensors").write_bytes(b"\0garbage" * 64)
        return [f"student.path={m}", f"ref.path={m}"]

    return setup


def _other_tokenizer(ctx: Ctx, d: Path) -> list[str]:
    ctx.copy(d, "rollouts")
    t = build_tiny_lm(d.parent / f"{d.name}-teacher", words=[w + "x" for w in WORDS], seed=2)
    return [f"teacher.path={t}"]


def _sft_teacher(ctx: Ctx, d: Path) -> list[str]:
    ctx.copy(d, "rollouts")
    m = json.loads((ctx.ref / "rollouts" / manifest.FILENAME).read_text())
    m["fingerprints"]["teacher"] = "model-0000000000000000"  # SFT was taught by another teacher
    (d / "sft_data").mkdir()
    (d / "sft_data" / manifest.FILENAME).write_text(json.dumps(manifest.seal(m)))
    return []


def _edit_rollouts(edit: Callable[[Ctx, Path, dict], None]):
    def setup(ctx: Ctx, d: Path) -> list[str]:
        ctx.copy(d, "rollouts")
        mp = d / "rollouts" / manifest.FILENAME
        m = json.loads(mp.read_text())
        edit(ctx, d / "rollouts", m)
        mp.write_text(json.dumps(manifest.seal(m)))  # re-sealed: the deeper checks fire
        return []

    return setup


def _truncate(ctx: Ctx, rd: Path, m: dict) -> None:
    p = rd / m["shards"][1]["path"]
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _foreign_shard(ctx: Ctx, rd: Path, m: dict) -> None:
    """Shard 1 replaced by the other run's shard 1, the manifest's size/checksum patched to match
    (what a careless copy between run dirs does): the footer's dataset id gives it away."""
    src = ctx.other / "rollouts" / m["shards"][1]["path"]
    dst = rd / m["shards"][1]["path"]
    shutil.copy(src, dst)
    m["shards"][1].update(bytes=dst.stat().st_size, sha256=store.file_sha256(dst))


def _schema_version(ctx: Ctx, rd: Path, m: dict) -> None:
    m["schema_version"] = 99


def _checksum(ctx: Ctx, rd: Path, m: dict) -> None:
    m["shards"][0]["sha256"] = "0" * 64


def _rewrite_shard(change: Callable[[dict], None]):
    """Rewrite rollout shard 0 row by row (footer metadata kept, manifest patched): data that
    passes the store's checks but that no correct rollout stage writes."""

    def edit(ctx: Ctx, rd: Path, m: dict) -> None:
        p = rd / m["shards"][0]["path"]
        t = pq.read_table(p)
        rows = t.to_pylist()
        for r in rows:
            change(r)
        pq.write_table(pa.Table.from_pylist(rows, schema=t.schema), p, compression="zstd")
        m["shards"][0].update(bytes=p.stat().st_size, sha256=store.file_sha256(p))
        m["rows"] = sum(s["rows"] for s in m["shards"])

    return _edit_rollouts(edit)


def _oov(r: dict) -> None:
    r["response_ids"] = [*r["response_ids"][:-1], 5000]


def _empty(r: dict) -> None:
    r["response_ids"], r["behavior_logprobs"], r["response_len"] = [], [], 0


def _nan_teacher(ctx: Ctx, d: Path) -> list[str]:
    import torch
    from transformers import AutoModelForCausalLM

    ctx.copy(d, "rollouts")
    t = d.parent / f"{d.name}-nan-teacher"
    model = AutoModelForCausalLM.from_pretrained(ctx.teacher)
    with torch.no_grad():
        model.model.norm.weight[0] = float("nan")  # every logit becomes NaN
    model.save_pretrained(t)
    for f in ctx.teacher.glob("tokenizer*"):
        shutil.copy(f, t)
    return [f"teacher.path={t}"]


def _inputs(*datasets: str, extra: tuple[str, ...] = ()):
    def setup(ctx: Ctx, d: Path) -> list[str]:
        ctx.copy(d, *datasets)
        return list(extra)

    return setup


def _train_other_init(ctx: Ctx, d: Path) -> list[str]:
    ctx.copy(d, "rollouts", "tokens", "selected", "checkpoints")
    return [f"student.path={ctx.teacher}"]  # same tokenizer, other weights


def _train_pickled_init(ctx: Ctx, d: Path) -> list[str]:
    """A student saved the pre-safetensors way: a pickled pytorch_model.bin (can run code)."""
    import torch
    from safetensors.torch import load_file

    ctx.copy(d, "rollouts", "tokens", "selected")
    m = d.parent / f"{d.name}-pickled"
    m.mkdir()
    torch.save(load_file(ctx.student / "model.safetensors"), m / "pytorch_model.bin")
    for f in [*ctx.student.glob("tokenizer*"), ctx.student / "config.json"]:
        shutil.copy(f, m)
    return [f"student.path={m}"]


# ----------------------------------------------------------------------------- hostile runs
# A run dir handed over by someone else: names on disk that are SQL, symlinks out of the run.
# Every file outside the run that a case sets up lives in a sibling ``<case>-*`` folder, which
# ``outcomes`` snapshots with the run dir: it must be unchanged, and no payload may run.
def _payload(d: Path) -> str:
    """A folder name that is SQL: closes the view's quoted name and writes pwned.csv into the
    working directory (a folder name has no '/'; before #28 this ran, with full file access)."""
    return "x\" AS SELECT 1; COPY (SELECT 42) TO 'pwned.csv'; --"


def _attach_payload(d: Path) -> str:
    """The same through ATTACH: would create a database file in the working directory."""
    return "x\" AS SELECT 1; ATTACH 'pwned.duckdb' AS p; --"


HOSTILE_SELECTIONS = {
    "copy": _payload,
    "attach": _attach_payload,
    "single_quote": lambda d: "it's",
    "trailing_newline": lambda d: "all\n",
    "space": lambda d: "my selection",
    "unicode": lambda d: "sélection",
    "semicolon": lambda d: "a;DROP VIEW tokens",
}


def _hostile_selection(kind: str, stage: str):
    """A committed selection copied under a name read from disk that is not a safe name."""

    def setup(ctx: Ctx, d: Path) -> list[str]:
        ctx.copy(d, "rollouts", "tokens", "selected")
        (d.parent / f"{d.name}-outside").mkdir()
        src = d / "selected" / "entropy_half"
        shutil.copytree(src, d / "selected" / HOSTILE_SELECTIONS[kind](d))
        if stage == "sql":
            return [str(d), "SELECT count(*) FROM tokens"]
        return []

    return setup


def _hostile_checkpoint(ctx: Ctx, d: Path) -> list[str]:
    """eval discovers checkpoints/<name>/final on disk: a name that is not a safe name."""
    ctx.copy(d, "checkpoints")
    src = next(p for p in (d / "checkpoints").iterdir() if p.is_dir())
    src.rename(d / "checkpoints" / "ckpt'; --")
    return ["eval.checkpoints=[]"]


def _outside(d: Path, *, files: bool = True) -> Path:
    """A folder outside the run with files in it (what a symlink in the run points at)."""
    out = d.parent / f"{d.name}-outside"
    out.mkdir(parents=True, exist_ok=True)
    if files:
        (out / "keep.txt").write_text("not this run's\n")
        (out / "config.json").write_text('{"model_type": "someone else"}\n')
        (out / "bucket=000").mkdir()
        (out / "bucket=000" / "shard-00000.parquet").write_bytes(b"PAR1 not yours PAR1")
    return out


def _symlink(rel: str, *datasets: str, extra: tuple[str, ...] = ("overwrite=true",)):
    """Inputs copied, then ``rel`` (under the run dir) made a symlink to a folder outside."""

    def setup(ctx: Ctx, d: Path) -> list[str]:
        ctx.copy(d, *datasets)
        link = d / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.exists():
            shutil.rmtree(link)
        link.symlink_to(_outside(d), target_is_directory=True)
        return list(extra)

    return setup


# ----------------------------------------------------------------------------- contract (#28, 3)
# Data that passes every per-table schema check but breaks the contract across rows and shards:
# select must refuse it before writing anything, the trainer's loader before training on it.
def _rewrite(directory: Path, m: dict, shard: int, change: Callable[[list[dict]], None]) -> None:
    """Rewrite one shard's rows as stored (footer metadata kept), the manifest entry patched."""
    p = directory / m["shards"][shard]["path"]
    t = pq.read_table(p)
    rows = t.to_pylist()
    change(rows)
    pq.write_table(pa.Table.from_pylist(rows, schema=t.schema), p, compression="zstd")
    m["shards"][shard].update(bytes=p.stat().st_size, sha256=store.file_sha256(p))


def _edit_dataset(name: str, edit: Callable[[Path, dict], None], *datasets: str):
    """Copy the inputs, edit dataset ``name`` (shards and manifest), re-seal its manifest."""

    def setup(ctx: Ctx, d: Path) -> list[str]:
        ctx.copy(d, *datasets)
        mp = d / name / manifest.FILENAME
        m = json.loads(mp.read_text())
        edit(d / name, m)
        mp.write_text(json.dumps(manifest.seal(m)))
        return []

    return setup


def _set_first(col: str, fn: Callable, every: bool = False) -> Callable[[Path, dict], None]:
    """``col`` of the first row of shard 0 (``every``: of every row of every shard) -> fn(value)."""

    def edit(directory: Path, m: dict) -> None:
        def change(rows: list[dict]) -> None:
            for r in rows if every else rows[:1]:
                r[col] = fn(r[col])

        for shard in range(len(m["shards"]) if every else 1):
            _rewrite(directory, m, shard, change)

    return edit


def _sample_in_two_shards(directory: Path, m: dict) -> None:
    first = pq.read_table(directory / m["shards"][0]["path"])["sample_id"][0].as_py()
    _rewrite(directory, m, 1, lambda rows: rows[0].update(sample_id=first))


def _one_sample_two_ids(directory: Path, m: dict) -> None:
    def change(rows: list[dict]) -> None:
        a = rows[0]
        b = next(
            r
            for r in rows
            if (r["prompt_id"], r["sample_idx"]) != (a["prompt_id"], a["sample_idx"])
        )
        b.update(prompt_id=a["prompt_id"], sample_idx=a["sample_idx"])

    _rewrite(directory, m, 0, change)


def _two_rows_one_id(directory: Path, m: dict) -> None:
    _rewrite(directory, m, 0, lambda rows: rows[1].update(sample_id=rows[0]["sample_id"]))


def _swap_first_two(xs: list) -> list:
    return [xs[1], xs[0], *xs[2:]] if xs[1] != xs[0] else [xs[0] - 1.0, *xs[1:]]


TOKENS_IN = ("rollouts", "tokens")
SELECTED_IN = ("rollouts", "tokens", "selected")
TRAIN_OUT = "train/topk_fkl-entropy_half"  # where a refused trainer may already have written
CONTRACT_CASES = [
    Case(
        "select_teacher_topk_id_over_vocab",
        "select",
        _edit_dataset(
            "tokens", _set_first("teacher_topk_ids", lambda x: [5000, *x[1:]]), *TOKENS_IN
        ),
        "outside the vocabulary",
    ),
    Case(
        "select_teacher_topk_id_negative",
        "select",
        _edit_dataset(
            "tokens", _set_first("teacher_topk_ids", lambda x: [*x[:-1], -3]), *TOKENS_IN
        ),
        "outside the vocabulary",
    ),
    Case(
        "select_token_id_over_vocab",
        "select",
        _edit_dataset("tokens", _set_first("token_id", lambda x: 100), *TOKENS_IN),
        "outside the vocabulary",
    ),
    # stored delta code: a negative delta after the first is a rising log-prob
    Case(
        "select_topk_out_of_order",
        "select",
        _edit_dataset(
            "tokens",
            _set_first("teacher_topk_logprobs_q", lambda q: [q[0], -7, *q[2:]]),
            *TOKENS_IN,
        ),
        "descending order",
    ),
    Case(
        "select_sample_id_in_two_shards",
        "select",
        _edit_dataset("rollouts", _sample_in_two_shards, *TOKENS_IN),
        "appears 2 times",
    ),
    Case(
        "select_one_sample_two_ids",
        "select",
        _edit_dataset("rollouts", _one_sample_two_ids, *TOKENS_IN),
        "under 2 sample ids",
    ),
    Case(
        "train_sample_id_twice",
        "train",
        _edit_dataset("selected/entropy_half", _two_rows_one_id, *SELECTED_IN),
        "appears 2 times",
    ),
    Case(
        "train_topk_out_of_order",
        "train",
        _edit_dataset(
            "selected/entropy_half",
            _set_first("teacher_topk_logprobs", _swap_first_two, every=True),
            *SELECTED_IN,
        ),
        "descending order",
        own_output=TRAIN_OUT,
    ),
    Case(
        "train_topk_id_over_vocab",
        "train",
        _edit_dataset(
            "selected/entropy_half",
            _set_first("teacher_topk_ids", lambda x: [5000, *x[1:]], every=True),
            *SELECTED_IN,
        ),
        "outside the vocabulary",
        own_output=TRAIN_OUT,
    ),
]


# ----------------------------------------------------------------------------- config values (4)
def _yaml_experiment(body: str):
    """An experiment file in a user's --config-dir (YAML can hold what a command line cannot,
    e.g. a name with a trailing newline from a block scalar); the whole command line."""

    def setup(ctx: Ctx, d: Path) -> list[str]:
        conf = d.parent / f"{d.name}-conf" / "experiment"
        conf.mkdir(parents=True)
        (conf / "mine.yaml").write_text("# @package _global_\n" + body)
        ov = [o if o != "experiment=demo" else "experiment=mine" for o in ctx.ov(d)]
        return [f"--config-dir={conf.parent}", *ov]

    return setup


def _over(*extra: str):
    return lambda ctx, d: list(extra)


CONFIG_CASES = [
    Case("loss_weight_negative", "rollout", _over("loss.terms.0.weight=-1.0"), "must be >= 0"),
    Case("loss_weights_all_zero", "rollout", _over("loss.terms.0.weight=0"), "one must be > 0"),
    Case("seed_negative", "rollout", _over("seed=-1"), "seed"),
    Case("seed_too_large", "rollout", _over("seed=4294967296"), "seed"),
    Case(
        "max_prompt_tokens_zero",
        "rollout",
        _over("rollout.max_prompt_tokens=0"),
        "max_prompt_tokens",
    ),
    Case(
        "vllm_memory_fraction_zero",
        "rollout",
        _over("rollout.vllm_memory_fraction=0"),
        "vllm_memory_fraction",
    ),
    Case(
        "select_name_trailing_newline_yaml",
        "rollout",
        _yaml_experiment("select:\n  name: |\n    ok\n"),
        "not a safe name",
        cli=True,
    ),
    Case(
        "train_name_trailing_newline_yaml",
        "rollout",
        _yaml_experiment('train:\n  name: "run\\n"\n'),
        "not a safe name",
        cli=True,
    ),
    Case("train_name_leading_dash", "rollout", _over("train.name=-rf"), "not a safe name"),
]


# ----------------------------------------------------------------------------- model folders (5)
def _model_copy(ctx: Ctx, d: Path, edit: Callable[[Path], None], *, role: str = "student"):
    m = d.parent / f"{d.name}-model"
    shutil.copytree(ctx.student, m)
    edit(m)
    return [f"{role}.path={m}", f"ref.path={m}"] if role == "student" else [f"{role}.path={m}"]


def _json_edit(name: str, change: Callable[[dict], None]) -> Callable[[Path], None]:
    def edit(m: Path) -> None:
        doc = json.loads((m / name).read_text())
        change(doc)
        (m / name).write_text(json.dumps(doc))

    return edit


def _custom_code(m: Path) -> None:
    """auto_map to a module in the folder that would leave a marker file if it ever ran."""
    (m / "evil.py").write_text(f"open({str(m / 'RAN')!r}, 'w').write('code ran')\n")
    auto = {"AutoConfig": "evil.C", "AutoModelForCausalLM": "evil.M"}
    _json_edit("config.json", lambda c: c.update(model_type="evil", auto_map=auto))(m)


def _custom_tokenizer(m: Path) -> None:
    (m / "evil.py").write_text(f"open({str(m / 'RAN')!r}, 'w').write('code ran')\n")
    auto = {"AutoTokenizer": ["evil.T", None]}
    _json_edit(
        "tokenizer_config.json", lambda c: c.update(tokenizer_class="EvilTokenizer", auto_map=auto)
    )(m)


def _added_token_id(new_id: int) -> Callable[[Path], None]:
    tok = {"id": new_id, "content": "<huge>", "single_word": False, "lstrip": False,
           "rstrip": False, "normalized": False, "special": True}  # fmt: skip
    return _json_edit("tokenizer.json", lambda t: t["added_tokens"].append(tok))


def _vocab_id_at_rows(m: Path) -> None:
    rows = json.loads((m / "config.json").read_text())["vocab_size"]
    _json_edit("tokenizer.json", lambda t: t["model"]["vocab"].update(zzz=rows))(m)


def _pickled_adapter(ctx: Ctx, d: Path) -> list[str]:
    """An adapter-only checkpoint whose weights are a pickle (adapter_model.bin)."""
    import torch

    a = d.parent / f"{d.name}-adapter"
    a.mkdir()
    cfg = {"peft_type": "LORA", "base_model_name_or_path": str(ctx.student), "r": 2,
           "lora_alpha": 4, "target_modules": ["q_proj"], "task_type": "CAUSAL_LM"}  # fmt: skip
    (a / "adapter_config.json").write_text(json.dumps(cfg))
    torch.save({"x": torch.zeros(1)}, a / "adapter_model.bin")
    sets = ("private_closed", "private_paraphrase", "public_closed", "reading")
    return [f"eval.checkpoints=[{a}]", *(f"data.eval_sets.{n}={ctx.prompts}" for n in sets)]


def _teacher_custom_code(ctx: Ctx, d: Path) -> list[str]:
    ctx.copy(d, "rollouts")
    return _model_copy(ctx, d, _custom_code, role="teacher")


MODEL_CASES = [
    Case(
        "model_auto_map_custom_code",
        "rollout",
        lambda c, d: _model_copy(c, d, _custom_code),
        "custom code",
    ),
    Case("teacher_auto_map_custom_code", "score", _teacher_custom_code, "custom code"),
    Case(
        "tokenizer_auto_map_custom_class",
        "rollout",
        lambda c, d: _model_copy(c, d, _custom_tokenizer),
        "custom code",
    ),
    Case(
        "tokenizer_id_2e9",
        "rollout",
        lambda c, d: _model_copy(c, d, _added_token_id(2_000_000_000)),
        "embedding rows",
    ),
    Case(
        "tokenizer_vocab_id_at_rows",
        "rollout",
        lambda c, d: _model_copy(c, d, _vocab_id_at_rows),
        "embedding rows",
    ),
    Case("eval_pickled_lora_adapter", "eval", _pickled_adapter, "pickled"),
]


# ----------------------------------------------------------------------------- input size (6)
def _huge_prompt(chars: int, chat: bool = False):
    text = ("w1 " * (chars // 3 + 1))[:chars]
    msgs = [{"role": "user", "content": text}]
    row = {"id": "huge", "messages": msgs} if chat else {"id": "huge", "prompt": text}
    lines = [json.dumps({"id": "a", "prompt": "w1 w2"}), json.dumps(row), ""]
    return _prompts_file("huge.jsonl", "\n".join(lines).encode())


def _nested(depth: int, key: str):
    inner = "[" * depth + "]" * depth
    return _prompts_file("deep.jsonl", f'{{"id": "deep", "{key}": {inner}}}\n'.encode())


INPUT_CASES = [
    Case("prompt_20mb", "rollout", _huge_prompt(20_000_000), "not tokenized"),
    Case("chat_prompt_2mb", "rollout", _huge_prompt(2_000_000, chat=True), "not tokenized"),
    Case("messages_nested_100k_deep", "rollout", _nested(100_000, "messages"), "nested too deeply"),
    Case("context_nested_100k_deep", "rollout", _nested(100_000, "context"), "nested too deeply"),
    Case("context_nested_900_deep", "rollout", _nested(900, "context"), "prompts"),
]


CASES = [
    Case(
        "prompts_malformed_jsonl",
        "rollout",
        _prompts_file("p.jsonl", b'{"id": "a",\n'),
        "malformed JSON",
    ),
    Case("prompts_empty_file", "rollout", _prompts_file("p.jsonl", b""), "empty"),
    Case("prompts_not_parquet", "rollout", _prompts_file("p.parquet", b"PAR1garbage"), "Parquet"),
    Case(
        "prompts_missing_column",
        "rollout",
        _prompts_file("p.parquet", rows=[{"id": "a"}]),
        "missing column",
    ),
    Case(
        "prompts_file_missing",
        "rollout",
        lambda c, d: ["data.prompts=/nonexistent/p.parquet"],
        "not found",
    ),
    Case("prompt_longer_than_context", "rollout", _long_prompt, "over the limit"),
    Case("model_dir_missing", "rollout", _model_dir("missing"), "not found"),
    Case("model_config_garbage", "rollout", _model_dir("garbage_config"), "config"),
    Case("model_not_causal_lm", "rollout", _model_dir("not_causal"), "causal LM"),
    Case("model_weights_garbage", "rollout", _model_dir("garbage_weights"), "causal LM"),
    Case("tokenizer_mismatch", "score", _other_tokenizer, "tokenizers differ"),
    Case("teacher_not_sft_teacher", "score", _sft_teacher, "SFT teacher"),
    Case("truncated_shard", "score", _edit_rollouts(_truncate), "checksum"),
    Case("shard_from_another_run", "score", _edit_rollouts(_foreign_shard), "another dataset"),
    Case("schema_version", "score", _edit_rollouts(_schema_version), "schema version"),
    Case("manifest_checksum_mismatch", "score", _edit_rollouts(_checksum), "checksum"),
    Case("nan_teacher_logprobs", "score", _nan_teacher, "NaN"),
    Case("out_of_vocabulary_ids", "score", _rewrite_shard(_oov), "vocabulary"),
    Case("empty_responses", "score", _rewrite_shard(_empty), "empty response"),
    Case(
        "selection_keeps_zero_tokens",
        "select",
        _inputs(
            "rollouts",
            "tokens",
            extra=(
                "select=evidence",
                "select.rules.0.params.threshold=1e9",
                "select.rules.0.params.span=false",
            ),
        ),
        "keeps 0",
    ),
    Case(
        "run_dir_locked",
        "rollout",
        _none,
        "locked by another writer",
        hold_lock="rollouts/.lock-worker-0-of-1",
    ),
    Case("disk_full", "rollout", _none, "disk full", fault="mid_shard:1:enospc"),
    Case(
        "unknown_config_key",
        "rollout",
        lambda c, d: ["rollout.samples_per_prompt=3"],
        "samples_per_prompt",
    ),
    Case(
        "topk_over_vocab",
        "score",
        _inputs("rollouts", extra=("score.topk=5000",)),
        "exceeds the vocabulary",
    ),
    Case(
        "fraction_outside_0_1",
        "rollout",
        lambda c, d: ["rollout.guided_fraction=1.5"],
        "guided_fraction",
    ),
    Case(
        "worker_index_out_of_range",
        "rollout",
        lambda c, d: ["worker.index=2", "worker.count=2"],
        "worker.index",
    ),
    Case("checkpoint_from_another_model", "train", _train_other_init, "another init"),
    Case("train_pickled_weights", "train", _train_pickled_init, "pickled"),
    # -------------------------------------------------- names on disk are never SQL (#28, 1)
    *[
        Case(
            f"sql_selection_name_{k}",
            "sql",
            _hostile_selection(k, "sql"),
            "not a safe name",
            cli=True,
        )
        for k in HOSTILE_SELECTIONS
    ],
    *[
        Case(
            f"report_selection_name_{k}",
            "report",
            _hostile_selection(k, "report"),
            "not a safe name",
        )
        for k in ("copy", "attach", "trailing_newline", "semicolon")
    ],
    Case("eval_checkpoint_folder_name", "eval", _hostile_checkpoint, "not a safe name"),
    # -------------------------------------------------- no write or delete through a symlink (2)
    Case(
        "symlink_selected_name_overwrite",
        "select",
        _symlink("selected/entropy_half", "rollouts", "tokens"),
        "symlink",
    ),
    Case("symlink_selected_root", "select", _symlink("selected", "rollouts", "tokens"), "symlink"),
    Case(
        "symlink_selection_bucket",
        "select",
        _symlink("selected/entropy_half/bucket=000", "rollouts", "tokens"),
        "symlink",
    ),
    Case("symlink_duckdb_tmp", "select", _symlink(".duckdb_tmp", "rollouts", "tokens"), "symlink"),
    Case(
        "symlink_checkpoints_name_overwrite",
        "train",
        _symlink("checkpoints/topk_fkl-entropy_half", "rollouts", "tokens", "selected"),
        "symlink",
    ),
    Case(
        "symlink_checkpoints_root",
        "train",
        _symlink("checkpoints", "rollouts", "tokens", "selected"),
        "symlink",
    ),
    Case(
        "symlink_train_dir_config_json",
        "train",
        _symlink("train/topk_fkl-entropy_half", "rollouts", "tokens", "selected", extra=()),
        "symlink",
    ),
    Case("symlink_tokens_overwrite", "score", _symlink("tokens", "rollouts"), "symlink"),
    Case("symlink_rollouts_overwrite", "rollout", _symlink("rollouts"), "symlink"),
    Case(
        "symlink_rollouts_bucket", "rollout", _symlink("rollouts/bucket=000", extra=()), "symlink"
    ),
    Case("symlink_eval_dir", "eval", _symlink("eval", extra=("eval.checkpoints=[]",)), "symlink"),
    Case("symlink_report_dir", "report", _symlink("report", "rollouts", extra=()), "symlink"),
    Case("symlink_sft_selected", "sft", _symlink("selected/sft", extra=()), "symlink"),
    Case("symlink_sft_data_overwrite", "sft", _symlink("sft_data"), "symlink"),
    *CONTRACT_CASES,
    *CONFIG_CASES,
    *MODEL_CASES,
    *INPUT_CASES,
    Case(
        "train_run_name_locked",
        "train",
        _inputs("rollouts", "tokens", "selected"),
        "another trainer",
        hold_lock="checkpoints/.lock-topk_fkl-entropy_half",
    ),
]


def snapshot(d: Path) -> dict[str, str]:
    """Every non-lock file under the run dir with its hash (a symlink: its target, not followed),
    and everything in the case's sibling folders outside the run (``<case>-*``: prompts, models,
    symlink targets): what a failed run must leave alone."""
    out = {}
    if d.exists():
        for top, dirs, files in os.walk(d, followlinks=False):
            for n in dirs + files:
                p = Path(top) / n
                if p.is_symlink():
                    out[str(p.relative_to(d))] = "-> " + os.readlink(p)
                elif p.is_file() and not n.startswith(".lock"):
                    out[str(p.relative_to(d))] = store.file_sha256(p)
    return out | h.tree_state(*sorted(d.parent.glob(f"{d.name}-*")))


@pytest.fixture(scope="module")
def outcomes(tiny_lm, tiny_teacher, tmp_path_factory):
    """Build the inputs, run every case (two at a time), return {case id: (result, before, after)}."""
    root = tmp_path_factory.mktemp("bad")
    prompts = write_prompts(root / "prompts.parquet", 12)
    z = h.Zygote(warm_model=tiny_lm)
    try:
        ctx = Ctx(root, tiny_lm, tiny_teacher, prompts, root / "ref", root / "other")
        for stage in ("rollout", "score", "select", "train"):
            r = z.run(stage, ctx.ov(ctx.ref))
            assert r.rc == 0, r.describe()
        r = z.run("rollout", ctx.ov(ctx.other, "seed=1"))
        assert r.rc == 0, r.describe()
        jobs, dirs, before, locks = [], [], [], []
        for c in CASES:
            d = root / "cases" / c.id
            d.parent.mkdir(parents=True, exist_ok=True)
            extra = c.setup(ctx, d)
            if c.hold_lock:  # another writer holds the dataset (held until all cases ran)
                lock = d / c.hold_lock
                lock.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(lock, os.O_RDWR | os.O_CREAT)
                fcntl.flock(fd, fcntl.LOCK_EX)
                locks.append(fd)
            dirs.append(d)
            before.append(snapshot(d))
            jobs.append((c.stage, extra if c.cli else ctx.ov(d, *extra), c.fault))
        results = z.run_many(jobs, parallel=2)
        for fd in locks:
            os.close(fd)
        yield {
            c.id: (r, b, snapshot(d))
            for c, r, b, d in zip(CASES, results, before, dirs, strict=True)
        }
    finally:
        z.close()


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_fails_with_one_clear_error_and_no_output(outcomes, case):
    r, before, after = outcomes[case.id]
    assert r.rc != 0 and not r.killed, r.describe()
    assert "Traceback" not in r.stderr, r.describe()
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, r.describe()
    line = errors[0]
    assert r.rc == 2, f"not reported as a user error: {r.describe()}"
    assert case.expect.lower() in line.lower(), line
    assert "Fix:" in line, line
    if case.own_output:  # the stage's own output folder may hold what it wrote before failing
        own = lambda k: k.startswith(case.own_output + "/")  # noqa: E731
        before = {k: v for k, v in before.items() if not own(k)}
        after = {k: v for k, v in after.items() if not own(k)}
    changed = sorted(k for k in set(after) | set(before) if after.get(k) != before.get(k))
    assert after == before, f"partial output or changes: {changed}"
    for f in ("pwned.csv", "pwned.duckdb"):  # no payload ran in the working directory
        assert not (h.REPO / f).exists(), f
    assert not any(k.endswith("/RAN") for k in after), "code from a model folder ran"


def test_matrix_is_large_enough():
    assert len(CASES) >= 20 and len({c.id for c in CASES}) == len(CASES)


def test_plain_subprocess_reports_like_the_zygote(outcomes, tiny_lm, tiny_teacher, tmp_path):
    """The real ``python -m`` path gives the same exit code and error line as the zygote."""
    case = next(c for c in CASES if c.id == "unknown_config_key")
    prompts = write_prompts(tmp_path / "p.parquet", 4)
    ov = h.overrides_for(
        tmp_path / "run", tiny_lm, tiny_teacher, prompts, "rollout.samples_per_prompt=3"
    )
    r = h.run_stage(case.stage, ov)
    z_r = outcomes[case.id][0]
    err = lambda res: [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]  # noqa: E731
    assert r.rc == z_r.rc == 2 and len(err(r)) == 1
    assert err(r)[0].split("(")[0] == err(z_r)[0].split("(")[0]
