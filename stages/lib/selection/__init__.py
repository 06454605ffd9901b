"""The select stage's machinery: the policy registry (``policies``, beside the SQL files), the DuckDB
weight pass (``weights``), the Arrow pass that assembles the train-ready table (``assemble``) and
the summary (``summary``). ``stages/select.py`` runs the two passes and commits the selection."""
