"""Every benchmark in one process, one JSON object: storage, score, rollout, select, train, demo.

Each suite is ``scripts/bench_<name>.py``'s ``bench(quick)``; a suite that is missing or fails is
recorded as ``"<name>.error"`` (with the traceback's last line) instead of stopping the others,
and the command then exits with status 1 after writing the JSON (CI fails on a crash, never on a
timing: no figure is checked against its goal here). It also exits 1 when a suite reports
``<name>.limit_violations``: a fraction above the limit measured in the same run (the score
suite's matmul limit), which means the limit, not the code, is wrong.
Ratios are taken inside one suite's run, so they survive a noisy, shared machine better than
absolute numbers. ``demo.end_to_end_seconds`` is read from ``runs/demo/timings.json`` (the
pipeline's stage timings) when a demo run left one.

    .venv/bin/python scripts/bench.py --out runs/bench.json [--quick]

Quick mode keeps CI under ~3 minutes: small workloads and no vLLM engine start-up. Outside quick
mode every suite runs in its own process (``--isolate``), so memory is returned between suites.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

SUITES = ("storage", "score", "rollout", "select", "train")
HEADLINE = (
    "storage.bytes_per_token_k32",
    "storage.naive_bytes_per_token_k32",
    "storage.max_abs_logprob_error",
    "score.hf_fraction_of_matmul_limit",
    "score.prefix_sharing_speedup",
    "score.prefix_sharing_speedup_demo",
    "score.vllm_tokens_per_s_over_hf",
    "rollout.hf_stage_overhead",
    "rollout.vllm_stage_overhead",
    "select.speedup_vs_pandas",
    "select.time_over_bare_io",
    "train.streaming_over_in_memory",
    "train.topk_loss_peak_mem_over_ce",
    "train.offline_step_time_over_online",
    "demo.end_to_end_seconds",
)


def machine() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import torch

        torch_version = torch.__version__
        cuda = torch.cuda.is_available()
    except ImportError:
        torch_version, cuda = None, False
    return {
        "machine.nproc": os.cpu_count(),
        "machine.cpu": cpu,
        "machine.torch": torch_version,
        "machine.cuda": cuda,
        "machine.python": platform.python_version(),
        "machine.loadavg_1m_at_start": os.getloadavg()[0],
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def run_suite(name: str, quick: bool) -> dict:
    """One suite's results, or its error; never raises."""
    t0 = time.time()
    threads = _torch_threads()
    try:
        mod = importlib.import_module(f"bench_{name}")
        if name == "score":  # quick: no vLLM engine start-up (~35 s on CPU)
            res = mod.bench(quick, with_vllm=not quick)
        else:  # rollout: vLLM only outside quick mode (its own default)
            res = mod.bench(quick)
    except BaseException as e:  # noqa: BLE001 - a failing suite is a result, not a crash
        if isinstance(e, KeyboardInterrupt):
            raise
        last = traceback.format_exc().strip().splitlines()[-1]
        res = {f"{name}.error": f"{type(e).__name__}: {e}"[:500], f"{name}.traceback": last}
    finally:
        _torch_threads(threads)  # a suite's thread setting must not leak into the next one
    # one flat namespace: a suite's own key ("model", "a.pairs") gets the suite's prefix, so two
    # suites cannot overwrite each other's details
    res = {k if k.startswith(f"{name}.") else f"{name}.{k}": v for k, v in res.items()}
    res[f"{name}.bench_seconds"] = round(time.time() - t0, 1)
    return res


def _torch_threads(n: int | None = None) -> int | None:
    """torch's intra-op thread count (set it first when ``n`` is given); None without torch."""
    try:
        import torch
    except ImportError:
        return None
    if n is not None:
        torch.set_num_threads(n)
    return torch.get_num_threads()


def demo_timings(run_dir: Path = ROOT / "runs" / "demo") -> dict:
    f = run_dir / "timings.json"
    if f.exists():
        t = json.loads(f.read_text())
        return {"demo.end_to_end_seconds": t.get("total"), "demo.timings": t}
    return {
        "demo.end_to_end_seconds": None,
        "demo.note": f"no {f}: run the demo pipeline (it must save its stage timings there)",
    }


def run_suite_isolated(name: str, quick: bool) -> dict:
    """``run_suite`` in a child process, so that its memory and any vLLM engine it started are
    released when it exits (in one process, the score and rollout suites' engine workers stayed
    alive, 6 GB each, and the select suite was then killed for memory)."""
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / f"{name}.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name, "--out", str(out)]
        p = subprocess.run(cmd + (["--quick"] if quick else []), check=False)
        if out.exists():
            return json.loads(out.read_text())
        return {
            f"{name}.error": f"the suite's process exited with status {p.returncode} and no "
            "result (killed, e.g. out of memory?)"
        }


def bench_all(quick: bool, suites: tuple[str, ...] = SUITES, isolate: bool = False) -> dict:
    out = {"quick": quick, **machine()}
    for name in suites:
        print(f"[bench] {name} ...", flush=True)
        out.update(run_suite_isolated(name, quick) if isolate else run_suite(name, quick))
    out.update(demo_timings())
    for k in HEADLINE:  # every headline key is present, null when its suite could not say
        out.setdefault(k, None)
    out["machine.loadavg_1m_at_end"] = os.getloadavg()[0]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--quick", action="store_true", help="small workloads (CI, < ~3 minutes)")
    ap.add_argument("--only", nargs="*", choices=SUITES, help="run only these suites")
    ap.add_argument(
        "--isolate",
        choices=("auto", "yes", "no"),
        default="auto",
        help="each suite in its own process (auto: outside quick mode, where vLLM engines start)",
    )
    ap.add_argument("--child", help=argparse.SUPPRESS)  # internal: run one suite, write its JSON
    args = ap.parse_args()
    if args.child:
        res = run_suite(args.child, args.quick)
        Path(args.out).write_text(json.dumps(res, indent=1, default=str))
        return
    isolate = args.isolate == "yes" or (args.isolate == "auto" and not args.quick)
    res = bench_all(args.quick, tuple(args.only) if args.only else SUITES, isolate)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1, default=str))
    print(json.dumps({k: res[k] for k in HEADLINE}, indent=1, default=str))
    failed = sorted(k.removesuffix(".error") for k in res if k.endswith(".error"))
    # a fraction above its measured limit: the limit is wrong, every fraction of the run with it
    bad = {k: v for k, v in res.items() if k.endswith(".limit_violations") and v}
    for k, v in bad.items():
        print(f"[bench] {k}: {'; '.join(v)}", file=sys.stderr)
    failed += sorted(k.removesuffix(".limit_violations") for k in bad)
    if failed:  # the JSON is written, the others ran; CI still sees the crash
        print(f"[bench] failed suites: {', '.join(failed)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
