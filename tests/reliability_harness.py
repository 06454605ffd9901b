"""Helpers for the reliability tests: run a stage through its CLI in a subprocess (the real user
path), inject a fault (``DISTILLERY_FAULT``, see ``stages.lib.errors.fault_point``), and compare what a
stage left on disk with an uninterrupted run.

Speed: a CLI subprocess spends seconds importing torch and transformers on this machine, so the
tests start one *zygote* process per test module (``Zygote``) that imports the stage modules once
and then forks one child per stage run; the child runs the stage exactly as ``python -m
stages.<stage> ...`` does (``runpy`` as ``__main__``, Hydra parsing ``sys.argv``, the stage's own
exit code, its own stdout/stderr), and a SIGKILL kills only that child. ``run_stage`` (a plain
``python -m`` subprocess) is used where fresh interpreters matter (concurrent workers).

The comparisons are on three levels: rows (a content hash of the logical table sorted by its key,
with a duplicate-key check), files (sha256 of every committed Parquet file: same config and seed
must give byte-identical shards) and visibility (nothing but committed shards, the manifest and
hidden lock files in a dataset directory; no temp file a reader could pick up).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import runpy
import shutil
import signal
import subprocess
import sys
import tempfile
import traceback
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pyarrow as pa

from stages.lib import store

REPO = Path(__file__).resolve().parent.parent
KILLED = -signal.SIGKILL


def stage_env(fault: str | None = None, **extra: str) -> dict[str, str]:
    """The subprocess environment: one thread (shared 2-core machine), no debug, optional fault."""
    env = {k: v for k, v in os.environ.items() if k not in ("DISTILLERY_FAULT", "DISTILLERY_DEBUG")}
    env.update(
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONPATH=str(REPO),
        HYDRA_FULL_ERROR="0",
    )
    if fault:
        env["DISTILLERY_FAULT"] = fault
    env.update(extra)
    return env


@dataclass
class Result:
    rc: int
    stdout: str
    stderr: str

    @property
    def killed(self) -> bool:
        return self.rc == KILLED

    def describe(self) -> str:
        return f"rc={self.rc}\n--- stdout\n{self.stdout[-3000:]}\n--- stderr\n{self.stderr[-3000:]}"


def stage_cmd(stage: str, overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", f"stages.{stage}", *overrides]


def run_stage(
    stage: str, overrides: list[str], *, fault: str | None = None, timeout: float = 300
) -> Result:
    """``python -m stages.<stage> overrides...`` in a subprocess; its exit code and output."""
    p = subprocess.run(
        stage_cmd(stage, overrides),
        cwd=REPO,
        env=stage_env(fault),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return Result(p.returncode, p.stdout, p.stderr)


def start_stage(stage: str, overrides: list[str], *, fault: str | None = None) -> subprocess.Popen:
    """Start a stage without waiting (concurrent workers); finish with ``wait_stage``."""
    return subprocess.Popen(
        stage_cmd(stage, overrides),
        cwd=REPO,
        env=stage_env(fault),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # Ctrl-C reaches the stage even when this test run was started with SIGINT ignored (a
        # background job of a non-interactive shell): ignored signals survive exec.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def wait_stage(p: subprocess.Popen, timeout: float = 300) -> Result:
    out, err = p.communicate(timeout=timeout)
    return Result(p.returncode, out, err)


def overrides_for(
    run_dir: Path, student: Path, teacher: Path, prompts: Path, *extra: str
) -> list[str]:
    """The demo experiment on tiny models: guided rollouts, teacher + behaviour + ref passes,
    3 rollout shards of 4 prompts, 2 samples each, the HF backend everywhere."""
    return [
        "experiment=demo",
        f"run_dir={run_dir}",
        f"student.path={student}",
        f"teacher.path={teacher}",
        f"ref.path={student}",
        f"data.prompts={prompts}",
        "rollout.max_new_tokens=6",
        "rollout.prompts_per_shard=4",
        "rollout.n=2",
        "select=entropy_half",
        "train.epochs=1",
        "train.micro_batch_tokens=96",
        "train.log_every=1",
        "train.save_every=1",
        "train.max_steps=3",
        "train.trackers=[]",
        *extra,
    ]


# ----------------------------------------------------------------------------- comparing outputs
def rows_digest(directory: Path, table: ModuleType, key: list[str]) -> tuple[int, str]:
    """(rows, sha256) of a committed dataset's logical rows sorted by ``key``; asserts unique keys."""
    t = store.read_table(directory, table)
    t = t.replace_schema_metadata(None)
    if t.num_rows:
        n_unique = t.select(key).group_by(key).aggregate([]).num_rows
        assert n_unique == t.num_rows, f"{t.num_rows - n_unique} duplicate keys in {directory}"
    t = t.sort_by([(k, "ascending") for k in key]).combine_chunks()
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, t.schema) as w:
        w.write_table(t)
    return t.num_rows, hashlib.sha256(sink.getvalue().to_pybytes()).hexdigest()


def shard_files(directory: Path) -> dict[str, str]:
    """sha256 of every Parquet file under a dataset directory, by relative path."""
    return {
        str(p.relative_to(directory)): store.file_sha256(p)
        for p in sorted(Path(directory).rglob("*.parquet"))
    }


def stray_files(directory: Path, m: dict | None) -> list[str]:
    """Files a reader could trip over: anything but the manifest's shards, the manifest and
    hidden lock files (temp shards, temp manifests, shards the manifest does not list)."""
    listed = {s["path"] for s in (m or {}).get("shards", [])}
    out = []
    for p in sorted(Path(directory).rglob("*")):
        if p.is_dir():
            continue
        rel = str(p.relative_to(directory))
        if (
            rel in listed
            or rel in ("_manifest.json", "manifest.json")
            or p.name.startswith(".lock")
        ):
            continue
        out.append(rel)
    return out


def visible_shards(directory: Path) -> list[Path]:
    """Shards a reader globbing the hive layout would see (temp files are hidden by name)."""
    return sorted(Path(directory).glob("bucket=*/shard-*.parquet"))


# ----------------------------------------------------------------------------- user errors
def error_lines(r: Result) -> list[str]:
    return [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]


def assert_user_error(r: Result, *phrases: str) -> str:
    """Exit 2, no traceback, exactly one ``error: <what> (<where>). Fix: <how>`` line on stderr
    that contains every phrase (case-insensitive); returns the line."""
    assert r.rc == 2 and not r.killed, r.describe()
    assert "Traceback" not in r.stderr, r.describe()
    errors = error_lines(r)
    assert len(errors) == 1, r.describe()
    line = errors[0]
    assert "Fix:" in line and "(" in line, line
    for p in phrases:
        assert p.lower() in line.lower(), (p, line)
    return line


def tree_state(*roots: Path) -> dict[str, str]:
    """Every file (sha256), folder and symlink (its target) under ``roots``, symlinks not
    followed, lock files skipped: what a refused stage must leave exactly as it was."""
    out: dict[str, str] = {}
    for root in roots:
        root = Path(root)
        if root.is_symlink():
            out[str(root)] = "-> " + os.readlink(root)
            continue
        if not root.exists():
            continue
        for top, dirs, files in os.walk(root, followlinks=False):
            for n in dirs + files:
                p = Path(top) / n
                if n.startswith(".lock"):
                    continue
                if p.is_symlink():
                    out[str(p)] = "-> " + os.readlink(p)
                elif p.is_dir():
                    out[str(p)] = "dir"
                else:
                    out[str(p)] = store.file_sha256(p)
    return out


# ----------------------------------------------------------------------------- the zygote
STAGES = ("rollout", "score", "select", "train", "sft", "eval", "pipeline", "report", "sql")


def _child(job: dict) -> None:
    """In the forked child: become ``python -m stages.<stage> argv...`` and exit like it."""
    code = 1
    try:
        out = os.open(job["out"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        err = os.open(job["err"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(out, 1)
        os.dup2(err, 2)
        os.environ.clear()
        os.environ.update(job["env"])
        os.chdir(REPO)
        sys.argv = [f"-m stages.{job['stage']}", *job["argv"]]
        try:
            runpy.run_module(f"stages.{job['stage']}", run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            if isinstance(e.code, str):
                print(e.code, file=sys.stderr)
        except BaseException:  # what the interpreter does with an uncaught exception
            traceback.print_exc()
            code = 1
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def zygote_main() -> None:
    """Import once, then serve batches of jobs (one JSON list per stdin line) by forking."""
    import torch
    import transformers  # noqa: F401

    torch.set_num_threads(1)
    for st in STAGES:  # import what the stages import, then forget the stage modules themselves
        __import__(f"stages.{st}")  # (runpy executes them afresh as __main__, like ``-m``)
        sys.modules.pop(f"stages.{st}")
    if len(sys.argv) > 1:  # warm transformers' lazy imports with a model of the test
        from stages.lib import models

        models.load_model(sys.argv[1], "warm-up")
        models.load_tokenizer(sys.argv[1], "warm-up")
    print("ready", flush=True)
    for line in sys.stdin:
        jobs, parallel = json.loads(line)
        results: dict[int, int] = {}
        running: dict[int, int] = {}  # pid -> job index
        pending = list(range(len(jobs)))
        while pending or running:
            while pending and len(running) < parallel:
                i = pending.pop(0)
                sys.stdout.flush()
                sys.stderr.flush()
                pid = os.fork()
                if pid == 0:
                    _child(jobs[i])
                running[pid] = i
            pid, status = os.wait()
            i = running.pop(pid)
            results[i] = os.waitstatus_to_exitcode(status)
        print(json.dumps([results[i] for i in range(len(jobs))]), flush=True)


class Zygote:
    """A pre-imported process that runs stage CLIs in forked children (see the module docstring)."""

    def __init__(self, warm_model: Path | None = None) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="distillery-zygote-"))
        self.p = subprocess.Popen(
            [sys.executable, "-m", "tests.reliability_harness"]
            + ([str(warm_model)] if warm_model else []),
            cwd=REPO,
            env=stage_env(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        ready = self.p.stdout.readline().strip()
        assert ready == "ready", f"zygote failed to start: {ready!r}"
        self.n = 0

    def run_many(
        self, jobs: list[tuple[str, list[str], str | None]], parallel: int = 2
    ) -> list[Result]:
        """Run ``(stage, overrides, fault)`` jobs, ``parallel`` at a time; results in order."""
        specs = []
        for stage, argv, fault in jobs:
            self.n += 1
            specs.append(
                {
                    "stage": stage,
                    "argv": list(argv),
                    "env": stage_env(fault),
                    "out": str(self.tmp / f"{self.n}.out"),
                    "err": str(self.tmp / f"{self.n}.err"),
                }
            )
        self.p.stdin.write(json.dumps([specs, parallel]) + "\n")
        self.p.stdin.flush()
        line = self.p.stdout.readline()
        assert line, "the zygote died"
        codes = json.loads(line)
        return [
            Result(c, Path(s["out"]).read_text(), Path(s["err"]).read_text())
            for c, s in zip(codes, specs, strict=True)
        ]

    def run(self, stage: str, overrides: list[str], fault: str | None = None) -> Result:
        return self.run_many([(stage, overrides, fault)])[0]

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.p.stdin.close()
            self.p.wait(timeout=30)
        if self.p.poll() is None:
            self.p.kill()
        shutil.rmtree(self.tmp, ignore_errors=True)


if __name__ == "__main__":
    zygote_main()
