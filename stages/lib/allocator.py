"""Freed memory kept for the next step: glibc's heap settings while a stage runs.

A training step frees its activations (hundreds of MB) at the end of backward and allocates them
again in the next forward. With glibc's defaults most of that memory goes back to the kernel
in between (blocks above the mmap threshold are unmapped; the top of the heap is trimmed once it
holds more than the trim threshold), so every step takes its page faults again: first-touch
faults of ~40-60 MB per step on the peer benchmark's 24M student, whose kernel work and cold
pages made a steady CPU step 7-19 % slower (``scripts/bench_peer.py``'s world, 12 steps,
docs/BENCHMARKS.md). Inside :func:`reuse`, blocks up to 32 MiB (glibc's largest mmap threshold)
come from the heap and up to 1 GiB of free heap top is kept, so a step reuses the last step's
pages; on leaving, the trim threshold drops to 64 MiB (what glibc's own adjustment reaches for
32 MiB blocks) and ``malloc_trim`` hands the kept memory back.

Both thresholds are set together: a fixed trim threshold alone switches glibc's mmap threshold
adjustment off at its 128 KiB start, and every block above that is then mapped and faulted anew
(measured: ~30x the faults). Not glibc (musl, macOS), or a user who set glibc's malloc tunables
(``GLIBC_TUNABLES`` with ``glibc.malloc``, or ``MALLOC_*_`` variables): nothing changes. Memory
use does not grow past the step's own peak: the kept pages are the ones the next step uses.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
MMAP_THRESHOLD = 32 << 20  # glibc's largest on 64-bit (HEAP_MAX_SIZE / 2)
TRIM_THRESHOLD = 1 << 30  # free heap top kept while a stage runs
TRIM_AFTER = 2 * MMAP_THRESHOLD  # glibc's own trim threshold for that mmap threshold
USER_VARS = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_")
_depth = [0]  # reuse() blocks open (a pipeline runs stages inside one another's process)


def _libc():
    """glibc's handle, or None (another C library, or the user tuned glibc's malloc)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    if "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return None
    if any(v in os.environ for v in USER_VARS):
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def available() -> bool:
    """Whether :func:`reuse` changes anything in this process."""
    return _libc() is not None


@contextlib.contextmanager
def reuse():
    """Keep freed memory for reuse while the block runs (the outermost block hands it back at
    its end). Also a decorator: ``@allocator.reuse()`` on a stage's ``run``."""
    libc = _libc()
    on = libc is not None and bool(
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
    _depth[0] += 1
    try:
        yield on
    finally:
        _depth[0] -= 1
        if on and not _depth[0]:
            libc.mallopt(M_TRIM_THRESHOLD, TRIM_AFTER)
            libc.malloc_trim(0)
