"""What the input checks of #28 save and cost: a huge prompt refused from a prefix vs tokenized
whole, a tokenizer claiming a huge id refused from its JSON vs loaded (each pair in fresh
subprocesses, wall seconds and peak RSS from ``resource``), and what select's new contract checks
(keys, ids, top-K order) add to a select run on synthetic data (scripts/bench_select.py's run,
same process). Written as JSON.

    python scripts/bench_hardening.py --out bench_hardening.json [--mb 20] [--big-id 200000000]
        [--select-tokens 500000]

The tiny test tokenizer (tests/conftest.py) stands in for a real one; the numbers are the cost of
the two paths on it, not of any particular model.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, resource, sys, time
from pathlib import Path
sys.path.insert(0, {repo!r})
mode, model, arg = sys.argv[1], sys.argv[2], sys.argv[3]
t0 = time.perf_counter()
out = {{}}
if mode in ("precheck", "tokenize_whole"):
    from transformers import AutoTokenizer
    from stages.lib import input_limits
    tok = AutoTokenizer.from_pretrained(model)
    text = ("w1 " * (int(arg) // 3 + 1))[: int(arg)]
    t0 = time.perf_counter()
    if mode == "precheck":
        out["tokens_seen"] = input_limits.surely_too_long(tok, text, 250)
    else:
        out["tokens_seen"] = len(tok(text)["input_ids"])
elif mode == "check_ids":
    from stages.lib import model_checks
    from stages.lib.errors import UserError
    try:
        model_checks.check_tokenizer_ids(Path(model), "student")
    except UserError as e:
        out["refused"] = e.line()[:80]
elif mode == "load":
    from transformers import AutoTokenizer
    AutoTokenizer.from_pretrained(model)
out["seconds"] = time.perf_counter() - t0
out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps(out))
"""


def child(mode: str, model: Path, arg: str) -> dict:
    p = subprocess.run(
        [sys.executable, "-c", CHILD.format(repo=str(REPO)), mode, str(model), arg],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if p.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{p.stderr[-2000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def select_cost(n_tokens: int, work: Path) -> dict:
    """Seconds of select's pass-1 value check, of the new contract checks, and of a whole
    select run, on one synthetic run."""
    import time

    sys.path.insert(0, str(REPO / "scripts"))
    from bench_select import run_ours, write_synthetic_run

    from stages import select
    from stages.lib import integrity, store
    from stages.lib.config import compose
    from stages.lib.layout import RunLayout

    run_dir = work / "sel"
    n = write_synthetic_run(run_dir, n_tokens)
    t0 = time.perf_counter()
    run_ours(run_dir, "bench")
    whole = time.perf_counter() - t0
    cfg = compose("select", [f"run_dir={run_dir}", "select=entropy_half"])
    lay = RunLayout.of(run_dir)
    ro_m, tk_m = select._inputs(lay)
    con = select.open_pass1(lay, {"rollouts": ro_m, "tokens": tk_m}, work / "tmp", cfg.select)
    t0 = time.perf_counter()
    select.check_values(con, lay.tokens)
    values = time.perf_counter() - t0
    t0 = time.perf_counter()
    integrity.check_select_inputs(
        con, lay.rollouts, lay.tokens, store.shard_paths(lay.tokens, tk_m),
        integrity.manifest_vocab_size(tk_m, ro_m),
    )  # fmt: skip
    checks = time.perf_counter() - t0
    con.close()
    return {
        "tokens": n,
        "select_run_seconds": whole,
        "value_check_seconds": values,
        "contract_check_seconds": checks,
        "contract_check_fraction_of_run": checks / whole,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="bench_hardening.json")
    ap.add_argument("--mb", type=float, default=20.0, help="prompt size in MB")
    ap.add_argument("--big-id", type=int, default=200_000_000, help="the id the tokenizer claims")
    ap.add_argument("--select-tokens", type=int, default=500_000, help="0 = skip the select part")
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    from tests.conftest import build_tiny_lm

    work = Path(tempfile.mkdtemp(prefix="bench-hardening-"))
    try:
        model = build_tiny_lm(work / "m")
        chars = str(int(args.mb * 1e6))
        pre, whole = child("precheck", model, chars), child("tokenize_whole", model, chars)
        big = work / "big"
        shutil.copytree(model, big)
        tj = json.loads((big / "tokenizer.json").read_text())
        tj["added_tokens"].append(
            {"id": args.big_id, "content": "<huge>", "single_word": False, "lstrip": False,
             "rstrip": False, "normalized": False, "special": True}
        )  # fmt: skip
        (big / "tokenizer.json").write_text(json.dumps(tj))
        check, load = child("check_ids", big, ""), child("load", big, "")
        res = {
            "prompt_chars": int(chars),
            "prompt_precheck": pre,
            "prompt_tokenized_whole": whole,
            "prompt_time_ratio": whole["seconds"] / max(pre["seconds"], 1e-9),
            "tokenizer_claimed_id": args.big_id,
            "tokenizer_json_check": check,
            "tokenizer_load": load,
            "tokenizer_time_ratio": load["seconds"] / max(check["seconds"], 1e-9),
        }
        if args.select_tokens:
            res["select"] = select_cost(args.select_tokens, work)
        Path(args.out).write_text(json.dumps(res, indent=1))
        print(json.dumps(res, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
