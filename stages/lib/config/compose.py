"""Composition: the one way to build a ``Config`` (:func:`compose`), and the configs the pipeline derives from it."""

from __future__ import annotations

import argparse
import dataclasses
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from stages.lib import mirror
from stages.lib.config.keys import (
    _one_line,
    _unknown_in_tree,
    check_override_keys,
    unknown_key_error,
)
from stages.lib.config.root import Config, Source, TrainVariant
from stages.lib.config.schema import CONF_DIR
from stages.lib.errors import UserError
from stages.lib.layout import RunLayout


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


def hydra_arg_parser() -> argparse.ArgumentParser:
    """Hydra's own command-line parser (``stages/lib/entry.py`` reads argv with it). Hydra's
    private API is used in this module only: here and in :func:`compose_dict`."""
    from hydra._internal.utils import get_args_parser

    return get_args_parser()


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
    ovs, dirs = [mirror.adopt_credentials(o) for o in overrides or []], absolute_dirs(config_dirs)
    check_override_keys(ovs, dirs, where)
    cfg = to_config(compose_dict(config_name, ovs, dirs, where), where)
    cfg.source = Source(config_name=config_name, overrides=ovs, config_dirs=dirs)
    return cfg


# ----------------------------------------------------------------------------- derived configs
_PLAIN = re.compile(r"^[A-Za-z0-9_./\-+:@]+\Z")  # \Z: a trailing newline is not plain


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
