"""The lease of a remote run: one writer per dataset, on a bucket without locks.

A stage that writes takes the lease object ``<run>/_leases/<what>.json`` (holder, host, pid,
expiry) with a conditional PUT (``If-None-Match: *``) and renews it with ``If-Match: <etag>``
from a background thread; an expired lease is taken over the same way. Without boto3 (or for
``gs://``) it is written and read back (a narrow race, documented in stages/lib/remote.py)."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from data_schemas.errors import UserError
from stages.lib import safety
from stages.lib.mirror import LEASES, Remote
from stages.lib.uri import join

ENV_LEASE = "DISTILLERY_LEASE_SECONDS"  # lease lifetime; renewed every third of it
DEFAULT_LEASE_SECONDS = 60.0


def _iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def lease_seconds() -> float:
    try:
        return float(os.environ.get(ENV_LEASE, DEFAULT_LEASE_SECONDS))
    except ValueError:
        raise UserError(
            f"{ENV_LEASE}={os.environ[ENV_LEASE]!r} is not a number", ENV_LEASE, "unset it"
        ) from None


def lease_name(cfg: Any, stage: str) -> str | None:
    """What a stage writes, as a lease name (None: it writes nothing that needs one)."""
    if stage in ("rollout", "score"):
        return f"{stage}-worker-{cfg.worker.index}-of-{cfg.worker.count}"
    if stage == "select":
        return f"select-{cfg.select.name}"
    if stage == "train":
        return f"train-{cfg.train.name}"
    return None if stage == "pipeline" else stage


@dataclass
class Lease:
    """The lease object ``<run>/_leases/<name>.json``; see the module docstring."""

    r: Remote
    name: str
    seconds: float
    holder: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    etag: str | None = None
    lost: threading.Event = field(default_factory=threading.Event)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    @property
    def key(self) -> str:
        return self.r.key(f"{LEASES}/{self.name}.json")

    def body(self) -> bytes:
        now = time.time()
        doc = {
            "holder": self.holder, "host": socket.gethostname(), "pid": os.getpid(),
            "lease": self.name, "expires": now + self.seconds, "expires_utc": _iso(now + self.seconds),
        }  # fmt: skip
        return json.dumps(doc).encode()

    def parse(self, raw: bytes) -> dict:
        """The lease document, or one UserError for a corrupt lease object."""
        return safety.parse_json_object(
            raw,
            f"lease {self.name}",
            join(self.r.uri, LEASES, f"{self.name}.json"),
            "if no stage is writing this run, delete the lease object and re-run",
        )

    def refuse(self, cur: dict) -> UserError:
        return UserError(
            f"{self.name} of {self.r.uri} is being written by {cur.get('host')} pid "
            f"{cur.get('pid')} (lease until {cur.get('expires_utc')})",
            self.r.uri + f"/{LEASES}/{self.name}.json",
            "wait for that stage to finish or stop it; a lease its holder stops renewing expires "
            f"and is then taken over ({ENV_LEASE})",
        )

    def acquire(self) -> None:
        client = _s3_client(self.r)
        (self._acquire_conditional if client else self._acquire_readback)(client)
        self._thread = threading.Thread(target=self._renew, name="lease", daemon=True)
        self._thread.start()

    def _acquire_conditional(self, client: Any) -> None:
        bucket, key = self.key.split("/", 1)
        try:
            self.etag = client.put_object(
                Bucket=bucket, Key=key, Body=self.body(), IfNoneMatch="*"
            )["ETag"]
            return
        except client.exceptions.ClientError as e:
            if not _precondition(e):
                raise
        got = client.get_object(Bucket=bucket, Key=key)
        cur = self.parse(got["Body"].read())
        if cur.get("expires", 0) > time.time():
            raise self.refuse(cur) from None
        try:  # expired: take it over, only if nobody else did in between
            self.etag = client.put_object(
                Bucket=bucket, Key=key, Body=self.body(), IfMatch=got["ETag"]
            )["ETag"]
        except client.exceptions.ClientError as e:
            if not _precondition(e):
                raise
            cur = self.parse(client.get_object(Bucket=bucket, Key=key)["Body"].read())
            raise self.refuse(cur) from None

    def _acquire_readback(self, _client: Any = None) -> None:
        cur = self._read()
        if cur and cur.get("expires", 0) > time.time() and cur.get("holder") != self.holder:
            raise self.refuse(cur)
        self._write()
        time.sleep(0.5)  # a racing writer's PUT lands in this window: the last PUT wins
        cur = self._read()
        if cur and cur.get("holder") != self.holder:
            raise self.refuse(cur)

    def _read(self) -> dict | None:
        try:
            with self.r.fs.open_input_stream(self.key) as f:
                return self.parse(f.read())
        except (FileNotFoundError, OSError):
            return None

    def _write(self) -> None:
        with self.r.fs.open_output_stream(self.key) as f:
            f.write(self.body())

    def _renew(self) -> None:
        while not self._stop.wait(self.seconds / 3):
            try:
                client = _s3_client(self.r)
                if client is None:
                    cur = self._read()
                    if cur and cur.get("holder") != self.holder:
                        raise RuntimeError("taken over")
                    self._write()
                else:
                    bucket, key = self.key.split("/", 1)
                    self.etag = client.put_object(
                        Bucket=bucket, Key=key, Body=self.body(), IfMatch=self.etag
                    )["ETag"]
            except Exception:  # taken over (it had expired) or unreachable: stop publishing
                self.lost.set()
                return

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.lost.is_set():
            return
        try:
            cur, client = self._read(), _s3_client(self.r)
        except UserError:  # corrupt: not ours to remove
            return
        if not cur or cur.get("holder") != self.holder:
            return
        if client is not None:  # (pyarrow's delete would leave a "_leases/" folder marker)
            bucket, key = self.key.split("/", 1)
            client.delete_object(Bucket=bucket, Key=key)
        else:
            with contextlib.suppress(OSError):
                self.r.fs.delete_file(self.key)

    def check(self) -> None:
        if self.lost.is_set():
            raise UserError(
                f"lost the lease {self.name} of {self.r.uri} (it expired and another writer "
                "took it over, or the store is unreachable)",
                self.key,
                f"re-run the stage when the other writer is done; raise {ENV_LEASE} if renewals "
                "were too slow",
            )


def _s3_client(r: Remote) -> Any:
    """A boto3 S3 client (conditional writes) for an s3:// run, or None."""
    if not r.uri.startswith("s3://"):
        return None
    try:
        import boto3
    except ImportError:
        return None
    return boto3.client("s3")  # endpoint, region and keys from the standard AWS variables


def _precondition(e: Any) -> bool:
    code = e.response.get("Error", {}).get("Code", "")
    return code in ("PreconditionFailed", "ConditionalRequestConflict", "412")
