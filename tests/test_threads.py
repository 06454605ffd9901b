"""The thread setup of the entry points: OpenMP's wait policy is set before torch loads it.

OMP_DISPLAY_ENV=verbose makes GNU OpenMP print the settings it started with, so these tests read
what the runtime itself uses (its spin count: 300000 by default), not just the environment."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# import the entry point first, then run a parallel region on 2 threads
PROBE = (
    "{first}; import torch; torch.set_num_threads(2); "
    "torch.ones(256, 256) @ torch.ones(256, 256); print(torch.get_num_threads())"
)


def _openmp(first: str, **env: str) -> tuple[str, str]:
    """(spin count OpenMP started with, torch threads) in a fresh interpreter."""
    # LD_PRELOAD: vLLM's CPU platform preloads libgomp for its engine processes (in this pytest
    # process once a vLLM test ran); a preloaded OpenMP reads its environment before Python starts
    drop = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "LD_PRELOAD")
    base = {k: v for k, v in os.environ.items() if k not in drop}
    p = subprocess.run(
        [sys.executable, "-c", PROBE.format(first=first)],
        cwd=ROOT,
        env={**base, **env, "OMP_DISPLAY_ENV": "verbose"},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    line = next(x for x in p.stderr.splitlines() if "GOMP_SPINCOUNT" in x)
    return line.split("=")[1].strip(" '"), p.stdout.strip()


def test_stages_start_openmp_with_a_short_spin_and_the_same_thread_count():
    assert _openmp("import stages.train") == ("1000", "2")
    assert _openmp("import os")[0] == "300000"  # without the setup: the runtime's default


def test_a_users_own_policy_wins():
    assert _openmp("import stages", OMP_WAIT_POLICY="ACTIVE")[0] == "30000000000"  # spin on
    assert _openmp("import stages", OMP_WAIT_POLICY="PASSIVE")[0] == "0"
    assert _openmp("import stages", GOMP_SPINCOUNT="5000")[0] == "5000"


def test_the_demo_world_sets_it_before_torch():
    first = "import sys; sys.path.insert(0, 'scripts'); from demoworld import world"
    assert _openmp(first)[0] == "1000"
