"""Progress of a long stage: a bar on a terminal, a line every ~30 s in a log.

One helper for every long loop (rollout sampling, scoring, evaluation): when stdout is a TTY a
tqdm bar (cleared at the end), otherwise (a log file, a pipe, a scheduler) one plain line per
``every`` seconds and one at the end, so a log shows that the stage is alive and how far it got.
"""

from __future__ import annotations

import sys
import time


class Progress:
    """A tqdm bar on a terminal; on a log (stdout not a TTY), one line every ``every`` seconds."""

    def __init__(self, total: int, desc: str, unit: str = "prompts", every: float = 30.0):
        from tqdm import tqdm

        self.total, self.desc, self.unit, self.every = total, desc, unit, every
        self.done = 0.0
        self.tty = sys.stdout.isatty()
        self.bar = tqdm(total=total, desc=desc, unit=unit, leave=False) if self.tty else None
        self.t0 = self.last = time.perf_counter()

    def update(self, n: float) -> None:
        """``n`` more units done (a float: a caller may count in scaled units)."""
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.perf_counter()
        if now - self.last >= self.every or self.done >= self.total:
            self.last = now
            pct = 100 * min(self.done, self.total) / max(self.total, 1)
            print(
                f"[{self.desc}] {round(self.done)}/{self.total} {self.unit} ({pct:.0f}%), "
                f"{now - self.t0:.0f} s",
                flush=True,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


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
