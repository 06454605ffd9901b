"""Two gloo processes (DDP, then FSDP2) train exactly like one process on the same data.

Layout: 8 equal-length sequences in row groups of 2, micro-batches of 2 sequences, no shuffle.
Rank r reads row groups r, r+2, ...; so one DDP step (grad_accum=1, 2 ranks) sees row groups
{2s, 2s+1}, the same sequences as one single-process step with grad_accum=2. The loss is divided by
the global weighted-token count, so the updates must agree (to float summation order).
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from stages.train import run
from tests.conftest import build_tiny_lm
from tests.test_train import (  # noqa: F401 - one_torch_thread: an autouse fixture
    assert_params_close,
    make_selection,
    one_torch_thread,
    params_of,
    train_cfg,
)

pytestmark = pytest.mark.distributed
SEQ = 5 + 6  # prompt (BOS + 4) + response tokens


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, run_dir: str, student: str, runs: list, out: str):
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )  # fmt: skip
    torch.set_num_threads(1)
    results = {}
    for name, args in runs:  # several trainings in one spawn: process start-up dominates
        res = run(train_cfg(Path(run_dir), Path(student), *args))
        results[name] = {k: res[k] for k in ("history", "final", "metrics")}
    if rank == 0:
        Path(out).write_text(json.dumps(results))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    student = build_tiny_lm(root / "student", seed=0)
    teacher = build_tiny_lm(root / "teacher", seed=1)
    make_selection(
        root / "run", student, teacher, n=8, row_group_rows=2,
        weights=lambda i, j: (i % 3) * 0.5 + (j % 2),
    )  # fmt: skip
    return root, student


def test_ddp_and_fsdp2_on_two_gloo_processes_equal_one_process(data):
    root, student = data
    common = ["loss=topk_fkl", f"train.micro_batch_tokens={2 * SEQ}", "train.lr=1e-3"]
    single = run(
        train_cfg(root / "run", student, *common, "train.grad_accum=2", "train.name=single")
    )
    assert single["steps"] == 2
    runs = [
        ("ddp", [*common, "train.name=ddp"]),
        ("fsdp", [*common, "train.name=fsdp", "train.fsdp=true"]),
    ]
    out = root / "result.json"
    mp.spawn(
        _worker, args=(2, _free_port(), str(root / "run"), str(student), runs, str(out)), nprocs=2
    )
    results = json.loads(out.read_text())
    ref = params_of(single["final"])
    for mode, dist in results.items():
        assert dist["history"] == pytest.approx(single["history"], rel=1e-5), mode
        assert dist["metrics"]["grad_norm"] == pytest.approx(
            single["metrics"]["grad_norm"], rel=1e-4
        )
        assert_params_close(ref, params_of(dist["final"]), atol=1e-5)


def _resume_worker(rank: int, world: int, port: int, run_dir: str, student: str, out: str):
    """FSDP2 with save_every=1: train, drop final/ (a crash after step 1), resume, compare."""
    import shutil

    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )  # fmt: skip
    torch.set_num_threads(1)
    common = ["loss=topk_fkl", f"train.micro_batch_tokens={SEQ}", "train.lr=1e-3"]
    args = [*common, "train.name=fsdp_resume", "train.fsdp=true", "train.save_every=1"]
    args += ["train.epochs=2", "train.max_steps=4"]
    full = run(train_cfg(Path(run_dir), Path(student), *args))
    torch.distributed.barrier()
    ckpts = Path(full["final"]).parent
    if rank == 0:
        shutil.rmtree(ckpts / "final")
        shutil.rmtree(ckpts / "step-000003")
    torch.distributed.barrier()
    again = run(train_cfg(Path(run_dir), Path(student), *args))
    if rank == 0:
        Path(out).write_text(json.dumps({"full": full["history"], "again": again["history"]}))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def test_fsdp2_resume_restores_sharded_optimizer_state(data):
    """The trainer state holds each rank's optimizer shard (safetensors, no pickle); a resumed
    FSDP2 run re-wraps it as DTensors and continues exactly."""
    root, student = data
    out = root / "resume.json"
    mp.spawn(
        _resume_worker, args=(2, _free_port(), str(root / "run"), str(student), str(out)), nprocs=2
    )
    res = json.loads(out.read_text())
    assert res["again"] == res["full"]
    assert (root / "run" / "checkpoints" / "fsdp_resume" / "step-000002").exists()
