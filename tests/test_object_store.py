"""A run on object storage: ``run_dir=s3://...`` against a real S3 server (moto, server mode).

The server runs in this process on 127.0.0.1 (a free port); stages run in-process (the pipeline)
or as CLI subprocesses (kill, refusal), which reach it through ``AWS_ENDPOINT_URL``. Each
"machine" is a separate mirror folder (``DISTILLERY_MIRROR``): a fresh one proves that what a
stage needs comes from the bucket, not from a local leftover.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import pytest

pytest.importorskip("boto3")
pytest.importorskip("moto.server")

import duckdb  # noqa: E402

from data_schemas import rollouts, selected, tokens  # noqa: E402
from stages import pipeline  # noqa: E402
from stages.lib import remote  # noqa: E402
from stages.lib.config import compose  # noqa: E402
from stages.lib.errors import UserError  # noqa: E402
from stages.lib.layout import RunLayout  # noqa: E402
from stages.lib.lease import ENV_LEASE, Lease  # noqa: E402
from stages.lib.mirror import _REMOTES, open_remote, plan_pull, pull  # noqa: E402
from stages.lib.uri import ENV_MIRROR, mirror_of, mirror_root  # noqa: E402
from tests import reliability_harness as h  # noqa: E402
from tests import servers  # noqa: E402
from tests.conftest import write_prompts  # noqa: E402

BUCKET = "distillery-test"
KEYS = {"rollouts": ["sample_id"], "tokens": ["sample_id", "pos"], "selected/entropy_half": ["sample_id"]}  # fmt: skip
TABLES = {"rollouts": rollouts, "tokens": tokens, "selected/entropy_half": selected}


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server and the AWS variables that point boto3 and pyarrow at it."""
    with servers.moto_s3(BUCKET) as client:
        yield client


def machine(monkeypatch, tmp_path: Path, name: str) -> Path:
    """Switch to a fresh mirror folder (another machine's empty cache)."""
    d = tmp_path / f"mirror-{name}"
    monkeypatch.setenv(ENV_MIRROR, str(d))
    _REMOTES.clear()
    return d


def objects(client, prefix: str) -> dict[str, dict]:
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        out.update({o["Key"]: o for o in page.get("Contents", [])})
    return out


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    return write_prompts(tmp_path_factory.mktemp("prompts") / "prompts.parquet", 12)


@pytest.fixture(scope="module")
def ov(tiny_lm, tiny_teacher, prompts):
    def make(run_dir, *extra: str) -> list[str]:
        return h.overrides_for(run_dir, tiny_lm, tiny_teacher, prompts, *extra)

    return make


STAGES = "pipeline.stages=[rollout,score,select,train]"
# several selected shards and row groups: the trainer's ranks stride over row groups
SMALL_GROUPS = ("select.rows_per_shard=8", "select.row_group_rows=2")


@pytest.fixture(scope="module")
def local_ref(ov, tmp_path_factory) -> Path:
    """The same pipeline on a local folder: the rows every remote run must reproduce."""
    run_dir = tmp_path_factory.mktemp("local") / "run"
    pipeline.run(compose("pipeline", ov(run_dir, STAGES, *SMALL_GROUPS)))
    return run_dir


def digests(run_dir: Path) -> dict:
    return {d: h.rows_digest(run_dir / d, TABLES[d], KEYS[d]) for d in TABLES}


def test_pipeline_on_s3_gives_the_rows_of_a_local_run(s3, ov, local_ref, tmp_path, monkeypatch):
    uri = f"s3://{BUCKET}/pipe/run"
    machine(monkeypatch, tmp_path, "a")
    cfg = compose("pipeline", ov(uri, STAGES, *SMALL_GROUPS))
    pipeline.run(cfg)
    keys = objects(s3, "pipe/run/")
    for d in TABLES:
        assert f"pipe/run/{d}/_manifest.json" in keys, d
    assert any(k.startswith(f"pipe/run/checkpoints/{cfg.train.name}/final/") for k in keys)
    assert not any(k.startswith("pipe/run/_leases/") for k in keys)  # released
    assert not any("/." in k for k in keys)  # no lock, temp or index file was published

    # another machine (empty mirror) reads the run from the bucket: the rows of the local run
    mirror = machine(monkeypatch, tmp_path, "b")
    pull(open_remote(uri))
    assert RunLayout.of(uri).root == mirror / "s3" / BUCKET / "pipe/run"
    assert digests(RunLayout.of(uri).root) == digests(local_ref)

    # distillery-sql on the bucket, from a third machine, read-only
    machine(monkeypatch, tmp_path, "c")
    from stages import sql

    con, names = sql.connect(uri)
    assert {"rollouts", "tokens", "selected"} <= set(names)
    n = con.execute("SELECT count(*) FROM rollouts").fetchone()[0]
    assert n == json.loads((local_ref / "rollouts" / "_manifest.json").read_text())["rows"]
    with pytest.raises(duckdb.Error):  # still the read-only session: no file access
        con.execute(f"COPY rollouts TO '{tmp_path / 'x.parquet'}'")

    # a re-run on a machine that has everything does nothing new: same objects, same mtimes
    machine(monkeypatch, tmp_path, "b")
    pipeline.run(compose("pipeline", ov(uri, STAGES, *SMALL_GROUPS)))
    after = objects(s3, "pipe/run/")
    shards = [k for k in keys if k.endswith(".parquet") and "/bucket=" in k]
    assert shards and all(after[k]["LastModified"] == keys[k]["LastModified"] for k in shards)


def test_killed_stage_resumes_from_the_bucket_and_a_live_lease_refuses(
    s3, ov, local_ref, tmp_path, monkeypatch
):
    uri = f"s3://{BUCKET}/kill/run"
    monkeypatch.setenv(ENV_LEASE, "6")
    # machine A: rollout SIGKILLed right after its first shard is published
    monkeypatch.setenv(ENV_MIRROR, str(tmp_path / "mA"))
    r = h.run_stage("rollout", ov(uri), fault="after_shard:1")
    assert r.killed, r.describe()
    keys = objects(s3, "kill/run/")
    shards = sorted(k for k in keys if k.startswith("kill/run/rollouts/bucket="))
    assert shards == ["kill/run/rollouts/bucket=000/shard-00000.parquet"], keys
    assert "kill/run/rollouts/_manifest.json" not in keys  # invisible to readers
    lease_key = "kill/run/_leases/rollout-worker-0-of-1.json"
    assert lease_key in keys  # the dead writer's lease, live until it expires

    # the dead writer's lease expires (nobody renews it); another writer (here: this test)
    # takes it over and holds it live: machine B is refused in one line, exit 2, nothing written
    doc = json.loads(s3.get_object(Bucket=BUCKET, Key=lease_key)["Body"].read())
    time.sleep(max(0.0, doc["expires"] - time.time()) + 0.5)
    machine(monkeypatch, tmp_path, "B")
    holder = Lease(open_remote(uri), "rollout-worker-0-of-1", 60)
    holder.acquire()
    r = h.run_stage("rollout", ov(uri))
    holder.release()
    assert r.rc == 2, r.describe()
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: rollout-worker-0-of-1 of " + uri)
    assert "Fix:" in lines[0]
    assert objects(s3, "kill/run/rollouts/").keys() == {shards[0]}

    # machine B again: pulls the published shard 0 and writes only the rest
    r = h.run_stage("rollout", ov(uri))
    assert r.rc == 0, r.describe()
    assert "shards 2 written / 1 resumed" in r.stdout
    after = objects(s3, "kill/run/rollouts/")
    assert after[shards[0]]["LastModified"] == keys[shards[0]]["LastModified"]  # not rewritten
    assert "kill/run/rollouts/_manifest.json" in after
    assert lease_key not in objects(s3, "kill/run/_leases/")
    machine(monkeypatch, tmp_path, "C")
    pull(open_remote(uri))
    got = h.rows_digest(RunLayout.of(uri).rollouts, rollouts, ["sample_id"])  # unique keys
    assert got == h.rows_digest(local_ref / "rollouts", rollouts, ["sample_id"])


def test_lease_conditional_writes(s3, tmp_path, monkeypatch):
    """Two writers race for one lease: one wins; an expired lease is taken over exactly once."""
    machine(monkeypatch, tmp_path, "l")
    r = open_remote(f"s3://{BUCKET}/lease/run")
    a, b = Lease(r, "select-x", 30), Lease(r, "select-x", 30)
    a.acquire()
    with pytest.raises(UserError, match="select-x of s3://"):
        b.acquire()
    a.release()
    b.acquire()  # released: free again
    b._stop.set()  # b dies without releasing: its lease stays until it expires
    b._thread.join()
    s3.put_object(  # make it expired, as if b had been dead for a while
        Bucket=BUCKET,
        Key="lease/run/_leases/select-x.json",
        Body=json.dumps({"holder": b.holder, "expires": time.time() - 1}).encode(),
    )
    c, d = Lease(r, "select-x", 30), Lease(r, "select-x", 30)
    c.acquire()
    with pytest.raises(UserError):
        d.acquire()
    c.release()


def losses(run_dir: Path, name: str) -> list[float]:
    path = RunLayout.of(run_dir).train(name) / "metrics.jsonl"
    return [json.loads(ln)["loss"] for ln in path.read_text().splitlines() if ln.strip()]


def test_trainer_streams_the_selection_from_the_bucket(s3, ov, local_ref, tmp_path, monkeypatch):
    """On a machine with an empty mirror the trainer reads the selected shards in place (row
    groups by byte ranges): none is downloaded, and it trains exactly as on the local run."""
    uri = f"s3://{BUCKET}/pipe/run"  # written by the first test (the module runs in order)
    if not objects(s3, "pipe/run/selected/"):
        pytest.skip("needs test_pipeline_on_s3_gives_the_rows_of_a_local_run first")
    machine(monkeypatch, tmp_path, "d")
    cfg = compose(
        "pipeline", ov(uri, "pipeline.stages=[train]", "train.name=streamed", *SMALL_GROUPS)
    )
    pipeline.run(cfg)
    sel = RunLayout.of(uri).selected("entropy_half")
    assert (sel / "_manifest.json").is_file() and not list(sel.rglob("*.parquet"))
    assert "pipe/run/checkpoints/streamed/final/config.json" in objects(s3, "pipe/run/checkpoints/")
    ref_cfg = compose("pipeline", ov(local_ref, STAGES))
    assert losses(uri, "streamed") == pytest.approx(losses(local_ref, ref_cfg.train.name), rel=1e-6)


def torchrun_node(node_rank: int, port: int, overrides: list[str], mirror: Path):
    """One torchrun "node" (its own process group launcher and its own mirror)."""
    import subprocess
    import sys

    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
        f"--node_rank={node_rank}", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}",
        "--rdzv_id=object-store-test", "-m", "stages.train", *overrides,
    ]  # fmt: skip
    env = h.stage_env(**{ENV_MIRROR: str(mirror)})
    return subprocess.Popen(
        cmd, cwd=h.REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def test_two_torchrun_nodes_train_from_the_bucket(s3, ov, tmp_path, monkeypatch):
    """Two "nodes" (torchrun --nnodes=2, gloo, c10d rendezvous) train one run from the bucket,
    each with an empty mirror: every rank streams its own row groups, rank 0 publishes."""
    uri = f"s3://{BUCKET}/pipe/run"
    if not objects(s3, "pipe/run/selected/"):
        pytest.skip("needs test_pipeline_on_s3_gives_the_rows_of_a_local_run first")
    extra = ("train.name=two_nodes", "train.max_steps=3", "train.keep_last=1")
    args = ov(uri, *extra, "train.micro_batch_tokens=40", *SMALL_GROUPS)
    port = servers.free_port()
    # node 0 first: its agent binds the rendezvous endpoint and hosts the c10d store, as the
    # host named by --rdzv_endpoint does on a cluster (it outlives the other node: rank 0
    # publishes last)
    nodes = [torchrun_node(0, port, args, tmp_path / "node0")]
    time.sleep(3)
    nodes.append(torchrun_node(1, port, args, tmp_path / "node1"))
    results = [h.wait_stage(p, timeout=400) for p in nodes]
    for i, r in enumerate(results):
        assert r.rc == 0, f"node {i}: {r.describe()}"
    keys = objects(s3, "pipe/run/")
    ck = "pipe/run/checkpoints/two_nodes"
    assert f"{ck}/final/config.json" in keys
    for state in ("trainer_state.json", "trainer_state.rank1.json"):  # node 1 published its own
        assert f"{ck}/step-000002/{state}" in keys and f"{ck}/final/{state}" in keys
    assert not any(k.startswith(f"{ck}/step-000001/") for k in keys)  # pruned there too
    assert "pipe/run/train/two_nodes/metrics.jsonl" in keys
    assert not any(k.startswith("pipe/run/_leases/") for k in keys)
    for i in (0, 1):  # the selection was streamed, not downloaded, on both nodes
        sel = tmp_path / f"node{i}" / "s3" / BUCKET / "pipe/run/selected/entropy_half"
        assert (sel / "_manifest.json").is_file() and not list(sel.rglob("*.parquet"))
    machine(monkeypatch, tmp_path, "check")
    pull(open_remote(uri))
    assert len(losses(uri, "two_nodes")) == 3


def test_a_lease_taken_over_stops_its_old_holder(s3, tmp_path, monkeypatch):
    """A holder that stalled past its expiry and was taken over notices at its next renewal
    and refuses to publish anything more."""
    machine(monkeypatch, tmp_path, "s")
    r = open_remote(f"s3://{BUCKET}/stall/run")
    old = Lease(r, "train-x", 0.6)
    old.acquire()
    s3.put_object(  # another writer took the (expired) lease over: a new etag
        Bucket=BUCKET,
        Key="stall/run/_leases/train-x.json",
        Body=json.dumps({"holder": "other", "expires": time.time() + 60}).encode(),
    )
    assert old.lost.wait(5)
    with pytest.raises(UserError, match="lost the lease train-x"):
        old.check()
    old.release()  # leaves the other writer's lease alone
    got = json.loads(
        s3.get_object(Bucket=BUCKET, Key="stall/run/_leases/train-x.json")["Body"].read()
    )
    assert got["holder"] == "other"


def test_a_missing_bucket_is_one_line(s3, tmp_path, monkeypatch):
    machine(monkeypatch, tmp_path, "x")
    with pytest.raises(UserError, match="bucket 'no-such-bucket' does not exist"):
        open_remote("s3://no-such-bucket/run")


def test_uris_and_what_a_pull_takes(tmp_path, monkeypatch):
    """file:// is the local folder; a mirror is a function of the URI; a pull takes the
    manifest's shards and not a stray one, and every published shard of an uncommitted folder."""
    monkeypatch.setenv(ENV_MIRROR, str(tmp_path))
    assert RunLayout.of("file:///data/run").root == Path("/data/run")
    assert RunLayout.of(f"s3://{BUCKET}/a/run/").root == tmp_path / "s3" / BUCKET / "a/run"
    assert RunLayout.round_dir("s3://b/run", 2) == "s3://b/run/round2"
    assert RunLayout.round_dir("runs/x", 2) == "runs/x/round2"
    with pytest.raises(UserError):
        mirror_of("s3://b/../etc")
    objs = dict.fromkeys(
        [
            "rollouts/_manifest.json",
            "rollouts/bucket=000/shard-00000.parquet",
            "rollouts/bucket=000/shard-00001.parquet",  # stray: not in the manifest
            "tokens/bucket=000/shard-00000.parquet",  # no manifest yet: a resumed writer's
            "checkpoints/x/final/config.json",
        ]
    )
    mans = {"rollouts": {"shards": [{"path": "bucket=000/shard-00000.parquet"}]}}
    assert plan_pull(objs, mans) == [
        "rollouts/_manifest.json",
        "rollouts/bucket=000/shard-00000.parquet",
        "tokens/bucket=000/shard-00000.parquet",
        "checkpoints/x/final/config.json",
    ]


def test_mirror_root_templates_and_what_each_stage_pulls(tmp_path, monkeypatch):
    """``{host}``/``{pid}`` in DISTILLERY_MIRROR; the folders a stage's pull is limited to."""
    from types import SimpleNamespace

    monkeypatch.setenv(ENV_MIRROR, str(tmp_path / "m-{host}" / "{pid}"))
    assert mirror_root() == tmp_path / f"m-{socket.gethostname()}" / str(os.getpid())
    cfg = SimpleNamespace(
        select=SimpleNamespace(name="half"), train=SimpleNamespace(name="t", selection="half")
    )
    assert remote.stage_reads(cfg, "rollout") == ("rollouts/", "checkpoints/sft/final/")
    assert "tokens/" in remote.stage_reads(cfg, "score")
    assert not any(p.startswith("selected/") for p in remote.stage_reads(cfg, "score"))
    assert remote.stage_reads(cfg, "select")[-1] == "selected/half/"
    train = remote.stage_reads(cfg, "train")
    assert "selected/half/" in train and "checkpoints/t/" in train and "selected/" not in train
    report = remote.stage_reads(cfg, "report")
    assert not any(p.startswith("checkpoints/") and "/sft/" not in p for p in report)
    for stage in ("eval", "sft"):  # they read checkpoints across the run
        assert remote.stage_reads(cfg, stage) is None
    # off a Ray actor, localize and translate leave paths as they are
    assert remote.localize(tmp_path / "x") == str(tmp_path / "x")
    assert remote.translate(tmp_path / "x") == tmp_path / "x"


def test_report_on_a_fresh_machine_pulls_no_checkpoint(s3, ov, tmp_path, monkeypatch):
    """The report stage pulls the datasets, curves and results it shows, not the checkpoints
    (the trainings' weights): it runs from an empty mirror and publishes report.html."""
    uri = f"s3://{BUCKET}/pipe/run"
    if not objects(s3, "pipe/run/checkpoints/"):
        pytest.skip("needs test_pipeline_on_s3_gives_the_rows_of_a_local_run first")
    from stages import report

    mirror = machine(monkeypatch, tmp_path, "r")
    cfg = compose("report", ov(uri))
    with remote.stage_session(cfg, "report"):
        report.run(cfg)
    assert "pipe/run/report/report.html" in objects(s3, "pipe/run/report/")
    run = mirror / "s3" / BUCKET / "pipe/run"
    assert (run / "train").is_dir() and (run / "tokens" / "_manifest.json").is_file()
    assert not (run / "checkpoints").exists()
