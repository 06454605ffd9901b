"""The selection policies: the registry of SQL policy files with their typed parameters, the columns each
needs, and the binding of a configured rule to its SQL."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stages.lib.errors import UserError

POLICY_DIR = Path(__file__).resolve().parents[2] / "sql_policies"  # the policies' SQL files


NEEDS_FIX = {
    "behavior_entropy": "score with score.behavior=true score.entropy=true (full-vocabulary entropy)",
    "ref_logprob": "score with ref.path set (a reference model), or use the span rule alone "
    "(threshold=null top_fraction=null span=true)",
    "xtok_mapped_frac": "the tokens are not cross-tokenizer: score a teacher of another "
    "tokenizer with score.cross_tokenizer=align, or drop this policy",
}


# ----------------------------------------------------------------------------- policy registry
@dataclass(frozen=True)
class Param:
    """One policy parameter: its default and a check (strict: bound values are numbers/choices)."""

    default: Any
    check: Callable[[Any], bool]
    rule: str  # what the check enforces, for the error message


def _num(lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False, null=False):
    def ok(v: Any) -> bool:
        if v is None:
            return null
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            return False
        return (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)

    return ok


def _choice(*options: str) -> Callable[[Any], bool]:
    return lambda v: v in options


def _bool(v: Any) -> bool:
    return isinstance(v, bool)


INF = math.inf


ENTROPY_PARAMS = {
    "rho": Param(0.5, _num(0, 1, lo_open=True), "a number in (0, 1]"),
    "mode": Param("sample", _choice("sample", "top"), "'sample' or 'top'"),
    "alpha": Param(1.0, _num(0, INF, hi_open=True), "a number >= 0"),
}


Q3_PARAMS = {
    "entropy_quantile": Param(0.5, _num(0, 1, lo_open=True, hi_open=True), "a number in (0, 1)"),
    "divergence_quantile": Param(0.9, _num(0, 1, hi_open=True), "a number in [0, 1)"),
    "divergence": Param("rkl", _choice("rkl", "abs"), "'rkl' or 'abs'"),
}


@dataclass(frozen=True)
class Policy:
    params: dict[str, Param] = field(default_factory=dict)
    # per-token columns that must be non-null on student tokens, given the bound parameters
    needs: Callable[[dict], tuple[str, ...]] = lambda p: ()


POLICIES: dict[str, Policy] = {
    "all": Policy(),
    "entropy": Policy(ENTROPY_PARAMS, lambda p: ("behavior_entropy",)),
    "tip_q3": Policy(Q3_PARAMS, lambda p: ("behavior_entropy",)),
    "tip_type_aware": Policy({**ENTROPY_PARAMS, **Q3_PARAMS}, lambda p: ("behavior_entropy",)),
    "evidence": Policy(
        {
            "threshold": Param(1.0, _num(-INF, INF, null=True), "a number (nats) or null"),
            "top_fraction": Param(None, _num(0, 1, lo_open=True, null=True), "in (0, 1] or null"),
            "span": Param(True, _bool, "true or false"),
            "keep_rest": Param(0.0, _num(0, 1), "a number in [0, 1]"),
        },
        lambda p: (
            ("ref_logprob",) if p["threshold"] is not None or p["top_fraction"] is not None else ()
        ),
    ),
    "retain": Policy({"weight": Param(1.0, _num(0, INF, hi_open=True), "a number >= 0")}),
    "teacher": Policy(
        {
            "name": Param(None, lambda v: isinstance(v, str) and bool(v), "a teacher name"),
            "weight": Param(0.0, _num(0, INF, hi_open=True), "a number >= 0"),
        }
    ),
    "trust_region": Policy({"tau": Param(0.5, _num(0, 1, lo_open=True), "a number in (0, 1]")}),
    "iw_position": Policy({"w_max": Param(1.5, _num(1, INF, hi_open=True), "a number >= 1")}),
    "xtok_mapped": Policy(
        {"min_frac": Param(0.5, _num(0, 1), "a number in [0, 1]")},
        lambda p: ("xtok_mapped_frac",),
    ),
}


@dataclass
class Rule:
    """A resolved rule: the policy name, its SQL text and its validated parameters."""

    policy: str
    sql: str
    params: dict[str, Any]
    needs: tuple[str, ...]


def sql_parameters(sql: str) -> set[str]:
    """The ``$name`` prepared parameters a SQL text uses (comments ignored)."""
    body = "\n".join(line.split("--", 1)[0] for line in sql.splitlines())
    return set(re.findall(r"\$([A-Za-z_][A-Za-z0-9_]*)", body))


def resolve_rule(policy: str, params: dict[str, Any]) -> Rule:
    """Validate a rule's policy and parameters (UserError naming the fix) and load its SQL."""
    where = f"select.rules (policy {policy})"
    params = dict(params or {})
    if policy.endswith(".sql"):  # the user's own policy file: scalars only, bound as given
        path = Path(policy)
        if not path.is_file():
            raise UserError(f"policy file {policy} not found", where, "give an existing .sql path")
        for k, v in params.items():
            if not (v is None or isinstance(v, bool | int | float | str)):
                raise UserError(
                    f"parameter {k}={v!r} is not a scalar", where, "use numbers/strings"
                )
        return Rule(policy, path.read_text(), params, ())
    if policy not in POLICIES:
        raise UserError(
            f"unknown selection policy '{policy}'",
            where,
            f"use one of {sorted(POLICIES)} or a path to your own .sql file",
        )
    spec = POLICIES[policy]
    unknown = sorted(set(params) - set(spec.params))
    if unknown:
        raise UserError(
            f"unknown parameter(s) {unknown} for policy '{policy}'",
            where,
            f"its parameters are {sorted(spec.params)} (see stages/sql_policies/{policy}.sql)",
        )
    bound = {}
    for name, p in spec.params.items():
        v = params.get(name, p.default)
        if isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        if not p.check(v):
            raise UserError(
                f"parameter {name}={v!r} of policy '{policy}' must be {p.rule}",
                where,
                f"set select.rules[i].params.{name}",
            )
        bound[name] = v
    return Rule(policy, (POLICY_DIR / f"{policy}.sql").read_text(), bound, spec.needs(bound))


def bind(rule: Rule, *, seed: int, ln_v: float) -> dict[str, Any]:
    """Exactly the parameters the SQL text uses (DuckDB refuses missing and unused ones)."""
    avail = {**rule.params, "seed": int(seed), "ln_v": float(ln_v)}
    used = sql_parameters(rule.sql)
    missing = sorted(used - set(avail))
    if missing:
        raise UserError(
            f"policy {rule.policy} uses parameter(s) {missing} that are not set",
            "select.rules",
            "add them to the rule's params",
        )
    return {k: avail[k] for k in sorted(used)}
