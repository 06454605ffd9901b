"""Every primary config and every experiment composes into the typed Config; bad keys fail."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hydra.errors import ConfigCompositionException

from stages.lib.config import CONF_DIR, Config, compose
from stages.lib.errors import UserError

PRIMARIES = ["rollout", "score", "select", "train", "eval", "sft", "report", "pipeline"]
EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
GROUP_FILES = {
    g: sorted(p.stem for p in (CONF_DIR / g).glob("*.yaml"))
    for g in ("select", "loss", "model", "data", "rollout", "score", "train", "eval")
}


@pytest.mark.parametrize("stage", PRIMARIES)
def test_primary_composes(stage):
    cfg = compose(stage)
    assert isinstance(cfg, Config) and cfg.stage == stage


@pytest.mark.parametrize("exp", EXPERIMENTS)
@pytest.mark.parametrize("stage", PRIMARIES)
def test_experiment_composes(stage, exp):
    cfg = compose(stage, [f"experiment={exp}"])
    assert cfg.run_dir.startswith("runs/") and cfg.student.path and cfg.teacher.path
    assert cfg.data.prompts


@pytest.mark.parametrize("group,name", [(g, n) for g, ns in GROUP_FILES.items() for n in ns])
def test_every_group_option_composes(group, name):
    key = {"model": "model@student"}.get(group, group)
    cfg = compose("train", [f"{key}={name}"])
    if group == "select":
        assert cfg.select.name == name and cfg.select.rules
    if group == "loss":
        assert cfg.loss.name == name and cfg.loss.terms[0].name == name


def test_cli_overrides_win_over_experiment():
    cfg = compose("train", ["experiment=demo", "loss=vopd", "select=entropy_half"])
    assert (cfg.loss.name, cfg.select.name, cfg.train.name) == (
        "vopd",
        "entropy_half",
        "vopd-entropy_half",
    )
    assert cfg.run_dir == "runs/demo"


def test_design_keys_exist():
    cfg = compose(
        "rollout",
        [
            "run_dir=x",
            "seed=3",
            "student.path=s",
            "teacher.path=t",
            "ref.path=r",
            "data.prompts=p.jsonl",
        ],
    )
    assert (
        cfg.run_dir,
        cfg.seed,
        cfg.student.path,
        cfg.teacher.path,
        cfg.ref.path,
        cfg.data.prompts,
    ) == ("x", 3, "s", "t", "r", "p.jsonl")


def test_mistyped_key_fails_at_compose():
    with pytest.raises(ConfigCompositionException):
        compose("rollout", ["rollout.temprature=0.5"])


@pytest.mark.parametrize(
    "override",
    [
        "rollout.guided_fraction=1.5",
        "rollout.top_p=0",
        "score.topk=0",
        "worker.index=3",
        "train.lr=-1",
    ],
)
def test_impossible_values_are_user_errors(override):
    with pytest.raises(UserError, match="impossible config value"):
        compose("rollout", [override])


def test_cli_unknown_key_exits_nonzero(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "stages.select", "select.nope=1"],
        capture_output=True,
        text=True,
        cwd=CONF_DIR.parent,
    )
    assert r.returncode != 0 and "nope" in r.stderr
