"""What the input checks of #28 save: a huge prompt refused from a prefix vs tokenized whole, and a
tokenizer claiming a huge id refused from its JSON vs loaded. Each pair runs in fresh
subprocesses on the same machine (wall seconds and peak RSS from ``resource``), written as JSON.

    python scripts/bench_hardening.py --out bench_hardening.json [--mb 20] [--big-id 200000000]

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="bench_hardening.json")
    ap.add_argument("--mb", type=float, default=20.0, help="prompt size in MB")
    ap.add_argument("--big-id", type=int, default=200_000_000, help="the id the tokenizer claims")
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
        Path(args.out).write_text(json.dumps(res, indent=1))
        print(json.dumps(res, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
