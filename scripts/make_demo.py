"""Build the demo world (tokenizer, private-facts prompts, tiny Llamas) under one directory.

    python scripts/make_demo.py --out runs/world [--teacher-big] [--quick] [--seed 0] [--force]

Deterministic for a fixed seed; a second call with the same settings returns at once.
What it writes and the text format: see ``scripts/demoworld/world.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

# Run as a plain script from anywhere: make the repo root importable.
REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from demoworld import world as demoworld  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", default="runs/world", help="output directory (default runs/world)")
    ap.add_argument(
        "--teacher-big",
        action="store_true",
        help="also train teacher_big (>= 4x params, knows the private facts)",
    )
    ap.add_argument("--quick", action="store_true", help="tiny sizes and few steps (tests)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true", help="rebuild even when cached")
    ap.add_argument(
        "--threads",
        type=int,
        default=2,
        help="torch CPU threads (part of the cache key: results depend on it bit-wise);"
        " 1 is faster when other jobs share the cores",
    )
    args = ap.parse_args(argv)

    base = demoworld.WorldSettings.quick() if args.quick else demoworld.WorldSettings()
    settings = dataclasses.replace(
        base, seed=args.seed, teacher_big=args.teacher_big, threads=args.threads
    )
    cached = demoworld.is_complete(args.out, settings) and not args.force
    info = demoworld.build_world(args.out, settings, force=args.force)
    print(
        f"world {'(cached) ' if cached else ''}at {args.out}: key {info['key']}, "
        f"vocab {info['tokenizer']['vocab_size']}, {info['seconds']['total']} s"
    )
    for name, m in info["models"].items():
        print(f"  {name}: {m['params']:,} params, accuracy {json.dumps(m['accuracy'])}")
    print(f"  chance: {json.dumps(info['chance_accuracy'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
