"""Print the demo's results table, its goal and a verdict per criterion (the end of `make demo`).

    python scripts/demo_verdict.py --run-dir runs/demo --checkpoint topk_fkl-evidence_retain-val

Reads ``<run-dir>/eval/results.json`` (the eval stage's output). The goal: the student answers
>= 80 % of the private questions closed-book (the base: chance), and stays within 5 points of the
base on public_closed and reading. Each criterion is printed as met or missed, with the margin.
Exit status 0 when the table could be printed (a missed goal is a result, not an error); with
``--strict``, 1 when a criterion is missed.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from stages.lib.errors import UserError, user_errors_exit  # noqa: E402

SETS = ["private_closed", "private_paraphrase", "public_closed", "reading"]


@dataclass(frozen=True)
class Criterion:
    """One line of the goal: a set, and either a floor (%) or a largest drop from the base."""

    set_name: str
    floor: float | None = None  # accuracy (%) to reach
    max_drop: float | None = None  # points below the base allowed

    def text(self) -> str:
        if self.floor is not None:
            return f"{self.set_name} >= {self.floor:g} %"
        return f"{self.set_name} within {self.max_drop:g} points of the base"


GOAL = [
    Criterion("private_closed", floor=80.0),
    Criterion("public_closed", max_drop=5.0),
    Criterion("reading", max_drop=5.0),
]


def verdict(c: Criterion, base: float, run: float) -> tuple[bool, str]:
    """(met, one line) for one criterion; accuracies in %."""
    if c.floor is not None:
        margin = run - c.floor
        what = f"{run:.1f} % (base {base:.1f})"
    else:
        drop = base - run
        margin = c.max_drop - drop
        what = f"{run:.1f} % vs base {base:.1f} ({-drop:+.1f} points)"
    # Accuracies are counts / n in %: a drop of exactly 5 points can come out as 5.000000000000014.
    met = round(margin, 9) >= 0
    how = f"by {margin:.1f} points" if met else f"missed by {-margin:.1f} points"
    return met, f"  {'MET   ' if met else 'MISSED'} {c.text()}: {what}, {how}"


def load(run_dir: Path) -> dict[str, dict[str, float]]:
    """Checkpoint -> set -> accuracy (%) from the eval stage's results.json."""
    path = run_dir / "eval" / "results.json"
    if not path.is_file():
        raise UserError("no eval results", str(path), "run the eval stage first")
    try:
        results = json.loads(path.read_text())["results"]
    except (ValueError, KeyError):
        raise UserError("eval results unreadable", str(path), "re-run the eval stage") from None
    return {
        ck: {s: 100 * r[s]["accuracy"] for s in SETS if isinstance(r.get(s), dict)}
        for ck, r in results.items()
    }


def table(acc: dict[str, dict[str, float]]) -> str:
    lines = ["| checkpoint | " + " | ".join(SETS) + " |", "|---" * (len(SETS) + 1) + "|"]
    for ck, r in acc.items():
        cells = [f"{r[s]:.1f}" if s in r else "–" for s in SETS]
        lines.append(f"| {ck} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--run-dir", default="runs/demo")
    ap.add_argument(
        "--checkpoint",
        default="topk_fkl-evidence_retain-val",
        help="the checkpoint the verdict is about (a name in results.json)",
    )
    ap.add_argument("--base", default="base", help="the base checkpoint's name")
    ap.add_argument("--strict", action="store_true", help="exit 1 when a criterion is missed")
    return ap.parse_args(argv)


@user_errors_exit
def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    acc = load(Path(args.run_dir))
    for name in (args.base, args.checkpoint):
        if name not in acc:
            raise UserError(
                f"checkpoint '{name}' has no eval results",
                str(Path(args.run_dir) / "eval" / "results.json"),
                f"pick one of {sorted(acc)} with --checkpoint / --base",
            )
    base, run = acc[args.base], acc[args.checkpoint]
    print(f"\nGreedy accuracy (%) on the eval sets ({args.run_dir}/eval/results.json):")
    print(table(acc))
    print(f"\nGoal for '{args.checkpoint}' against '{args.base}':")
    results = [verdict(c, base[c.set_name], run[c.set_name]) for c in GOAL]
    for _, line in results:
        print(line)
    ok = all(m for m, _ in results)
    print(f"verdict: {'goal MET' if ok else 'goal MISSED'} on this run ({args.run_dir})")
    return 0 if ok or not args.strict else 1


if __name__ == "__main__":
    sys.exit(main())
