"""Reliability end to end: kill and resume every stage, determinism, concurrent workers.

Each stage runs through its CLI (``python -m stages.<stage> ...`` in a forked child of a
pre-imported zygote, see tests/reliability_harness.py) on the demo experiment with tiny models.
A fault point (``DISTILLERY_FAULT=<point>:<n>``, ``stages.lib.errors.fault_point``) SIGKILLs the stage
at a chosen place; after every kill the dataset must be invisible to readers (no manifest, only
complete shards under their final names), and the re-run must produce exactly the rows and the
bytes of an uninterrupted run. Guarantees and the tests that prove them: docs/RELIABILITY.md.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from data_schemas import rollouts, selected, tokens
from stages.lib import store
from stages.lib.errors import UserError, fault_point
from tests import reliability_harness as h
from tests.conftest import write_prompts

KEYS = {"rollouts": ["sample_id"], "tokens": ["sample_id", "pos"], "selected": ["sample_id"]}
TABLES = {"rollouts": rollouts, "tokens": tokens, "selected": selected}
SEL = "selected/entropy_half"
TRAIN = "topk_fkl-entropy_half"


@pytest.fixture(scope="module")
def zygote(tiny_lm):
    z = h.Zygote(warm_model=tiny_lm)
    yield z
    z.close()


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    return write_prompts(tmp_path_factory.mktemp("prompts") / "prompts.parquet", 12)


@pytest.fixture(scope="module")
def ov(tiny_lm, tiny_teacher, prompts):
    def make(run_dir: Path, *extra: str) -> list[str]:
        return h.overrides_for(run_dir, tiny_lm, tiny_teacher, prompts, *extra)

    return make


@pytest.fixture(scope="module")
def ref(zygote, ov, tmp_path_factory) -> Path:
    """The uninterrupted reference run: rollout, score, select, train."""
    run_dir = tmp_path_factory.mktemp("ref") / "run"
    for stage in ("rollout", "score", "select", "train"):
        r = zygote.run(stage, ov(run_dir))
        assert r.rc == 0, f"{stage}: {r.describe()}"
    return run_dir


def copy_inputs(ref: Path, run_dir: Path, *datasets: str) -> None:
    for d in datasets:
        shutil.copytree(ref / d, run_dir / d, ignore=shutil.ignore_patterns(".lock*"))


def assert_invisible_and_clean(directory: Path, table) -> None:
    """After a kill: no manifest, readers refuse the dataset, and every visible shard is complete."""
    assert not (directory / "_manifest.json").exists()
    with pytest.raises(UserError, match="incomplete|missing"):
        store.open_committed(directory, table)
    for p in h.visible_shards(directory):
        pq.read_metadata(p)  # a visible shard always has its footer


def assert_same_as_ref(ref: Path, run_dir: Path, name: str, kind: str) -> None:
    """Identical rows (sorted by key, unique keys), byte-identical shards, no stray files."""
    a, b = ref / name, run_dir / name
    assert h.rows_digest(b, TABLES[kind], KEYS[kind]) == h.rows_digest(a, TABLES[kind], KEYS[kind])
    assert h.shard_files(b) == h.shard_files(a)
    m = store.open_committed(b, TABLES[kind])
    assert h.stray_files(b, m) == []


def kill_chain(zygote, stage: str, overrides: list[str], faults: list[str], directory: Path, table):
    """Run ``stage`` once per fault (each must die by SIGKILL), checking the state after each."""
    seen = 0
    for fault in faults:
        r = zygote.run(stage, overrides, fault)
        assert r.killed, f"{stage} with {fault} was not killed: {r.describe()}"
        assert_invisible_and_clean(directory, table)
        n = len(h.visible_shards(directory))
        assert n >= seen, f"{fault}: finished shards were lost ({seen} -> {n})"
        seen = n
    r = zygote.run(stage, overrides)
    assert r.rc == 0, r.describe()
    return r


# ----------------------------------------------------------------------------- the seam itself
def test_fault_point_is_off_by_default_and_fires_on_the_nth_pass(monkeypatch):
    monkeypatch.delenv("DISTILLERY_FAULT", raising=False)
    fault_point("before_rename")  # no env: nothing happens
    monkeypatch.setenv("DISTILLERY_FAULT", "unit_point:2:enospc")
    fault_point("other_point")
    fault_point("unit_point")  # first pass: nothing
    with pytest.raises(OSError, match="No space"):
        fault_point("unit_point")
    fault_point("unit_point")  # only the n-th pass fires


# ----------------------------------------------------------------------------- kill and resume
def test_rollout_killed_at_every_point_resumes_to_identical_rows(zygote, ov, ref, tmp_path):
    run_dir = tmp_path / "run"
    # model load; mid-shard (temp file without footer); between shards; a complete temp shard
    # not yet renamed; temp manifest written but not renamed
    faults = ["model_load:1", "mid_shard:2", "after_shard:1", "before_rename:1", "mid_manifest:1"]
    kill_chain(zygote, "rollout", ov(run_dir), faults, run_dir / "rollouts", rollouts)
    assert_same_as_ref(ref, run_dir, "rollouts", "rollouts")


def test_score_killed_resumes_to_identical_tokens(zygote, ov, ref, tmp_path):
    run_dir = tmp_path / "run"
    copy_inputs(ref, run_dir, "rollouts")
    # the behaviour model's load (2nd load), a complete temp shard, between shards, the manifest
    faults = ["model_load:2", "before_rename:2", "after_shard:1", "before_manifest:1"]
    kill_chain(zygote, "score", ov(run_dir), faults, run_dir / "tokens", tokens)
    assert_same_as_ref(ref, run_dir, "tokens", "tokens")


def test_select_killed_resumes_to_identical_selection(zygote, ov, ref, tmp_path):
    run_dir = tmp_path / "run"
    copy_inputs(ref, run_dir, "rollouts", "tokens")
    faults = ["mid_shard:2", "before_manifest:1"]
    kill_chain(zygote, "select", ov(run_dir), faults, run_dir / SEL, selected)
    assert_same_as_ref(ref, run_dir, SEL, "selected")
    assert not (run_dir / ".duckdb_tmp" / "select-entropy_half").exists()


def _final_state(run_dir: Path) -> tuple[list[float], dict[str, torch.Tensor]]:
    final = run_dir / "checkpoints" / TRAIN / "final"
    state = json.loads((final / "trainer_state.json").read_text())  # no pickle on disk
    return state["history"], load_file(final / "model.safetensors")


def test_train_killed_mid_checkpoint_resumes_to_the_same_losses_and_weights(
    zygote, ov, ref, tmp_path
):
    run_dir = tmp_path / "run"
    copy_inputs(ref, run_dir, "rollouts", "tokens", SEL)
    ckpts = run_dir / "checkpoints" / TRAIN
    r = zygote.run("train", ov(run_dir), "mid_checkpoint:2")  # while saving step 2
    assert r.killed, r.describe()
    assert (ckpts / "step-000001" / "trainer_state.json").exists()
    assert not (ckpts / "step-000002").exists() and not (ckpts / "final").exists()
    r = zygote.run("train", ov(run_dir))
    assert r.rc == 0, r.describe()
    assert "resuming" in r.stdout and "step-000001" in r.stdout, r.stdout
    hist, weights = _final_state(run_dir)
    ref_hist, ref_weights = _final_state(ref)
    assert len(hist) == 3 and hist == ref_hist  # the same loss curve, bit for bit
    assert weights.keys() == ref_weights.keys()
    for k in weights:
        assert torch.equal(weights[k], ref_weights[k]), k
    rows = lambda d: [  # noqa: E731
        json.loads(x)["loss"]
        for x in (d / "train" / TRAIN / "metrics.jsonl").read_text().splitlines()
    ]
    assert rows(run_dir) == rows(ref) == hist  # metrics.jsonl: no duplicated or lost step
    assert not [p.name for p in ckpts.iterdir() if p.name.startswith(store.TMP_PREFIX)]


# ----------------------------------------------------------------------------- determinism
def test_same_config_and_seed_give_byte_identical_shards(zygote, ov, ref, tmp_path):
    """A fresh run (another process, another run_dir) writes the same bytes, manifests aside
    from the run_dir they record."""
    run_dir = tmp_path / "run"
    for stage in ("rollout", "score", "select"):
        r = zygote.run(stage, ov(run_dir))
        assert r.rc == 0, r.describe()
    for d in ("rollouts", "tokens", SEL):
        files = h.shard_files(run_dir / d)
        assert files and files == h.shard_files(ref / d), d
        m_new = json.loads((run_dir / d / "_manifest.json").read_text())
        m_ref = json.loads((ref / d / "_manifest.json").read_text())
        for m in (m_new, m_ref):
            m.pop("config")
            m.pop("manifest_sha256", None)  # a checksum of the config too
            m["extra"].pop("policy_path", None)
        assert m_new == m_ref, d


# ----------------------------------------------------------------------------- concurrency
def test_two_concurrent_workers_write_the_union_of_one_worker(zygote, ov, ref, tmp_path):
    run_dir = tmp_path / "run"
    for stage, name, kind in (("rollout", "rollouts", "rollouts"), ("score", "tokens", "tokens")):
        res = zygote.run_many(
            [(stage, ov(run_dir, f"worker.index={i}", "worker.count=2"), None) for i in range(2)],
            parallel=2,  # both children run at the same time into one run_dir
        )
        for r in res:
            assert r.rc == 0, r.describe()
        assert_same_as_ref(ref, run_dir, name, kind)
        m = json.loads((run_dir / name / "_manifest.json").read_text())
        assert len(m["shards"]) == 3 and m["config"]["worker"]["count"] == 2


def test_manifest_is_written_exactly_once_when_workers_race_to_commit(tmp_path):
    """Both workers reach commit with every shard present: the second must not rewrite."""
    import pyarrow as pa

    from data_schemas import prompts

    prompts_table = SimpleNamespace(  # a minimal table module for the store
        NAME="prompts",
        VERSION=1,
        SCHEMA=prompts.SCHEMA,
        validate=lambda t, where, vocab_size: prompts.validate(t, where=where),
    )
    d = tmp_path / "ds"
    writers = [
        store.open_writer(
            d, prompts_table, dataset_id="x1", stage="t", worker_index=i, worker_count=2
        )
        for i in range(2)
    ]
    for i, w in enumerate(writers):
        w.write_shard(i, prompts.validate(pa.table({"id": [f"p{i}"], "prompt": ["a prompt"]})))
    meta = dict(config={}, fingerprints={}, inputs={})
    assert writers[0].commit(2, **meta)
    st = (d / "_manifest.json").stat()
    assert writers[1].commit(2, **meta) and writers[1].complete
    st2 = (d / "_manifest.json").stat()
    assert (st2.st_ino, st2.st_mtime_ns) == (st.st_ino, st.st_mtime_ns)
    for w in writers:
        w.close()
