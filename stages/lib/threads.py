"""The thread setup of every entry point: OpenMP threads that spin briefly, then sleep.

torch's CPU kernels (and MKL inside them) run on GNU OpenMP. By default a thread that finishes its
share of a parallel region spins for 300,000 iterations (milliseconds) before it sleeps, on the
bet that a core is its own. On a machine shared with other jobs that bet fails: a spinning thread
burns the time slice its descheduled sibling needs, and every region waits for the slowest
thread. ``GOMP_SPINCOUNT=1000`` (tens of microseconds) still catches the next region of a step on
an idle machine and gives the core back soon under load. Measured with
``scripts/bench_threads.py`` (docs/BENCHMARKS.md, "Raised targets"), a small Llama training
step on 2 threads: as fast as the default when the machine is idle (``OMP_WAIT_POLICY=PASSIVE``,
no spinning at all, was ~20 % slower there), and as fast as passive beside busy processes, where
the default ran 10-25x slower. The setting changes scheduling only, never results: the thread
count (which fixes the reduction order, so the bits) stays what it was.

OpenMP reads its environment once, when torch loads it, so :func:`setup` must run before the
first ``import torch``: ``stages/__init__.py`` calls it (every ``python -m stages.<stage>`` and
``distillery`` command imports the package first), and so does the demo world's package
(``scripts/demoworld/__init__.py``). A value the user set in the environment wins
(``OMP_WAIT_POLICY`` too: with it set, nothing is added). Processes a stage starts (vLLM's engine
core) inherit the variable. One case it cannot reach: a libgomp loaded before Python starts
(``LD_PRELOAD=.../libgomp.so``, as vLLM's CPU platform sets for its workers) has read its
environment already; export ``GOMP_SPINCOUNT=1000`` in the shell there.
"""

from __future__ import annotations

import os

# environment defaults, read by GNU OpenMP when torch loads it
ENV = {"GOMP_SPINCOUNT": "1000"}
# variables by which a user already chose a waiting policy: then the setup adds nothing
USER_CHOICE = ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")


def setup() -> dict[str, str]:
    """Set the defaults unless the user chose a policy; return the variables in effect (they
    reach OpenMP only when this runs before torch is imported)."""
    if not any(k in os.environ for k in USER_CHOICE):
        os.environ.update(ENV)
    return {k: os.environ[k] for k in USER_CHOICE if k in os.environ}
