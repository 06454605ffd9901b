"""Selection policies as parameterised DuckDB SQL files (the registry: stages/lib/selection/policies.py)."""
