"""Ray actors on machines that share nothing but a bucket: ``launcher.kind=ray`` with
``run_dir=s3://...`` (a real local Ray cluster, a real S3 server: moto on 127.0.0.1).

Each "machine" is a mirror folder: the driver's (``DISTILLERY_MIRROR`` of this process) and one
per actor process (``launcher.env.DISTILLERY_MIRROR=.../actors/{pid}``). During the actor phase
the driver's mirror is moved away, so an actor that read a path of the driver's would fail. The
policy is an SFT checkpoint that exists only in the bucket, so every actor must pull it.
Checks: rollout and score shards byte-identical to a local run; the driver fetches none of the
shards the actors wrote; each actor holds only what its shards needed; every shard object has
exactly one version (published once); manifests name the SFT checkpoint inside the run, not by
a mirror path; an actor SIGKILLed mid-shard is replaced and its shard published once; a second
driver on the same run is refused with one line.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("boto3")
pytest.importorskip("moto.server")

from data_schemas import rollouts, tokens  # noqa: E402
from stages import rollout, score  # noqa: E402
from stages.lib import errors, raylaunch, remote, store  # noqa: E402
from stages.lib.config import compose  # noqa: E402
from stages.lib.mirror import _REMOTES  # noqa: E402
from stages.lib.uri import ENV_MIRROR, mirror_of  # noqa: E402
from tests import reliability_harness as h  # noqa: E402
from tests import servers  # noqa: E402
from tests.conftest import write_prompts  # noqa: E402

BUCKET = "distillery-ray"
TABLES = {"rollouts": rollouts, "tokens": tokens}
SFT = "checkpoints/sft/final"


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server with a versioned bucket (every PUT of a key is a version: 'published
    once' is countable) and the AWS variables that point boto3, pyarrow and the actors at it."""
    with servers.moto_s3(BUCKET, versioned=True) as client:
        yield client


@pytest.fixture(scope="module", autouse=True)
def ray_session(s3):
    """One local cluster for the module, started after the S3 variables are set (the actors
    inherit the credentials, as a node's own environment would give them)."""
    with servers.local_ray():
        yield


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory) -> Path:
    return write_prompts(tmp_path_factory.mktemp("prompts") / "prompts.parquet", 12)


def overrides(run_dir, lm: Path, teacher: Path, prompts: Path, *extra: str) -> list[str]:
    base = [
        f"run_dir={run_dir}",
        f"student.path={lm}",
        f"teacher.path={teacher}",
        f"data.prompts={prompts}",
        "sft.enabled=true",  # the policy: run_dir/checkpoints/sft/final
        "rollout.backend=hf",
        "score.backend=hf",
        "rollout.n=2",
        "rollout.temperature=0.8",
        "rollout.guided_fraction=0.5",
        "rollout.max_new_tokens=8",
        "rollout.prompts_per_shard=2",
        "rollout.batch_size=4",
        "score.batch_tokens=8",  # one sequence per forward: shards last long enough to be killed
        *extra,
    ]
    return list({o.split("=", 1)[0]: o for o in base}.values())


def on_actors(tmp_path: Path) -> tuple[str, ...]:
    """Ray over the bucket, each actor process with a mirror of its own."""
    mirror = f"{tmp_path}/actors/{{pid}}"
    return ("launcher.kind=ray", "launcher.actors=2", f"+launcher.env.DISTILLERY_MIRROR='{mirror}'")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_lm, tiny_teacher, prompts_file) -> Path:
    """Rollout + score by one local process, the policy an SFT checkpoint inside the run."""
    run_dir = tmp_path_factory.mktemp("local")
    shutil.copytree(tiny_lm, run_dir / SFT)
    args = overrides(run_dir, tiny_lm, tiny_teacher, prompts_file)
    rollout.run(compose("rollout", args))
    score.run(compose("score", args))
    return run_dir


def put_tree(client, folder: Path, prefix: str) -> None:
    for p in sorted(folder.rglob("*")):
        if p.is_file() and not any(x.startswith(".") for x in p.relative_to(folder).parts):
            client.put_object(
                Bucket=BUCKET, Key=f"{prefix}/{p.relative_to(folder)}", Body=p.read_bytes()
            )


def objects(client, prefix: str) -> dict[str, bytes]:
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        for o in page.get("Contents", []):
            out[o["Key"]] = client.get_object(Bucket=BUCKET, Key=o["Key"])["Body"].read()
    return out


def versions(client, prefix: str) -> dict[str, int]:
    """key -> how many times it was PUT (the versioned bucket keeps each)."""
    n: dict[str, int] = {}
    for page in client.get_paginator("list_object_versions").paginate(Bucket=BUCKET, Prefix=prefix):
        for v in page.get("Versions", []):
            n[v["Key"]] = n.get(v["Key"], 0) + 1
    return n


def shard_bytes(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.glob("bucket=*/shard-*.parquet"))
    }


def bucket_shards(client, prefix: str, table: str) -> dict[str, bytes]:
    got = objects(client, f"{prefix}/{table}/bucket=")
    return {k[len(f"{prefix}/{table}/") :]: v for k, v in got.items()}


def files_under(root: Path) -> list[str]:
    """The files of a mirror, its own bookkeeping (index, locks: hidden names) left out."""
    rels = (p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    return sorted(r for r in rels if not any(x.startswith(".") for x in r.split("/")))


def driver_mirror_hidden(monkeypatch, uri: str) -> list[int]:
    """While the actors run, the driver's mirror is somewhere else (an actor reading a driver
    path fails); the calls counted."""
    real, calls = raylaunch.run_shards, []

    def run_shards(*a, **k):
        mirror = mirror_of(uri)
        away = mirror.with_name(f".{mirror.name}-away")
        os.rename(mirror, away)
        try:
            return real(*a, **k)
        finally:
            os.rename(away, mirror)
            calls.append(1)

    monkeypatch.setattr(raylaunch, "run_shards", run_shards)
    return calls


def as_driver(monkeypatch, tmp_path: Path, name: str = "driver") -> Path:
    d = tmp_path / name
    monkeypatch.setenv(ENV_MIRROR, str(d))
    _REMOTES.clear()
    return d


def run_stage_in_session(stage, cfg) -> dict:
    """What the stage's command line does: lease, pull, run, publish."""
    with remote.stage_session(cfg, stage.__name__.rsplit(".", 1)[1]):
        return stage.run(cfg)


def test_actors_pull_what_they_read_and_publish_the_bytes_of_a_local_run(
    s3, reference, tmp_path, monkeypatch, tiny_lm, tiny_teacher, prompts_file, capsys
):
    prefix = "runs/a"
    uri = f"s3://{BUCKET}/{prefix}"
    put_tree(s3, tiny_lm, f"{prefix}/{SFT}")  # the SFT checkpoint exists only in the bucket
    s3.put_object(
        Bucket=BUCKET, Key=f"{prefix}/checkpoints/old/final/model.safetensors", Body=b"x" * 4096
    )
    s3.put_object(Bucket=BUCKET, Key=f"{prefix}/eval/results.json", Body=b"{}")
    driver = as_driver(monkeypatch, tmp_path)
    hidden = driver_mirror_hidden(monkeypatch, uri)
    args = overrides(uri, tiny_lm, tiny_teacher, prompts_file, *on_actors(tmp_path))

    r = run_stage_in_session(rollout, compose("rollout", args))
    assert r["complete"] and r["shards_written"] == 6
    mine = mirror_of(uri)
    assert not shard_bytes(mine / "rollouts")  # committed from the actors' reports
    s = run_stage_in_session(score, compose("score", args))
    assert s["committed"] and len(hidden) == 2
    assert not shard_bytes(mine / "tokens")
    out = capsys.readouterr().out
    assert "0 redone and 0 kept after 0 actor death(s)" in out

    # the bucket holds the bytes of the local run, each shard PUT once, nothing hidden
    for table in TABLES:
        ref = shard_bytes(reference / table)
        assert len(ref) == 6 and bucket_shards(s3, prefix, table) == ref, table
    n = versions(s3, prefix)
    assert all(n[k] == 1 for k in n if "/bucket=" in k) and any("/bucket=" in k for k in n)
    assert not any("/." in k for k in n)

    # manifests: the policy named inside the run, no machine's mirror path anywhere
    man = {t: json.loads(objects(s3, f"{prefix}/{t}/_manifest.json")[f"{prefix}/{t}/_manifest.json"]) for t in TABLES}  # fmt: skip
    assert man["rollouts"]["models"]["policy"]["run_path"] == SFT
    assert man["tokens"]["models"]["behavior"]["run_path"] == SFT
    assert man["tokens"]["models"]["teacher"]["path"] == str(Path(tiny_teacher).resolve())
    assert man["rollouts"]["extra"]["policy_path"] == f"{uri}/{SFT}"
    actors = sorted((tmp_path / "actors").iterdir())
    for t in TABLES:  # (the config keeps launcher.env as given: the {pid} template)
        text = json.dumps(man[t])
        assert all(str(m) not in text for m in (driver, *actors)), t
        ref_m = store.open_committed(reference / t, TABLES[t])
        assert man[t]["dataset_id"] == ref_m["dataset_id"] and man[t]["shards"] == ref_m["shards"]

    # what each machine pulled: the driver, its stages' folders; each actor, what its shards
    # read (the SFT checkpoint, the rollouts shards it scored); nobody the other objects
    assert actors and driver not in actors
    scored: list[str] = []
    for a in actors:
        run = a / "s3" / BUCKET / prefix
        got = files_under(run)
        if any(f.startswith(("rollouts/bucket=", "tokens/bucket=")) for f in got):
            assert f"{SFT}/model.safetensors" in got, a  # it ran the policy: pulled it
        assert {f.split("/")[0] for f in got} <= {"checkpoints", "rollouts", "tokens"}, got
        assert not any(f.startswith("checkpoints/old") for f in got)
        scored += [f for f in got if f.startswith("tokens/bucket=")]
    assert len(scored) == len(set(scored)) == 6  # each tokens shard written on one actor
    pulled = files_under(driver / "s3" / BUCKET / prefix)
    assert not any(f.startswith(("checkpoints/old", "eval/")) for f in pulled), pulled


def _kill_inside_a_shard(written: str, deadline: float) -> int:
    """SIGKILL a process whose title says it runs ShardActor.run, once a shard has been renamed
    into place on some actor (``written``: a glob of the actors' shard paths)."""
    while time.time() < deadline:
        if glob.glob(written):
            for cmd in Path("/proc").glob("[0-9]*/cmdline"):
                try:
                    title = cmd.read_bytes()
                except OSError:
                    continue
                if title.startswith(b"ray::ShardActor.run"):
                    pid = int(cmd.parent.name)
                    os.kill(pid, signal.SIGKILL)
                    return pid
        time.sleep(0.002)
    raise AssertionError("no actor was found inside a shard")


def test_killed_actor_is_replaced_its_shard_published_once_and_a_second_driver_refused(
    s3, reference, tmp_path, monkeypatch, tiny_lm, tiny_teacher, prompts_file, capsys
):
    prefix = "runs/b"
    uri = f"s3://{BUCKET}/{prefix}"
    put_tree(s3, tiny_lm, f"{prefix}/{SFT}")
    put_tree(s3, reference / "rollouts", f"{prefix}/rollouts")  # the local run's, moved here
    as_driver(monkeypatch, tmp_path)
    extra = (*on_actors(tmp_path), "launcher.max_restarts=1")
    args = overrides(uri, tiny_lm, tiny_teacher, prompts_file, *extra)
    cfg = compose("score", args)
    got: dict = {}

    def drive():
        try:
            got["summary"] = score.run(cfg)
        except BaseException as e:  # noqa: BLE001 - re-raised in the test thread
            got["error"] = e

    with remote.stage_session(cfg, "score"):  # this driver holds the run's score lease
        env = h.stage_env(**{ENV_MIRROR: str(tmp_path / "driver2")})
        second = subprocess.run(
            h.stage_cmd("score", args),
            cwd=h.REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        lines = second.stderr.strip().splitlines()
        assert second.returncode == 2 and len(lines) == 1, second.stderr
        assert lines[0].startswith(f"error: score-worker-0-of-1 of {uri} is being written by")
        t = threading.Thread(target=drive)
        t.start()
        written = f"{tmp_path}/actors/*/s3/{BUCKET}/{prefix}/tokens/bucket=*/shard-*.parquet"
        killed = _kill_inside_a_shard(written, time.time() + 180)
        t.join(300)
    assert "error" not in got, got.get("error")
    assert got["summary"]["committed"] and killed
    pattern = r"\[score\] ray: (\d+) shards .* (\d+) redone and (\d+) kept after (\d+) actor"
    ran, redone, kept, deaths = map(int, re.search(pattern, capsys.readouterr().out).groups())
    assert deaths == 1 and redone + kept == 1 and ran + kept == 6
    assert bucket_shards(s3, prefix, "tokens") == shard_bytes(reference / "tokens")
    n = versions(s3, f"{prefix}/tokens/")
    assert sorted(k for k in n if "/bucket=" in k) == [
        f"{prefix}/tokens/{store.shard_relpath(s)}" for s in range(6)
    ]
    assert all(v == 1 for v in n.values()), n  # the redone shard too: published exactly once
    assert not any("/." in k for k in n)
    assert not (tmp_path / "driver2").exists() or not files_under(tmp_path / "driver2")


def test_a_run_moved_to_another_bucket_still_verifies(
    s3, reference, tmp_path, monkeypatch, tiny_lm, tiny_teacher, prompts_file
):
    """The models of a manifest resolve inside the run wherever it is: copied to another
    bucket and prefix, scored on a fresh machine (empty mirror), the behaviour model (the SFT checkpoint)
    is the run's own copy there and its fingerprint matches the one that sampled."""
    src, dst, other = "runs/a", "moved/elsewhere", "distillery-ray-other"
    if not objects(s3, f"{src}/rollouts/_manifest.json"):
        pytest.skip("needs test_actors_pull_what_they_read_and_publish_the_bytes_of_a_local_run")
    s3.create_bucket(Bucket=other)
    for key, body in objects(s3, f"{src}/").items():
        if key.startswith((f"{src}/rollouts/", f"{src}/{SFT}/")):
            s3.put_object(Bucket=other, Key=dst + key[len(src) :], Body=body)
    as_driver(monkeypatch, tmp_path, "fresh")
    uri = f"s3://{other}/{dst}"
    args = overrides(uri, tiny_lm, tiny_teacher, prompts_file, "launcher.kind=local")
    out = run_stage_in_session(score, compose("score", args))
    assert out["committed"]
    here = mirror_of(uri)
    m = store.open_committed(here / "tokens", tokens)
    assert store.model_path(m, "behavior", directory=here / "tokens") == str(here / SFT)
    assert shard_bytes(here / "tokens") == shard_bytes(reference / "tokens")


def test_an_actor_fetches_what_the_driver_names_from_the_bucket_and_checks_it(
    s3, tmp_path, monkeypatch
):
    """As on an actor (this process, attached): a path of the driver's mirror outside the run
    (an earlier round's checkpoint) is fetched from the bucket into this mirror; a shard whose
    bytes differ from its manifest entry, a missing object and a model path absent from this
    machine are one error each."""
    s3.put_object(Bucket=BUCKET, Key="runs/c/checkpoints/main/final/config.json", Body=b"{}")
    s3.put_object(
        Bucket=BUCKET, Key="runs/c/round2/rollouts/bucket=000/shard-00000.parquet", Body=b"x"
    )
    driver = tmp_path / "driver" / "s3" / BUCKET / "runs/c"
    monkeypatch.setenv(ENV_MIRROR, str(tmp_path / "actor"))
    _REMOTES.clear()
    remote.attach(f"s3://{BUCKET}/runs/c/round2", str(tmp_path / "driver"))
    try:
        got = Path(remote.localize(driver / "checkpoints/main/final"))
        assert got == tmp_path / "actor" / "s3" / BUCKET / "runs/c/checkpoints/main/final"
        assert (got / "config.json").read_bytes() == b"{}" and not driver.exists()
        shard = driver / "round2/rollouts" / store.shard_relpath(0)
        ok = {"bytes": 1, "sha256": hashlib.sha256(b"x").hexdigest()}
        assert Path(remote.localize(shard, ok)).read_bytes() == b"x"
        with pytest.raises(errors.UserError, match="does not match its manifest"):
            remote.localize(shard, {**ok, "sha256": "0" * 64})
        with pytest.raises(errors.UserError, match=r"is not in s3://"):
            remote.localize(driver / "checkpoints/none")
        with pytest.raises(errors.UserError, match="not on this Ray node"):
            remote.localize(tmp_path / "models" / "teacher")
    finally:
        remote.detach()
    assert remote.localize(tmp_path / "models" / "teacher") == str(tmp_path / "models" / "teacher")


def test_cross_tokenizer_counts_come_from_shards_the_driver_never_fetched(
    s3, tmp_path, monkeypatch
):
    """With score.cross_tokenizer=align the tokens manifest counts the refusals of the written
    shards; shards Ray actors published (reported, not in the driver's mirror) are read in the
    bucket, three columns by byte ranges, and nothing is downloaded."""
    from types import SimpleNamespace

    import pyarrow as pa
    import pyarrow.parquet as pq

    from stages.lib.scoring.cross_tokenizer import xtok_manifest

    uri = f"s3://{BUCKET}/runs/x"
    as_driver(monkeypatch, tmp_path)
    shards = [  # (sample_id, pos, xtok_chunk): -1 roundtrip, -6 too_long refusals
        [("a", 0, -1), ("a", 1, -1), ("b", 0, 0)],
        [("c", 0, -6), ("d", 0, 0), ("d", 1, 1)],
    ]
    cfg = SimpleNamespace(run_dir=uri, worker=SimpleNamespace(index=0, count=1))
    tokens_dir = mirror_of(uri) / "tokens"
    xt = SimpleNamespace(identity={"mode": "align"})
    with remote.stage_session(cfg, "score"):
        for s, rows in enumerate(shards):  # published by the actors while the driver runs
            cols = dict(zip(("sample_id", "pos", "xtok_chunk"), map(list, zip(*rows)), strict=True))
            sink = pa.BufferOutputStream()
            pq.write_table(pa.table(cols), sink)
            key = f"runs/x/tokens/{store.shard_relpath(s)}"
            s3.put_object(Bucket=BUCKET, Key=key, Body=sink.getvalue().to_pybytes())
        w = SimpleNamespace(shard_path=lambda s: tokens_dir / store.shard_relpath(s), reported={})
        assert xtok_manifest(xt, w, 2) == {"mode": "align"}  # not all written yet
        w.reported = {0: {}, 1: {}}  # both published by actors
        got = xtok_manifest(xt, w, 2)
    assert got["rows"] == 4 and got["refused_rows"] == 2 and got["refused_tokens"] == 3
    assert got["refused"]["roundtrip"] == 1 and got["refused"]["too_long"] == 1
    assert not list(tokens_dir.rglob("*.parquet"))
