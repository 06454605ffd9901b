"""Each rollout's teacher when several score (``teachers`` with ``score.route_by``): by a column value
(``stages.lib.routing.route``) or by the SQL expression evaluated once over the prompts."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq

from data_schemas import prompts as prompts_schema
from stages.lib.config import Config
from stages.lib.errors import UserError
from stages.lib.routing import route, routes


class Router:
    """Each rollout's teacher name: by ``score.route_by.column`` (:func:`route`), or by
    ``score.route_by.sql`` evaluated once over ``data.prompts`` (stages/lib/routing.py) and
    looked up by the rollout's ``prompt_id``."""

    def __init__(self, cfg: Config) -> None:
        self.rb = rb = cfg.score.route_by
        self.column = rb.column or "prompt_id"
        self.by_prompt = None
        if rb.sql is not None:
            table = prompts_schema.read(cfg.data.prompts, split=cfg.data.split)
            self.by_prompt = routes(table, rb.sql, sorted(cfg.teachers), rb.default)

    def names(self, values: list, where: str) -> list[str]:
        if self.by_prompt is None:
            return route(values, self.rb, where)
        lost = [v for v in values if v not in self.by_prompt]
        if lost:
            raise UserError(
                f"rollouts of prompt {lost[0]!r} ({len(lost)} in all) have no route: the prompt "
                "is not in data.prompts, where score.route_by.sql is evaluated",
                where,
                "set data.prompts to the prompts the rollouts were made from",
            )
        return [self.by_prompt[v] for v in values]

    def check(self, paths: list[Path], shards: list[int]) -> set[str]:
        """Every rollout of ``shards`` has a teacher (before any model loads); the names used."""
        used: set[str] = set()
        for s in shards:
            values = pq.read_table(paths[s], columns=[self.column])[self.column].to_pylist()
            used |= set(self.names(sorted(set(values), key=str), str(paths[s])))
        return used
