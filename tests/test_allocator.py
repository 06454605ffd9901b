"""Freed memory kept for the next step while a stage runs (stages/lib/allocator.py): a block
freed inside ``reuse`` comes back without page faults; after the outermost block the kept
memory is handed back; a user's own malloc tuning is left alone."""

from __future__ import annotations

import resource
import subprocess
import sys

import pytest

from stages.lib import allocator

pytestmark = pytest.mark.skipif(not allocator.available(), reason="glibc only")

# Runs in a fresh interpreter: a pytest worker's heap carries every earlier test's holes. A
# "step" as the C allocator sees one (torch's CPU tensors are malloc'd blocks): twenty 8 MiB
# blocks written, then all freed, last first (as activations are after backward). Raw
# malloc/free through ctypes, so no small allocation of Python's lands between them.
PROBE = r"""
import ctypes, json, resource, sys
from stages.lib import allocator

libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]

def faults_per_step(steps, size=8 << 20, count=20):
    out = []
    for _ in range(steps):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        blocks = [libc.malloc(size) for _ in range(count)]
        for b in blocks:
            ctypes.memset(b, 1, size)  # each page written once
        out.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        for b in reversed(blocks):
            libc.free(b)
    return out

def rss_kib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))

if sys.argv[1] == "reuse":
    with allocator.reuse() as on:
        with allocator.reuse():  # nested: the inner end keeps the outer's setting
            pass
        faults = faults_per_step(5)
        rss_in = rss_kib()
    print(json.dumps({"on": on, "faults": faults, "released_kib": rss_in - rss_kib()}))
else:
    print(json.dumps({"faults": faults_per_step(5)}))
"""


def probe(mode: str) -> dict:
    import json
    import os

    run = subprocess.run(
        [sys.executable, "-c", PROBE, mode],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_reuse_keeps_a_steps_memory_for_the_next_and_hands_it_back_at_the_end():
    fresh = 160 << 8  # pages of 160 MiB: what a step faults when nothing is kept
    default = probe("default")["faults"]
    assert min(default[1:]) > fresh // 2, default  # glibc's defaults: every step faults anew
    kept = probe("reuse")
    assert kept["on"] is True
    assert kept["faults"][0] > fresh // 2 and max(kept["faults"][1:]) < 256, kept
    assert kept["released_kib"] > 100 << 10, kept  # the kept 160 MiB went back at the end


def test_a_users_malloc_tuning_is_left_alone(monkeypatch):
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "131072")
    assert not allocator.available()
    with allocator.reuse() as on:
        assert not on
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=65536")
    assert not allocator.available()


def test_reuse_is_a_decorator_that_keeps_the_function():
    @allocator.reuse()
    def run(x: int) -> int:
        """Doc."""
        return x + resource.getpagesize() * 0

    assert run(3) == 3 and run.__name__ == "run" and run.__doc__ == "Doc."
