"""A bucket handed over by someone else (#28, 7): object keys that would leave the mirror, corrupt
lease and manifest objects, credentials in the URI. Against a real S3 server (moto, the fixture
of tests/test_object_store.py); the stages run as CLI subprocesses (``distillery-sql``, rollout,
select). Each case: exit 2, one ``error:`` line naming the place and the fix, no local path made
from a bad key, nothing outside the mirror touched, no secret printed, stored or uploaded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("boto3")
pytest.importorskip("moto.server")

from stages.lib import safety  # noqa: E402
from stages.lib.errors import UserError  # noqa: E402
from stages.lib.lease import Lease  # noqa: E402
from stages.lib.mirror import adopt_credentials, open_remote  # noqa: E402
from stages.lib.uri import mirror_of  # noqa: E402
from tests import reliability_harness as h  # noqa: E402
from tests.test_object_store import BUCKET, machine, ov, prompts, s3  # noqa: E402, F401

SECRET = "sEcReT%2Fwith-slash"  # percent-encoded '/' as in a real AWS secret


def cli(module: str, args: list[str], mirror: Path, cwd: Path, **env: str) -> h.Result:
    e = h.stage_env(DISTILLERY_MIRROR=str(mirror), **env)
    p = subprocess.run(
        [sys.executable, "-m", f"stages.{module}", *args],
        cwd=cwd,
        env=e,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return h.Result(p.returncode, p.stdout, p.stderr)


def put(client, key: str, body: bytes = b"x") -> None:
    client.put_object(Bucket=BUCKET, Key=key, Body=body)


def all_objects(client) -> dict[str, bytes]:
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET):
        for o in page.get("Contents", []):
            out[o["Key"]] = client.get_object(Bucket=BUCKET, Key=o["Key"])["Body"].read()
    return out


# ----------------------------------------------------------------------------- keys
def test_object_key_rule_pure():
    ok = safety.check_object_key("b/run/rollouts/bucket=000/shard-00000.parquet", "b/run", "u")
    assert ok == "rollouts/bucket=000/shard-00000.parquet"
    for bad in (
        "b/run//abs/path/x",
        "b/run/./x",
        "b/run/../x",
        "b/run/rollouts/../../x",
        "b/run/a\\..\\b",
        "b/run/x\n",
        "b/run/",
        "b/runaway/x",  # not under the prefix
        "b/run/a//b",
    ):
        with pytest.raises(UserError, match="not a relative key"):
            safety.check_object_key(bad, "b/run", "s3://K:S@b/run")


BAD_KEYS = {
    "absolute": "{p}//{tmp}/abs/evil.json",
    "parent": "{p}/rollouts/../../{name}-escape/evil.json",
    "dot": "{p}/./checkpoints/evil.json",
    "empty_middle": "{p}/checkpoints//evil.json",
    "backslash": "{p}/train\\..\\..\\evil.json",
}


@pytest.mark.parametrize("kind", sorted(BAD_KEYS))
def test_bad_object_key_is_refused_before_any_local_path(s3, kind, tmp_path):  # noqa: F811
    """A key that is not a plain relative key under the run: one line, exit 2, the mirror and
    the disk outside it unchanged (the absolute key names a folder in tmp_path)."""
    prefix = f"keys-{kind}/run"
    put(s3, f"{prefix}/eval/results.json", b"{}")
    key = BAD_KEYS[kind].format(p=prefix, tmp=str(tmp_path).lstrip("/"), name=kind)
    put(s3, key)
    mirror, work = tmp_path / "mirror", tmp_path / "work"
    work.mkdir()
    before = h.tree_state(tmp_path)
    r = cli("sql", [f"s3://{BUCKET}/{prefix}", "SELECT 1"], mirror, work)
    h.assert_user_error(r, "not a relative key", "delete or rename")
    after = h.tree_state(tmp_path)
    made = sorted(set(after) - set(before))
    # at most the (empty) mirror folder of this run: no file, nothing from the bad key
    assert all(Path(p).is_dir() and str(mirror) in p for p in made), made
    assert not (tmp_path / "abs").exists()


# ----------------------------------------------------------------------------- corrupt objects
CORRUPT = {
    "truncated": b'{"holder": "x", "expi',
    "not_utf8": b"\xff\xfe\x00garbage",
    "a_list": b"[1, 2, 3]",
    "empty": b"",
}


@pytest.mark.parametrize("kind", sorted(CORRUPT))
def test_corrupt_lease_object_is_one_line(s3, kind, tmp_path, monkeypatch):  # noqa: F811
    machine(monkeypatch, tmp_path, kind)
    r = open_remote(f"s3://{BUCKET}/lease-{kind}/run")
    put(s3, f"lease-{kind}/run/_leases/select-x.json", CORRUPT[kind])
    lease = Lease(r, "select-x", 30)
    with pytest.raises(UserError, match="lease select-x is not") as e:
        lease.acquire()
    assert "delete the lease object" in e.value.line()
    # the corrupt object is left as it was (not ours to remove)
    body = s3.get_object(Bucket=BUCKET, Key=f"lease-{kind}/run/_leases/select-x.json")["Body"]
    assert body.read() == CORRUPT[kind]


def test_corrupt_lease_through_the_cli(s3, tmp_path):  # noqa: F811
    """select on a run whose lease object is corrupt: exit 2, one line naming the lease."""
    put(s3, "lease-cli/run/_leases/select-entropy_half.json", b"{nope")
    work = tmp_path / "work"
    work.mkdir()
    args = [f"run_dir=s3://{BUCKET}/lease-cli/run", "select=entropy_half"]
    r = cli("select", args, tmp_path / "m", work)
    h.assert_user_error(r, "lease select-entropy_half is not valid JSON", "_leases")


@pytest.mark.parametrize("kind", ["truncated", "not_utf8", "a_list"])
def test_corrupt_manifest_object_is_one_line(s3, kind, tmp_path):  # noqa: F811
    put(s3, f"man-{kind}/run/rollouts/_manifest.json", CORRUPT[kind])
    work = tmp_path / "work"
    work.mkdir()
    r = cli("sql", [f"s3://{BUCKET}/man-{kind}/run", "SELECT 1"], tmp_path / "m", work)
    h.assert_user_error(r, "manifest rollouts/_manifest.json is not", "overwrite=true")


# ----------------------------------------------------------------------------- credentials
def test_credentials_are_split_and_redacted_pure():
    assert safety.redact("cannot open s3://AK:SK@b/run (x)") == "cannot open s3://***@b/run (x)"
    clean, scheme, creds = safety.split_credentials(f"run_dir='s3://AKIA1:{SECRET}@b/r'")
    assert clean == "run_dir='s3://b/r'" and scheme == "s3"
    assert creds == ("AKIA1", "sEcReT/with-slash")
    assert safety.split_credentials("s3://b/r") == ("s3://b/r", "", None)
    assert mirror_of("s3://AK:SK@b/run") == mirror_of("s3://b/run")
    with pytest.raises(UserError) as e:  # gs:// has no keys in a URI: refused, still redacted
        adopt_credentials("gs://user:pw@b/run")
    assert "pw" not in e.value.line() and "***" in e.value.line()


def _no_secret(r: h.Result, *roots: Path, objects: dict[str, bytes]) -> None:
    for text in (r.stdout, r.stderr):
        assert "sEcReT" not in text and "AKIAHOSTILE" not in text, text[-2000:]
    for root in roots:
        for p in Path(root).rglob("*"):
            assert "sEcReT" not in str(p) and "AKIAHOSTILE" not in str(p), p
            if p.is_file() and not p.is_symlink():
                data = p.read_bytes()
                assert b"sEcReT" not in data and b"AKIAHOSTILE" not in data, p
    for key, body in objects.items():
        assert "sEcReT" not in key and b"sEcReT" not in body and b"AKIAHOSTILE" not in body, key


def test_credentials_in_the_uri_work_and_never_leak(s3, ov, tmp_path):  # noqa: F811
    """A rollout with ``run_dir=s3://KEY:SECRET@bucket/run`` and no AWS keys in the environment:
    it runs (the keys reach the S3 client), and the secret is in no log, error, mirror path,
    local file, object key or uploaded object (manifests included)."""
    mirror, work = tmp_path / "mirror", tmp_path / "work"
    work.mkdir()
    uri = f"s3://AKIAHOSTILE:{SECRET}@{BUCKET}/creds/run"
    env = {"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": ""}
    r = cli("rollout", ov(uri), mirror, work, **env)
    assert r.rc == 0, r.describe()
    objs = all_objects(s3)
    assert "creds/run/rollouts/_manifest.json" in objs
    m = json.loads(objs["creds/run/rollouts/_manifest.json"])
    assert m["config"]["run_dir"] == f"s3://{BUCKET}/creds/run"
    _no_secret(r, mirror, work, objects=objs)
    q = cli("sql", [uri, "SELECT count(*) AS n FROM rollouts"], tmp_path / "m2", work, **env)
    assert q.rc == 0 and "(1 row)" in q.stdout, q.describe()
    _no_secret(q, tmp_path / "m2", objects={})


def test_credentials_in_a_failing_uri_are_redacted(s3, tmp_path):  # noqa: F811
    work = tmp_path / "work"
    work.mkdir()
    for args, module in (
        ([f"s3://AKIAHOSTILE:{SECRET}@no-such-bucket/run", "SELECT 1"], "sql"),
        ([f"run_dir=s3://AKIAHOSTILE:{SECRET}@no-such-bucket/run"], "select"),
        ([f"run_dir=gs://AKIAHOSTILE:{SECRET}@{BUCKET}/run"], "select"),
    ):
        r = cli(module, args, tmp_path / "m", work)
        h.assert_user_error(r)
        _no_secret(r, tmp_path, objects={})
    assert os.environ.get("AWS_ACCESS_KEY_ID") == "test"  # this process' keys are untouched


def test_credentials_are_not_printed_by_cfg_job(tmp_path):
    """Hydra's ``--cfg job`` prints the composed config: the URI appears without its keys."""
    work = tmp_path / "work"
    work.mkdir()
    args = [f"run_dir=s3://AKIAHOSTILE:{SECRET}@{BUCKET}/run", "--cfg", "job"]
    r = cli("select", args, tmp_path / "m", work)
    assert r.rc == 0 and f"s3://{BUCKET}/run" in r.stdout, r.describe()
    _no_secret(r, tmp_path, objects={})
