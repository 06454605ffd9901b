"""The data contract (docs/DATA.md) on a real run: any Parquet reader opens every dataset folder,
the decode one-liner, the shared DuckDB views, and a run that resolves from another directory.

The run is the quick demo world through rollout -> score -> select (as scripts/shard_checksums.py
builds it), so the folders are exactly what the stages write.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from demoworld import world as demoworld

from data_schemas import codec, manifest, tokens
from stages.lib import store, views
from stages.lib.config import compose
from stages.lib.layout import RunLayout

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> RunLayout:
    from stages import rollout, score, select

    world = tmp_path_factory.mktemp("world") / "w"
    demoworld.build_world(world, demoworld.WorldSettings.quick())
    base = world / "models" / "base"
    run_dir = tmp_path_factory.mktemp("run") / "run"
    cfg = compose(
        "pipeline",
        [
            "experiment=demo",
            f"run_dir={run_dir}",
            f"student.path={base}",
            f"teacher.path={base}",
            f"ref.path={base}",
            f"data.prompts={world / 'prompts' / 'train.parquet'}",
            "rollout.max_new_tokens=8",
            "rollout.backend=hf",
            "score.backend=hf",
        ],
    )
    for stage in (rollout, score, select):
        stage.run(cfg)
    return RunLayout.of(run_dir)


def dataset_dirs(layout: RunLayout) -> list[Path]:
    return [layout.rollouts, layout.tokens, *views.selection_dirs(layout)]


def test_every_dataset_folder_opens_with_any_reader(run):
    dirs = dataset_dirs(run)
    assert len(dirs) == 3
    for d in dirs:
        rows = manifest.read(d)["rows"]
        assert rows > 0, d
        glob = str(d / "**" / "*.parquet").replace("'", "''")
        n_duck = duckdb.sql(f"SELECT count(*) FROM read_parquet('{glob}')").fetchall()[0][0]
        n_pandas = len(pd.read_parquet(d))
        n_arrow = ds.dataset(d, partitioning="hive").count_rows()
        n_pq = pq.read_table(d).num_rows
        assert n_duck == n_pandas == n_arrow == n_pq == rows, d
        # nothing but shards and '_'/'.' metadata in the folder
        others = [p for p in d.rglob("*") if p.is_file() and p.suffix != ".parquet"]
        assert all(p.name.startswith(("_", ".")) for p in others), others


def test_decode_one_liner_matches_the_store(run):
    want = store.read_table(run.tokens, tokens).sort_by(
        [("sample_id", "ascending"), ("pos", "ascending")]
    )
    df = codec.decode(pd.read_parquet(run.tokens)).sort_values(
        ["sample_id", "pos"]
    )  # the one-liner
    assert codec.PHYSICAL not in df.columns and len(df) == want.num_rows
    got = np.concatenate(df[codec.LOGICAL].to_numpy())
    assert np.array_equal(got, pc.list_flatten(want[codec.LOGICAL]).to_numpy())
    t = codec.decode(ds.dataset(run.tokens, partitioning="hive").to_table())
    assert t.schema.field(codec.LOGICAL).type == want.schema.field(codec.LOGICAL).type


def test_shared_views_count_what_the_manifests_say(run):
    rv = views.open_run(run)
    try:
        for name, m in rv.manifests.items():
            assert rv.con.execute(f"SELECT count(*) FROM {name}").fetchone()[0] == m["rows"]
        ((sel, m),) = rv.selections.items()
        n = rv.con.execute(f'SELECT count(*) FROM "selected/{sel}"').fetchone()[0]
        assert n == m["rows"]
        assert rv.con.execute("SELECT DISTINCT selection FROM selected").fetchall() == [(sel,)]
        cols = [r[0] for r in rv.con.execute("DESCRIBE tokens").fetchall()]
        assert codec.LOGICAL in cols and codec.PHYSICAL not in cols
    finally:
        rv.close()


def test_manifests_record_typed_inputs_and_absolute_models(run, tmp_path, monkeypatch):
    tk = manifest.read(run.tokens)
    assert tk["teacher_temperature"] == 1.0 and tk["inputs"]["rollouts"]
    sel = manifest.read(views.selection_dirs(run)[0])
    assert sel["teacher_temperature"] == 1.0
    monkeypatch.chdir(tmp_path)  # opened from another directory, the models still resolve
    for m in (tk, sel):
        for role, entry in m["models"].items():
            assert Path(entry["path"]).is_absolute() and Path(entry["path"]).is_dir(), role
            assert entry["fingerprint"] == m["fingerprints"][role]
    assert Path(store.model_path(tk, "teacher")).is_dir()


def test_legacy_run_reads_then_migrates(run, tmp_path):
    """A run written before the '_' convention: the stages read it, --migrate converts it."""
    old = tmp_path / "old"
    shutil.copytree(run.root, old, ignore=shutil.ignore_patterns("checkpoints"))
    for d in dataset_dirs(RunLayout.of(old)):
        m = json.loads((d / manifest.FILENAME).read_text())
        for key in (manifest.CHECKSUM, "models", "teacher_temperature"):
            m.pop(key, None)
        (d / manifest.LEGACY_FILENAME).write_text(json.dumps(m))
        (d / manifest.FILENAME).unlink()
    with pytest.raises(Exception):  # noqa: B017 -- why the convention exists
        pd.read_parquet(old / "tokens")

    def sql(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "stages.sql", *args],
            cwd=ROOT, capture_output=True, text=True, timeout=120,
        )  # fmt: skip

    r = sql(str(old), "SELECT count(*) AS n FROM tokens")
    assert r.returncode == 0 and str(manifest.read(run.tokens)["rows"]) in r.stdout, r.stderr
    r = sql("--migrate", str(old))
    assert r.returncode == 0 and "migrated 3 dataset folder(s)" in r.stdout, r.stderr
    for d in dataset_dirs(RunLayout.of(old)):
        assert len(pd.read_parquet(d)) == manifest.read(d)["rows"]
        assert not (d / manifest.LEGACY_FILENAME).exists()
