"""The run layout: every folder and file of a run, named in one place.

Stages never build ``run_dir / "..."`` paths by hand; they ask a :class:`RunLayout`. Rounds of
fresh rollouts (``pipeline.rounds``) live under ``run_dir/round<r>/`` with the same layout, so
``layout.round(r)`` is the layout of round ``r`` (round 1 is the run itself)::

    run_dir/
      rollouts/                 student samples             (rollout; dataset: shards + _manifest.json)
      tokens/                   teacher/behaviour scores    (score)
      selected/<policy>/        train-ready sequences       (select; selected/sft/ for SFT)
      sft_data/                 the SFT teacher's answers   (sft)
      checkpoints/<name>/       step-*/ and final/          (train)
      train/<name>/             metrics.jsonl, tb/, config  (train)
      eval/                     results.json, generations   (eval)
      report/                   report.html, plots          (report)
      timings.json              stage wall times            (pipeline)
      rounds.json               adaptive round decisions    (pipeline, pipeline.adaptive)
      round<r>/                 the same layout, round r >= 2

Dataset folders hold Parquet shards under ``bucket=NNN/`` and metadata files whose names start
with ``_`` (the Hive/Spark convention Parquet readers skip), so pandas, pyarrow, polars, Spark
and DuckDB open a dataset folder as it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from data_schemas.errors import UserError
from stages.lib import safety, uri

# File names inside a run's folders (the folders: RunLayout below)
METRICS = "metrics.jsonl"  # train/<name>/: one JSON row per logged training step
TRAIN_CONFIG = "config.json"  # train/<name>/: the resolved config of the training run


def check_name(name: str | None, key: str) -> str:
    """``name`` if it is safe as one path component under the run, else a UserError naming ``key``
    (the one rule, ``safety.is_safe_name``, also applies to names read from disk)."""
    if not safety.is_safe_name(name):
        raise UserError(
            f"{key}={name!r} is not a safe name",
            "config",
            f"set {key} to {safety.NAME_RULE} (no path separators, no newline)",
        )
    return name


@dataclass(frozen=True)
class RunLayout:
    """Paths of one run (or one round of it). Pure: creates nothing on disk."""

    root: Path

    @classmethod
    def of(cls, run_dir: str | Path) -> RunLayout:
        """The layout of ``run_dir``: a folder, a ``file://`` URI, or an ``s3://``/``gs://`` URI,
        whose files stages read and write in its local working mirror (``stages.lib.remote``)."""
        if run_dir is None or str(run_dir).strip() == "":
            raise UserError("run_dir is empty", "config", "set run_dir=<a directory for this run>")
        if uri.is_remote(run_dir):
            return cls(uri.mirror_of(str(run_dir)))
        return cls(Path(uri.local_path(run_dir)))

    @staticmethod
    def round_dir(run_dir: str, r: int) -> str:
        """The ``run_dir`` of round ``r`` (a URI stays a URI: round r writes to the bucket too)."""
        if r == 1:
            return run_dir
        if uri.is_remote(run_dir):
            return uri.join(run_dir, f"round{r}")
        return str(RunLayout.of(run_dir).round(r).root)

    # ---------------------------------------------------------------- datasets
    @property
    def rollouts(self) -> Path:
        return self.root / "rollouts"

    @property
    def tokens(self) -> Path:
        return self.root / "tokens"

    @property
    def selected_root(self) -> Path:
        return self.root / "selected"

    def selected(self, name: str) -> Path:
        return self.selected_root / check_name(name, "select.name")

    @property
    def sft_data(self) -> Path:
        return self.root / "sft_data"

    @property
    def sft_selected(self) -> Path:
        return self.selected_root / "sft"

    # ---------------------------------------------------------------- training
    @property
    def checkpoints_root(self) -> Path:
        return self.root / "checkpoints"

    def checkpoints(self, name: str) -> Path:
        return self.checkpoints_root / check_name(name, "train.name")

    def train_lock(self, name: str) -> Path:
        """The lock file that keeps a second trainer off run name ``name``."""
        return self.checkpoints_root / f".lock-{check_name(name, 'train.name')}"

    def final(self, name: str) -> Path:
        return self.checkpoints(name) / "final"

    @property
    def sft_final(self) -> Path:
        return self.final("sft")

    @property
    def train_root(self) -> Path:
        return self.root / "train"

    def train(self, name: str) -> Path:
        return self.train_root / check_name(name, "train.name")

    def metrics(self, name: str) -> Path:
        """The logged rows of training run ``name`` (``train/<name>/metrics.jsonl``)."""
        return self.train(name) / METRICS

    def train_config(self, name: str) -> Path:
        return self.train(name) / TRAIN_CONFIG

    # ---------------------------------------------------------------- outputs
    @property
    def eval(self) -> Path:
        return self.root / "eval"

    @property
    def eval_results(self) -> Path:
        return self.eval / "results.json"

    @property
    def report(self) -> Path:
        return self.root / "report"

    @property
    def timings(self) -> Path:
        return self.root / "timings.json"

    @property
    def round_decisions(self) -> Path:
        return self.root / "rounds.json"

    @property
    def duckdb_tmp(self) -> Path:
        return self.root / ".duckdb_tmp"

    # ---------------------------------------------------------------- rounds
    def round(self, r: int) -> RunLayout:
        """Round ``r`` of fresh rollouts (1 = this run itself)."""
        if r < 1:
            raise ValueError(f"round {r} < 1")
        return self if r == 1 else RunLayout(self.root / f"round{r}")

    def rounds(self) -> dict[int, RunLayout]:
        """The rounds present on disk (round 1 always), by number."""
        out = {1: self}
        for d in self.root.glob("round*"):
            if d.is_dir() and d.name[5:].isdigit() and int(d.name[5:]) >= 2:
                out[int(d.name[5:])] = RunLayout(d)
        return dict(sorted(out.items()))
