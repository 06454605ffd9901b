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

import pyarrow.parquet as pq
import pytest

pytest.importorskip("trl")

import bench_peer  # noqa: E402  (scripts/ is on pytest's pythonpath)

ROOT = Path(__file__).resolve().parent.parent


def test_quick_run_writes_valid_json(tmp_path):
    out = tmp_path / "peer.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "scripts" / "bench_peer.py"), "--quick", "--out", str(out)]
    cmd += ["--work", str(tmp_path / "world"), "--samples", "2", "--prompts", "8"]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(out.read_text())

    s = r["settings"]
    assert s["samples"] == 2  # two samples of each of 8 prompts: 16 sequences on both sides
    tokens = s["n_prompts"] * s["samples"] * s["tokens"]
    assert r["versions"]["trl"] == "1.16.0"
    assert r["models"]["teacher_over_student_params"] >= 4
    assert set(r["runs"]) == {
        "ours_epoch", "trl_epoch", "ours_second", "trl_second", "ours_sft", "trl_sft",
        "ours_epoch_lean",
    }  # fmt: skip
    assert s["teacher_scale"] is None  # no --teacher-scale: the mode's default teacher
    for name, run in r["runs"].items():
        # same prompts, same T, no early stop: every side trains on exactly N * T response tokens
        assert run["response_tokens"] == tokens, name
        assert run["wall_s"] > 0 and run["cpu_s"] > 0, name
        assert run["peak_rss_mb"] >= run["rss_after_imports_mb"] > 0, name
        assert run["torch_threads"] == s["threads"], name
        assert name in r["commands"] and "--child" in r["commands"][name]
    for name in ("ours_epoch", "ours_epoch_lean"):
        assert r["runs"][name]["stages"].keys() == {"rollout", "score", "select", "train"}
    # the lean epoch ran in its own run dir with its keys: no entropy, behaviour from the rollout
    assert r["lean_overrides"] == [
        "score.behavior=false",
        "score.entropy=false",
        "train.trackers=[]",
    ]
    lean = tmp_path / "world" / "ours_lean"
    tok = pq.read_table(next((lean / "tokens").rglob("*.parquet")), columns=["teacher_entropy"])
    assert tok["teacher_entropy"].null_count == tok.num_rows > 0
    assert not (lean / "train" / "topk_fkl" / "tb").exists()
    for side in ("ours", "trl"):  # one optimizer step per batch of 8 sequences, on both sides
        assert r["runs"][f"{side}_sft"]["steps"] == s["n_prompts"] * s["samples"] // s["batch"]

    ratios = r["ratios"]
    for key in r["goals"]:
        assert ratios[key] > 0, key
    assert ratios["epoch_wall_ours_over_trl"] == pytest.approx(
        r["runs"]["ours_epoch"]["wall_s"] / r["runs"]["trl_epoch"]["wall_s"]
    )
    assert len(r["differences"]) >= 5
    # the docs' figures (docs/benchmarks.json keys), named by the setting: 2 samples, quick sizes
    tag = f"n2_p{s['prompt_words'] + 1}_t{r['models']['teacher_over_student_matmul_params']:.1f}x"
    fig = r["peer"][tag]
    for key in ("epoch_cpu_ours_over_trl", "second_loss_cpu_ours_over_trl"):
        assert fig[key] == pytest.approx(ratios[key], abs=1e-3), key
    cpu = {side: r["runs"][f"{side}_sft"]["cpu_s"] for side in ("ours", "trl")}
    assert fig["trainer_tokens_per_cpu_s_ours_over_trl"] == pytest.approx(
        cpu["trl"] / cpu["ours"], abs=1e-3
    )  # same tokens on both sides: tokens per CPU second is the inverse CPU ratio
    assert ratios["epoch_lean_cpu_ours_over_trl"] > 0


def test_teacher_scale_picks_the_width():
    """--teacher-scale S: same depth, the width whose matmul-weight ratio is nearest S; none given
    keeps the primary row's teacher exactly as it was."""
    default = bench_peer.sizes_for(False, None, None, None)
    assert default["teacher_arch"] == {"hidden": 1024, "layers": 8}
    assert (default["tokens"], default["n_prompts"]) == (64, 64)
    vocab = default["vocab_words"] + 4
    for scale in (4, 16, 30):
        size = bench_peer.sizes_for(False, None, 256, scale)
        ratio = bench_peer.matmul_weights(size["teacher_arch"], vocab) / bench_peer.matmul_weights(
            size["student_arch"], vocab
        )
        assert abs(ratio / scale - 1) < 0.05, (scale, ratio)
        assert size["teacher_arch"]["layers"] == 8 and size["tokens"] == 256


def test_teacher_scale_out_of_range_is_one_line(tmp_path):
    out = tmp_path / "peer.json"
    cmd = [sys.executable, str(ROOT / "scripts" / "bench_peer.py"), "--teacher-scale", "0.5"]
    p = subprocess.run([*cmd, "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert p.stderr.startswith("error: --teacher-scale") and p.stderr.count("\n") == 1
    assert not out.exists()


def test_samples_and_prompt_tokens_set_the_world():
    """--samples n and --prompt-tokens L: n samples per prompt, prompts of L tokens (BOS + words);
    neither given keeps the mode's sizes."""
    size = bench_peer.sizes_for(False, 16, None, 16, samples=4, prompt_tokens=256)
    assert (size["samples"], size["prompt_words"], size["n_prompts"]) == (4, 255, 16)
    default = bench_peer.sizes_for(False, None, None, None)
    assert (default["samples"], default["prompt_words"]) == (1, 15)
    spec = {**default, "run_dir": "r", "student": "s", "teacher": "t", "prompts": "p"}
    assert "rollout.n=1" in bench_peer.ours_overrides(spec, "topk_fkl", "x")
    assert "rollout.n=4" in bench_peer.ours_overrides(spec | {"samples": 4}, "topk_fkl", "x")


@pytest.mark.parametrize("flag", [["--samples", "0"], ["--prompt-tokens", "1"]])
def test_bad_samples_or_prompt_length_is_one_line(tmp_path, flag):
    out = tmp_path / "peer.json"
    cmd = [sys.executable, str(ROOT / "scripts" / "bench_peer.py"), *flag, "--out", str(out)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert p.stderr.startswith(f"error: {flag[0]}") and p.stderr.count("\n") == 1
    assert not out.exists()


def test_preload_takes_first_use_imports_out_of_the_timed_region():
    """Our child's preload leaves nothing heavy for the timed region to import: pandas (pyarrow's
    first numpy conversion) and Hydra's plugins (its first compose) are loaded by then, as TRL's
    side has everything loaded before its timed region."""
    code = (
        "import sys, bench_peer, pyarrow as pa\n"
        "bench_peer.preload('ours')\n"
        "before = set(sys.modules)\n"
        "from stages.lib.config import compose\n"
        "compose('train', ['run_dir=/nonexistent'])\n"
        "pa.array([[1, 2]]).flatten().to_numpy()\n"
        "new = set(sys.modules) - before\n"
        "print(sorted(m for m in new if m.startswith(('pandas', 'hydra._internal.core_plugins'))))\n"
        "print('pandas' in sys.modules)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "scripts")])}
    p = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    assert p.returncode == 0, p.stderr[-2000:]
    new, has_pandas = p.stdout.splitlines()[-2:]
    assert new == "[]"
    assert has_pandas == "True"  # installed here (the dev extra): the preload took it


def test_repeats_give_medians_and_the_worst_repeat():
    """--repeats K: each headline ratio is the median over the complete repeats, the worst
    repeat sits beside it (the highest CPU ratio, the lowest tokens ratio); an incomplete repeat
    counts for nothing."""

    def runs(ours: float, trl: float) -> dict:
        r = {}
        for kind in ("epoch", "second", "sft"):
            for side, cpu in (("ours", ours), ("trl", trl)):
                r[f"{side}_{kind}"] = {"wall_s": cpu, "cpu_s": cpu, "loop_s": cpu,
                                       "process_wall_s": cpu, "response_tokens": 100,
                                       "peak_rss_mb": 1.0}  # fmt: skip
        return r

    out = {"settings": {"prompt_words": 255, "samples": 4},
           "models": {"teacher_over_student_matmul_params": 4.6},
           "repeats": [runs(4.0, 25.0), runs(5.0, 25.0), runs(4.5, 30.0), {"ours_epoch": {}}]}  # fmt: skip
    got = bench_peer.summarize(out)
    assert len(got["ratios_per_repeat"]) == 3
    assert got["ratios"]["second_loss_cpu_ours_over_trl"] == pytest.approx(0.16)  # 4/25, 5/25, .15
    assert got["ratios_worst"]["second_loss_cpu_ours_over_trl"] == pytest.approx(0.2)
    assert got["ratios_worst"]["trainer_tokens_per_cpu_s_ours_over_trl"] == pytest.approx(5.0)
    fig = got["peer"]["n4_p256_t4.6x"]
    assert fig["second_loss_cpu_ours_over_trl"] == 0.16
    assert fig["second_loss_cpu_ours_over_trl_worst"] == 0.2
    one = bench_peer.summarize(out | {"repeats": out["repeats"][:1]})
    assert "second_loss_cpu_ours_over_trl_worst" not in one["peer"]["n4_p256_t4.6x"]
