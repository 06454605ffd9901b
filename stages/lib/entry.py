"""The command line of every stage: Hydra's flags in any position, a closed config, one-line errors.

``python -m stages.<stage> [overrides] [flags]`` (or ``distillery <stage> ...``). The arguments
are read with Hydra's own parser, interleaved (``--cfg job`` may come before, between or after
the overrides). Then:

- a plain run composes with :func:`stages.lib.config.compose`, the same function the pipeline
  and the tests use, and calls the stage: a user mistake anywhere (an unknown key in any form, a
  bad value, a missing file) is one ``error:`` line and exit code 2; Ctrl-C is exit 130;
- ``--cfg``, ``--help``, ``--info``, ``--multirun`` and the other Hydra commands go to Hydra's
  own app, after the same key check, with Hydra's output directories and log files switched off.

``--config-dir DIR`` adds a config folder (searched after ``conf/``), ``hydra.searchpath=[...]``
more; the config records both (``source``), so the pipeline's derived configs search the same
folders. ``--config-name NAME`` picks another primary config (one that includes ``base``).
``--config-path`` (which would replace ``conf/``) is refused with a pointer to ``--config-dir``.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from stages.lib import mirror, remote
from stages.lib.config import (
    CONF_DIR,
    Config,
    Source,
    absolute_dirs,
    check_override_keys,
    compose,
    compose_dict,
    hydra_arg_parser,
    quote,
    to_config,
)
from stages.lib.errors import UserError, report_and_exit

# no Hydra output dirs or log files: runs are keyed by run_dir
QUIET = [
    "hydra.output_subdir=null",
    "hydra.run.dir=.",
    "hydra/job_logging=none",
    "hydra/hydra_logging=none",
]
# Hydra flags that make it do something other than run the stage (Namespace attribute names)
HYDRA_COMMANDS = ("help", "hydra_help", "cfg", "info", "shell_completion", "multirun")
NO_COMPOSE = {"--multirun", "--shell-completion", "--hydra-help"}


@dataclass
class CommandLine:
    """One stage invocation, read from argv."""

    stage: str  # the stage module (stages.<stage>)
    config_name: str  # primary config (the stage's, or --config-name)
    overrides: list[str]  # key=value / group=option, in order
    config_dirs: list[str] = field(default_factory=list)  # --config-dir, absolute
    flags: list[str] = field(default_factory=list)  # Hydra's own flags, for Hydra's app
    direct: bool = True  # a plain run: compose and run here

    @property
    def source(self) -> Source:
        return Source(self.config_name, list(self.overrides), list(self.config_dirs))


def _parser() -> argparse.ArgumentParser:
    parser = hydra_arg_parser()

    def error(message: str) -> None:  # argparse's usage + error, as one line
        raise UserError(
            f"bad command line: {message}",
            "command line",
            "give key=value overrides and Hydra flags (--help lists them)",
        )

    parser.error = error  # type: ignore[method-assign]
    return parser


def parse(stage: str, argv: list[str]) -> CommandLine:
    """Read argv with Hydra's parser, flags and overrides in any order."""
    parser = _parser()
    ns = parser.parse_intermixed_args(argv)
    if ns.config_path:
        raise UserError(
            "--config-path replaces the built-in conf/ folder",
            "command line",
            f"use --config-dir {ns.config_path} (added to conf/, in any position)",
        )
    flags: list[str] = []
    for a in parser._actions:  # rebuild Hydra's flags from the parsed values
        v = getattr(ns, a.dest, None)
        skip = ("overrides", "config_dir", "config_path", "config_name", "version")
        if not a.option_strings or a.dest in skip or v == a.default:
            continue
        flags += [a.option_strings[0]] if v is True else [a.option_strings[0], str(v)]
    if ns.resolve and not (ns.cfg or ns.help):
        raise UserError("--resolve needs --cfg or --help", "command line", "add --cfg job")
    return CommandLine(
        stage=stage,
        config_name=ns.config_name or stage,
        # s3://KEY:SECRET@...: the keys become AWS variables, never printed (--cfg job) or kept
        overrides=[mirror.adopt_credentials(o) for o in ns.overrides],
        config_dirs=absolute_dirs([ns.config_dir] if ns.config_dir else []),
        flags=flags,
        direct=not any(getattr(ns, k) for k in HYDRA_COMMANDS) and not ns.experimental_rerun,
    )


def _hydra_app(cl: CommandLine, run: Callable[[Config], Any]) -> None:
    """Hand a Hydra command (--cfg, --help, --multirun, ...) to Hydra's own app."""
    import hydra

    @hydra.main(config_path=str(CONF_DIR), config_name=cl.config_name, version_base="1.3")
    def _app(dcfg: Any) -> None:
        try:
            cfg = to_config(dcfg)
            cfg.source = cl.source
            run(cfg)
        except UserError as err:
            report_and_exit(err)

    name = [f"hydra.job.name={cl.stage}", f"hydra.help.app_name='distillery {cl.stage}'"]
    # --cfg job shows how the config was composed, as a plain run records it
    src = [
        f"source.config_name={quote(cl.config_name)}",
        f"source.overrides=[{','.join(quote(o) for o in cl.overrides)}]",
        f"source.config_dirs=[{','.join(quote(d) for d in cl.config_dirs)}]",
    ]
    dirs = [a for d in cl.config_dirs for a in ("--config-dir", d)]
    sys.argv = [sys.argv[0], *cl.flags, *dirs, *cl.overrides, *src, *QUIET, *name]
    _app()


def _run_direct(cl: CommandLine, run: Callable[[Config], Any]) -> None:
    cfg = compose(cl.config_name, cl.overrides, config_dirs=cl.config_dirs)
    if cfg.debug:  # debug=true shows the traceback of a user error, as DISTILLERY_DEBUG=1 does
        os.environ["DISTILLERY_DEBUG"] = "1"
    if cl.stage == "pipeline":  # the pipeline opens a session per stage itself
        run(cfg)
        return
    with remote.stage_session(cfg, cl.stage):  # nothing for a local run_dir
        run(cfg)


def hydra_entry(stage: str) -> Callable[[Callable[[Config], Any]], Callable[..., None]]:
    """Make a stage's ``main(argv=None)`` from its ``run(cfg)``."""

    def deco(run: Callable[[Config], Any]) -> Callable[..., None]:
        @functools.wraps(run)
        def main(argv: list[str] | None = None) -> None:
            args = sys.argv[1:] if argv is None else list(argv)
            try:
                cl = parse(stage, args)
                check_override_keys(cl.overrides, cl.config_dirs)
                if cl.direct:
                    _run_direct(cl, run)
                    return
                if not NO_COMPOSE & set(cl.flags):  # sweeps do not compose as they are
                    compose_dict(cl.config_name, cl.overrides, cl.config_dirs)  # one-line errors
            except UserError as err:
                report_and_exit(err)
            except KeyboardInterrupt:
                print("interrupted", file=sys.stderr, flush=True)
                sys.exit(130)
            _hydra_app(cl, run)

        return main

    return deco
