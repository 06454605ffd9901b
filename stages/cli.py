"""``distillery``: one command for every stage, and a map of what can be configured.

    distillery                                   # the stages, experiments and config groups
    distillery --config-dir DIR                  # the same, with a folder of your own configs
    distillery <stage> [key=value ...] [flags]   # = python -m stages.<stage> ...
    distillery train experiment=demo --cfg job   # print a stage's resolved config

Stages are the modules under ``stages/`` with a ``main``; ``sql`` is ``distillery-sql``. The
listing reads module docstrings and the ``conf/`` folders without importing the stages (fast).
"""

from __future__ import annotations

import ast
import difflib
import importlib
import importlib.util
import sys
from pathlib import Path

from stages.lib.config import CONF_DIR, STAGES
from stages.lib.errors import UserError, report_and_exit

COMMANDS = ("pipeline", *STAGES, "sql")
USAGE = "usage: distillery <stage> [key=value | group=option ...] [--cfg job] [--help]"


def _short(text: str, width: int = 88) -> str:
    """The first sentence of ``text``, cut to ``width`` characters."""
    first = " ".join(text.split()).split(". ")[0].rstrip(".")
    return first if len(first) <= width else first[: width - 3].rstrip() + "..."


def _summary(module: str) -> str:
    """The first sentence of a stage module's docstring (read, not imported), after its label."""
    spec = importlib.util.find_spec(f"stages.{module}")
    if spec is None or spec.origin is None:
        return ""
    doc = (ast.get_docstring(ast.parse(Path(spec.origin).read_text())) or "").strip()
    label, sep, rest = doc.partition(": ")
    return _short(rest if sep and len(label) < 25 else doc)


def _first_comment(path: Path) -> str:
    """The first sentence of a YAML file's leading comment (Hydra directives skipped)."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        if not line.startswith("# @"):
            lines.append(line.lstrip("# "))
    return _short(" ".join(lines))


def groups(dirs: list[Path]) -> dict[str, list[str]]:
    """Config group -> its options, over the config folders (first folder first)."""
    out: dict[str, set[str]] = {}
    for d in dirs:
        for f in sorted(d.rglob("*.yaml")):
            if f.parent != d:
                out.setdefault(f.parent.relative_to(d).as_posix(), set()).add(f.stem)
    return {g: sorted(opts) for g, opts in sorted(out.items())}


def experiments(dirs: list[Path]) -> dict[str, str]:
    out: dict[str, str] = {}
    for d in dirs:
        for f in sorted((d / "experiment").glob("*.yaml")):
            out.setdefault(f.stem, _first_comment(f))
    return out


def overview(config_dirs: list[Path]) -> str:
    dirs = [CONF_DIR, *config_dirs]
    lines = [
        "distillery: offline on-policy distillation, one stage at a time or all in order.",
        USAGE,
        "",
        "stages (distillery <stage> ... = python -m stages.<stage> ...):",
    ]
    lines += [f"  {c:<10s}{_summary(c)}" for c in COMMANDS]
    lines += ["", "experiments (experiment=<name>: a whole run pinned in one file):"]
    lines += [f"  {n:<18s}{doc}" for n, doc in experiments(dirs).items()]
    lines += ["", "config groups (<group>=<option>; model as model@student|teacher|ref=):"]
    lines += [
        f"  {g:<12s}{' '.join(opts)}" for g, opts in groups(dirs).items() if g != "experiment"
    ]
    lines += [
        "",
        "Every key: distillery <stage> --cfg job. Your own config folder: --config-dir DIR or",
        "hydra.searchpath=[file://DIR], in any position. More: docs/CONFIG.md.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        if not args or args[0] in ("-h", "--help", "help") or args[0].startswith("--config-dir"):
            dirs = [Path(a.split("=", 1)[1]) for a in args if a.startswith("--config-dir=")]
            dirs += [Path(b) for a, b in zip(args, args[1:]) if a == "--config-dir"]
            print(overview(dirs))
            return
        cmd, rest = args[0], args[1:]
        if cmd not in COMMANDS:
            near = difflib.get_close_matches(cmd, COMMANDS, n=2)
            raise UserError(
                f"unknown stage {cmd!r}",
                "distillery",
                f"use one of {list(COMMANDS)}" + (f" (closest: {', '.join(near)})" if near else ""),
            )
    except UserError as err:
        report_and_exit(err)
    sys.argv = [f"distillery {cmd}", *rest]
    importlib.import_module(f"stages.{cmd}").main(rest)


if __name__ == "__main__":
    main()
