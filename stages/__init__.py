"""distillery stages: rollout -> score -> select -> train -> eval -> report, plus shared code.

Each stage module has an importable ``run(cfg)`` and a thin Hydra ``main``; run one with
``python -m stages.<stage> experiment=demo``. Shared pieces: ``errors`` (user-facing errors),
``config`` (typed Hydra configs), ``store`` (Parquet shard store and manifests).
"""

from stages.lib import threads as _threads

_threads.setup()  # before any stage imports torch: OpenMP reads its environment once
