"""The trainer against hostile or broken inputs (issue #16): pickles, divergence, bad rows, a second
trainer, a full disk, Ctrl-C, names and overwrite. Real tiny models and real selections
(``tests/test_train.make_selection``); the CLI cases run ``python -m stages.train`` and check the
exit code and the one ``error:`` line.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import pickle
import shutil
import signal
import time
from pathlib import Path

import pyarrow as pa
import pytest
import torch

from stages.lib import errors, models, store
from stages.lib.config import compose
from stages.lib.errors import UserError
from stages.lib.loader import check_row_group, collate
from stages.lib.training.job import Dist
from stages.lib.training.objective import ResponseLoss
from stages.train import run, train_step
from tests import reliability_harness as h
from tests import test_train
from tests.test_train import make_selection, train_cfg

# fixtures shared with test_train (one_torch_thread is autouse)
world, one_torch_thread = test_train.world, test_train.one_torch_thread

ARGS = ["train.max_steps=3", "train.micro_batch_tokens=22", "train.save_every=1"]
NAME = "opd_k1-all"


@pytest.fixture()
def sel_run(world, tmp_path):
    root, student, teacher = world
    rd = tmp_path / "run"
    make_selection(rd, student, teacher, n=8)
    return rd, student


def cli(rd: Path, student: Path, *extra: str, fault: str | None = None) -> h.Result:
    ov = [f"run_dir={rd}", f"student.path={student}", "train.trackers=[]", "train.log_every=1"]
    return h.run_stage("train", [*ov, *ARGS, *extra], fault=fault)


def one_error(r: h.Result) -> str:
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert r.rc == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.describe()
    assert "Fix:" in lines[0]
    return lines[0]


# ----------------------------------------------------------------------------- no pickle
class Boom:
    """Unpickling this runs a command: the proof that nothing was unpickled is its absence."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("swap", ["trainer_state.safetensors", "trainer_state.json", "pt"])
def test_a_pickled_trainer_state_is_refused_and_runs_nothing(sel_run, tmp_path, swap):
    rd, student = sel_run
    run(train_cfg(rd, student, *ARGS, "train.max_steps=2"))
    ckpts = rd / "checkpoints" / NAME
    shutil.rmtree(ckpts / "final")
    step = ckpts / "step-000001"
    marker = tmp_path / "pwned"
    blob = pickle.dumps(Boom(marker))
    if swap == "pt":  # the old format: a pickle next to the weights, no JSON state
        for f in step.glob("trainer_state.*"):
            f.unlink()
        (step / "trainer_state.pt").write_bytes(blob)
    else:
        (step / swap).write_bytes(blob)
    r = cli(rd, student, "train.max_steps=2")
    line = one_error(r)
    assert ("pickled" in line) if swap == "pt" else ("unreadable trainer state" in line), line
    assert not marker.exists()
    assert not (ckpts / "final").exists() and not (ckpts / "step-000002").exists()


def test_pickled_model_weights_need_the_explicit_flag(world, tmp_path):
    from transformers import AutoModelForCausalLM

    root, student, teacher = world
    rd = tmp_path / "run"
    make_selection(rd, student, teacher, n=8)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    sd = AutoModelForCausalLM.from_pretrained(student).state_dict()
    torch.save(sd, pickled / "pytorch_model.bin")  # the pre-safetensors format
    for f in [*student.glob("tokenizer*"), student / "config.json"]:
        shutil.copy(f, pickled)
    with pytest.raises(UserError, match="pickled") as e:
        run(train_cfg(rd, pickled, *ARGS))
    assert "allow_pickled_weights" in str(e.value)
    assert not (rd / "checkpoints").exists() or not any((rd / "checkpoints").glob("*/final"))
    res = run(train_cfg(rd, pickled, *ARGS, "train.allow_pickled_weights=true"))
    assert (Path(res["final"]) / "model.safetensors").exists()


# ----------------------------------------------------------------------------- divergence
def test_infinite_lr_is_refused_by_the_config():
    with pytest.raises(UserError, match="train.lr"):
        compose("train", ["train.lr=inf"])
    with pytest.raises(UserError, match="train.lr"):
        compose("train", ["train.lr=nan"])


def test_runtime_lr_guard(sel_run):
    rd, student = sel_run
    cfg = train_cfg(rd, student, *ARGS)
    cfg.train.lr = math.inf  # as if the config check were bypassed
    with pytest.raises(UserError, match="train.lr"):
        run(cfg)
    assert not (rd / "checkpoints").exists()


def test_diverging_weights_stop_before_anything_diverged_is_saved(sel_run):
    rd, student = sel_run
    with pytest.raises(UserError, match="non-finite") as e:
        run(train_cfg(rd, student, *ARGS, "train.lr=1e30", "train.max_steps=6"))
    assert "train.lr" in e.value.fix
    ckpts = rd / "checkpoints" / NAME
    assert not (ckpts / "final").exists()
    for step in ckpts.glob("step-*"):  # whatever was saved before the guard fired is finite
        from safetensors.torch import load_file

        assert all(torch.isfinite(v).all() for v in load_file(step / "model.safetensors").values())


def _micro_batches(sel: Path, student: Path):
    from data_schemas import selected
    from stages.lib.loader import table_to_seqs

    seqs = table_to_seqs(store.read_table(sel, selected))
    tok = models.load_tokenizer(str(student))
    return [collate(seqs[i : i + 2], tok.pad_token_id) for i in (0, 2, 4)], models.vocab_size(tok)


def test_bad_micro_batches_are_skipped_and_counted_up_to_the_limit(world, tmp_path):
    root, student, teacher = world
    sel = make_selection(tmp_path / "run", student, teacher, n=8)

    def step(max_skip: int) -> dict:
        mbs, vocab = _micro_batches(sel, student)
        mbs[1].batch["teacher_logprob"][0] = float("nan")  # one poisoned token
        torch.manual_seed(0)
        model = models.load_model(str(student)).train()
        wrapped = ResponseLoss(model, [("opd_k1", 1.0, {})], vocab, 1.0, 16)
        params = list(wrapped.parameters())
        optim = torch.optim.AdamW(params, lr=1e-3)
        sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda s: 1.0)
        row = train_step(
            wrapped, mbs, optim, sched, params, Dist(), grad_clip=1.0, max_skip=max_skip
        )
        assert all(torch.isfinite(p).all() for p in params)
        return row

    with pytest.raises(UserError, match="non-finite loss") as e:
        step(0)
    assert "max_bad_micro_batches" in e.value.fix
    row = step(1)
    assert row["skipped_micro_batches"] == 1 and math.isfinite(row["loss"])


# ----------------------------------------------------------------------------- rows read
def _table(**edit) -> pa.Table:
    from data_schemas import selected

    row = {
        "sample_id": "s0", "prompt_id": "p0", "is_guided": False, "train_prompt_ids": [2, 5],
        "response_ids": [6, 7], "response_len": 2, "n_kept": 2, "weights": [1.0, 1.0],
        "segments": [0, 0], "teacher_logprob": [-1.0, -2.0], "behavior_logprob": [-1.0, -1.0],
        "ref_logprob": None, "topk_k": 2, "teacher_topk_ids": [6, 8, 7, 9],
        "teacher_topk_logprobs": [-1.0, -2.0, -2.0, -3.0], "teacher_topk_logmass": [-0.1, -0.1],
        "behavior_topk_k": 0, "behavior_topk_ids": None, "teacher_logprobs_on_behavior_topk": None,
    }  # fmt: skip
    good = dict(row, sample_id="ok")
    return pa.Table.from_pylist([good, {**row, **edit}], schema=selected.SCHEMA)


@pytest.mark.parametrize(
    "edit, expect",
    [
        (
            {"teacher_logprob": [-1.0, float("nan")]},
            "column teacher_logprob, sample 's0', element 1",
        ),
        ({"teacher_topk_logprobs": [-1.0, float("inf"), -2, -3]}, "teacher_topk_logprobs"),
        ({"teacher_topk_logmass": [0.5, -0.1]}, "teacher_topk_logmass"),
        ({"teacher_topk_logprobs": [-1.0, -2.0, -3.0, -2.0]}, "token 1: teacher top-K log-probs"),
        ({"weights": [1.0, -1.0]}, "column weights, sample 's0', element 1"),
        ({"weights": [1.0, 1e9]}, "max_weight"),
        ({"response_ids": [6, 500]}, "response_ids, sample 's0', element 1: 500"),
        ({"teacher_topk_ids": [6, 8, 7, -1]}, "teacher_topk_ids"),
        ({"teacher_topk_ids": [6, 8, 7]}, "teacher_topk_ids has 3 values, expected 4"),
        ({"weights": [1.0]}, "weights has 1 values, expected 2"),
    ],
)
def test_every_row_read_is_validated(edit, expect):
    assert check_row_group(_table(), 100, 10.0) is None
    msg = check_row_group(_table(**edit), 100, 10.0)
    assert msg is not None and expect in msg, msg


def test_a_weight_out_of_range_stops_the_run_naming_shard_and_row(sel_run):
    rd, student = sel_run
    with pytest.raises(UserError, match="weights") as e:
        run(train_cfg(rd, student, *ARGS, "train.max_weight=0.5"))
    assert "bucket=000/shard-00000.parquet row group 0" in e.value.where
    assert "sample 'p" in e.value.what
    assert not (rd / "checkpoints" / NAME / "step-000001").exists()


# ----------------------------------------------------------------------------- one trainer per name
def test_a_second_trainer_with_the_same_name_is_refused(sel_run):
    rd, student = sel_run
    lock = rd / "checkpoints" / f".lock-{NAME}"
    lock.parent.mkdir(parents=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # the first trainer
    try:
        with pytest.raises(UserError, match="another trainer") as e:
            run(train_cfg(rd, student, *ARGS))
        assert "train.name" in e.value.fix
        run(train_cfg(rd, student, *ARGS, "train.name=other"))  # another name trains meanwhile
    finally:
        os.close(fd)
    run(train_cfg(rd, student, *ARGS))  # released: trains


def test_metrics_are_repaired_on_resume_and_old_steps_pruned(sel_run):
    rd, student = sel_run
    args = [*ARGS, "train.max_steps=6", "train.micro_batch_tokens=11", "train.keep_last=2"]
    full = run(train_cfg(rd, student, *args))
    ckpts, metrics = rd / "checkpoints" / NAME, rd / "train" / NAME / "metrics.jsonl"
    assert sorted(p.name for p in ckpts.iterdir()) == ["final", "step-000004", "step-000005"]
    # a crash after step 5's checkpoint, and rows a second writer duplicated
    shutil.rmtree(ckpts / "final")
    rows = metrics.read_text().splitlines()
    metrics.write_text("\n".join(rows + rows[2:]) + "\n")
    again = run(train_cfg(rd, student, *args))
    assert again["history"] == full["history"]
    steps = [json.loads(x)["step"] for x in metrics.read_text().splitlines()]
    assert steps == list(range(1, 7))


# ----------------------------------------------------------------------------- full disk
def test_a_full_disk_mid_checkpoint_is_one_error_and_the_rerun_continues(sel_run, monkeypatch):
    rd, student = sel_run
    ckpts = rd / "checkpoints" / NAME
    monkeypatch.setenv("DISTILLERY_FAULT", "mid_checkpoint:2:enospc")
    errors._FAULT_HITS.clear()
    with pytest.raises(UserError, match="disk full"):
        run(train_cfg(rd, student, *ARGS))
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-000001"]  # no .tmp-step-000002
    monkeypatch.delenv("DISTILLERY_FAULT")
    (ckpts / ".tmp-step-000002").mkdir()  # as a SIGKILL at that point would leave it
    res = run(train_cfg(rd, student, *ARGS))
    assert res["steps"] == 3 and not [p for p in ckpts.iterdir() if p.name.startswith(".tmp")]


def test_full_disk_through_the_cli_is_one_line(sel_run):
    rd, student = sel_run
    line = one_error(cli(rd, student, fault="mid_checkpoint:1:enospc"))
    assert "disk full" in line
    assert not list((rd / "checkpoints" / NAME).iterdir())


# ----------------------------------------------------------------------------- names, overwrite
@pytest.mark.parametrize("name", ["..", "../../x", "", "a/b", ".hidden"])
def test_unsafe_names_are_refused_before_anything_is_touched(sel_run, name):
    rd, student = sel_run
    (rd / "checkpoints" / "keep").mkdir(parents=True)
    before = sorted(str(p) for p in rd.parent.rglob("*"))
    with pytest.raises(UserError, match="not a safe name"):
        run(train_cfg(rd, student, *ARGS, f"train.name='{name}'", "overwrite=true"))
    assert sorted(str(p) for p in rd.parent.rglob("*")) == before


def test_overwrite_removes_only_this_names_outputs(sel_run):
    rd, student = sel_run
    run(train_cfg(rd, student, *ARGS, "train.name=a"))
    run(train_cfg(rd, student, *ARGS, "train.name=b"))
    b_files = sorted(str(p) for p in (rd / "checkpoints" / "b").rglob("*"))
    run(train_cfg(rd, student, *ARGS, "train.name=a", "overwrite=true"))
    assert sorted(str(p) for p in (rd / "checkpoints" / "b").rglob("*")) == b_files
    assert (rd / "train" / "b" / "metrics.jsonl").exists()


# ----------------------------------------------------------------------------- Ctrl-C
def test_ctrl_c_exits_130_without_a_traceback_and_resumes(sel_run):
    rd, student = sel_run
    # enough steps that the run cannot finish between its first checkpoint and the signal
    args = ["train.max_steps=300", "train.epochs=100", "train.micro_batch_tokens=22"]
    # train_cfg (the in-process resume below) reads in file order; the interrupted run must too
    ov = [f"run_dir={rd}", f"student.path={student}", "train.trackers=[]", "train.save_every=1"]
    p = h.start_stage("train", [*ov, "train.shuffle=false", *args])
    ckpts = rd / "checkpoints" / NAME
    deadline = time.time() + 120
    # any step checkpoint (keep_last prunes the early ones: under load a poll can miss step 1)
    while not any(ckpts.glob("step-*")) and p.poll() is None:
        assert time.time() < deadline
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    r = h.wait_stage(p)
    assert r.rc == 130 and "Traceback" not in r.stderr, r.describe()
    assert "interrupted" in r.stderr
    res = run(train_cfg(rd, student, *args, "train.save_every=1000"))
    assert res["steps"] == 300 and not res["skipped"]


def test_all_finite_is_exact_at_the_edges():
    """The one-pass finiteness check of the weights before a save (``aminmax``): one inf, -inf
    or NaN in a large tensor is caught, in any lane of the vectorised kernel or its scalar tail;
    huge finite values (whose fp32 sum would overflow) are not; empty tensors have no ends."""
    import torch

    from stages.lib.training.checkpoint import all_finite

    big = torch.full((1 << 16,), 3.0e38)  # fp32 sum overflows; fp64 does not
    assert all_finite([big, torch.zeros(3), big.to(torch.bfloat16)])
    assert all_finite([]) and all_finite([torch.zeros(0), torch.ones(3)])
    for dtype in (torch.float32, torch.bfloat16):
        for pos in range(37):
            t = torch.randn(37).to(dtype)
            t[pos] = float("nan")
            assert not all_finite([torch.ones(2), t]), (dtype, pos)
    for bad in (float("inf"), float("-inf"), float("nan")):
        t = torch.randn(1000)
        t[617] = bad
        assert not all_finite([torch.ones(2), t])
    both = torch.tensor([float("inf"), float("-inf")])  # sums to NaN, still caught
    assert not all_finite([both])
