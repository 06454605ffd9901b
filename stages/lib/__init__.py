"""The library the stages share: config (a package), errors, store, models, decoding, log-probs,
losses, loader, run layout, DuckDB views, grading, the vLLM backend, and each large stage's
machinery (``scoring``, ``selection``, ``training``, ``reporting``). It never imports a stage,
``scripts/`` or the demo world."""
