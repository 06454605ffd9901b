"""The shard store: atomic shards, manifest last, resume, rank striding, locks, corruption."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_schemas import manifest, rollouts
from stages.lib import store
from stages.lib.errors import UserError
from tests.test_schemas import rollout_rows

ROOT = Path(__file__).resolve().parent.parent


def shard_table(shard: int, rows: int = 10) -> pa.Table:
    rs = rollout_rows(rows)
    for i, r in enumerate(rs):
        r["sample_id"] = f"s{shard}-{i}"
    return pa.Table.from_pylist(rs, schema=rollouts.SCHEMA)


def write_dataset(
    d: Path, n_shards: int = 3, rows: int = 10, rg: int = 4, did: str = "abc"
) -> dict:
    with store.open_writer(d, rollouts, dataset_id=did, stage="test", row_group_rows=rg) as w:
        for s in range(n_shards):
            if not w.is_done(s):
                w.write_shard(s, shard_table(s, rows))
        assert w.commit(n_shards, config={}, fingerprints={}, inputs={})
    return store.open_committed(d, rollouts)


def test_write_read_round_trip(tmp_path):
    m = write_dataset(tmp_path / "ds")
    assert m["rows"] == 30 and len(m["shards"]) == 3
    t = store.read_table(tmp_path / "ds", rollouts)
    assert t.num_rows == 30 and len(set(t["sample_id"].to_pylist())) == 30
    assert (tmp_path / "ds" / "bucket=000" / "shard-00000.parquet").exists()
    # a completed dataset re-opened with the same id is complete, a different id is refused
    assert store.open_writer(tmp_path / "ds", rollouts, dataset_id="abc", stage="t").complete
    with pytest.raises(UserError, match="different run or config"):
        store.open_writer(tmp_path / "ds", rollouts, dataset_id="zzz", stage="t")
    w = store.open_writer(tmp_path / "ds", rollouts, dataset_id="zzz", stage="t", overwrite=True)
    assert not w.complete and not list((tmp_path / "ds").glob("bucket=*/*.parquet"))
    w.close()


def test_invalid_shard_is_not_written(tmp_path):
    bad = shard_table(0)
    bad = bad.set_column(0, "sample_id", pa.array(["dup"] * bad.num_rows))
    with store.open_writer(tmp_path / "ds", rollouts, dataset_id="a", stage="t") as w:
        with pytest.raises(UserError, match="duplicated"):
            w.write_shard(0, bad)
    assert not list((tmp_path / "ds").rglob("*.parquet"))


def test_ranks_are_disjoint_and_cover_everything(tmp_path):
    m = write_dataset(tmp_path / "ds", n_shards=3, rows=10, rg=3)  # 4 row groups per shard
    seen = []
    for rank in range(2):
        ids = [
            x
            for t, _ in store.stream(tmp_path / "ds", m, rank=rank, world_size=2)
            for x in t["sample_id"].to_pylist()
        ]
        seen.append(set(ids))
        assert len(ids) == len(set(ids))
    assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == 30


@pytest.mark.parametrize("shuffle", [None, 7])
def test_resumed_stream_yields_exactly_the_rest(tmp_path, shuffle):
    m = write_dataset(tmp_path / "ds", n_shards=3, rows=10, rg=3)
    full = [
        (t["sample_id"].to_pylist(), s)
        for t, s in store.stream(tmp_path / "ds", m, epochs=2, shuffle_seed=shuffle)
    ]
    for cut in (1, 5, 12, 13, 20):
        state = full[cut - 1][1]
        rest = [
            t["sample_id"].to_pylist()
            for t, _ in store.stream(
                tmp_path / "ds", m, epochs=2, shuffle_seed=shuffle, state=state
            )
        ]
        assert rest == [ids for ids, _ in full[cut:]]


def test_checksum_and_truncation_are_detected(tmp_path):
    write_dataset(tmp_path / "ds")
    p = tmp_path / "ds" / store.shard_relpath(1)
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF
    p.write_bytes(bytes(data))
    with pytest.raises(UserError, match="checksum"):
        store.open_committed(tmp_path / "ds", rollouts)
    p.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(UserError, match="checksum"):
        store.open_committed(tmp_path / "ds", rollouts)


def test_shard_from_another_dataset_is_refused(tmp_path):
    write_dataset(tmp_path / "a", did="aaa")
    write_dataset(tmp_path / "b", did="bbb")
    # copy a shard of b into a partially written a: resume refuses it
    os.remove(tmp_path / "a" / manifest.FILENAME)
    os.replace(tmp_path / "b" / store.shard_relpath(1), tmp_path / "a" / store.shard_relpath(1))
    w = store.open_writer(tmp_path / "a", rollouts, dataset_id="aaa", stage="t")
    with pytest.raises(UserError, match="different run or config"):
        w.is_done(1)
    w.close()
    os.replace(tmp_path / "a" / store.shard_relpath(1), tmp_path / "a" / store.shard_relpath(0))
    with pytest.raises(UserError, match="different run or config"):  # refused at open too
        store.open_writer(tmp_path / "a", rollouts, dataset_id="aaa", stage="t")


def test_incomplete_dataset_is_not_readable(tmp_path):
    with store.open_writer(tmp_path / "ds", rollouts, dataset_id="a", stage="t") as w:
        w.write_shard(0, shard_table(0))
        assert not w.commit(2, config={}, fingerprints={}, inputs={})  # shard 1 missing
    with pytest.raises(UserError, match="incomplete"):
        store.open_committed(tmp_path / "ds", rollouts)


def test_second_writer_is_refused(tmp_path):
    w = store.open_writer(tmp_path / "ds", rollouts, dataset_id="a", stage="t")
    try:
        with pytest.raises(UserError, match="locked by another writer"):
            store.open_writer(tmp_path / "ds", rollouts, dataset_id="a", stage="t")
        # a different worker of the same dataset may write at the same time
        other = store.open_writer(
            tmp_path / "ds", rollouts, dataset_id="a", stage="t", worker_index=1, worker_count=2
        )
        other.close()
    finally:
        w.close()
    store.open_writer(tmp_path / "ds", rollouts, dataset_id="a", stage="t").close()


def test_workers_split_disjoint_shards():
    parts = [store.shards_of_worker(10, i, 3) for i in range(3)]
    assert sorted(sum(parts, [])) == list(range(10))
    with pytest.raises(UserError):
        store.shards_of_worker(10, 3, 3)


KILL_SCRIPT = textwrap.dedent("""
    import sys, time
    import pyarrow as pa
    sys.path.insert(0, {root!r})
    from data_schemas import rollouts
    from stages.lib import store
    from tests.test_store import shard_table
    slow = sys.argv[2] == "slow"
    with store.open_writer(sys.argv[1], rollouts, dataset_id="k", stage="t", row_group_rows=50) as w:
        for s in range(4):
            if w.is_done(s):
                continue
            t = shard_table(s, 2000)
            if slow and s == 2:
                # write shard 2 through a writer that stalls mid-file, then get killed
                import pyarrow.parquet as pq, os
                from stages.lib.store import TMP_PREFIX
                p = w.shard_path(s); p.parent.mkdir(parents=True, exist_ok=True)
                tmp = p.with_name(f"{{TMP_PREFIX}}{{p.name}}.{{os.getpid()}}")
                with pq.ParquetWriter(tmp, t.schema) as pw:
                    pw.write_table(t.slice(0, 100))
                    print("MID", flush=True)
                    time.sleep(60)
            w.write_shard(s, t)
        w.commit(4, config={{}}, fingerprints={{}}, inputs={{}})
    print("DONE", flush=True)
""")


def test_sigkill_mid_shard_then_rerun_completes(tmp_path):
    script = tmp_path / "writer.py"
    script.write_text(KILL_SCRIPT.format(root=str(ROOT)))
    d = tmp_path / "ds"
    p = subprocess.Popen(
        [sys.executable, str(script), str(d), "slow"], stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    assert p.stdout.readline().strip() == "MID"
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    # no visible partial shard: shards 0, 1 complete, shard 2 only as a hidden temp file
    visible = sorted(x.name for x in d.glob("bucket=*/shard-*.parquet"))
    assert visible == ["shard-00000.parquet", "shard-00001.parquet"]
    assert list(d.glob("bucket=*/.tmp-*")) and not (d / manifest.FILENAME).exists()
    with pytest.raises(UserError, match="incomplete"):
        store.open_committed(d, rollouts)
    t0 = time.time()
    r = subprocess.run(
        [sys.executable, str(script), str(d), "fast"], capture_output=True, text=True, cwd=ROOT
    )
    assert r.returncode == 0, r.stderr
    assert time.time() - t0 < 60
    t = store.read_table(d, rollouts)
    ids = t["sample_id"].to_pylist()
    assert len(ids) == len(set(ids)) == 8000
    assert not list(d.glob("bucket=*/.tmp-*"))
    # identical to an uninterrupted run
    d2 = tmp_path / "ds2"
    subprocess.run(
        [sys.executable, str(script), str(d2), "fast"], check=True, cwd=ROOT, capture_output=True
    )
    assert store.read_table(d2, rollouts).equals(t)


# ----------------------------------------------------------------------------- manifests vs reality (#16)
def _reseal(d: Path, edit) -> None:
    """Edit the committed manifest and re-seal it: a manifest that is well formed but lies."""
    p = d / manifest.FILENAME
    m = json.loads(p.read_text())
    edit(m)
    p.write_text(json.dumps(manifest.seal(m)))


def test_manifest_file_is_underscored_and_sealed(tmp_path):
    d = tmp_path / "ds"
    write_dataset(d)
    names = {p.name for p in d.iterdir() if p.is_file()}
    assert manifest.FILENAME == "_manifest.json" and "manifest.json" not in names
    assert all(n.startswith(("_", ".")) for n in names)  # every non-shard file is hidden
    m = json.loads((d / manifest.FILENAME).read_text())
    assert m[manifest.CHECKSUM] == manifest.checksum(m)


def test_manifest_edit_without_reseal_is_refused(tmp_path):
    d = tmp_path / "ds"
    write_dataset(d)
    p = d / manifest.FILENAME
    p.write_text(p.read_text().replace('"stage": "test"', '"stage": "tset"'))
    with pytest.raises(UserError, match="manifest checksum mismatch"):
        store.open_committed(d, rollouts)


def test_rows_checked_against_the_parquet_footer(tmp_path):
    d = tmp_path / "ds"
    write_dataset(d)

    def inflate(m):  # phantom rows: the totals still add up
        m["shards"][1]["rows"] += 5
        m["rows"] += 5

    _reseal(d, inflate)
    with pytest.raises(UserError, match="holds 10 rows but the manifest says 15"):
        store.open_committed(d, rollouts)


def test_unlisted_shard_in_a_committed_dataset_is_refused(tmp_path):
    d = tmp_path / "ds"
    write_dataset(d)

    def drop(m):  # shard 2 removed from the manifest, rows patched: two thirds of the data
        m["rows"] -= m["shards"].pop()["rows"]
        m["bytes"] = sum(s["bytes"] for s in m["shards"])

    _reseal(d, drop)
    with pytest.raises(UserError, match="shard-00002.parquet is in the committed") as e:
        store.open_committed(d, rollouts)
    assert "not in its manifest" in e.value.line() and "Fix:" in e.value.line()


def test_stray_files_refused_unless_hidden(tmp_path):
    d = tmp_path / "ds"
    write_dataset(d)
    (d / "_summary.json").write_text("{}")  # '_' and '.' names are the run's own metadata
    (d / "bucket=000" / ".notes").write_text("x")
    store.open_committed(d, rollouts)
    (d / "notes.txt").write_text("x")  # a Parquet reader of the folder would choke on it
    with pytest.raises(UserError, match="notes.txt is in the committed"):
        store.open_committed(d, rollouts)


def test_manifest_shard_path_cannot_leave_the_folder(tmp_path):
    d = tmp_path / "ds"
    write_dataset(d)
    _reseal(d, lambda m: m["shards"][0].update(path="../elsewhere.parquet"))
    with pytest.raises(UserError, match="missing: ../elsewhere.parquet"):
        store.open_committed(d, rollouts)


def test_legacy_manifest_is_read_and_migrated(tmp_path):
    d = tmp_path / "ds"
    write_dataset(d)
    m = json.loads((d / manifest.FILENAME).read_text())
    m.pop(manifest.CHECKSUM)
    (d / manifest.LEGACY_FILENAME).write_text(json.dumps(m))  # as runs before the convention
    (d / manifest.FILENAME).unlink()
    assert store.open_committed(d, rollouts)["rows"] == 30
    with pytest.raises(Exception):  # noqa: B017 -- the reason for the convention
        pq.read_table(d)
    assert store.migrate(d) and not store.migrate(d)
    assert not (d / manifest.LEGACY_FILENAME).exists()
    assert manifest.read(d)[manifest.CHECKSUM] and pq.read_table(d).num_rows == 30


@pytest.mark.parametrize("damage", ["directory", "truncated", "not_utf8"])
def test_broken_manifest_is_one_line_exit_2(tmp_path, damage):
    """Through a real entry point (distillery-sql): exit 2, one line, nothing changed."""
    d = tmp_path / "run" / "rollouts"
    write_dataset(d)
    p = d / manifest.FILENAME
    if damage == "directory":
        p.unlink()
        p.mkdir()
    elif damage == "truncated":
        p.write_bytes(p.read_bytes()[:40])
    else:
        p.write_bytes(b"\xff\xfe" + p.read_bytes())
    before = {q: q.stat().st_mtime_ns for q in tmp_path.rglob("*")}
    r = subprocess.run(
        [sys.executable, "-m", "stages.sql", str(tmp_path / "run"), "SELECT 1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "_manifest.json" in lines[0] and "Fix:" in lines[0]
    assert {q: q.stat().st_mtime_ns for q in tmp_path.rglob("*")} == before


def test_overwrite_replaces_a_dataset_with_a_broken_manifest(tmp_path):
    d = tmp_path / "ds"
    write_dataset(d)
    (d / manifest.FILENAME).write_text("{trunc")
    with pytest.raises(UserError, match="unreadable manifest"):
        store.open_writer(d, rollouts, dataset_id="abc", stage="t")
    w = store.open_writer(d, rollouts, dataset_id="abc", stage="t", overwrite=True)
    assert not w.complete and not (d / manifest.FILENAME).exists()
    w.close()


def test_models_inside_the_run_are_named_relative_to_it(tmp_path, tiny_lm):
    """A model inside the run (an SFT checkpoint) is recorded by ``run_path``, one outside by
    its absolute path; after the run moves, the in-run one resolves to the moved copy (from a
    dataset folder or a selection's), and the manifest check takes exactly one of the two."""
    import shutil

    run = tmp_path / "run"
    sft = run / "checkpoints" / "sft" / "final"
    shutil.copytree(tiny_lm, sft)
    got = store.model_entries(
        {"policy": sft, "teacher": tiny_lm, "ref": None}, {"policy": "fp"}, run
    )
    assert got == {
        "policy": {"run_path": "checkpoints/sft/final", "fingerprint": "fp"},
        "teacher": {"path": str(Path(tiny_lm).resolve()), "fingerprint": None},
    }
    assert store.shown_path(sft, run, "s3://b/run/") == "s3://b/run/checkpoints/sft/final"
    assert store.shown_path(tiny_lm, run, "s3://b/run") == str(tiny_lm)
    moved = tmp_path / "elsewhere"
    shutil.move(run, moved)
    m = {"models": got}
    for d in (moved / "tokens", moved / "selected" / "x", moved / "round2" / "rollouts"):
        root = d.parent.parent if d.parent.name == "selected" else d.parent
        assert store.model_path(m, "policy", directory=d) == str(root / "checkpoints/sft/final")
    assert Path(store.model_path(m, "policy", directory=moved / "tokens")).is_dir()
    assert store.model_path(m, "teacher") == str(Path(tiny_lm).resolve())
    with pytest.raises(ValueError):
        store.model_path(m, "policy")  # a run_path needs the folder it is relative to
    manifest._check_models(got, "w")
    for bad in ({"run_path": "../x"}, {"run_path": "/abs"}, {"path": "rel"}, {"path": "/a", "run_path": "b"}, {}):  # fmt: skip
        with pytest.raises(UserError, match="models.p"):
            manifest._check_models({"p": bad}, "w")
