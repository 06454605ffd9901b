"""The closed schema: an unknown key fails at compose time, in every override form, with the closest known keys."""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from stages.lib.config.root import Config
from stages.lib.config.schema import CONF_DIR
from stages.lib.errors import UserError


# ------------------------------------------------------------------------- the closed schema
def _unwrap(t: Any) -> Any:
    """``X | None`` -> ``X``."""
    if typing.get_origin(t) is typing.Union or isinstance(t, types.UnionType):
        args = [a for a in typing.get_args(t) if a is not type(None)]
        return args[0] if len(args) == 1 else t
    return t


def _schema_miss(parts: list[str]) -> tuple[list[str], list[str]] | None:
    """None when the dotted key ``parts`` names a key of ``Config`` (anything below a dict-typed
    key is free), else (the valid prefix, the valid keys at the point where it left the schema)."""
    t: Any = Config
    for i, part in enumerate(parts):
        t = _unwrap(t)
        if dataclasses.is_dataclass(t):
            hints = typing.get_type_hints(t)
            if part not in hints:
                return parts[:i], list(hints)
            t = hints[part]
        elif typing.get_origin(t) is list:
            if not part.isdigit():
                return parts[:i], []
            t = typing.get_args(t)[0]
        elif typing.get_origin(t) is dict or t in (dict, Any):
            return None
        else:  # a scalar has no keys below it
            return parts[:i], []
    return None


def _all_keys(t: Any = Config, prefix: str = "") -> list[str]:
    out = []
    for name, ft in typing.get_type_hints(t).items():
        key = f"{prefix}{name}"
        out.append(key)
        if dataclasses.is_dataclass(_unwrap(ft)):
            out += _all_keys(_unwrap(ft), f"{key}.")
    return out


def unknown_key_error(key: str, where: str) -> UserError:
    """The one-line error for a key the schema does not have, with the closest valid keys."""
    miss = _schema_miss(key.split("."))
    prefix, siblings = miss if miss else ([], [])
    near = difflib.get_close_matches(key, _all_keys(), n=3, cutoff=0.6)
    if not near and siblings:  # the nearest keys of the same group, however far
        last = key.split(".")[len(prefix)]
        near = [".".join([*prefix, s]) for s in difflib.get_close_matches(last, siblings, 3, 0)]
    hint = f"closest valid keys: {', '.join(near)}; " if near else ""
    return UserError(
        f"unknown config key '{key}'",
        where,
        f"{hint}--cfg job prints every key (the config is closed: +key and ++key do not add keys)",
    )


def _unknown_in_tree(node: Any, prefix: str = "") -> str | None:
    """The first key of a composed tree that its dataclass does not have (+key/++key add them)."""
    if isinstance(node, DictConfig):
        t = OmegaConf.get_type(node)
        fields = {f.name for f in dataclasses.fields(t)} if dataclasses.is_dataclass(t) else None
        for k, v in node.items_ex(resolve=False):
            if fields is not None and k not in fields:
                return f"{prefix}{k}"
            bad = _unknown_in_tree(v, f"{prefix}{k}.")
            if bad:
                return bad
    elif isinstance(node, ListConfig):
        for j, v in enumerate(node._iter_ex(resolve=False)):
            bad = _unknown_in_tree(v, f"{prefix}{j}.")
            if bad:
                return bad
    return None


def is_config_group(key: str, search_dirs: Sequence[Path]) -> bool:
    """Is ``key`` a config group (a folder of option files) in one of the config folders?"""
    return any((Path(d) / key).is_dir() for d in search_dirs)


def _search_dirs(overrides: Sequence[str], config_dirs: Sequence[str]) -> list[Path]:
    """conf/, the extra config folders and the file:// folders of a hydra.searchpath override."""
    dirs = [CONF_DIR, *map(Path, config_dirs)]
    for ov in overrides:
        key, _, value = ov.lstrip("+").partition("=")
        if key == "hydra.searchpath":
            for entry in re.findall(r"file://([^,\]'\"]+)", value):
                dirs.append(Path(entry.strip()))
    return dirs


def _one_line(e: BaseException) -> str:
    """Hydra's and OmegaConf's multi-line messages as one line (option lists joined by commas,
    the config search path left out)."""
    parts: list[str] = []
    for msg in (str(e), str(e.__cause__ or "")):
        for raw in msg.splitlines():
            if raw.startswith("Config search path"):
                break
            line = raw.strip()
            if not line:
                continue
            if raw.startswith("\t") and parts:  # an option of the list above
                parts[-1] += (" " if parts[-1].endswith(":") else ", ") + line
            else:
                parts.append(line)
    return "; ".join(parts)[:500]


def check_override_keys(
    overrides: Sequence[str], config_dirs: Sequence[str] = (), where: str = "command line"
) -> None:
    """Refuse an override of a key the schema does not have, in every form (``key=``, ``+key=``,
    ``++key=``, ``~key``), before Hydra composes (which would add a ``+key`` silently)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except HydraException as e:
        raise UserError(
            f"malformed override: {_one_line(e)}",
            where,
            "write key=value or group=option (quote a value with spaces: key='a b')",
        ) from None
    dirs = _search_dirs(overrides, config_dirs)
    for o in parsed:
        key = o.key_or_group
        if key.split(".")[0] in ("hydra",) or key.startswith("hydra/"):
            continue  # Hydra's own settings
        if o.package is not None or is_config_group(key, dirs):
            continue  # group=option: Hydra says when the option does not exist
        if _schema_miss(key.split(".")) is not None:
            raise unknown_key_error(key, f"{where}: {o.input_line}")
