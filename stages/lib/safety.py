"""Checks for names and paths that come from outside the code: config values and files on disk.

A run directory, a bucket and a model folder may have been handed over by someone else
(docs/RELIABILITY.md, threat models). Pure functions, no imports from the rest of the library:

- ``is_safe_name``/``check_disk_name``: the one rule for a name that becomes a path component,
  a SQL identifier or a dataset label (config names use it through ``layout.check_name``);
- ``quote_ident``: a SQL identifier, quoted (names are checked first; quoting is the second wall);
- ``check_output``: a folder a stage writes or deletes in must not lead out of the run through a
  symlink (the folder itself, a folder above it inside the run, or anything inside it);
- ``check_object_key``, ``redact``, ``split_credentials``, ``parse_json_object``: object storage
  keys become local paths only when they are plain relative keys; credentials in a URI never
  reach a log, an error, a mirror path or a manifest.
"""

from __future__ import annotations

import json
import os
import re
import urllib.parse
from pathlib import Path

from data_schemas.errors import UserError

# 1-128 of letters, digits, '.', '_', '-'; not starting with '.' or '-'; no '..'. ``fullmatch``:
# a trailing newline (a YAML block scalar) is not accepted as it would be with ``$``.
SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}")
NAME_RULE = "1-128 characters from letters, digits, '.', '_' and '-' (not starting with '.')"


def is_safe_name(name: object) -> bool:
    """Whether ``name`` is safe as one path component, SQL identifier and label."""
    return isinstance(name, str) and SAFE_NAME.fullmatch(name) is not None and ".." not in name


def check_disk_name(name: str, path: Path | str, what: str = "folder") -> str:
    """``name`` (read from disk: a folder or a key in a file) if safe, else a UserError naming
    where it was found. Nothing derived from it has been run or created yet."""
    if not is_safe_name(name):
        raise UserError(
            f"{what} name {name!r} is not a safe name (it is read from disk and would become a "
            "SQL view and a path)",
            str(path),
            f"rename or remove it: names are {NAME_RULE}",
        )
    return name


def quote_ident(name: str) -> str:
    """A SQL identifier in double quotes (inner quotes doubled)."""
    return '"' + str(name).replace('"', '""') + '"'


# ----------------------------------------------------------------------------- symlinks
def _inside(p: Path, root: Path) -> bool:
    return p == root or root in p.parents


def _escape(link: Path, root: Path) -> Path | None:
    """Where ``link`` (a symlink) points when that is outside ``root`` (resolved), else None."""
    target = link.resolve()
    return None if _inside(target, root) else target


def symlink_escapes(path: Path | str, root: Path | str) -> list[tuple[Path, Path]]:
    """(link, target) for every symlink that leads out of ``root``: on the way from ``root`` to
    ``path`` (the part below ``root``) and anywhere inside ``path`` (not followed). ``root``
    itself may be a symlink: the run dir is the user's choice."""
    root_r = Path(os.path.abspath(root)).resolve()
    path = Path(os.path.abspath(path))
    base = Path(os.path.abspath(root))
    try:
        rel = path.relative_to(base)
    except ValueError:
        rel = None
    out: list[tuple[Path, Path]] = []
    if rel is None:  # not under the run dir as given: compare where it really is
        if not _inside(path.resolve(), root_r):
            out.append((path, path.resolve()))
        return out
    cur = base
    for part in rel.parts:
        cur = cur / part
        if cur.is_symlink():
            target = _escape(cur, root_r)
            if target is not None:
                out.append((cur, target))
                return out  # nothing below it is inside the run
        elif not cur.exists():
            return out
    if path.is_dir():
        for top, dirs, files in os.walk(path, followlinks=False):
            for n in dirs + files:
                p = Path(top) / n
                if p.is_symlink():
                    target = _escape(p, root_r)
                    if target is not None:
                        out.append((p, target))
    return out


def check_output(path: Path | str, root: Path | str, key: str) -> Path:
    """``path`` if a stage may write and delete in it: no symlink on the way from the run dir
    ``root`` to it, or inside it, leads out of the run. Else one UserError; nothing touched."""
    bad = symlink_escapes(path, root)
    if bad:
        link, target = bad[0]
        raise UserError(
            f"{link} is a symlink to {target}, outside the run dir: writing {key} there would "
            "change files that are not this run's",
            str(link),
            "remove the symlink (or copy the data into the run dir), or choose another run_dir",
        )
    return Path(path)


# ----------------------------------------------------------------------------- object storage
# scheme://user:secret@bucket/...: what a URI with credentials looks like (userinfo before '@')
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<info>[^/@\s\"']+)@")
REDACTED = "***"


def redact(text: str) -> str:
    """``text`` with the credentials of every URI in it replaced by ``***``."""
    return _USERINFO.sub(lambda m: f"{m['scheme']}{REDACTED}@", str(text))


def split_credentials(text: str) -> tuple[str, str, tuple[str, str] | None]:
    """(``text`` without the credentials of its first URI, that URI's scheme, (key, secret)) for
    a text holding ``scheme://key:secret@rest`` (a URI, an override ``k='URI'``); (text, "",
    None) without credentials. A user part without a secret gives (key, ""); both are
    percent-decoded (a secret with '/' is written %2F in a URI)."""
    m = _USERINFO.search(text)
    if m is None:
        return text, "", None
    key, _, secret = m["info"].partition(":")
    creds = (urllib.parse.unquote(key), urllib.parse.unquote(secret))
    return text[: m.start()] + m["scheme"] + text[m.end() :], m["scheme"][:-3], creds


def check_object_key(path: str, base: str, uri: str) -> str:
    """The part of the object path ``path`` under the run prefix ``base`` when it is a safe
    relative key (no empty, '.' or '..' segment, no backslash or control character), else one
    UserError naming the object: it is checked before any local path is made from it."""
    rel = path[len(base) + 1 :] if path.startswith(base + "/") else None
    parts = rel.split("/") if rel else []
    if not parts or any(p in ("", ".", "..") or "\\" in p or not p.isprintable() for p in parts):
        raise UserError(
            f"object key {path!r} in the bucket is not a relative key under the run prefix "
            "(empty, '.' or '..' parts, or control characters): it cannot become a local file",
            redact(uri),
            "delete or rename that object; stages write keys such as "
            "<run>/rollouts/bucket=000/shard-00000.parquet",
        )
    return rel


def parse_json_object(raw: bytes | str, what: str, where: str, fix: str) -> dict:
    """A JSON object read from a bucket or a file, or one UserError (truncated, not UTF-8, not
    an object) naming it."""
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{what} is not valid JSON ({e.__class__.__name__})", where, fix) from None
    if not isinstance(doc, dict):
        raise UserError(f"{what} is not a JSON object", where, fix)
    return doc
