"""Experiment trackers: the trainer's metric rows and resolved config, sent to each one listed.

``train.trackers`` names them: ``tensorboard`` (events in ``train/<name>/tb``), ``wandb`` (offline by
default: a run folder under ``train/<name>/wandb`` that ``wandb sync`` uploads later) and ``mlflow``
(a file store in ``train/<name>/mlruns`` unless ``train.mlflow_tracking_uri`` says otherwise). Each
receives exactly the rows written to ``metrics.jsonl`` (finite numbers; the step as the x axis)
and the resolved config once. wandb and mlflow are optional extras (``distillery[trackers]``).
A resumed training opens a new W&B/MLflow run that starts at the resumed step; TensorBoard purges
the events past it.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from pathlib import Path
from typing import Any

from stages.lib.errors import UserError


def scalars(row: dict) -> dict[str, float]:
    """The finite numbers of a metrics row, ``step`` excluded."""
    return {
        k: float(v)
        for k, v in row.items()
        if k != "step" and isinstance(v, (int, float)) and math.isfinite(v)
    }


def _need(module: str, tracker: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(
            f"train.trackers has {tracker} but the {module} package is not installed",
            "train.trackers",
            'pip install "distillery[trackers]" (or remove it from train.trackers)',
        ) from None


class TensorBoard:
    def __init__(self, out_dir: Path, config: dict, step: int, **_: Any):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(out_dir / "tb"), purge_step=step)
        self.writer.add_text("config", f"```\n{json.dumps(config, indent=1)}\n```", step)

    def log(self, row: dict) -> None:
        for k, v in scalars(row).items():
            self.writer.add_scalar(f"train/{k}", v, row["step"])

    def close(self) -> None:
        self.writer.close()


class WandB:
    def __init__(
        self, out_dir: Path, config: dict, step: int, *, name: str, project: str, mode: str
    ):
        wandb = _need("wandb", "wandb")
        self.run = wandb.init(
            project=project,
            name=name,
            dir=str(out_dir),
            mode=mode,
            config=config,
            settings=wandb.Settings(console="off", silent=True),
        )

    def log(self, row: dict) -> None:
        self.run.log(scalars(row), step=int(row["step"]))

    def close(self) -> None:
        self.run.finish()


_MLFLOW_BAD = re.compile(r"[^A-Za-z0-9_\-. /]")


class MLflow:
    def __init__(
        self, out_dir: Path, config: dict, step: int, *, name: str, project: str, uri: str | None
    ):
        _need("mlflow", "mlflow")
        from mlflow.tracking import MlflowClient

        if uri is None:  # the default: a file store next to metrics.jsonl, which MLflow 3 keeps
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # behind an opt-in
            uri = (out_dir / "mlruns").resolve().as_uri()
        self.client = MlflowClient(tracking_uri=uri)
        exp = self.client.get_experiment_by_name(project)
        exp_id = exp.experiment_id if exp else self.client.create_experiment(project)
        self.run_id = self.client.create_run(exp_id, run_name=name).info.run_id
        self.client.log_dict(self.run_id, config, "config.json")

    def log(self, row: dict) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        step = int(row["step"])
        # MLflow metric names allow letters, digits and _-. /: '#' (a repeated loss term) -> '_'
        metrics = [Metric(_MLFLOW_BAD.sub("_", k), v, ts, step) for k, v in scalars(row).items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def open_trackers(
    names: list[str], out_dir: Path, config: dict, step: int, *, tc: Any, name: str
) -> list:
    """The trackers ``names`` (``train.trackers``), opened; ``tc`` is the TrainConfig."""
    out = []
    try:
        for t in names:
            if t == "tensorboard":
                out.append(TensorBoard(out_dir, config, step))
            elif t == "wandb":
                out.append(
                    WandB(out_dir, config, step, name=name, project=tc.tracker_project,
                          mode=tc.wandb_mode)
                )  # fmt: skip
            elif t == "mlflow":
                out.append(
                    MLflow(out_dir, config, step, name=name, project=tc.tracker_project,
                           uri=tc.mlflow_tracking_uri)
                )  # fmt: skip
    except BaseException:
        close_all(out)
        raise
    return out


def close_all(trackers: list) -> None:
    for t in trackers:
        t.close()
