"""The local working mirror of a run on object storage and its transfers (``pyarrow.fs``).

:class:`Remote` is one remote run: its filesystem, its prefix there and its mirror folder, with an
index (``.mirror-index.json``: size and remote mtime of every fetched object) so that unchanged
objects are not fetched again. :func:`pull` brings the mirror up to the bucket (manifests, the
shards they list, every other file), :func:`publish_changed` uploads what changed. The session
around a stage (what to pull, when to publish, the lease) is stages/lib/remote.py."""

from __future__ import annotations

import json
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data_schemas import manifest as manifest_mod
from data_schemas.errors import UserError
from stages.lib import safety
from stages.lib.uri import join, mirror_of, split

INDEX = ".mirror-index.json"  # rel -> {"size", "mtime" (remote), "local" (mirror mtime_ns)}
LEASES = "_leases"
_SHARD = re.compile(r"^(?:(.*)/)?bucket=\d+/shard-\d+\.parquet$")
_MANIFEST = manifest_mod.FILENAME


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
