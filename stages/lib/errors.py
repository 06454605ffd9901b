"""One error type for user mistakes, and the entry-point wrapper that prints it as one line.

A ``UserError`` says what is wrong, where, and how to fix it. Entry points catch it, print
``error: <what> (<where>). Fix: <fix>`` to stderr and exit with status 2; the traceback is shown
only when ``DISTILLERY_DEBUG=1`` is set (or the config has ``debug=true``).
"""

from __future__ import annotations

import errno
import functools
import os
import signal
import sys
import traceback
from collections.abc import Callable
from typing import Any

from data_schemas.errors import UserError
from stages.lib import progress
from stages.lib.safety import redact

EXIT_USER_ERROR = 2

__all__ = ["UserError", "report_and_exit", "user_errors_exit", "fault_point"]


def debug_enabled() -> bool:
    return os.environ.get("DISTILLERY_DEBUG", "") not in ("", "0", "false")


def report_and_exit(err: BaseException) -> None:
    """Print a user error as one readable line and exit non-zero (traceback only in debug)."""
    if debug_enabled():
        traceback.print_exception(err)
    progress.close_all()  # a live progress bar would swallow the start of the line
    if isinstance(err, UserError):
        print(f"error: {redact(err.line())}", file=sys.stderr, flush=True)
    else:
        print(f"error: {type(err).__name__}: {redact(str(err))}", file=sys.stderr, flush=True)
        if not debug_enabled():
            print("(set DISTILLERY_DEBUG=1 for the traceback)", file=sys.stderr, flush=True)
    sys.exit(EXIT_USER_ERROR if isinstance(err, UserError) else 1)


def user_errors_exit(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator for entry points: a UserError becomes one line on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except UserError as err:
            report_and_exit(err)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            sys.exit(130)

    return wrapper


_FAULT_HITS: dict[str, int] = {}


def fault_point(name: str) -> None:
    """Fault-injection seam for the reliability tests (tests/test_reliability.py); off by default.

    ``DISTILLERY_FAULT=<point>:<n>[:<action>]`` makes the ``n``-th pass of this process through
    the point ``name`` SIGKILL the process (action ``kill``, the default: no cleanup, no flush, as
    an OOM killer or a preempted node would) or raise ``OSError(ENOSPC)`` (action ``enospc``: a
    full disk). Points: ``model_load``, ``mid_shard`` (temp shard half written), ``before_rename``,
    ``after_shard``, ``before_manifest``, ``mid_manifest`` (temp manifest written, not renamed),
    ``mid_checkpoint`` (train: weights saved, trainer state not yet).
    """
    spec = os.environ.get("DISTILLERY_FAULT")
    if not spec or spec.split(":", 1)[0] != name:
        return
    parts = spec.split(":")
    n, action = (parts[1:2] or ["1"])[0], (parts[2:3] or ["kill"])[0]
    _FAULT_HITS[name] = _FAULT_HITS.get(name, 0) + 1
    if _FAULT_HITS[name] != int(n):
        return
    if action == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    os.kill(os.getpid(), signal.SIGKILL)
