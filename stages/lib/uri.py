"""Run URIs, dependency-free: a plain path, ``file://``, or an object-store URI (``s3://``, ``gs://``), and
the local working mirror a remote run is read and written through (``stages/lib/remote.py``).

Imports nothing of the library but the error type, so the run layout (``layout.py``), the store
and the remote session can all name paths without importing each other."""

from __future__ import annotations

import os
from pathlib import Path

from data_schemas.errors import UserError

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
    return Path(os.environ.get(ENV_MIRROR) or Path.home() / ".cache/distillery/mirror")


def split(uri: str) -> tuple[str, str]:
    """(scheme, "bucket/key") of a remote URI, without trailing slashes."""
    scheme, rest = uri.split("://", 1)
    rest = rest.strip("/")
    if not rest or ".." in rest.split("/"):
        raise UserError(f"bad object storage URI {uri!r}", "run_dir", "use s3://bucket/prefix")
    return scheme, rest


def mirror_of(uri: str) -> Path:
    """The local working mirror of a remote run (the same path on every machine)."""
    scheme, rest = split(uri)
    return mirror_root() / scheme / rest


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *parts])
