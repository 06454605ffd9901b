"""The command line, as a user types it: real subprocesses of ``python -m stages.<stage>`` and of
the ``distillery`` command (``stages/cli.py``), Hydra's flags in any position, a closed config."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from stages.lib.config import CONF_DIR, Config
from stages.lib.entry import hydra_entry

REPO = CONF_DIR.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "DISTILLERY_DEBUG": ""}


def cli(*args: str, module: str = "stages.train", cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=ENV,
        timeout=300,
    )


def one_error_line(r: subprocess.CompletedProcess) -> str:
    """The run failed as a user error: exit 2, exactly one line on stderr, nothing on stdout."""
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, (r.returncode, r.stderr)
    assert lines[0].startswith("error: ") and ". Fix: " in lines[0]
    return lines[0]


@pytest.mark.parametrize(
    "args",
    [
        ["+train.bogus=1"],
        ["++train.bogus=1"],
        ["train.bogus=1"],
        ["experiment=demo", "+train.bogus=1", "--cfg", "job"],  # refused in Hydra's modes too
    ],
)
def test_unknown_key_refused_in_every_form(args):
    line = one_error_line(cli(*args))
    assert "unknown config key 'train.bogus'" in line and "closest valid keys: train." in line


def test_mistyped_key_names_the_closest_keys():
    line = one_error_line(cli("train.epoch=3"))
    assert "'train.epoch'" in line and "closest valid keys: train.epochs" in line
    line = one_error_line(cli("select.nope=1", module="stages.select"))
    assert "'select.nope'" in line


@pytest.mark.parametrize(
    "args",
    [
        ["experiment=demo", "train.lr=1e-3", "--cfg", "job"],
        ["--cfg", "job", "experiment=demo", "train.lr=1e-3"],
        ["experiment=demo", "--cfg", "job", "train.lr=1e-3"],
    ],
)
def test_cfg_job_in_any_position_prints_the_config(args):
    r = cli(*args)
    assert r.returncode == 0, r.stderr
    assert "run_dir: runs/demo" in r.stdout and "  lr: 0.001" in r.stdout
    assert "- train.lr=1e-3" in r.stdout  # source: how the config was composed


def test_help_after_overrides():
    r = cli("experiment=demo", "train.lr=1e-3", "--help")
    assert r.returncode == 0, r.stderr
    loss_line = next(ln for ln in r.stdout.splitlines() if ln.startswith("loss: "))
    assert "distillery train" in r.stdout and "exopd" in loss_line.removeprefix("loss: ").split(
        ", "
    )


def own_conf(root: Path) -> Path:
    """A user's own config folder with an experiment built on the demo."""
    (root / "experiment").mkdir(parents=True)
    (root / "experiment" / "mine.yaml").write_text(
        "# @package _global_\n# My run: the demo with vOPD.\n"
        "defaults:\n  - /experiment/demo\n  - override /loss: vopd\n"
        "run_dir: runs/mine\ntrain:\n  lr: 3.0e-4\n"
    )
    return root


@pytest.mark.parametrize("where", ["first", "last", "searchpath"])
def test_own_config_folder_in_any_position(tmp_path, where):
    conf = own_conf(tmp_path / "myconf")
    flag = {
        "first": ["--config-dir", str(conf)],
        "last": ["--config-dir", str(conf)],
        "searchpath": [f"hydra.searchpath=[file://{conf}]"],
    }[where]
    rest = ["experiment=mine", "--cfg", "job"]
    r = cli(*(flag + rest if where == "first" else rest + flag))
    assert r.returncode == 0, r.stderr
    assert "run_dir: runs/mine" in r.stdout and "name: vopd" in r.stdout
    assert "lr: 0.0003" in r.stdout


def test_own_experiment_runs_a_stage(tmp_path):
    """A plain run composes with the folder too: select gets as far as the missing rollouts."""
    conf = own_conf(tmp_path / "myconf")
    r = cli(
        "experiment=mine",
        f"run_dir={tmp_path / 'run'}",
        "--config-dir",
        str(conf),
        module="stages.select",
    )
    line = one_error_line(r)
    assert "rollouts dataset is missing" in line and str(tmp_path / "run") in line


def test_own_primary_config(tmp_path):
    """--config-name picks a primary config of the user's folder, in a plain run and in --cfg."""
    conf = own_conf(tmp_path / "myconf")
    (conf / "mine_select.yaml").write_text(
        f"defaults:\n  - base\n  - _self_\nstage: select\nrun_dir: {tmp_path / 'run'}\n"
    )
    args = ["--config-name", "mine_select", "--config-dir", str(conf)]
    line = one_error_line(cli(*args, module="stages.select"))
    assert "rollouts dataset is missing" in line and str(tmp_path / "run") in line
    r = cli("--cfg", "job", *args)
    assert (
        r.returncode == 0 and "stage: select" in r.stdout and "config_name: mine_select" in r.stdout
    )


def test_bad_values_are_one_line_before_anything_loads(tmp_path):
    run = tmp_path / "run"
    for args, what in [
        # a value check (every one of tests/test_config.py takes this path), Hydra's own
        # composition error, and errors of the command line itself
        (["train.name=../../x"], "train.name='../../x' is not a safe name"),
        (["select=nope"], "Could not find 'select/nope'"),
        (["--config-dir", str(tmp_path / "missing")], "config folder"),
        (["--config-path", str(tmp_path)], "use --config-dir"),
        (["--bogus-flag"], "unrecognized arguments: --bogus-flag"),
    ]:
        assert what in one_error_line(cli(f"run_dir={run}", *args)), args
    assert not run.exists()  # nothing written


def test_distillery_lists_stages_experiments_and_groups():
    r = cli(module="stages.cli")
    assert r.returncode == 0, r.stderr
    for word in ("pipeline", "rollout", "train", "sql", "demo_lightning", "evidence_retain"):
        assert word in r.stdout
    assert "loss" in r.stdout and "topk_fkl" in r.stdout


def test_distillery_lists_own_experiments(tmp_path):
    conf = own_conf(tmp_path / "myconf")
    r = cli("--config-dir", str(conf), module="stages.cli")
    assert r.returncode == 0 and "mine" in r.stdout and "My run: the demo with vOPD" in r.stdout


def test_distillery_dispatches_to_the_stage():
    r = cli("train", "experiment=demo", "--cfg", "job", module="stages.cli")
    assert r.returncode == 0 and "stage: train" in r.stdout
    assert "'train.bogus'" in one_error_line(cli("train", "+train.bogus=1", module="stages.cli"))
    assert "closest: train" in one_error_line(cli("trian", module="stages.cli"))


def test_distillery_is_a_console_script():
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    module, func = scripts["distillery"].split(":")
    import importlib

    assert callable(getattr(importlib.import_module(module), func))


def test_ctrl_c_is_exit_130(capsys):
    def run(cfg: Config) -> None:
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as e:
        hydra_entry("train")(run)(["experiment=demo"])
    assert e.value.code == 130 and capsys.readouterr().err.strip() == "interrupted"
