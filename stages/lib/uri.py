"""Run URIs: a plain path, ``file://``, or an object-store URI (``s3://``, ``gs://``), and the
local working mirror a remote run is read and written through (``stages/lib/mirror.py``).

Dependency-free: it imports nothing of the library but ``safety`` (credentials in a URI, itself
stdlib-only), so the run layout, the store and the remote session can all name paths without
importing each other."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from data_schemas.errors import UserError
from stages.lib import safety

REMOTE_SCHEMES = ("s3://", "gs://", "gcs://")
ENV_MIRROR = "DISTILLERY_MIRROR"  # the mirror root (default ~/.cache/distillery/mirror)


# ----------------------------------------------------------------------------- names
def is_remote(run_dir: str | Path | None) -> bool:
    return isinstance(run_dir, str) and run_dir.startswith(REMOTE_SCHEMES)


def local_path(run_dir: str | Path) -> str:
    """A plain path as it is; ``file:///x`` as ``/x``."""
    s = str(run_dir)
    return s[len("file://") :] if s.startswith("file://") else s


def mirror_root() -> Path:
    """``$DISTILLERY_MIRROR`` (default ``~/.cache/distillery/mirror``); ``{host}`` and ``{pid}`` in
    it become this machine's name and this process's id (a home folder shared by several nodes:
    ``~/mirror-{host}``; one mirror per Ray actor, as separate machines have)."""
    raw = os.environ.get(ENV_MIRROR) or str(Path.home() / ".cache/distillery/mirror")
    return Path(raw.replace("{host}", socket.gethostname()).replace("{pid}", str(os.getpid())))


def split(uri: str) -> tuple[str, str]:
    """(scheme, "bucket/key") of a remote URI, without trailing slashes (nor credentials)."""
    scheme, rest = safety.split_credentials(uri)[0].split("://", 1)
    rest = rest.strip("/")
    if not rest or ".." in rest.split("/"):
        raise UserError(
            f"bad object storage URI {safety.redact(uri)!r}", "run_dir", "use s3://bucket/prefix"
        )
    return scheme, rest


def mirror_of(uri: str) -> Path:
    """The local working mirror of a remote run (the same path on every machine)."""
    scheme, rest = split(uri)
    return mirror_root() / scheme / rest


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *parts])
