"""The library the stages share: config, errors, store, models, decoding, log-probs, losses,
loader, run layout, DuckDB views, grading and the vLLM backend. It never imports a stage,
``scripts/`` or the demo world."""
