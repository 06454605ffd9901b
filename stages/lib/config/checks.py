"""Value checks shared by the config groups: one-line errors, devices, finite numbers, loss terms."""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import math
import re
import types
import typing
from collections.abc import Sequence
from typing import Any

from stages.lib.errors import UserError


def _check(ok: bool, key: str, what: str) -> None:
    if not ok:
        raise UserError(f"impossible config value: {key} {what}", "config", f"fix {key}")


DEVICE_RE = re.compile(r"auto|cpu|cuda(:\d+)?")


def _check_device(value: str | None, key: str, nullable: bool = False) -> None:
    """A device key: auto | cpu | cuda | cuda:N (null too where ``nullable``)."""
    if value is None and nullable:
        return
    ok = isinstance(value, str) and DEVICE_RE.fullmatch(value) is not None
    _check(ok, key, f"must be auto|cpu|cuda|cuda:N{'|null' if nullable else ''} (got {value!r})")


def _closest(word: str, options: Sequence[str], n: int = 3) -> str:
    """``" (closest: a, b)"`` for the options nearest ``word``, or "" when none is near."""
    near = difflib.get_close_matches(word, list(options), n=n, cutoff=0.5)
    return f" (closest: {', '.join(near)})" if near else ""


def _interpolation(v: Any) -> bool:
    """An unresolved ``${...}`` default (the schema's own defaults, before composition)."""
    return isinstance(v, str) and v.startswith("${") and v.endswith("}")


def _finite_value(v: Any) -> bool:
    """False for a NaN/inf float anywhere inside ``v`` (lists and dicts included)."""
    if isinstance(v, float):
        return math.isfinite(v)
    if isinstance(v, list | tuple):
        return all(_finite_value(x) for x in v)
    if isinstance(v, dict):
        return all(_finite_value(x) for x in v.values())
    return True


def _check_finite(obj: Any, group: str) -> None:
    """Every number of a config group is finite (lr=inf or nan would train into NaN weights)."""
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if not dataclasses.is_dataclass(v):  # nested groups check themselves
            _check(_finite_value(v), f"{group}.{f.name}", f"must be finite (got {v!r})")


def _check_tensor_parallel(size: Any, backend: str, group: str) -> None:
    """A vLLM engine spans ``size`` GPUs (an int >= 1); the HF backend runs on one device."""
    key = f"{group}.tensor_parallel_size"
    _check(isinstance(size, int) and not isinstance(size, bool) and size >= 1, key, "must be >= 1")
    _check(size == 1 or backend != "hf", key, f"is vLLM's: set {group}.backend=vllm, or 1")


# The loss functions' own signatures are the schema of a loss term: the keyword arguments after
# the ones every loss takes (the trainer passes vocab_size and temperature itself).
_LOSS_COMMON_ARGS = ("vocab_size", "temperature")


def loss_arguments(name: str) -> dict[str, inspect.Parameter]:
    """The keyword arguments ``loss=<name>`` accepts, from ``stages.lib.losses.LOSSES``."""
    from stages.lib import losses  # torch: imported when a loss is actually configured

    sig = inspect.signature(losses.LOSSES[name], eval_str=True)
    return {
        k: p
        for k, p in sig.parameters.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY and k not in _LOSS_COMMON_ARGS
    }


def _fits(value: Any, annotation: Any) -> bool:
    """Does ``value`` (from YAML) fit a loss argument's annotation (bool/int/float/str/None,
    unions, Literal)? Unknown annotations accept anything."""
    if annotation is inspect.Parameter.empty or annotation is Any:
        return True
    origin = typing.get_origin(annotation)
    if origin is typing.Union or isinstance(annotation, types.UnionType):
        return any(_fits(value, a) for a in typing.get_args(annotation))
    if origin is typing.Literal:
        return value in typing.get_args(annotation)
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if annotation in (int, str):
        return isinstance(value, annotation) and not isinstance(value, bool)
    return True


def check_loss_term(name: str, kwargs: dict[str, Any]) -> None:
    """A UserError for an unknown loss name, an unknown keyword or a value of the wrong type."""
    from stages.lib import losses

    where = f"loss.terms (loss {name!r})"
    if name not in losses.LOSSES:
        known = sorted(losses.LOSSES)
        raise UserError(
            f"unknown loss {name!r}",
            where,
            f"use one of {known}{_closest(name, known)} (stages/lib/losses/)",
        )
    params = loss_arguments(name)
    for k, v in kwargs.items():
        if k not in params:
            raise UserError(
                f"unknown argument {k!r} for loss {name!r}",
                where,
                f"its arguments are {sorted(params)}{_closest(k, list(params))}",
            )
        ann = params[k].annotation
        _check(_fits(v, ann), f"loss.terms[].kwargs.{k}", f"must be {_ann_str(ann)} (got {v!r})")
        _check(_finite_value(v), f"loss.terms[].kwargs.{k}", f"must be finite (got {v!r})")


def _ann_str(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")
