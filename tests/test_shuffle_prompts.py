"""Prompt-grouped shuffling (``train.shuffle=prompts``, the default): the blocks of rows with the
same train prompt are shuffled inside each row group, a prompt's samples kept adjacent, so they
share micro-batches (and ``train.share_prefix`` runs the prompt once for them). Seeded and
deterministic; a resumed loader yields exactly the remaining micro-batches; training with
sharing on gives the unshared run's weights."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from data_schemas import rollouts, selected
from stages.lib import store
from stages.lib.config import compose
from stages.lib.errors import UserError
from stages.lib.loader import MicroBatchStream, plan_steps, shuffle_order
from stages.train import run
from tests import test_train
from tests.test_schemas import rollout_rows
from tests.test_train import make_selection, params_of, train_cfg

# fixtures shared with test_train (one_torch_thread is autouse)
world, one_torch_thread = test_train.world, test_train.one_torch_thread


def blocks_of(keys: list) -> list:
    """The keys in order with adjacent repeats collapsed: one entry per adjacent run."""
    return [k for i, k in enumerate(keys) if i == 0 or keys[i - 1] != k]


# ----------------------------------------------------------------------------- the permutation
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_grouped_permutation_keeps_each_prompt_adjacent(seed):
    rng = np.random.default_rng(100 + seed)
    sizes = rng.integers(1, 6, 12)  # 12 prompts of 1-5 rows, some rows scattered
    keys = [[int(g), 7] for g, s in enumerate(sizes) for _ in range(s)]
    keys[3], keys[-1] = keys[-1], keys[3]  # a prompt's rows need not be adjacent on disk
    col = pa.array(keys).slice(0)  # a list column, as train_prompt_ids
    perm = store.grouped_permutation(col, np.random.default_rng(seed))
    assert sorted(perm.tolist()) == list(range(len(keys)))
    out = [keys[i][0] for i in perm]
    assert len(blocks_of(out)) == len(sizes)  # every prompt is one adjacent block
    again = store.grouped_permutation(col, np.random.default_rng(seed))
    assert perm.tolist() == again.tolist()  # deterministic per seed
    other = store.grouped_permutation(col, np.random.default_rng(seed + 10))
    assert blocks_of(out) != blocks_of([keys[i][0] for i in other])  # the prompts move


def test_grouped_permutation_of_distinct_rows_is_the_row_shuffle():
    """One sample per prompt: the same order as train.shuffle=rows (same seed, same draw)."""
    col = pa.array([[i, 1] for i in range(17)])
    got = store.grouped_permutation(col, np.random.default_rng(5))
    assert got.tolist() == np.random.default_rng(5).permutation(17).tolist()


def test_grouped_permutation_of_a_sliced_column():
    """A sliced list array's offsets index its parent's values: the keys must be this slice's."""
    col = pa.array([[9], [1], [1], [2], [1], [2], [3]]).slice(1, 5)  # [1] [1] [2] [1] [2]
    perm = store.grouped_permutation(col, np.random.default_rng(0))
    out = [col[int(i)].as_py()[0] for i in perm]
    assert len(blocks_of(out)) == 2 and sorted(out) == [1, 1, 1, 2, 2]


# ----------------------------------------------------------------------------- store.stream
def grouped_rollouts(d, n_shards: int = 3, rows: int = 12, rg: int = 6) -> dict:
    """Rollout shards whose prompts have 1-3 samples, one prompt's rows split by a row group."""
    with store.open_writer(d, rollouts, dataset_id="g", stage="test", row_group_rows=rg) as w:
        for s in range(n_shards):
            rs = rollout_rows(rows)
            for i, r in enumerate(rs):
                r["sample_id"], r["prompt_id"] = f"s{s}-{i}", f"s{s}-p{(i + s) // 3}"
            w.write_shard(s, pa.Table.from_pylist(rs, schema=rollouts.SCHEMA))
        assert w.commit(n_shards, config={}, fingerprints={}, inputs={})
    return store.open_committed(d, rollouts)


def test_grouped_stream_resumes_exactly_and_keeps_prompts_together(tmp_path):
    m = grouped_rollouts(tmp_path / "ds")
    kw = dict(epochs=2, shuffle_seed=3, group_by="prompt_id")
    full = [
        (t["sample_id"].to_pylist(), t["prompt_id"].to_pylist(), s)
        for t, s in store.stream(tmp_path / "ds", m, **kw)
    ]
    for _, prompts, _ in full:
        assert len(blocks_of(prompts)) == len(set(prompts)) > 1  # each prompt adjacent
    rows = [x for ids, _, _ in full for x in ids]
    assert len(rows) == 72 and len(set(rows)) == 36  # two epochs of every row
    for cut in (1, 4, 6, 7, 11):
        rest = [
            t["sample_id"].to_pylist()
            for t, _ in store.stream(tmp_path / "ds", m, state=full[cut - 1][2], **kw)
        ]
        assert rest == [ids for ids, _, _ in full[cut:]]


# ----------------------------------------------------------------------------- the loader
@pytest.fixture(scope="module")
def grouped(world, tmp_path_factory):
    """8 prompts x 3 samples (rows of a prompt adjacent on disk), row groups of 12 rows."""
    root, student, teacher = world
    rd = tmp_path_factory.mktemp("grouped")
    sel = make_selection(rd, student, teacher, n=8, samples=3, prompt_len=10, resp_len=5,
                         row_group_rows=12)  # fmt: skip
    return rd, sel, store.open_committed(sel, selected)


def batches(sel, m, budget, shuffle, seed, start=None, epochs=2):
    s = MicroBatchStream(sel, m, budget, epochs=epochs, start=start, **shuffle_order(shuffle, seed))
    out = []
    try:
        while (mb := s.next_micro_batch()) is not None:
            out.append(([x["sample_id"] for x in mb], s.position()))
    finally:
        s.close()
    return out


def prompts_of(ids: list[str]) -> list[str]:
    return [i.split("#")[0] for i in ids]


def test_prompt_shuffle_keeps_samples_in_micro_batches(grouped):
    _, sel, m = grouped
    budget = 6 * 16  # 6 sequences of 16 tokens: two prompts' samples per micro-batch
    for seed in (0, 1, 2):
        got = batches(sel, m, budget, "prompts", seed)
        assert len(got) == 8  # 24 rows / 6, two epochs
        for ids, _ in got:
            p = prompts_of(ids)
            assert len(set(p)) == 2 and len(blocks_of(p)) == 2, ids
        assert got == batches(sel, m, budget, "prompts", seed)  # deterministic per seed
    orders = {tuple(i for ids, _ in batches(sel, m, budget, "prompts", s) for i in ids)
              for s in (0, 1, 2)}  # fmt: skip
    assert len(orders) == 3  # the seed moves the prompts
    # the row shuffle scatters them (what train.shuffle=rows / true does)
    rows = batches(sel, m, budget, "rows", 0)
    assert any(len(set(prompts_of(ids))) > 2 for ids, _ in rows)
    assert rows == batches(sel, m, budget, True, 0)


@pytest.mark.parametrize("shuffle", ["prompts", "rows", False])
def test_resumed_loader_yields_exactly_the_remaining_batches(grouped, shuffle):
    _, sel, m = grouped
    budget = 5 * 16  # 5 rows: micro-batches straddle prompts and row groups
    full = batches(sel, m, budget, shuffle, 4)
    for cut in (1, 2, 3, 5, len(full) - 1):
        rest = batches(sel, m, budget, shuffle, 4, start=full[cut - 1][1])
        assert [ids for ids, _ in rest] == [ids for ids, _ in full[cut:]]
    plan = plan_steps(sel, m, world_size=1, epochs=2, budget=budget, grad_accum=1,
                      max_steps=None, **shuffle_order(shuffle, 4))  # fmt: skip
    assert plan.micro_per_rank == [len(full)]  # the plan replays the same packing


def test_resume_under_another_order_is_refused(grouped):
    _, sel, m = grouped
    full = batches(sel, m, 6 * 16, "prompts", 0)
    with pytest.raises(UserError, match="another order"):
        batches(sel, m, 6 * 16, "rows", 0, start=full[2][1])
    legacy = {k: v for k, v in full[2][1].items() if k != "order"}  # saved before "order"
    assert batches(sel, m, 6 * 16, "prompts", 0, start=legacy) == full[3:]


# ----------------------------------------------------------------------------- end to end
def test_sharing_under_prompt_shuffle_trains_the_unshared_weights(world, grouped, tmp_path):
    """2 epochs, micro-batches of two prompts' samples: train.share_prefix on (the prompt runs
    once per micro-batch) and off give the same losses and weights to fp32 rounding."""
    _, student, _ = world
    rd, _, _ = grouped
    args = ["loss=topk_fkl", "train.epochs=2", "train.micro_batch_tokens=96",
            "train.shuffle=prompts", "train.lr=3e-3"]  # fmt: skip
    out = {}
    for share in (False, True):
        r = run(train_cfg(rd, student, *args, f"train.share_prefix={str(share).lower()}",
                          f"train.name=share{share}"))  # fmt: skip
        out[share] = r
    assert out[True]["steps"] == out[False]["steps"] == 8
    assert out[True]["history"] == pytest.approx(out[False]["history"], rel=1e-5, abs=1e-6)
    # AdamW normalises each entry's gradient, so rounding in a near-zero one moves it by up to
    # ~lr: compare the whole update, |delta_shared - delta_unshared| / |delta_unshared|
    init, a, b = (params_of(p) for p in (str(student), out[False]["final"], out[True]["final"]))
    diff = sum(float(((a[k] - b[k]) ** 2).sum()) for k in a) ** 0.5
    step = sum(float(((a[k] - init[k]) ** 2).sum()) for k in a) ** 0.5
    assert diff <= 1e-3 * step, (diff, step)


def test_train_shuffle_key():
    cfg = compose("train", ["run_dir=/tmp/x"])
    assert cfg.train.shuffle == "prompts"
    for v, want in (("rows", "rows"), ("true", True), ("false", False), ("prompts", "prompts")):
        assert compose("train", ["run_dir=/tmp/x", f"train.shuffle={v}"]).train.shuffle == want
    with pytest.raises(UserError) as e:
        compose("train", ["run_dir=/tmp/x", "train.shuffle=prompt"])
    assert "train.shuffle" in str(e.value) and "prompts|rows|false" in str(e.value)
