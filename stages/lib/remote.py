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

Where the pieces live: the mirror and its transfers (``Remote``, ``pull``, ``publish_changed``)
in stages/lib/mirror.py, the lease in stages/lib/lease.py; the session and the store hooks here.

Object stores have no rename: a reader trusts only what a manifest lists (``store.open_committed``
checks the mirrored files against it), so a shard published by a killed writer is invisible until
a manifest lists it, and a re-run (on any machine, empty mirror or not) pulls the published shards
and continues at the first missing one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from data_schemas.errors import UserError
from stages.lib.lease import Lease, lease_name, lease_seconds
from stages.lib.mirror import _SHARD, Remote, open_remote, publish_changed, pull
from stages.lib.progress import log
from stages.lib.uri import is_remote, mirror_root


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
