"""Build the demo world (tokenizer, private-facts prompts, tiny Llamas) under one directory.

    python scripts/make_demo.py --out runs/world [--teacher-big] [--quick] [--seed 0] [--force]
                                [--threads 2] [--kernels portable|native]

Deterministic for a fixed seed on one machine; a second call with the same settings returns at
once. The printed content hash names what was built (weights, vocabulary, prompt rows). With
``--kernels portable`` (torch's AVX2 kernels, MKL_CBWR=COMPATIBLE, a fixed thread count) the bits
are meant to be the same on every x86 CPU with AVX2, at about 2.8x the build time; the default
``native`` kernels are this CPU's fastest, and their bits differ between CPUs (docs/RESULTS.md).
What it writes and the text format: see ``scripts/demoworld/world.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

# Run as a plain script from anywhere: make the repo root importable.
REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# The kernel settings torch and MKL read once, at import: kept in sync with world.PORTABLE_ENV
# (which imports torch, so it cannot be imported before they are set).
PORTABLE_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "COMPATIBLE"}


def parse(argv: list[str] | None) -> argparse.Namespace:
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
    ap.add_argument(
        "--kernels",
        choices=["portable", "native"],
        default="native",
        help="native (default): this CPU's fastest kernels (the bits differ between CPUs);"
        " portable: the same bits on every x86 CPU with AVX2, ~2.8x slower",
    )
    # Internal: the full settings as JSON (world.build_world re-runs itself through this script).
    ap.add_argument("--settings-json", default=None, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    kernels = json.loads(args.settings_json)["kernels"] if args.settings_json else args.kernels
    if kernels == "portable":
        os.environ.update(PORTABLE_ENV)  # before torch is imported (by demoworld)
    from demoworld import world as demoworld

    if args.settings_json:
        settings = demoworld.settings_from_dict(json.loads(args.settings_json))
    else:
        base = demoworld.WorldSettings.quick() if args.quick else demoworld.WorldSettings()
        settings = dataclasses.replace(
            base,
            seed=args.seed,
            teacher_big=args.teacher_big,
            threads=args.threads,
            kernels=args.kernels,
        )
    cached = demoworld.is_complete(args.out, settings) and not args.force
    info = demoworld.build_world(args.out, settings, force=args.force, _in_child=True)
    print(
        f"world {'(cached) ' if cached else ''}at {args.out}: key {info['key']}, "
        f"vocab {info['tokenizer']['vocab_size']}, {info['seconds']['total']} s"
    )
    for name, m in info["models"].items():
        print(f"  {name}: {m['params']:,} params, accuracy {json.dumps(m['accuracy'])}")
    print(f"  chance: {json.dumps(info['chance_accuracy'])}")
    active = info.get("kernels_active", {})
    print(
        f"  content hash {info.get('content_hash')} "
        f"(kernels {active.get('mode')}: torch {active.get('torch_cpu_capability')}, "
        f"{active.get('threads')} threads)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
