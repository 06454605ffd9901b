"""What a stage tells its user while it runs: log lines and progress, one way for every stage.

- ``log``: the ``distillery`` logger (stdlib ``logging``). Plain lines on stdout, as the stages
  always printed them; under torchrun only rank 0 writes info lines (every rank its warnings), so
  a line appears once per job. Reconfigure it like any logger (``logging.getLogger("distillery")``).
- ``Progress``: one helper for every long loop (rollout sampling, scoring, evaluation, training
  steps): when stdout is a TTY a tqdm bar (cleared at the end), otherwise (a log file, a pipe, a
  scheduler) one plain line per ``every`` seconds and one at the end, so a log shows that the
  stage is alive and how far it got. ``close_all`` ends the live bars (before an error line).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any


def rank() -> int:
    """This process's rank: torch.distributed's when a group is up, else ``RANK`` (torchrun), else 0."""
    tdist = sys.modules.get("torch.distributed")
    if tdist is not None and tdist.is_available() and tdist.is_initialized():
        return tdist.get_rank()
    return int(os.environ.get("RANK", "0") or 0)


class RankZeroFilter(logging.Filter):
    """Info lines from rank 0 only; warnings and errors from every rank."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or rank() == 0


class _Stdout(logging.StreamHandler):
    """A handler on whatever ``sys.stdout`` is at the time of the line (a test's capture, a
    redirected stream), flushed per line like the prints it replaces."""

    def __init__(self) -> None:
        super().__init__(sys.stdout)

    @property
    def stream(self) -> Any:  # type: ignore[override]
        return sys.stdout

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def _logger() -> logging.Logger:
    logger = logging.getLogger("distillery")
    if not any(isinstance(h, _Stdout) for h in logger.handlers):
        handler = _Stdout()
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler.addFilter(RankZeroFilter())
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False  # one line, not one more through the root logger
    return logger


log = _logger()
_LIVE: set[Any] = set()  # the tqdm bars open now


def close_all() -> None:
    """Close every live bar (a bar on the terminal would swallow the start of the next line)."""
    for bar in list(_LIVE):
        bar.close()
    _LIVE.clear()


class Progress:
    """A tqdm bar on a terminal; on a log (stdout not a TTY), one line every ``every`` seconds
    (``every=None``: no periodic lines, the caller logs its own). ``shown=False`` shows nothing
    (another rank's loop); ``initial``: units already done (a resumed run)."""

    def __init__(
        self,
        total: int,
        desc: str,
        unit: str = "prompts",
        every: float | None = 30.0,
        *,
        initial: float = 0,
        shown: bool = True,
    ):
        from tqdm import tqdm

        self.total, self.desc, self.unit, self.every = total, desc, unit, every
        self.done = float(initial)
        self.shown = shown
        self.tty = shown and sys.stdout.isatty()
        self.bar = None
        if self.tty:
            self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, leave=False)
            _LIVE.add(self.bar)
        self.t0 = self.last = time.perf_counter()

    def update(self, n: float) -> None:
        """``n`` more units done (a float: a caller may count in scaled units)."""
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            return
        if not self.shown or self.every is None:
            return
        now = time.perf_counter()
        if now - self.last >= self.every or self.done >= self.total:
            self.last = now
            pct = 100 * min(self.done, self.total) / max(self.total, 1)
            log.info(
                f"[{self.desc}] {round(self.done)}/{self.total} {self.unit} ({pct:.0f}%), "
                f"{now - self.t0:.0f} s"
            )

    def postfix(self, **values: str) -> None:
        """Figures shown after the bar (a terminal only)."""
        if self.bar is not None:
            self.bar.set_postfix(**values)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            _LIVE.discard(self.bar)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Scaled:
    """Forwards ``update(n)`` to a Progress as ``n * factor`` (work counted in another unit, e.g.
    tokens x passes reported as rollout tokens)."""

    def __init__(self, progress: Progress, factor: float):
        self.progress, self.factor = progress, factor

    def update(self, n: float) -> None:
        self.progress.update(n * self.factor)


class Quiet:
    """A progress sink that shows nothing (e.g. a Ray actor's shard: the driver reports progress)."""

    def update(self, n: float) -> None:
        pass

    def close(self) -> None:
        pass


QUIET = Quiet()
