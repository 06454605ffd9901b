"""The thread setup of every entry point: OpenMP threads that sleep when they wait, not spin.

torch's CPU kernels (and MKL inside them) run on GNU OpenMP. By default a thread that finishes its
share of a parallel region spins for ~300k iterations before it sleeps, on the bet that a core is
its own. On a machine shared with other jobs that bet fails: a spinning thread burns the time
slice its descheduled sibling needs, and every region waits for the slowest thread. Measured with
``scripts/bench_threads.py`` (docs/BENCHMARKS.md, "Raised targets"): a small Llama training step
on 2 threads beside busy processes ran many times slower than its fair share with the default
policy, close to it with ``OMP_WAIT_POLICY=PASSIVE``, and as fast as the default on an idle
machine. The policy changes scheduling only, never results: the thread count (which fixes the
reduction order, so the bits) stays what it was.

OpenMP reads its environment once, when torch loads it, so :func:`setup` must run before the
first ``import torch``: ``stages/__init__.py`` calls it (every ``python -m stages.<stage>`` and
``distillery`` command imports the package first), and so do the demo-world scripts. A value the
user set in the environment wins.
"""

from __future__ import annotations

import os

# environment defaults, read by OpenMP when torch loads it
ENV = {"OMP_WAIT_POLICY": "PASSIVE"}


def setup() -> dict[str, str]:
    """Set the defaults the user has not set; return the values in effect (for OpenMP only when
    called before torch is imported)."""
    for k, v in ENV.items():
        os.environ.setdefault(k, v)
    return {k: os.environ[k] for k in ENV}
