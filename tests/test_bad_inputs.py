"""Bad input matrix: every case runs a stage through its CLI and must end with a non-zero exit,
ONE ``error: ...`` line on stderr naming the input and the fix (no traceback), and no partial
output (no new committed dataset, no new visible file in the run dir).

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
    """A folder name that is SQL: closes the view's quoted name and writes a file outside."""
    return (
        f"x\" AS SELECT 1; COPY (SELECT 42) TO '{d.parent / (d.name + '-outside')}/pwned.csv'; --"
    )


HOSTILE_SELECTIONS = {
    "copy": _payload,
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
        for k in ("copy", "trailing_newline", "semicolon")
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
    changed = sorted(k for k in set(after) | set(before) if after.get(k) != before.get(k))
    assert after == before, f"partial output or changes: {changed}"
    assert not (h.REPO / "pwned.csv").exists()  # no payload ran in the working directory


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
