"""Packaging: the wheel carries the configs inside the package, and composition finds them.

``conf/`` is the user-facing config tree of the repository; a built wheel installs it as
``stages/conf/`` (pyproject.toml ``package-dir``), so nothing named ``conf`` lands at the top of
site-packages. Built from a clean copy of the tracked sources (setuptools' ``build/`` folder would
otherwise carry files of older layouts into the wheel), unpacked the way pip installs it, and used
from a folder where the repository is not importable.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from stages.lib.config import CONF_DIR, compose

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ("pyproject.toml", "README.md", "conf", "stages", "data_schemas")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = tmp_path_factory.mktemp("src")
    for name in SOURCES:
        p = ROOT / name
        if p.is_dir():
            shutil.copytree(p, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(p, src / name)
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(out), str(src)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    (whl,) = out.glob("distillery-*.whl")
    return whl


def test_every_package_is_listed_in_pyproject() -> None:
    """The packages are listed by hand (``conf`` is mapped into ``stages``): a new sub-package
    must be listed too, or the installed wheel lacks it."""
    listed = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    found = {
        ".".join(p.parent.relative_to(ROOT).parts)
        for top in ("stages", "data_schemas")
        for p in (ROOT / top).rglob("__init__.py")
    }
    assert found <= listed, (
        f"pyproject.toml [tool.setuptools] packages misses {sorted(found - listed)}"
    )


def test_repository_checkout_composes_from_conf() -> None:
    assert CONF_DIR == ROOT / "conf"
    assert compose("pipeline", ["experiment=demo"]).source.config_name == "pipeline"


def test_wheel_ships_every_config_under_the_package(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"stages", "data_schemas"}, tops  # no top-level conf package
    yamls = sorted(p.relative_to(ROOT / "conf").as_posix() for p in (ROOT / "conf").rglob("*.yaml"))
    shipped = sorted(n.removeprefix("stages/conf/") for n in names if n.startswith("stages/conf/"))
    assert shipped == yamls
    modules = sorted(
        p.relative_to(ROOT).as_posix()
        for top in ("stages", "data_schemas")
        for p in (ROOT / top).rglob("*.py")
        if "__pycache__" not in p.parts
    )
    missing = [m for m in modules if m not in names]  # a sub-package not listed in pyproject.toml
    assert not missing, f"the wheel lacks {missing[:5]}: add their package to pyproject.toml"
    for pkg_data in (
        "stages/sql_policies/tip_q3.sql",
        "stages/report_assets/report.js",
        "stages/report_assets/report.html.j2",
    ):
        assert pkg_data in names


def test_installed_package_composes_from_its_own_configs(wheel: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)  # what pip puts in site-packages
    elsewhere = tmp_path / "elsewhere"  # neither the repository nor its conf/ is reachable here
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    code = (
        "from stages.lib.config import CONF_DIR, compose\n"
        "cfg = compose('pipeline', ['experiment=demo', 'loss=vopd'])\n"
        "print(CONF_DIR)\n"
        "print(cfg.loss.terms[0].name)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=elsewhere, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    conf, loss = out.stdout.split()
    assert Path(conf) == site / "stages" / "conf"
    assert loss == compose("pipeline", ["experiment=demo", "loss=vopd"]).loss.terms[0].name
    # the command line (Hydra's own app for --cfg) finds them too
    out = subprocess.run(
        [sys.executable, "-m", "stages.select", "experiment=demo", "--cfg", "job"],
        cwd=elsewhere, env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "policies:" in out.stdout or "select:" in out.stdout
