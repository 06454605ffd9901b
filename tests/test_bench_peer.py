"""Smoke test of scripts/bench_peer.py --quick: both sides run, the JSON is complete and consistent.

Skipped without the ``bench`` extra (trl). It runs six child processes (each imports torch and
transformers, TRL's also vLLM's client code), so it takes ~2-3 minutes on a shared 2-core machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("trl")

ROOT = Path(__file__).resolve().parent.parent


def test_quick_run_writes_valid_json(tmp_path):
    out = tmp_path / "peer.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "scripts" / "bench_peer.py"), "--quick", "--out", str(out)]
    cmd += ["--work", str(tmp_path / "world")]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(out.read_text())

    s = r["settings"]
    tokens = s["n_prompts"] * s["tokens"]
    assert r["versions"]["trl"] == "1.16.0"
    assert r["models"]["teacher_over_student_params"] >= 4
    assert set(r["runs"]) == {
        "ours_epoch", "trl_epoch", "ours_second", "trl_second", "ours_sft", "trl_sft",
    }  # fmt: skip
    for name, run in r["runs"].items():
        # same prompts, same T, no early stop: every side trains on exactly N * T response tokens
        assert run["response_tokens"] == tokens, name
        assert run["wall_s"] > 0 and run["cpu_s"] > 0, name
        assert run["peak_rss_mb"] >= run["rss_after_imports_mb"] > 0, name
        assert run["torch_threads"] == s["threads"], name
        assert name in r["commands"] and "--child" in r["commands"][name]
    assert r["runs"]["ours_epoch"]["stages"].keys() == {"rollout", "score", "select", "train"}
    for side in ("ours", "trl"):  # one optimizer step per batch of 8 sequences, on both sides
        assert r["runs"][f"{side}_sft"]["steps"] == s["n_prompts"] // s["batch"]

    ratios = r["ratios"]
    for key in r["goals"]:
        assert ratios[key] > 0, key
    assert ratios["epoch_wall_ours_over_trl"] == pytest.approx(
        r["runs"]["ours_epoch"]["wall_s"] / r["runs"]["trl_epoch"]["wall_s"]
    )
    assert len(r["differences"]) >= 5
