"""Checksums of a small run's data shards: the byte-identity check for refactors.

Builds the quick demo world (cached in ``--world``), runs rollout -> score -> select on it with a
fixed seed, and writes the sha256 of every Parquet shard (rollouts, tokens, selected) as JSON.
Run it before and after a change that must not alter the data, and compare the two files:

    python scripts/shard_checksums.py --world runs/qworld --run runs/qcheck --out before.json
    python scripts/shard_checksums.py --world runs/qworld --run runs/qcheck2 --out after.json
    python scripts/shard_checksums.py --compare before.json after.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))


def _build_world(world: Path) -> None:
    try:
        from demoworld import world as dw  # after the structural step
    except ImportError:
        from stages import demoworld as dw  # type: ignore[no-redef]
    dw.build_world(world, dw.WorldSettings.quick())


def _overrides(world: Path, run: Path) -> list[str]:
    base = world / "models" / "base"
    return [
        "experiment=demo",
        f"run_dir={run}",
        f"student.path={base}",
        f"teacher.path={base}",
        f"ref.path={base}",
        f"data.prompts={world / 'prompts' / 'train.parquet'}",
        "rollout.max_new_tokens=12",
        "rollout.backend=hf",
        "score.backend=hf",
    ]


def _compose(overrides: list[str]):
    try:
        from stages.lib.config import compose
    except ImportError:
        from stages.lib.config import compose  # type: ignore[no-redef]
    return compose("pipeline", overrides)


def checksums(run: Path) -> dict[str, str]:
    out = {}
    for p in sorted(run.rglob("*.parquet")):
        out[str(p.relative_to(run))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", type=Path, default=ROOT / "runs" / "qworld")
    ap.add_argument("--run", type=Path, default=ROOT / "runs" / "qcheck")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--compare", nargs=2, type=Path)
    args = ap.parse_args()
    if args.compare:
        a, b = (json.loads(p.read_text()) for p in args.compare)
        same = a == b
        print(f"{len(a)} vs {len(b)} shards; identical: {same}")
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                print(f"  differs: {k}")
        sys.exit(0 if same else 1)
    from stages import rollout, score, select

    _build_world(args.world)
    cfg = _compose(_overrides(args.world, args.run))
    for stage in (rollout, score, select):
        stage.run(cfg)
    sums = checksums(args.run)
    text = json.dumps(sums, indent=1, sort_keys=True)
    if args.out:
        args.out.write_text(text)
    print(f"{len(sums)} shards", text if not args.out else f"-> {args.out}")


if __name__ == "__main__":
    main()
