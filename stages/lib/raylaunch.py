"""Ray workers for the shard stages: the same shard plan, taken by Ray actors instead of one process.

``launcher.kind=ray`` (stages/lib/config/schema.py ``LauncherConfig``) makes the rollout and score stages
hand their missing shards to :func:`run_shards`. The driver (the process that runs the stage)
keeps everything that decides what is written: the plan, the dataset lock, resume (committed
shards are never handed out) and the manifest, written after :func:`run_shards` returns through the
stage's usual commit. Each actor calls the stage's ``make(writer)`` once (it loads ONE engine: an
HF model or vLLM) and then runs the returned per-shard function on the shards it is given, writing
each through the shard store (temp file, fsync, atomic rename), exactly as a local worker does.

Assignment is dynamic: one shard in flight per actor, the next one handed to whichever actor
finishes first, so a slow node or a long shard does not hold back the others. An actor whose
process dies (SIGKILL, out of memory, lost node) is replaced by a new one, at most
``launcher.max_restarts`` times per actor; its shard goes back to the queue after the dead
attempt's temp file is removed (a temp file never becomes a shard: only the rename commits, and
the shard is redone from scratch or, when the rename had happened, kept). A ``UserError`` raised
inside an actor reaches the driver as the same exception, so the stage prints its one line.

A run in object storage (``run_dir=s3://...``): the actors share nothing with the driver but the
bucket. Each works in its own mirror (``stages.lib.remote.attach``), fetches only what its shard
reads (``remote.localize``: the rollouts shard, a model inside the run), publishes each shard
under its final key as it renames it, and returns the shard's manifest entry; the driver commits
from those entries (``DatasetWriter.reported``) without fetching the shards.

The stage's functions travel to the actors with cloudpickle (``ray.put``, once). Actors import
this package from the driver's code folder (``PYTHONPATH``), which a local cluster and nodes with
the same checkout path share; other clusters need distillery installed on every node.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stages.lib import remote, store, uri
from stages.lib.config import LauncherConfig
from stages.lib.errors import UserError
from stages.lib.progress import Progress, log

CODE_ROOT = Path(__file__).resolve().parents[2]  # the folder holding stages/ and data_schemas/


@dataclass
class Launched:
    """What :func:`run_shards` did: shards run, redone after an actor died, actors replaced."""

    actors: int = 0  # actors used (replacements not counted)
    shards: int = 0
    redone: int = 0
    replaced: int = 0
    kept_after_death: int = 0  # a dead attempt had already renamed its shard: kept, not redone
    nodes: set = field(default_factory=set)
    pids: list = field(default_factory=list)  # every actor process, replacements included


def import_ray() -> Any:
    """The ``ray`` module, or a UserError that says how to install it."""
    try:
        import ray
    except ImportError:
        raise UserError(
            "launcher.kind=ray but the ray package is not installed",
            "launcher.kind",
            "pip install 'distillery[ray]' (or pip install 'ray==2.60.0'), or use "
            "launcher.kind=local",
        ) from None
    return ray


# Passed on to the actors when the driver has them: where the bucket is (not who may read it:
# credentials come from each node's own environment or instance role, never through the driver).
FORWARDED_ENV = ("DISTILLERY_DEBUG", "AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION")


def job_runtime_env() -> dict:
    """Ray's runtime environment for this driver's job: actors import this code folder first
    (not another install of distillery), use one tokenizer thread, and reach the same bucket."""
    path = [str(CODE_ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = {"PYTHONPATH": os.pathsep.join(dict.fromkeys(path)), "TOKENIZERS_PARALLELISM": "false"}
    env.update({k: os.environ[k] for k in FORWARDED_ENV if k in os.environ})
    return {"env_vars": env}


def connect(lc: LauncherConfig) -> Any:
    """Connect to the cluster ``launcher.address`` names, or start a local one (null); a session
    that is already connected (the pipeline's earlier stage, a test) is reused as it is."""
    ray = import_ray()
    if ray.is_initialized():
        return ray
    kw: dict[str, Any] = {"log_to_driver": True, "runtime_env": job_runtime_env()}
    try:
        if lc.address is None:
            _start_local(ray, lc, kw)
        else:
            _check_reachable(lc.address)
            ray.init(address=lc.address, **kw)
    except (ConnectionError, RuntimeError, ValueError, OSError) as e:
        raise UserError(
            f"cannot start or reach the Ray cluster ({str(e).splitlines()[0][:200]})",
            f"launcher.address={lc.address if lc.address else 'null'}",
            "start one with `ray start --head` and set launcher.address=auto (or host:6379), "
            "or leave launcher.address=null for a local cluster",
        ) from None
    return ray


def _start_local(ray: Any, lc: LauncherConfig, kw: dict) -> None:
    """A local cluster; the dashboard as ``launcher.dashboard`` says, without it (and a warning)
    when its packages are missing: it only shows, it never decides anything."""
    kw = {**kw, "address": "local"}  # a new cluster, even when `ray start` runs one here
    if lc.dashboard is None:
        ray.init(**kw)
        return
    try:
        ray.init(include_dashboard=lc.dashboard, **kw)
    except Exception as e:  # Ray raises a bare Exception for missing dashboard packages
        if "dashboard" not in str(e).lower():
            raise
        ray.shutdown()
        log.info(
            f"[ray] no dashboard ({str(e).splitlines()[0][:120]}; pip install 'ray[default]' "
            "for it): running without"
        )
        ray.init(include_dashboard=False, **kw)


def _check_reachable(address: str) -> None:
    """A ``host:port`` or ``ray://host:port`` address must accept a connection within seconds
    (Ray itself retries an unreachable one for minutes)."""
    import socket

    hostport = address.removeprefix("ray://")
    if address == "auto" or ":" not in hostport:
        return
    host, _, port = hostport.rpartition(":")
    if not port.isdigit():
        raise ValueError(f"{address!r} is not host:port")
    with socket.create_connection((host.strip("[]"), int(port)), timeout=5):
        pass


def check_resources(ray: Any, lc: LauncherConfig) -> None:
    """One actor's request must fit the cluster, or Ray would wait for it forever."""
    have = ray.cluster_resources()
    for key, want in (("CPU", lc.num_cpus), ("GPU", lc.num_gpus)):
        if want > have.get(key, 0):
            raise UserError(
                f"one Ray actor asks for {want:g} {key}s but the cluster has {have.get(key, 0):g}",
                f"launcher.num_{key.lower()}s",
                f"lower launcher.num_{key.lower()}s or add nodes with {key}s to the cluster",
            )
    for key, want in lc.resources.items():
        if want > have.get(key, 0):
            raise UserError(
                f"one Ray actor asks for {want:g} of the resource {key!r} but the cluster has "
                f"{have.get(key, 0):g}",
                f"launcher.resources.{key}",
                f"start the nodes meant for the actors with `ray start --resources="
                f"'{{\"{key}\": N}}'`, or drop the key",
            )


class ShardActor:
    """One engine and the shards handed to it (becomes a Ray actor class in :func:`run_shards`).
    ``load`` gives it a stage's ``make``; the engine loads on the first shard, inside a task, so
    that a UserError while loading reaches the driver like any other."""

    def __init__(self):
        self.make, self.spec, self.fn, self.where = None, None, None, None

    def info(self, imports: tuple[str, ...] = ()) -> dict:
        """Where this actor runs; ``imports`` are imported first (a benchmark's warm-up)."""
        import importlib
        import socket

        for name in imports:
            importlib.import_module(name)
        return {"pid": os.getpid(), "node": socket.gethostname(), "cpu_s": time.process_time()}

    def load(self, make: Callable, spec: dict, where: dict | None = None) -> dict:
        """Take a stage's ``make`` (deserialising it imports the stage); where this actor runs.
        ``where`` (a run in object storage): the run's URI and the driver's mirror root; this
        actor works in its own mirror, pulls what a shard needs and publishes what it writes."""
        self.make, self.spec, self.fn, self.where = make, dict(spec), None, where
        remote.detach()
        if where is not None:
            remote.attach(where["uri"], where["root"])
            self.spec["directory"] = remote.translate(spec["directory"])
            remove_dead_temps(self.spec["directory"])
        return self.info()

    def run(self, shard: int, payload: Any = None) -> dict:
        """One shard: the stage's result and, on a run in object storage, the shard's manifest
        entry (the driver commits it without fetching the shard)."""
        if self.fn is None:
            self.fn = self.make(store.DatasetWriter(**self.spec))
        result = self.fn(shard) if payload is None else self.fn(shard, payload)
        path = Path(self.spec["directory"]) / store.shard_relpath(shard)
        entry = store.shard_entry(shard, path) if self.where is not None else None
        return {"result": result, "entry": entry}

    def reset(self) -> None:
        """Drop the engine (its memory, its GPU) and keep the process for the next stage."""
        import gc
        import sys

        self.make, self.spec, self.fn, self.where = None, None, None, None
        remote.detach()
        vllm = sys.modules.get("stages.lib.vllm_backend")
        engines = vllm is not None and bool(vllm._LLM_CACHE)
        torch = sys.modules.get("torch")
        cuda = torch is not None and torch.cuda.is_available()
        if engines:
            vllm.clear_llm_cache()
        if engines or cuda:  # a vLLM engine shuts down when collected; CUDA blocks
            gc.collect()  # ~0.2 CPU-s with torch loaded: only where memory outside the heap waits
        if cuda:
            torch.cuda.empty_cache()


def writer_spec(w: store.DatasetWriter) -> dict:
    """The fields an actor needs to write shards of ``w``'s dataset (no locks: the driver holds
    the dataset's writer lock for the whole run)."""
    return {
        "directory": w.directory,
        "table": w.table,
        "dataset_id": w.dataset_id,
        "stage": w.stage,
        "row_group_rows": w.row_group_rows,
        "vocab_size": w.vocab_size,
    }


def remove_dead_temps(directory: Path) -> int:
    """Delete the temp shards in ``directory`` whose writer (the pid in their name) no longer
    runs on this machine: a killed actor's, in a mirror the next actor on the node reuses."""
    n = 0
    for tmp in Path(directory).glob(f"bucket=*/{store.TMP_PREFIX}shard-*"):
        pid = tmp.name.rsplit(".", 1)[-1]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            tmp.unlink(missing_ok=True)
            n += 1
    return n


def remove_temps(w: store.DatasetWriter, shard: int) -> int:
    """Delete the temp files of a dead attempt at ``shard`` (its process is gone); how many."""
    final = Path(w.shard_path(shard))
    n = 0
    for tmp in final.parent.glob(f"{store.TMP_PREFIX}{final.name}.*"):
        tmp.unlink(missing_ok=True)
        n += 1
    return n


# Actors outlive one stage in this process (rollout then score in the pipeline, a test module):
# starting one costs seconds (a process that imports torch). Reused while the requested options and
# the Ray session are the same; their engines are dropped between stages (ShardActor.reset).
_POOL: dict[str, Any] = {"key": None, "actors": []}


def _actor_options(lc: LauncherConfig) -> dict:
    opts: dict[str, Any] = {
        "num_cpus": lc.num_cpus,
        "num_gpus": lc.num_gpus,
        "max_restarts": 0,  # the driver replaces a dead actor itself and requeues its shard
    }
    if lc.resources:  # custom node resources: actors only on the nodes that have them
        opts["resources"] = dict(lc.resources)
    if lc.placement == "spread":  # across the nodes first (Ray's default favours nodes in use)
        opts["scheduling_strategy"] = "SPREAD"
    if lc.env:  # a runtime env of its own starts a fresh worker process (~seconds more)
        opts["runtime_env"] = {"env_vars": {**job_runtime_env()["env_vars"], **lc.env}}
    return opts


def drop_pool() -> None:
    """Kill the pooled actors (a failed stage, other options, or the end of a Ray session)."""
    import ray

    for a in _POOL["actors"]:
        if ray.is_initialized():
            ray.kill(a, no_restart=True)
    _POOL.update(key=None, actors=[])


def _actors(ray: Any, lc: LauncherConfig, n: int) -> list:
    """``n`` actors with ``lc``'s options, pooled ones first; not waited for (an actor the cluster
    cannot place yet must not hold back those it can)."""
    opts = _actor_options(lc)
    key = store.canonical_json([opts, ray.get_runtime_context().get_job_id()])
    if _POOL["key"] != key:
        drop_pool()
    have = _POOL["actors"]
    have += [ray.remote(ShardActor).options(**opts).remote() for _ in range(n - len(have))]
    _POOL.update(key=key, actors=have)
    return have[:n]


def run_shards(
    lc: LauncherConfig,
    w: store.DatasetWriter,
    todo: list[int],
    make: Callable[[store.DatasetWriter], Callable[[int], Any]],
    *,
    units: dict[int, float],
    on_result: Callable[[int, Any], None],
    desc: str,
    unit: str,
    inputs: Callable[[int], Any] | None = None,
    run_dir: str | None = None,
) -> Launched:
    """Run ``todo`` on Ray actors; ``on_result(shard, result)`` in the driver as each one lands
    (``result`` None: a dead attempt had committed it). ``units``: progress per shard.
    ``inputs(shard)``: what that shard reads, sent with it (the per-shard function then takes
    ``(shard, inputs)``), so no actor receives the whole plan. ``run_dir`` in object storage:
    each actor pulls what it reads into its own mirror and publishes each shard it writes; the
    driver commits from the entries they report (it fetches none of those shards)."""
    ray = connect(lc)
    check_resources(ray, lc)
    out, t0 = Launched(), time.perf_counter()
    bar = Progress(int(sum(units.get(s, 0) for s in todo)), desc, unit=unit)
    where = None
    if uri.is_remote(run_dir):
        where = {"uri": str(run_dir), "root": str(uri.mirror_root())}
    try:
        actors = _actors(ray, lc, min(lc.actors, len(todo)))
        out.actors = len(actors)
        d = _Dispatch(ray, lc, w, make, actors, units, on_result, bar, out, inputs, where)
        d.run(todo)
    except BaseException:
        drop_pool()  # stop in-flight work; a later stage starts afresh
        raise
    finally:
        bar.close()
    for a in _POOL["actors"]:  # free the engines (and GPUs) for the next stage
        a.reset.remote()
    log.info(
        f"[{desc.split()[0]}] ray: {out.shards} shards on {len(out.nodes)} node(s), "
        f"{len(out.pids)} actor process(es) in {time.perf_counter() - t0:.1f} s, "
        f"{out.redone} redone and {out.kept_after_death} kept after {out.replaced} actor "
        "death(s)"
    )
    return out


WAIT_NOTE_S = 60.0  # say so when no actor has reported for this long (a cluster with no room)


@dataclass
class _Dispatch:
    """The driver's loop: one task in flight per actor slot, either its ``load`` (the actor is
    starting) or a shard; shards go to idle slots; a dead slot gets a new actor."""

    ray: Any
    lc: LauncherConfig
    w: store.DatasetWriter
    make: Callable
    actors: list
    units: dict
    on_result: Callable
    bar: Any
    out: Launched
    inputs: Callable[[int], Any] | None = None
    where: dict | None = None  # a run in object storage: its URI, the driver's mirror root

    def run(self, todo: list[int]) -> None:
        self.make_ref = self.ray.put(self.make)  # pickled once, fetched by each actor
        self.queue, self.idle = deque(todo), []
        self.deaths = [0] * len(self.actors)
        self.running: dict[Any, tuple[int, int | None]] = {}  # ref -> (slot, shard or None)
        for slot in range(len(self.actors)):
            self._load(slot)
        while self.queue or any(sh is not None for _, sh in self.running.values()):
            while self.idle and self.queue:
                slot, shard = self.idle.pop(0), self.queue.popleft()
                payload = self.inputs(shard) if self.inputs is not None else None
                self.running[self.actors[slot].run.remote(shard, payload)] = (slot, shard)
            ready, _ = self.ray.wait(list(self.running), num_returns=1, timeout=WAIT_NOTE_S)
            if not ready:
                self._waiting()
                continue
            slot, shard = self.running.pop(ready[0])
            self._landed(ready[0], slot, shard)
        self._drop_unstarted()

    def _load(self, slot: int) -> None:
        ref = self.actors[slot].load.remote(self.make_ref, writer_spec(self.w), self.where)
        self.running[ref] = (slot, None)

    def _landed(self, ref: Any, slot: int, shard: int | None) -> None:
        try:
            result = self.ray.get(ref)
        except self.ray.exceptions.RayActorError as e:  # the process died (mid-shard)
            self.deaths[slot] += 1
            if _after_death(self.lc, self.w, shard, self.deaths[slot], e, self.out, self.queue):
                self.on_result(shard, None)
                self.bar.update(self.units.get(shard, 0))
            self._replace(slot)
            return
        except self.ray.exceptions.RayTaskError as e:
            raise _user_error(e) from None
        if shard is None:  # the actor is up and holds the stage's make
            self.out.pids.append(result["pid"])
            self.out.nodes.add(result["node"])
        else:
            if result["entry"] is not None:  # written and published on the actor's machine
                self.w.reported[shard] = result["entry"]
            self.on_result(shard, result["result"])
            self.out.shards += 1
            self.bar.update(self.units.get(shard, 0))
        self.idle.append(slot)

    def _replace(self, slot: int) -> None:
        dead = self.actors[slot]
        self.ray.kill(dead, no_restart=True)
        self.actors[slot] = self.ray.remote(ShardActor).options(**_actor_options(self.lc)).remote()
        _POOL["actors"] = [self.actors[slot] if a is dead else a for a in _POOL["actors"]]
        self.out.replaced += 1
        self._load(slot)

    def _waiting(self) -> None:
        starting = sum(sh is None for _, sh in self.running.values())
        log.info(
            f"[ray] {starting} actor(s) not started after {WAIT_NOTE_S:.0f} s: the cluster has "
            f"no room for launcher.num_cpus={self.lc.num_cpus:g} / "
            f"num_gpus={self.lc.num_gpus:g} more (`ray status` shows what is free)"
        )

    def _drop_unstarted(self) -> None:
        """Actors still starting when the last shard landed: not needed, not kept."""
        for ref, (slot, _) in list(self.running.items()):
            self.ray.kill(self.actors[slot], no_restart=True)
            _POOL["actors"] = [a for a in _POOL["actors"] if a is not self.actors[slot]]
            del self.running[ref]


def _after_death(lc, w, shard, deaths, err, out: Launched, queue: deque) -> bool:
    """The actor on ``shard`` (None: while starting) died: fail after too many deaths, else clean
    up and requeue (False) or, when the dead attempt had committed it, keep the shard (True)."""
    if shard is not None:
        remove_temps(w, shard)  # the dead attempt's, whatever happens next
    if deaths > lc.max_restarts:
        on = f"shard {shard}" if shard is not None else "start-up"
        raise UserError(
            f"a Ray actor died {deaths} time{'s' if deaths > 1 else ''} (last while on {on}: "
            f"{str(err).splitlines()[0][:160]})",
            f"launcher.max_restarts={lc.max_restarts}",
            "read the actor's log (`ray logs` or the dashboard): an out-of-memory kill needs more "
            "launcher.num_cpus/num_gpus per actor or fewer actors per node; re-running resumes",
        )
    if shard is None:
        return False
    remote.sync_published(w.shard_path(shard))  # bucket and mirror agree on it first
    if w.is_done(shard):  # it died after the rename: the shard is complete, keep it
        out.kept_after_death += 1
        return True
    out.redone += 1
    queue.appendleft(shard)
    return False


def _user_error(e: Exception) -> Exception:
    """A UserError raised in an actor as itself (the stage prints its one line); anything else
    as Ray's error, which carries the actor's traceback."""
    cause = getattr(e, "cause", None)
    if isinstance(cause, UserError):
        return UserError(cause.what, cause.where, cause.fix)
    return e
