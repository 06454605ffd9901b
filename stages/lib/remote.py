"""A run on object storage: ``run_dir=s3://bucket/run`` (or ``gs://``) through a local mirror.

A plain path and a ``file://`` URI are local folders and nothing here runs for them. For a remote
``run_dir`` every stage works in a **local working mirror** of the run, a folder that is a pure
function of the URI (``$DISTILLERY_MIRROR/<scheme>/<bucket>/<key>``, default
``~/.cache/distillery/mirror``), so ``RunLayout.of(uri)`` names the same local paths on every
machine and the stage code reads and writes them as it always did. Around each stage
(:func:`stage_session`):

1. **Lease.** A stage that writes takes the lease object ``<run>/_leases/<what>.json`` (holder,
   host, pid, expiry) with a conditional PUT (``If-None-Match: *``); a live lease held by someone
   else refuses the stage (one ``error:`` line, exit 2). A background thread renews it every
   third of its lifetime with ``If-Match: <etag>``; an expired lease is taken over with the same
   ``If-Match`` (only one taker can win). Without boto3 (or for ``gs://``) the lease is written
   and read back: a narrow race two simultaneous writers can both win, documented.
2. **Pull.** One listing of the run prefix; of the folders the stage reads (:func:`stage_reads`;
   the whole run for train, eval, sft, report): every dataset folder's ``_manifest.json`` and only
   the shards it lists (a folder without a manifest yet: its published shards, which a resumed
   writer checks by dataset id and skips); every other file (checkpoints, metrics, results).
   Unchanged files are not fetched again (``.mirror-index.json`` records size and remote mtime).
   Local shards a remote manifest does not list are removed from the mirror.
3. **Publish.** Each shard is uploaded under its final key the moment the store has renamed it
   into place, each manifest the moment it is written (after its shards, so a single atomic PUT
   commits the dataset on the bucket, as the rename does on disk). When the stage ends (also on
   an error) every other changed file of the mirror is uploaded: checkpoints, metrics, reports.

A Ray actor of such a run (another machine) works in its own mirror: :func:`attach` makes it
publish what it commits, and :func:`localize` fetches the one file or folder of the driver's it
reads (docs/CLUSTER.md, "Ray and a bucket together").

Object stores have no rename: a reader trusts only what a manifest lists (``store.open_committed``
checks the mirrored files against it), so a shard published by a killed writer is invisible until
a manifest lists it, and a re-run (on any machine, empty mirror or not) pulls the published shards
and continues at the first missing one.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import re
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data_schemas import manifest as manifest_mod
from data_schemas.errors import UserError
from stages.lib import safety
from stages.lib.progress import log
from stages.lib.uri import (  # noqa: F401 - the run-URI names, also used as remote.<name>
    ENV_MIRROR,
    REMOTE_SCHEMES,
    is_remote,
    join,
    local_path,
    mirror_of,
    mirror_root,
    split,
)

ENV_LEASE = "DISTILLERY_LEASE_SECONDS"  # lease lifetime; renewed every third of it
DEFAULT_LEASE_SECONDS = 60.0
INDEX = ".mirror-index.json"  # rel -> {"size", "mtime" (remote), "local" (mirror mtime_ns)}
LEASES = "_leases"
_SHARD = re.compile(r"^(?:(.*)/)?bucket=\d+/shard-\d+\.parquet$")
_MANIFEST = manifest_mod.FILENAME


# ----------------------------------------------------------------------------- credentials
def adopt_credentials(value: str) -> str:
    """``value`` (a URI, or an override ``key=URI``) without the credentials of an
    ``s3://KEY:SECRET@bucket/...`` URI, which become this process' AWS variables (inherited by
    the stages it starts): they never reach a log, an error, a mirror path or a manifest."""
    clean, scheme, creds = safety.split_credentials(value)
    if creds is None:
        return value
    if scheme != "s3" or not all(creds) or safety.redact(clean) != clean:
        raise UserError(
            f"credentials in {safety.redact(value)!r} are not supported there",
            "run_dir",
            "use one s3://KEY:SECRET@bucket/prefix, or (better) the AWS_*/GOOGLE_* variables",
        )
    os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"] = creds
    os.environ.pop("AWS_SESSION_TOKEN", None)  # it belongs to other keys
    return clean


def _iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# ----------------------------------------------------------------------------- the remote run
@dataclass
class Remote:
    """One remote run: its filesystem (``pyarrow.fs``), its prefix there and its local mirror."""

    uri: str
    fs: Any  # pyarrow.fs.FileSystem
    base: str  # "bucket/key" on fs
    mirror: Path
    index: dict = field(default_factory=dict)
    objects: dict = field(default_factory=dict)  # rel -> FileInfo, as the last pull listed them
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def key(self, rel: str) -> str:
        return f"{self.base}/{rel}"

    def rel(self, path: Path) -> str | None:
        """``path`` relative to the mirror (posix), or None when it is not under it."""
        try:
            return Path(path).resolve().relative_to(self.mirror.resolve()).as_posix()
        except ValueError:
            return None

    # ---------------------------------------------------------------- index
    def load_index(self) -> None:
        p = self.mirror / INDEX
        self.index = json.loads(p.read_text()) if p.is_file() else {}

    def save_index(self) -> None:
        tmp = self.mirror / f".tmp-{INDEX}.{os.getpid()}"
        tmp.write_text(json.dumps(self.index, sort_keys=True))
        os.replace(tmp, self.mirror / INDEX)

    def _fresh(self, rel: str, size: int, mtime: str) -> bool:
        """The mirror's copy of ``rel`` is the remote object (size, remote mtime) as fetched."""
        e, p = self.index.get(rel), self.mirror / rel
        if e is None or not p.is_file():
            return False
        st = p.stat()
        return (e["size"], e["mtime"], e["local"]) == (size, mtime, st.st_mtime_ns)

    # ---------------------------------------------------------------- transfers
    def download(self, rel: str, info: Any) -> None:
        dst = self.mirror / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(f".tmp-pull-{dst.name}.{os.getpid()}")
        with self.fs.open_input_stream(self.key(rel)) as src, open(tmp, "wb") as out:
            while chunk := src.read(1 << 22):
                out.write(chunk)
        os.replace(tmp, dst)  # a killed pull never leaves half a file under a real name
        self._record(rel, info.size, str(info.mtime), dst)

    def upload(self, path: Path) -> None:
        rel = self.rel(path)
        if rel is None:
            return
        with open(path, "rb") as src, self.fs.open_output_stream(self.key(rel)) as out:
            while chunk := src.read(1 << 22):
                out.write(chunk)
        info = self.fs.get_file_info(self.key(rel))
        self._record(rel, info.size, str(info.mtime), path)

    def fetch(self, rel: str) -> Path:
        """The object ``rel``, or every object under the folder ``rel``, into the mirror (those
        not already there as the bucket has them); its local path."""
        import pyarrow.fs as pafs

        info = self.fs.get_file_info(self.key(rel))
        if info.type == pafs.FileType.File:
            found = {rel: info}
        else:
            sel = pafs.FileSelector(self.key(rel), recursive=True, allow_not_found=True)
            found = {
                safety.check_object_key(i.path, self.base, self.uri): i  # before a local path
                for i in self.fs.get_file_info(sel)
                if i.type == pafs.FileType.File
            }
        if not found:
            raise UserError(
                f"{rel} is not in {self.uri}",
                join(self.uri, rel),
                "re-run the stage that writes it (the driver's copy was never published)",
            )
        for orel, oinfo in found.items():
            if not self._fresh(orel, oinfo.size, str(oinfo.mtime)):
                self.download(orel, oinfo)
        self.save_index()
        return self.mirror / rel

    def _record(self, rel: str, size: int, mtime: str, path: Path) -> None:
        with self.lock:
            self.index[rel] = {"size": size, "mtime": mtime, "local": path.stat().st_mtime_ns}

    def listing(self) -> dict[str, Any]:
        """rel -> FileInfo of every object under the run (leases and hidden names left out)."""
        import pyarrow.fs as pafs

        sel = pafs.FileSelector(self.base, recursive=True, allow_not_found=True)
        out = {}
        for info in self.fs.get_file_info(sel):
            if info.type != pafs.FileType.File:
                continue
            rel = safety.check_object_key(info.path, self.base, self.uri)  # before any local path
            parts = rel.split("/")
            if parts[0] == LEASES or any(p.startswith(".") for p in parts):
                continue
            out[rel] = info
        return out


_REMOTES: dict[str, Remote] = {}  # one per URI and process: nested sessions share the index


def open_remote(uri: str) -> Remote:
    """The filesystem of a remote URI (``pyarrow.fs``; S3 reads the standard AWS variables,
    ``AWS_ENDPOINT_URL`` for an S3-compatible server) and its mirror, created."""
    import pyarrow.fs as pafs

    uri = adopt_credentials(uri)  # s3://KEY:SECRET@...: the keys go to the AWS variables
    scheme, rest = split(uri)
    key = f"{scheme}://{rest}"
    if key in _REMOTES and _REMOTES[key].mirror == mirror_of(uri):
        return _REMOTES[key]
    try:
        fs, base = pafs.FileSystem.from_uri(f"{'gs' if scheme == 'gcs' else scheme}://{rest}")
    except Exception as e:  # pyarrow raises ArrowInvalid/OSError with the reason
        raise UserError(
            f"cannot open {safety.redact(uri)} ({safety.redact(' '.join(str(e).split()))[:200]})",
            "run_dir",
            "check the URI and the credentials (AWS_* / GOOGLE_* variables, AWS_ENDPOINT_URL)",
        ) from None
    r = Remote(uri=uri, fs=fs, base=base.rstrip("/"), mirror=mirror_of(uri))
    _check_bucket(r)
    r.mirror.mkdir(parents=True, exist_ok=True)
    r.load_index()
    _REMOTES[key] = r
    return r


def _check_bucket(r: Remote) -> None:
    """The bucket exists and answers (credentials, endpoint): else one UserError, before any
    stage work."""
    import pyarrow.fs as pafs

    bucket = r.base.split("/", 1)[0]
    try:
        info = r.fs.get_file_info(bucket)
    except OSError as e:
        raise UserError(
            f"cannot reach {r.uri} ({safety.redact(' '.join(str(e).split()))[:200]})",
            "run_dir",
            "check the credentials and the endpoint (AWS_* variables, AWS_ENDPOINT_URL)",
        ) from None
    if info.type == pafs.FileType.NotFound:
        raise UserError(
            f"bucket {bucket!r} does not exist", "run_dir", "create the bucket or fix run_dir"
        )


# ----------------------------------------------------------------------------- pull
def plan_pull(objects: dict[str, Any], manifests: dict[str, dict]) -> list[str]:
    """The objects a mirror needs: manifests, the shards they list (all published shards of a
    dataset folder without a manifest), every non-shard file. Pure."""
    want = []
    for rel in objects:
        m = _SHARD.match(rel)
        if m is None:
            want.append(rel)
            continue
        folder = m.group(1) or ""
        man = manifests.get(folder)
        if man is None or rel[len(folder) + 1 if folder else 0 :] in _listed(man):
            want.append(rel)
    return want


def _listed(m: dict) -> set[str]:
    return {s["path"] for s in m.get("shards", [])}


def _folder(rel: str) -> str:
    return rel[: -len(_MANIFEST) - 1] if "/" in rel else ""


def pull(
    r: Remote,
    *,
    datasets_only: bool = False,
    streamed: tuple[str, ...] = (),
    top_only: bool = False,
    only: tuple[str, ...] | None = None,
) -> int:
    """Bring the mirror up to the bucket (see the module docstring); the bytes fetched. The
    shards of dataset folders under the ``streamed`` prefixes stay in the bucket (their manifests
    come): ``store.open_shard`` reads them in place. ``top_only``: the run's own files only
    (``rounds.json``, ``timings.json``: what the pipeline itself reads). ``only``: the objects
    under these prefixes (what a stage reads, :func:`stage_reads`); None = the whole run."""
    objects = r.objects = r.listing()
    if top_only:
        objects = {rel: info for rel, info in objects.items() if "/" not in rel}
    if only is not None:
        objects = {rel: info for rel, info in objects.items() if rel.startswith(only)}
    manifests = {}
    for rel, info in objects.items():
        if rel.endswith(_MANIFEST):
            if not r._fresh(rel, info.size, str(info.mtime)):
                r.download(rel, info)
            manifests[_folder(rel)] = safety.parse_json_object(
                (r.mirror / rel).read_bytes(),
                f"manifest {rel}",
                join(r.uri, rel),
                "re-run the stage that writes it with overwrite=true, or delete the object",
            )
    fetched = 0
    for rel in plan_pull(objects, manifests):
        info = objects[rel]
        shard = _SHARD.match(rel) is not None
        if datasets_only and not shard and not rel.endswith(_MANIFEST):
            continue
        if shard and rel.startswith(streamed) and not (r.mirror / rel).is_file():
            continue
        if not r._fresh(rel, info.size, str(info.mtime)):
            r.download(rel, info)
            fetched += info.size
    for folder, m in manifests.items():  # shards a manifest does not list leave the mirror
        listed = _listed(m)
        for p in (r.mirror / folder).glob("bucket=*/shard-*.parquet"):
            if p.relative_to(r.mirror / folder).as_posix() not in listed:
                p.unlink()
    r.save_index()
    return fetched


def stage_reads(cfg: Any, stage: str) -> tuple[str, ...] | None:
    """The run's folders (prefixes) a stage reads or resumes: all a pull fetches for it. None =
    the whole run (eval and sft read checkpoints across it). Pure."""
    sft_policy = ("checkpoints/sft/final/",)  # the policy / behaviour model / init after SFT
    if stage == "rollout":
        return ("rollouts/", *sft_policy)
    if stage == "score":
        return ("rollouts/", "tokens/", "sft_data/_manifest.json", *sft_policy)
    if stage == "select":
        return ("rollouts/", "tokens/", f"selected/{cfg.select.name}/")
    if stage == "train":  # (the selection's shards are streamed, not pulled)
        tc = cfg.train
        own = (f"selected/{tc.selection}/", f"checkpoints/{tc.name}/", f"train/{tc.name}/")
        return ("rollouts/", "tokens/_manifest.json", *own, *sft_policy)
    if stage == "report":  # the datasets, the curves and results; a tokenizer, no checkpoint
        return ("rollouts/", "tokens/", "selected/", "train/", "eval/", "report/", *sft_policy)
    return None


def publish_changed(r: Remote) -> int:
    """Upload every mirror file the bucket does not have as it is (hidden names skipped),
    manifests last; the number of files uploaded."""
    todo = []
    for p in sorted(r.mirror.rglob("*")):
        rel = p.relative_to(r.mirror).as_posix()
        if p.is_dir() or any(x.startswith(".") for x in rel.split("/")):
            continue
        e = r.index.get(rel)
        if e is None or (e["size"], e["local"]) != (p.stat().st_size, p.stat().st_mtime_ns):
            todo.append(p)
    todo.sort(key=lambda p: p.name == _MANIFEST)
    for p in todo:
        r.upload(p)
    r.save_index()
    return len(todo)


# ----------------------------------------------------------------------------- lease
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


# ----------------------------------------------------------------------------- sessions
_ACTIVE: list[tuple[Remote, Lease | None]] = []  # innermost last


def _owner(path: Path) -> tuple[Remote, Lease | None] | None:
    """The innermost active session whose mirror holds ``path`` (a round's inside the run's)."""
    return next(((r, ls) for r, ls in reversed(_ACTIVE) if r.rel(path) is not None), None)


def _published(path: Path) -> None:
    """store hook: a file was just committed under its final name in some mirror."""
    if (found := _owner(path)) is not None:
        r, lease = found
        if lease is not None:
            lease.check()
        r.upload(Path(path))


def _streamed(path: Path) -> tuple[int, Any] | None:
    """store hook: (size, random-access file) of the object behind a shard the mirror lacks."""
    if (found := _owner(path)) is None:
        return None
    r, rel = found[0], found[0].rel(path)
    info = r.objects.get(rel)
    if info is None:  # published after this session's pull listed the run (a Ray actor's shard)
        import pyarrow.fs as pafs

        info = r.fs.get_file_info(r.key(rel))
        if info.type != pafs.FileType.File:
            return None
    return info.size, r.fs.open_input_file(r.key(rel))


def _checkpoint(tmp: Path, path: Path, dist: Any) -> None:
    """store hook, after the trainer renamed a checkpoint into place (every rank calls it).

    On a node that does not share rank 0's mirror, a rank's own trainer state is still in the
    temp folder: it moves into place there. Every rank > 0 uploads its own state files, then
    rank 0 uploads the checkpoint with ``trainer_state.json`` (what marks it complete) last and
    drops the step folders it pruned from the bucket."""
    if (found := _owner(path)) is None:
        return
    r, lease = found
    if lease is not None:
        lease.check()
    if not dist.main:
        if tmp.is_dir():  # rank 0 renamed its own temp folder on another machine
            if path.exists():
                shutil.rmtree(path)
            os.replace(tmp, path)
        for p in sorted(path.glob(f"trainer_state.rank{dist.rank}.*")):
            r.upload(p)
    dist.barrier()
    if dist.main:
        files = sorted(
            (p for p in path.rglob("*") if p.is_file()),
            key=lambda p: p.name == "trainer_state.json",
        )
        for p in files:
            r.upload(p)
        steps = f"{r.rel(path.parent)}/step-"
        for rel in {k.rsplit("/", 1)[0] for k in r.listing() if k.startswith(steps)}:
            if not (r.mirror / rel).exists():  # pruned here: prune it there
                with contextlib.suppress(FileNotFoundError):
                    r.fs.delete_dir(r.key(rel))
        r.save_index()
    dist.barrier()


def _refresh(directory: Path, reported: set[str]) -> dict[str, int] | None:
    """store hook, before a commit checks that every shard exists: fetch the shards other
    workers (other machines) published into this dataset folder, except the ``reported`` ones
    (folder-relative; their writers reported their entries: not fetched); the size of every
    shard in the bucket, folder-relative (None: not a remote run)."""
    if (found := _owner(directory)) is None:
        return None
    r, rel = found[0], found[0].rel(directory)
    sizes = {}
    for orel, info in r.listing().items():
        if orel.startswith(rel + "/") and _SHARD.match(orel):
            sizes[orel[len(rel) + 1 :]] = info.size
            if orel[len(rel) + 1 :] not in reported and not r._fresh(
                orel, info.size, str(info.mtime)
            ):
                r.download(orel, info)
    return sizes


def sync_published(path: Path) -> None:
    """After a Ray actor died on the shard at ``path`` (this machine's mirror): the bucket and
    the mirror agree on it. Published (the actor died after its upload): fetched; renamed here
    but not uploaded (an actor sharing this mirror died in between): uploaded now. Nothing
    outside a remote run."""
    if (found := _owner(path)) is None:
        return
    r, rel = found[0], found[0].rel(path)
    import pyarrow.fs as pafs

    info = r.fs.get_file_info(r.key(rel))
    if info.type == pafs.FileType.File:
        if not r._fresh(rel, info.size, str(info.mtime)):
            r.download(rel, info)
    elif Path(path).is_file():
        _published(Path(path))


# ----------------------------------------------------------------------------- on a Ray actor
_DRIVER: list[Path] = []  # on a Ray actor of a remote run: the driver's mirror root


def attach(run_uri: str, driver_root: str) -> Remote:
    """On a Ray actor (another machine, its own mirror): commit-time publishing as in a stage
    session, without a lease (the driver holds it), and :func:`localize` for the paths of the
    driver's mirror (rooted at ``driver_root``)."""
    from stages.lib import store

    detach()
    r = open_remote(run_uri)
    _ACTIVE.append((r, None))
    _DRIVER.append(Path(driver_root))
    store.HOOKS.published = _published
    return r


def detach() -> None:
    """Undo :func:`attach` (the actor's next stage may be on another run)."""
    from stages.lib import store

    if _DRIVER:
        _ACTIVE.clear()
        _DRIVER.clear()
        store.HOOKS.published = None


def _driver_parts(path: str | Path) -> tuple[str, ...] | None:
    """``path`` in the driver's mirror as (scheme, bucket, *key parts), or None."""
    if not _DRIVER:
        return None
    try:
        parts = Path(path).relative_to(_DRIVER[0]).parts
    except ValueError:
        return None
    return parts if len(parts) >= 3 else None


def translate(path: str | Path) -> Path:
    """A path in the driver's mirror as the same object's path in this machine's mirror (not
    fetched); any other path as it is."""
    parts = _driver_parts(path)
    return Path(path) if parts is None else mirror_root().joinpath(*parts)


def localize(path: str | Path, expect: dict | None = None) -> str:
    """What a Ray actor reads, here: a file or folder in the driver's mirror (a rollouts shard,
    an SFT checkpoint, an earlier round's checkpoint) is fetched from its bucket into this
    machine's mirror (only that; ``expect``: a manifest shard entry its bytes must match); any
    other path must exist on this machine. Off a Ray actor of a remote run: ``path`` as it is."""
    parts = _driver_parts(path)
    if parts is None:
        if _DRIVER and not Path(path).exists():
            raise UserError(
                f"{path} is not on this Ray node ({socket.gethostname()})",
                "the model paths of the config",
                "put the models at the same path on every node, or inside the run's bucket",
            )
        return str(path)
    r = open_remote(f"{parts[0]}://{parts[1]}")  # the whole bucket: rel = the object's key
    local = r.fetch("/".join(parts[2:]))
    if expect is not None:
        from stages.lib import store

        if local.stat().st_size != expect["bytes"] or store.file_sha256(local) != expect["sha256"]:
            raise UserError(
                f"{'/'.join(parts[2:])} in the bucket does not match its manifest (size or sha256)",
                r.key("/".join(parts[2:])),
                "re-run the stage that wrote it with overwrite=true",
            )
    return str(local)


@contextlib.contextmanager
def streaming(r: Remote) -> Iterator[None]:
    """Read the shards a pull left in the bucket in place (``store.open_shard``), read-only."""
    from stages.lib import store

    _ACTIVE.append((r, None))
    old, store.HOOKS.streamed = store.HOOKS.streamed, _streamed
    try:
        yield
    finally:
        _ACTIVE.pop()
        store.HOOKS.streamed = old


@contextlib.contextmanager
def stage_session(cfg: Any, stage: str) -> Iterator[None]:
    """Run a stage against the mirror of a remote ``cfg.run_dir``; nothing for a local one."""
    if not is_remote(cfg.run_dir):
        yield
        return
    from stages.lib import store

    r = open_remote(cfg.run_dir)
    # under torchrun only global rank 0 writes the run: it holds the lease and publishes
    rank0 = int(os.environ.get("RANK", "0")) == 0
    name = lease_name(cfg, stage) if rank0 else None
    lease = Lease(r, name, lease_seconds()) if name else None
    if lease is not None:
        lease.acquire()
    _ACTIVE.append((r, lease))
    hooks = store.HOOKS
    hooks.refresh, hooks.streamed, hooks.checkpoint = _refresh, _streamed, _checkpoint
    hooks.published = _published if rank0 else None
    try:
        streamed = ("selected/",) if stage == "train" else ()
        only = stage_reads(cfg, stage)
        n = pull(r, streamed=streamed, top_only=stage == "pipeline", only=only)
        log.info(f"[{stage}] mirror of {r.uri} at {r.mirror} ({n / 1e6:.1f} MB fetched)")
        yield
    finally:
        try:  # the pipeline's own files (timings, rounds) are published as they are written
            if stage != "pipeline" and rank0 and not (lease and lease.lost.is_set()):
                publish_changed(r)
        finally:
            _ACTIVE.pop()
            if not _ACTIVE:
                hooks.published = hooks.refresh = hooks.streamed = hooks.checkpoint = None
            if lease is not None:
                lease.release()
