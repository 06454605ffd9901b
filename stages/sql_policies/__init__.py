"""Selection policies as parameterised DuckDB SQL files (see stages/select.py)."""
