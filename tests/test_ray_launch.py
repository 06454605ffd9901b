"""The Ray launcher (stages/lib/raylaunch.py, ``launcher.kind=ray``) on a real local Ray cluster.

One Ray session for the module (2 CPUs, no dashboard); tiny Llamas from tests/conftest.py. Checks
that rollout + score through 2 actors write the same shard bytes as one local worker, that an
actor SIGKILLed mid-shard is replaced and its shard redone once (temp file of the dead attempt
removed, committed shards resumed, not redone), and that a UserError raised inside an actor
reaches the driver as the same one-line error.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from data_schemas import rollouts, tokens  # noqa: E402
from stages import rollout, score  # noqa: E402
from stages.lib import errors, raylaunch, store  # noqa: E402
from stages.lib.config import compose  # noqa: E402
from tests import servers  # noqa: E402
from tests.conftest import write_prompts  # noqa: E402

RAY = ("launcher.kind=ray", "launcher.actors=2")


@pytest.fixture(scope="module", autouse=True)
def ray_session():
    """One local cluster for the module (its start-up costs seconds)."""
    with servers.local_ray():
        yield


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory) -> Path:
    return write_prompts(tmp_path_factory.mktemp("prompts") / "prompts.parquet", 12)


def overrides(run_dir: Path, lm: Path, teacher: Path, prompts: Path, *extra: str) -> list[str]:
    base = [
        f"run_dir={run_dir}",
        f"student.path={lm}",
        f"teacher.path={teacher}",
        f"data.prompts={prompts}",
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


def shard_bytes(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.glob("bucket=*/shard-*.parquet"))
    }


def temps(folder: Path) -> list[Path]:
    return sorted(folder.rglob(f"{store.TMP_PREFIX}*"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_lm, tiny_teacher, prompts_file) -> Path:
    """Rollout + score by one local worker: what every Ray run must reproduce."""
    run_dir = tmp_path_factory.mktemp("local")
    args = overrides(run_dir, tiny_lm, tiny_teacher, prompts_file)
    rollout.run(compose("rollout", args))
    score.run(compose("score", args))
    return run_dir


def test_two_actors_write_the_bytes_of_one_local_worker(
    reference, tmp_path, tiny_lm, tiny_teacher, prompts_file
):
    args = overrides(tmp_path, tiny_lm, tiny_teacher, prompts_file, *RAY)
    r = rollout.run(compose("rollout", args))
    s = score.run(compose("score", args))
    assert r["complete"] and r["shards_written"] == 6 and s["committed"]
    for table, module in (("rollouts", rollouts), ("tokens", tokens)):
        ref = shard_bytes(reference / table)
        assert len(ref) == 6 and shard_bytes(tmp_path / table) == ref, table
        assert store.read_table(tmp_path / table, module).equals(
            store.read_table(reference / table, module)
        )
        assert not temps(tmp_path / table)
    # the manifest is the driver's usual commit: same dataset id, same listed shards
    m_ray = store.open_committed(tmp_path / "tokens", tokens)
    m_ref = store.open_committed(reference / "tokens", tokens)
    assert m_ray["dataset_id"] == m_ref["dataset_id"] and m_ray["shards"] == m_ref["shards"]
    assert m_ray["config"]["launcher"]["kind"] == "ray"


def _kill_an_actor_inside_a_shard(first: Path, deadline: float) -> int:
    """SIGKILL a process whose title says it runs ShardActor.run, once a shard has landed."""
    while time.time() < deadline:
        if first.exists():
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


def test_sigkilled_actor_is_replaced_and_its_shard_redone_once(
    reference, tmp_path, tiny_lm, tiny_teacher, prompts_file, capsys
):
    """Score through Ray; SIGKILL one actor's process while it is inside a shard (from outside,
    as the OOM killer would): every tokens shard exists once, with the reference's bytes."""
    shutil.copytree(reference / "rollouts", tmp_path / "rollouts")
    args = overrides(tmp_path, tiny_lm, tiny_teacher, prompts_file, *RAY, "launcher.max_restarts=1")
    got: dict = {}

    def drive():
        try:
            got["summary"] = score.run(compose("score", args))
        except BaseException as e:  # noqa: BLE001 - re-raised in the test thread
            got["error"] = e

    t = threading.Thread(target=drive)
    t.start()
    killed = _kill_an_actor_inside_a_shard(
        tmp_path / "tokens" / store.shard_relpath(0), time.time() + 120
    )
    t.join(180)
    assert "error" not in got, got.get("error")
    assert got["summary"]["committed"] and killed
    pattern = r"\[score\] ray: (\d+) shards .* (\d+) redone and (\d+) kept after (\d+) actor"
    ran, redone, kept, deaths = map(int, re.search(pattern, capsys.readouterr().out).groups())
    assert deaths == 1, "the killed actor was not replaced once"
    # killed mid-shard: redone; killed after its rename (rare): kept, not written again
    assert redone + kept == 1 and ran + kept == 6
    assert shard_bytes(tmp_path / "tokens") == shard_bytes(reference / "tokens")
    assert not temps(tmp_path / "tokens")


def test_user_error_inside_an_actor_is_the_one_line_error(
    reference, tmp_path, tiny_lm, tiny_teacher, prompts_file, capsys
):
    """A teacher whose weights file is truncated loads only on the actors: the driver raises
    the loader's UserError (not a Ray traceback), prints one line, exits 2, writes no shard."""
    bad = tmp_path / "teacher"
    shutil.copytree(tiny_teacher, bad)
    weights = bad / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    shutil.copytree(reference / "rollouts", tmp_path / "run" / "rollouts")
    args = overrides(tmp_path / "run", tiny_lm, bad, prompts_file, *RAY)
    with pytest.raises(errors.UserError) as info:
        score.run(compose("score", args))
    assert "teacher.path" in str(info.value) and "causal LM" in str(info.value)
    capsys.readouterr()
    with pytest.raises(SystemExit) as ex:
        errors.report_and_exit(info.value)
    err = capsys.readouterr().err.strip().splitlines()
    assert ex.value.code == 2 and len(err) == 1 and err[0].startswith("error: ")
    assert "Ray" not in err[0] and "Traceback" not in err[0]
    assert not shard_bytes(tmp_path / "run" / "tokens")


def test_kill_mid_write_leaves_no_second_shard_and_resume_skips_done_shards(
    tmp_path, tiny_lm, tiny_teacher, prompts_file, capsys
):
    """One actor, SIGKILLed by the store's fault seam while its temp shard is half written (2nd
    shard of each actor process); shard 0 committed beforehand is resumed, not redone."""
    extra = ("rollout.prompts_per_shard=4",)  # 3 shards
    ref = tmp_path / "local"
    rollout.run(compose("rollout", overrides(ref, tiny_lm, tiny_teacher, prompts_file, *extra)))
    run_dir = tmp_path / "ray"
    first = store.shard_relpath(0)
    (run_dir / "rollouts" / first).parent.mkdir(parents=True)
    shutil.copy(ref / "rollouts" / first, run_dir / "rollouts" / first)
    fault = ("launcher.actors=1", "+launcher.env.DISTILLERY_FAULT='mid_shard:2'")
    args = overrides(run_dir, tiny_lm, tiny_teacher, prompts_file, *extra, *RAY[:1], *fault)
    out = rollout.run(compose("rollout", args))
    assert out["complete"] and out["shards_resumed"] == 1 and out["shards_written"] == 2
    assert re.search(r"1 redone and 0 kept after 1 actor death", capsys.readouterr().out)
    assert shard_bytes(run_dir / "rollouts") == shard_bytes(ref / "rollouts")
    assert len(shard_bytes(run_dir / "rollouts")) == 3 and not temps(run_dir / "rollouts")


@pytest.mark.parametrize(
    "override, key",
    [
        ("launcher.kind=slurm", "launcher.kind"),
        ("launcher.actors=0", "launcher.actors"),
        ("launcher.num_cpus=0", "launcher.num_cpus"),
        ("launcher.num_gpus=-1", "launcher.num_gpus"),
        ("launcher.max_restarts=-1", "launcher.max_restarts"),
        ("launcher.address=' '", "launcher.address"),
        ("worker.count=2", "launcher.kind=ray"),  # the launcher takes the whole plan
        ("launcher.placement=pack", "launcher.placement"),
        ("+launcher.resources.h100=0", "launcher.resources.h100"),
        ("+launcher.resources.GPU=1", "launcher.resources.GPU"),
        ("rollout.tensor_parallel_size=0", "rollout.tensor_parallel_size"),
        ("rollout.backend=hf rollout.tensor_parallel_size=2", "rollout.tensor_parallel_size"),
        ("score.backend=hf score.tensor_parallel_size=2", "score.tensor_parallel_size"),
        # a vLLM engine over 2 GPUs: each Ray actor must get 2
        ("score.backend=vllm score.tensor_parallel_size=2", "launcher.num_gpus >= 2"),
    ],
)
def test_launcher_config_is_checked_at_compose(override, key):
    with pytest.raises(errors.UserError, match=re.escape(key)):
        compose("rollout", ["launcher.kind=ray", *override.split()])


def test_gpu_knobs_compose_and_a_resource_the_cluster_lacks_is_one_error():
    """The GPU keys compose where they can run (vLLM, enough GPUs per actor); an actor asking
    for a custom resource no node declares is refused before anything starts."""
    args = ["launcher.kind=ray", "launcher.num_gpus=2", "+launcher.resources.h100=1"]
    args += ["launcher.placement=spread", "score.backend=vllm", "score.tensor_parallel_size=2"]
    cfg = compose("score", args)
    assert cfg.score.tensor_parallel_size == 2 and cfg.launcher.resources == {"h100": 1}
    opts = raylaunch._actor_options(cfg.launcher)
    assert opts["resources"] == {"h100": 1} and opts["scheduling_strategy"] == "SPREAD"
    lc = compose("rollout", ["launcher.kind=ray", "+launcher.resources.h100=1"]).launcher
    with pytest.raises(errors.UserError, match=r"resource 'h100' but the cluster has 0"):
        raylaunch.check_resources(ray, lc)


def test_an_address_that_does_not_answer_fails_at_once():
    """Ray alone retries an unreachable GCS for minutes; the launcher refuses in seconds."""
    t0 = time.time()
    with pytest.raises(OSError):
        raylaunch._check_reachable("127.0.0.1:1")
    with pytest.raises(OSError):
        raylaunch._check_reachable("ray://127.0.0.1:1")
    raylaunch._check_reachable("auto")  # found by Ray itself (a ConnectionError when absent)
    assert time.time() - t0 < 10


def test_an_actor_dying_too_often_is_one_error_and_leaves_no_temp(
    tmp_path, tiny_lm, tiny_teacher, prompts_file
):
    """launcher.max_restarts=0: the first death ends the stage with one line naming the shard;
    the dead attempt's temp file is removed and nothing is committed."""
    fault = ("launcher.actors=1", "launcher.max_restarts=0")
    fault += ("+launcher.env.DISTILLERY_FAULT='mid_shard:1'",)
    args = overrides(tmp_path, tiny_lm, tiny_teacher, prompts_file, *RAY[:1], *fault)
    with pytest.raises(errors.UserError, match=r"died 1 time \(last while on shard 0") as info:
        rollout.run(compose("rollout", args))
    assert "launcher.max_restarts=0" in info.value.line()
    assert not shard_bytes(tmp_path / "rollouts") and not temps(tmp_path / "rollouts")
