"""scripts/bench_real_shape.py --quick: every stage's peak memory stays near its analytic floor.

The margins are fixed and smaller than what an O(T x V) regression adds at this shape (8 rows x
128 new tokens x 32,768 columns x 4 bytes = 128 MiB in the rollout; a [batch_tokens, V] block,
1 GiB, in scoring; a second [chunk, V] block, 96 MiB, in the loss), so keeping every step's
logits, building the logits of a whole batch, or a loss that holds two blocks fails here. Every
registered loss runs through the loss probe.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from stages.lib.losses import LOSSES

ROOT = Path(__file__).resolve().parent.parent
# MiB above the analytic floor each stage may use (measured: rollout ~85, score ~150-190, train ~40-130:
# allocator slack, tokenizer, Parquet buffers)
MARGIN_MIB = {"rollout": 110, "score": 300, "train": 220}
# The loss's working set in [chunk, V] fp32 blocks (measured 1.11-1.20: the one block, row-block
# scratch, the head matmul's workspace; two blocks before the gradient reused the log-softmax's
# buffer, 5+ before the fused path) and against train.loss_memory_mib (measured 0.83-0.90).
MAX_LOSS_BLOCKS = 1.5
MAX_LOSS_OVER_BUDGET = 1.05


def test_quick_real_shape_memory_stays_near_the_floor(tmp_path):
    out = tmp_path / "real_shape.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "scripts" / "bench_real_shape.py"), "--quick"]
    p = subprocess.run(
        [*cmd, "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = json.loads(out.read_text())
    st = res["stages"]
    assert res["response_tokens"] > 0.9 * 8 * 128  # the responses were long (few early EOS)
    for stage, margin in MARGIN_MIB.items():
        s = st[stage]
        assert 0 < s["floor_mib"] and 0 < s["peak_mib"], s
        assert s["peak_mib"] <= s["floor_mib"] + margin, (stage, s)
    assert {p["loss"] for p in res["loss_working_set"]} == set(LOSSES)
    for probe in res["loss_working_set"]:
        assert probe["blocks"] <= MAX_LOSS_BLOCKS, probe
        assert probe["peak_over_budget"] <= MAX_LOSS_OVER_BUDGET, probe
    assert st["rollout"]["bytes_per_token"] > 0 and st["score"]["bytes_per_token"] > 0
    assert st["rollout"]["tok_per_s"] > 0 and st["train"]["checkpoint_bytes"] > 0
